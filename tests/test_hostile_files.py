"""Hostile, damaged and odd checkpoint files (issue 9 §1 and §3's file items).

Every case goes through the Python API and the CLI. A refusal is one line on stderr (exit 2)
naming the file and, where there is one, the key. No code from a file runs without
`--trust-pickle` (TorchScript never), nothing is allocated for a tensor before its geometry is
checked, and `--trust-pickle` is suggested only for a well-formed pickle that stores its tensors
through its own reduce functions.

The crafted files are written by hand in torch's own formats; `test_hand_written_files_are_torch_files`
shows torch reads the well-formed ones, so the crafted ones are what an attacker would send.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import resource
import struct
import tarfile
import warnings
import zipfile
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
from torch import nn

import tatr.suites.clip8.convert
from tatr.cli import main
from tatr.core import checkpoints, torchfile
from tatr.core.checkpoints import as_source, header, load_state_dict, read_tensor, save_state_dict
from tatr.core.errors import PickleNeedsTrust, TatrError, UnreadableCheckpoint
from tatr.suites.clip8.convert import convert, load_any, load_pickled_module
from tatr.suites.clip8.hf_folder import read_hf_dir

# --- torch's file formats, written by hand ------------------------------------------------------


class _Storage:
    """Pickled as torch's persistent id ("storage", type, key, location, numel)."""

    def __init__(self, key: str, numel: int, storage_type: type = torch.FloatStorage) -> None:
        self.key, self.numel, self.storage_type = key, numel, storage_type


class _Tensor:
    """Pickled exactly as `torch.Tensor.__reduce_ex__` pickles a dense tensor, with any geometry."""

    def __init__(self, storage: _Storage, offset: int, size: tuple, stride: tuple) -> None:
        self.args = (storage, offset, size, stride, False, OrderedDict())

    def __reduce__(self):
        return (torch._utils._rebuild_tensor_v2, self.args)


class _Pickler(pickle.Pickler):
    def persistent_id(self, obj):
        if isinstance(obj, _Storage):
            return ("storage", obj.storage_type, obj.key, "cpu", obj.numel)
        return None


def _pickle(obj) -> bytes:
    buf = io.BytesIO()
    _Pickler(buf, protocol=2).dump(obj)
    return buf.getvalue()


def write_torch_zip(path: Path, obj, blobs: dict[str, bytes], extra: dict[str, bytes] | None = None) -> Path:
    """The layout `torch.save` writes: `<archive>/data.pkl`, `<archive>/data/<key>`, byteorder, version."""
    records = {"data.pkl": _pickle(obj), "byteorder": b"little", **{f"data/{k}": v for k, v in blobs.items()}}
    records.update(extra or {})
    records["version"] = b"3\n"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zf:
        for name, data in records.items():
            zf.writestr(f"archive/{name}", data)
    return path


def floats(*values: float) -> bytes:
    return struct.pack(f"<{len(values)}f", *values)


def write_safetensors(path: Path, header_: dict, data: bytes, size: int | None = None) -> Path:
    """A safetensors file from a raw header (dtype names and offsets as given), optionally sparse-extended."""
    raw = json.dumps(header_).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as fh:
        fh.write(struct.pack("<Q", len(raw)) + raw + data)
        if size is not None:
            fh.truncate(8 + len(raw) + size)
    return path


def cli_error(capsys, *argv: str) -> str:
    """Run the CLI; it must fail with exit 2 and exactly one `tatr: error:` line, no traceback."""
    capsys.readouterr()
    assert main([str(a) for a in argv]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("tatr: error: "), err
    return lines[0]


@pytest.fixture
def no_torch_load(monkeypatch):
    """Fail loudly if anything hands a file to `torch.load` or `torch.jit.load`."""
    calls: list[str] = []
    monkeypatch.setattr(torch, "load", lambda *a, **k: calls.append("torch.load"))
    monkeypatch.setattr(torch.jit, "load", lambda *a, **k: calls.append("torch.jit.load"))
    return calls


@pytest.fixture(autouse=True)
def _fresh_caches():
    checkpoints._PT_CACHE.clear()
    checkpoints._HEADERS.clear()


# --- the hand-written files are real torch files ------------------------------------------------


def test_hand_written_files_are_torch_files(tmp_path: Path):
    path = write_torch_zip(
        tmp_path / "ok.pt",
        {"w": _Tensor(_Storage("0", 6), 0, (2, 3), (3, 1)), "col": _Tensor(_Storage("0", 6), 1, (2,), (3,))},
        {"0": floats(0, 1, 2, 3, 4, 5)},
    )
    theirs = torch.load(path, weights_only=True)
    ours = load_state_dict(path)
    assert ours.keys() == theirs.keys()
    for key in theirs:
        assert torch.equal(ours[key], theirs[key]) and ours[key].stride() == theirs[key].stride(), key
    assert ours["col"].untyped_storage().data_ptr() == ours["w"].untyped_storage().data_ptr()  # tied, as torch


# --- crafted tensors: refused before anything is allocated -------------------------------------

CRAFTED = {
    # name: (storage elements, offset, size, stride, words of the message)
    "stride0-tib": (1, 0, (2**40,), (0,), "stride-0 or overlapping"),
    "overlap": (4, 0, (1000, 1000), (1, 1), "stride-0 or overlapping"),
    "negative-stride": (4, 3, (4,), (-1,), "negative"),
    "negative-size": (4, 0, (-4,), (1,), "negative"),
    "offset-past-storage": (4, 9, (1,), (1,), "reaches byte"),
    "empty-offset-past-storage": (4, 9, (0,), (1,), "reaches byte"),
    "reaches-past-storage": (4, 2, (3,), (1,), "reaches byte"),
    "count-overflows": (4, 0, (2**32, 2**32), (0, 0), "stride-0 or overlapping"),
    "size-over-int64": (4, 0, (2**63,), (0,), "overflow 64 bits"),
    "stride-over-int64": (4, 0, (1,), (2**64,), "overflow 64 bits"),
    "size-stride-disagree": (4, 0, (2, 2), (1,), "disagree"),
}


@pytest.mark.parametrize("case", sorted(CRAFTED))
def test_crafted_tensor_refused_before_allocation(case: str, tmp_path: Path, monkeypatch, capsys, no_torch_load):
    numel, offset, size, stride, words = CRAFTED[case]
    path = write_torch_zip(
        tmp_path / f"{case}.pt",
        {"visual.w": _Tensor(_Storage("0", numel), offset, size, stride)},
        {"0": floats(*range(numel))},
    )
    made = []
    monkeypatch.setattr(torchfile.Loaded, "tensor", lambda *a, **k: made.append(a))  # the only allocation
    for read in (load_state_dict, header, as_source, load_pickled_module, lambda p: load_pickled_module(p, True)):
        with pytest.raises(TatrError, match="crafted or damaged tensor") as exc:
            read(path)
        assert words in str(exc.value) and str(path) in str(exc.value)
    for flags in ([], ["--from", "task-vectors"], ["--trust-pickle"]):
        line = cli_error(capsys, "convert", path, tmp_path / "out.safetensors", *flags)
        assert "crafted or damaged tensor" in line and words in line and "--trust-pickle" not in line
    assert made == [] and no_torch_load == []
    assert not (tmp_path / "out.safetensors").exists()


def test_torch_itself_would_build_the_stride0_tensor(tmp_path: Path):
    """Why the check is needed: torch accepts the TiB view, which any copy would then allocate."""
    path = write_torch_zip(tmp_path / "t.pt", {"w": _Tensor(_Storage("0", 1), 0, (2**40,), (0,))}, {"0": floats(1)})
    assert torch.load(path, weights_only=True)["w"].numel() == 2**40


def test_crafted_tensor_refused_where_tatr_would_not_use_it(tmp_path: Path):
    """A crafted tensor anywhere (here under a key a state dict ignores) refuses the whole file."""
    obj = {"state_dict": {"visual.w": _Tensor(_Storage("0", 2), 0, (2,), (1,))}}
    obj["optimizer"] = [_Tensor(_Storage("1", 1), 0, (2**40,), (0,))]
    path = write_torch_zip(tmp_path / "t.pt", obj, {"0": floats(1, 2), "1": floats(1)})
    with pytest.raises(TatrError, match="crafted or damaged tensor"):
        load_state_dict(path)


@pytest.mark.parametrize("claimed", [3, 1000, 2**61])
def test_storage_claiming_more_than_the_file_holds(claimed: int, tmp_path: Path, capsys, no_torch_load):
    path = write_torch_zip(
        tmp_path / "t.pt", {"w": _Tensor(_Storage("0", claimed), 0, (2,), (1,))}, {"0": floats(1, 2)}
    )
    for read in (load_state_dict, load_pickled_module):
        with pytest.raises(UnreadableCheckpoint, match=f"claims {claimed * 4:,} bytes but the file holds 8"):
            read(path)
    assert "cannot read this file" in cli_error(capsys, "convert", path, tmp_path / "o.safetensors", "--trust-pickle")
    assert no_torch_load == []


# --- TorchScript and other routes torch.load would take -----------------------------------------


@pytest.fixture
def torchscript(tmp_path: Path) -> Path:
    class AddOne(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = nn.Parameter(torch.ones(2))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x + self.w

    path = tmp_path / "scripted.pt"
    with warnings.catch_warnings():  # scripting is deprecated, but archives are still out there
        warnings.simplefilter("ignore")
        torch.jit.save(torch.jit.script(AddOne()), str(path))
    return path


def test_torch_load_runs_torchscript_even_with_a_restricted_pickle_module(torchscript: Path, monkeypatch):
    """The hole: the archive never reaches the pickle module, it goes to torch.jit.load."""
    calls = []
    monkeypatch.setattr(torch.jit, "load", lambda *a, **k: calls.append(a) or "ran")
    with pytest.warns(UserWarning, match="TorchScript"):
        assert torch.load(torchscript, weights_only=False, pickle_module=pickle) == "ran"
    assert len(calls) == 1


def test_torchscript_refused_everywhere(torchscript: Path, tmp_path: Path, capsys, no_torch_load):
    ok = tmp_path / "ok.safetensors"
    save_state_dict({"w": torch.ones(2)}, ok)
    for read in (
        load_state_dict,
        as_source,
        load_pickled_module,
        lambda p: load_pickled_module(p, trust_pickle=True),
        lambda p: load_any(p, fmt="task-vectors"),
        lambda p: load_any(p, allow_pickle=False),
    ):
        with pytest.raises(TatrError, match="TorchScript archive; tatr never loads TorchScript"):
            read(torchscript)
    out = tmp_path / "o.safetensors"
    for flags in ([], ["--from", "task-vectors"], ["--trust-pickle"], ["--from", "task-vectors", "--trust-pickle"]):
        assert "TorchScript" in cli_error(capsys, "convert", torchscript, out, *flags)
    ok2 = tmp_path / "ok2.safetensors"
    save_state_dict({"w": torch.zeros(2)}, ok2)
    assert "TorchScript" in cli_error(capsys, "merge", "-p", torchscript, "-f", ok, "-f", ok2, "-o", out)
    assert "TorchScript" in cli_error(capsys, "merge", "-p", ok, "-f", ok2, "-f", torchscript, "-o", out)
    assert no_torch_load == [] and not out.exists()


def test_torchscript_recognised_by_any_of_its_entries(tmp_path: Path, no_torch_load):
    good = {"w": _Tensor(_Storage("0", 1), 0, (1,), (1,))}
    for extra in ({"constants.pkl": pickle.dumps(())}, {"code/__torch__/m.py": b"def f(): pass"}):
        path = write_torch_zip(tmp_path / "t.pt", good, {"0": floats(1)}, extra)
        with pytest.raises(TatrError, match="TorchScript"):
            load_pickled_module(path, trust_pickle=True)
    assert no_torch_load == []


def test_legacy_tar_refused(tmp_path: Path, capsys, no_torch_load):
    path = tmp_path / "old.pt"
    with tarfile.open(path, "w") as tar:
        for name in ("sys_info", "pickle", "storages", "tensors"):
            info = tarfile.TarInfo(name)
            payload = pickle.dumps(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    for read in (load_state_dict, lambda p: load_pickled_module(p, trust_pickle=True)):
        with pytest.raises(UnreadableCheckpoint, match="legacy tar-format"):
            read(path)
    assert "legacy tar-format" in cli_error(capsys, "convert", path, tmp_path / "o.safetensors", "--trust-pickle")
    assert no_torch_load == []


def test_legacy_stream_format_is_read_and_checked(tmp_path: Path):
    """torch.save(_use_new_zipfile_serialization=False): read by the same checked reader."""
    base = torch.arange(6, dtype=torch.float64).reshape(2, 3)
    sd = {"a": base, "row": base[1], "i": torch.tensor([7, 8], dtype=torch.int32)}
    path = tmp_path / "legacy.pt"
    torch.save(sd, path, _use_new_zipfile_serialization=False)
    ours = load_state_dict(path)
    for key, value in sd.items():
        assert torch.equal(ours[key], value) and ours[key].dtype == value.dtype, key
    assert torch.equal(read_tensor(path, "row"), base[1])
    data = path.read_bytes()
    for cut in (len(data) - 3, len(data) // 2, 20):
        (tmp_path / "cut.pt").write_bytes(data[:cut])
        with pytest.raises(UnreadableCheckpoint, match="cannot read this file"):
            load_state_dict(tmp_path / "cut.pt")


# --- unreadable files: "cannot read", never "--trust-pickle" -------------------------------------


def _torch_bytes(tmp_path: Path) -> bytes:
    torch.save({"visual.w": torch.arange(64.0)}, tmp_path / "src.pt")
    return (tmp_path / "src.pt").read_bytes()


UNREADABLE_PT = {
    "empty": lambda tp: b"",
    "garbage": lambda tp: bytes(range(256)) * 4,
    "text": lambda tp: b"hello, I am not a checkpoint\n",
    "pickle-garbage": lambda tp: b"\x80\x02" + bytes(range(3, 200)),
    "plain-pickle": lambda tp: pickle.dumps({"visual.w": [1.0, 2.0]}),
    "truncated-zip": lambda tp: _torch_bytes(tp)[: len(_torch_bytes(tp)) // 2],
    "zip-tail-cut": lambda tp: _torch_bytes(tp)[:-40],
    "zip-header-only": lambda tp: _torch_bytes(tp)[:10],
}


@pytest.mark.parametrize("case", sorted(UNREADABLE_PT))
def test_unreadable_torch_file(case: str, tmp_path: Path, capsys, no_torch_load):
    path = tmp_path / f"{case}.pt"
    path.write_bytes(UNREADABLE_PT[case](tmp_path))
    for read in (load_state_dict, load_pickled_module, lambda p: load_pickled_module(p, trust_pickle=True)):
        with pytest.raises(UnreadableCheckpoint) as exc:
            read(path)
        assert "cannot read this file" in str(exc.value) and "--trust-pickle" not in str(exc.value)
        assert not isinstance(exc.value, PickleNeedsTrust)
    for flags in ([], ["--from", "task-vectors"], ["--trust-pickle"]):
        line = cli_error(capsys, "convert", path, tmp_path / "o.safetensors", *flags)
        assert "cannot read this file" in line and "--trust-pickle" not in line
    assert no_torch_load == []


def test_zip_without_torch_layout_is_unreadable(tmp_path: Path):
    cases = {
        "no-data-pkl": {"archive/version": b"3"},
        "two-prefixes": {"a/data.pkl": pickle.dumps({}), "b/data.pkl": pickle.dumps({})},
        "garbage-data-pkl": {"archive/data.pkl": b"\x80\x02garbage"},
    }
    for name, records in cases.items():
        path = tmp_path / f"{name}.pt"
        with zipfile.ZipFile(path, "w") as zf:
            for record, data in records.items():
                zf.writestr(record, data)
        with pytest.raises(UnreadableCheckpoint, match="cannot read this file"):
            load_pickled_module(path)
    path = tmp_path / "deflated.pt"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("archive/data.pkl", _pickle({}))
    with pytest.raises(UnreadableCheckpoint, match="compressed"):
        load_state_dict(path)


def test_trust_is_suggested_only_for_tensors_behind_the_files_own_reduce(tmp_path: Path, capsys):
    """A well-formed module pickle whose parameter is rebuilt by the file's own function."""
    import sys
    import types

    module = types.ModuleType("evil_tensors")

    def rebuild(values):  # the file's own code: what --trust-pickle would run
        return torch.tensor(values)

    class Weight:
        def __reduce__(self):
            return (rebuild, ([1.0, 2.0],))

    for obj in (rebuild, Weight):
        obj.__module__, obj.__qualname__ = "evil_tensors", obj.__name__
    module.rebuild, module.Weight = rebuild, Weight
    sys.modules["evil_tensors"] = module
    try:
        layer = nn.Linear(2, 1)
        layer._parameters["weight"] = Weight()
        torch.save(layer, tmp_path / "m.pt")
    finally:
        del sys.modules["evil_tensors"]
    with pytest.raises(PickleNeedsTrust, match="rerun with --trust-pickle"):
        load_pickled_module(tmp_path / "m.pt")
    assert "--trust-pickle" in cli_error(capsys, "convert", tmp_path / "m.pt", tmp_path / "o.safetensors")


# --- odd but valid, or wrong in a way that deserves one line ------------------------------------


def test_tied_weights_load_as_views_and_save_untied(tmp_path: Path, capsys):
    w = torch.randn(4, 3)
    torch.save({"visual.w": w, "visual.tied": w, "visual.row": w[1]}, tmp_path / "tied.pt")
    sd = load_state_dict(tmp_path / "tied.pt")
    assert sd["visual.w"].untyped_storage().data_ptr() == sd["visual.tied"].untyped_storage().data_ptr()
    save_state_dict(sd, tmp_path / "tied.safetensors")  # safetensors refuses shared storages: untied first
    back = load_state_dict(tmp_path / "tied.safetensors")
    assert all(torch.equal(back[k], sd[k]) for k in sd)
    back["visual.w"].add_(1)  # written in place: nothing else changes, not even the file
    assert torch.equal(back["visual.tied"], w) and torch.equal(
        load_state_dict(tmp_path / "tied.safetensors")["visual.w"], w
    )
    one = read_tensor(tmp_path / "tied.pt", "visual.w")
    one.add_(1)  # a per-key read shares nothing with the next read
    assert torch.equal(read_tensor(tmp_path / "tied.pt", "visual.tied"), w)
    assert main(["convert", str(tmp_path / "tied.pt"), str(tmp_path / "out.safetensors")]) == 0
    assert torch.equal(load_state_dict(tmp_path / "out.safetensors")["visual.tied"], w)


BAD_VALUES = {
    "int-key": ({0: torch.ones(2)}, "key 0 is an int, not a string"),
    "nested": ({"visual.a": {"b": torch.ones(2)}}, "key 'visual.a': holds a dict, not a tensor"),
    "list": ({"visual.a": [torch.ones(2)]}, "key 'visual.a': holds a list, not a tensor"),
    "number": ({"visual.a": 3}, "key 'visual.a': holds an int, not a tensor"),
    "none": ({"visual.a": None}, "key 'visual.a': holds None, not a tensor"),
    "sparse": ({"visual.a": torch.eye(3).to_sparse()}, "key 'visual.a': a sparse tensor"),
    "not-a-mapping": ([torch.ones(2)], "expected a state dict"),
}


@pytest.mark.parametrize("case", sorted(BAD_VALUES))
def test_values_that_are_not_tensors(case: str, tmp_path: Path, capsys):
    obj, message = BAD_VALUES[case]
    path = tmp_path / f"{case}.pt"
    torch.save(obj, path)
    for read in (load_state_dict, load_pickled_module):
        with pytest.raises(TatrError, match="^" + str(path).replace(".", r"\.") + ": ") as exc:
            read(path)
        assert message in str(exc.value)
    assert message in cli_error(capsys, "convert", path, tmp_path / "o.safetensors")


UNSUPPORTED_TORCH = [torch.uint16, torch.uint32, torch.uint64, torch.float8_e4m3fn, torch.float8_e5m2, torch.complex64]


@pytest.mark.parametrize("dtype", UNSUPPORTED_TORCH, ids=str)
def test_unsupported_dtype_in_torch_file(dtype: torch.dtype, tmp_path: Path, capsys):
    path = tmp_path / "d.pt"
    torch.save({"visual.ok": torch.ones(2), "visual.odd": torch.zeros(2, dtype=dtype)}, path)
    name = str(dtype).removeprefix("torch.")
    for read in (load_state_dict, header, load_pickled_module):
        with pytest.raises(TatrError, match=f"{path}: key 'visual.odd': dtype {name} is not supported"):
            read(path)
    assert f"key 'visual.odd': dtype {name} is not supported" in cli_error(
        capsys, "convert", path, tmp_path / "o.safetensors"
    )


ELEMENTS_IN_8_BYTES = {"F8_E4M3": 8, "F8_E5M2": 8, "U16": 4, "U32": 2, "U64": 1, "C64": 1, "F4": 16}


@pytest.mark.parametrize("name", sorted(ELEMENTS_IN_8_BYTES))
def test_unsupported_dtype_in_safetensors_refused_at_the_header(name: str, tmp_path: Path, monkeypatch, capsys):
    path = write_safetensors(
        tmp_path / "d.safetensors",
        {
            "visual.ok": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
            "visual.odd": {"dtype": name, "shape": [ELEMENTS_IN_8_BYTES[name]], "data_offsets": [8, 16]},
        },
        bytes(16),
    )
    monkeypatch.setattr(checkpoints, "_read_entry", lambda *a: pytest.fail("tensor data read before the header check"))
    for read in (header, load_state_dict, as_source, lambda p: read_tensor(p, "visual.ok")):
        with pytest.raises(TatrError, match=f"{path}: key 'visual.odd': dtype {name} is not supported"):
            read(path)
    assert f"dtype {name} is not supported" in cli_error(capsys, "convert", path, tmp_path / "o.safetensors")


SAFETENSORS_DAMAGE = {
    "empty": lambda: b"",
    "garbage": lambda: bytes(range(256)),
    "header-length-huge": lambda: struct.pack("<Q", 2**40) + b"{}",
    "header-not-json": lambda: struct.pack("<Q", 8) + b"not json",
    "offsets-past-end": lambda: _st_bytes(
        {"visual.w": {"dtype": "F32", "shape": [1000], "data_offsets": [0, 4000]}}, 8
    ),
    "shape-disagrees": lambda: _st_bytes({"visual.w": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, 8),
}


def _st_bytes(header_: dict, n: int) -> bytes:
    raw = json.dumps(header_).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw + bytes(n)


@pytest.mark.parametrize("case", sorted(SAFETENSORS_DAMAGE))
def test_damaged_safetensors(case: str, tmp_path: Path, capsys):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(SAFETENSORS_DAMAGE[case]())
    for read in (header, load_state_dict, as_source, lambda p: read_tensor(p, "visual.w")):
        with pytest.raises(UnreadableCheckpoint, match=f"^{path}: cannot read this file"):
            read(path)
    assert "cannot read this file" in cli_error(capsys, "convert", path, tmp_path / "o.safetensors")


def test_safetensors_larger_than_memory_is_read_per_key(tmp_path: Path, capsys):
    memory = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    big = 2 * memory // 4  # float32 elements: twice the machine's memory, in a sparse file
    path = write_safetensors(
        tmp_path / "huge.safetensors",
        {
            "visual.small": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
            "visual.big": {"dtype": "F32", "shape": [big], "data_offsets": [16, 16 + 4 * big]},
        },
        floats(1, 2, 3, 4),
        size=16 + 4 * big,
    )
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    assert header(path) == {"visual.small": ((4,), torch.float32), "visual.big": ((big,), torch.float32)}
    assert as_source(path) == path
    assert torch.equal(read_tensor(path, "visual.small"), torch.tensor([1.0, 2, 3, 4]))
    assert (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024 < 200 * 2**20
    with pytest.raises(TatrError, match=r"key 'visual\.big' holds .* GiB, more than the .* GiB of memory here"):
        read_tensor(path, "visual.big")
    assert "more than the" in cli_error(capsys, "convert", path, tmp_path / "o.safetensors")


# --- Hugging Face folders: what the folder says is data --------------------------------------------


def _hf_folder(root: Path, config: object = None, name: str = "hf") -> Path:
    folder = root / name
    folder.mkdir(parents=True)
    text = json.dumps({"model_type": "clip_vision_model"} if config is None else config)
    (folder / "config.json").write_text(text if not isinstance(config, bytes) else config.decode())
    return folder


def _index(folder: Path, weight_map: object) -> None:
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def test_hf_shards_never_leave_the_folder(tmp_path: Path, capsys):
    secret = tmp_path / "secret.safetensors"
    save_state_dict({"a": torch.full((2,), 7.0)}, secret)
    (tmp_path / "secrets").mkdir()
    save_state_dict({"a": torch.full((2,), 7.0)}, tmp_path / "secrets" / "s.safetensors")
    folder = _hf_folder(tmp_path)
    (folder / "link.safetensors").symlink_to(secret)
    (folder / "dirlink").symlink_to(tmp_path / "secrets")
    for shard in (
        "../secret.safetensors",
        str(secret),
        "link.safetensors",
        "dirlink/s.safetensors",
        "sub/../../secret.safetensors",
        "",
    ):
        _index(folder, {"a": shard})
        with pytest.raises(TatrError, match="refusing to read it"):
            read_hf_dir(folder)
        assert "refusing to read it" in cli_error(capsys, "convert", folder, tmp_path / "o.safetensors")
    (folder / "model.safetensors").symlink_to(secret)  # the fixed names obey the same rule
    with pytest.raises(TatrError, match=r"outside .*; refusing to read it"):
        read_hf_dir(folder)


def test_hf_shards_inside_the_folder_and_the_hub_cache_layout_are_read(tmp_path: Path):
    folder = _hf_folder(tmp_path)
    (folder / "shards").mkdir()
    save_state_dict({"a": torch.ones(2)}, folder / "shards" / "one.safetensors")
    (folder / "two.safetensors").symlink_to(folder / "shards" / "one.safetensors")  # inside: fine
    save_state_dict({"b": torch.zeros(3)}, folder / "three.safetensors")
    _index(folder, {"a": "two.safetensors", "b": "three.safetensors"})
    sd = read_hf_dir(folder)
    assert torch.equal(sd["a"], torch.ones(2)) and torch.equal(sd["b"], torch.zeros(3))
    # the Hugging Face cache: snapshots/<rev>/ holds symlinks into the repository's blobs/
    repo = tmp_path / "hub" / "models--org--clip"
    (repo / "blobs").mkdir(parents=True)
    save_state_dict({"a": torch.ones(2)}, repo / "blobs" / "abc123.safetensors")
    (repo / "blobs" / "abc123.safetensors").rename(repo / "blobs" / "abc123")
    (repo / "blobs" / "cfg456").write_text(json.dumps({"model_type": "clip"}))
    snapshot = repo / "snapshots" / "rev1"
    snapshot.mkdir(parents=True)
    (snapshot / "model.safetensors").symlink_to("../../blobs/abc123")
    (snapshot / "config.json").symlink_to("../../blobs/cfg456")
    assert torch.equal(read_hf_dir(snapshot)["a"], torch.ones(2))
    (snapshot / "model.safetensors").unlink()
    (snapshot / "model.safetensors").symlink_to(secret := tmp_path / "elsewhere.safetensors")
    save_state_dict({"a": torch.ones(2)}, secret)
    with pytest.raises(TatrError, match="refusing to read it"):
        read_hf_dir(snapshot)


BAD_HF = {
    "config-not-json": ({"config.json": b"{model_type: clip"}, "config.json: not valid JSON"),
    "config-not-object": ({"config.json": b'["clip"]'}, "config.json: expected a JSON object, found list"),
    "model-type-number": ({"config.json": b'{"model_type": 5}'}, "model_type is 5, not a string"),
    "model-type-missing": ({"config.json": b"{}"}, "model_type is None, not a string"),
    "not-clip": ({"config.json": b'{"model_type": "bert"}'}, "model_type 'bert' is not a CLIP vision model"),
    "config-binary": ({"config.json": b"\xff\xfe\x00"}, "config.json: not valid JSON"),
    "config-deep": ({"config.json": b"[" * 100_000}, "config.json: not valid JSON"),
    "index-not-json": ({"model.safetensors.index.json": b"{"}, "index.json: not valid JSON"),
    "index-list": ({"model.safetensors.index.json": b"[]"}, "expected a JSON object, found list"),
    "weight-map-missing": ({"model.safetensors.index.json": b"{}"}, "'weight_map' must be a non-empty object"),
    "weight-map-list": ({"model.safetensors.index.json": b'{"weight_map": ["a"]}'}, "'weight_map' must be"),
    "shard-not-string": ({"model.safetensors.index.json": b'{"weight_map": {"a": 1}}'}, "weight_map['a'] is 1"),
    "shard-not-safetensors": (
        {"model.safetensors.index.json": b'{"weight_map": {"a": "x.bin"}}', "x.bin": b"0"},
        "shard 'x.bin' is not a .safetensors file",
    ),
    "shard-missing": ({"model.safetensors.index.json": b'{"weight_map": {"a": "x.safetensors"}}'}, "no such file"),
    "key-not-in-shard": (
        {"model.safetensors.index.json": b'{"weight_map": {"zz": "s.safetensors"}}'},
        "key 'zz' is not in its shard 's.safetensors'",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_HF))
def test_bad_hf_folder_gets_one_line(case: str, tmp_path: Path, capsys):
    files, message = BAD_HF[case]
    folder = _hf_folder(tmp_path)
    save_state_dict({"a": torch.ones(2)}, folder / "s.safetensors")
    for name, data in files.items():
        (folder / name).write_bytes(data)
    with pytest.raises(TatrError) as exc:
        read_hf_dir(folder)
    assert message in str(exc.value)
    assert message in cli_error(capsys, "convert", folder, tmp_path / "o.safetensors")
    assert not (tmp_path / "o.safetensors").exists()


def test_hf_config_that_is_a_folder(tmp_path: Path, capsys):
    folder = tmp_path / "hf"
    (folder / "config.json").mkdir(parents=True)
    assert "config.json: not a file" in cli_error(capsys, "convert", folder, tmp_path / "o.safetensors")


# --- tatr convert's output: never an input, checked before reading ----------------------------------


def test_convert_refuses_its_input_as_output(tmp_path: Path, monkeypatch, capsys):
    src = tmp_path / "a.safetensors"
    save_state_dict({"visual.w": torch.ones(3)}, src)
    before = src.read_bytes()
    (tmp_path / "link.safetensors").symlink_to(src)
    os.link(src, tmp_path / "hard.safetensors")
    monkeypatch.chdir(tmp_path)
    reads = []
    monkeypatch.setattr(tatr.suites.clip8.convert, "load_any", lambda *a, **k: reads.append(a))
    for out in (
        "a.safetensors",
        "./a.safetensors",
        str(src),
        "link.safetensors",
        "hard.safetensors",
        "./x/../a.safetensors",
    ):
        for source in ("a.safetensors", str(src), "link.safetensors"):
            assert "is also an input" in cli_error(capsys, "convert", source, out)
            with pytest.raises(TatrError, match="is also an input"):
                convert(source, out)
    folder = _hf_folder(tmp_path)
    save_state_dict({"vision_model.x": torch.ones(1)}, folder / "model.safetensors")
    for out in (folder / "model.safetensors", folder / "new.safetensors"):
        assert "inside the folder being converted" in cli_error(capsys, "convert", folder, out)
    assert reads == [] and src.read_bytes() == before


def test_convert_checks_the_output_location_before_reading(tmp_path: Path, monkeypatch, capsys):
    src = tmp_path / "a.safetensors"
    save_state_dict({"visual.w": torch.ones(3)}, src)
    (tmp_path / "folder.safetensors").mkdir()
    (tmp_path / "file").write_text("x")
    reads = []
    monkeypatch.setattr(tatr.suites.clip8.convert, "load_any", lambda *a, **k: reads.append(a))
    cases = {
        tmp_path / "folder.safetensors": "is a folder",
        tmp_path / "missing" / "o.safetensors": "output folder does not exist",
        tmp_path / "file" / "o.safetensors": "not a folder",
    }
    listing = sorted(p.name for p in tmp_path.iterdir())
    for out, message in cases.items():
        assert message in cli_error(capsys, "convert", src, out)
    assert reads == [] and sorted(p.name for p in tmp_path.iterdir()) == listing
    assert list((tmp_path / "folder.safetensors").iterdir()) == []


# --- fuzz: whatever the bytes, a result or one line ---------------------------------------------


def test_mutated_files_give_a_result_or_one_line(tmp_path: Path):
    """Flip, cut and splice bytes of real files (zip, legacy, whole module): never another exception."""
    import random

    w = torch.randn(3, 4)
    torch.save({"visual.w": w, "visual.t": w, "visual.b": torch.ones(4, dtype=torch.float16)}, tmp_path / "z.pt")
    torch.save({"visual.w": w}, tmp_path / "l.pt", _use_new_zipfile_serialization=False)
    torch.save(nn.Sequential(nn.Linear(4, 2), nn.LayerNorm(2)), tmp_path / "m.pt")
    save_state_dict({"visual.w": w}, tmp_path / "s.safetensors")
    rng = random.Random(0)
    outcomes = {"read": 0, "refused": 0}
    for name in ("z.pt", "l.pt", "m.pt", "s.safetensors"):
        data = (tmp_path / name).read_bytes()
        for i in range(40):
            mutated = bytearray(data)
            kind = i % 3
            if kind == 0:  # flip a few bytes
                for _ in range(rng.randint(1, 4)):
                    mutated[rng.randrange(len(mutated))] = rng.randrange(256)
            elif kind == 1:  # cut
                mutated = mutated[: rng.randrange(len(mutated))]
            else:  # splice a run of bytes from elsewhere
                a, b = sorted(rng.randrange(len(mutated)) for _ in range(2))
                c = rng.randrange(len(mutated))
                mutated[c : c + (b - a)] = data[a:b]
            path = tmp_path / f"mut{Path(name).suffix}"
            path.write_bytes(bytes(mutated))
            checkpoints._PT_CACHE.clear()
            checkpoints._HEADERS.clear()
            readers = [load_state_dict, header] + ([load_pickled_module] if name.endswith(".pt") else [])
            for read in readers:
                try:
                    read(path)
                    outcomes["read"] += 1
                except TatrError as exc:
                    assert "\n" not in str(exc) and str(path) in str(exc)
                    outcomes["refused"] += 1
    assert outcomes["refused"] > 100 and outcomes["read"] > 10, outcomes


@pytest.mark.parametrize("where", ["zip", "legacy"])
def test_pickle_memo_bomb_refused_before_unpickling(where: str, tmp_path: Path, no_torch_load):
    """`LONG_BINPUT 1258647924` makes Python's C unpickler allocate a 10 GB memo array."""
    bomb = b"\x80\x02}r" + struct.pack("<I", 1_258_647_924) + b"."
    path = tmp_path / "bomb.pt"
    if where == "zip":
        with zipfile.ZipFile(path, "w") as zf:
            zf.writestr("archive/data.pkl", bomb)
    else:
        header_ = b"".join(pickle.dumps(v, protocol=2) for v in (torchfile.LEGACY_MAGIC, 1001, {"little_endian": True}))
        path.write_bytes(header_ + bomb)
    for read in (load_state_dict, load_pickled_module, lambda p: load_pickled_module(p, trust_pickle=True)):
        with pytest.raises(UnreadableCheckpoint, match="memo index 1258647924"):
            read(path)
    assert no_torch_load == []
