"""tatr: Task Arithmetic in Trust Region (arXiv 2501.15065), exact and streaming.

The public API is the numerical core; it needs only torch and safetensors and works on any
state dict (CLIP, an LLM, a toy MLP):

    from tatr import merge
    merged = merge("pre.safetensors", ["a.safetensors", "b.safetensors"], trust_region="zero-shot", q=0.99, lam=0.3)

The package is laid out by layer; imports point down only (checked by import-linter):

    tatr/cli/      the `tatr` command                          (imports everything below)
    tatr/report/   tables, figures, the HTML page              (the store, the io readers, the core)
    tatr/runs/     plan → tune → record, sweeps, ablations     (configs, suites, store, core)
    tatr/suites/   testbed/, text/, clip8/, sharing base,      (store, io, core; no suite imports another)
                   built_suite and evaluation
    tatr/store/    schema, rows, run ids, the one record type  (io, core)
    tatr/io/       safe YAML and text-file readers             (core's errors)
    tatr/core/     task vectors, trust region, methods and     (torch and safetensors only)
                   their options, merges, files
"""

from tatr.core.adamerging import adamerging  # also registers AdaMerging's method names and labels
from tatr.core.checkpoints import load_state_dict, save_state_dict
from tatr.core.components import COMPONENTS, select_components
from tatr.core.errors import TatrError
from tatr.core.exact_selection import drop_order, kth_largest
from tatr.core.merging import MergePlan, plan_merge
from tatr.core.methods import METHODS, MergeMethod, get_method
from tatr.core.one_shot import merge
from tatr.core.sparsify import Sparsity, breadcrumbs, dare, task_seed
from tatr.core.trust_region import MODES, drop_count, pairwise_conflict
from tatr.core.vectors import ParamSpace, TaskSet, open_task_set

__all__ = [
    "COMPONENTS",
    "METHODS",
    "MODES",
    "MergeMethod",
    "MergePlan",
    "ParamSpace",
    "Sparsity",
    "TaskSet",
    "TatrError",
    "adamerging",
    "breadcrumbs",
    "dare",
    "drop_count",
    "drop_order",
    "get_method",
    "kth_largest",
    "load_state_dict",
    "merge",
    "open_task_set",
    "pairwise_conflict",
    "plan_merge",
    "save_state_dict",
    "select_components",
    "task_seed",
]
__version__ = "0.1.0"
