"""Run ids: the one place that says how every kind of run is named in the store (and in W&B).

A run id names one store file (`<root>/store/<run_id>.jsonl`) and one W&B run, so it is a safe name
(`tatr.core.outputs.safe_name`), and its prefix says what wrote it. The formats (tests and readers
of old stores rely on them, so they do not change):

* `tatr evaluate --root`:  `evaluate-<stamp>`
* an ablation point:       `ablation-<kind>-<stamp>`; its grid trials `<point's id>-t<iii>`
  (`grid_trial_run_id`, the trial's index in grid order); the gradient correlation's runs are
  `ablation-gradient-correlation-<stamp>` likewise
* a reference model:       `baseline-<subject>-<stamp>` (subject `pretrained` or `individual`)
* a sweep trial or final:  `<study slug>-t<nnnn>-<digest>` / `<study slug>-final-t<nnnn>-<digest>`,
  deterministic per (study, trial number, start time, job type): a trial re-recorded after a
  crash (`tatr.runs.tracking.reconcile`) maps to the same file, so it never gets two.

`<stamp>` is `new_run_id()`: the local time to the second and 8 random hex digits.
"""

from __future__ import annotations

import hashlib
import re
import time
import uuid


def new_run_id() -> str:
    """A fresh unique stamp, `YYYYmmdd-HHMMSS-<8 hex>`: the id of a run nothing else names."""
    return time.strftime("%Y%m%d-%H%M%S") + "-" + uuid.uuid4().hex[:8]


def evaluate_run_id() -> str:
    """A `tatr evaluate --root` run."""
    return f"evaluate-{new_run_id()}"


def ablation_run_id(kind: str) -> str:
    """An ablation point's test run (or one gradient-correlation draw) of ablation `kind`."""
    return f"ablation-{kind}-{new_run_id()}"


def grid_trial_run_id(point_run_id: str, index: int) -> str:
    """Grid trial `index` (grid order) of the ablation point whose run id is `point_run_id`."""
    return f"{point_run_id}-t{index:03d}"


def baseline_run_id(subject: str) -> str:
    """A reference model's run: θ_0 (`pretrained`) or each θ_t on its own task (`individual`)."""
    return f"baseline-{subject}-{new_run_id()}"


def slug(text: str) -> str:
    """A file- and W&B-safe form of a study name."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-.") or "study"


def sweep_run_id(study: str, number: int, started: object, job_type: str = "trial") -> str:
    """A sweep trial's (`job_type="trial"`) or its final test's (`"final"`) run: deterministic per
    (study, trial number, start time, job type), so a re-run of the same trial maps to the same file."""
    digest = hashlib.sha256(f"{study}|{number}|{started}|{job_type}".encode()).hexdigest()[:8]
    kind = "" if job_type == "trial" else f"{job_type}-"
    return f"{slug(study)[:40]}-{kind}t{number:04d}-{digest}"
