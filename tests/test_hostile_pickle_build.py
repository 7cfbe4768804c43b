"""A pickle that rewrites what tatr checked (issue 17 §1): the BUILD family.

Python's BUILD opcode writes a state into the object on top of the stack: through `__setstate__`
when it has one, otherwise straight into its `__dict__` (a frozen dataclass included) or, for a
`(None, slots)` state, through `setattr`. A `.pt` can therefore let tatr check a tensor's geometry
in the rebuild call and then rewrite the checked spec (or its storage, or the storage type every
later file shares) before the tensor is made. Every field of every object tatr hands to the pickle
is tried here, through the API and the CLI; each must be refused with one line, nothing made.
"""

from __future__ import annotations

import io
import itertools
import pickle
import pickletools
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from tatr.core import checkpoints, torchfile
from tatr.core.checkpoints import load_state_dict
from tatr.core.errors import TatrError
from tatr.core.torch_unpickler import StorageRef, TensorSpec, _overlaps
from tatr.suites.clip8.convert import load_pickled_module
from tests.test_hostile_files import _pickle, _Storage, _Tensor, cli_error, floats, write_torch_zip


@pytest.fixture(autouse=True)
def _fresh_caches():
    checkpoints._PT_CACHE.clear()
    checkpoints._HEADERS.clear()


class _TensorThenBuild(_Tensor):
    """A dense tensor's REDUCE followed by BUILD(state): what `__reduce__`'s third item emits."""

    def __init__(self, storage: _Storage, offset: int, size: tuple, stride: tuple, state: object) -> None:
        super().__init__(storage, offset, size, stride)
        self.state = state

    def __reduce__(self):
        return (torch._utils._rebuild_tensor_v2, self.args, self.state)


def _ops(state: object) -> bytes:
    """`state` as pickle opcodes to splice into another pickle: no PROTO, no STOP, no memo."""
    buf = io.BytesIO()
    pickler = pickle.Pickler(buf, protocol=2)
    pickler.fast = True  # no PUT: the spliced ops must not overwrite the outer pickle's memo
    pickler.dump(state)
    return buf.getvalue()[2:-1]


def _build_after(data: bytes, op_name: str, arg_contains: str | None, state: object) -> bytes:
    """`data` with BUILD(state) inserted right after the first `op_name` op (whose argument has `arg_contains`)."""
    ops = list(pickletools.genops(data))
    for (op, arg, _pos), (_next, _arg, end) in itertools.pairwise(ops):
        if op.name == op_name and (arg_contains is None or arg_contains in str(arg)):
            return data[:end] + _ops(state) + b"b" + data[end:]
    raise AssertionError(f"no {op_name} in the pickle")


READS = (load_state_dict, checkpoints.header, checkpoints.as_source, load_pickled_module)


def _assert_refused_everywhere(path: Path, tmp_path: Path, capsys, monkeypatch) -> None:
    made = []
    real = torchfile.Loaded.tensor
    monkeypatch.setattr(torchfile.Loaded, "tensor", lambda *a, **k: made.append(a) or real(*a, **k))
    for read in READS:
        checkpoints._PT_CACHE.clear()
        with pytest.raises(TatrError, match="crafted") as exc:
            read(path)
        assert str(path) in str(exc.value) and "\n" not in str(exc.value)
    ok = tmp_path / "ok.safetensors"
    checkpoints.save_state_dict({"w": torch.zeros(8, 8)}, ok)
    for argv in (
        ["convert", path, tmp_path / "out.safetensors"],
        ["merge", "-p", ok, "-f", path, "-f", ok, "-o", tmp_path / "merged.safetensors"],
        ["merge", "-p", path, "-f", ok, "-f", ok, "-o", tmp_path / "merged.safetensors"],
    ):
        checkpoints._PT_CACHE.clear()
        assert "crafted" in cli_error(capsys, *argv)
    assert made == []
    assert not (tmp_path / "out.safetensors").exists() and not (tmp_path / "merged.safetensors").exists()


# --- the spec: every field a rebuild call returns, rewritten by BUILD -------------------------------

SPEC_REWRITES = {
    "stride": {"stride": (0, 0)},
    "size": {"size": (2**20, 2**20)},
    "offset": {"offset": 10**9},
    "dtype": {"dtype": torch.float64},
    "storage": {"storage": None},
    "slots-stride": (None, {"stride": (0, 0)}),
    "slots-size": (None, {"size": (2**40,)}),
    "empty": {},
}


@pytest.mark.parametrize("case", sorted(SPEC_REWRITES))
def test_build_on_a_checked_spec_is_refused(case: str, tmp_path: Path, capsys, monkeypatch):
    """The issue's file: REDUCE(_rebuild_tensor_v2, (storage, 0, (8, 8), (8, 1), …)) then BUILD {"stride": (0, 0)}."""
    spec = _TensorThenBuild(_Storage("0", 64), 0, (8, 8), (8, 1), SPEC_REWRITES[case])
    path = write_torch_zip(tmp_path / f"{case}.pt", {"w": spec}, {"0": floats(*range(64))})
    _assert_refused_everywhere(path, tmp_path, capsys, monkeypatch)


def test_build_on_a_parameter_spec_is_refused(tmp_path: Path, capsys, monkeypatch):
    """`_rebuild_parameter` returns the spec itself: a BUILD after it reaches the same spec."""
    inner = _Tensor(_Storage("0", 64), 0, (8, 8), (8, 1))

    class _Param:
        def __reduce__(self):
            return (torch._utils._rebuild_parameter, (inner, False, {}), {"stride": (0, 0)})

    path = write_torch_zip(tmp_path / "param.pt", {"w": _Param()}, {"0": floats(*range(64))})
    _assert_refused_everywhere(path, tmp_path, capsys, monkeypatch)


# --- the storage reference, the storage type and the allowlisted callables -------------------------

STORAGE_REWRITES = {
    "nbytes": {"nbytes": 2**40},
    "key": {"key": "1"},
    "dtype": {"dtype": torch.float64},
}


@pytest.mark.parametrize("case", sorted(STORAGE_REWRITES))
def test_build_on_a_storage_reference_is_refused(case: str, tmp_path: Path, capsys, monkeypatch):
    """BINPERSID's result (the storage tatr checked against the file) rewritten before the rebuild."""
    obj = {"w": _Tensor(_Storage("0", 64), 0, (8, 8), (8, 1)), "v": _Tensor(_Storage("1", 4), 0, (4,), (1,))}
    blobs = {"0": floats(*range(64)), "1": floats(1, 2, 3, 4)}
    data = _build_after(_pickle(obj), "BINPERSID", None, STORAGE_REWRITES[case])
    path = write_torch_zip(tmp_path / f"{case}.pt", obj, blobs, extra={"data.pkl": data})
    _assert_refused_everywhere(path, tmp_path, capsys, monkeypatch)


def test_build_on_the_shared_storage_type_is_refused_and_poisons_nothing(tmp_path: Path, capsys, monkeypatch):
    """`torch.FloatStorage` resolves to one object every file shares: rewriting its dtype would
    change how the NEXT file (a clean one) is read. Refused, and the clean file reads right after."""
    obj = {"w": _Tensor(_Storage("0", 4), 0, (4,), (1,))}
    data = _build_after(_pickle(obj), "GLOBAL", "FloatStorage", {"dtype": torch.float64})
    path = write_torch_zip(tmp_path / "poison.pt", obj, {"0": floats(1, 2, 3, 4)}, extra={"data.pkl": data})
    with pytest.raises(TatrError, match="crafted"):
        load_state_dict(path)
    clean = write_torch_zip(tmp_path / "clean.pt", obj, {"0": floats(1, 2, 3, 4)})
    checkpoints._PT_CACHE.clear()
    got = load_state_dict(clean)["w"]
    assert got.dtype == torch.float32 and got.tolist() == [1, 2, 3, 4]
    _assert_refused_everywhere(path, tmp_path, capsys, monkeypatch)


@pytest.mark.parametrize("name", ["_rebuild_tensor_v2", "_rebuild_parameter"])
def test_build_on_an_allowlisted_callable_is_refused(name: str, tmp_path: Path, capsys, monkeypatch):
    """A bare function's `__dict__` takes a BUILD: the allowlist's callables are sealed too."""
    inner = _Tensor(_Storage("0", 4), 0, (4,), (1,))

    class _Param:
        def __reduce__(self):
            return (torch._utils._rebuild_parameter, (inner, False, {}))

    data = _build_after(_pickle({"w": _Param()}), "GLOBAL", name, {"__wrapped__": "x"})
    path = write_torch_zip(tmp_path / "fn.pt", {"w": _Param()}, {"0": floats(1, 2, 3, 4)}, extra={"data.pkl": data})
    _assert_refused_everywhere(path, tmp_path, capsys, monkeypatch)
    assert not hasattr(torch._utils._rebuild_tensor_v2, "__wrapped__")


def test_build_on_a_refusal_cannot_hide_it(tmp_path: Path, capsys, monkeypatch):
    """A crafted stride-0 tensor whose Refused record is then rewritten to look harmless."""
    crafted = _TensorThenBuild(_Storage("0", 1), 0, (2**40,), (0,), {"crafted": False, "reason": ""})
    path = write_torch_zip(tmp_path / "hide.pt", {"w": crafted}, {"0": floats(1)})
    _assert_refused_everywhere(path, tmp_path, capsys, monkeypatch)


# --- the second line: the geometry is checked again where the tensor is made ----------------------


@pytest.mark.parametrize(
    "field, value",
    [("stride", (0, 0)), ("size", (2**20, 2**20)), ("offset", 10**9), ("dtype", torch.float64), ("size", [8, 8])],
)
def test_a_spec_changed_after_the_check_is_refused_where_the_tensor_is_made(field, value, tmp_path: Path):
    """Whatever route might still change a spec, `Loaded.tensor` checks it again before `set_`."""
    path = write_torch_zip(tmp_path / "t.pt", {"w": _Tensor(_Storage("0", 64), 0, (8, 8), (8, 1))}, {"0": b"\0" * 256})
    loaded = torchfile.read(path, strict=True)
    spec = loaded.obj["w"]
    assert isinstance(spec, TensorSpec) and loaded.tensor(spec).shape == (8, 8)
    object.__setattr__(spec, field, value)  # what BUILD did before specs were sealed
    with pytest.raises(TatrError, match="crafted or damaged tensor"):
        loaded.tensor(spec)


def test_a_storage_changed_after_the_check_is_refused_where_the_tensor_is_made(tmp_path: Path):
    path = write_torch_zip(
        tmp_path / "t.pt", {"w": _Tensor(_Storage("0", 4), 0, (4,), (1,))}, {"0": floats(1, 2, 3, 4)}
    )
    loaded = torchfile.read(path, strict=True)
    spec = loaded.obj["w"]
    object.__setattr__(spec, "storage", StorageRef("0", torch.float32, 2**40))
    with pytest.raises(TatrError, match="differs from the one that was checked"):
        loaded.tensor(spec)


# --- what torch itself writes still loads ---------------------------------------------------------


def test_torch_save_of_a_module_state_dict_still_loads(tmp_path: Path):
    """`state_dict()` carries `_metadata`, set by a BUILD on the OrderedDict: that BUILD stays allowed."""
    model = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4))
    path = tmp_path / "sd.pt"
    torch.save(model.state_dict(), path)
    got = load_state_dict(path)
    assert got.keys() == model.state_dict().keys()
    for key, value in model.state_dict().items():
        assert torch.equal(got[key], value), key


# --- views inside their storage that reach one element twice --------------------------------------


def test_the_issue_s_stride0_view_is_refused_without_any_build(tmp_path: Path, capsys, monkeypatch):
    """(8, 8) with stride (0, 0) fits a 64-element storage, but all 64 indices reach one element."""
    path = write_torch_zip(tmp_path / "s0.pt", {"w": _Tensor(_Storage("0", 64), 0, (8, 8), (0, 0))}, {"0": b"\0" * 256})
    _assert_refused_everywhere(path, tmp_path, capsys, monkeypatch)


def test_views_torch_writes_for_real_state_dicts_still_load(tmp_path: Path):
    """Transposes, strided slices and Hugging Face's `position_ids = arange(n).expand((1, -1))`."""
    base = torch.arange(24, dtype=torch.float32).view(4, 6)
    tensors = {"t": base.t(), "slice": base[:, ::2], "position_ids": torch.arange(6.0).expand((1, -1))}
    torch.save(tensors, tmp_path / "views.pt")
    got = load_state_dict(tmp_path / "views.pt")
    for key, value in tensors.items():
        assert torch.equal(got[key], value), key


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 4), st.integers(0, 7)), min_size=1, max_size=4))
def test_a_view_let_through_reaches_each_element_once(dims):
    """Soundness of the overlap test against brute force: a view it passes has distinct offsets."""
    size, stride = tuple(n for n, _ in dims), tuple(s for _, s in dims)
    offsets = [sum(i * s for i, s in zip(index, stride, strict=True)) for index in itertools.product(*map(range, size))]
    if not _overlaps(size, stride):
        assert len(set(offsets)) == len(offsets)
    if len(set(offsets)) < len(offsets):
        assert _overlaps(size, stride)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(1, 5), min_size=1, max_size=4), st.randoms(use_true_random=False))
def test_every_permuted_or_sliced_dense_layout_passes(shape, rng):
    """What torch's own ops make from a dense tensor (permute, step slices) is never refused."""
    x = torch.empty(shape).permute(*rng.sample(range(len(shape)), len(shape)))
    x = x[tuple(slice(None, None, rng.randint(1, 2)) for _ in shape)]
    assert not _overlaps(tuple(x.shape), x.stride())
