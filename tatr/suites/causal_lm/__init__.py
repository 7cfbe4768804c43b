"""Causal language models: multiple-choice scoring by lm-evaluation-harness's rules (`scoring`).

The causal-LM suite itself (SmolLM2 from PyPI, its tasks and fine-tunes) is not built yet; this package
holds what it will score with, tested against lm-eval."""

from tatr.suites.causal_lm.scoring import Question, Scores, encode_pair, score

__all__ = ["Question", "Scores", "encode_pair", "score"]
