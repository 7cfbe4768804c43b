"""The generic evaluation and gradient-cache helpers of `tatr.suites.evaluation`, on a toy in-memory suite."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from tatr.core.checkpoints import load_state_dict, save_state_dict
from tatr.core.errors import TatrError
from tatr.core.gradients import gradient_stats_loop
from tatr.suites import evaluation as ev
from tatr.suites.base import Checkpoints, Suite, input_seed, seeded_batches


class ToySuite:
    """Two tasks on random 4-d inputs; a linear encoder whose identity-like θ_0 is known."""

    name = "toy"
    model_name = "toy-linear"
    tasks = ("a", "b")

    def __init__(self, folder: Path) -> None:
        gen = torch.Generator().manual_seed(0)
        self.x = {t: torch.randn(40, 4, generator=gen) for t in self.tasks}
        self.heads = {t: F.normalize(torch.randn(3, 4, generator=gen), dim=-1) for t in self.tasks}
        self.pre = folder / "pre.safetensors"
        save_state_dict({"weight": torch.eye(4), "bias": torch.zeros(4)}, self.pre)

    def labels(self, task: str) -> Tensor:
        return (F.normalize(self.x[task], dim=-1) @ self.heads[task].T).argmax(-1)

    def checkpoints(self) -> Checkpoints:
        return Checkpoints(self.pre, {})

    def encoder(self, state_dict: Mapping[str, Tensor] | None = None) -> nn.Module:
        model = nn.Linear(4, 4)
        model.load_state_dict(dict(state_dict) if state_dict is not None else load_state_dict(self.pre))
        return model.eval()

    def head(self, task: str) -> Tensor:
        return self.heads[task]

    def logit_scale(self) -> float:
        return 10.0

    def loader(self, task: str, split: str, batch_size: int = 256) -> DataLoader:
        return DataLoader(TensorDataset(self.x[task], self.labels(task)), batch_size=16)

    def exemplar_loader(self, task: str, n: int, seed: int) -> DataLoader:
        idx = torch.randperm(40, generator=torch.Generator().manual_seed(seed))[:n]
        return DataLoader(TensorDataset(self.x[task][idx], self.labels(task)[idx]), batch_size=7)

    def unlabeled_loader(self, task: str, split: str, batch_size: int = 16, seed: int = 0) -> Iterator[Tensor]:
        return (self.x[task][idx] for idx in seeded_batches(40, batch_size, input_seed(seed, task)))

    def evaluate(self, state_dict, split, tasks=None, on_task=None):
        return ev.accuracy(self, state_dict, split, tasks, on_task)

    def individual_accuracy(self, split: str) -> dict[str, float]:
        return {"a": 100.0, "b": 50.0}

    def exemplar_gradients(self, n: int, seed: int):
        raise NotImplementedError


@pytest.fixture
def toy(tmp_path: Path) -> ToySuite:
    return ToySuite(tmp_path)


def test_toy_suite_satisfies_the_protocol(toy: ToySuite) -> None:
    assert isinstance(toy, Suite)


def test_accuracy_with_known_answers(toy: ToySuite) -> None:
    # Labels are defined by θ_0's own predictions, so θ_0 is perfect and a negated encoder is not.
    assert ev.accuracy(toy, None, "test") == {"a": 100.0, "b": 100.0}
    flipped = {"weight": -torch.eye(4), "bias": torch.zeros(4)}
    seen: list[str] = []
    acc = ev.accuracy(toy, flipped, "validation", on_task=lambda t, a: seen.append(t))
    assert seen == ["a", "b"]
    assert all(a < 60.0 for a in acc.values())


def test_evaluate_merged_normalizes_by_individual(toy: ToySuite) -> None:
    result = ev.evaluate_merged(toy, {"weight": torch.eye(4), "bias": torch.zeros(4)}, "test")
    assert result.normalized == {"a": 100.0, "b": 200.0}
    assert result.mean_accuracy == 100.0 and result.mean_normalized == 150.0
    table = result.table("toy")
    assert "average" in table and "200.00" in table


def test_bad_split_and_task_are_user_errors(toy: ToySuite) -> None:
    with pytest.raises(TatrError, match="unknown split 'tset'"):
        ev.accuracy(toy, None, "tset")
    with pytest.raises(TatrError, match="unknown task"):
        ev.accuracy(toy, None, "test", tasks=("c",))


def test_exemplar_gradients_match_the_loop_and_are_cached(toy: ToySuite, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    grads = ev.exemplar_gradients(toy, n=10, seed=3, cache_root=cache, chunk=4)
    for task in toy.tasks:
        ref_abs, ref_signed = gradient_stats_loop(
            toy.encoder(None), toy.head(task), toy.logit_scale(), toy.exemplar_loader(task, 10, 3)
        )
        got_abs, got_signed = load_state_dict(grads.abs_mean[task]), load_state_dict(grads.signed_mean[task])
        for k in ref_abs:
            torch.testing.assert_close(got_abs[k], ref_abs[k], rtol=1e-6, atol=1e-7)
            torch.testing.assert_close(got_signed[k], ref_signed[k], rtol=1e-6, atol=1e-7)
    # Same inputs: same folders, not recomputed (mtime unchanged). Other seed: other folders.
    mtime = grads.abs_mean["a"].stat().st_mtime_ns
    again = ev.exemplar_gradients(toy, n=10, seed=3, cache_root=cache)
    assert again == grads and grads.abs_mean["a"].stat().st_mtime_ns == mtime
    other = ev.exemplar_gradients(toy, n=10, seed=4, cache_root=cache)
    assert other.abs_mean["a"] != grads.abs_mean["a"]


def test_exemplar_gradients_rebuild_a_corrupted_entry(toy: ToySuite, tmp_path: Path) -> None:
    grads = ev.exemplar_gradients(toy, n=5, seed=0, cache_root=tmp_path)
    good = {k: v.clone() for k, v in load_state_dict(grads.abs_mean["b"]).items()}  # file may be mmapped
    grads.abs_mean["b"].write_bytes(b"garbage")
    again = ev.exemplar_gradients(toy, n=5, seed=0, cache_root=tmp_path)
    for k, v in load_state_dict(again.abs_mean["b"]).items():
        torch.testing.assert_close(v, good[k])


def test_exemplar_gradients_refuse_mismatched_keys(toy: ToySuite, tmp_path: Path) -> None:
    save_state_dict({"other": torch.zeros(1)}, toy.pre)
    toy.encoder = lambda sd=None: nn.Linear(4, 4)  # type: ignore[method-assign]
    with pytest.raises(TatrError, match="not a key of the checkpoint"):
        ev.exemplar_gradients(toy, n=5, seed=0, cache_root=tmp_path)
