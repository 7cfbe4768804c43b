"""`tatr merge` end to end on files, and every bad input as one line on stderr."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from core_helpers import make_models, merged_keys
from safetensors.torch import load_file, save_file

from tatr import merge
from tatr.cli import main

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture()
def files(tmp_path: Path) -> dict:
    pre, tasks = make_models(3, seed=4)
    save_file(pre, tmp_path / "pre.safetensors")
    paths = []
    for i, t in enumerate(tasks):
        paths.append(tmp_path / f"ft{i}.safetensors")
        save_file(t, paths[-1])
    keys = merged_keys(pre)
    grads = []
    for i in range(3):
        grads.append(tmp_path / f"g{i}.safetensors")
        save_file({k: torch.rand(pre[k].shape) for k in keys}, grads[-1])
    return {"dir": tmp_path, "pre": tmp_path / "pre.safetensors", "ft": paths, "grads": grads, "state": (pre, tasks)}


def run(argv: list[str], capsys: pytest.CaptureFixture) -> tuple[int, str, str]:
    code = main(["merge", *map(str, argv)])
    out, err = capsys.readouterr()
    return code, out, err


def test_merge_writes_every_key_and_matches_the_api(files: dict, capsys: pytest.CaptureFixture) -> None:
    out = files["dir"] / "merged.safetensors"
    code, stdout, _ = run(
        ["-p", files["pre"], "--finetuned", *files["ft"], "--q", "0.9", "--lam", "0.4", "-o", out], capsys
    )
    assert code == 0
    merged = load_file(out)
    pre, tasks = files["state"]
    assert set(merged) == set(pre)
    expected = merge(pre, tasks, q=0.9, lam=0.4)
    for k in pre:
        torch.testing.assert_close(merged[k], expected[k])
    assert "dropped: 18" in stdout and "coordinates merged: 180" in stdout and "peak memory" in stdout


@pytest.mark.parametrize("method", ["ties-sum", "ties-mean", "average"])
def test_merge_with_exemplar_gradients_uses_method_and_ties_k(
    method: str, files: dict, capsys: pytest.CaptureFixture
) -> None:
    """The file equals the API's merge for the same --method and --ties-k, and differs from TA's and
    from another k: the CLI passes both through."""
    pre, tasks = files["state"]
    g = [load_file(p) for p in files["grads"]]
    results = {}
    for k in ("20", "60"):
        out = files["dir"] / f"m{k}.safetensors"
        argv = ["-p", files["pre"], "-f", *files["ft"], "--method", method, "--trust-region", "exemplar"]
        code, _, err = run([*argv, "--gradients", *files["grads"], "--ties-k", k, "--lam", "0.8", "-o", out], capsys)
        assert code == 0, err
        results[k] = load_file(out)
        api = merge(pre, tasks, method=method, trust_region="exemplar", gradients=g, ties_k=float(k), lam=0.8)
        for key in pre:
            assert torch.equal(results[k][key], api[key]), key
    ta = merge(pre, tasks, method="ta", trust_region="exemplar", gradients=g, lam=0.8)
    w = "blocks.0.attn.weight"
    assert not torch.equal(results["20"][w], ta[w])
    if method.startswith("ties"):
        assert not torch.equal(results["20"][w], results["60"][w])


def _bad(files: dict, tmp: Path) -> dict[str, tuple[list, str]]:
    pre, ft, g = files["pre"], files["ft"], files["grads"]
    out = tmp / "never.safetensors"
    text = tmp / "notes.txt"
    text.write_text("hello")
    corrupt = tmp / "corrupt.safetensors"
    corrupt.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json")
    pre_state, tasks = files["state"]
    wrong_shape = dict(tasks[0], **{"blocks.0.attn.bias": torch.zeros(13)})
    save_file(wrong_shape, tmp / "shape.safetensors")
    nan = dict(tasks[0], **{"blocks.0.attn.bias": torch.full((12,), float("nan"))})
    save_file(nan, tmp / "nan.safetensors")
    save_file(pre_state, tmp / "same.safetensors")
    missing = {k: v for k, v in tasks[0].items() if k != "blocks.1.mlp.weight"}
    save_file(missing, tmp / "missing.safetensors")
    half = {k: v for k, v in tasks[0].items()}
    half["blocks.0.attn.weight"] = half["blocks.0.attn.weight"].half()
    save_file(half, tmp / "dtype.safetensors")
    keys = merged_keys(pre_state)
    for i in range(3):
        save_file({f"module.{k}": torch.rand(pre_state[k].shape) for k in keys}, tmp / f"badgrad{i}.safetensors")
    module = torch.nn.Linear(2, 2)
    torch.save(module, tmp / "module.pt")
    for name, value in (("neg", -1e-3), ("negzero", -0.0)):
        for i in range(3):
            grad = {k: torch.rand(pre_state[k].shape) for k in keys}
            grad["blocks.0.attn.bias"][5] = value
            save_file(grad, tmp / f"{name}{i}.safetensors")
    save_file({"position_ids": torch.arange(7)}, tmp / "ints.safetensors")
    save_file({}, tmp / "empty.safetensors")
    (tmp / "ft0-link.safetensors").symlink_to(ft[0])
    torch.save(dict(tasks[0], extra=torch.zeros(3, dtype=torch.uint16)), tmp / "u16a.pt")
    torch.save(dict(tasks[1], extra=torch.zeros(3, dtype=torch.uint16)), tmp / "u16b.pt")
    torch.save(dict(pre_state, extra=torch.zeros(3, dtype=torch.uint16)), tmp / "u16p.pt")
    torch.save(dict(tasks[1], extra=torch.zeros(3, dtype=torch.complex64)), tmp / "c64.pt")
    torch.save(dict(pre_state, extra=torch.zeros(3, dtype=torch.complex64)), tmp / "c64p.pt")
    exemplar = ["-p", pre, "-f", *ft, "--trust-region", "exemplar"]
    return {
        "lam nan": (["-p", pre, "-f", *ft, "--lam", "nan", "-o", out], "λ (lam) must be a finite number"),
        "lam inf": (["-p", pre, "-f", *ft, "--lam", "inf", "-o", out], "λ (lam) must be a finite number"),
        "lam -inf": (["-p", pre, "-f", *ft, "--lam", "-inf", "-o", out], "λ (lam) must be a finite number"),
        "q nan": (["-p", pre, "-f", *ft, "--q", "nan", "-o", out], "q must be in (0, 1]"),
        "ties-k nan": (["-p", pre, "-f", *ft, "--ties-k", "nan", "-o", out], "ties_k must be in (0, 100]"),
        "ties-k zero": (["-p", pre, "-f", *ft, "--ties-k", "0", "-o", out], "ties_k must be in (0, 100]"),
        "ties-k 101": (["-p", pre, "-f", *ft, "--ties-k", "101", "-o", out], "ties_k must be in (0, 100]"),
        "old ties name": (
            ["-p", pre, "-f", *ft, "--method", "ties", "-o", out],
            "unknown merge method 'ties'; did you mean 'ties-sum' or 'ties-mean'",
        ),
        "negative gradient": (
            [*exemplar, "--gradients", *[tmp / f"neg{i}.safetensors" for i in range(3)], "-o", out],
            f"{tmp / 'neg0.safetensors'}: key 'blocks.0.attn.bias': has negative values",
        ),
        "negative zero gradient": (
            [*exemplar, "--gradients", *[tmp / f"negzero{i}.safetensors" for i in range(3)], "-o", out],
            "signed gradients go to --signed-gradients",
        ),
        "integer-only": (
            ["-p", pre, "-f", tmp / "ints.safetensors", tmp / "ints.safetensors", "-o", out],
            "given twice as --finetuned",
        ),
        "integer-only file": (
            ["-p", pre, "-f", tmp / "ints.safetensors", *ft, "-o", out],
            "has no floating-point tensors (only integer or bool ones)",
        ),
        "empty file": (["-p", pre, "-f", tmp / "empty.safetensors", *ft, "-o", out], "is empty (it holds no tensors)"),
        "empty pretrained": (["-p", tmp / "empty.safetensors", "-f", *ft, "-o", out], "is empty"),
        "finetuned twice": (["-p", pre, "-f", ft[0], ft[1], ft[0], "-o", out], "given twice as --finetuned"),
        "finetuned twice via a link": (
            ["-p", pre, "-f", ft[0], tmp / "ft0-link.safetensors", "-o", out],
            "given twice as --finetuned",
        ),
        "gradients twice": (
            [*exemplar, "--gradients", g[0], g[1], tmp / ".." / tmp.name / g[0].name, "-o", out],
            "given twice as --gradients",
        ),
        "out is pretrained": (["-p", pre, "-f", *ft, "-o", pre], "is also an input"),
        "out is a finetuned link": (["-p", pre, "-f", *ft, "-o", tmp / "ft0-link.safetensors"], "is also an input"),
        "out is a gradient": (
            [*exemplar, "--gradients", *g, "-o", tmp / ".." / tmp.name / g[2].name],
            "is also an input",
        ),
        "out is a folder": (["-p", pre, "-f", *ft, "-o", tmp / "dir.safetensors"], "is a folder"),
        "out folder missing": (["-p", pre, "-f", *ft, "-o", tmp / "nope" / "m.safetensors"], "does not exist"),
        "uint16": (
            ["-p", tmp / "u16p.pt", "-f", tmp / "u16a.pt", tmp / "u16b.pt", "-o", out],
            "key 'extra'",
        ),
        "complex": (
            ["-p", tmp / "c64p.pt", "-f", ft[0], tmp / "c64.pt", "-o", out],
            "key 'extra'",
        ),
        "no such file": (["-p", tmp / "nope.safetensors", "-f", *ft, "-o", out], "no such file"),
        "format": (["-p", text, "-f", *ft, "-o", out], "unknown checkpoint format"),
        "corrupt": (["-p", corrupt, "-f", *ft, "-o", out], "corrupt.safetensors: cannot read"),
        "q zero": (["-p", pre, "-f", *ft, "--q", "0", "-o", out], "q must be in (0, 1]"),
        "q above one": (["-p", pre, "-f", *ft, "--q", "1.01", "-o", out], "q must be in (0, 1]"),
        "one model": (["-p", pre, "-f", ft[0], "-o", out], "at least two"),
        "shape": (["-p", pre, "-f", ft[0], tmp / "shape.safetensors", "-o", out], "shape [13] differs"),
        "dtype": (["-p", pre, "-f", ft[0], tmp / "dtype.safetensors", "-o", out], "dtype torch.float16 differs"),
        "missing key": (["-p", pre, "-f", ft[0], tmp / "missing.safetensors", "-o", out], "blocks.1.mlp.weight"),
        "non-finite": (["-p", pre, "-f", ft[0], tmp / "nan.safetensors", "-o", out], "NaN or infinite"),
        "identical": (["-p", pre, "-f", ft[0], tmp / "same.safetensors", "-o", out], "identical to the pretrained"),
        "no gradients": (["-p", pre, "-f", *ft, "--trust-region", "exemplar", "-o", out], "needs exemplar gradients"),
        "gradient count": (
            ["-p", pre, "-f", *ft, "--trust-region", "exemplar", "--gradients", g[0], "-o", out],
            "1 gradient files for 3",
        ),
        "gradient keys": (
            [
                "-p",
                pre,
                "-f",
                *ft,
                "--trust-region",
                "exemplar",
                "--gradients",
                *[tmp / f"badgrad{i}.safetensors" for i in range(3)],
                "-o",
                out,
            ],
            "module.blocks",
        ),
        "components without signed": (
            [
                "-p",
                pre,
                "-f",
                *ft,
                "--trust-region",
                "exemplar",
                "--gradients",
                *g,
                "--components",
                "positive",
                "-o",
                out,
            ],
            "signed mean gradients",
        ),
        "pickled module": (["-p", tmp / "module.pt", "-f", *ft, "-o", out], "convert it once with `tatr convert`"),
        "out suffix": (["-p", pre, "-f", *ft, "-o", tmp / "out.bin"], "must end in .safetensors"),
    }


CASES = [
    "lam nan",
    "lam inf",
    "lam -inf",
    "q nan",
    "ties-k nan",
    "ties-k zero",
    "ties-k 101",
    "old ties name",
    "negative gradient",
    "negative zero gradient",
    "integer-only",
    "integer-only file",
    "empty file",
    "empty pretrained",
    "finetuned twice",
    "finetuned twice via a link",
    "gradients twice",
    "out is pretrained",
    "out is a finetuned link",
    "out is a gradient",
    "out is a folder",
    "out folder missing",
    "uint16",
    "complex",
    "no such file",
    "format",
    "corrupt",
    "q zero",
    "q above one",
    "one model",
    "shape",
    "dtype",
    "missing key",
    "non-finite",
    "identical",
    "no gradients",
    "gradient count",
    "gradient keys",
    "components without signed",
    "pickled module",
    "out suffix",
]


@pytest.mark.parametrize("case", CASES)
def test_bad_input_is_one_line_and_writes_nothing(case: str, files: dict, tmp_path: Path, capsys) -> None:
    (tmp_path / "dir.safetensors").mkdir()
    argv, needle = _bad(files, tmp_path)[case]
    before = _snapshot(tmp_path)
    code, _, err = run(argv, capsys)
    assert code == 2
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("tatr: error: "), err
    assert needle in lines[0]
    assert _snapshot(tmp_path) == before  # no output, no temporary, every input untouched


def _snapshot(folder: Path) -> dict[str, bytes | None]:
    return {
        str(p.relative_to(folder)): None if p.is_dir() or p.is_symlink() else p.read_bytes()
        for p in sorted(folder.rglob("*"))
    }


def test_full_disk_and_unwritable_folder_are_refused_before_the_work(
    files: dict, tmp_path: Path, capsys, monkeypatch: pytest.MonkeyPatch
) -> None:
    import shutil as _shutil

    import tatr.cli.merge as cli_merge
    import tatr.core.outputs

    started = []
    monkeypatch.setattr(cli_merge, "merge_once", lambda *a, **k: started.append(1))
    argv = ["-p", files["pre"], "-f", *files["ft"], "-o", tmp_path / "m.safetensors"]
    usage = _shutil.disk_usage(tmp_path)
    monkeypatch.setattr(tatr.core.outputs.shutil, "disk_usage", lambda p: usage._replace(free=100))
    code, _, err = run(argv, capsys)
    assert code == 2 and "MiB free, but the output needs about" in err and not started
    monkeypatch.undo()
    monkeypatch.setattr(cli_merge, "merge_once", lambda *a, **k: started.append(1))

    def refuse(*args: object, **kwargs: object) -> None:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(tatr.core.outputs.tempfile, "mkstemp", refuse)
    before = _snapshot(tmp_path)
    code, _, err = run(argv, capsys)
    assert code == 2 and "cannot write here (Permission denied)" in err and not started
    assert _snapshot(tmp_path) == before


def test_error_in_a_subprocess_has_no_traceback(files: dict, tmp_path: Path) -> None:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "tatr",
            "merge",
            "-p",
            str(files["pre"]),
            "-f",
            str(files["ft"][0]),
            "--q",
            "2",
            "-o",
            str(tmp_path / "x.safetensors"),
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == ["tatr: error: q must be in (0, 1], got 2.0"]


def test_weights_only_pt_files_are_read(files: dict, tmp_path: Path, capsys) -> None:
    pre, tasks = files["state"]
    torch.save(pre, tmp_path / "pre.pt")
    torch.save({"state_dict": tasks[0]}, tmp_path / "a.pth")
    out = tmp_path / "o.safetensors"
    code, _, err = run(["-p", tmp_path / "pre.pt", "-f", tmp_path / "a.pth", files["ft"][1], "-o", out], capsys)
    assert code == 0, err
    assert set(load_file(out)) == set(pre)
