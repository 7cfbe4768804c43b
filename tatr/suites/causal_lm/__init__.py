"""The causal-LM suite (`benchmark: lm`): a causal language model merged across text tasks asked as multiple
choice, scored by lm-evaluation-harness's rules (`scoring`). Importing it registers the suite."""

from tatr.suites.causal_lm.scoring import Question, Scores, encode_pair, score
from tatr.suites.causal_lm.suite import CausalLMSpec, CausalLMSuite

__all__ = ["CausalLMSpec", "CausalLMSuite", "Question", "Scores", "encode_pair", "score"]
