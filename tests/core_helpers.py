"""Small state dicts and literal reference implementations for the core tests."""

from __future__ import annotations

import torch
from torch import Tensor


def make_models(
    num_tasks: int, seed: int = 0, scale: float = 0.05
) -> tuple[dict[str, Tensor], list[dict[str, Tensor]]]:
    """θ_0 with a few tensor shapes (+ an int buffer and a never-changed key) and T perturbed copies."""
    g = torch.Generator().manual_seed(seed)
    pre = {
        "blocks.0.attn.weight": torch.randn(12, 8, generator=g),
        "blocks.0.attn.bias": torch.randn(12, generator=g),
        "blocks.0.ln.frozen": torch.randn(9, generator=g),  # unchanged, sorted between merged keys
        "blocks.1.mlp.weight": torch.randn(6, 4, 3, generator=g),
        "position_ids": torch.arange(7),
        "text.frozen": torch.randn(5, generator=g),
    }
    tasks = []
    for _ in range(num_tasks):
        ft = {}
        for k, v in pre.items():
            if v.is_floating_point() and not k.endswith("frozen"):
                ft[k] = v + scale * torch.randn(v.shape, generator=g)
            else:
                ft[k] = v.clone()
        tasks.append(ft)
    return pre, tasks


def merged_keys(pre: dict[str, Tensor]) -> list[str]:
    return sorted(k for k, v in pre.items() if v.is_floating_point() and not k.endswith("frozen"))


def flat(sd: dict[str, Tensor], keys: list[str]) -> Tensor:
    return torch.cat([sd[k].reshape(-1).double() for k in keys])


def reference_mask(omega: Tensor, q: float) -> Tensor:
    """Keep-mask by a full stable sort: drop the ⌈(1−q)N⌉ largest, earlier index first on ties."""
    import math
    from fractions import Fraction

    n = omega.numel()
    k = math.ceil((1 - Fraction(repr(q))) * n)
    order = torch.sort(omega, descending=True, stable=True).indices
    keep = torch.ones(n, dtype=torch.bool)
    keep[order[:k]] = False
    return keep


def reference_ties(taus: Tensor, k_percent: float) -> Tensor:
    """TIES on flattened [T, N] task vectors, written from the paper: trim, elect, disjoint mean."""
    import math
    from fractions import Fraction

    t, n = taus.shape
    keep = min(n, math.ceil(Fraction(repr(k_percent)) / 100 * n))
    trimmed = torch.zeros_like(taus)
    for i in range(t):
        thr = torch.sort(taus[i].abs(), descending=True).values[keep - 1]
        trimmed[i] = torch.where(taus[i].abs() >= thr, taus[i], 0)
    elected = torch.where(trimmed.sum(0) >= 0, 1.0, -1.0).to(taus.dtype)
    agree = (torch.sign(trimmed) == elected) & (trimmed != 0)
    total = (trimmed * agree).sum(0)
    count = agree.sum(0).clamp(min=1)
    return total / count
