"""The out-of-core merge against the in-memory one: the same bits, the same ⌈(1−q)N⌉ coordinates dropped.

The reference is the in-memory `MergePlan` path (every method's own tests hold it to its published code),
and for the selection a full stable sort of Ω written here, the definition of the exact trust region.
Values are drawn from a few multiples of 1/2 so that Ω ties everywhere, at the threshold included.
"""

from __future__ import annotations

import errno
import math
import warnings
from fractions import Fraction
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from tatr.cli import main
from tatr.core.errors import TatrError
from tatr.core.memory_budget import in_memory_bytes
from tatr.core.merging import plan_merge
from tatr.core.one_shot import merge, merge_once
from tatr.core.out_of_core import KeepMasks, scan
from tatr.core.passes import arena_dtype
from tatr.core.streamed_safetensors import SafetensorsStream, streamed_safetensors
from tatr.core.trust_region import MODES

FLOATS = (torch.float32, torch.bfloat16, torch.float16)
LINEAR = ("ta", "average")
RESTREAMING = ("ties-sum", "ties-mean", "dare", "dare-ties", "breadcrumbs", "consensus-ta", "tsv-m", "iso-c")
DATA_FREE = ("off", "zero-shot", "magnitude-only", "zero-shot-per-tensor", "zero-shot-theta0")
EXEMPLAR = ("exemplar", "gradient-only", "diag-fisher")
QS = (1.0, 0.999999, 0.99, 0.9, 0.5, 0.3, 0.01, 1e-9)
NAMES = ("z.out", "a.attn.weight", "m.mlp.bias", "b.scalar", "c.conv")  # not sorted: canonical order is


def bits(t: torch.Tensor) -> torch.Tensor:
    """The tensor's bytes as integers, so that −0.0 ≠ +0.0 and NaN payloads count."""
    return t.contiguous().reshape(-1).view(torch.uint8)


def assert_same_bits(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert list(a) == list(b)
    for key in a:
        assert a[key].dtype == b[key].dtype and a[key].shape == b[key].shape, key
        assert torch.equal(bits(a[key]), bits(b[key])), key


@st.composite
def models(draw: st.DrawFn, exemplar: bool = False) -> tuple:
    """θ_0 (an int buffer and a frozen key beside 1–4 merged keys of various shapes and dtypes), T fine-tuned
    copies and, with `exemplar`, T gradient files; τ from {0, ±½, ±1}, so Ω ties at many values."""
    t = draw(st.integers(2, 4))
    names = draw(st.lists(st.sampled_from(NAMES), min_size=1, max_size=4, unique=True))
    shapes = {n: tuple(draw(st.lists(st.integers(1, 5), min_size=0, max_size=3))) for n in names}
    dtypes = {n: draw(st.sampled_from(FLOATS)) for n in names}
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)

    def levels(shape: tuple, choices: tuple, dtype: torch.dtype) -> torch.Tensor:
        idx = torch.randint(len(choices), shape, generator=g)
        return torch.tensor(choices, dtype=torch.float32)[idx].to(dtype)

    pre = {n: levels(shapes[n], (-2.0, -1.0, 0.0, 1.0, 3.0), dtypes[n]) for n in names}
    pre["buf.ids"] = torch.arange(6)
    pre["frozen.ln"] = levels((3,), (1.0, -1.0), torch.float16)
    tasks = []
    for i in range(t):
        ft = {}
        for n, v in pre.items():
            if n in names:
                tau = levels(v.shape, (-1.0, -0.5, 0.0, 0.0, 0.5, 1.0), v.dtype)
                tau.reshape(-1)[i % v.numel()] = 0.5  # every task changes something
                ft[n] = v + tau
            else:
                ft[n] = v.clone()
        tasks.append(ft)
    grads = None
    if exemplar:
        grads = [{n: levels(shapes[n], (0.0, 0.5, 1.0, 2.0), torch.float32) + 0.5 for n in names} for _ in range(t)]
        for grad in grads:
            grad["frozen.ln"] = torch.zeros(3)
    return pre, tasks, grads


def _both(pre: dict, tasks: list, **kw: object) -> tuple:
    """(in memory, out of core): each a merged dict or the one-line error's text."""
    results = []
    for low in (False, True):
        try:
            results.append(merge(pre, tasks, low_memory=low, **kw))
        except TatrError as exc:
            results.append(str(exc))
    return tuple(results)


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    drawn=models(),
    method=st.sampled_from(LINEAR + RESTREAMING),
    mode=st.sampled_from([m for m in DATA_FREE if m in MODES]),
    q=st.sampled_from(QS),
    lam=st.sampled_from([0.3, 1.0, -0.7]),
)
def test_zero_shot_out_of_core_is_bit_identical(drawn: tuple, method: str, mode: str, q: float, lam: float) -> None:
    pre, tasks, _ = drawn
    memory, streamed = _both(pre, tasks, method=method, trust_region=mode, q=q, lam=lam)
    if isinstance(memory, str):
        assert streamed == memory
        return
    assert_same_bits(memory, streamed)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    drawn=models(exemplar=True),
    method=st.sampled_from(("ta", "ties-sum", "ties-mean", "dare-ties", "breadcrumbs", "consensus-ta")),
    mode=st.sampled_from([m for m in EXEMPLAR if m in MODES]),
    q=st.sampled_from(QS),
)
def test_exemplar_out_of_core_is_bit_identical(drawn: tuple, method: str, mode: str, q: float) -> None:
    pre, tasks, grads = drawn
    memory, streamed = _both(pre, tasks, method=method, trust_region=mode, gradients=grads, q=q, lam=0.4)
    if isinstance(memory, str):
        assert streamed == memory
        return
    assert_same_bits(memory, streamed)


def _reference_drop(omega: torch.Tensor, q: float) -> torch.Tensor:
    """The definition: a full stable sort of Ω, descending; the first ⌈(1−q)N⌉ positions dropped."""
    n = omega.numel()
    k = math.ceil((1 - Fraction(repr(q))) * n)
    order = torch.sort(omega, descending=True, stable=True).indices
    drop = torch.zeros(n, dtype=torch.bool)
    drop[order[:k]] = True
    return drop


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(drawn=models(), q=st.sampled_from(QS), backwards=st.booleans())
def test_out_of_core_drops_exactly_the_sorted_first_k(drawn: tuple, q: float, backwards: bool) -> None:
    pre, tasks, _ = drawn
    plan = plan_merge(pre, tasks, trust_region="zero-shot")  # Ω over the N merged coordinates, in key order
    ts = plan.task_set
    found = scan(ts, "zero-shot", q, arena_dtype(ts), progress=False)
    assert found.space == plan.space
    masks = KeepMasks(ts, found, "zero-shot", arena_dtype(ts))
    order = range(len(found.space.keys))
    keeps = {i: masks.keep(i) for i in (reversed(order) if backwards else order)}  # a jump ahead fills in
    drop = torch.cat(
        [
            torch.zeros(math.prod(s), dtype=torch.bool) if keeps[i] is None else ~keeps[i].reshape(-1)
            for i, s in enumerate(found.space.shapes)
        ]
    )
    expected = _reference_drop(plan.omega, q)
    assert torch.equal(drop, expected)
    assert int(drop.sum()) == math.ceil((1 - Fraction(repr(q))) * plan.space.numel) == masks.summary()[0]


# --- files -------------------------------------------------------------------------------------------
def _write(folder: Path, pre: dict, tasks: list) -> tuple[Path, list[Path]]:
    save_file(pre, folder / "pre.safetensors")
    paths = []
    for i, t in enumerate(tasks):
        paths.append(folder / f"ft{i}.safetensors")
        save_file(t, paths[-1])
    return folder / "pre.safetensors", paths


def _models(t: int = 3, dtype: torch.dtype = torch.bfloat16, seed: int = 0) -> tuple[dict, list[dict]]:
    g = torch.Generator().manual_seed(seed)
    pre = {
        "layers.0.w": torch.randn(16, 8, generator=g).to(dtype),
        "layers.0.b": torch.randn(16, generator=g).to(dtype),
        "layers.1.w": torch.randn(4, 4, 3, generator=g).to(dtype),
        "ids": torch.arange(5),
        "frozen": torch.randn(7, generator=g).to(dtype),
    }
    tasks = [
        {
            k: (v + 0.1 * torch.randn(v.shape, generator=g).to(dtype)) if k.startswith("layers") else v
            for k, v in pre.items()
        }
        for _ in range(t)
    ]
    return pre, tasks


def _read(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    with safe_open(str(path), "pt") as fh:
        return {k: fh.get_tensor(k) for k in sorted(fh.keys())}, fh.metadata()


@pytest.mark.parametrize(
    ("method", "mode"), [("ta", "zero-shot"), ("ta", "off"), ("ties-sum", "exemplar"), ("dare", "zero-shot")]
)
def test_streamed_file_equals_the_in_memory_file(tmp_path: Path, method: str, mode: str) -> None:
    pre, tasks = _models()
    p, fts = _write(tmp_path, pre, tasks)
    g = torch.Generator().manual_seed(1)
    grads = [{k: torch.rand(v.shape, generator=g) for k, v in pre.items() if v.is_floating_point()} for _ in tasks]
    kw = {"method": method, "trust_region": mode, "q": 0.9, "lam": 0.5, "metadata": {"tatr": "x"}}
    kw["gradients"] = grads if mode == "exemplar" else None
    _, plan = merge_once(p, fts, out=tmp_path / "memory.safetensors", low_memory=False, **kw)
    _, streamed = merge_once(p, fts, out=tmp_path / "streamed.safetensors", low_memory=True, **kw)
    memory, meta_m = _read(tmp_path / "memory.safetensors")
    ours, meta_s = _read(tmp_path / "streamed.safetensors")
    assert_same_bits(memory, ours) and meta_m == meta_s == {"tatr": "x"}
    assert set(load_file(tmp_path / "streamed.safetensors")) == set(pre)
    assert streamed.drop_count(0.9) == plan.drop_count(0.9) and streamed.num_coordinates == plan.num_coordinates
    assert streamed.mask_stats(0.9) == plan.mask_stats(0.9)


def test_ties_zero_sums_are_patched_into_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """TIES' zero-sum coordinates take the model-wide majority sign, known only at the end: here it is −,
    so the streamed file is patched in place, and equals the in-memory merge."""
    pre = {"a": torch.zeros(6), "b": torch.zeros(4)}
    t1 = {"a": torch.tensor([1.0, -1.0, -2.0, -2.0, -3.0, 0.5]), "b": torch.tensor([2.0, -1.0, -1.0, -1.0])}
    t2 = {"a": torch.tensor([-1.0, 1.0, -2.0, -1.0, -3.0, 0.5]), "b": torch.tensor([-2.0, -1.0, -2.0, -1.0])}
    p, fts = _write(tmp_path, pre, [t1, t2])
    patched: list[str] = []
    original = SafetensorsStream.patch

    def counting(self: SafetensorsStream, key: str, idx: torch.Tensor, values: torch.Tensor) -> None:
        patched.append(key)
        original(self, key, idx, values)

    monkeypatch.setattr(SafetensorsStream, "patch", counting)
    kw = {"method": "ties-sum", "trust_region": "off", "lam": 1.0, "ties_k": 100}
    memory = merge(pre, [t1, t2], low_memory=False, **kw)
    assert memory["a"][0] == -1.0 and memory["b"][0] == -2.0  # the "−" alternative, not the "+" one
    out = tmp_path / "m.safetensors"
    merge_once(
        p, fts, out=out, low_memory=True, method="ties-sum", trust_region="off", lam=1.0, options={"ties_k": 100}
    )
    assert sorted(patched) == ["a", "b"]
    assert_same_bits({k: memory[k] for k in sorted(memory)}, _read(tmp_path / "m.safetensors")[0])


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(".tatr-tmp-"))


def test_an_error_mid_stream_leaves_the_old_output_and_no_temporary(tmp_path: Path) -> None:
    """The merge pass fails after some tensors were written (fp16 overflows at the last key): the output
    that was there stays as it was, and nothing else is left."""
    pre, tasks = _models(dtype=torch.float16)
    p, fts = _write(tmp_path, pre, tasks)
    out = tmp_path / "merged.safetensors"
    out.write_bytes(b"the previous result")
    with pytest.raises(TatrError, match=r"overflows torch\.float16"):
        merge_once(p, fts, out=out, low_memory=True, lam=1e6, q=0.9)
    assert out.read_bytes() == b"the previous result" and _leftovers(tmp_path) == []


@pytest.mark.parametrize("where", ["nan", "identical", "disk"])
def test_no_file_after_an_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, where: str) -> None:
    """A NaN found in the scan, a task identical to θ_0 found after the one-pass TA has written every
    tensor, a full disk while writing: one line, and no file."""
    pre, tasks = _models()
    mode = "zero-shot"
    if where == "nan":
        tasks[1]["layers.1.w"][0, 0, 0] = float("nan")
    if where == "identical":
        tasks[2] = {k: v.clone() for k, v in pre.items()}
        mode = "off"
    p, fts = _write(tmp_path, pre, tasks)
    if where == "disk":

        def full(self: SafetensorsStream, key: str, tensor: torch.Tensor) -> None:
            raise OSError(errno.ENOSPC, "No space left on device")

        monkeypatch.setattr(SafetensorsStream, "put", full)
    out = tmp_path / "merged.safetensors"
    needle = {"nan": "NaN or infinite", "identical": "identical to the pretrained model", "disk": "cannot write"}
    with pytest.raises(TatrError, match=needle[where]) as caught:
        merge_once(p, fts, out=out, low_memory=True, trust_region=mode)
    assert "\n" not in str(caught.value)
    assert not out.exists() and _leftovers(tmp_path) == []


def test_the_streamed_writer_writes_any_order_and_refuses_a_gap(tmp_path: Path) -> None:
    tensors = {
        "f64": torch.randn(3, dtype=torch.float64),
        "bf16": torch.randn(2, 3).to(torch.bfloat16),
        "f16": torch.randn(5).to(torch.float16),
        "scalar": torch.tensor(1.5),
        "empty": torch.zeros(0, 4),
        "i64": torch.arange(4),
        "i8": torch.arange(3, dtype=torch.int8),
        "mask": torch.tensor([True, False, True]),
        "neg_zero": torch.tensor([-0.0, 0.0]),
    }
    layout = {k: (tuple(v.shape), v.dtype) for k, v in tensors.items()}
    out = tmp_path / "s.safetensors"
    with streamed_safetensors(out, layout, {"k": "v"}) as stream:
        for key in reversed(list(tensors)):
            stream.put(key, tensors[key])
    loaded, meta = _read(out)
    assert meta == {"k": "v"}
    assert_same_bits({k: tensors[k] for k in sorted(tensors)}, loaded)
    with (
        pytest.raises(RuntimeError, match="were not written"),
        streamed_safetensors(tmp_path / "g.safetensors", layout) as s,
    ):
        s.put("f64", tensors["f64"])
    assert not (tmp_path / "g.safetensors").exists() and _leftovers(tmp_path) == []


# --- when to go out of core ---------------------------------------------------------------------------
def test_a_small_budget_switches_with_a_warning_and_the_same_bits() -> None:
    pre, tasks = _models(dtype=torch.float32)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        streamed = merge(pre, tasks, method="ties-mean", q=0.8, memory_budget=1)
        memory = merge(pre, tasks, method="ties-mean", q=0.8, memory_budget=10**15)
    notes = [str(w.message) for w in caught if issubclass(w.category, ResourceWarning)]
    assert len(notes) == 1 and "merging out of core" in notes[0]
    assert_same_bits(memory, streamed)


def test_a_one_pass_merge_streams_whatever_the_budget() -> None:
    """TA or averaging without a trust region or components is one pass either way: streamed by default (the
    same bits, no arenas), in memory only when asked; anything else still follows the budget."""
    from tatr.core.memory_budget import choose_out_of_core
    from tatr.core.merging import open_inputs
    from tatr.core.methods import get_method

    pre, tasks = _models(dtype=torch.float32)
    ts, _, _ = open_inputs(pre, tasks, "ta", "off", None, None, None, None)
    for name in ("ta", "average"):
        assert choose_out_of_core(ts, get_method(name), "off", None, 0.99, None, 10**15) == (True, None)
        assert choose_out_of_core(ts, get_method(name), "off", None, 0.99, False, 1) == (False, None)
    assert choose_out_of_core(ts, get_method("ta"), "zero-shot", None, 0.99, None, 10**15) == (False, None)
    assert choose_out_of_core(ts, get_method("ties-sum"), "off", None, 0.99, None, 10**15) == (False, None)
    assert choose_out_of_core(ts, get_method("ta"), "off", frozenset({"positive"}), 0.99, None, 10**15)[0] is False
    assert_same_bits(merge(pre, tasks, trust_region="off", low_memory=False), merge(pre, tasks, trust_region="off"))


def test_a_one_pass_merge_with_a_finer_out_dtype_stays_in_memory() -> None:
    """The default streamed TA cannot round to an out_dtype finer than θ_0's: chosen, it merges in memory
    (rounded once), as before the one-pass rule; forced out of core, it is refused in one line."""
    pre, tasks = _models(dtype=torch.bfloat16)
    got = merge_once(pre, tasks, trust_region="off", out_dtype=torch.float32)[0]
    expected = merge_once(pre, tasks, trust_region="off", out_dtype=torch.float32, low_memory=False)[0]
    assert got is not None and expected is not None
    assert_same_bits(expected, got)
    with pytest.raises(TatrError, match="cannot be applied out of core"):
        merge_once(pre, tasks, trust_region="off", out_dtype=torch.float32, low_memory=True)


def test_the_estimate_covers_the_arenas_a_plan_allocates() -> None:
    """`in_memory_bytes` may not fall below what the in-memory path holds: Σ τ and Ω of a TA + TR plan."""
    pre, tasks = _models(dtype=torch.float32)
    plan = plan_merge(pre, tasks, trust_region="zero-shot")
    held = plan.tau_sum.nbytes + plan.omega.nbytes
    assert in_memory_bytes(plan.task_set, plan.method, "zero-shot", None, 0.99) >= held


def test_lam_neg_cannot_run_out_of_core() -> None:
    """Forced: one line. Chosen by the budget: it stays in memory, with a note, and merges."""
    pre, tasks = _models(dtype=torch.float32)
    keys = [k for k, v in pre.items() if v.is_floating_point()]
    g = torch.Generator().manual_seed(3)
    grads = [{k: torch.rand(pre[k].shape, generator=g) + 0.1 for k in keys} for _ in tasks]
    signed = [{k: torch.randn(pre[k].shape, generator=g) for k in keys} for _ in tasks]
    kw = {"trust_region": "exemplar", "gradients": grads, "signed_gradients": signed, "q": 0.8, "lam_neg": 0.2}
    kw["components"] = ["orthogonal", "negative"]
    with pytest.raises(TatrError, match=r"lam_neg .* cannot run out of core"):
        merge(pre, tasks, low_memory=True, **kw)
    with pytest.warns(ResourceWarning, match="lam_neg cannot run out of core: merging in memory"):
        got = merge(pre, tasks, memory_budget=1, **kw)
    assert_same_bits(merge(pre, tasks, **kw), got)


def test_components_run_out_of_core() -> None:
    pre, tasks = _models(dtype=torch.float32)
    keys = [k for k, v in pre.items() if v.is_floating_point()]
    g = torch.Generator().manual_seed(4)
    grads = [{k: torch.rand(pre[k].shape, generator=g) + 0.1 for k in keys} for _ in tasks]
    signed = [{k: torch.randn(pre[k].shape, generator=g) for k in keys} for _ in tasks]
    kw = {"trust_region": "exemplar", "gradients": grads, "signed_gradients": signed, "q": 0.7}
    for method in ("ta", "ties-sum"):
        memory, streamed = _both(pre, tasks, method=method, components=["orthogonal", "positive"], **kw)
        assert_same_bits(memory, streamed)


# --- tatr merge ---------------------------------------------------------------------------------------
def test_cli_low_memory_and_budget(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    pre, tasks = _models()
    p, fts = _write(tmp_path, pre, tasks)
    base = ["merge", "-p", str(p), "-f", *map(str, fts), "--q", "0.9", "--method", "ties-sum"]
    outputs = {}
    for name, flags in {
        "memory": ["--in-memory"],
        "low": ["--low-memory"],
        "budget": ["--memory-budget", "1KB"],
    }.items():
        outputs[name] = tmp_path / f"{name}.safetensors"
        assert main([*base, *flags, "-o", str(outputs[name])]) == 0
        stdout, stderr = capsys.readouterr()
        assert "coordinates merged: 192  dropped: 20 (" in stdout  # ⌈0.1 · 192⌉, however it ran
        notes = [line for line in stderr.splitlines() if line.startswith("tatr: ")]
        assert len(notes) == (name == "budget") and all("merging out of core" in n for n in notes)
    reference = _read(outputs["memory"])
    for name in ("low", "budget"):
        tensors, metadata = _read(outputs[name])
        assert_same_bits(tensors, reference[0]) and metadata == reference[1]
    assert main([*base, "--memory-budget", "lots", "-o", str(tmp_path / "x.safetensors")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--memory-budget must be a size" in err[0]
