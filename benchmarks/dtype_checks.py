"""Measure the merge's dtype rules and print the "dtype checks" table of docs/performance.md.

    python benchmarks/dtype_checks.py

Per input dtype: a two-task TA and TIES (dis-sum) merge with the zero-shot trust region on a
random model whose θ_0 has −0.0 entries, then (a) whether every output key kept its dtype,
(b) how many coordinates the merge does not move (M(q) exactly 0: dropped, trimmed, never
changed, Σ τ = 0) and how many of those differ from θ_0 in their bits, (c) whether θ_0's −0.0
stay −0.0, and (d) for float64, whether a 1e-9 task vector on θ_0 = 1 survives (it is below
float32's resolution there).
"""

from __future__ import annotations

import torch

from tatr import merge, plan_merge


def _bits(x: torch.Tensor) -> torch.Tensor:
    return x.view({2: torch.int16, 4: torch.int32, 8: torch.int64}[x.element_size()])


def _model(dtype: torch.dtype, n: int = 4096, seed: int = 0) -> tuple[dict, list[dict]]:
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(n, generator=g).to(dtype)
    base[: n // 8] = -0.0
    tasks = []
    for sign in (1.0, -1.0):
        t = base + (0.02 * torch.randn(n, generator=g)).to(dtype)
        t[n // 16 : n // 8] = base[n // 16 : n // 8] + sign * 0.25  # Σ τ = 0 on −0.0
        t[: n // 16] = base[: n // 16]  # never changed
        tasks.append({"w": t, "ids": torch.arange(3)})
    return {"w": base, "ids": torch.arange(3)}, tasks


def row(dtype: torch.dtype, method: str) -> str:
    pre, tasks = _model(dtype)
    plan = plan_merge(pre, tasks, method=method, trust_region="zero-shot")
    out = plan.merged(0.9, 0.3)
    kept = all(out[k].dtype == v.dtype for k, v in pre.items())
    # not moved: M(q) is exactly 0 there (dropped, trimmed, never changed, Σ τ = 0)
    unmoved = plan.merged_task_vector(0.9) == 0
    same = int((_bits(out["w"])[unmoved] == _bits(pre["w"])[unmoved]).sum())
    negzero = int(((pre["w"] == 0) & torch.signbit(pre["w"]) & torch.signbit(out["w"])).sum())
    return (
        f"| {str(dtype).split('.')[1]} | {method} | {'yes' if kept else 'NO'} | {int(unmoved.sum())} | "
        f"{int(unmoved.sum()) - same} | {negzero} of {int(((pre['w'] == 0) & torch.signbit(pre['w'])).sum())} |"
    )


def tiny_float64() -> str:
    pre = {"w": torch.ones(1000, dtype=torch.float64)}
    g = torch.Generator().manual_seed(1)
    tasks = [{"w": pre["w"] + 1e-9 * torch.rand(1000, generator=g, dtype=torch.float64)} for _ in range(2)]
    out = merge(pre, tasks, method="ta", trust_region="off", lam=1.0)
    want = pre["w"] + sum(t["w"] - pre["w"] for t in tasks)
    moved = int((out["w"] != pre["w"]).sum())
    err = float((out["w"] - want).abs().max())
    as32 = int((pre["w"].float() + sum(t["w"].float() - pre["w"].float() for t in tasks) != 1).sum())
    return (
        f"| float64, τ ≈ 1e-9 on θ_0 = 1 (T=2, TA, λ=1) | {moved} of 1000 coordinates moved | "
        f"max error {err:.1e} | in float32: {as32} of 1000 moved |"
    )


def main() -> None:
    print("| dtype | method | output dtypes kept | unmoved coords | of those, bits ≠ θ_0 | −0.0 kept |")
    print("|---|---|---|---|---|---|")
    for dtype in (torch.bfloat16, torch.float16, torch.float32, torch.float64):
        for method in ("ta", "ties-sum"):
            print(row(dtype, method))
    print()
    print("| case | merged | vs float64 reference | old float32 arena |")
    print("|---|---|---|---|")
    print(tiny_float64())


if __name__ == "__main__":
    main()
