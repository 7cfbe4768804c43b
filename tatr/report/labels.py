"""What the report calls things: row labels, their order, and the names of published rows.

Why a module of its own: a label is derived from what a row *is* (its merge method, trust-region
mode, model), and each of those owns its display name — `MergeMethod.label` in `tatr.core.methods`,
`TrustRegionMode.label` in `tatr.core.trust_region`, `components_label` in `tatr.core.components`.
This module adds only what is not a merge configuration: the pretrained and individual baselines,
rows stored under older names, the order rows are listed in, the key that identifies a model,
the names a published CSV may use (for methods, and for whose fine-tuned checkpoints a number used), and
what each ablation's table is about (`ABLATION_TITLES`).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping

from tatr.core.methods import METHODS, merge_label
from tatr.core.trust_region import MODES, TR_MODES
from tatr.store.schema import AblationKind

__all__ = [
    "ABLATION_TITLES",
    "DEFAULT_CHECKPOINTS",
    "checkpoints_key",
    "drop_text",
    "label_rank",
    "method_label",
    "method_rank",
    "missing",
    "model_key",
    "options_label",
    "reference_label",
]

# What each ablation's table is about, keyed by kind (`tatr.store.schema.AblationKind`, the one list).
ABLATION_TITLES = {
    AblationKind.COMPONENTS: "Components of the task vectors outside the trust region",
    AblationKind.TRUST_REGION: "Zero-shot vs exemplar trust region",
    AblationKind.SENSITIVITY: "Sensitivity: full, gradient-only, magnitude-only",
    AblationKind.MASK_RATIO: "Mask ratio: average test accuracy against the dropped fraction 1−q",
    AblationKind.EXEMPLAR_COUNT: "Exemplar count: average test accuracy against exemplars per task",
    AblationKind.PLUGIN: "Plug-in: the trust region on each method",
    AblationKind.GRADIENT_CORRELATION: "Spearman correlation between tasks' mean |gradient|",
    AblationKind.BASELINES: "Baselines: each method tuned on validation per testbed build",
    AblationKind.EXEMPLAR_SELECTION: "Exemplar selection: class-balanced against uniformly random exemplars",
    AblationKind.CONFLICT_SCORE: "Conflict score: the paper's Ω against a diagonal Fisher and gradient signs",
    AblationKind.ZERO_SHOT_PROXY: "Zero-shot proxy: |τ| against refinements that need no data",
}

# Rows that are not a merge: θ_0 itself and each task's fine-tuned model, under the names stores use.
_BASELINES = {
    "pretrained": "Pretrained",
    "zeroshot": "Pretrained",
    "zero-shot": "Pretrained",
    "individual": "Individual",
    "finetuned": "Individual",
    "fine-tuned": "Individual",
}
_LEGACY = {"ties": "ties-mean"}  # rows stored before TIES was split: they were the disjoint mean
# Table order: the baselines, then the merge methods in their registration order, then legacy names.
_METHOD_ORDER = [*_BASELINES, *(m.name for m in METHODS.values()), *_LEGACY]


def missing(value: object) -> bool:
    """None or NaN: what a store row holds where a column does not apply."""
    return value is None or (isinstance(value, float) and math.isnan(value))


def method_label(method: object, trust_region: object = None) -> str:
    """'TA', 'TA+TR', 'TIES (dis-sum)+TR (exemplar)', 'Pretrained', … for a store row.

    Merge configurations are labelled by `merge_label` (their method's and mode's own labels);
    this adds the baselines, legacy names, and names no registry knows (shown as stored).
    """
    name = "?" if missing(method) else str(method)
    key = _LEGACY.get(name.lower(), name.lower())
    mode = None if missing(trust_region) else str(trust_region)
    if key in METHODS and (mode is None or mode in TR_MODES):
        return merge_label(key, mode)
    label = METHODS.get(key).label if key in METHODS else _BASELINES.get(key, name)
    if mode is None:
        return label
    return label + (TR_MODES.get(mode).label if mode in TR_MODES else f"+TR ({mode})")


def options_label(method: object, values: Mapping[str, object]) -> str:
    """The options a row's method reads, as their declarations label them (`Option.text`): 'k=20%' for
    TIES, 'p=0.5 seed=0' for DARE, '' for TA or a method no registry knows; unset values are left out."""
    name = "" if missing(method) else _LEGACY.get(str(method).lower(), str(method).lower())
    if name not in METHODS:
        return ""
    options = METHODS.get(name).declared_options
    return " ".join(o.text(values[o.name]) for o in options if not missing(values.get(o.name)))


def method_rank(method: object, trust_region: object) -> tuple[int, int, str]:
    """Sort key: baselines first, then the merge methods, each followed by its trust-region modes."""
    name = "" if missing(method) else str(method).lower()
    m = _METHOD_ORDER.index(name) if name in _METHOD_ORDER else len(_METHOD_ORDER)
    tr = "off" if missing(trust_region) else str(trust_region)
    t = MODES.index(tr) if tr in MODES else len(MODES)
    return (m, t, name)


def label_rank(label: str) -> tuple[int, str]:
    """Sort key for a label alone (curves, whose series are labels): its method's rank, then the text."""
    base = label.split("+", 1)[0]
    known = [method_label(m) for m in _METHOD_ORDER]
    return (known.index(base) if base in known else len(known), label)


def model_key(model: object) -> str | None:
    """'ViT-B/32' and open_clip's 'ViT-B-32' name the same model: compare lower-case alphanumerics."""
    return None if missing(model) else re.sub(r"[^a-z0-9]", "", str(model).lower())


def drop_text(drop: float) -> str:
    """A dropped fraction as a short percentage: 0.0001 → '0.01%'."""
    return f"{100 * drop:.4g}%"


# --- names in a published CSV ----------------------------------------------------------------------
_TA, _AVG = METHODS.get("ta").label, METHODS.get("average").label
_TIES_SUM, _TIES_MEAN = METHODS.get("ties-sum").label, METHODS.get("ties-mean").label
_DARE, _DARE_TIES, _CRUMBS = (METHODS.get(m).label for m in ("dare", "dare-ties", "breadcrumbs"))
_ADA_TASK, _ADA_LAYER = (METHODS.get(m).label for m in ("adamerging-task", "adamerging-layer"))
_TSV, _ISO_C, _ISO_CTS = (METHODS.get(m).label for m in ("tsv-m", "iso-c", "iso-cts"))
_CONSENSUS, _FISHER, _REGMEAN = (METHODS.get(m).label for m in ("consensus-ta", "fisher", "regmean"))
_TR = TR_MODES.get("zero-shot").label
_REFERENCE_ALIASES = {
    "task arithmetic": _TA,
    "task-arithmetic": _TA,
    "ta": _TA,
    # published TIES rows come from AdaMerging's script: the disjoint sum (`ties-sum`); FusionBench's
    # "Ties-Merging" is the same (config ties_merging: merge_func sum, threshold 20)
    "ties": _TIES_SUM,
    "ties-merging": _TIES_SUM,
    "ties merging": _TIES_SUM,
    "ties-sum": _TIES_SUM,
    "ties (dis-sum)": _TIES_SUM,
    "ties-mean": _TIES_MEAN,
    "ties (dis-mean)": _TIES_MEAN,
    "tatr": _TA + _TR,
    "ta+tatr": _TA + _TR,
    "ta+tr": _TA + _TR,
    "task arithmetic+tatr": _TA + _TR,
    "ties+tatr": _TIES_SUM + _TR,
    "ties+tr": _TIES_SUM + _TR,
    # DARE and Breadcrumbs as papers and mergekit name them (mergekit: dare_linear, dare_ties, breadcrumbs)
    "dare": _DARE,
    "ta+dare": _DARE,
    "dare_linear": _DARE,
    "linear dare": _DARE,
    "task arithmetic+dare": _DARE,
    "dare-ties": _DARE_TIES,
    "dare_ties": _DARE_TIES,
    "dare ties": _DARE_TIES,
    "ties+dare": _DARE_TIES,
    "ties-merging+dare": _DARE_TIES,
    "breadcrumbs": _CRUMBS,
    "model breadcrumbs": _CRUMBS,
    "dare+tatr": _DARE + _TR,
    "dare+tr": _DARE + _TR,
    "dare-ties+tatr": _DARE_TIES + _TR,
    "dare-ties+tr": _DARE_TIES + _TR,
    "breadcrumbs+tatr": _CRUMBS + _TR,
    "breadcrumbs+tr": _CRUMBS + _TR,
    "weight averaging": _AVG,
    "weight average": _AVG,
    "simple averaging": _AVG,  # FusionBench
    "simple average": _AVG,
    "averaging": _AVG,
    "average": _AVG,
    # AdaMerging as FusionBench's tables name it
    "task-wise adamerging": _ADA_TASK,
    "layer-wise adamerging": _ADA_LAYER,
    # the SVD merges as their papers (TSV-M: Gargiulo et al. 2025; Iso: Marczak et al. 2025) and
    # FusionBench ("ISO-C", "ISO-CTS") name them; TSV-C is their compression scheme, not a merge
    "tsv-m": _TSV,
    "tsvm": _TSV,
    "tsv": _TSV,
    "tsv-merge": _TSV,
    "iso-c": _ISO_C,
    "iso_c": _ISO_C,
    "iso-cts": _ISO_CTS,
    "iso_cts": _ISO_CTS,
    # consensus merging applied to TA (Wang et al. 2024). Not "TALL masks + TA": that is their
    # compression scheme (one masked model per task, evaluated with its task's mask), not one merge.
    "consensus ta": _CONSENSUS,
    "consensus-ta": _CONSENSUS,
    "consensus task arithmetic": _CONSENSUS,
    "consensus merging": _CONSENSUS,
    # the statistics merges as FusionBench names them. RegMean++ (Nguyen et al. 2025) is another
    # method (it reads the merged model's own activations): it keeps its name.
    "fisher": _FISHER,
    "fisher merging": _FISHER,
    "fisher-merging": _FISHER,
    "fisher_merging": _FISHER,
    "regmean": _REGMEAN,
    "pre-trained": _BASELINES["pretrained"],  # FusionBench's "Pre-trained"
    "fine-tuned (stl)": _BASELINES["individual"],  # FusionBench's single-task fine-tuned row
    **_BASELINES,
}


def reference_label(method: str) -> str:
    """The main table's label for a method as a published CSV names it ('TIES' → 'TIES (dis-sum)')."""
    key = " ".join(str(method).strip().lower().split())
    return _REFERENCE_ALIASES.get(key, str(method).strip())


# --- whose fine-tuned checkpoints a published number used ------------------------------------------
# Published numbers on different fine-tuned encoders are different experiments: FusionBench re-trained
# the eight CLIP encoders (tanganke/clip-vit-*_<task>) and evaluates them with its own pipeline, so its TA
# is not the TATR paper's TA. The report compares one kind only (`reference_table`).
TASK_VECTORS = "task_vectors"  # Ilharco et al.'s release (mlfoundations/task_vectors): TATR and AdaMerging
FUSIONBENCH = "fusionbench"  # FusionBench's re-trained Hugging Face encoders
TALL_MASKS = "tall_masks"  # Wang et al.'s fine-tunes (nik-dim/tall_masks), used by TSV-M, Iso and Consensus
# clip8's paper setups (experiments/clip_vit_*.yaml) load the task_vectors release
DEFAULT_CHECKPOINTS = TASK_VECTORS
_CHECKPOINTS_ALIASES = {
    "taskvectors": TASK_VECTORS,
    "ilharco": TASK_VECTORS,
    "fusionbench": FUSIONBENCH,
    "tanganke": FUSIONBENCH,
    "tallmasks": TALL_MASKS,
    "tallmask": TALL_MASKS,
}


def checkpoints_key(value: object) -> str | None:
    """'task_vectors', 'Task-Vectors' → 'task_vectors'; 'FusionBench', 'fusion_bench' → 'fusionbench';
    another name as its lower-case alphanumerics; None for a blank or missing value."""
    if missing(value):
        return None
    key = re.sub(r"[^a-z0-9]", "", str(value).lower())
    return _CHECKPOINTS_ALIASES.get(key, key) or None
