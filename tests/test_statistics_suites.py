"""Fisher merging's and RegMean's statistics computed by the suites (`tatr.suites.task_statistics`), cached
by content, and the runs that read them (`tatr.runs.plan`, ablations, sweeps) on the tiny testbed.

The testbed's ViT is open_clip's: its attention is torch's `nn.MultiheadAttention`, so RegMean's
`in_proj_weight` is hooked through the attention and `out_proj.weight` through a probe fed the heads'
output; both are checked here against an attention written out by hand.
"""

from __future__ import annotations

import hashlib
import json
import math
from functools import partial
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from torch import Tensor, nn

from tatr.core.cache import file_digest
from tatr.core.checkpoints import load_state_dict
from tatr.core.classify import cosine_logits
from tatr.core.errors import TatrError
from tatr.core.fisher import fisher_fusionbench, fisher_per_sample
from tatr.core.merging import plan_merge
from tatr.core.regmean import regmean_grams
from tatr.runs import ablation_spec, ablations
from tatr.runs.config import ExperimentConfig, config_dict, config_hash, load_config
from tatr.store.rows import read_store
from tatr.suites import task_statistics as ts
from tatr.suites.evaluation import evaluate_merged

TINY = {"preset": "tiny", "progress": False}
BLOCK = "transformer.resblocks.0"
HOOKED = {f"{BLOCK}.{k}.weight" for k in ("attn.out_proj", "mlp.c_fc", "mlp.c_proj")} | {f"{BLOCK}.attn.in_proj_weight"}


@pytest.fixture(autouse=True)
def one_thread():
    """Toy-sized products on shared cores; the suite's and the direct computation run alike."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def at_theta_t(suite, task: str) -> nn.Module:
    return suite.encoder(load_state_dict(suite.checkpoints().finetuned[task]))


def rule(suite, task: str):
    return partial(cosine_logits, head=suite.head(task), scale=suite.logit_scale())


def metadata(path: Path) -> dict[str, str]:
    with safe_open(str(path), framework="pt") as fh:
        return dict(fh.metadata())


def manual_heads(attn: nn.MultiheadAttention, x: Tensor) -> Tensor:
    """Self-attention's concatenated heads before `out_proj`, written out ([n, seq, d], batch first)."""
    d, h = attn.embed_dim, attn.num_heads
    q, k, v = F.linear(x, attn.in_proj_weight, attn.in_proj_bias).chunk(3, -1)

    def split(t: Tensor) -> Tensor:
        return t.reshape(*t.shape[:2], h, d // h).transpose(1, 2)

    weights = torch.softmax(split(q) @ split(k).transpose(-1, -2) / math.sqrt(d // h), -1)
    return (weights @ split(v)).transpose(1, 2).reshape(x.shape)


# --- the statistics equal the core's estimators on the same model and batches --------------------------
@pytest.mark.parametrize(("estimator", "n"), [("fusionbench", 64), ("per-sample", 24), ("empirical", 24)])
def test_fisher_of_the_suite_is_the_core_estimator_at_theta_t(tiny_testbed, estimator: str, n: int) -> None:
    suite = tiny_testbed
    files = suite.task_statistics("fisher", n, 1, estimator=estimator)
    assert list(files) == list(suite.tasks)
    names = [k for k, _ in suite.encoder(None).named_parameters()]
    for task in suite.tasks:
        batches = suite.statistics_loader(task, n, 1, 32)
        assert sum(len(y) for _, y in batches) == n and all(len(y) <= 32 for _, y in batches)
        model = at_theta_t(suite, task)
        if estimator == "fusionbench":
            expected = fisher_fusionbench(model, batches, classify=rule(suite, task), num_examples=n)
        else:
            empirical, chunk = estimator == "empirical", suite.gradient_chunk
            expected = fisher_per_sample(model, batches, empirical=empirical, classify=rule(suite, task), chunk=chunk)
        got = load_state_dict(files[task])
        assert set(got) == set(names) == set(expected)  # every floating parameter, keyed as the checkpoints
        for key, value in expected.items():
            assert torch.equal(got[key], value), (task, key)
        assert metadata(files[task]) == {"tatr_statistics": "fisher", "estimator": estimator, "examples": str(n)}
    if estimator == "fusionbench":  # at θ_t, not at θ_0: the Fisher of the pretrained model differs
        at_theta0 = fisher_fusionbench(suite.encoder(None), batches, classify=rule(suite, task), num_examples=n)
        assert not torch.equal(at_theta0[f"{BLOCK}.mlp.c_fc.weight"], got[f"{BLOCK}.mlp.c_fc.weight"])


def test_grams_of_the_suite_are_the_core_hooks_and_the_attention_written_out(tiny_testbed) -> None:
    suite = tiny_testbed
    files = suite.task_statistics("gram", 64, 1)
    task = suite.tasks[1]
    grams = load_state_dict(files[task])
    assert set(grams) == HOOKED  # conv1, proj, embeddings, norms and biases stay averaged
    assert metadata(files[task]) == {"tatr_statistics": "gram", "estimator": "fusionbench-regmean", "examples": "64"}
    model = at_theta_t(suite, task)
    batches = suite.statistics_loader(task, 64, 1, 32)
    attn = model.transformer.resblocks[0].attn
    plain = {k: model.get_submodule(k.removesuffix(".weight")) for k in HOOKED if "attn" not in k}
    direct = regmean_grams(model, batches, modules={**plain, f"{BLOCK}.attn.in_proj_weight": attn})
    for key, value in direct.items():  # the nn.Linear layers and in_proj: the core's hooks, bit for bit
        assert torch.equal(grams[key], value), key
    # out_proj: the Gram matrix of the heads' output, from an attention written out by hand
    inputs, outputs = [], []

    def keep(module: nn.Module, args: tuple, out: tuple) -> None:
        inputs.append(args[0])
        outputs.append(out[0])

    handle = attn.register_forward_hook(keep)
    with torch.no_grad():
        for x, _ in batches:
            model(x)
    handle.remove()
    heads = torch.cat([manual_heads(attn, x).detach() for x in inputs]).reshape(-1, attn.embed_dim)
    torch.testing.assert_close(
        grams[f"{BLOCK}.attn.out_proj.weight"], heads.T @ heads / len(heads), rtol=1e-4, atol=1e-6
    )
    projected = attn.out_proj(heads).reshape(torch.cat(outputs).shape)  # what the attention returned
    torch.testing.assert_close(projected, torch.cat(outputs), rtol=1e-4, atol=1e-5)


def test_the_examples_are_the_exemplar_draw_of_the_seed_in_batches_of_any_size(tiny_testbed) -> None:
    suite = tiny_testbed
    drawn = torch.cat([x for x, _ in suite.statistics_loader("shapes", 40, 3, 7)])
    exemplars = torch.cat([x for x, _ in suite.exemplar_loader("shapes", 10, 3)])
    assert len(drawn) == 40 and torch.equal(drawn[:10], exemplars)
    assert [len(y) for _, y in suite.statistics_loader("shapes", 40, 3, 32)] == [32, 8]


# --- the cache ---------------------------------------------------------------------------------------
def test_the_cache_is_hit_the_second_time_and_keyed_by_what_the_statistics_depend_on(
    tiny_testbed, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    suite = tiny_testbed
    first = {kind: ts.task_statistics(suite, kind, 16, 0, cache_root=tmp_path) for kind in ("fisher", "gram")}
    digests = {kind: {t: file_digest(p) for t, p in files.items()} for kind, files in first.items()}
    assert all(p.parent.parent == tmp_path / "statistics" for files in first.values() for p in files.values())

    def refuse(*args, **kwargs):
        raise AssertionError("recomputed")

    with monkeypatch.context() as patch:
        patch.setattr(ts, "fisher_fusionbench", refuse)
        patch.setattr(ts, "regmean_grams", refuse)
        for kind, files in first.items():
            again = ts.task_statistics(suite, kind, 16, 0, cache_root=tmp_path)
            assert again == files and {t: file_digest(p) for t, p in again.items()} == digests[kind]
        with pytest.raises(AssertionError, match="recomputed"):  # another seed is another entry
            ts.task_statistics(suite, "fisher", 16, 1, cache_root=tmp_path)
    # the estimator, the count and the batch size each name other files; RegMean has no estimator
    fisher = first["fisher"]
    assert ts.task_statistics(suite, "fisher", 16, 0, estimator="empirical", cache_root=tmp_path) != fisher
    assert ts.task_statistics(suite, "fisher", 17, 0, cache_root=tmp_path) != fisher
    assert ts.task_statistics(suite, "fisher", 16, 0, batch_size=8, cache_root=tmp_path) != fisher
    # a damaged entry fails verification and is computed again, the same tensors (safetensors writes its
    # metadata in a hash map's order, so the header's bytes may differ from one write to the next)
    task = suite.tasks[0]
    before = load_state_dict(fisher[task])
    fisher[task].write_bytes(fisher[task].read_bytes()[:-4] + b"\0\0\0\0")
    assert not all(torch.equal(v, load_state_dict(fisher[task])[k]) for k, v in before.items())
    assert ts.task_statistics(suite, "fisher", 16, 0, cache_root=tmp_path)[task] == fisher[task]
    after = load_state_dict(fisher[task])
    assert all(torch.equal(v, after[k]) for k, v in before.items())


# --- the runs ----------------------------------------------------------------------------------------
def ablation_file(folder: Path, variants: list[dict], **experiment: object) -> Path:
    body = {"name": "stats", "benchmark": "testbed", "suite": TINY, "statistics": {"n": 48}, **experiment}
    block = {"kind": "plugin", "lam": [0.5, 1.0], "q": [0.9], "variants": variants}
    path = folder / "stats.yaml"
    path.write_text(json.dumps({**body, "ablation": block}))
    return path


def test_an_ablation_with_fisher_and_regmean_variants_writes_rows_with_the_estimator_in_their_identity(
    tiny_testbed, tiny_testbed_cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WANDB_MODE", "disabled")
    variants = [
        {"method": "fisher", "trust_region": "off"},
        {"method": "fisher", "trust_region": "zero-shot"},
        {"method": "fisher", "trust_region": "off", "statistics": {"fisher_estimator": "empirical"}},
        {"method": "regmean", "trust_region": "off"},
        {"method": "regmean", "trust_region": "zero-shot"},
    ]
    config, spec = ablation_spec.load_ablation(ablation_file(tmp_path, variants))
    points = ablation_spec.points(config, spec)
    assert [p.statistics.fisher_estimator for p in points] == ["fusionbench"] * 2 + ["empirical"] + ["fusionbench"] * 2
    assert {p.statistics.n for p in points} == {48}  # the file's n, kept where a variant changes another key
    assert "empirical statistics n=48" in points[2].describe()
    root = tmp_path / "results"
    tuned = ablations.run(config, spec, root=root, cache_dir=tiny_testbed_cache, log=lambda _: None, wandb=False)
    rows = read_store(root)
    test = rows[(rows["split"] == "test") & rows["trial"].isna()]
    assert len(test) == 5 * len(tiny_testbed.tasks)
    pairs = sorted(set(zip(test["method"], test["trust_region"], strict=True)))
    assert pairs == [("fisher", "off"), ("fisher", "zero-shot"), ("regmean", "off"), ("regmean", "zero-shot")]
    hashes = test.groupby("run_id")["config_hash"].first()
    assert hashes.nunique() == 5  # the two Fisher estimators of one configuration are two identities
    assert len(rows[rows["trial"].notna()]) == 5 * 2 * len(tiny_testbed.tasks)  # λ ∈ {0.5, 1}, validation
    # each test row is the merge of the plan with the suite's statistics, evaluated independently
    ckpt = tiny_testbed.checkpoints()
    finetuned = [ckpt.finetuned[t] for t in tiny_testbed.tasks]
    for point, result in zip(points, tuned, strict=True):
        kind = "fisher" if point.merge.method == "fisher" else "gram"
        estimator = {"estimator": point.statistics.fisher_estimator} if kind == "fisher" else {}
        files = tiny_testbed.task_statistics(kind, 48, 0, **estimator)
        method, mode = point.merge.method, point.merge.trust_region
        stats = [files[t] for t in tiny_testbed.tasks]
        plan = plan_merge(ckpt.pretrained, finetuned, method=method, trust_region=mode, statistics=stats)
        expected = evaluate_merged(tiny_testbed, plan.merged(result.merge.q, result.lam), "test")
        assert result.test == pytest.approx(expected.accuracy)
    # identity: the statistics a method reads enter it; the Fisher's estimator not RegMean's
    fisher, regmean = points[0], points[3]

    def with_statistics(**update: object) -> ExperimentConfig:
        return config.model_copy(update={"statistics": config.statistics.model_copy(update=update)})

    per_sample, more = with_statistics(fisher_estimator="per-sample"), with_statistics(n=64)
    for changed, moved in ((per_sample, (True, False)), (more, (True, True))):
        for point, expect in zip((fisher, regmean), moved, strict=True):
            again = ablation_spec.points(changed, spec)[points.index(point)]
            differs = ablations.point_hash(changed, spec, again) != ablations.point_hash(config, spec, point)
            assert differs == expect
    # resume: every point is in the store already
    log: list[str] = []
    ablations.run(config, spec, root=root, cache_dir=tiny_testbed_cache, resume=True, log=log.append, wandb=False)
    assert len(log) == 5 and all("in the store already" in line for line in log)


def test_a_sweep_over_fisher_with_the_trust_region_runs_on_the_testbed(
    tiny_testbed, tiny_testbed_cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tatr.runs.sweep.run import run_sweep

    monkeypatch.setenv("TATR_CACHE", str(tiny_testbed_cache))
    monkeypatch.setenv("WANDB_MODE", "disabled")
    experiment = tmp_path / "exp.yaml"
    experiment.write_text(json.dumps({"name": "fs", "benchmark": "testbed", "suite": TINY, "statistics": {"n": 32}}))
    space = tmp_path / "fisher_tatr.yaml"
    params = {"lam": {"low": 0.5, "high": 1.5}, "q": {"low": 0.9, "high": 0.99}}
    merge = {"method": "fisher", "trust_region": "zero-shot"}
    space.write_text(json.dumps({"merge": merge, "sampler": "random", "params": params}))
    results = tmp_path / "results"
    result = run_sweep(experiment, space, trials=2, results=results, wandb=False, progress=False, echo=lambda _: None)
    rows = read_store(tmp_path / "results")
    assert set(rows["method"]) == {"fisher"} and set(rows["job_type"]) == {"trial", "final"}
    assert result.test is not None and len(result.test.accuracy) == len(tiny_testbed.tasks)
    files = tiny_testbed.task_statistics("fisher", 32, 0)
    assert all(p.is_file() for p in files.values())  # the sweep's statistics, in the cache


# --- one line at the door ----------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("statistics.fisher_estimator=persample", "unknown Fisher estimator 'persample'; did you mean 'per-sample'?"),
        ("statistics.n=0", "statistics.n: Input should be greater than or equal to 1"),
        ("statistics.batch=-3", "statistics.batch: Input should be greater than or equal to 1"),
        ("statistics.seeds=3", "unknown config key 'statistics.seeds'; did you mean 'statistics.seed'?"),
    ],
)
def test_a_bad_statistics_option_is_one_line(override: str, message: str) -> None:
    with pytest.raises(TatrError) as info:
        load_config(None, [override])
    assert message in str(info.value) and "\n" not in str(info.value)


def test_a_bad_variant_or_count_is_one_line(tiny_testbed, tmp_path: Path) -> None:
    path = ablation_file(tmp_path, [{"method": "ta", "statistics": {"n": 8}}])
    config, spec = ablation_spec.load_ablation(path)
    with pytest.raises(TatrError, match=r"^ablation\.variants\.0\.statistics: method 'ta' reads no statistics$"):
        ablation_spec.points(config, spec)
    path = ablation_file(tmp_path, [{"method": "fisher", "statistics": {"fisher_estimator": "exact"}}])
    with pytest.raises(
        TatrError, match=r"ablation\.variants\.0\.statistics\.fisher_estimator: unknown Fisher estimator"
    ):
        ablation_spec.load_ablation(path)
    with pytest.raises(
        TatrError, match=r"^statistics\.n must be between 1 and 128 for testbed task 'digits', got 500$"
    ):
        tiny_testbed.task_statistics("gram", 500, 0)


def test_configs_without_statistics_keep_their_dict_and_hash() -> None:
    """The section joins a config's dict (and hash) where its method reads statistics or it is set; a TA
    experiment's dict is the one it had before the section existed, and every dict reads back the same."""
    ta = ExperimentConfig()
    assert "statistics" not in config_dict(ta)
    before = ta.model_dump(mode="json")
    before.pop("statistics")
    before["exemplars"].pop("selection")  # came later, left out at its default too (tests/test_exemplar_selection.py)
    assert config_dict(ta) == before
    blob = json.dumps(before, sort_keys=True, separators=(",", ":"))  # the hash of the dict it had before
    assert config_hash(ta) == hashlib.sha256(blob.encode()).hexdigest()[:12]
    for raw in ({"merge": {"method": "fisher"}}, {"statistics": {"n": 8}}, {"merge": {"method": "regmean"}}):
        config = ExperimentConfig.model_validate(raw)
        assert "statistics" in config_dict(config)
        assert ExperimentConfig.model_validate(config_dict(config)) == config
    fisher = ExperimentConfig.model_validate({"merge": {"method": "fisher"}})
    empirical = load_config(None, ["merge.method=fisher", "statistics.fisher_estimator=empirical"])
    assert config_hash(fisher) != config_hash(empirical)
