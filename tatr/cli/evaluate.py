"""`tatr evaluate`: merge one configuration on a benchmark suite and print a per-task table.

    tatr evaluate experiments/testbed.yaml merge.trust_region=exemplar merge.q=0.95 split=test

The configuration (method, trust-region mode, q, λ, split, suite options) comes from the YAML
file plus dotted overrides; `--model pretrained|individual` evaluates θ_0 or each θ_t on its own
task instead of a merge (the two reference rows of every table).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import click

from tatr.core.distributed import is_main
from tatr.core.errors import TatrError
from tatr.core.methods import get_method, uses_ties_k
from tatr.core.registry import unknown_name
from tatr.core.trust_region import uses_exemplars
from tatr.runs.config import ExperimentConfig, config_dict, config_hash, load_config
from tatr.runs.plan import PlanBook
from tatr.runs.tune import test_choice
from tatr.store.record import RunRecord, suite_model, write_store
from tatr.store.run_ids import evaluate_run_id
from tatr.suites import Suite, get_suite
from tatr.suites.evaluation import Evaluation, evaluate_merged, normalized_accuracy


def evaluate_config(
    suite: Suite, config: ExperimentConfig, model: str = "merged", cache_dir: Path | None = None
) -> tuple[Evaluation, dict]:
    """Evaluate the merged model (or θ_0 / the θ_t) of `config`; returns the result and timings.

    A merge goes through the run path (`tatr.runs.plan`, `tatr.runs.tune.test_choice`): its plan
    is cached by content, so another q or λ of the same configuration merges without a new pass."""
    timings: dict[str, float] = {}
    start = time.perf_counter()
    if model == "merged":
        book = PlanBook(suite, config, config.merge.q, cache_root=cache_dir)
        book.get(config.merge)  # the plan (and any gradients): part of the merge's cost
        plan_seconds = time.perf_counter() - start
        tested = test_choice(book, config.merge, split=config.split)
        timings["merge_s"] = plan_seconds + tested.merge_seconds
        timings["evaluate_s"] = tested.eval_seconds
        return tested.evaluation, timings
    if model == "pretrained":
        result = evaluate_merged(suite, None, config.split)
    else:
        individual = suite.individual_accuracy(config.split)
        acc = {t: individual[t] for t in suite.tasks}
        result = Evaluation(config.split, acc, acc, normalized_accuracy(acc, individual))
    timings["evaluate_s"] = time.perf_counter() - start
    return result, timings


def record(
    config: ExperimentConfig, model: str, result: Evaluation, timings: dict[str, float], suite: Suite | None = None
) -> RunRecord:
    """The store record of one `tatr evaluate` run (`job_type="evaluate"`); `suite` names its model."""
    common = {
        "run_id": evaluate_run_id(),
        "job_type": "evaluate",
        "config": config_dict(config),
        "config_hash": config_hash(config),
        "model": suite_model(suite),
        "split": result.split,
        "accuracy": result.accuracy,
        "normalized": result.normalized,
        "eval_seconds": timings.get("evaluate_s"),
        "value": result.mean_accuracy,
        "predictions": result.predictions,
    }
    if model == "merged":
        return RunRecord.merged(merge_seconds=timings.get("merge_s"), **common)
    return RunRecord.reference(subject=model, **common)


def describe(config: ExperimentConfig, model: str) -> str:
    if model != "merged":
        return f"{config.benchmark} · {model} · split={config.split}"
    m = config.merge
    lam = m.lam if m.lam is not None else get_method(m.method).default_lam
    parts = [config.benchmark, m.method, f"trust region {m.trust_region}"]
    if m.trust_region != "off":
        parts.append(f"q={m.q:g}")
    parts.append(f"λ={lam:g}")
    if uses_ties_k(m.method):
        parts.append(f"k={m.ties_k:g}%")
    if uses_exemplars(m.trust_region, m.components):
        parts.append(f"exemplars n={config.exemplars.n} seed={config.exemplars.seed}")
    if m.components is not None:
        parts.append(f"components={','.join(m.components)}")
    parts.append(f"split={config.split}")
    return " · ".join(parts)


def check_benchmark(name: str) -> None:
    """Did-you-mean for an unknown benchmark before anything is imported or built (suites register
    lazily, so the registry alone does not know the names of suites not yet imported)."""
    from tatr.suites import _MODULES, SUITES

    known = set(_MODULES) | set(SUITES.names())
    if name not in known:
        raise TatrError(unknown_name("benchmark", name, known))


@click.command("evaluate")
@click.argument("config_path", metavar="CONFIG", type=click.Path(path_type=Path))
@click.argument("overrides", nargs=-1, metavar="[KEY=VALUE]...")
@click.option(
    "--model",
    type=click.Choice(["merged", "pretrained", "individual"]),
    default="merged",
    show_default=True,
    help="Evaluate the merge, θ_0, or each fine-tuned θ_t on its own task.",
)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of the table.")
@click.option(
    "--root",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Also append the result to the results store <root>/store/ (job_type=evaluate).",
)
@click.option(
    "--cache-dir",
    type=click.Path(path_type=Path),
    default=None,
    help="Cache root for suite builds and gradients (default: $TATR_CACHE or ~/.cache/tatr).",
)
def command(
    config_path: Path,
    overrides: tuple[str, ...],
    model: str,
    as_json: bool,
    root: Path | None,
    cache_dir: Path | None,
) -> None:
    """Evaluate one configuration of CONFIG (a YAML experiment) with dotted KEY=VALUE overrides.

    \b
    Examples:
      tatr evaluate experiments/testbed.yaml
      tatr evaluate experiments/testbed.yaml merge.trust_region=exemplar merge.q=0.95 merge.lam=0.4
      tatr evaluate experiments/testbed.yaml merge.method=ties-sum split=test
      tatr evaluate experiments/testbed.yaml --model pretrained
      tatr evaluate experiments/testbed.yaml split=test --root results
    """
    config = load_config(config_path, overrides)
    if model == "merged":
        get_method(config.merge.method)  # an unknown method fails before any build
    check_benchmark(config.benchmark)
    suite = get_suite(config.benchmark, config.suite, cache_dir)
    result, timings = evaluate_config(suite, config, model, cache_dir)
    if not is_main():  # under torchrun the ranks shared the statistics; one of them writes and prints
        return
    if root is not None:
        write_store(root, record(config, model, result, timings, suite))
    if as_json:
        payload = {
            "config": config_dict(config),
            "config_hash": config_hash(config),
            "model": model,
            "split": result.split,
            "accuracy": result.accuracy,
            "normalized_accuracy": result.normalized,
            "mean_accuracy": result.mean_accuracy,
            "mean_normalized_accuracy": result.mean_normalized,
            "timings": timings,
        }
        click.echo(json.dumps(payload, indent=1))
        return
    click.echo(result.table(describe(config, model)))
    click.echo("  " + "  ".join(f"{k.removesuffix('_s')} {v:.2f}s" for k, v in timings.items()))
