"""The gradient-correlation ablation: Spearman ρ between tasks' mean |gradient| at θ_0.

Why it is its own module: it tunes nothing and merges nothing; it is statistics over the exemplar
gradient files (exact average ranks, as scipy's `spearmanr` computes them, in torch so no extra
dependency is needed), and its rows say so (`subject="gradients"`, one row per task pair).
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from tatr.core.cache import content_hash
from tatr.core.errors import TatrError
from tatr.runs.ablation_spec import AblationSpec
from tatr.runs.config import ExperimentConfig, config_dict
from tatr.store.record import RunRecord, suite_model, write_store
from tatr.store.run_ids import ablation_run_id
from tatr.store.schema import PAIR_SEPARATOR


def average_ranks(values: torch.Tensor) -> torch.Tensor:
    """Ranks 1…N with ties sharing their average rank (Spearman's convention), float64."""
    order = torch.argsort(values, stable=True)
    sorted_values = values[order]
    _, counts = torch.unique_consecutive(sorted_values, return_counts=True)
    ends = torch.cumsum(counts, 0).double()
    average = ends - (counts.double() - 1) / 2  # mean of the 1-based ranks in each tie group
    ranks = torch.empty(values.numel(), dtype=torch.float64)
    ranks[order] = torch.repeat_interleave(average, counts)
    return ranks


def spearman_matrix(vectors: Sequence[torch.Tensor]) -> torch.Tensor:
    """T × T Spearman ρ between flat vectors: Pearson correlation of their average ranks."""
    ranks = torch.stack([average_ranks(v.reshape(-1).float()) for v in vectors])
    centered = ranks - ranks.mean(dim=1, keepdim=True)
    norms = centered.norm(dim=1)
    corr = (centered @ centered.T) / torch.outer(norms, norms)
    return corr.clamp(-1.0, 1.0)


def flat_gradients(files: Sequence[Path], max_coordinates: int, seed: int) -> list[torch.Tensor]:
    """Each task's mean |∇| over the keys all files share, flattened in sorted-key order.

    Above `max_coordinates` coordinates, the same seeded uniform subsample is taken from every
    task (with replacement: a random sample of a million coordinates pins ρ to about ±0.001).
    """
    from tatr.core.checkpoints import load_state_dict

    dicts = [load_state_dict(f) for f in files]
    keys = sorted(set.intersection(*(set(d) for d in dicts)))
    keys = [k for k in keys if dicts[0][k].is_floating_point()]
    if not keys:
        raise TatrError("the gradient files share no floating-point key")
    total = sum(dicts[0][k].numel() for k in keys)
    pick = None
    if total > max_coordinates:
        gen = torch.Generator().manual_seed(seed)
        pick = torch.randint(total, (max_coordinates,), generator=gen)
    out = []
    for d in dicts:
        flat = torch.cat([d[k].reshape(-1).float() for k in keys])
        out.append(flat if pick is None else flat[pick])
    return out


def gradient_correlation(
    suite: Any, config: ExperimentConfig, spec: AblationSpec, root: str | Path, log: Callable[[str], None] = print
) -> None:
    """For each seed, ρ between every pair of tasks' mean |gradient| at θ_0; one row per pair.

    The rows are a `RunRecord` of subject `gradients`: task "a|b", split `train` (the exemplars come
    from the training split) and ρ in the `accuracy` column."""
    tasks = list(suite.tasks)
    n = config.exemplars.n
    for seed in spec.seeds:
        start = time.perf_counter()
        stats = suite.exemplar_gradients(n, seed)
        vectors = flat_gradients([stats.abs_mean[t] for t in tasks], spec.max_coordinates, seed)
        corr = spearman_matrix(vectors)
        pairs = list(itertools.combinations(enumerate(tasks), 2))
        drawn = config.model_copy(
            update={"seed": seed, "exemplars": config.exemplars.model_copy(update={"seed": seed})}
        )
        rec = RunRecord.gradients(
            run_id=ablation_run_id(spec.kind),
            study=config.name,
            config=config_dict(drawn),
            config_hash=content_hash("gradient-correlation", config.benchmark, config.suite, n, seed)[:12],
            model=suite_model(suite),
            correlations={f"{a}{PAIR_SEPARATOR}{b}": float(corr[i, j]) for (i, a), (j, b) in pairs},
            ablation=str(spec.kind),
            timestamp=time.time(),
        )
        write_store(root, rec)
        off = [float(corr[i, j]) for (i, _), (j, _) in pairs]
        log(
            f"gradient correlation n={n} seed={seed}: ρ mean {sum(off) / len(off):.3f}, "
            f"min {min(off):.3f}, max {max(off):.3f} over {vectors[0].numel()} coordinates "
            f"[{time.perf_counter() - start:.1f}s]"
        )
