"""An LLM merge against its floor and against mergekit 0.1.5: wall time and peak RSS, ~1B parameters, T = 4.

Issue 22, item 5. A synthetic Llama-shaped bf16 model is written as a Hugging Face folder (4 shards and
`model.safetensors.index.json`, a `config.json` that `LlamaForCausalLM` accepts, checked on the meta device,
tied embeddings, a tiny tokenizer so both tools copy one), θ_0 ~ N(0, 0.02²) and T fine-tunes θ_t = θ_0 +
N(0, 0.001²) (seeded), each tensor generated and written one at a time (`tatr.core.streamed_safetensors`), so
the builder holds one tensor, not a model. Then, each as its own process (wall time and its own `VmHWM`,
`benchmarks/peak_memory.py`), on the same folders in the same run:

* **start-up**: a Python process that imports torch and safetensors and exits (the constant of every row);
* **floor**: every tensor of θ_0 and the T fine-tunes read with safetensors' `safe_open`, tensor by tensor,
  and one output of one model's size written (θ_0's tensor, streamed): the least any merge must do;
* **mergekit**: `python -m mergekit.scripts.run_yaml CONFIG OUT --quiet` (the `mergekit-yaml` CLI). Every
  other option is mergekit's default: CPU, `--copy-tokenizer`, `--write-model-card`, `--safe-serialization`,
  no `--lazy-unpickle` (it only changes how pickles are read; the inputs are safetensors), no
  `--low-cpu-memory`, `--out-shard-size 5B`, one write thread, torch's default thread count;
* **tatr**: `python -m tatr merge --config CONFIG --out DIR --quiet`, with `--in-memory` and with
  `--low-memory` (out of core), on mergekit's YAML as it is (trust region off) and with a
  `trust_region: {mode: zero-shot, q: 0.99}` block added (TR). Both sides thus run one configuration.
  TA also by flags, out of core (`-p BASE -f FT… --method ta --lam 0.3 --trust-region off|zero-shot --out DIR
  --low-memory`): that path streams its folder output shard by shard, where `--config` gathers it first.

The two configurations: `task_arithmetic` (weight 1 per model, lambda 0.3: TA with λ = 0.3) and `ties` (weight
1, density 0.2 per model, mergekit's defaults otherwise: normalize true, lambda 1), both with `dtype: float32`
(the arithmetic) and `out_dtype: bfloat16`, with which tatr and mergekit agree bit for bit
(tests/test_mergekit_config.py). The last column checks that: a tatr output without the trust region against
mergekit's, an out-of-core output against the in-memory one, bit for bit, tensor by tensor.

Page cache: after the first read the inputs are in the page cache, so a later row would read them faster
than the first. Before the first row every input file is read once (not measured), so every row sees the
same warm cache; and `sync` runs after each row (not timed), so no row pays for the previous one's dirty
pages. `--drop-caches` (root only) instead runs `sync; echo 3 > /proc/sys/vm/drop_caches` before each row:
every row then reads from disk, as a 7B merge on a 24 GB machine must, whose inputs ((T + 1) · 13.5 GB)
cannot stay cached.

Extrapolation to 7B (P₇ = 6.74e9, Llama-2-7B's parameter count): each row's cost beyond start-up, per
parameter, times P₇, plus start-up: `t₇ = t₀ + (t − t₀)·P₇/P` and `m₇ = m₀ + (m − m₀)·P₇/P`, with (t₀, m₀)
the start-up row. Linear in P holds for what scales with the model (reads, arithmetic, arenas over N, an
output held whole); the out-of-core path's own working set follows the largest tensor instead (2× from
1B's embedding to 7B's), so m₇ overstates it. t₇ assumes warm inputs; see the page cache above.

    python benchmarks/bench_llm_merge.py --small                          # ~20M parameters: proves it runs
    python benchmarks/bench_llm_merge.py --log llm.jsonl --json llm.json  # ~1B, T = 4 (needs ~14 GB disk)
    python benchmarks/bench_llm_merge.py --keep /data/llm1b --only floor 'tatr-ta-*'

`--only` takes row ids or shell patterns (start-up, floor, mergekit-ta, tatr-ties-tr-low, …); `--keep DIR`
builds the models in DIR once and reuses them; `--log FILE.jsonl` appends each row as it is measured, and a
rerun with the same file measures only the rows it lacks (see bench_combiners.py).
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml
from safetensors import safe_open

sys.path.insert(0, str(Path(__file__).resolve().parent))
from peak_memory import RUNNER

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # tests.lm_fixtures' tokenizer
ENV = dict(os.environ, PYTHONPATH=str(ROOT))
P7B = 6.74e9
SHARDS = 4
# (hidden, intermediate, attention heads, key-value heads, vocabulary): TinyLlama-1.1B's widths, and a small one
WIDTHS = {"1b": (2048, 5632, 32, 4, 32000), "small": (256, 688, 8, 2, 32000)}
METHODS = {
    "ta": {"merge_method": "task_arithmetic", "weight": 1.0, "parameters": {"lambda": 0.3}},
    "ties": {"merge_method": "ties", "weight": 1.0, "density": 0.2, "parameters": {}},
}


# --- the synthetic model folders -------------------------------------------------------------------------
def llama_shapes(hidden: int, inter: int, heads: int, kv_heads: int, vocab: int, layers: int) -> dict:
    """LlamaForCausalLM's tensors, tied embeddings (no lm_head), grouped-query attention."""
    kv = hidden // heads * kv_heads
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (vocab, hidden)}
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes |= {p + "self_attn.q_proj.weight": (hidden, hidden), p + "self_attn.k_proj.weight": (kv, hidden)}
        shapes |= {p + "self_attn.v_proj.weight": (kv, hidden), p + "self_attn.o_proj.weight": (hidden, hidden)}
        shapes |= {p + "mlp.gate_proj.weight": (inter, hidden), p + "mlp.up_proj.weight": (inter, hidden)}
        shapes |= {p + "mlp.down_proj.weight": (hidden, inter), p + "input_layernorm.weight": (hidden,)}
        shapes[p + "post_attention_layernorm.weight"] = (hidden,)
    return shapes | {"model.norm.weight": (hidden,)}


def model_spec(params: float, widths: str) -> dict:
    """The layer count whose model is closest to `params` parameters at these widths (at least one layer)."""
    one, two = (sum(map(numel, llama_shapes(*WIDTHS[widths], n).values())) for n in (1, 2))
    layers = max(1, round((params - (2 * one - two)) / (two - one)))
    size = sum(map(numel, llama_shapes(*WIDTHS[widths], layers).values()))
    return {"widths": list(WIDTHS[widths]), "layers": layers, "params": size}


def numel(shape: tuple[int, ...]) -> int:
    return int(torch.Size(shape).numel())


def llama_config(spec: dict) -> dict:
    """A config.json that transformers' LlamaForCausalLM accepts (checked by `check_llama`)."""
    names = ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads", "vocab_size")
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama"}
    config |= dict(zip(names, spec["widths"], strict=True))
    config |= {"num_hidden_layers": spec["layers"], "max_position_embeddings": 2048, "rms_norm_eps": 1e-5}
    config |= {"rope_theta": 10000.0, "hidden_act": "silu", "tie_word_embeddings": True, "torch_dtype": "bfloat16"}
    return config | {"bos_token_id": 1, "eos_token_id": 2}


def shard_keys(shapes: dict) -> list[list[str]]:
    """The keys in order, cut into SHARDS runs of about equal bytes (each run at least one key)."""
    keys, out = list(shapes), []
    left = sum(numel(s) for s in shapes.values())
    for i in range(SHARDS - 1):
        target, run, size = left / (SHARDS - i), [], 0
        while not run or (size < target and len(keys) > SHARDS - 1 - i):
            run.append(keys.pop(0))
            size += numel(shapes[run[-1]])
        out.append(run)
        left -= size
    return [*out, keys]


def write_folder(folder: Path, spec: dict, tensor_of, like: Path | None = None) -> None:
    """One model folder: config, tokenizer (those of `like` when given), SHARDS shards written tensor by
    tensor, the index."""
    from tatr.core.streamed_safetensors import streamed_safetensors
    from tests.lm_fixtures import tiny_tokenizer

    shapes = llama_shapes(*spec["widths"], spec["layers"])
    folder.mkdir(parents=True)
    if like is not None:
        for path in like.iterdir():
            if path.suffix == ".json" and path.name != "model.safetensors.index.json":
                shutil.copy(path, folder / path.name)
    else:
        (folder / "config.json").write_text(json.dumps(llama_config(spec), indent=1))
        (folder / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2}))
        tiny_tokenizer(bos=True).save_pretrained(folder)
    weight_map = {}
    runs = shard_keys(shapes)
    for i, keys in enumerate(runs):
        name = f"model-{i + 1:05d}-of-{len(runs):05d}.safetensors"
        with streamed_safetensors(folder / name, {k: (shapes[k], torch.bfloat16) for k in keys}, {"format": "pt"}) as s:
            for key in keys:
                s.put(key, tensor_of(key, shapes[key]))
                weight_map[key] = name
    index = {"metadata": {"total_size": 2 * spec["params"]}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))


def check_llama(folder: Path) -> None:
    """transformers builds a LlamaForCausalLM from config.json (on the meta device) with exactly our tensors."""
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder))
    theirs = {k: tuple(v.shape) for k, v in model.state_dict().items() if k != "lm_head.weight"}
    with Opened(folder) as opened:
        ours = {k: opened.shape(k) for k in opened.where}
    if theirs != ours or not model.config.tie_word_embeddings:
        raise SystemExit(f"{folder}: not the tensors LlamaForCausalLM expects: {sorted(set(theirs) ^ set(ours))[:3]}")


def is_built(root: Path, spec: dict, tasks: int) -> bool:
    marker = root / "built.json"
    return marker.is_file() and json.loads(marker.read_text()) == {**spec, "tasks": tasks}


def build(root: Path, spec: dict, tasks: int) -> list[Path]:
    """θ_0 in root/base and the fine-tunes in root/ft*, unless root/built.json says they are already there."""
    folders = [root / "base", *(root / f"ft{t}" for t in range(tasks))]
    if is_built(root, spec, tasks):
        return folders
    for folder in folders:
        shutil.rmtree(folder, ignore_errors=True)
    g = torch.Generator().manual_seed(0)
    write_folder(folders[0], spec, lambda key, shape: (0.02 * torch.randn(shape, generator=g)).to(torch.bfloat16))
    check_llama(folders[0])
    with Opened(folders[0]) as base:
        for t, folder in enumerate(folders[1:]):
            write_folder(folder, spec, perturbed(base, torch.Generator().manual_seed(1 + t)), folders[0])
    (root / "built.json").write_text(json.dumps({**spec, "tasks": tasks}))
    return folders


def perturbed(base: Opened, g: torch.Generator):
    """key, shape → θ_0's tensor plus N(0, 0.001²) noise, in bf16."""
    return lambda key, shape: (base.get(key).float() + 1e-3 * torch.randn(shape, generator=g)).to(torch.bfloat16)


class Opened:
    """Every shard of a model folder open with `safe_open`; `get(key)` reads one tensor, `shape(key)` none."""

    def __init__(self, folder: Path) -> None:
        self.where = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
        self.handles = {name: safe_open(str(folder / name), "pt") for name in sorted(set(self.where.values()))}

    def get(self, key: str) -> torch.Tensor:
        return self.handles[self.where[key]].get_tensor(key)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self.handles[self.where[key]].get_slice(key).get_shape())

    def __enter__(self) -> Opened:
        return self

    def __exit__(self, *exc: object) -> None:
        self.handles.clear()


# --- the children ----------------------------------------------------------------------------------------
def floor_child(spec: dict) -> None:
    """Read every tensor of every input, tensor by tensor; write one model's size (θ_0's tensors), streamed."""
    from tatr.core.streamed_safetensors import streamed_safetensors

    models = [Opened(Path(f)) for f in spec["inputs"]]
    base = models[0]
    layout = {k: (base.shape(k), torch.bfloat16) for k in base.where}
    with streamed_safetensors(spec["out"], layout) as out:
        for key in base.where:
            tensors = [m.get(key) for m in models]
            out.put(key, tensors[0])


def run_child(argv: list[str], drop_caches: bool) -> tuple[float, float]:
    """(wall seconds, own peak MiB) of `python argv…`; the page cache dropped before it if asked, synced after."""
    if drop_caches:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", RUNNER, *argv], env=ENV, cwd=ROOT, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    os.sync()
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(argv[:4])}… failed ({proc.returncode}): {proc.stderr.strip()[-1500:]}")
    peak = [line for line in proc.stderr.splitlines() if line.startswith("VmHWM ")][-1]
    return seconds, int(peak.split()[1]) / 1024


def same_bits(a: Path, b: Path) -> bool:
    """Two model folders hold the same tensors, byte for byte, one tensor in memory at a time."""

    def as_index(folder: Path) -> dict[str, Path]:
        files = sorted(folder.glob("*.safetensors"))
        return {k: f for f in files for k in safe_open(str(f), "pt").keys()}  # noqa: SIM118

    ia, ib = as_index(a), as_index(b)
    if set(ia) != set(ib):
        return False
    for key in ia:
        with safe_open(str(ia[key]), "pt") as fa, safe_open(str(ib[key]), "pt") as fb:
            x, y = fa.get_tensor(key), fb.get_tensor(key)
        if x.dtype != y.dtype or not torch.equal(x.reshape(-1).view(torch.uint8), y.reshape(-1).view(torch.uint8)):
            return False
    return True


# --- the rows --------------------------------------------------------------------------------------------
def row_specs() -> list[dict]:
    """Every row, in the order run: start-up, floor, then per configuration mergekit and tatr's four."""
    rows = [{"id": "start-up", "what": "start-up (python, torch)"}, {"id": "floor", "what": "floor (read + write)"}]
    for m in METHODS:
        rows.append({"id": f"mergekit-{m}", "what": "mergekit 0.1.5", "method": m, "trust_region": "off"})
        for tr in ("off", "tr"):
            for path in ("memory", "low"):
                rows.append({"id": f"tatr-{m}-{tr}-{path}", "what": "tatr", "method": m, "trust_region": tr})
                rows[-1]["path"] = "in memory" if path == "memory" else "out of core"
        for tr in ("off", "tr") if m == "ta" else ():  # the same merge by flags: its folder output streams
            rows.append({"id": f"tatr-ta-{tr}-low-flags", "what": "tatr", "method": m, "trust_region": tr})
            rows[-1]["path"] = "out of core, -p/-f"
    return rows


def reference_of(row_id: str) -> str | None:
    """The row whose output this row's output must equal bit for bit, if any."""
    parts = row_id.split("-")
    if parts[0] != "tatr":
        return None
    return (
        f"mergekit-{parts[1]}" if parts[2] == "off" else (f"tatr-{parts[1]}-tr-memory" if parts[3] == "low" else None)
    )


def write_configs(work: Path, folders: list[Path]) -> None:
    """work/configs/{m}.yml (mergekit's configuration) and {m}-tr.yml (the same plus a trust_region block)."""
    (work / "configs").mkdir(exist_ok=True)
    for m, c in METHODS.items():
        entry = {k: c[k] for k in ("weight", "density") if k in c}
        config = {"merge_method": c["merge_method"], "base_model": str(folders[0])}
        config["models"] = [{"model": str(f), "parameters": dict(entry)} for f in folders[1:]]  # no YAML aliases
        config |= {"parameters": c["parameters"], "dtype": "float32", "out_dtype": "bfloat16"}
        (work / "configs" / f"{m}.yml").write_text(yaml.safe_dump(config, sort_keys=False))
        config["trust_region"] = {"mode": "zero-shot", "q": 0.99}
        (work / "configs" / f"{m}-tr.yml").write_text(yaml.safe_dump(config, sort_keys=False))


def argv_of(row: dict, work: Path, folders: list[Path]) -> list[str]:
    out = str(work / "out" / row["id"])
    if row["id"] == "start-up":
        return [__file__, "--_startup"]
    if row["id"] == "floor":
        return [__file__, "--_floor", json.dumps({"inputs": list(map(str, folders)), "out": out + ".safetensors"})]
    m = row["method"]
    if row["what"].startswith("mergekit"):
        return ["-m", "mergekit.scripts.run_yaml", str(work / "configs" / f"{m}.yml"), out, "--quiet"]
    flag = "--in-memory" if row["path"] == "in memory" else "--low-memory"
    if row["id"].endswith("-flags"):  # TA by flags: unit weights, λ = the YAML's lambda, float32 arithmetic
        lam = str(METHODS["ta"]["parameters"]["lambda"])
        region = ["--trust-region", "off" if row["trust_region"] == "off" else "zero-shot", "--q", "0.99"]
        inputs = ["-p", str(folders[0]), "-f", *map(str, folders[1:]), "--method", "ta", "--lam", lam, *region]
        return ["-m", "tatr", "merge", *inputs, "--out", out, "--quiet", flag]
    config = work / "configs" / (f"{m}.yml" if row["trust_region"] == "off" else f"{m}-tr.yml")
    return ["-m", "tatr", "merge", "--config", str(config), "--out", out, "--quiet", flag]


def logged_rows(path: Path | None) -> dict[tuple, dict]:
    """The rows a `--log` file holds by (params, T, cache, id); a line cut short by a killed run is ignored."""
    rows: dict[tuple, dict] = {}
    for line in path.read_text().splitlines() if path is not None and path.exists() else []:
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        rows[row["params"], row["tasks"], row["cache"], row["id"]] = row
    return rows


def warm_up(folders: list[Path]) -> None:
    """Read every input file once, so every row finds them in the page cache."""
    for path in (p for f in folders for p in sorted(f.iterdir())):
        with path.open("rb") as fh:
            while fh.read(1 << 26):
                pass


def measure(args: argparse.Namespace, spec: dict, wanted: list[dict], common: dict) -> list[dict]:
    """Measure the wanted rows the log lacks (building or reusing the models), in order; return every row."""
    logged = logged_rows(args.log)
    key = lambda r: (common["params"], common["tasks"], common["cache"], r["id"])  # noqa: E731
    if all(key(r) in logged for r in wanted):
        return [logged[key(r)] for r in wanted]
    work = args.keep or Path(tempfile.mkdtemp(prefix="tatr-bench-llm-", dir=args.workdir))
    work.mkdir(parents=True, exist_ok=True)
    size, built, rows = 2 * spec["params"], is_built(work, spec, args.tasks), []
    need = ((0 if built else args.tasks + 1) + 2) * size  # the T + 1 inputs unless built, two outputs at a time
    try:
        if need > shutil.disk_usage(work).free:
            inputs = "" if built else f"{args.tasks + 1} inputs and "
            raise SystemExit(
                f"needs {need / 2**30:.1f} GiB free in {work} ({inputs}2 outputs of {size / 2**30:.2f} GiB)"
            )
        print(f"{'reusing' if built else 'building'} the models in {work}", flush=True)
        folders = build(work, spec, args.tasks)
        write_configs(work, folders)
        shutil.rmtree(work / "out", ignore_errors=True)
        (work / "out").mkdir()
        if not args.drop_caches:
            warm_up(folders)
        for i, row in enumerate(wanted):
            if key(row) in logged:
                rows.append(logged[key(row)])
                continue
            seconds, peak = run_child(argv_of(row, work, folders), args.drop_caches)
            row = {**common, **row, "seconds": seconds, "peak_mib": peak}
            ref = reference_of(row["id"])
            if ref is not None and (work / "out" / ref).is_dir():
                row["same_bits_as"] = ref
                row["same_bits"] = same_bits(work / "out" / row["id"], work / "out" / ref)
            later = {reference_of(r["id"]) for r in wanted[i + 1 :]}
            for out in (work / "out").iterdir():
                if out.name not in later:
                    shutil.rmtree(out) if out.is_dir() else out.unlink()
            row["load_average"] = round(os.getloadavg()[0], 2)
            print(json.dumps(row), flush=True)
            if args.log is not None:
                with args.log.open("a") as f:
                    f.write(json.dumps(row) + "\n")
            rows.append(row)
    finally:
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)
        else:
            shutil.rmtree(work / "out", ignore_errors=True)
    return rows


# --- the report ------------------------------------------------------------------------------------------
def render(rows: list[dict], head: str) -> str:
    """The measured table, then the 7B extrapolation (module docstring), both in Markdown."""
    by_id = {r["id"]: r for r in rows}
    start = by_id.get("start-up", {"seconds": 0.0, "peak_mib": 0.0})
    t0, m0, params = start["seconds"], start["peak_mib"], rows[0]["params"]
    columns = "| what | method | trust region | path "
    table = [
        head,
        "",
        columns + "| wall s | peak MiB | × floor | × mergekit | B/param | same bits |",
        "|---" * 10 + "|",
    ]
    extra = ["", "Extrapolated to 7B (P₇ = 6.74e9): t₇ = t₀ + (t − t₀)·P₇/P, m₇ = m₀ + (m − m₀)·P₇/P, (t₀, m₀) "]
    extra[-1] += "the start-up row; the inputs in the page cache (module docstring)."
    if params < 1e8:
        extra[-1] += " At this smoke size start-up and per-tensor overheads dominate: not a prediction."
    extra += ["", columns + "| 7B s | 7B peak GiB | within 80% of 24 GB |", "|---" * 7 + "|"]
    for r in rows:
        base = {"floor": by_id.get("floor"), "mergekit": by_id.get(f"mergekit-{r.get('method')}")}
        times = {
            k: "—" if b is None or r["id"] in ("start-up", "floor") else f"{r['seconds'] / b['seconds']:.2f}"
            for k, b in base.items()
        }
        same = "—" if "same_bits" not in r else f"{'yes' if r['same_bits'] else 'NO'} ({r['same_bits_as']})"
        cells = f"| {r['what']} | {r.get('method', '—')} | {r.get('trust_region', '—')} | {r.get('path', '—')} "
        table.append(
            f"{cells}| {r['seconds']:.1f} | {r['peak_mib']:.0f} | {times['floor']} | {times['mergekit']} "
            f"| {r['peak_mib'] * 2**20 / params:.2f} | {same} |"
        )
        if r["id"] != "start-up":
            t7 = t0 + (r["seconds"] - t0) * P7B / params
            m7 = (m0 + (r["peak_mib"] - m0) * P7B / params) * 2**20
            extra.append(f"{cells}| {t7:.0f} | {m7 / 2**30:.1f} | {'yes' if m7 <= 0.8 * 24e9 else 'no'} |")
    return "\n".join(table + extra)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--params", type=float, default=1e9, help="model size in parameters [1e9]")
    ap.add_argument("--tasks", type=int, default=4)
    ap.add_argument("--small", action="store_true", help="a ~20M-parameter model (hidden 256): a smoke run")
    ap.add_argument("--only", nargs="+", default=None, help="row ids or patterns (start-up, floor, mergekit-ta, …)")
    ap.add_argument("--keep", type=Path, default=None, help="build the models here once and reuse them")
    ap.add_argument("--workdir", type=Path, default=None, help="where the temporary folder goes (without --keep)")
    ap.add_argument("--drop-caches", action="store_true", help="drop the page cache before each row (root)")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--log", type=Path, default=None, help="append rows here (JSON lines); a rerun skips them")
    args = ap.parse_args()
    if args.drop_caches and os.geteuid() != 0:
        raise SystemExit("--drop-caches writes /proc/sys/vm/drop_caches, which needs root")
    if args.tasks < 2:
        raise SystemExit("--tasks must be at least 2")
    spec = model_spec(2e7 if args.small else args.params, "small" if args.small else "1b")
    wanted = [r for r in row_specs() if args.only is None or any(fnmatch.fnmatch(r["id"], p) for p in args.only)]
    if not wanted:
        raise SystemExit(f"--only matches no row (rows: {', '.join(r['id'] for r in row_specs())})")
    common = {"params": spec["params"], "tasks": args.tasks, "cache": "dropped" if args.drop_caches else "warm"}
    avail = next(x for x in Path("/proc/meminfo").read_text().splitlines() if x.startswith("MemAvailable:"))
    head = (
        f"Llama-shaped bf16, {spec['params'] / 1e6:.1f}M parameters ({spec['layers']} layers, "
        f"hidden {spec['widths'][0]}, tied embeddings, {SHARDS} shards), T = {args.tasks}; "
        f"page cache {common['cache']}; "
        f"MemAvailable {int(avail.split()[1]) / 2**20:.1f} GiB; load average {os.getloadavg()[0]:.1f}; "
        f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}"
    )
    print(head, flush=True)
    rows = measure(args, spec, wanted, common)
    table = render(rows, head + f"; load average at the end {os.getloadavg()[0]:.1f}")
    print("\n" + table)
    if args.json:
        args.json.write_text(json.dumps({"spec": spec, "rows": rows}, indent=1))


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--_floor":
        floor_child(json.loads(sys.argv[2]))
    elif len(sys.argv) > 1 and sys.argv[1] == "--_startup":
        import safetensors.torch  # noqa: F401 - the start-up row measures these imports
    else:
        main()
