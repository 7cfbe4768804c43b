"""`tatr merge`: merge checkpoint files with TA/TIES/averaging, with or without the trust region."""

from __future__ import annotations

import resource
import sys
import time
from pathlib import Path

import click

from tatr.core.checkpoints import as_source, header, save_state_dict
from tatr.core.components import COMPONENTS
from tatr.core.merging import check_numbers, plan_merge
from tatr.core.methods import METHODS, get_method
from tatr.core.outputs import check_output
from tatr.core.trust_region import MODES


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
    + "; ".join(f"{n} = {METHODS.get(n).label}" for n in METHODS.names())
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
    out: Path,
    quiet: bool,
) -> None:
    """Merge fine-tuned checkpoints into one; OUT gets every key of the pretrained model.

    \b
    Example (zero-shot TATR on task arithmetic):
      tatr merge -p pre.safetensors -f a.safetensors -f b.safetensors --q 0.99 --lam 0.3 -o merged.safetensors
    Flags taking files may also be given once with several paths: --finetuned a.pt b.pt.
    """
    get_method(method)  # an unknown name gets "did you mean" before any work
    check_numbers(q=q, lam=lam, ties_k=ties_k)
    inputs = [pretrained, *finetuned, *gradients, *signed_gradients]
    check_output(out, inputs, suffix=".safetensors", need_bytes=_output_bytes(pretrained))
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
    )
    plan.prepare([q], release_scores=True)
    merged = plan.merged(q, lam)
    save_state_dict(merged, out, metadata={"tatr": f"method={method} trust_region={trust_region} q={q} lam={lam}"})
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


def _output_bytes(pretrained: Path) -> int:
    """The merged file's size, from θ_0's header: it has every key of θ_0 in its dtype."""
    total = 0
    for shape, dtype in header(as_source(pretrained)).values():
        n = 1
        for s in shape:
            n *= int(s)
        total += n * dtype.itemsize
    return total + (1 << 20)  # the safetensors header and some slack


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
