"""The results store's schema: its columns, their types, the job types and the ablation kinds.

Why a module of its own, importing only the core's declarations: the store (`tatr.store.rows`), the one record type
(`tatr.store.record`) and the report (`tatr.report`) all need these facts, and each must read them
from one place. The report may import this module; it holds no run machinery. A row's display
labels belong to what the row names (`tatr.core.methods.merge_label`, the trust-region modes'
registry, `tatr.core.components.components_label`), not to the schema.

Every row means the same whatever wrote it (a sweep trial or final, an ablation, a baseline,
`tatr evaluate`):

* `experiment`: the experiment file's `name` (always; never the ablation kind);
* `ablation`: the ablation kind (`ABLATION_KINDS`) of an ablation's rows, else null;
* `model`: the suite's model (`suite.model`, e.g. ViT-B-32 on clip8) wherever the suite has one;
* `job_type`: one of `JOB_TYPES`.
"""

from __future__ import annotations

from enum import StrEnum

from tatr.core.errors import TatrError
from tatr.core.methods import METHODS  # noqa: F401  # registers the methods, so every option is declared
from tatr.core.options import all_options
from tatr.core.registry import unknown_name

# The merge options a row holds only where its method reads them (`tatr.core.methods.MergeMethod.options`):
# each declared once (`tatr.core.options.Option`), its column named after it, in declaration order.
METHOD_OPTIONS: tuple[str, ...] = tuple(o.name for o in all_options())

COLUMNS = (
    "run_id",
    "study",
    "trial",
    "job_type",  # see JOB_TYPES
    "experiment",  # the experiment file's name
    "ablation",  # the ablation kind (ABLATION_KINDS), null outside ablations
    "benchmark",
    "model",  # the suite's model (e.g. ViT-B-32 on clip8), so reference numbers are matched per model
    "method",
    "trust_region",
    "q",
    "lam",
    "lam_neg",  # the negative component's own λ (components ablation), null where every part has λ
    *METHOD_OPTIONS,  # ties_k, dare_p, dare_seed, breadcrumbs_beta, breadcrumbs_density
    "components",
    "exemplars",
    "seed",
    "split",
    "task",
    "accuracy",
    "normalized_accuracy",
    "merge_seconds",
    "eval_seconds",
    "git_commit",
    "config_hash",
    "timestamp",
    # per-example predictions (`tatr.store.predictions`), added last so older columns keep their order;
    # null in rows written before them
    "n_examples",
    "correct",  # base64 of the packed "was right" bits, in the suite's fixed example order
    "predicted",  # base64 of the predicted classes (uint8 or uint16), test-split rows only
    # the estimator of the Fisher files a Fisher merge read (`tatr.core.fisher.FISHER_ESTIMATORS`), null for
    # every other row and in rows written before it; the report labels a non-default one
    "fisher_estimator",
    # how the exemplars were drawn (`exemplars.selection`: random, balanced) where the merge read exemplars,
    # null for every other row; null in rows written before it, which drew them at random
    "exemplar_selection",
)
PREDICTION_COLUMNS = ("n_examples", "correct", "predicted")

# the type of each column; anything may also be null (None)
NAMES = ("run_id", "benchmark", "study", "experiment")  # become paths or labels: safe names
TEXT = (
    *("job_type", "ablation", "model", "method", "trust_region", "split", "task", "git_commit", "config_hash"),
    *("correct", "predicted", "fisher_estimator", "exemplar_selection"),
)
INTEGERS = ("trial", "exemplars", "seed", *(o.name for o in all_options() if o.kind is int), "n_examples")
NUMBERS = (
    *("q", "lam", "lam_neg", *(o.name for o in all_options() if o.kind is float)),
    *("accuracy", "normalized_accuracy", "merge_seconds", "eval_seconds", "timestamp"),
)
# The splits a suite evaluates on and configs name (`split`, `tune_split`, `eval_split`): their one list.
SPLITS = ("train", "validation", "test")
PAIR_SEPARATOR = "|"  # a gradient-correlation row's task is "a|b"

# trial, final: a sweep; ablation: a tuned point of an ablation file (its grid trials too);
# baseline: θ_0 or the fine-tuned θ_t (no merge); evaluate: one `tatr evaluate --root` run
JOB_TYPES = ("trial", "final", "ablation", "baseline", "evaluate")


class AblationKind(StrEnum):
    """What the `ablation` column may hold; an ablation file's `ablation.kind` is one of these.

    Members are text (`AblationKind.PLUGIN == "plugin"`), so pandas filters and dict keys take them.
    `BASELINES` is the testbed baselines file (`experiments/baselines/testbed.yaml`): the reference
    rows and TA, TATR and TIES tuned per testbed build seed.
    """

    COMPONENTS = "components"
    TRUST_REGION = "trust-region"
    SENSITIVITY = "sensitivity"
    MASK_RATIO = "mask-ratio"
    EXEMPLAR_COUNT = "exemplar-count"
    PLUGIN = "plugin"
    GRADIENT_CORRELATION = "gradient-correlation"
    BASELINES = "baselines"
    # the checks the paper leaves open (docs/method.md): how exemplars are drawn, other conflict scores,
    # refined zero-shot proxies
    EXEMPLAR_SELECTION = "exemplar-selection"
    CONFLICT_SCORE = "conflict-score"
    ZERO_SHOT_PROXY = "zero-shot-proxy"


ABLATION_KINDS: tuple[str, ...] = tuple(k.value for k in AblationKind)  # the order the report lists them


def check_split(split: object) -> str:
    """A split name, or one line with "did you mean" and the known splits."""
    if split not in SPLITS:
        raise TatrError(unknown_name("split", split, SPLITS))
    return str(split)
