"""`tatr merge` in memory against out of core (`--low-memory`): wall time, peak RSS, and the same bits.

A synthetic Llama-shaped bf16 model (embeddings, per layer q/k/v/o, gate/up/down and two norms, a head) and
T fine-tunes are written once; then, each as its own process (its own `VmHWM`, `benchmarks/peak_memory.py`),
on the same files in the same run: `--in-memory`, and `--memory-budget B` with B set below the in-memory
arenas' estimate, so tatr chooses the out-of-core path itself (checked on its stderr). The outputs are
compared bit for bit, tensor by tensor. Ratios are out of core ÷ in memory.

It also measures, in this process, the choice behind the out-of-core design: one pass recomputing Ω tensor
by tensor (what a boundary or merge pass pays for Ω) against spilling Ω to a memory-mapped float32 file
and reading it back (what a memory-mapped Ω would pay instead, on top of its N·4 bytes of disk).

    python benchmarks/bench_low_memory.py --small                       # ~3M parameters: proves it runs
    python benchmarks/bench_low_memory.py --tasks 3 --budget 2GiB --json low_memory.json   # ~750M
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))  # peak_memory beside this file
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def llama_shapes(hidden: int, layers: int, inter: int, vocab: int) -> dict[str, tuple[int, ...]]:
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (vocab, hidden)}
    for i in range(layers):
        p = f"model.layers.{i}."
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            shapes[p + f"self_attn.{name}.weight"] = (hidden, hidden)
        shapes[p + "mlp.gate_proj.weight"] = (inter, hidden)
        shapes[p + "mlp.up_proj.weight"] = (inter, hidden)
        shapes[p + "mlp.down_proj.weight"] = (hidden, inter)
        shapes[p + "input_layernorm.weight"] = (hidden,)
        shapes[p + "post_attention_layernorm.weight"] = (hidden,)
    shapes["model.norm.weight"] = (hidden,)
    shapes["lm_head.weight"] = (vocab, hidden)
    return shapes


def write_models(folder: Path, shapes: dict[str, tuple[int, ...]], tasks: int) -> tuple[Path, list[Path]]:
    """θ_0 ~ N(0, 0.02²) and θ_t = θ_0 + N(0, 0.001²), in bf16, one tensor generated at a time per file."""
    g = torch.Generator().manual_seed(0)
    pre = {k: (torch.randn(s, generator=g) * 0.02).to(torch.bfloat16) for k, s in shapes.items()}
    save_file(pre, folder / "pre.safetensors")
    paths = []
    for t in range(tasks):
        ft = {k: (v.float() + 1e-3 * torch.randn(v.shape, generator=g)).to(torch.bfloat16) for k, v in pre.items()}
        paths.append(folder / f"ft{t}.safetensors")
        save_file(ft, paths[-1])
        del ft
    return folder / "pre.safetensors", paths


def run_merge(argv: list[str]) -> tuple[float, float, str]:
    """(seconds, own peak MiB, stderr) of `python -m tatr merge …`."""
    import subprocess

    from peak_memory import RUNNER

    env = dict(os.environ, PYTHONPATH=str(ROOT))
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-c", RUNNER, "-m", "tatr", "merge", "--quiet", *argv],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr.strip()[-2000:])
    peak = [line for line in proc.stderr.splitlines() if line.startswith("VmHWM ")][-1]
    notes = "\n".join(line for line in proc.stderr.splitlines() if line.startswith("tatr: "))
    return seconds, int(peak.split()[1]) / 1024, notes


def same_bits(a: Path, b: Path) -> bool:
    """Every tensor of two files equal byte for byte, one tensor in memory at a time."""
    with safe_open(str(a), "pt") as fa, safe_open(str(b), "pt") as fb:
        if set(fa.keys()) != set(fb.keys()):
            return False
        for key in fa.keys():  # noqa: SIM118 - safe_open handles are not dicts
            x, y = fa.get_tensor(key), fb.get_tensor(key)
            if x.dtype != y.dtype or not torch.equal(x.reshape(-1).view(torch.uint8), y.reshape(-1).view(torch.uint8)):
                return False
    return True


def omega_costs(pre: Path, fts: list[Path], folder: Path) -> dict[str, float]:
    """Seconds for one Ω recomputation pass (zero-shot) against an Ω spill: memmap write, then read back."""
    from tatr.core.passes import arena_dtype, key_sums
    from tatr.core.vectors import open_task_set

    ts = open_task_set(pre, fts)
    dtype = arena_dtype(ts)
    start = time.perf_counter()
    total = 0
    for key in ts.candidate_keys:
        total += key_sums(ts, key, "zero-shot", dtype, [True] * ts.num_tasks).omega.numel()
    recompute = time.perf_counter() - start
    spill = np.memmap(folder / "omega.f32", dtype=np.float32, mode="w+", shape=(total,))
    start = time.perf_counter()
    offset = 0
    for key in ts.candidate_keys:
        omega = key_sums(ts, key, "zero-shot", dtype, [True] * ts.num_tasks).omega.reshape(-1).numpy()
        spill[offset : offset + omega.size] = omega
        offset += omega.size
    spill.flush()
    write = time.perf_counter() - start - recompute  # the spill's own cost beyond computing Ω once
    del spill
    start = time.perf_counter()
    back = np.memmap(folder / "omega.f32", dtype=np.float32, mode="r", shape=(total,))
    checksum = float(sum(back[i : i + (1 << 24)].sum(dtype=np.float64) for i in range(0, total, 1 << 24)))
    read = time.perf_counter() - start
    del back
    return {"recompute_s": recompute, "spill_write_s": max(write, 0.0), "spill_read_s": read, "omega_sum": checksum}


def parse_bytes(text: str) -> int:
    from tatr.io.model_folder_writer import parse_size

    return parse_size(text)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--small", action="store_true", help="a ~3M-parameter model (hidden 256, 2 layers)")
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--inter", type=int, default=5632)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--tasks", type=int, default=3)
    ap.add_argument("--q", type=float, default=0.99)
    ap.add_argument("--methods", nargs="+", default=["ta", "ties-sum"])
    ap.add_argument("--modes", nargs="+", default=["zero-shot"])
    ap.add_argument("--budget", default=None, help="the out-of-core run's --memory-budget [a fifth of the estimate]")
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    if args.small:
        args.hidden, args.layers, args.inter, args.vocab = 256, 2, 688, 1000

    from tatr.core.memory_budget import in_memory_bytes
    from tatr.core.methods import get_method
    from tatr.core.vectors import open_task_set

    shapes = llama_shapes(args.hidden, args.layers, args.inter, args.vocab)
    n = sum(torch.Size(s).numel() for s in shapes.values())
    work = Path(tempfile.mkdtemp(prefix="tatr-bench-low-", dir=args.workdir))
    rows = []
    try:
        pre, fts = write_models(work, shapes, args.tasks)
        ts = open_task_set(pre, fts)
        costs = omega_costs(pre, fts, work)
        print(json.dumps({"params": n, **costs}), flush=True)
        for method in args.methods:
            for mode in args.modes:
                need = in_memory_bytes(ts, get_method(method), mode, None, args.q)
                budget = parse_bytes(args.budget) if args.budget else max(need // 5, 1)
                common = ["-p", str(pre), "-f", *map(str, fts), "--method", method, "--trust-region", mode]
                common += ["--q", str(args.q)]
                t_mem, m_mem, _ = run_merge([*common, "--in-memory", "-o", str(work / "memory.safetensors")])
                out = work / "low.safetensors"
                t_low, m_low, note = run_merge([*common, "--memory-budget", str(budget), "-o", str(out)])
                if "merging out of core" not in note:
                    raise RuntimeError(f"tatr did not switch out of core under a {budget}-byte budget: {note!r}")
                rows.append(
                    {
                        "params": n,
                        "tasks": args.tasks,
                        "method": method,
                        "mode": mode,
                        "estimate_mib": need / 2**20,
                        "budget_mib": budget / 2**20,
                        "memory_s": t_mem,
                        "memory_peak_mib": m_mem,
                        "low_s": t_low,
                        "low_peak_mib": m_low,
                        "time_ratio": t_low / t_mem,
                        "memory_ratio": m_low / m_mem,
                        "same_bits": same_bits(work / "memory.safetensors", out),
                    }
                )
                print(json.dumps(rows[-1]), flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print()
    print(
        f"Ω, one pass over {n / 1e6:.1f}M parameters (T = {args.tasks}): recomputed {costs['recompute_s']:.2f} s; "
        f"spilled to a memmap {costs['spill_write_s']:.2f} s to write beyond computing it, "
        f"{costs['spill_read_s']:.2f} s to read back"
    )
    head = "| method | mode | estimate MiB | budget MiB | in memory s | peak MiB | out of core s | peak MiB |"
    print(head + " × time | × memory | same bits |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['method']} | {r['mode']} | {r['estimate_mib']:.0f} | {r['budget_mib']:.0f} | {r['memory_s']:.1f} | "
            f"{r['memory_peak_mib']:.0f} | {r['low_s']:.1f} | {r['low_peak_mib']:.0f} | {r['time_ratio']:.2f} | "
            f"{r['memory_ratio']:.2f} | {r['same_bits']} |"
        )
    if args.json:
        args.json.write_text(json.dumps({"omega": costs, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
