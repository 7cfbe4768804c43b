"""Small state dicts and literal reference implementations for the core tests."""

from __future__ import annotations

import torch
from torch import Tensor


def make_models(
    num_tasks: int, seed: int = 0, scale: float = 0.05, dtype: torch.dtype = torch.float32
) -> tuple[dict[str, Tensor], list[dict[str, Tensor]]]:
    """θ_0 with a few tensor shapes (+ an int buffer and a never-changed key) and T perturbed copies."""
    g = torch.Generator().manual_seed(seed)
    pre = {
        "blocks.0.attn.weight": torch.randn(12, 8, generator=g, dtype=dtype),
        "blocks.0.attn.bias": torch.randn(12, generator=g, dtype=dtype),
        "blocks.0.ln.frozen": torch.randn(9, generator=g, dtype=dtype),  # unchanged, sorted between merged keys
        "blocks.1.mlp.weight": torch.randn(6, 4, 3, generator=g, dtype=dtype),
        "position_ids": torch.arange(7),
        "text.frozen": torch.randn(5, generator=g, dtype=dtype),
    }
    tasks = []
    for _ in range(num_tasks):
        ft = {}
        for k, v in pre.items():
            if v.is_floating_point() and not k.endswith("frozen"):
                ft[k] = v + scale * torch.randn(v.shape, generator=g, dtype=dtype)
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


def floating_keys(pre: dict[str, Tensor]) -> list[str]:
    """Every floating key, sorted: the reference's `state_dict_to_vector` order (ints excluded here)."""
    return sorted(k for k, v in pre.items() if v.is_floating_point())


# --- AdaMerging's src/ties_merging_utils.py, transcribed line by line (the published TIES) ---------
def topk_values_mask(M: Tensor, K: float = 0.7, return_mask: bool = False):
    if K > 1:
        K /= 100

    original_shape = M.shape
    if M.dim() == 1:
        M = M.unsqueeze(0)

    n, d = M.shape  # noqa: RUF059 - as in the reference
    k = int(d * K)
    k = d - k  # Keep top k elements instead of bottom k elements

    # Find the k-th smallest element by magnitude for each row
    kth_values, _ = M.abs().kthvalue(k, dim=1, keepdim=True)
    # Create a mask tensor with True for the top k elements in each row
    mask = M.abs() >= kth_values
    final_mask = mask.squeeze() if original_shape == M.squeeze().shape else mask

    if return_mask:
        return M * final_mask, final_mask.float().mean(dim=1), final_mask
    return M * final_mask, final_mask.float().mean(dim=1)


def resolve_zero_signs(sign_to_mult: Tensor, method: str = "majority") -> Tensor:
    majority_sign = torch.sign(sign_to_mult.sum())

    if method == "majority":
        sign_to_mult[sign_to_mult == 0] = majority_sign
    elif method == "minority":
        sign_to_mult[sign_to_mult == 0] = -1 * majority_sign
    return sign_to_mult


def resolve_sign(Tensor: Tensor) -> Tensor:
    sign_to_mult = torch.sign(Tensor.sum(dim=0))
    sign_to_mult = resolve_zero_signs(sign_to_mult, "majority")
    return sign_to_mult


def disjoint_merge(Tensor: Tensor, merge_func: str, sign_to_mult: Tensor | None) -> Tensor:
    merge_func = merge_func.split("-")[-1]

    # If sign is provided then we select the corresponding entries and aggregate.
    if sign_to_mult is not None:
        rows_to_keep = torch.where(sign_to_mult.unsqueeze(0) > 0, Tensor > 0, Tensor < 0)
        selected_entries = Tensor * rows_to_keep
    # Else we select all non-zero entries and aggregate.
    else:
        rows_to_keep = Tensor != 0
        selected_entries = Tensor * rows_to_keep

    if merge_func == "mean":
        non_zero_counts = (selected_entries != 0).sum(dim=0).float()
        disjoint_aggs = torch.sum(selected_entries, dim=0) / torch.clamp(non_zero_counts, min=1)
    elif merge_func == "sum":
        disjoint_aggs = torch.sum(selected_entries, dim=0)
    elif merge_func == "max":
        disjoint_aggs = selected_entries.abs().max(dim=0)[0]
        disjoint_aggs *= sign_to_mult
    else:
        raise ValueError(f"Merge method {merge_func} is not defined.")

    return disjoint_aggs


def ties_merging(flat_task_checks: Tensor, reset_thresh: float | None = None, merge_func: str = "") -> Tensor:
    all_checks = flat_task_checks.clone()
    updated_checks, *_ = topk_values_mask(all_checks, K=reset_thresh, return_mask=False)
    final_signs = resolve_sign(updated_checks)
    assert final_signs is not None
    merged_tv = disjoint_merge(updated_checks, merge_func, final_signs)
    return merged_tv
