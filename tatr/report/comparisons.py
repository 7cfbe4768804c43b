"""Paired comparisons of a table's rows with their reference rows, and the intervals of its means.

Why a module of its own: which row a row is compared with is a fact about the table (a method with
the trust region against the same method without it; every merge against TA; an ablation variant
against the variant the ablation starts from), and the statistics of the comparison are
`tatr.report.paired`'s. This module joins the two on the store's per-example predictions and
leaves the drawing to `tatr.report.render` and `tatr.report.figures`.

Pairing: two rows are paired seed by seed, on the seeds both have, and only where both come from the
same experiment file (one build per seed there, so the same test examples in the same order); rows
of different sources (the main table mixes baselines, sweeps and ablations) are never paired. A pair
where either run lacks predictions (an old store) or the example counts differ has no interval: "–".

Holm's correction runs over the distinct (row, reference) pairs of one table; a difference is marked
where its Holm-corrected bootstrap interval (level 1 − α/(m − k) for the k-th smallest p) excludes 0.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from tatr.core.methods import METHODS
from tatr.core.trust_region import TR_MODES
from tatr.report.labels import method_label, missing
from tatr.report.paired import (
    CONFIDENCE,
    holm,
    holm_confidence,
    level_bootstrap,
    paired_bootstrap,
    seeded_bootstrap,
    sign_flip_p,
)
from tatr.store.predictions import predictions_from_row

FIELDS = ("reference", "delta", "low", "high", "p", "p_holm", "significant", "seeds", "discordant")
METHOD_NOTE = (
    "Δ: paired difference of the average test accuracy (points) from the reference row, with its 95% "
    "bootstrap interval (10,000 resamples of the test examples, stratified by task; rows with several "
    "seeds resample the seeds, then the examples); p: paired sign-flip (permutation) test; p (Holm): "
    "Holm-corrected over the table's {m} comparisons; * where the Holm-corrected interval excludes 0; "
    "– where the store has no per-example predictions for the pair or the rows come from different runs."
)


@dataclass(frozen=True)
class Comparison:
    """One block of columns: each compared row's difference from its reference (`FIELDS`, one row
    per table row that has a reference; rows without one are absent). `discordant` is the fraction of
    test examples on which the two disagree (mean over seeds), what a paired interval's width follows."""

    name: str  # "vs TA", "vs no-TR", …: column headers are "Δ <name>", "p (Holm) <name>"
    frame: pd.DataFrame
    family: int = 0  # how many distinct tested pairs the table's Holm correction ran over


# --- which row is compared with which ----------------------------------------------------------------
def _identity(rows: pd.DataFrame, key: str) -> pd.DataFrame:
    return rows.drop_duplicates(key).set_index(key)[["method", "trust_region", "model_key"]]


def _label_of(ident: pd.DataFrame) -> dict[tuple[str, str, object], str]:
    out = {}
    for label, r in ident.iterrows():
        tr = "off" if missing(r["trust_region"]) else str(r["trust_region"])
        out[(str(r["method"]), tr, r["model_key"])] = str(label)
    return out


def without_tr(rows: pd.DataFrame, key: str) -> dict[str, str]:
    """Each row with a trust region → the same method's row without it (same model), where present."""
    ident = _identity(rows, key)
    labels = _label_of(ident)
    refs = {}
    for label, r in ident.iterrows():
        tr = None if missing(r["trust_region"]) else str(r["trust_region"])
        if tr is None or tr == "off" or tr not in TR_MODES:
            continue
        base = labels.get((str(r["method"]), "off", r["model_key"]))
        if base is not None:
            refs[str(label)] = base
    return refs


def against_ta(rows: pd.DataFrame, key: str) -> dict[str, str]:
    """Every merge row other than TA → TA of the same model (baselines such as Pretrained are not merges)."""
    ident = _identity(rows, key)
    labels = _label_of(ident)
    refs = {}
    for label, r in ident.iterrows():
        if str(r["method"]) not in METHODS:
            continue
        ta = labels.get(("ta", "off", r["model_key"]))
        if ta is not None and ta != str(label):
            refs[str(label)] = ta
    return refs


def against(labels: Sequence[str], reference: str | None) -> dict[str, str]:
    """Every row → one reference row (an ablation's starting variant), where that row is present."""
    if reference is None or reference not in labels:
        return {}
    return {str(lbl): reference for lbl in labels if lbl != reference}


def exemplar_label() -> str:
    """The sensitivity ablation's reference: TA with the full exemplar trust region."""
    return method_label("ta", "exemplar")


def zero_shot_label() -> str:
    """The zero-shot-proxy ablation's reference: TA with the paper's zero-shot trust region (s = |τ|)."""
    return method_label("ta", "zero-shot")


# --- per-example outcomes ----------------------------------------------------------------------------
Outcomes = dict[tuple[str, int], tuple[str, dict[str, np.ndarray]]]  # (row, seed) → (source, task → correct)


def outcomes(rows: pd.DataFrame, key: str) -> Outcomes:
    """(row label, seed) → (its source, task → correct vector) for the runs a table shows; a run any of
    whose tasks lacks predictions is left out (its cells get no interval)."""
    out: Outcomes = {}
    for (label, seed), group in rows.groupby([key, "seed_key"], sort=False):
        source = f"{group['job_type'].iloc[0]}/{group['experiment'].iloc[0]}/{group['study'].iloc[0]}"
        per_task = {}
        for record in group.to_dict("records"):
            p = predictions_from_row(record)
            if p is None:
                break
            per_task[str(record["task"])] = p.correct
        else:
            out[(str(label), int(seed))] = (source, per_task)
    return out


def _stack(per_task: Mapping[str, np.ndarray], tasks: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    parts = [per_task[t] for t in tasks]
    return np.concatenate(parts), np.concatenate([np.full(len(p), i) for i, p in enumerate(parts)])


def _paired(found: Outcomes, row: str, ref: str) -> tuple[list, list, list] | None:
    """Per common seed: (row correct, reference correct, strata), or None where nothing pairs."""
    a_all, b_all, s_all = [], [], []
    seeds = sorted({s for (r, s) in found if r == row} & {s for (r, s) in found if r == ref})
    for seed in seeds:
        (src_a, a), (src_b, b) = found[(row, seed)], found[(ref, seed)]
        if src_a != src_b or set(a) != set(b) or any(len(a[t]) != len(b[t]) for t in a):
            return None
        tasks = sorted(a)
        va, strata = _stack(a, tasks)
        vb, _ = _stack(b, tasks)
        a_all.append(va)
        b_all.append(vb)
        s_all.append(strata)
    return (a_all, b_all, s_all) if seeds else None


def _bootstrap(pair: tuple[list, list, list], confidence: float) -> tuple[float, float, float]:
    a, b, s = pair
    if len(a) == 1:
        return paired_bootstrap(a[0], b[0], s[0], confidence=confidence)
    return seeded_bootstrap(a, b, s, confidence=confidence)


def compare(rows: pd.DataFrame, key: str, blocks: Mapping[str, Mapping[str, str]]) -> list[Comparison]:
    """One `Comparison` per named block of (row → reference) pairs, Holm-corrected over the distinct
    pairs of all blocks together (one table is one family)."""
    found = outcomes(rows, key)
    stats: dict[tuple[str, str], dict[str, object]] = {}
    for refs in blocks.values():
        for row, ref in refs.items():
            if (row, ref) in stats:
                continue
            pair = _paired(found, row, ref)
            if pair is None:
                stats[(row, ref)] = {"reference": ref}
                continue
            delta, low, high = _bootstrap(pair, CONFIDENCE)
            p = sign_flip_p(*pair)
            stats[(row, ref)] = {
                "reference": ref,
                "delta": delta,
                "low": low,
                "high": high,
                "p": p,
                "seeds": len(pair[0]),
                "discordant": float(np.mean([np.mean(a != b) for a, b in zip(pair[0], pair[1], strict=True)])),
                "_pair": pair,
            }
    tested = [k for k, v in stats.items() if "p" in v]
    adjusted = holm([float(stats[k]["p"]) for k in tested])
    levels = holm_confidence([float(stats[k]["p"]) for k in tested])
    for k, p_holm, level in zip(tested, adjusted, levels, strict=True):
        _, low, high = _bootstrap(stats[k].pop("_pair"), float(level))
        stats[k]["p_holm"] = float(p_holm)
        stats[k]["significant"] = bool(low > 0 or high < 0)
    out = []
    for name, refs in blocks.items():
        frame = pd.DataFrame([stats[(row, ref)] for row, ref in refs.items()], index=list(refs))
        out.append(Comparison(name, frame.reindex(columns=list(FIELDS)), len(tested)))
    return out


def n_comparisons(comparisons: Sequence[Comparison]) -> int:
    """How many distinct tested pairs a table's Holm correction ran over."""
    return max((c.family for c in comparisons), default=0)


def level_intervals(
    rows: pd.DataFrame, key: str, index: Sequence[object], tasks: Sequence[str], average: str
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(low, high): the 95% interval of each task's accuracy and of the average, per table row, from
    `level_bootstrap` over the row's seeds; NaN where a row has no predictions."""
    found = outcomes(rows, key)
    columns = [*tasks, average]
    low = pd.DataFrame(np.nan, index=list(index), columns=columns)
    high = low.copy()
    for label in index:
        runs = [v for (r, _), v in sorted(found.items()) if r == str(label)]
        if not runs or any(set(per_task) != set(runs[0][1]) for _, per_task in runs):
            continue
        shown = [t for t in tasks if t in runs[0][1]]
        if not shown:
            continue
        stacked = [_stack(per_task, shown) for _, per_task in runs]
        lo, hi, (avg_lo, avg_hi) = level_bootstrap([c for c, _ in stacked], [s for _, s in stacked])
        low.loc[label, shown] = lo
        high.loc[label, shown] = hi
        if len(shown) == len(runs[0][1]):
            low.at[label, average], high.at[label, average] = avg_lo, avg_hi
    return low, high
