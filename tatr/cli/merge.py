"""`tatr merge`: merge checkpoint files with TA/TIES/DARE/Breadcrumbs/averaging, with or without the trust region.

The options of DARE (`--drop-rate`, `--seed`) and Breadcrumbs (`--beta`, `--density`) are checked at
the door, each in one line: a value out of range, not a number, given to a method that does not read
it (it would be silently ignored otherwise), or a Breadcrumbs density that keeps no coordinate (the
merge would be θ_0).
"""

from __future__ import annotations

import resource
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import click

from tatr.core.checkpoints import as_source, header, save_state_dict
from tatr.core.components import COMPONENTS, check_components
from tatr.core.errors import TatrError
from tatr.core.merge_inputs import check_lam_neg_method, check_numbers
from tatr.core.merging import plan_merge
from tatr.core.methods import METHODS, fixed_method, fixed_methods, get_method
from tatr.core.outputs import check_output
from tatr.core.sparsify import (
    BREADCRUMBS_BETA,
    BREADCRUMBS_DENSITY,
    DARE_P,
    DARE_SEED,
    Sparsity,
    check_breadcrumbs_keeps,
)
from tatr.core.trust_region import MODES

if TYPE_CHECKING:
    import torch

# flag -> (the merge option it sets, its default, int or float)
SPARSITY_FLAGS = {
    "--drop-rate": ("dare_p", DARE_P, float),
    "--seed": ("dare_seed", DARE_SEED, int),
    "--beta": ("breadcrumbs_beta", BREADCRUMBS_BETA, float),
    "--density": ("breadcrumbs_density", BREADCRUMBS_DENSITY, float),
}


def _components(ctx: click.Context, param: click.Parameter, value: str | None) -> tuple[str, ...] | None:
    if value is None:
        return None
    parts = tuple(p.strip() for p in value.split(",") if p.strip())
    bad = [p for p in parts if p not in COMPONENTS]
    if bad or not parts:
        raise click.BadParameter(f"choose from {', '.join(COMPONENTS)} (comma-separated), got '{value}'")
    return parts


@click.command("merge")
@click.option("--pretrained", "-p", required=True, type=click.Path(path_type=Path), help="θ_0 checkpoint.")
@click.option(
    "--finetuned", "-f", required=True, multiple=True, type=click.Path(path_type=Path), help="θ_t checkpoints."
)
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
    "--components", callback=_components, help="Merge only these parts: orthogonal,positive,negative (comma list)."
)
@click.option("--q", default=0.99, show_default=True, type=float, help="Keep quantile: drops ⌈(1−q)·N⌉ coordinates.")
@click.option("--lam", default=None, type=float, help="Scaling factor λ (default: the method's, 0.3 for TA/TIES).")
@click.option("--ties-k", default=20.0, show_default=True, type=float, help="TIES: keep top-k% magnitudes per task.")
@click.option(
    "--drop-rate",
    "drop_rate",
    metavar="P",
    help=f"DARE: drop each entry of τ_t with probability p in [0, 1) [{DARE_P}].",
)
@click.option(
    "--seed", "seed", metavar="N", help=f"DARE: seed of the per-task masks (same seed, same masks) [{DARE_SEED}]."
)
@click.option(
    "--beta",
    "beta",
    metavar="B",
    help=f"Breadcrumbs: drop the largest β fraction of |τ| per tensor [{BREADCRUMBS_BETA}].",
)
@click.option(
    "--density",
    "density",
    metavar="D",
    help=f"Breadcrumbs: keep this fraction per tensor, in (0, 1], β + density ≤ 1 [{BREADCRUMBS_DENSITY}].",
)
@click.option(
    "--lam-neg",
    "lam_neg",
    metavar="λ_NEG",
    help="With --components including negative and another part: the negative part's own λ (θ0 + λ·rest + λ_neg·neg).",
)
@click.option("--out", "-o", required=True, type=click.Path(path_type=Path), help="Output .safetensors file.")
@click.option("--quiet", is_flag=True, help="No progress bars or summary.")
def command(
    pretrained: Path,
    finetuned: tuple[Path, ...],
    method: str,
    trust_region: str,
    gradients: tuple[Path, ...],
    signed_gradients: tuple[Path, ...],
    components: tuple[str, ...] | None,
    q: float,
    lam: float | None,
    ties_k: float,
    drop_rate: str | None,
    seed: str | None,
    beta: str | None,
    density: str | None,
    lam_neg: str | None,
    out: Path,
    quiet: bool,
) -> None:
    """Merge fine-tuned checkpoints into one; OUT gets every key of the pretrained model.

    \b
    Example (zero-shot TATR on task arithmetic):
      tatr merge -p pre.safetensors -f a.safetensors -f b.safetensors --q 0.99 --lam 0.3 -o merged.safetensors
    Flags taking files may also be given once with several paths: --finetuned a.pt b.pt.
    """
    merge_method = fixed_method(method)  # an unknown name gets "did you mean" before any work
    check_numbers(q=q, lam=lam, ties_k=ties_k)
    options = _sparsity(method, {"--drop-rate": drop_rate, "--seed": seed, "--beta": beta, "--density": density})
    lam_n = None if lam_neg is None else _parse("--lam-neg", lam_neg, float)
    if lam_n is not None:
        check_numbers(lam_neg=lam_n)
        check_lam_neg_method(merge_method, check_components(components))
    base = header(as_source(pretrained))
    if "breadcrumbs_density" in merge_method.options:
        check_breadcrumbs_keeps(
            float(options["breadcrumbs_density"]), (_numel(s) for s, d in base.values() if d.is_floating_point)
        )
    inputs = [pretrained, *finetuned, *gradients, *signed_gradients]
    check_output(out, inputs, suffix=".safetensors", need_bytes=_output_bytes(base))
    start = time.perf_counter()
    plan = plan_merge(
        pretrained,
        list(finetuned),
        method=method,
        trust_region=trust_region,
        ties_k=ties_k,
        components=components,
        gradients=list(gradients) or None,
        signed_gradients=list(signed_gradients) or None,
        progress=not quiet,
        **options,
    )
    plan.prepare([q], release_scores=True)
    merged = plan.merged(q, lam, lam_n)
    settings = f"method={method} trust_region={trust_region} q={q} lam={lam}"
    settings += "".join(f" {name}={value}" for name, value in options.items() if name in merge_method.options)
    settings += "" if lam_n is None else f" lam_neg={lam_n}"
    save_state_dict(merged, out, metadata={"tatr": settings})
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


def _sparsity(method: str, given: dict[str, str | None]) -> dict[str, float | int]:
    """DARE's and Breadcrumbs' options from their flags, checked: each a number in range, given only
    to a method that reads it, β + density ≤ 1. Returns every option (defaults where not given)."""
    reads = get_method(method).options
    values: dict[str, float | int] = {}
    for flag, (name, default, kind) in SPARSITY_FLAGS.items():
        text = given.get(flag)
        if text is not None and name not in reads:
            users = ", ".join(m.name for m in METHODS.values() if name in m.options)
            raise TatrError(f"{flag} applies to {users}, not to --method {method}")
        values[name] = default if text is None else _parse(flag, text, kind)
    Sparsity(**values)  # type: ignore[arg-type]  # ranges and β + density ≤ 1, one line each
    return values


def _parse(flag: str, text: str, kind: type) -> float | int:
    try:
        return kind(text)
    except ValueError:
        what = "an integer" if kind is int else "a number"
        raise TatrError(f"{flag} must be {what}, got {text!r}") from None


def _output_bytes(base: dict[str, tuple[tuple[int, ...], torch.dtype]]) -> int:
    """The merged file's size, from θ_0's header: it has every key of θ_0 in its dtype."""
    total = sum(_numel(shape) * dtype.itemsize for shape, dtype in base.values())
    return total + (1 << 20)  # the safetensors header and some slack


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


def _expand_multi(argv: list[str]) -> list[str]:
    """Allow `--finetuned a b c` as well as `-f a -f b -f c` (click options take one value each)."""
    multi = {"--finetuned", "-f", "--gradients", "--signed-gradients"}
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
