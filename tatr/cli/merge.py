"""`tatr merge`: merge checkpoint files with TA/TIES/DARE/Breadcrumbs/averaging, with or without the trust region.

A method's options are flags derived from their declarations (`tatr.core.options.Option`): TIES'
`--ties-k`, DARE's `--drop-rate`, `--seed`, Breadcrumbs' `--beta`, `--density`. Each is checked at
the door, in one line: a value out of range, not a number, given to a method that does not read
it (it would be silently ignored otherwise), or a Breadcrumbs density that keeps no coordinate (the
merge would be θ_0). Fisher merging and RegMean read per-task statistics files (`--statistics`, one
per `-f`, in order, as `--gradients`): missing for them, or given to another method, is one line.
"""

from __future__ import annotations

import resource
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import click

from tatr import __version__
from tatr.cli.merge_config import merge_from_config
from tatr.cli.merge_output import FILE_SUFFIXES, check_folder_output, merge_target, numel, output_bytes
from tatr.cli.model_card import digests_in_background, model_card
from tatr.core.checkpoints import as_source, header, read_tensor
from tatr.core.components import COMPONENTS, check_components
from tatr.core.errors import TatrError
from tatr.core.lora import lora_factors
from tatr.core.merge_inputs import check_lam_neg_method, check_numbers
from tatr.core.methods import METHODS, MergeMethod, fixed_method, fixed_methods, option_users
from tatr.core.one_shot import merge_once
from tatr.core.options import OptionValues, all_options, check_options, check_sizes
from tatr.core.outputs import check_output
from tatr.core.trust_region import MODES
from tatr.io.model_folder_writer import DEFAULT_SHARD, ShardedFolder, lora_targets, parse_size, write_lora_folder

if TYPE_CHECKING:
    from collections.abc import Callable


def _budget(text: str) -> int:
    """--memory-budget's bytes, in the units of --out-shard-size (`parse_size`), else one line."""
    try:
        return parse_size(text)
    except TatrError:
        raise TatrError(f"--memory-budget must be a size such as 24GB or 20GiB, got {text!r}") from None


def _option_flags(f: Callable[..., None]) -> Callable[..., None]:
    """One flag per declared method option (`tatr.core.options.Option`: its flag, help and default),
    in declaration order; the text is parsed and checked by the declaration (`_options`)."""
    for option in reversed(all_options()):
        f = click.option(
            option.flag,
            option.name,
            metavar=option.metavar,
            help=f"{option.help} [{option.default:g}{option.unit}].",
        )(f)
    return f


def _components(ctx: click.Context, param: click.Parameter, value: str | None) -> tuple[str, ...] | None:
    if value is None:
        return None
    parts = tuple(p.strip() for p in value.split(",") if p.strip())
    bad = [p for p in parts if p not in COMPONENTS]
    if bad or not parts:
        raise click.BadParameter(f"choose from {', '.join(COMPONENTS)} (comma-separated), got '{value}'")
    return parts


@click.command("merge")
@click.option(
    "--config",
    type=click.Path(path_type=Path),
    default=None,
    help="A mergekit YAML (task_arithmetic, ties, dare_*, breadcrumbs*, linear; a trust_region: block adds TATR): "
    "it gives the inputs, the method and its options, so only --out and the memory and output flags go with it.",
)
@click.option("--pretrained", "-p", type=click.Path(path_type=Path), help="θ_0 checkpoint.")
@click.option("--finetuned", "-f", multiple=True, type=click.Path(path_type=Path), help="θ_t checkpoints.")
@click.option(
    "--method",
    default="ta",
    show_default=True,
    help="Merge method: "
    + "; ".join(f"{n} = {METHODS.get(n).label}" for n in fixed_methods())
    + " (ties-sum is TIES as published: K=20, λ=0.3).",
)
@click.option("--trust-region", "trust_region", default="zero-shot", show_default=True, type=click.Choice(MODES))
@click.option(
    "--gradients", multiple=True, type=click.Path(path_type=Path), help="Per-task mean |∇ℓ| files (exemplar modes)."
)
@click.option(
    "--signed-gradients",
    multiple=True,
    type=click.Path(path_type=Path),
    help="Per-task signed mean gradient files (components).",
)
@click.option(
    "--statistics",
    multiple=True,
    type=click.Path(path_type=Path),
    help="Per-task statistics files, one per -f in order (fisher: diagonal Fishers; regmean: Gram matrices).",
)
@click.option(
    "--components", callback=_components, help="Merge only these parts: orthogonal,positive,negative (comma list)."
)
@click.option("--q", default=0.99, show_default=True, type=float, help="Keep quantile: drops ⌈(1−q)·N⌉ coordinates.")
@click.option("--lam", default=None, type=float, help="Scaling factor λ (default: the method's, 0.3 for TA/TIES).")
@_option_flags
@click.option(
    "--lam-neg",
    "lam_neg",
    metavar="λ_NEG",
    help="With --components including negative and another part: the negative part's own λ (θ0 + λ·rest + λ_neg·neg).",
)
@click.option(
    "--out",
    "-o",
    required=True,
    type=click.Path(path_type=Path),
    help="Output .safetensors file, or a folder: a Hugging Face model folder (config, tokenizer, shards, card).",
)
@click.option(
    "--tokenizer-from",
    "tokenizer_from",
    type=click.Path(path_type=Path),
    default=None,
    help="With --out FOLDER: the model folder whose tokenizer files are copied (default: the -p folder).",
)
@click.option(
    "--out-shard-size",
    "shard_size",
    default=DEFAULT_SHARD,
    show_default=True,
    help="With --out FOLDER: the largest weight shard (5GB, 500MB, 2GiB), as transformers' max_shard_size.",
)
@click.option(
    "--out-format",
    "out_format",
    type=click.Choice(["model", "lora"]),
    default="model",
    show_default=True,
    help="With --out FOLDER: a full model folder, or a PEFT LoRA adapter of the merged update (needs --rank).",
)
@click.option("--rank", type=int, default=None, help="With --out-format lora: the adapter's rank (truncated SVD).")
@click.option(
    "--low-memory/--in-memory",
    "low_memory",
    default=None,
    help="Out of core: the same exact merge without arrays over all coordinates (peak: a few of the largest "
    "tensors), the inputs read once per pass. Default: chosen when the in-memory merge exceeds --memory-budget.",
)
@click.option(
    "--memory-budget",
    "memory_budget",
    metavar="SIZE",
    default=None,
    help="Memory the in-memory merge may use before tatr merges out of core (24GB, 20GiB) [80% of MemAvailable].",
)
@click.option("--quiet", is_flag=True, help="No progress bars or summary.")
def command(
    config: Path | None,
    pretrained: Path | None,
    finetuned: tuple[Path, ...],
    method: str,
    trust_region: str,
    gradients: tuple[Path, ...],
    signed_gradients: tuple[Path, ...],
    statistics: tuple[Path, ...],
    components: tuple[str, ...] | None,
    q: float,
    lam: float | None,
    lam_neg: str | None,
    out: Path,
    tokenizer_from: Path | None,
    shard_size: str,
    out_format: str,
    rank: int | None,
    low_memory: bool | None,
    memory_budget: str | None,
    quiet: bool,
    **flags: str | None,
) -> None:
    """Merge fine-tuned checkpoints into one; OUT gets every key of the pretrained model.

    \b
    Example (zero-shot TATR on task arithmetic):
      tatr merge -p pre.safetensors -f a.safetensors -f b.safetensors --q 0.99 --lam 0.3 -o merged.safetensors
    Flags taking files may also be given once with several paths: --finetuned a.pt b.pt.
    A mergekit configuration instead of -p/-f: tatr merge --config merge.yml --out merged/
    """
    if config is not None:
        budget = None if memory_budget is None else _budget(memory_budget)
        merge_from_config(config, out, shard_size, low_memory, budget, quiet)
        return
    if pretrained is None or not finetuned:
        missing = "'--pretrained' / '-p'" if pretrained is None else "'--finetuned' / '-f'"
        raise click.UsageError(f"missing option {missing} (or --config FILE, a mergekit YAML)")
    merge_method = fixed_method(method)  # an unknown name gets "did you mean" before any work
    check_numbers(q=q, lam=lam)
    options = _options(merge_method, flags)
    merge_method.check_statistics(bool(statistics))
    pretrained, finetuned = _dequantized(pretrained, finetuned, quiet)
    lam_n = None if lam_neg is None else _parse("--lam-neg", lam_neg, float)
    if lam_n is not None:
        check_numbers(lam_neg=lam_n)
        check_lam_neg_method(merge_method, check_components(components))
    base = header(as_source(pretrained))
    check_sizes(merge_method.sparsify, options, (numel(s) for s, d in base.values() if d.is_floating_point))
    inputs = [pretrained, *finetuned, *gradients, *signed_gradients, *statistics]
    folder_out = out.suffix != ".safetensors"
    if folder_out and out.suffix.lower() in FILE_SUFFIXES and not out.is_dir():
        raise TatrError(f"{out}: --out must end in .safetensors (a file) or name a folder (a model folder)")
    if out_format == "lora" and (not folder_out or rank is None or rank < 1):
        raise TatrError("--out-format lora writes a folder: give --out FOLDER and --rank R (R ≥ 1)")
    if rank is not None and out_format != "lora":
        raise TatrError("--rank applies to --out-format lora")
    if folder_out:
        shard_bytes = parse_size(shard_size)
        tokenizer_from = check_folder_output(out, pretrained, tokenizer_from, inputs, output_bytes(base))
    else:
        check_output(out, inputs, suffix=".safetensors", need_bytes=output_bytes(base))
    budget = None if memory_budget is None else _budget(memory_budget)
    settings = f"method={method} trust_region={trust_region} q={q} lam={lam}"
    read = [o.name for o in merge_method.declared_options if o.identity == "read"]  # TIES' k: not written, as before
    settings += "".join(f" {name}={options[name]}" for name in read)
    settings += "" if lam_n is None else f" lam_neg={lam_n}"
    start = time.perf_counter()
    digests = digests_in_background([pretrained, *finetuned]) if folder_out else None  # for the card
    kind = out_format if folder_out else "file"
    where = (out, kind, base, pretrained, tokenizer_from, shard_bytes if folder_out else 0, {"tatr": settings})
    with merge_target(*where) as target:  # the file, the folder's shards, or a LoRA's scratch file: never a dict
        _, plan = merge_once(  # in memory, or out of core (streamed into `target`) past the budget
            pretrained,
            list(finetuned),
            method=method,
            trust_region=trust_region,
            q=q,
            lam=lam,
            lam_neg=lam_n,
            components=components,
            gradients=list(gradients) or None,
            signed_gradients=list(signed_gradients) or None,
            progress=not quiet,
            options=options,
            statistics=list(statistics) or None,
            low_memory=low_memory,
            memory_budget=budget,
            out=target,
            metadata={"tatr": settings},
            note=lambda line: click.echo(f"tatr: {line}", err=True),
        )
        if folder_out:
            mask = None if trust_region == "off" else plan.mask_stats(q)
            config = {"method": method, "trust_region": trust_region, "q": q, "lam": lam or merge_method.default_lam}
            config.update({name: options[name] for name in merge_method.options})
            config.update({} if lam_n is None else {"lam_neg": lam_n})
            assert digests is not None
            card = model_card(pretrained, list(finetuned), config, mask, __version__, digests=digests())
            if isinstance(target, ShardedFolder):
                target.card = card  # the folder is committed as the block ends
            else:
                assert rank is not None and isinstance(target, Path)
                _write_lora(out, target, pretrained, base, rank, card, settings)
    seconds = time.perf_counter() - start
    if not quiet:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
        dropped = plan.drop_count(q)
        n = plan.num_coordinates
        click.echo(
            f"merged {len(finetuned)} tasks ({method}, trust region {trust_region}) -> {out}\n"
            f"  coordinates merged: {n:,}  dropped: {dropped:,} ({100 * dropped / max(n, 1):.3f}%)\n"
            f"  keys: {len(plan.task_set.output_keys)} ({len(plan.space.keys)} merged)  "
            f"time: {seconds:.2f}s  peak memory: {peak:,.0f} MiB",
            err=False,
        )


def _dequantized(pretrained: Path, finetuned: tuple[Path, ...], quiet: bool) -> tuple[Path, tuple[Path, ...]]:
    """GGUF inputs as the plain model folders they dequantize to (cached by sha256, `tatr prepare-lm`'s code),
    with one warning: the weights are the GGUF's quantized approximation, not the original model's."""
    paths = [pretrained, *finetuned]
    if not any(p.suffix.lower() == ".gguf" for p in paths):
        return pretrained, finetuned
    from tatr.suites.causal_lm.model import dequantized

    if not quiet:
        click.echo(
            "tatr: warning: GGUF inputs are merged as their dequantized weights (a quantized approximation)", err=True
        )
    done = [dequantized(p) if p.suffix.lower() == ".gguf" else p for p in paths]
    return done[0], tuple(done[1:])


def _write_lora(out: Path, merged: Path, pretrained: Path, base: dict, rank: int, card: str, settings: str) -> None:
    """The merged update θ − θ_0 of each 2-D module weight as rank-`rank` LoRA factors (PEFT's SVD cut);
    what a LoRA cannot carry (norms, biases, embeddings) is said in one line. `merged`: the merged model's
    file, read a tensor at a time."""
    import torch

    source = as_source(pretrained)
    keys = header(merged)
    targets = {f"{module}.weight" for module in lora_targets(keys, base)}
    factors, left = {}, []
    for key in keys:  # the merge and θ_0 read once per key
        value, theta0 = read_tensor(merged, key), read_tensor(source, key)
        if torch.equal(value, theta0):
            continue
        if key in targets:
            factors[key.removesuffix(".weight")] = lora_factors((value.float() - theta0.float()).to(value.dtype), rank)
        else:
            left.append(key)
    if not factors:
        raise TatrError("the merge moved no 2-D module weight: there is no update a LoRA adapter could hold")
    if left:
        click.echo(f"tatr: note: {len(left)} moved tensors a LoRA cannot hold stay at θ_0 (e.g. {left[0]})", err=True)
    write_lora_folder(out, factors, pretrained, rank, card, {"tatr": settings})


def _options(method: MergeMethod, flags: dict[str, str | None]) -> OptionValues:
    """The method options from their flags, each parsed and checked by its declaration (one line each): a
    number in range, given only to a method that reads it (an option in every identity, TIES' k, is
    taken by every method, as before), then a sparsifier's options together (β + density ≤ 1).
    Returns every option (defaults where not given)."""
    given: dict[str, float | int] = {}
    for option in all_options():
        text = flags.get(option.name)
        if text is None:
            continue
        if option.identity == "read" and option.name not in method.options:
            users = ", ".join(option_users(option.name))
            raise TatrError(f"{option.flag} applies to {users}, not to --method {method.name}")
        given[option.name] = option.parse(text)
    return check_options(given)


def _parse(flag: str, text: str, kind: type) -> float | int:
    try:
        return kind(text)
    except ValueError:
        what = "an integer" if kind is int else "a number"
        raise TatrError(f"{flag} must be {what}, got {text!r}") from None


def _expand_multi(argv: list[str]) -> list[str]:
    """Allow `--finetuned a b c` as well as `-f a -f b -f c` (click options take one value each)."""
    multi = {"--finetuned", "-f", "--gradients", "--signed-gradients", "--statistics"}
    out: list[str] = []
    current: str | None = None
    for arg in argv:
        if arg in multi:
            current = arg
            continue
        if arg.startswith("-"):
            current = None
            out.append(arg)
            continue
        if current is not None:
            out.extend([current, arg])
        else:
            out.append(arg)
    return out


class _MultiValueCommand(click.Command):
    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        return super().parse_args(ctx, _expand_multi(args))


command.__class__ = _MultiValueCommand

if __name__ == "__main__":  # pragma: no cover
    sys.exit(command())
