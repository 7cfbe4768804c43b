"""`tatr merge --config FILE` (issue 22, item 2): a mergekit YAML merged by tatr equals mergekit 0.1.5's own output.

The reference is mergekit itself (`mergekit.merge.run_merge` on the same configuration, the `lm` extra installs
it; its `GeneralizedTaskArithmeticMerge` on state dicts for the float32 checks), on tiny Llama-shaped bf16
model folders with tied embeddings, written by `save_pretrained` in shards. With `dtype: float32` the six
generalized task-arithmetic methods agree bit for bit; `linear`, whose sum mergekit forms over the models
rather than over task vectors, agrees to one bf16 unit in the last place. DARE's random masks are made equal
by seeding torch's generator, before each of mergekit's draws, with the seed tatr gives that (task, tensor).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

mergekit = pytest.importorskip("mergekit", reason="mergekit 0.1.5 (the lm extra: pip install -e '.[lm]')")
transformers = pytest.importorskip("transformers")

from mergekit.config import MergeConfiguration  # noqa: E402
from mergekit.merge import run_merge  # noqa: E402
from mergekit.merge_methods import registry  # noqa: E402
from mergekit.merge_methods.base import TensorGroup  # noqa: E402
from mergekit.options import MergeOptions  # noqa: E402

from tatr.cli import main  # noqa: E402
from tatr.cli.model_card import input_digest  # noqa: E402
from tatr.core.errors import TatrError  # noqa: E402
from tatr.core.merging import plan_merge  # noqa: E402
from tatr.core.methods import get_method  # noqa: E402
from tatr.core.one_shot import merge  # noqa: E402
from tatr.core.sparsify import task_seed  # noqa: E402
from tatr.io.mergekit_config import KINDS, read_mergekit_config  # noqa: E402
from tests.lm_fixtures import tiny_llama, tiny_tokenizer  # noqa: E402

WEIGHTS = {"a": 0.6, "b": -0.3, "c": 1.1}  # one negative: mergekit's mask and divisor follow the weighted sign
DENSITY = {"a": 0.5, "b": 0.8, "c": 0.3}
GAMMA = {"a": 0.02, "b": 0.05, "c": 0.01}


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """base, a, b, c: bf16 tiny Llamas with tied embeddings, sharded at 40 KB, each with the tokenizer."""
    root = tmp_path_factory.mktemp("mergekit")
    tok = tiny_tokenizer(bos=False)
    for i, name in enumerate(["base", "a", "b", "c"]):
        model = tiny_llama(len(tok), seed=0).to(torch.bfloat16)
        if i:
            g = torch.Generator().manual_seed(i)
            with torch.no_grad():
                for p in model.parameters():
                    p.add_((0.01 * torch.randn(p.shape, generator=g)).to(p.dtype))
        model.save_pretrained(root / name, max_shard_size="40KB")
        tok.save_pretrained(root / name)
    assert (root / "a" / "model.safetensors.index.json").is_file()
    return root


def _config(method: str, **top: Any) -> dict[str, Any]:
    """A mergekit configuration of `method` over a, b, c with per-model weights (and densities, γ)."""
    models = []
    for name in "abc":
        params: dict[str, Any] = {"weight": WEIGHTS[name]}
        if KINDS[method].method.startswith("mergekit-"):
            params["density"] = DENSITY[name]
        if method.startswith("breadcrumbs"):
            params["gamma"] = GAMMA[name]
        models.append({"model": name, "parameters": params})
    config: dict[str, Any] = {"merge_method": method, "base_model": "base", "models": models}
    config.update({"dtype": "float32", "out_dtype": "bfloat16"})
    config["parameters"] = top
    return config


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def _both(root: Path, tmp: Path, config: dict[str, Any], name: str = "m") -> tuple[dict, dict, Path]:
    """(mergekit's tensors, tatr's tensors, tatr's folder) for one configuration: the YAML names the models
    relative to its folder (tatr), the copy given to mergekit names them absolutely."""
    (root / f"{name}.yml").write_text(yaml.safe_dump(config))
    absolute = json.loads(json.dumps(config))
    absolute["base_model"] = str(root / config["base_model"]) if "base_model" in config else None
    for entry in absolute["models"]:
        entry["model"] = str(root / entry["model"])
    reference, ours = tmp / f"mergekit-{name}", tmp / f"tatr-{name}"
    run_merge(MergeConfiguration.model_validate(absolute), str(reference), MergeOptions(quiet=True))
    assert main(["merge", "--config", str(root / f"{name}.yml"), "--out", str(ours), "--quiet"]) in (0, None)
    return _weights(reference), _weights(ours), ours


def _assert_equal(reference: dict, ours: dict) -> None:
    assert set(reference) == set(ours) and "lm_head.weight" not in ours  # tied: no separate head in either
    for key, value in reference.items():
        assert ours[key].dtype == value.dtype, key
        assert torch.equal(ours[key], value), key


@pytest.mark.parametrize(
    ("method", "top"),
    [
        ("task_arithmetic", {"lambda": 0.8}),
        ("task_arithmetic", {"normalize": True}),
        ("ties", {"lambda": 0.8}),  # normalize true by default: the disjoint weighted mean
        ("ties", {"normalize": False, "rescale": True}),
        ("dare_linear", {"lambda": 0.7}),  # densities set to 1 below: no random draw
        ("dare_ties", {"normalize": True}),
        ("breadcrumbs", {"lambda": 0.9}),
        ("breadcrumbs_ties", {"normalize": True, "rescale": True, "int8_mask": True}),
    ],
)
def test_each_method_equals_mergekit_bit_for_bit(
    folders: Path, tmp_path: Path, method: str, top: dict[str, Any]
) -> None:
    config = _config(method, **top)
    if method.startswith("dare"):
        for entry in config["models"]:
            entry["parameters"]["density"] = 1.0  # mergekit returns τ unchanged (no draw, no rescale)
    reference, ours, _ = _both(folders, tmp_path, config)
    _assert_equal(reference, ours)


@pytest.mark.parametrize("method", ["breadcrumbs_ties", "task_arithmetic"])
def test_dtype_float32_alone_writes_float32_as_mergekit(folders: Path, tmp_path: Path, method: str) -> None:
    """`dtype: float32` without `out_dtype`: mergekit writes its float32 sums; so does tatr (rounded once from its
    float32 arithmetic, not through θ_0's bf16). Task arithmetic would stream by default, rounding to θ_0's bf16
    as it goes: the finer output dtype keeps it in memory."""
    config = _config(method, **({"normalize": True} if method == "breadcrumbs_ties" else {}))
    config.pop("out_dtype")
    reference, ours, _ = _both(folders, tmp_path, config, "f32")
    assert {v.dtype for v in ours.values()} == {torch.float32}
    _assert_equal(reference, ours)


def test_dare_below_density_one_equals_mergekit_seeded_per_task_and_tensor(
    folders: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """mergekit draws DARE's masks from torch's global generator in its scheduler's order; seeding it before
    each draw with tatr's seed for that (task, tensor) (`task_seed`, seed 0) makes the masks equal, and every
    other step, L1 rescaling included, is mergekit's own code."""
    import mergekit.merge_methods.generalized_task_arithmetic as gta

    group_merge, sparsify = gta.GeneralizedTaskArithmeticMerge.merge_group, gta.sparsify
    where = {"key": "", "task": 0}

    def merge_group(self: Any, group: TensorGroup, /, **parameters: Any) -> torch.Tensor:
        where.update(key=group.metadata.name, task=0)
        return group_merge(self, group, **parameters)

    def seeded(delta: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        torch.manual_seed(task_seed(0, where["task"], where["key"]))
        where["task"] += 1
        return sparsify(delta, **kwargs)

    monkeypatch.setattr(gta.GeneralizedTaskArithmeticMerge, "merge_group", merge_group)
    monkeypatch.setattr(gta, "sparsify", seeded)
    for method, top in (("dare_linear", {"lambda": 0.7}), ("dare_ties", {"rescale": False, "normalize": True})):
        reference, ours, _ = _both(folders, tmp_path, _config(method, **top), method)
        _assert_equal(reference, ours)
        base = _weights(folders / "base")
        key = "model.layers.0.mlp.up_proj.weight"
        unmoved = float((ours[key] == base[key]).float().mean())  # where all three dropped: 0.5·0.2·0.7 = 0.07
        assert 0.04 < unmoved < 0.11


def test_linear_equals_mergekit_to_one_unit_in_the_last_place(folders: Path, tmp_path: Path) -> None:
    """linear is Σ_i w_i θ_i / Σ_i w_i over the models (the base among them, with the top-level weight);
    tatr forms θ_0 + Σ_t (w_t/Σw)·τ_t, the same value in other float32 arithmetic: after rounding to bf16
    they differ by at most one unit in the last place, at a small fraction of the coordinates."""
    config = {"merge_method": "linear", "base_model": "base", "dtype": "float32", "out_dtype": "bfloat16"}
    config["models"] = [{"model": n, "parameters": {"weight": abs(WEIGHTS[n])}} for n in "abc"]
    config["parameters"] = {"weight": 0.5}
    reference, ours, _ = _both(folders, tmp_path, config)
    assert set(reference) == set(ours)
    differ = total = 0
    for key, value in reference.items():
        ulps = (value.view(torch.int16).int() - ours[key].view(torch.int16).int()).abs()
        assert int(ulps.max()) <= 1 and ours[key].dtype == torch.bfloat16, key
        differ, total = differ + int((ulps > 0).sum()), total + ulps.numel()
    assert differ / total < 0.01


def test_the_trust_region_block_is_mergekit_on_the_masked_task_vectors(folders: Path, tmp_path: Path) -> None:
    """A `trust_region:` block masks each τ_t before the method runs: the merge equals mergekit's on models
    whose task vectors are already masked (θ_t where the mask keeps, θ_0 elsewhere)."""
    q = 0.9
    plan = plan_merge(folders / "base", [folders / n for n in "abc"], method="ta", trust_region="zero-shot")
    keep = plan.keep_mask(q)
    base = _weights(folders / "base")
    masked = tmp_path / "masked"
    for name in "abc":
        state = _weights(folders / name)
        for i, key in enumerate(plan.space.keys):
            state[key] = torch.where(plan.space.view(keep, i), state[key], base[key])
        shutil.copytree(folders / name, masked / name, ignore=shutil.ignore_patterns("model*.safetensors*"))
        save_file(state, str(masked / name / "model.safetensors"), metadata={"format": "pt"})
    shutil.copytree(folders / "base", masked / "base")
    config = _config("ties", normalize=True)
    reference, _, _ = _both(masked, tmp_path, config, "masked")
    config["trust_region"] = {"mode": "zero-shot", "q": q}
    (folders / "tr.yml").write_text(yaml.safe_dump(config))
    out = tmp_path / "tatr-tr"
    assert main(["merge", "--config", str(folders / "tr.yml"), "--out", str(out), "--quiet"]) in (0, None)
    ours = _weights(out)
    _assert_equal(reference, ours)
    card = (out / "README.md").read_text()
    assert "## Trust region" in card and "## mergekit configuration" in card and "merge_method: ties" in card
    assert all(input_digest(folders / n) in card for n in ("base", "a", "b", "c"))
    assert transformers.AutoModelForCausalLM.from_pretrained(out).config.tie_word_embeddings


@pytest.mark.parametrize("method", ["ties", "dare_ties", "breadcrumbs"])
def test_out_of_core_gives_the_same_bits(folders: Path, tmp_path: Path, method: str) -> None:
    """Weights, per-model densities and the trust region reach the out-of-core merge (`--low-memory`) too."""
    config = _config(method, normalize=True)
    config["models"][1]["parameters"]["density"] = 0.6  # dare_ties: a random drop
    config["trust_region"] = {"mode": "zero-shot", "q": 0.95}
    path = folders / f"ooc-{method}.yml"
    path.write_text(yaml.safe_dump(config))
    results = []
    for flag in ("--in-memory", "--low-memory"):
        assert main(["merge", "--config", str(path), "--out", str(tmp_path / flag), "--quiet", flag]) in (0, None)
        results.append(_weights(tmp_path / flag))
    _assert_equal(*results)


@pytest.mark.parametrize("method", ["task_arithmetic", "ties", "breadcrumbs", "breadcrumbs_ties", "dare_ties"])
@pytest.mark.parametrize("normalize", [False, True])
def test_weights_and_per_task_options_equal_mergekit_in_float32(method: str, normalize: bool) -> None:
    """The core API with per-task weights and per-task densities (tuples) against mergekit's
    `GeneralizedTaskArithmeticMerge` on float32 state dicts, bit for bit in float32."""
    g = torch.Generator().manual_seed(3)
    shapes = {"w": (48, 40), "b": (37,), "v": (16, 16)}
    base = {k: torch.randn(s, generator=g) for k, s in shapes.items()}
    tasks = [{k: v + 0.05 * torch.randn(v.shape, generator=g) for k, v in base.items()} for _ in range(3)]
    weights, density, gamma = [0.6, -0.3, 1.1], [0.5, 0.8, 0.3], [0.02, 0.05, 0.01]
    kind = KINDS[method]
    options: dict[str, Any] = {}
    params: dict[str, Any] = {"weight": weights, "normalize": normalize, "lambda": 0.8, "rescale": True}
    if kind.method.startswith("mergekit-"):
        dense = [1.0, 1.0, 1.0] if method.startswith("dare") else density
        options["mergekit_density"], params["density"] = tuple(dense), dense
    if method.startswith("breadcrumbs"):
        options["mergekit_gamma"], params["gamma"] = tuple(gamma), gamma
    if kind.rescale_option is not None:
        options[kind.rescale_option] = 1
    configured = get_method(kind.method).weighted(weights, normalize)
    ours = merge(base, tasks, method=configured, trust_region="off", lam=0.8, **options)
    reference_method = registry.get(method)
    for key in shapes:
        group = TensorGroup.from_tensors([base[key], *(t[key] for t in tasks)], base_index=0, name=key)
        (reference,) = reference_method([group], parameters=params, dtype=torch.float32, out_dtype=torch.float32)
        assert torch.equal(ours[key], reference), key


def _error(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err, err
    return err


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda c: c.update(slices=[]), "'slices' is not supported by tatr"),
        (lambda c: c.update(merge_method="slerp"), "merge_method 'slerp' is not one tatr reads"),
        (lambda c: c.update(name="x"), "name: Extra inputs are not permitted"),
        (lambda c: c["models"][0]["parameters"].update(density=[0.1, 0.9]), "per-tensor values"),
        (lambda c: c["models"][0]["parameters"].update(density={"filter": "mlp", "value": 0.5}), "per-tensor values"),
        (lambda c: c["models"][0]["parameters"].update(density=0.0), "mergekit density must be in (0, 1]"),
        (lambda c: c["models"][0]["parameters"].update(density=1.5), "mergekit density must be in (0, 1]"),
        (lambda c: c["models"][0]["parameters"].update(weight=".nan"), "weight must be a finite number"),
        (lambda c: c["models"][0]["parameters"].pop("weight"), "has no weight"),
        (lambda c: c["models"][0]["parameters"].update(epsilon=0.1), "epsilon: not a parameter of ties"),
        (lambda c: c["models"][0]["parameters"].update(normalize=True), "normalize is merge-wide"),
        (lambda c: c.update(tokenizer_source="union"), "tokenizer_source: union"),
        (lambda c: c.update(base_model="org/model"), "'org/model' is not a local folder"),
        (lambda c: c.pop("base_model"), "ties needs a base_model"),
        (lambda c: c.update(dtype="int8"), "dtype must be one of"),
        (lambda c: c.update(trust_region={"mode": "zero-shoot"}), "did you mean 'zero-shot'"),
        (lambda c: c.update(trust_region={"q": 1.5}), "q must be in (0, 1]"),
        (lambda c: c.update(trust_region={"mode": "exemplar"}), "needs exemplar gradients"),
        (lambda c: c["models"].append(json.loads(json.dumps(c["models"][0]))), "listed twice"),
    ],
)
def test_what_tatr_cannot_read_is_one_line(
    folders: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], change: Any, message: str
) -> None:
    config = _config("ties")
    change(config)
    path = folders / "bad.yml"
    path.write_text(yaml.safe_dump(config))
    assert message in _error(["merge", "--config", str(path), "--out", str(tmp_path / "o")], capsys)
    assert not (tmp_path / "o").exists()


def test_flags_that_the_file_gives_are_refused_and_aliases_too(
    folders: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = folders / "ok.yml"
    path.write_text(yaml.safe_dump(_config("ties")))
    err = _error(["merge", "--config", str(path), "--method", "ta", "--out", str(tmp_path / "o")], capsys)
    assert "remove --method" in err
    err = _error(["merge", "--out", str(tmp_path / "o")], capsys)
    assert "missing option '--pretrained' / '-p' (or --config FILE" in err
    path.write_text("a: &x {merge_method: ties}\nb: *x\n")
    assert "aliases (*name) are refused" in _error(["merge", "--config", str(path), "--out", str(tmp_path)], capsys)


def test_notes_for_what_mergekit_computes_differently(folders: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """int8_mask is noted and ignored; bfloat16 arithmetic (mergekit's default for bf16 models) is noted."""
    config = _config("ties", int8_mask=True)
    config.pop("dtype")
    path = folders / "notes.yml"
    path.write_text(yaml.safe_dump(config))
    request = read_mergekit_config(path)
    assert any("int8_mask" in n for n in request.notes)
    assert request.method.weights == (0.6, -0.3, 1.1) and request.method.reduce == "mean"
    assert request.options == {"mergekit_density": (0.5, 0.8, 0.3)}
    out = folders.parent / "notes-out"
    assert main(["merge", "--config", str(path), "--out", str(out)]) in (0, None)
    err = capsys.readouterr().err
    assert "int8_mask" in err and "mergekit computes this merge in bfloat16" in err


def test_per_task_values_are_checked_at_the_door() -> None:
    base = {"w": torch.zeros(4, 4)}
    tasks = [{"w": torch.randn(4, 4)} for _ in range(2)]
    with pytest.raises(TatrError, match=r"ties_k: one value per task applies to a per-tensor sparsifier"):
        merge(base, tasks, method="ties-sum", trust_region="off", ties_k=(20.0, 30.0))
    with pytest.raises(TatrError, match=r"3 per-task values for 2 tasks"):
        merge(base, tasks, method="mergekit-ties", trust_region="off", mergekit_density=(0.5, 0.5, 0.5))
    with pytest.raises(TatrError, match=r"3 per-task weights for 2 tasks"):
        merge(base, tasks, method=get_method("ta").weighted([1.0, 2.0, 3.0]), trust_region="off")
    with pytest.raises(TatrError, match=r"per-task weights must be finite"):
        get_method("ta").weighted([1.0, float("inf")])
    with pytest.raises(TatrError, match=r"not to tsv-m's combiner"):
        get_method("tsv-m").weighted([1.0, 2.0])


def _mergekit_magnitude_mask(tensor: torch.Tensor, density: float) -> torch.Tensor:
    """mergekit 0.1.5 `sparsify.magnitude`'s mask, transcribed: a full descending argsort of |τ| on CPU."""
    k = int(density * tensor.numel())
    mask = torch.zeros_like(tensor)
    w = tensor.abs().view(-1)
    if w.device.type == "cpu":
        w = w.float()
    topk = torch.argsort(w, descending=True)[:k]
    mask.view(-1)[topk] = 1
    return mask.bool()


@pytest.mark.parametrize("grain", [None, 2.0**-8])
def test_magnitude_masks_equal_mergekit_whichever_path_each_task_takes(grain: float | None) -> None:
    """The per-tensor sparsifier selects where no tie straddles the cut and sorts where one does, and once a
    task of a tensor needed the sort, the next tasks sort at once: every mask is still mergekit's. `grain`
    rounds τ to a coarse grid (ties at the cut, as bf16 models have); None leaves float32 noise (no ties)."""
    from tatr.core.sparsify import sparsifier

    g = torch.Generator().manual_seed(5)
    options = {"mergekit_density": 0.3, "mergekit_rescale": False}
    for_task = sparsifier("magnitude", options, "model.layers.0.mlp.up_proj.weight")
    assert for_task is not None
    for task in range(4):
        tau = torch.randn(64, 48, generator=g)
        if grain is not None and task != 1:  # task 1 without ties: the sorted path's followers still agree
            tau = torch.round(tau / grain / 64) * grain
        got = for_task(task, tau)(torch.ones_like(tau)) != 0
        assert torch.equal(got, _mergekit_magnitude_mask(tau, 0.3)), task
