"""Merge time and peak RSS of the per-key combiners (TSV-M, Iso-C, Iso-CTS, Consensus TA, Fisher, RegMean),
as ratios against TA and against FusionBench 0.2.33's algorithms, all measured in the same run.

Every measurement is a process of its own, on the same synthetic checkpoints, back to back:

* **tatr**: `python -m tatr merge --method M --trust-region off|zero-shot --q 0.99 --lam λ` (λ: the
  method's default), reading the files tensor by tensor as any user's merge does; TA first, per T and
  trust-region setting, as the baseline of the "× TA" columns.
* **FusionBench**: FusionBench 0.2.33's algorithm *functions* run on state dicts loaded whole into
  memory, as its `run` methods hold them: θ_0 and every task vector (TSV-M, Iso-C, Iso-CTS: `run`'s
  `state_dict_sub` per model), or θ_0, every θ_t and every task's statistics (Fisher, RegMean), then
  the function, then θ_0 + λ·M, written to a file as tatr's output is. Not its CLI pipeline (Hydra
  configs, model pool, fabric, evaluation): the `fusion_bench` package is not installed here. The
  functions are the line-by-line transcriptions the tests compare tatr against, imported from
  `tests/` (their `# adapted:` edits only let them run on plain dicts of CPU tensors):
  `compute_and_sum_svd_mem_reduction`, `iso_c`, `iso_cts` (tests/test_svd_merges.py), and the merging
  part of `FisherMergingAlgorithm.run` / `RegMeanAlgorithm.run` (`reference_run` of tests/test_fisher.py,
  around `merging_with_fisher_weights` with FusionBench's norm weighting, and of tests/test_regmean.py,
  around `merging_with_regmean_weights`). FusionBench has no consensus merge: its
  row is FusionBench's TALL-mask utilities with the original tall_masks merge, `reference_merge` of
  tests/test_consensus.py, on flattened state dicts as that code works. With the trust region,
  FusionBench's own TATR (`trust_region/clip_task_arithmetic.py`, zero-shot: flatten every task vector,
  O(T²) pairs for Ω, a full sort, `Ω < sorted[⌊qN⌋]`) masks the task vectors first (transcribed below),
  then the method runs on them (θ_t = θ_0 + m ⊙ τ_t for the methods that take models), as the TATR
  paper runs other methods' code on masked task vectors and as tatr masks before its combiners.
  FusionBench's RegMean finds a linear weight by its `<module>.weight` name, so its run sees open_clip's
  `attn.in_proj_weight` renamed `attn.in_proj.weight` (a dict key, no copy); both sides then merge the
  same 4 weights per block by their Gram matrices and average the rest.

The last column is the largest |tatr − FusionBench| over the merged weights: float rounding for the
SVDs (sign ambiguity cancels) and RegMean's solve against FusionBench's inverse; with the trust region
also the few coordinates at the threshold where FusionBench's pairwise float32 Ω and its sort rule
differ from tatr's exact count (docs/method.md#relation-to-fusionbenchs-rule).

Synthetic inputs: θ_0 at open_clip's visual-tower shapes (`bench_merge.visual_shapes`, pretrained=None,
nothing downloaded), θ_t = θ_0 + 1e-3·noise (`bench_merge.write_models`); Fisher files: a positive tensor
per parameter; Gram files: an SPD in×in matrix (diagonal plus rank 16) per block linear weight
(`attn.in_proj_weight`, `attn.out_proj.weight`, `mlp.c_fc.weight`, `mlp.c_proj.weight`, the weights tatr's
suites hook), written with tatr's `save_fisher` / `save_grams` and removed after their method's rows.

Peak memory is each process's own `VmHWM` (`benchmarks/peak_memory.py`). Both sides' times include
interpreter start-up and imports (the FusionBench process also imports pytest and hypothesis through
the test modules: about 10 MB and 0.3 s, negligible at ViT-B/32 size). A FusionBench run whose estimated
peak (`fusionbench_bytes`: at least 2·T·P·4 bytes plus the interpreter) exceeds `--memory-fraction` of
MemAvailable (/proc/meminfo, read just before it) is skipped with a line saying so. A T whose files
would not fit on the work directory's disk ((T + 3)·P·4 bytes plus one method's statistics) stops the run.

    python benchmarks/bench_combiners.py --tasks 8 20 [--methods tsv-m iso-c …] [--trust-regions off zero-shot]
        [--model ViT-B-32] [--blocks K] [--small] [--out FILE.md] [--json FILE] [--log FILE.jsonl]

`--log FILE.jsonl` makes the run resumable (about 2 h at full size on 2 cores): each row is appended as it is
measured, and a rerun with the same file measures only the rows it lacks (a T whose rows are all there
writes no files at all), then renders the table from all of them.

`--blocks K` keeps the stem, the head and the first K residual blocks at their full shapes (as
bench_sparsifiers.py); `--small` is a tiny ViT of the same key names (width 64, 2 blocks), a smoke run.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import re
import shutil
import sys
import tempfile
from collections import OrderedDict
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_merge import ROOT, visual_shapes, write_models  # the merge benchmark's shapes and files
from bench_sparsifiers import first_blocks
from peak_memory import measured

from tatr.core.consensus import CONSENSUS_K, TALL_MASK_LAMBDA  # both sides run tatr's defaults (the references')
from tatr.core.regmean import REDUCE_NON_DIAGONAL_RATIO
from tatr.core.svd_merges import COMMON_SPACE_FRACTION

ENV = dict(os.environ, PYTHONPATH=str(ROOT))

METHODS = ("tsv-m", "iso-c", "iso-cts", "consensus-ta", "fisher", "regmean")
SVD_METHODS = ("tsv-m", "iso-c", "iso-cts")
STATISTICS = {"fisher": "fisher", "regmean": "gram"}
GRAM_WEIGHTS = ("attn.in_proj_weight", "attn.out_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
GRAM_KEY = re.compile(r"resblocks\.\d+\.(?:" + "|".join(map(re.escape, GRAM_WEIGHTS)) + ")$")
INTERPRETER_BYTES = 2**29


# --- synthetic inputs ------------------------------------------------------------------------------------
def small_shapes(width: int = 64, layers: int = 2, patch: int = 4, positions: int = 50, out: int = 32) -> dict:
    """A tiny open_clip-style visual tower: the same key names as ViT-B/32's, small widths."""
    shapes = {
        "class_embedding": (width,),
        "positional_embedding": (positions, width),
        "proj": (width, out),
        "conv1.weight": (width, 3, patch, patch),
        "ln_pre.weight": (width,),
        "ln_pre.bias": (width,),
    }
    for i in range(layers):
        b = f"transformer.resblocks.{i}."
        for name, shape in (
            ("ln_1.weight", (width,)),
            ("ln_1.bias", (width,)),
            ("attn.in_proj_weight", (3 * width, width)),
            ("attn.in_proj_bias", (3 * width,)),
            ("attn.out_proj.weight", (width, width)),
            ("attn.out_proj.bias", (width,)),
            ("ln_2.weight", (width,)),
            ("ln_2.bias", (width,)),
            ("mlp.c_fc.weight", (4 * width, width)),
            ("mlp.c_fc.bias", (4 * width,)),
            ("mlp.c_proj.weight", (width, 4 * width)),
            ("mlp.c_proj.bias", (width,)),
        ):
            shapes[b + name] = shape
    return {**shapes, "ln_post.weight": (width,), "ln_post.bias": (width,)}


def write_statistics(folder: Path, shapes: dict, tasks: int, kind: str, seed: int = 1) -> list[Path]:
    """One statistics file per task: Fisher, a positive tensor per parameter; Gram, an SPD in×in matrix
    (diagonal in [0.5, 1.5] plus a rank-16 A·Aᵀ) per block linear weight [out, in]."""
    from tatr.core.fisher import save_fisher
    from tatr.core.regmean import save_grams

    g = torch.Generator().manual_seed(seed)
    paths = []
    for t in range(tasks):
        path = folder / f"{kind}{t:02d}.safetensors"
        if kind == "fisher":
            save_fisher({k: torch.rand(s, generator=g) * 1e-3 for k, s in shapes.items()}, path, "synthetic", 256)
        else:
            grams = {}
            for k, s in shapes.items():
                if GRAM_KEY.search(k):
                    a = torch.randn(s[1], 16, generator=g) / 4
                    grams[k] = a @ a.T
                    grams[k].diagonal().add_(0.5 + torch.rand(s[1], generator=g))
            save_grams(grams, path, 256)
        paths.append(path)
    return paths


def gram_entries(shapes: dict) -> int:
    return sum(s[1] * s[1] for k, s in shapes.items() if GRAM_KEY.search(k))


# --- FusionBench 0.2.33's TATR, transcribed --------------------------------------------------------------
# FusionBench v0.2.33 (commit 2d147c0c2296403c53d03eca6b59fc07ecf15fb1), MIT License, Copyright (c) 2024
# Anke Tang. fusion_bench/method/trust_region/utils.py::state_dict_to_vector and vector_to_state_dict,
# verbatim (docstrings shortened).
def state_dict_to_vector(state_dict, remove_keys=[]):  # noqa: B006 - as in the reference
    """Convert a state dictionary to a vector. (FusionBench's docstring)"""
    shared_state_dict = copy.deepcopy(state_dict)
    for key in remove_keys:
        if key in shared_state_dict:
            del shared_state_dict[key]
    sorted_shared_state_dict = OrderedDict(sorted(shared_state_dict.items()))
    return nn.utils.parameters_to_vector([value.reshape(-1) for key, value in sorted_shared_state_dict.items()])


def vector_to_state_dict(vector, state_dict, remove_keys=[]):  # noqa: B006 - as in the reference
    """Convert a vector to a state dictionary. (FusionBench's docstring)"""
    # create a reference dict to define the order of the vector
    reference_dict = copy.deepcopy(state_dict)
    for key in remove_keys:
        if key in reference_dict:
            del reference_dict[key]
    sorted_reference_dict = OrderedDict(sorted(reference_dict.items()))

    # create a shared state dict using the reference dict
    nn.utils.vector_to_parameters(vector, sorted_reference_dict.values())

    # add back the encoder and decoder embedding weights.
    if "transformer.shared.weight" in sorted_reference_dict:
        for key in remove_keys:
            sorted_reference_dict[key] = sorted_reference_dict["transformer.shared.weight"]
    return sorted_reference_dict


# trust_region/clip_task_arithmetic.py::TaskArithmeticWithTrustRegionForCLIP.run with zero_shot=True, up
# to the masking, and its compute_vanilla_task_vectors. Adapted: state dicts from files instead of a model
# pool (every θ_t is a trainable parameter here); the masked task vectors are returned as state dicts
# (vector_to_state_dict) for the method that follows, where `run` sums them for task arithmetic.
def fusionbench_masked_task_vectors(pretrained_sd: dict, finetuned_paths: list[str], q: float) -> list[dict]:
    finetuned_sds = {p: load_file(p) for p in finetuned_paths}
    task_vectors = {name: {k: ft[k] - pretrained_sd[k] for k in ft} for name, ft in finetuned_sds.items()}
    del finetuned_sds  # adapted: a local of compute_vanilla_task_vectors, freed when it returns
    task_vectors = {name: state_dict_to_vector(task_vector) for name, task_vector in task_vectors.items()}
    # the task vector is used to estimate the gradient
    all_avg_abs_grads = {name: tv.abs() for name, tv in task_vectors.items()}

    # compute the trust region
    # adapted: next(iter(…)) is fusion_bench.utils.first
    Omega = torch.zeros_like(next(iter(all_avg_abs_grads.values())))

    for i in all_avg_abs_grads:
        for j in all_avg_abs_grads:
            if i != j:
                vector1 = all_avg_abs_grads[i]
                vector2 = torch.abs(task_vectors[j])
                Omega += vector1 * vector2

    values, indices = Omega.sort(descending=False)  # noqa: RUF059 - as the reference
    threshold = values[max(0, min(int(Omega.numel() * q), Omega.numel() - 1))]

    mask = (Omega < threshold).bool()

    # compute the task vectors
    for task in task_vectors:
        task_vectors[task] = task_vectors[task] * mask
    return [vector_to_state_dict(v, pretrained_sd) for v in task_vectors.values()]


# --- the FusionBench process -----------------------------------------------------------------------------
def fusionbench_child(spec: dict) -> None:
    """Load as FusionBench's `run` does, mask with its TATR if asked, run its function, write θ_0 + λ·M."""
    sys.path.insert(0, str(ROOT / "tests"))  # the transcriptions (they import tests/core_helpers)
    method, lam = spec["method"], spec["lam"]
    pre = load_file(spec["pre"])
    if spec["trust_region"] == "off":
        if method in SVD_METHODS:  # run: state_dict_sub(finetuned, pretrained) per model, the model freed
            taus = []
            for path in spec["finetuned"]:
                finetuned = load_file(path)
                taus.append({k: finetuned[k] - pre[k] for k in finetuned})
                del finetuned
        else:
            thetas = [load_file(path) for path in spec["finetuned"]]
    else:
        taus = fusionbench_masked_task_vectors(pre, spec["finetuned"], spec["q"])
        if method not in SVD_METHODS:
            thetas = [{k: pre[k] + tau[k] for k in pre} for tau in taus]
            del taus
    if method in SVD_METHODS:
        import test_svd_merges as fb

        if method == "tsv-m":
            new = fb.compute_and_sum_svd_mem_reduction(taus)
        elif method == "iso-c":
            new = fb.iso_c(taus)
        else:
            new = fb.iso_cts(taus, COMMON_SPACE_FRACTION)
        merged = {k: pre[k] + new[k] * lam for k in pre}  # state_dict_add(pretrained, state_dict_mul(M, λ))
    elif method == "consensus-ta":
        from test_consensus import reference_merge

        merged = reference_merge(pre, thetas, TALL_MASK_LAMBDA, CONSENSUS_K, lam, fold=True)[0]
    elif method == "fisher":
        from test_fisher import reference_run

        assert lam == 1.0, "the Fisher merge itself is λ = 1"
        merged = reference_run(pre, thetas, [load_file(p) for p in spec["statistics"]])
    elif method == "regmean":
        from test_regmean import reference_run

        assert lam == 1.0, "the RegMean merge itself is λ = 1"
        fb_name = lambda k: k.replace(".in_proj_weight", ".in_proj.weight")  # noqa: E731 - see the docstring
        grams = [{fb_name(k)[: -len(".weight")]: v for k, v in load_file(p).items()} for p in spec["statistics"]]
        thetas = [{fb_name(k): v for k, v in theta.items()} for theta in thetas]
        out = reference_run({fb_name(k): v for k, v in pre.items()}, thetas, grams, REDUCE_NON_DIAGONAL_RATIO)
        merged = {k: out[fb_name(k)] for k in pre}
    else:
        raise ValueError(method)
    save_file({k: v.contiguous() for k, v in merged.items()}, spec["out"])


def fusionbench_bytes(method: str, trust_region: str, tasks: int, params: int, grams: int) -> int:
    """Estimated peak of the FusionBench process, in bytes (float32): at least 2·T·P·4, else per method
    θ_0, the loaded dicts and the function's own copies (consensus: 5 flattened [T, P] matrices at once
    in `generate_task_masks`), plus RegMean's T Gram sets; with the trust region FusionBench's TATR stage
    (T dicts, T flat vectors and their |·| at once, Ω, the sort's values and int64 indices); plus about
    0.5 GiB for the interpreter and torch (the small run's processes peak at about 530 MiB)."""
    n = {"consensus-ta": 6 * tasks + 4, "fisher": 2 * tasks + 4}.get(method, tasks + 4) * params
    if method == "regmean":
        n += tasks * grams
    if trust_region != "off":
        n = max(n + (0 if method in SVD_METHODS else tasks * params), (3 * tasks + 6) * params)
    return INTERPRETER_BYTES + 4 * max(n, 2 * tasks * params)


def mem_available() -> int:
    line = next(x for x in Path("/proc/meminfo").read_text().splitlines() if x.startswith("MemAvailable:"))
    return int(line.split()[1]) * 1024


# --- the run ----------------------------------------------------------------------------------------------
def max_abs_diff(a: Path, b: Path) -> float:
    x, y = load_file(a), load_file(b)
    return max(float((x[k].double() - y[k].double()).abs().max()) for k in x)


def lam_of(method: str) -> float:
    from tatr.core.methods import get_method

    return get_method(method).default_lam


def tatr_run(work: Path, ft: list[Path], method: str, tr: str, q: float, stats: list[Path]) -> tuple[float, float]:
    """(seconds, own peak MiB) of `python -m tatr merge` into work/tatr.safetensors."""
    argv = ["-m", "tatr", "merge", "--quiet", "-p", str(work / "pre.safetensors"), "-f", *map(str, ft)]
    argv += ["--method", method, "--trust-region", tr, "--q", str(q), "--lam", str(lam_of(method))]
    argv += ["--statistics", *map(str, stats)] if stats else []
    return measured([*argv, "-o", str(work / "tatr.safetensors")], env=ENV, cwd=ROOT)


def fusionbench_run(work: Path, ft: list[Path], method: str, tr: str, q: float, stats: list[Path]) -> dict:
    """The FusionBench process on the same files: its time, own peak and max |Δ| against tatr's output."""
    spec = {"method": method, "trust_region": tr, "q": q, "lam": lam_of(method), "pre": str(work / "pre.safetensors")}
    spec.update(finetuned=list(map(str, ft)), statistics=list(map(str, stats)))
    spec["out"] = str(work / "fusionbench.safetensors")
    seconds, mib = measured([__file__, "--_fusionbench", json.dumps(spec)], env=ENV, cwd=ROOT)
    diff = max_abs_diff(work / "tatr.safetensors", Path(spec["out"]))
    Path(spec["out"]).unlink()
    return {"fusionbench_seconds": seconds, "fusionbench_peak_mib": mib, "max_abs_diff": diff}


def row_key(row: dict) -> tuple:
    return (row["model"], row["tasks"], row["trust_region"], row["method"])


def logged_rows(path: Path | None) -> dict[tuple, dict]:
    """The rows a `--log` file holds (one JSON object per line), by (model, T, trust region, method); a line
    cut short by a killed run is ignored, so that row is measured again."""
    rows: dict[tuple, dict] = {}
    if path is None or not path.exists():
        return rows
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        rows[row_key(row)] = row
    return rows


def emit(args: argparse.Namespace, row: dict) -> None:
    """Print a measured row and append it to the `--log` file at once, so a stopped run resumes after it."""
    row["load_average"] = round(os.getloadavg()[0], 2)
    print(json.dumps(row), flush=True)
    if args.log is not None:
        with args.log.open("a") as f:
            f.write(json.dumps(row) + "\n")


def run_tasks(args: argparse.Namespace, shapes: dict, tasks: int, common: dict) -> list[dict]:
    """Every row at one T: TA per trust-region setting first, then each method with tatr and FusionBench.
    Rows the `--log` file already holds are taken from it, not measured again (TA's too: the × TA ratios of
    a resumed run divide by the logged TA row, measured in an earlier process; each row keeps its load)."""
    params, grams = common["params"], gram_entries(shapes)
    logged = logged_rows(args.log)
    wanted = [(tr, m) for m in ("ta", *args.methods) for tr in args.trust_regions]
    if all((common["model"], tasks, tr, m) in logged for tr, m in wanted):
        return [logged[common["model"], tasks, tr, m] for tr, m in wanted]
    rows: list[dict] = []
    work = Path(tempfile.mkdtemp(prefix="tatr-bench-combiners-", dir=args.workdir))
    per_task = {"fisher": params, "regmean": grams}
    stats = max((per_task[m] for m in args.methods if m in per_task), default=0)  # one method's files at a time
    disk = 4 * ((tasks + 3) * params + tasks * stats)  # θ_0, the θ_t, two merged outputs, statistics
    if disk > shutil.disk_usage(work).free:
        shutil.rmtree(work, ignore_errors=True)
        raise SystemExit(f"T={tasks} needs about {disk / 2**30:.1f} GiB of disk in {work.parent} (--workdir)")
    try:
        ft = write_models(work, shapes, tasks)
        ta: dict[str, tuple[float, float]] = {}
        for tr in args.trust_regions:
            old = logged.get((common["model"], tasks, tr, "ta"))
            if old is not None:
                ta[tr] = (old["seconds"], old["peak_mib"])
                rows.append(old)
                continue
            ta[tr] = tatr_run(work, ft, "ta", tr, args.q, [])
            rows.append({**common, "tasks": tasks, "trust_region": tr, "method": "ta", "seconds": ta[tr][0]})
            rows[-1].update(peak_mib=ta[tr][1], time_vs_ta=1.0, memory_vs_ta=1.0)
            emit(args, rows[-1])
        for method in args.methods:
            todo = [tr for tr in args.trust_regions if (common["model"], tasks, tr, method) not in logged]
            rows += [logged[common["model"], tasks, tr, method] for tr in args.trust_regions if tr not in todo]
            kind = STATISTICS.get(method)
            stats = write_statistics(work, shapes, tasks, kind) if kind and todo else []
            for tr in todo:
                seconds, mib = tatr_run(work, ft, method, tr, args.q, stats)
                row = {**common, "tasks": tasks, "trust_region": tr, "method": method, "seconds": seconds}
                row.update(peak_mib=mib, time_vs_ta=seconds / ta[tr][0], memory_vs_ta=mib / ta[tr][1])
                need, free = fusionbench_bytes(method, tr, tasks, params, grams), mem_available()
                row["fusionbench_estimate_mib"] = need / 2**20
                if need > args.memory_fraction * free:
                    print(
                        f"skipped: FusionBench's {method} (trust region {tr}) at T={tasks} would need about "
                        f"{need / 2**30:.1f} GiB, more than {args.memory_fraction:g} of MemAvailable "
                        f"({free / 2**30:.1f} GiB)",
                        flush=True,
                    )
                else:
                    row.update(fusionbench_run(work, ft, method, tr, args.q, stats))
                    row["speedup"] = row["fusionbench_seconds"] / seconds
                    row["memory_vs_fusionbench"] = mib / row["fusionbench_peak_mib"]
                rows.append(row)
                emit(args, row)
            for path in stats:
                path.unlink()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="ViT-B-32")
    ap.add_argument("--tasks", type=int, nargs="+", default=[8, 20])
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    ap.add_argument("--trust-regions", nargs="+", default=["off", "zero-shot"], choices=["off", "zero-shot"])
    ap.add_argument("--q", type=float, default=0.99)
    ap.add_argument("--blocks", type=int, default=None, help="keep only the first K residual blocks")
    ap.add_argument("--small", action="store_true", help="a tiny ViT of the same key names (a smoke run)")
    ap.add_argument("--memory-fraction", type=float, default=0.8, help="of MemAvailable a FusionBench run may need")
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--out", type=Path, default=None, help="write the Markdown table here")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument(
        "--log", type=Path, default=None, help="append each row here as measured (JSON lines); a rerun skips them"
    )
    args = ap.parse_args()

    shapes = first_blocks(small_shapes() if args.small else visual_shapes(args.model), args.blocks)
    model = "tiny ViT (--small)" if args.small else args.model
    model += "" if args.blocks is None else f" ({args.blocks} blocks)"
    params = sum(torch.Size(s).numel() for s in shapes.values())
    head = (
        f"{model}: {params / 1e6:.2f}M parameters, {gram_entries(shapes) / 1e6:.2f}M Gram entries per task; "
        f"MemAvailable {mem_available() / 2**30:.1f} GiB; load average {os.getloadavg()[0]:.1f}; "
        f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}"
    )
    print(head, flush=True)
    rows = [r for tasks in args.tasks for r in run_tasks(args, shapes, tasks, {"model": model, "params": params})]
    head += f"; load average at the end {os.getloadavg()[0]:.1f}"
    table = render(rows, head)
    print("\n" + table)
    if args.out:
        args.out.write_text(table + "\n")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


def render(rows: list[dict], head: str) -> str:
    def num(row: dict, key: str, fmt: str) -> str:
        return format(row[key], fmt) if key in row else "—"

    lines = [
        head,
        "",
        "| T | trust region | method | tatr s | × TA | tatr peak MiB | × TA | FusionBench s | FusionBench peak MiB "
        "| speed-up (FusionBench s ÷ tatr s) | memory (tatr ÷ FusionBench) | max abs Δ |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        skipped = "skipped (memory)" if "fusionbench_estimate_mib" in r and "fusionbench_seconds" not in r else "—"
        fb = (
            f"{num(r, 'fusionbench_seconds', '.1f')} | {num(r, 'fusionbench_peak_mib', '.0f')} | "
            f"{num(r, 'speedup', '.2f')}× | {num(r, 'memory_vs_fusionbench', '.2f')}× | {num(r, 'max_abs_diff', '.1e')}"
            if "fusionbench_seconds" in r
            else f"{skipped} | | | |"
        )
        lines.append(
            f"| {r['tasks']} | {r['trust_region']} | {r['method']} | {r['seconds']:.1f} | {r['time_vs_ta']:.2f} | "
            f"{r['peak_mib']:.0f} | {r['memory_vs_ta']:.2f} | {fb} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--_fusionbench":
        fusionbench_child(json.loads(sys.argv[2]))
    else:
        main()
