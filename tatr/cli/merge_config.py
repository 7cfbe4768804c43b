"""`tatr merge --config FILE --out DIR`: a mergekit YAML, merged by tatr's one merge with mergekit's meaning.

The file is read by `tatr.io.mergekit_config` (what each key means, what is refused). Here: the flags that
may go with it (the output's and the memory's; the inputs, method and options come from the file), the
output checks of `tatr merge` (`tatr.cli.merge_output`), one note per place where tatr's arithmetic differs
from mergekit's on purpose, the merge (in memory or out of core, `tatr.core.one_shot.merge_once`), and the
output: a model folder (config and tokenizer copied, shards, a card holding the resolved configuration and
the YAML itself) or one .safetensors file.

Precision: tatr computes in float32 (float64 where a merged tensor is float64) and rounds once to the output
dtype, which is `out_dtype`, else `dtype`, else each tensor's own (an output dtype finer than θ_0's, such as
float32 from a bf16 model, is made in memory: out of core each tensor is rounded to θ_0's dtype as it
streams). mergekit computes in `dtype`, else in the inputs' dtype: with `dtype: float32` the two agree bit
for bit; with bfloat16 arithmetic (mergekit's default for bf16 models) mergekit rounds its sums in bf16 and
differs in the last bits, which is said in one note.
"""

from __future__ import annotations

import contextlib
import resource
import time
from collections.abc import Mapping
from pathlib import Path

import click
import torch
from click.core import ParameterSource

from tatr import __version__
from tatr.cli.merge_output import FILE_SUFFIXES, check_folder_output, merge_target, output_bytes
from tatr.cli.model_card import digests_in_background, model_card
from tatr.core.checkpoints import as_source, header, save_state_dict
from tatr.core.errors import TatrError
from tatr.core.one_shot import merge_once
from tatr.core.outputs import check_output
from tatr.io.mergekit_config import MergeRequest, read_mergekit_config
from tatr.io.model_folder_writer import ShardedFolder, parse_size, write_model_folder

ALONGSIDE = ("config", "out", "shard_size", "low_memory", "memory_budget", "quiet")  # flags --config takes
DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16, "float16": torch.float16}


def merge_from_config(
    config: Path, out: Path, shard_size: str, low_memory: bool | None, budget: int | None, quiet: bool
) -> None:
    """Merge what the mergekit YAML `config` asks for into `out` (a folder, or a .safetensors file)."""
    _check_flags()
    request = read_mergekit_config(config)
    say = (lambda line: None) if quiet else (lambda line: click.echo(f"tatr: note: {line}", err=True))
    base = header(as_source(request.pretrained))
    target = None if (request.out_dtype or request.dtype) is None else DTYPES[request.out_dtype or request.dtype]
    for line in (*request.notes, *precision_notes(request, base)):
        say(line)
    grads = (*(request.gradients or ()), *(request.signed_gradients or ()))
    inputs = [config, request.pretrained, *request.finetuned, *grads]
    folder_out = out.suffix != ".safetensors"
    if folder_out and out.suffix.lower() in FILE_SUFFIXES and not out.is_dir():
        raise TatrError(f"{out}: --out must end in .safetensors (a file) or name a folder (a model folder)")
    need = output_bytes({k: (shape, target or dtype) for k, (shape, dtype) in base.items()})
    if folder_out:
        shard_bytes = parse_size(shard_size)
        tokenizer = check_folder_output(out, request.pretrained, request.tokenizer_from, inputs, need)
    else:
        check_output(out, inputs, suffix=".safetensors", need_bytes=need)
    settings = request.settings()
    metadata = {"tatr": " ".join(f"{k}={v}" for k, v in settings.items())}
    start = time.perf_counter()
    digests = digests_in_background([request.pretrained, *request.finetuned]) if folder_out else None  # for the card
    # streamed (tensor by tensor, never a merged dict) into the file or the folder's shards, unless an output dtype
    # asks for the in-memory rounding
    kind = ("model" if folder_out else "file") if target is None else None
    where = (out, kind, base, request.pretrained, tokenizer if folder_out else None, shard_bytes if folder_out else 0)
    with merge_target(*where, metadata) if kind is not None else contextlib.nullcontext(None) as sink:
        merged, report = merge_once(
            request.pretrained,
            list(request.finetuned),
            method=request.method,
            trust_region=request.trust_region,
            q=request.q,
            lam=request.lam,
            gradients=list(request.gradients) if request.gradients else None,
            signed_gradients=list(request.signed_gradients) if request.signed_gradients else None,
            progress=not quiet,
            options=request.options,
            low_memory=low_memory,
            memory_budget=budget,
            out=sink,
            metadata=metadata,
            note=lambda line: click.echo(f"tatr: {line}", err=True),
            out_dtype=target,
        )
        card = None
        if folder_out:
            mask = None if request.trust_region == "off" else report.mask_stats(request.q)
            yaml_text = config.read_text(encoding="utf-8")
            section = ["## mergekit configuration", "", "```yaml", yaml_text.rstrip("\n"), "```", ""]
            assert digests is not None
            card = model_card(
                request.pretrained, list(request.finetuned), settings, mask, __version__, None, section, digests()
            )
        if isinstance(sink, ShardedFolder):
            sink.card = card  # the folder is committed as the block ends
    if merged is not None:
        if folder_out:
            write_model_folder(out, merged, request.pretrained, tokenizer, shard_bytes, card, metadata)
        else:
            save_state_dict(merged, out, metadata=metadata)
    if not quiet:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
        dropped, n = report.drop_count(request.q), report.num_coordinates
        click.echo(
            f"merged {len(request.finetuned)} models ({request.mergekit_method} as {request.method.name}, trust "
            f"region {request.trust_region}) -> {out}\n  coordinates merged: {n:,}  dropped: {dropped:,}  "
            f"time: {time.perf_counter() - start:.2f}s  peak memory: {peak:,.0f} MiB"
        )


def precision_notes(request: MergeRequest, base: Mapping[str, tuple[tuple[int, ...], torch.dtype]]) -> list[str]:
    """The line saying so when this merge's bits may differ from mergekit's: when mergekit's arithmetic is not
    tatr's (float32, or float64 for a float64 model), e.g. bfloat16, its default for bf16 models."""
    floats = {dtype for _, dtype in _floats(base)}
    tatr = torch.float64 if torch.float64 in floats else torch.float32
    mergekit = [DTYPES[request.dtype]] if request.dtype is not None else sorted(floats, key=str)
    lines = []
    other = sorted({_name(d) for d in mergekit if d != tatr})
    if other:
        lines.append(
            f"mergekit computes this merge in {', '.join(other)}; tatr computes in {_name(tatr)} and rounds once, so "
            f"the two outputs may differ in the last bits (dtype: {_name(tatr)} gives mergekit the same arithmetic)"
        )
    return lines


def _floats(base: Mapping[str, tuple[tuple[int, ...], torch.dtype]]) -> list[tuple[tuple[int, ...], torch.dtype]]:
    return [(shape, dtype) for shape, dtype in base.values() if dtype.is_floating_point]


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _check_flags() -> None:
    """--config gives the inputs, the method and its options: refuse the flags that would say them again."""
    ctx = click.get_current_context()
    given = [
        param.opts[0]
        for param in ctx.command.params
        if param.name not in ALONGSIDE and ctx.get_parameter_source(param.name) == ParameterSource.COMMANDLINE
    ]
    if given:
        raise TatrError(f"--config FILE gives the inputs, method and options; remove {', '.join(given)}")
