"""Plans: the one builder of a merge plan from (suite, merge config, exemplars), cached by content.

Everything of a merge that does not depend on (q, λ) is a `MergePlan` (`tatr.core.merging`): Σ τ,
the conflict scores Ω and the ranked drop order. Sweeps, ablations, the baselines and `tatr
evaluate` all get their plans here, so they merge the same way:

* The arenas depend only on the checkpoint files, the trust-region mode and the gradient files, so
  one content-addressed cache folder per (mode, gradient files) serves every method, TIES k and
  component selection; sweep workers on one machine share it instead of each streaming the task
  vectors again.
* A `PlanBook` keeps, per process, the exemplar gradients per draw (n, seed, selection) and one loaded
  plan per (method, mode, the options the method reads (TIES k, DARE's p and seed, Breadcrumbs' β and
  density), components, exemplar draw, and the statistics of a method that reads them). λ and λ_neg
  are trial arguments, not part of a plan. A mode's Ω reads the gradient moment its `statistic` names
  (mean |∇ℓ|, mean (∇ℓ)² or the signed mean), so its arenas' folder is keyed by those files.
* Fisher merging and RegMean read per-task statistics at each θ_t: the book asks the suite for them
  once per (kind, `StatisticsConfig` identity) (`tatr.suites.task_statistics.suite_statistics`, cached
  by content under the cache root's `statistics/`) and hands the files to the plan. They change only
  the combine step, so the arenas' folder is the same as every other method's.

A plan loaded from the cache gives the same merges as one built in memory: the arrays are the same,
and the drop order of a lower q extends that of a higher one (ties by ascending index), so which q
a folder was first prepared for does not change a mask.
"""

from __future__ import annotations

import inspect
import time
from pathlib import Path
from typing import Any

from tatr.core.cache import cached_dir, content_hash, default_cache_root
from tatr.core.errors import TatrError
from tatr.core.trust_region import mode_statistic, needs_gradients, reads_signed_gradients, uses_exemplars
from tatr.runs.config import ExemplarConfig, ExperimentConfig, MergeConfig, StatisticsConfig

PLAN_FORMAT = 2  # bump when the cached plan's meaning changes (2: float64 arenas for float64 models)
# Loaded plans a book keeps (least recently used out first): a sweep over a method option (TIES k,
# DARE's p, Breadcrumbs' density) asks for a new plan per trial, each holding its own arenas.
MAX_PLANS = 4


class PlanBook:
    """Per process: the suite's inputs, exemplar gradients per draw, and the plans built from them.

    `config` gives the default exemplar draw (`config.exemplars`); ablation points that vary the
    draw pass their own. `q_min` is the lowest q the plans are ranked for up front (a lower q asked
    later extends the ranking, as Ω is kept). `cache_root` is where the plan folders go (the
    `--cache-dir` of a command), under `sweep-plans/`.
    """

    def __init__(
        self,
        suite: Any,
        config: ExperimentConfig,
        q_min: float = 1.0,
        progress: bool = False,
        cache_root: Path | None = None,
    ) -> None:
        self.suite = suite
        self.cache_root = cache_root  # None: $TATR_CACHE or ~/.cache/tatr, read when a folder is needed
        self.config = config
        self.q_min = q_min
        self.progress = progress
        ckpt = suite.checkpoints()
        self.pretrained = Path(ckpt.pretrained)
        self.finetuned = [Path(ckpt.finetuned[t]) for t in suite.tasks]
        self._grads: dict[tuple[int, int, str], Any] = {}
        self._statistics: dict[str, list[Path]] = {}
        self._plans: dict[tuple, Any] = {}
        self._folders: dict[tuple, Path] = {}

    def gradients(self, exemplars: ExemplarConfig | None = None, squared: bool = False) -> Any:
        """The suite's `ExemplarGradients` of one draw (computed or read from its cache once); `squared`:
        with the mean squared gradients too. The suite gets `selection` and `squared` only where they
        are not their defaults (a plugin suite without them runs every other mode)."""
        ex = exemplars or self.config.exemplars
        memo = (ex.n, ex.seed, ex.selection)
        have = self._grads.get(memo)
        if have is None or (squared and have.sq_mean is None):
            extra = {"selection": ex.selection} if ex.selection != "random" else {}
            extra.update({"squared": True} if squared else {})
            self._check_options(extra)
            self._grads[memo] = self.suite.exemplar_gradients(ex.n, ex.seed, **extra)
        return self._grads[memo]

    def _check_options(self, extra: dict[str, Any]) -> None:
        """One line, before any work, where the suite's `exemplar_gradients` takes no `selection` or `squared`."""
        taken = inspect.signature(self.suite.exemplar_gradients).parameters
        if any(p.kind == p.VAR_KEYWORD for p in taken.values()):
            return
        for name in extra:
            if name not in taken:
                what = "balanced exemplars (exemplars.selection)" if name == "selection" else "mean squared gradients"
                raise TatrError(
                    f"suite '{self.suite.name}' cannot compute {what}: its exemplar_gradients takes no `{name}`"
                )

    def statistics(self, kind: str, statistics: StatisticsConfig | None = None) -> list[Path]:
        """The per-task statistics files of `kind` ("fisher", "gram") in task order, computed by the suite
        or read from its cache once per process; `statistics` defaults to the book's config's."""
        from tatr.suites.task_statistics import suite_statistics

        s = statistics or self.config.statistics
        memo = content_hash(kind, s.identity(kind))
        if memo not in self._statistics:
            options = {"batch_size": s.batch, "cache_root": self.cache_root}
            if kind == "fisher":
                options["estimator"] = s.fisher_estimator
            files = suite_statistics(self.suite, kind, s.n, s.seed, **options)
            self._statistics[memo] = [Path(files[t]) for t in self.suite.tasks]
        return self._statistics[memo]

    def _gradient_files(self, exemplars: ExemplarConfig | None, statistic: str | None = "abs_mean") -> list[Path]:
        """The per-task files of one gradient moment (`tatr.core.gradients.MOMENTS`), in task order."""
        grads = self.gradients(exemplars, squared=statistic == "sq_mean")
        files = getattr(grads, str(statistic))
        return [Path(files[t]) for t in self.suite.tasks]

    def _mode_files(self, mode: str, exemplars: ExemplarConfig | None) -> list[Path] | None:
        """The gradient files `mode`'s Ω reads (`TrustRegionMode.statistic`), None for a mode that reads none."""
        return self._gradient_files(exemplars, mode_statistic(mode)) if needs_gradients(mode) else None

    def folder(self, mode: str, exemplars: ExemplarConfig | None = None) -> Path:
        """The cached arenas of `mode`, built here if no process built them before."""
        from tatr.core.merging import plan_merge
        from tatr.core.trust_region import check_mode

        check_mode(mode)
        grads = self._mode_files(mode, exemplars)
        memo = (mode, None if grads is None else tuple(grads))
        if memo in self._folders:
            return self._folders[memo]
        key = content_hash("sweep-plan", PLAN_FORMAT, self.pretrained, self.finetuned, mode, grads)
        signed = reads_signed_gradients(mode)

        def build(tmp: Path) -> None:
            plan = plan_merge(
                self.pretrained,
                self.finetuned,
                trust_region=mode,
                gradients=None if signed else grads,
                signed_gradients=grads if signed else None,
                progress=self.progress,
            )
            plan.prepare([self.q_min])
            plan.save(tmp)

        root = self.cache_root if self.cache_root is not None else default_cache_root()
        self._folders[memo] = cached_dir(Path(root) / "sweep-plans", key, build)
        return self._folders[memo]

    def get(
        self, merge: MergeConfig, exemplars: ExemplarConfig | None = None, statistics: StatisticsConfig | None = None
    ) -> Any:
        """The plan for one merge configuration and exemplar draw (loaded once per process); a method that
        reads statistics gets the suite's under `statistics` (default: the book's config's)."""
        from tatr.core.components import check_components
        from tatr.core.merging import MergePlan
        from tatr.core.methods import fixed_method
        from tatr.core.vectors import open_task_set

        components = check_components(merge.components)
        ex = exemplars or self.config.exemplars
        draw = (ex.n, ex.seed) if uses_exemplars(merge.trust_region, merge.components) else None
        method = fixed_method(merge.method)
        options = tuple(getattr(merge, name) for name in method.options)  # what this method reads
        kind = method.statistics
        stats = None if kind is None else (statistics or self.config.statistics)
        stats_key = None if stats is None or kind is None else content_hash(kind, stats.identity(kind))
        key = (merge.method, merge.trust_region, options, components, draw, stats_key)
        if key in self._plans:
            self._plans[key] = self._plans.pop(key)  # most recently used last
            return self._plans[key]
        if components is not None and merge.trust_region == "off":
            raise TatrError("components need a trust region: choose a trust-region mode other than 'off'")
        folder = self.folder(merge.trust_region, ex)
        grads = self._mode_files(merge.trust_region, ex)
        signed = self._gradient_files(ex, "signed_mean") if components is not None else None
        if reads_signed_gradients(merge.trust_region):  # the mode's statistic is the signed mean itself
            grads, signed = None, grads
        files = None if kind is None else self.statistics(kind, stats)
        task_set = open_task_set(self.pretrained, self.finetuned, grads, signed)
        plan = MergePlan.load(
            folder,
            task_set,
            method,
            merge.trust_region,
            None,
            components,
            cache_pretrained=True,
            sparsity=merge.options(),  # every method option (checked by the config), the method reads its own
            statistics=files,
        )
        plan.prepare([self.q_min])
        while len(self._plans) >= MAX_PLANS:
            self._plans.pop(next(iter(self._plans)))
        self._plans[key] = plan
        return plan

    def clear(self) -> None:
        """Drop the loaded plans (their arenas), keeping the cache folders: an ablation point uses its
        plan once, and a few dozen CLIP plans would not fit in memory together."""
        self._plans.clear()


def merge_once(
    plans: PlanBook,
    merge: MergeConfig,
    exemplars: ExemplarConfig | None = None,
    statistics: StatisticsConfig | None = None,
) -> tuple[dict, float, dict[str, tuple[int, int]] | None]:
    """The merged state dict, the seconds the merge took, and the mask statistics (None without a mask)."""
    plan = plans.get(merge, exemplars, statistics)
    start = time.perf_counter()
    merged = plan.merged(merge.q, merge.lam, merge.lam_neg)
    seconds = time.perf_counter() - start
    mask = None if merge.trust_region == "off" else plan.mask_stats(merge.q)
    return merged, seconds, mask
