"""TSV-M, Iso-C and Iso-CTS: per-key combiners that merge the SVDs of each matrix's task vectors.

Why per-key combiners: each of these methods needs the T task vectors τ_t of one 2-D tensor together
(their SVDs, or the SVD of their sum), never more than one key at a time, so they run in tatr's stream
as a `CombinerKind` (`tatr.core.options.COMBINERS`): `reduce_tasks` hands a combiner the T (masked)
τ_t of a key and it returns that key's merged task vector M; the merge is θ = θ_0 + λ·M, λ applied
outside (λ = 1 by default, FusionBench's `scaling_factor`/`alpha`), on every key, 1-D ones included.

Each follows FusionBench 0.2.33 (tag v0.2.33, commit 2d147c0c2296403c53d03eca6b59fc07ecf15fb1):

* **TSV-M** (Gargiulo et al., 2025), `task_singular_vector/utils/TSVM_utils.py::
  compute_and_sum_svd_mem_reduction`: per task, keep the top r = int(k·(1/T)) singular triplets of
  τ_t (k = min(shape); FusionBench's float product, which is 0 for k = T = 49, not k // T); stack them
  in task order into U (m×k), s (k), Vᵀ (k×n), zero where T·r < k; replace U and Vᵀ by their polar
  factors (SVD, then U·Vᵀ of it) and keep the tasks' singular values: M = polar(U)·diag(s)·polar(Vᵀ).
  Where r = 0 (T > k, or the rounding above) s is all zero, so M = 0: the key stays at θ_0, as in
  FusionBench.
* **Iso-C** (Marczak et al., 2025), `isotropic_merging/iso_utils.py::iso_c`: the SVD of Σ_t τ_t
  (computed, as FusionBench, as the mean times T), every singular value replaced by their mean.
* **Iso-CTS**, `iso_utils.py::iso_cts`: a common subspace (the top singular triplets of Σ_t τ_t) plus,
  per task, the top triplets of the part of τ_t outside it, sized as FusionBench sizes them
  (`iso_cts_sizes`, Python's round-half-to-even included); both bases are replaced by their polar
  factors and every singular value by the mean of all k.

A key gets this treatment when it is 2-D (embeddings and projections included: FusionBench's
`exclude_keys` is empty by default); every other key (biases, norms, convolutions, 0-d scalars) is the
mean of the τ_t, computed as each reference does: TSV-M and Iso-CTS by the running mean
m += (τ_t − m)/(t+1), Iso-C by Σ_t τ_t / T. Integer keys never reach a combiner: tatr copies them from
θ_0.

Deliberate differences from FusionBench, none of which changes a result beyond float rounding where
FusionBench gives one:

* precision: half/bfloat16 τ are computed in float32 and returned in their dtype (FusionBench's TSV-M
  does this for its SVDs; its Iso-C/CTS call `torch.linalg.svd` on them, which fails, on the CPU
  for bfloat16); float32 and float64 are computed in their own dtype, as FusionBench does;
* Iso-CTS projects τ_t off the common subspace as U_c·(U_cᵀ·τ_t), not FusionBench's (U_c·U_cᵀ)·τ_t,
  which forms an m×m matrix (9.8 GB in float32 for CLIP's 49408-token embedding);
* Iso-CTS sizes where round((k − c)/T)·T exceeds k (tiny matrices, or T > k at a small fraction, e.g.
  k = 3, T = 2, fraction 0.1) and FusionBench's slices mismatch, so that it raises: here each task gets
  k // T directions and the common subspace the rest (all k when T > k, i.e. Iso-C's subspace). The
  one such case FusionBench runs through (T = 2k − 1, fraction < 1/k) is followed as it runs
  (`iso_cts_sizes`, `iso_cts`);
* diag(s) products are column scalings (the same products, without a k×k matrix), and Iso-CTS's
  per-task SVDs are skipped when each task gets no direction (FusionBench computes and discards them);
* a float32 SVD that LAPACK does not converge (where FusionBench raises) is computed in float64 and rounded
  back; one that does not converge in float64 either raises a one-line `TatrError` naming the key.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor

from tatr.core.errors import TatrError
from tatr.core.options import COMBINERS, CombinerKind, Option

Combine = Callable[[str, list[Tensor], Tensor, Mapping[str, Any]], Tensor]

COMMON_SPACE_FRACTION = 0.8  # FusionBench config/method/isotropic_merging/iso_cts.yaml

COMMON_SPACE_OPTION = Option(
    "common_space_fraction",
    float,
    COMMON_SPACE_FRACTION,
    "--common-space-fraction",
    "Iso-CTS: fraction of each matrix's rank given to the common subspace of Σ τ_t, in (0, 1)",
    "Iso-CTS common space fraction",
    "common",
    low=0.0,
    high=1.0,
    low_open=True,
    high_open=True,
    metavar="F",
)


def _work_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the SVDs run in: float32 and float64 as given, lower precisions in float32."""
    return dtype if dtype in (torch.float32, torch.float64) else torch.float32


def _svd(key: str, matrix: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The thin SVD (U, s, Vᵀ), as the references' `torch.linalg.svd(…, full_matrices=False)`; where LAPACK's
    float32 divide-and-conquer does not converge (seen on a trust-region-masked ViT-B/32 `c_proj` in Iso-CTS),
    the SVD of the same matrix in float64, rounded back: where the reference raises, the exact answer."""
    try:
        return torch.linalg.svd(matrix, full_matrices=False)
    except torch.linalg.LinAlgError:
        if matrix.dtype != torch.float64:
            try:
                u, s, vh = torch.linalg.svd(matrix.double(), full_matrices=False)
                return u.to(matrix.dtype), s.to(matrix.dtype), vh.to(matrix.dtype)
            except torch.linalg.LinAlgError:
                pass
        raise TatrError(f"key '{key}': the SVD of a {tuple(matrix.shape)} matrix did not converge") from None


def _polar(key: str, matrix: Tensor) -> Tensor:
    """The orthogonal polar factor U·Vᵀ of the SVD U·diag(s)·Vᵀ of `matrix` (the references' step that
    makes a stack of bases orthonormal)."""
    u, _, vh = _svd(key, matrix)
    return u @ vh


def running_mean(taus: list[Tensor]) -> Tensor:
    """m += (τ_t − m)/(t+1): the mean of TSV-M's and Iso-CTS's non-2-D keys, with their rounding."""
    mean = taus[0].clone()
    for i, tau in enumerate(taus[1:], start=1):
        mean += (tau - mean) / (i + 1)
    return mean


def tsv_m(key: str, taus: list[Tensor]) -> Tensor:
    """TSV-M's merged task vector of one key (`compute_and_sum_svd_mem_reduction`)."""
    if taus[0].dim() != 2:
        return running_mean(taus)
    (m, n), like = taus[0].shape, {"dtype": taus[0].dtype, "device": taus[0].device}
    k = min(m, n)
    sv_reduction = 1 / len(taus)  # FusionBench's factor: r = int(k * (1/T)), not k // T
    r = int(k * sv_reduction)
    sum_u, sum_s, sum_vh = torch.zeros(m, k, **like), torch.zeros(k, **like), torch.zeros(k, n, **like)
    for i, tau in enumerate(taus):
        u, s, vh = _svd(key, tau)
        sum_u[:, i * r : (i + 1) * r] = u[:, :r]
        sum_s[i * r : (i + 1) * r] = s[:r]
        sum_vh[i * r : (i + 1) * r, :] = vh[:r, :]
    return (_polar(key, sum_u) * sum_s) @ _polar(key, sum_vh)


def iso_c(key: str, taus: list[Tensor]) -> Tensor:
    """Iso-C's merged task vector of one key (`iso_c`): Σ τ_t with a flat spectrum at its mean."""
    num = len(taus)
    mean = sum(taus) / num
    if mean.dim() != 2:
        return mean
    u, s, vh = _svd(key, mean * num)  # FusionBench scales the mean back up (not Σ τ_t itself)
    return (u * s.mean()) @ vh


def iso_cts_sizes(k: int, num_tasks: int, fraction: float) -> tuple[int, int]:
    """(common subspace size c, directions per task p) of a matrix of rank k, as `iso_cts` sizes them:
    c = int(k·fraction), the task-specific total rounded (half to even) to a multiple of T, c = k − it.

    That total can exceed k (c < 0: tiny matrices or T > k at a small fraction). FusionBench then runs
    only where torch's broadcasting lets its slice assignments through, which is exactly p = 1 with
    T = 2k − 1 (and fraction < 1/k): c = 1 − k is kept, so that `iso_cts` does what FusionBench does
    there. Everywhere else FusionBench raises on a slice mismatch; here each task gets p = k // T
    directions and the common subspace the c = k − T·p left (all k when T > k: Iso-C's subspace)."""
    common = int(k * fraction)
    task_total = round((k - common) / num_tasks) * num_tasks
    common = k - task_total
    per_task = int((k - common) / num_tasks)
    if common < 0 and not (per_task == 1 and k + common <= 1):
        per_task = k // num_tasks
        common = k - per_task * num_tasks
    return common, per_task


def iso_cts(key: str, taus: list[Tensor], fraction: float) -> Tensor:
    """Iso-CTS's merged task vector of one key (`iso_cts`): common plus task-specific subspaces, polar
    bases, a flat spectrum at the mean of their k singular values.

    The bases are assembled as FusionBench assembles them (zeros, then the T task blocks, then the c
    common directions), so that its one c < 0 case (`iso_cts_sizes`) comes out the same: Python's
    `u[:, :c]` keeps the first k + c = 1 − k + k = 1 direction of Σ τ_t to project the tasks off, the
    blocks of tasks k…T−1 and the common block are empty slices, filled by broadcasting one column into
    none, i.e. dropped (only the first k tasks' top direction remains; in a matrix of k rows these k
    directions lie in k − 1 dimensions, so there FusionBench's result, and this one, is rounding noise)."""
    if taus[0].dim() != 2:
        return running_mean(taus)
    (m, n), num = taus[0].shape, len(taus)
    k = min(m, n)
    common, per_task = iso_cts_sizes(k, num, fraction)
    u, s, vh = _svd(key, sum(taus))
    common_u, common_s, common_vh = u[:, :common], s[:common], vh[:common, :]
    space_u, space_s, space_vh = torch.zeros_like(u), torch.zeros_like(s), torch.zeros_like(vh)
    for i, tau in enumerate(taus if per_task > 0 else ()):  # no direction per task: no SVD to compute
        outside = tau - common_u @ (common_u.T @ tau)  # τ_t off the common subspace
        u_t, s_t, vh_t = _svd(key, outside)
        space_u[:, i * per_task : (i + 1) * per_task] = u_t[:, :per_task]
        space_s[i * per_task : (i + 1) * per_task] = s_t[:per_task]
        space_vh[i * per_task : (i + 1) * per_task, :] = vh_t[:per_task, :]
    start = num * per_task  # the common subspace last
    space_u[:, start : start + common] = common_u
    space_s[start : start + common] = common_s
    space_vh[start : start + common, :] = common_vh
    return (_polar(key, space_u) * space_s.mean()) @ _polar(key, space_vh)


def _combiner(merge: Callable[[str, list[Tensor], Mapping[str, Any]], Tensor]) -> Combine:
    """The `CombinerKind.combine` of a merge over taus: in float32 for lower precisions, back in their dtype."""

    def combine(key: str, taus: list[Tensor], theta0: Tensor, values: Mapping[str, Any]) -> Tensor:
        dtype = taus[0].dtype
        work = _work_dtype(dtype)
        merged = merge(key, [t.to(work) for t in taus], values)
        return merged.to(dtype)

    return combine


def _iso_cts_fraction(values: Mapping[str, Any]) -> float:
    return float(COMMON_SPACE_OPTION.check(values.get("common_space_fraction", COMMON_SPACE_FRACTION)))


COMBINERS.add("tsv-m", CombinerKind("tsv-m", _combiner(lambda key, taus, values: tsv_m(key, taus))))
COMBINERS.add("iso-c", CombinerKind("iso-c", _combiner(lambda key, taus, values: iso_c(key, taus))))
COMBINERS.add(
    "iso-cts",
    CombinerKind(
        "iso-cts",
        _combiner(lambda key, taus, values: iso_cts(key, taus, _iso_cts_fraction(values))),
        (COMMON_SPACE_OPTION,),
    ),
)
