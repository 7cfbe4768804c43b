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


def test_merge_with_exemplar_gradients_and_ties(files: dict, capsys: pytest.CaptureFixture) -> None:
    out = files["dir"] / "m.safetensors"
    argv = ["-p", files["pre"], "-f", *files["ft"], "--method", "ties", "--trust-region", "exemplar"]
    code, _, err = run([*argv, "--gradients", *files["grads"], "-o", out], capsys)
    assert code == 0, err
    assert not torch.equal(load_file(out)["blocks.0.attn.weight"], files["state"][0]["blocks.0.attn.weight"])


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
    save_file({f"module.{k}": torch.rand(pre_state[k].shape) for k in keys}, tmp / "badgrad.safetensors")
    module = torch.nn.Linear(2, 2)
    torch.save(module, tmp / "module.pt")
    return {
        "no such file": (["-p", tmp / "nope.safetensors", "-f", *ft, "-o", out], "no such file"),
        "format": (["-p", text, "-f", *ft, "-o", out], "unknown checkpoint format"),
        "corrupt": (["-p", corrupt, "-f", *ft, "-o", out], "not a readable safetensors file"),
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
                *[tmp / "badgrad.safetensors"] * 3,
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
    argv, needle = _bad(files, tmp_path)[case]
    code, _, err = run(argv, capsys)
    assert code == 2
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("tatr: error: "), err
    assert needle in lines[0]
    assert not (tmp_path / "never.safetensors").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".never")]


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
