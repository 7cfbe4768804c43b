"""What the suites share (issue 18): one cosine classification rule, and `BuiltSuite`'s defaults.

* Every classifier in the package is `tatr.core.classify.cosine_logits`, and its logits are the
  literal rule written here: scale · (f / ‖f‖) @ (h / ‖h‖)ᵀ.
* A self-building suite that writes only its folder, encoder, loaders and evaluate (`Toy` below)
  gets a pinned build, the fine-tune loop, `exemplar_gradients` and `unlabeled_loader` from `BuiltSuite`.
* The refactor that made them shared did not change a built byte (slow: builds the tiny testbed and text suite).
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import Tensor, nn

import tatr
from tatr.core import adamerging, classify, gradients
from tatr.core.checkpoints import load_state_dict, save_state_dict
from tatr.suites import built_suite
from tatr.suites import evaluation as ev
from tatr.suites.base import BUILD_THREADS, Suite, input_seed, seeded_batches
from tatr.suites.built_suite import BuiltSuite
from tatr.suites.testbed import build as testbed_build
from tatr.suites.text import build as text_build


def literal_rule(features: Tensor, head: Tensor, scale: float = 1.0) -> Tensor:
    """The rule as the papers write it, transcribed without the package's code."""
    f = features / features.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    h = head / head.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    return scale * f @ h.T


# --- one rule -----------------------------------------------------------------------------------
def test_every_classifier_uses_the_one_rule() -> None:
    rule = classify.cosine_logits
    users = (gradients, adamerging, ev, testbed_build, text_build, built_suite)
    assert all(module.cosine_logits is rule for module in users)
    # and no module writes a copy of it: normalised features times a head's transpose
    copy = re.compile(r"F\.normalize\([^\n]*\)\s*@")
    root = Path(tatr.__file__).parent
    copies = [str(p.relative_to(root)) for p in root.rglob("*.py") if copy.search(p.read_text())]
    assert copies == []


def test_the_rule_is_the_literal_rule() -> None:
    gen = torch.Generator().manual_seed(0)
    features, head = torch.randn(9, 5, generator=gen), torch.randn(3, 5, generator=gen) * 4
    for scale in (1.0, 20.0):
        torch.testing.assert_close(classify.cosine_logits(features, head, scale), literal_rule(features, head, scale))
    unit = classify.unit_rows(head)
    given = classify.cosine_logits(features, unit, 7.0, unit_head=True)  # the rows are used as they are
    assert torch.equal(given, 7.0 * classify.unit_rows(features) @ unit.T)


def test_the_schedules_keep_each_build_s_arithmetic() -> None:
    """The builds' two schedules, as they were written before they were shared, give the same floats."""

    def testbed_before(step: int, total: int, warmup: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1 + torch.cos(torch.tensor(progress * torch.pi)).item())

    def text_before(step: int, total: int, warmup: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))

    for total, warmup in ((8, 1), (150, 15), (2500, 125), (80, 8), (7, 0)):
        for step in range(total):
            assert built_suite.warmup_cosine(step, total, warmup, torch.float32) == testbed_before(step, total, warmup)
            assert built_suite.warmup_cosine(step, total, warmup, torch.float64) == text_before(step, total, warmup)
    with pytest.raises(ValueError, match="float32 or float64"):
        built_suite.warmup_cosine(5, 8, 1, torch.float16)


# --- a minimal self-building suite ----------------------------------------------------------------
@dataclass(frozen=True)
class ToySpec:
    logit_scale: float = 10.0
    finetune_steps: int = 6
    finetune_batch: int = 8
    finetune_lr: float = 1e-2
    weight_decay: float = 0.0


def toy_encoder() -> nn.Module:
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 4))


class Toy(BuiltSuite):
    """Only `folder`, `encoder`, the loaders and `evaluate`: the rest is `BuiltSuite`'s."""

    name = "toy"
    model_name = "toy-mlp"  # the store's `model` column (part of the Suite protocol, not of the defaults)

    def __init__(self, cache_root: Path) -> None:
        self.tasks = ("a", "b")
        self.spec = ToySpec()
        self.cache_root = cache_root
        self.builds: list[int] = []  # the torch thread count each build ran on

    @property
    def folder(self) -> Path:
        return self.built_folder("v1", self._write)

    def _write(self, tmp: Path) -> None:
        self.builds.append(torch.get_num_threads())
        gen = torch.Generator().manual_seed(0)
        torch.manual_seed(0)
        encoder = toy_encoder()
        theta0 = {k: v.detach().clone() for k, v in encoder.state_dict().items()}
        save_state_dict(theta0, tmp / "pretrained.safetensors")
        heads = {t: classify.unit_rows(torch.randn(3, 4, generator=gen)) for t in self.tasks}
        save_file(heads, str(tmp / "heads.safetensors"))
        (tmp / "finetuned").mkdir()
        for i, task in enumerate(self.tasks):
            data = {}
            for split in ("train", "validation", "test"):
                data[f"x_{split}"] = torch.randn(20, 6, generator=gen)
                data[f"y_{split}"] = torch.randint(0, 3, (20,), generator=gen)
            save_file(data, str(tmp / f"data_{task}.safetensors"))
            theta_t = built_suite.finetune(encoder, theta0, heads[task], data["x_train"], data["y_train"], self.spec, i)
            save_state_dict(theta_t, tmp / "finetuned" / f"{task}.safetensors")
        meta = {"classes": {t: ["x", "y", "z"] for t in self.tasks}, "accuracy": {"pretrained": {}, "individual": {}}}
        (tmp / "meta.json").write_text(json.dumps(meta))
        (tmp / "build_log.json").write_text(json.dumps({"threads": torch.get_num_threads()}))

    def encoder(self, state_dict: Mapping[str, Tensor] | None = None) -> nn.Module:
        model = toy_encoder()
        sd = dict(state_dict) if state_dict is not None else load_state_dict(self.checkpoints().pretrained)
        model.load_state_dict(sd)
        return model.eval()

    def loader(self, task: str, split: str, batch_size: int = 8) -> list[tuple[Tensor, Tensor]]:
        x, y = self._split(task, split)
        return [(x[i : i + batch_size], y[i : i + batch_size]) for i in range(0, len(y), batch_size)]

    def exemplar_loader(self, task: str, n: int, seed: int) -> list[tuple[Tensor, Tensor]]:
        x, y = self._split(task, "train")
        idx = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))[:n]
        return [(x[idx], y[idx])]

    def evaluate(
        self,
        state_dict: Mapping[str, Tensor],
        split: str,
        tasks: tuple[str, ...] | None = None,
        on_task: Callable[[str, float], None] | None = None,
    ) -> dict[str, float]:
        return ev.accuracy(self, state_dict, split, tasks, on_task)


def test_a_minimal_built_suite_gets_the_defaults(tmp_path: Path) -> None:
    before = torch.get_num_threads()
    suite = Toy(tmp_path)
    assert isinstance(suite, Suite)
    try:
        torch.set_num_threads(2)
        _ = suite.folder
        assert torch.get_num_threads() == 2  # the caller's count is restored
    finally:
        torch.set_num_threads(before)
    assert suite.builds == [BUILD_THREADS]  # the build is pinned
    again = Toy(tmp_path)
    assert again.folder == suite.folder and again.builds == []  # a cache hit
    theta0 = load_state_dict(suite.checkpoints().pretrained)
    theta_a = load_state_dict(suite.checkpoints().finetuned["a"])
    assert any(not torch.equal(theta0[k], theta_a[k]) for k in theta0)  # the fine-tune loop moved it

    # exemplar_gradients: the mean |∇| and mean ∇ of the literal rule's cross-entropy at θ_0, per task
    grads = suite.exemplar_gradients(5, 1)
    assert set(grads.abs_mean) == set(grads.signed_mean) == {"a", "b"}
    model = suite.encoder(None)
    for task in suite.tasks:
        (x, y), head = suite.exemplar_loader(task, 5, 1)[0], suite.head(task)
        per_sample = []
        for i in range(len(y)):
            loss = nn.functional.cross_entropy(literal_rule(model(x[i : i + 1]), head, 10.0), y[i : i + 1])
            per_sample.append(torch.autograd.grad(loss, list(model.parameters())))
        names = [k for k, _ in model.named_parameters()]
        abs_mean, signed_mean = load_state_dict(grads.abs_mean[task]), load_state_dict(grads.signed_mean[task])
        for j, name in enumerate(names):
            torch.testing.assert_close(abs_mean[name], torch.stack([g[j].abs() for g in per_sample]).mean(0))
            torch.testing.assert_close(signed_mean[name], torch.stack([g[j] for g in per_sample]).mean(0))
    assert suite.exemplar_gradients(5, 1) == grads  # cached

    # unlabeled_loader: endless seeded batches of the inputs, no labels
    x_test, _ = suite._split("b", "test")
    stream = suite.unlabeled_loader("b", "test", batch_size=6, seed=3)
    order = seeded_batches(len(x_test), 6, input_seed(3, "b"))
    for _ in range(7):  # past one pass of 20 inputs
        batch = next(stream)
        assert isinstance(batch, Tensor) and torch.equal(batch, x_test[next(order)])

    # evaluate and the recorded accuracies (not recorded by this build: measured) use the one rule
    acc = suite.evaluate(theta_a, "test", ("a",))["a"]
    x_a, y_a = suite._split("a", "test")
    with torch.no_grad():
        pred = literal_rule(suite.encoder(theta_a)(x_a), suite.head("a")).argmax(-1)
    assert acc == 100.0 * int((pred == y_a).sum()) / len(y_a)
    assert suite.individual_accuracy("test")["a"] == acc


def test_a_suite_s_evaluation_logits_are_the_literal_rule(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    suite = Toy(tmp_path)
    seen: list[Tensor] = []

    def spy(*args, **kwargs) -> Tensor:
        out = classify.cosine_logits(*args, **kwargs)
        seen.append(out)
        return out

    monkeypatch.setattr(ev, "cosine_logits", spy)
    suite.evaluate(load_state_dict(suite.checkpoints().finetuned["b"]), "validation", ("b",))
    model = suite.encoder(load_state_dict(suite.checkpoints().finetuned["b"]))
    with torch.no_grad():
        expected = [literal_rule(model(x), suite.head("b")) for x, _ in suite.loader("b", "validation")]
    assert len(seen) == len(expected) == 3
    for got, want in zip(seen, expected, strict=True):
        torch.testing.assert_close(got, want)


def test_the_gradient_loss_is_the_literal_rule(monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(1)
    model, head = toy_encoder(), torch.randn(3, 4)
    x, y = torch.randn(7, 6), torch.randint(0, 3, (7,))
    seen: list[Tensor] = []

    def spy(*args, **kwargs) -> Tensor:
        out = classify.cosine_logits(*args, **kwargs)
        seen.append(out.detach())
        return out

    monkeypatch.setattr(gradients, "cosine_logits", spy)
    gradients.gradient_stats_loop(model, head, 20.0, [(x, y)])
    with torch.no_grad():
        expected = [literal_rule(model(x[i : i + 1]), head, 20.0) for i in range(len(y))]
    for got, want in zip(seen, expected, strict=True):
        torch.testing.assert_close(got, want)
    monkeypatch.undo()
    abs_loop, signed_loop = gradients.gradient_stats_loop(model, head, 20.0, [(x, y)])
    abs_vmap, signed_vmap = gradients.gradient_stats(model, head, 20.0, [(x, y)], chunk=3)
    for k in abs_loop:
        torch.testing.assert_close(abs_vmap[k], abs_loop[k])
        torch.testing.assert_close(signed_vmap[k], signed_loop[k])


# --- the built bytes did not change ---------------------------------------------------------------
# Measured with the code before the refactor (commit 838ae27, torch 2.14.1 on x86-64 with MKL, one build
# thread): `git worktree add /tmp/old18 838ae27`, then the tiny builds below run with PYTHONPATH=/tmp/old18.
# A regression guard: the bytes are the contract (cached builds are keyed by their spec, not their code).
# On another torch or CPU the bytes may legitimately differ; remeasure there with the old code.
TINY_TESTBED_SHA256 = {
    "data_counts.safetensors": "5704637764addef4ea4ac93cdd86bf6587f6e5725cf7b843fd9b28a3587bc56e",
    "data_digits.safetensors": "b8b48993652e5ea8289ff74c2ac314ec2ea764c21e914813388760c67c69a9b4",
    "data_flags.safetensors": "47f7026f35354238581e890dd315d45d4f6e6979b7f605ae661f1ea87665ee6e",
    "data_shapes.safetensors": "5140fd2b277c8392a5a2ecb9223fb9c3d2ddfa975f42e797501bc9711e162966",
    "finetuned/counts.safetensors": "578f5d6878885804e1d8f8d74e1fcbce63c5db0d9afdc569f7699c8db501bc93",
    "finetuned/digits.safetensors": "97b099a073da833df6a786da8ee4c0aa5d3715d4ea4e27452c6ae029e824684b",
    "finetuned/flags.safetensors": "986fbccbbd040efa692a078b5bf80bc3a578a5b116bb664121b008f4aee51c4d",
    "finetuned/shapes.safetensors": "8402c4f5ff5ad03ccddd7c1064d6eb2cd00d69112ce35e0358220b784610926f",
    "heads.safetensors": "63887068d004fb49d511e842860c5bb6a7132454481d2d3cf5ec0642ac08d670",
    "meta.json": "684ea30b6dae5f1b288e4a27ebbde03024b6f610ce7a532c317f7ef84c797a7a",
    "pretrained.safetensors": "7d379309fa907931c9b6866a908bb7ef82c6d2aa5c34749a60776e04278947b3",
}
# The tiny text suite of `tests/text_fixtures.py` (meta.json left out: it records the fixture's temporary paths).
TINY_TEXT_SHA256 = {
    "data_animals.safetensors": "81018b90567388c57204087ef935caed32e5d79a3f78d754178960d94388addc",
    "data_colors.safetensors": "4b105ae8d4ee3d7e618a88ec8f6f9b7accdc11286df2e57aa3d3d3d17a4a97d0",
    "data_sizes.safetensors": "e483b95a7499c4d418e336e6c7fcc6039fb0a40980c69db568538a2c5db057cd",
    "finetuned/animals.safetensors": "dce46dcb3f3657e22fd65a615f28029814cca47053d9424274d373601f674fcf",
    "finetuned/colors.safetensors": "34768ea57b469ed1e9a9461ba31627accdb3d95e5e96f2e00949e38f53127fc3",
    "finetuned/sizes.safetensors": "58233d3e6dc5b74271746972fffa050eeeb178082330f236d03902dcd61bc250",
    "heads.safetensors": "1d3500cdef6ca478b4aa2bceec18fc7194ce9cf4e7ab3012e62b186ab31c6d62",
    "pretrained.safetensors": "5cd234e017321dab42d0fa8232d7946f714d7419753db4b8484f8174e486551b",
}


# The same builds on an AMD EPYC machine whose torch CPU capability is AVX2 (2026-12-07): the data files are the
# same bytes, the trained weights and heads differ in float rounding (other vector kernels). A build must be
# byte-identical to one machine's record; a new kind of machine records its own.
TINY_TESTBED_SHA256_AVX2 = {
    "data_counts.safetensors": "5704637764addef4ea4ac93cdd86bf6587f6e5725cf7b843fd9b28a3587bc56e",
    "data_digits.safetensors": "b8b48993652e5ea8289ff74c2ac314ec2ea764c21e914813388760c67c69a9b4",
    "data_flags.safetensors": "47f7026f35354238581e890dd315d45d4f6e6979b7f605ae661f1ea87665ee6e",
    "data_shapes.safetensors": "5140fd2b277c8392a5a2ecb9223fb9c3d2ddfa975f42e797501bc9711e162966",
    "finetuned/counts.safetensors": "edf04195a10e1523842361d9fdb7a2be187904e1aa77ac05affa3beb2504f53b",
    "finetuned/digits.safetensors": "abbf60382bd6b98e1c00443f76fce35a970908ae158fd07ab609d50710e61297",
    "finetuned/flags.safetensors": "3feded4a0c6492c575147467ffbb76db33dfaab198a077d24e2d2e54dc5b2f40",
    "finetuned/shapes.safetensors": "709d30c6a8f37e49aae019e121058bd470cd8a45cd77abbfe83ddd1667b677b7",
    "heads.safetensors": "3cc36e68fd3926e1555a900a6797c6778ee12e3d6bc7b8c1ea797b369c4f4bf2",
    "meta.json": "684ea30b6dae5f1b288e4a27ebbde03024b6f610ce7a532c317f7ef84c797a7a",
    "pretrained.safetensors": "11637746f17410583bad748331c03cfa2d8e766343adc03f6cadafa79ce852d0",
}

TINY_TEXT_SHA256_AVX2 = {
    "data_animals.safetensors": "81018b90567388c57204087ef935caed32e5d79a3f78d754178960d94388addc",
    "data_colors.safetensors": "4b105ae8d4ee3d7e618a88ec8f6f9b7accdc11286df2e57aa3d3d3d17a4a97d0",
    "data_sizes.safetensors": "e483b95a7499c4d418e336e6c7fcc6039fb0a40980c69db568538a2c5db057cd",
    "finetuned/animals.safetensors": "58dc66594232ea4aff80df758f880605f4c810c7d25f2d6b96682fa95c9a2967",
    "finetuned/colors.safetensors": "96440ab4b3f84d83d0dbdf1be9cfa7d1708fb7404f83c63ba671311150b9a93e",
    "finetuned/sizes.safetensors": "ab6ee28bbca81e9d59f7e69c84938f8d9d4c4c6004b39d618fa05f1f8d5582a5",
    "heads.safetensors": "acfae5e665cfe84e9f3141184d4037c64e7a718d660d0c46b3b0935eba5001dc",
    "pretrained.safetensors": "5cd234e017321dab42d0fa8232d7946f714d7419753db4b8484f8174e486551b",
}


# The same builds on an Intel Xeon whose torch CPU capability is AVX512 (2026-12-07, a later session): again only
# the trained weights and heads differ (the testbed's pretraining too), in float rounding.
TINY_TESTBED_SHA256_XEON = {
    "data_counts.safetensors": "5704637764addef4ea4ac93cdd86bf6587f6e5725cf7b843fd9b28a3587bc56e",
    "data_digits.safetensors": "b8b48993652e5ea8289ff74c2ac314ec2ea764c21e914813388760c67c69a9b4",
    "data_flags.safetensors": "47f7026f35354238581e890dd315d45d4f6e6979b7f605ae661f1ea87665ee6e",
    "data_shapes.safetensors": "5140fd2b277c8392a5a2ecb9223fb9c3d2ddfa975f42e797501bc9711e162966",
    "finetuned/counts.safetensors": "ee800c9bd25d730cfafb213bae98c0413ff885c3778a71af61d91dd4866bdf65",
    "finetuned/digits.safetensors": "89b3fbfe4bbce08653d538cac28c561ee033a190ef27abe2a109cb56f882c6f3",
    "finetuned/flags.safetensors": "38841d7be3c3e67d1eefe3f4a6bdcdc048faba5b3af752edf0363742449f42d2",
    "finetuned/shapes.safetensors": "010d0f87788fe3bd806fce63470f8152a9baee1f9d161e1d8b62fa7fa459e835",
    "heads.safetensors": "80d30ee2b20eabaa1732940b49aa174564abac63a01e6baa3b4b34d52f421a47",
    "meta.json": "684ea30b6dae5f1b288e4a27ebbde03024b6f610ce7a532c317f7ef84c797a7a",
    "pretrained.safetensors": "8a07ce193378407e2a69f3d683cabb035775a9a2ebd3ebea17a7f423de62a190",
}
TINY_TEXT_SHA256_XEON = {
    "data_animals.safetensors": "81018b90567388c57204087ef935caed32e5d79a3f78d754178960d94388addc",
    "data_colors.safetensors": "4b105ae8d4ee3d7e618a88ec8f6f9b7accdc11286df2e57aa3d3d3d17a4a97d0",
    "data_sizes.safetensors": "e483b95a7499c4d418e336e6c7fcc6039fb0a40980c69db568538a2c5db057cd",
    "finetuned/animals.safetensors": "c3b90d989839025d524f0cbd96ddb4f7aa08091820564f2067f4b8a16a6c5117",
    "finetuned/colors.safetensors": "e76ba53e4c4dd0cc0045a98a68049240c091c4ae0bab8212d78f36768b464a4b",
    "finetuned/sizes.safetensors": "28fb6080268261e959e92b59aca49469030c5d5bf9f607e46ae60437181c18af",
    "heads.safetensors": "1d3500cdef6ca478b4aa2bceec18fc7194ce9cf4e7ab3012e62b186ab31c6d62",
    "pretrained.safetensors": "5cd234e017321dab42d0fa8232d7946f714d7419753db4b8484f8174e486551b",
}


def _digests(folder: Path, leave_out: tuple[str, ...]) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name not in ("build_log.json", "manifest.json", *leave_out)
    }


@pytest.mark.slow
def test_the_tiny_testbed_s_bytes_are_the_ones_built_before(tiny_testbed) -> None:
    records = (TINY_TESTBED_SHA256, TINY_TESTBED_SHA256_AVX2, TINY_TESTBED_SHA256_XEON)
    assert _digests(tiny_testbed.folder, ()) in records


@pytest.mark.slow
def test_the_tiny_text_suite_s_bytes_are_the_ones_built_before(tmp_path: Path) -> None:
    from text_fixtures import TINY_OPTIONS, make_tasks, make_tiny_bert

    from tatr.suites import get_suite

    options = {"model": str(make_tiny_bert(tmp_path / "bert")), "tasks": str(make_tasks(tmp_path / "tasks"))}
    suite = get_suite("text", {**options, **TINY_OPTIONS}, tmp_path / "cache")
    assert _digests(suite.folder, ("meta.json",)) in (TINY_TEXT_SHA256, TINY_TEXT_SHA256_AVX2, TINY_TEXT_SHA256_XEON)
