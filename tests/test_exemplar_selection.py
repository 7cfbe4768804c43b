"""Exemplar selection (`exemplars.selection`): the balanced draw's balance and seeding, the random draw the
same as every suite always made, and the default leaving every cache key, config hash and store row as it was."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tatr.core.cache import content_hash, file_digest
from tatr.core.checkpoints import load_state_dict
from tatr.core.errors import TatrError
from tatr.core.gradients import gradient_moments_loop
from tatr.runs.config import ExperimentConfig, config_dict, config_hash, load_config
from tatr.store.record import RunRecord, store_rows
from tatr.suites.base import exemplar_indices
from tatr.suites.evaluation import GRADIENT_FORMAT, tensor_digest


def old_random_draw(n_examples: int, n: int, seed: int) -> torch.Tensor:
    """The exemplar draw every suite made before the option (the testbed's `exemplar_loader`, transcribed)."""
    return torch.randperm(n_examples, generator=torch.Generator().manual_seed(seed))[:n]


@settings(max_examples=80, deadline=None)
@given(
    sizes=st.lists(st.integers(1, 12), min_size=1, max_size=9),
    seed=st.integers(0, 2**31 - 1),
    data=st.data(),
)
def test_balanced_takes_the_classes_in_turn(sizes: list[int], seed: int, data: st.DataObject) -> None:
    labels = torch.tensor([c for c, size in enumerate(sizes) for _ in range(size)])
    labels = labels[torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed % 1000))]
    n = data.draw(st.integers(1, len(labels)))
    idx = exemplar_indices(labels, n, seed, "balanced")
    assert len(idx) == n == len(set(idx.tolist())) and bool((idx >= 0).all()) and bool((idx < len(labels)).all())
    counts = Counter(labels[idx].tolist())
    classes = len(sizes)
    if n <= classes:
        assert len(counts) == n and set(counts.values()) == {1}  # n distinct classes
    # round-robin: a class has fewer than the most taken only where it ran out
    most = max(counts.values())
    for c, size in enumerate(sizes):
        assert counts.get(c, 0) >= min(size, most - 1), (c, size, counts)
    assert torch.equal(idx, exemplar_indices(labels, n, seed, "balanced"))  # seeded


def test_balanced_depends_on_the_seed_and_random_is_the_old_draw() -> None:
    labels = torch.arange(60) % 6
    a, b = exemplar_indices(labels, 12, 0, "balanced"), exemplar_indices(labels, 12, 1, "balanced")
    assert not torch.equal(a, b)
    assert Counter(labels[a].tolist()) == dict.fromkeys(range(6), 2)
    assert len(set(labels[exemplar_indices(labels, 4, 3, "balanced")].tolist())) == 4
    for seed in (0, 7):
        assert torch.equal(exemplar_indices(labels, 9, seed), old_random_draw(60, 9, seed))
        assert torch.equal(exemplar_indices(labels, 9, seed, "random"), old_random_draw(60, 9, seed))
    with pytest.raises(TatrError, match="unknown exemplar selection 'balance'; did you mean 'balanced'"):
        exemplar_indices(labels, 3, 0, "balance")


def test_testbed_loader_draws_by_selection(tiny_testbed) -> None:
    suite = tiny_testbed
    x, y = suite._split("shapes", "train")
    old = old_random_draw(len(y), 10, 4)
    got_x = torch.cat([b for b, _ in suite.exemplar_loader("shapes", 10, 4)])
    got_y = torch.cat([b for _, b in suite.exemplar_loader("shapes", 10, 4)])
    assert torch.equal(got_y, y[old]) and torch.equal(got_x, suite.prepare(x[old]))
    balanced = torch.cat([b for _, b in suite.exemplar_loader("shapes", 10, 4, "balanced")])
    counts = Counter(balanced.tolist())
    assert max(counts.values()) - min(counts.values()) <= 1 and len(counts) == min(10, len(set(y.tolist())))


def test_gradient_folders_keep_their_keys_and_the_square_has_its_own(tiny_testbed) -> None:
    """The random draw's folder is keyed as before the option and the third moment (the key transcribed from
    `tatr/suites/evaluation.py` before them); a balanced draw is other exemplars, so another folder; the
    mean square has a folder of its own and equals a per-sample loop on the same exemplars."""
    suite = tiny_testbed
    grads = suite.exemplar_gradients(5, 0)
    encoder = suite.encoder(None)
    names = [k for k, p in encoder.named_parameters() if p.dtype.is_floating_point]
    for task in suite.tasks:
        batches = list(suite.exemplar_loader(task, 5, 0))
        old_key = content_hash(
            "exemplar-gradients",
            GRADIENT_FORMAT,
            suite.name,
            task,
            file_digest(suite.checkpoints().pretrained),
            names,
            float(suite.logit_scale()),
            tensor_digest(suite.head(task)),
            tensor_digest(*(t for batch in batches for t in batch)),
        )
        assert grads.abs_mean[task].parent.name == old_key
    assert grads.sq_mean is None
    both = suite.exemplar_gradients(5, 0, squared=True)
    assert both.abs_mean == grads.abs_mean and both.signed_mean == grads.signed_mean
    task = suite.tasks[1]
    ref = gradient_moments_loop(encoder, suite.head(task), suite.logit_scale(), list(suite.exemplar_loader(task, 5, 0)))
    sq = load_state_dict(both.sq_mean[task])
    assert both.sq_mean[task].parent != both.abs_mean[task].parent and sq.keys() == ref["sq_mean"].keys()
    for k in sq:
        torch.testing.assert_close(sq[k], ref["sq_mean"][k], rtol=1e-4, atol=1e-10)
    balanced = suite.exemplar_gradients(5, 0, selection="balanced")
    assert all(balanced.abs_mean[t] != grads.abs_mean[t] for t in suite.tasks)


def test_the_default_selection_leaves_configs_and_rows_as_they_were() -> None:
    config = load_config(None, ["merge.trust_region=exemplar"])
    data = config_dict(config)
    assert data["exemplars"] == {"n": 32, "seed": 0}  # no `selection` key: the dict and hash of before
    balanced = load_config(None, ["merge.trust_region=exemplar", "exemplars.selection=balanced"])
    assert config_dict(balanced)["exemplars"]["selection"] == "balanced"
    assert config_hash(balanced) != config_hash(config)
    assert ExperimentConfig.model_validate(config_dict(balanced)) == balanced  # reads back
    with pytest.raises(TatrError, match=r"exemplars\.selection: unknown exemplar selection 'balance'"):
        load_config(None, ["exemplars.selection=balance"])

    def row(cfg: ExperimentConfig) -> dict:
        rec = RunRecord.merged(
            run_id="r", job_type="evaluate", config=config_dict(cfg), config_hash="h", model=None, split="test",
            accuracy={"a": 50.0}, normalized={"a": 60.0},
        )  # fmt: skip
        return store_rows(rec)[0]

    assert row(config)["exemplar_selection"] == "random" and row(balanced)["exemplar_selection"] == "balanced"
    assert row(load_config(None, ["merge.trust_region=zero-shot"]))["exemplar_selection"] is None  # no exemplars read


def test_clip8_reads_a_splits_labels_without_its_images(tmp_path) -> None:
    """Balanced clip8 exemplars need the train split's labels: read from the sample lists (no file is opened:
    these paths do not exist), through the train/validation `Subset`."""
    import numpy as np
    from torch.utils.data import Subset

    from tatr.suites.clip8.splits import ArrayImages, ImageFiles, labels_of

    files = ImageFiles([(tmp_path / f"missing{i}.jpg", i % 3) for i in range(7)])
    assert labels_of(files).tolist() == [0, 1, 2, 0, 1, 2, 0]
    assert labels_of(Subset(files, [6, 1, 2])).tolist() == [0, 1, 2]
    arrays = ArrayImages(np.zeros((4, 2, 2), dtype=np.uint8), [3, 1, 3, 0])
    assert labels_of(Subset(arrays, [3, 0])).tolist() == [0, 3]
    with pytest.raises(TatrError, match="cannot read the labels of a list"):
        labels_of([1, 2])  # type: ignore[arg-type]


def test_a_suite_without_the_options_gets_one_line(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A plugin suite whose `exemplar_gradients(n, seed)` takes neither keyword (the sweep-toy suite) runs every
    default draw, and a balanced draw or a diag-fisher merge is refused in one line before any work."""
    import tests.sweep_fixtures  # noqa: F401  (registers the sweep-toy suite)
    from tatr.runs.config import ExemplarConfig, MergeConfig
    from tatr.runs.plan import PlanBook
    from tatr.suites import get_suite

    monkeypatch.setenv("TATR_CACHE", str(tmp_path))
    suite = get_suite("sweep-toy", {"tasks": 3, "n": 48})
    book = PlanBook(suite, ExperimentConfig(benchmark="sweep-toy"), cache_root=tmp_path)
    assert book.gradients(ExemplarConfig(n=4)).sq_mean is None
    with pytest.raises(TatrError, match=r"^suite 'sweep-toy' cannot compute balanced exemplars"):
        book.gradients(ExemplarConfig(n=4, selection="balanced"))
    with pytest.raises(TatrError, match=r"^suite 'sweep-toy' cannot compute mean squared gradients"):
        book.get(MergeConfig(trust_region="diag-fisher"), ExemplarConfig(n=4))
    book.get(MergeConfig(trust_region="gradient-agreement"), ExemplarConfig(n=4))  # the signed mean it has
