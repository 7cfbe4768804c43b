"""`tatr convert`: turn a fine-tuned CLIP image encoder into open_clip-layout safetensors, once."""

from __future__ import annotations

import click

from tatr.suites.clip8.convert import FORMATS, FROM_PRETRAINED, convert


@click.command("convert")
@click.argument("src", type=click.Path(path_type=str))
@click.argument("out", type=click.Path(path_type=str))
@click.option(
    "--from",
    "fmt",
    type=click.Choice(FORMATS),
    default="auto",
    show_default=True,
    help="Source format: a plain state dict, a task_vectors pickle (whole ImageEncoder), "
    "or a Hugging Face CLIPVisionModel folder/file.",
)
@click.option("--model", default=None, help="open_clip model name (e.g. ViT-B-32) to check keys and shapes against.")
@click.option(
    "--trust-pickle",
    is_flag=True,
    help="Run the pickle's own code (torch.load weights_only=False) when the safe reader cannot "
    "recover the tensors. Only for files you trust. The file is still checked first, without running "
    "anything: damaged files, crafted tensors and TorchScript archives are refused even with this flag.",
)
def command(src: str, out: str, fmt: str, model: str | None, trust_pickle: bool) -> None:
    """Convert SRC (a checkpoint file or HF folder) to OUT.safetensors with open_clip `visual.*` keys.

    Only the image encoder is kept: it is the only tower the CLIP benchmark merges. Pickled
    task_vectors checkpoints are read without running their code; see README, 'Checkpoint formats'.
    OUT must not be SRC (or inside a SRC folder); it is written atomically, after every check.
    """
    converted = convert(src, out, fmt=fmt, model=model, trust_pickle=trust_pickle)
    n = len(converted.state_dict)
    numel = sum(v.numel() for v in converted.state_dict.values())
    click.echo(f"wrote {out}: {n} image-encoder tensors ({numel:,} values), from the {converted.source_format} layout")
    if converted.dropped:
        click.echo(f"  left out {len(converted.dropped)} non-visual keys (e.g. {converted.dropped[0]})")
    if converted.from_pretrained:
        keys = ", ".join(converted.from_pretrained)
        click.echo(f"  {keys}: not in the source (frozen in fine-tuning); taken from θ_0 at load ({FROM_PRETRAINED})")
    if model is None:
        click.echo("  shapes not checked: pass --model (e.g. --model ViT-B-32) to check the architecture")
