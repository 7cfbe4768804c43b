"""Every user error of `tatr` is one line on stderr: click's usage errors (exit 2), Ctrl-C (`tatr: aborted`,
exit 130, no blank line before it), a Breadcrumbs density that keeps nothing, an all-zero gradient file."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from core_helpers import make_models, merged_keys
from safetensors.torch import load_file, save_file

from tatr import merge
from tatr.cli import main
from tatr.core.errors import TatrError

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture()
def files(tmp_path: Path) -> dict:
    pre, tasks = make_models(3, seed=4)
    save_file(pre, tmp_path / "pre.safetensors")
    paths = []
    for i, t in enumerate(tasks):
        paths.append(tmp_path / f"ft{i}.safetensors")
        save_file(t, paths[-1])
    return {"dir": tmp_path, "pre": tmp_path / "pre.safetensors", "ft": paths, "state": (pre, tasks)}


def run(argv: list, capsys: pytest.CaptureFixture) -> tuple[int, str, str]:
    code = main([*map(str, argv)])
    out, err = capsys.readouterr()
    return code, out, err


def one_line_error(code: int, out: str, err: str) -> str:
    """The single stderr line of a refused command (exit 2, nothing on stdout)."""
    assert code == 2, err
    assert out == ""
    assert err.endswith("\n") and err.count("\n") == 1, repr(err)
    assert err.startswith("tatr: error: "), repr(err)
    return err.rstrip("\n")


def env() -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=str(ROOT))


# --- click's usage errors ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("argv", "needle", "command"),
    [
        (["merge", "--q", "abc"], "invalid value for '--q': 'abc' is not a valid float", "tatr merge"),
        (["merge", "--q"], "option '--q' requires an argument", "tatr merge"),
        ([], "missing option '--pretrained' / '-p'", "tatr merge"),  # argv without -p
        (["merge", "--components", "orthogonal,sideways"], "invalid value for '--components'", "tatr merge"),
        (["merge", "--components", ","], "invalid value for '--components'", "tatr merge"),
        (["merge", "--trust-region", "exemplr"], "invalid value for '--trust-region'", "tatr merge"),
        (["merge", "--bogus"], "no such option '--bogus'", "tatr merge"),
        (["merge", "extra"], "got unexpected extra argument (extra)", "tatr merge"),
        (["--bogus"], "no such option '--bogus'", "tatr"),
        (["mrege"], "no such command 'mrege'", "tatr"),
    ],
)
def test_usage_errors_are_one_line(argv: list, needle: str, command: str, files: dict, capsys) -> None:
    out = files["dir"] / "m.safetensors"
    if not argv:  # a missing -p: everything else given
        argv = ["merge", "-f", *files["ft"], "-o", out]
    elif argv[0] == "merge" and argv[-1] != "--q":
        argv = [*argv, "-p", files["pre"], "-f", *files["ft"], "-o", out]
    elif argv[0] == "merge":
        argv = ["merge", "-p", files["pre"], "-f", *files["ft"], "-o", out, "--q"]
    line = one_line_error(*run(argv, capsys))
    assert needle in line, line
    assert line.endswith(f"(see '{command} --help')"), line
    assert not out.exists()


def test_a_usage_error_from_the_installed_command_is_one_line(files: dict) -> None:
    """The same through `python -m tatr` (what the `tatr` script runs): nothing else reaches stderr."""
    argv = ["merge", "-p", files["pre"], "-f", *files["ft"], "--q", "abc", "-o", files["dir"] / "m.safetensors"]
    proc = subprocess.run([sys.executable, "-m", "tatr", *map(str, argv)], capture_output=True, text=True, env=env())
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr == (
        "tatr: error: invalid value for '--q': 'abc' is not a valid float (see 'tatr merge --help')\n"
    ), proc.stderr


def test_help_and_version_still_work(capsys) -> None:
    code, out, err = run(["--help"], capsys)
    assert code == 0 and out.startswith("Usage: tatr [OPTIONS] COMMAND") and "merge" in out and err == ""
    code, out, err = run(["merge", "-h"], capsys)
    assert code == 0 and out.startswith("Usage: tatr merge [OPTIONS]") and "--density" in out and err == ""
    code, out, err = run(["--version"], capsys)
    assert code == 0 and out.startswith("tatr, version ") and err == ""
    code, out, err = run([], capsys)  # a group alone shows its help, as click does
    assert code == 2 and out == "" and err.startswith("Usage: tatr [OPTIONS] COMMAND") and "merge" in err


# --- Ctrl-C ------------------------------------------------------------------------------------------
def test_sigint_prints_aborted_alone(files: dict) -> None:
    """SIGINT while `tatr merge` works: `tatr: aborted` and nothing else on stderr (click's own `main`
    prints a blank line first), exit 130, no output file."""
    out = files["dir"] / "m.safetensors"
    code = textwrap.dedent(
        """
        import signal, sys, time
        import tatr.core.one_shot as one_shot

        # as from a terminal: a shell's background job (CI under `nohup … &`) starts with SIGINT ignored,
        # which Python then leaves ignored, so the SIGINT below would never arrive
        signal.signal(signal.SIGINT, signal.default_int_handler)

        def merge_once(*args, **kwargs):  # the merge, made slow: the door checks have passed
            print("ready", flush=True)
            time.sleep(120)

        one_shot.merge_once = merge_once
        from tatr.cli import main
        sys.exit(main(sys.argv[1:]))
        """
    )
    argv = ["merge", "-p", files["pre"], "-f", *files["ft"], "-o", out]
    proc = subprocess.Popen(
        [sys.executable, "-c", code, *map(str, argv)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env(),
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert stderr == "tatr: aborted\n", repr(stderr)
    assert proc.returncode == 130 and stdout == ""
    assert not out.exists()


# --- Breadcrumbs: a density that keeps nothing ----------------------------------------------------------
@pytest.mark.parametrize(
    ("flags", "needle"),
    [
        (["--beta", "0", "--density", "0"], "Breadcrumbs density must be above 0"),
        (["--density", "0"], "Breadcrumbs density must be above 0"),
        (["--density", "-0.0"], "Breadcrumbs density must be above 0"),
        (["--beta", "0", "--density", "0.005"], "keeps no coordinate"),  # ⌊0.005·96⌋ = 0 for the largest tensor
    ],
)
def test_breadcrumbs_density_that_keeps_nothing_is_one_line(flags: list, needle: str, files: dict, capsys) -> None:
    out = files["dir"] / "m.safetensors"
    argv = ["merge", "-p", files["pre"], "-f", *files["ft"], "--method", "breadcrumbs", *flags, "-o", out]
    line = one_line_error(*run(argv, capsys))
    assert needle in line and "θ_0" in line, line
    assert not out.exists()


def test_density_zero_is_refused_by_the_api_the_config_and_the_sweep_space() -> None:
    """One check (the density's declaration, `tatr.core.sparsify.BREADCRUMBS_OPTIONS`) behind every door."""
    from tatr.runs.config import load_config
    from tatr.runs.sweep.space import check_value

    pre, tasks = make_models(2)
    with pytest.raises(TatrError, match="density must be above 0"):
        merge(pre, tasks, method="breadcrumbs", breadcrumbs_beta=0.0, breadcrumbs_density=0.0)
    with pytest.raises(TatrError, match="density must be above 0") as caught:
        load_config(None, ["merge.method=breadcrumbs", "merge.breadcrumbs_beta=0", "merge.breadcrumbs_density=0"])
    assert "\n" not in str(caught.value)
    with pytest.raises(ValueError, match="density must be above 0"):
        check_value("breadcrumbs_density", 0.0)
    check_value("breadcrumbs_beta", 0.0)  # β = 0 alone is meaningful


@pytest.mark.parametrize("density", ["0.5", "0.02"])  # 0.02: one entry of the largest tensor, none of the others
def test_beta_zero_with_a_positive_density_still_merges(density: str, files: dict, capsys) -> None:
    out = files["dir"] / "m.safetensors"
    argv = ["merge", "-p", files["pre"], "-f", *files["ft"], "--method", "breadcrumbs", "--beta", "0"]
    code, _, err = run([*argv, "--density", density, "--q", "0.9", "-o", out], capsys)
    assert code == 0, err
    pre, tasks = files["state"]
    expected = merge(pre, tasks, method="breadcrumbs", q=0.9, breadcrumbs_beta=0.0, breadcrumbs_density=float(density))
    got = load_file(out)
    for k in pre:
        assert torch.equal(got[k], expected[k]), k
    assert not torch.equal(got["blocks.0.attn.weight"], pre["blocks.0.attn.weight"])  # not θ_0
    assert f"breadcrumbs_beta=0.0 breadcrumbs_density={float(density)}" in load_metadata(out)


def load_metadata(path: Path) -> str:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as fh:
        return (fh.metadata() or {}).get("tatr", "")


# --- an all-zero gradient file -------------------------------------------------------------------------
def _gradients(files: dict, zero: dict[int, str]) -> list[Path]:
    """One mean-|∇ℓ| file per task; task t's is all zero where zero[t] == "all", zero at one key where
    zero[t] names it."""
    pre, _ = files["state"]
    g = torch.Generator().manual_seed(3)
    paths = []
    for t in range(3):
        grad = {k: torch.rand(pre[k].shape, generator=g) for k in merged_keys(pre)}
        for k in grad:
            if zero.get(t) in ("all", k):
                grad[k] = torch.zeros_like(grad[k])
        paths.append(files["dir"] / f"g{t}.safetensors")
        save_file(grad, paths[-1])
    return paths


@pytest.mark.parametrize("mode", ["exemplar", "gradient-only"])
def test_an_all_zero_gradient_file_is_one_line(mode: str, files: dict, capsys) -> None:
    grads = _gradients(files, {1: "all"})
    out = files["dir"] / "m.safetensors"
    argv = ["merge", "-p", files["pre"], "-f", *files["ft"], "--trust-region", mode, "--gradients", *grads]
    line = one_line_error(*run([*argv, "-o", out], capsys))
    assert line == (
        f"tatr: error: {grads[1]}: every gradient is zero (exemplar sensitivity needs a nonzero gradient; "
        "was it computed at θ_0 with a loss?)"
    ), line
    assert not out.exists()


def test_one_all_zero_key_is_fine(files: dict, capsys) -> None:
    """A frozen layer has no gradient: one zero key of one task is no error."""
    grads = _gradients(files, {1: "blocks.0.attn.bias"})
    out = files["dir"] / "m.safetensors"
    argv = ["merge", "-p", files["pre"], "-f", *files["ft"], "--trust-region", "exemplar", "--gradients", *grads]
    code, _, err = run([*argv, "-o", out], capsys)
    assert code == 0, err
    pre, tasks = files["state"]
    expected = merge(pre, tasks, trust_region="exemplar", gradients=[load_file(p) for p in grads])
    got = load_file(out)
    for k in pre:
        assert torch.equal(got[k], expected[k]), k


def test_an_all_zero_signed_gradient_is_refused_through_the_api() -> None:
    pre, tasks = make_models(3, seed=4)
    keys = merged_keys(pre)
    grads = [{k: torch.rand(pre[k].shape) for k in keys} for _ in tasks]
    signed = [{k: torch.randn(pre[k].shape) for k in keys} for _ in tasks]
    signed[2] = {k: torch.zeros(pre[k].shape) for k in keys}
    kw = dict(trust_region="exemplar", gradients=grads, components=["orthogonal"], q=0.7)
    with pytest.raises(TatrError, match=r"^<in-memory state dict>: every signed gradient is zero \(the component"):
        merge(pre, tasks, signed_gradients=signed, **kw)
    grads[0] = {k: torch.zeros(pre[k].shape) for k in keys}
    with pytest.raises(TatrError, match=r"^<in-memory state dict>: every gradient is zero \(exemplar"):
        merge(pre, tasks, signed_gradients=[*signed[:2], signed[0]], **kw)
