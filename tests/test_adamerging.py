# ruff: noqa: B007, B905, UP008, UP032  (the transcription keeps the reference's own spelling)
"""AdaMerging against a literal transcription of its reference code, and its place in the harness.

The transcription below is EnnengYang/AdaMerging's `src/main_task_wise_adamerging.py` and
`src/main_layer_wise_adamerging.py` (they differ only in the shape of `lambdas_raw` and in
`alph[0]` vs `alph[j]`), with `modeling.py`'s `ClassificationHead`. Changed only where the reference
touches things a test has no use for: no `.cuda(0)`/`.cpu()` moves, no logging or evaluation, the
heads handed in instead of read from disk, and each task's shuffled test loader (re-created every
epoch by `get_dataloader_shuffle`) replaced by an endless iterator of input batches. `prior` and
`lr` are arguments so that a test can reach the clamp; the reference hard-codes 0.3 and 1e-3.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

from tatr.core.adamerging import (
    adamerging,
    check_memory,
    clamped,
    coefficient_count,
    masked_task_vectors,
    memory_bytes,
    merged_parameters,
    softmax_entropy,
)
from tatr.core.errors import TatrError
from tatr.core.gradients import cosine_logits
from tatr.core.merging import plan_merge
from tatr.core.methods import METHODS, merge_label
from tatr.suites.base import seeded_batches

ADAMERGING = ("adamerging-task", "adamerging-layer")

SCALE = 10.0
TASKS = 3


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny tensors on 2 shared cores: intra-op threads only spin (softmax of 16×4 took 15 ms at load 6)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# --- the reference, transcribed ---------------------------------------------------------------------
def del_attr(obj, names):
    if len(names) == 1:
        delattr(obj, names[0])
    else:
        del_attr(getattr(obj, names[0]), names[1:])


def set_attr(obj, names, val):
    if len(names) == 1:
        setattr(obj, names[0], val)
    else:
        set_attr(getattr(obj, names[0]), names[1:], val)


def make_functional(mod):
    orig_params = tuple(mod.parameters())
    # Remove all the parameters in the model
    names = []
    for name, p in list(mod.named_parameters()):
        del_attr(mod, name.split("."))
        names.append(name)
    return orig_params, names


def load_weights(mod, names, params):
    for name, p in zip(names, params):
        set_attr(mod, name.split("."), p)


class ClassificationHead(torch.nn.Linear):
    def __init__(self, normalize, weights, biases=None):
        output_size, input_size = weights.shape
        super().__init__(input_size, output_size)
        self.normalize = normalize
        if weights is not None:
            self.weight = torch.nn.Parameter(weights.clone())
        if biases is not None:
            self.bias = torch.nn.Parameter(biases.clone())
        else:
            self.bias = torch.nn.Parameter(torch.zeros_like(self.bias))

    def forward(self, inputs):
        if self.normalize:
            inputs = inputs / inputs.norm(dim=-1, keepdim=True)
        return super().forward(inputs)


class AdaMerging(torch.nn.Module):
    def __init__(self, paramslist, model, names, exam_datasets, heads, layer_wise, prior):
        super(AdaMerging, self).__init__()
        self.paramslist = paramslist
        self.model = model
        self.names = names
        self.layer_wise = layer_wise
        if layer_wise:
            self.pretrain_lambdas = torch.ones(len(paramslist[0]), 1)
            rlambdas = torch.ones(len(paramslist[0]), len(paramslist) - 1) * prior  # (1 * tasks)
        else:
            self.pretrain_lambdas = torch.ones(1, 1)
            rlambdas = torch.ones(1, len(paramslist) - 1) * prior  # (1 * tasks)
        self.lambdas_raw = torch.nn.Parameter(rlambdas)

        self.classifier = []
        for dataset_name in exam_datasets:
            classification_head = heads[dataset_name]
            layer_name = "classifier_{}".format(dataset_name)
            self.add_module(layer_name, classification_head)
            self.classifier.append(layer_name)

    def lambdas(self):
        task_lambdas = torch.clamp(self.lambdas_raw, min=0.0, max=1.0)
        lambdass = torch.cat((self.pretrain_lambdas, task_lambdas), 1)
        return lambdass

    def collect_trainable_params(self):
        return [self.lambdas_raw]

    def merged_params(self):  # the body shared by get_image_encoder and forward
        alph = self.lambdas()
        if self.layer_wise:
            return tuple(
                sum(tuple(pi * lambdasi for pi, lambdasi in zip(p, alph[j])))
                for j, p in enumerate(zip(*self.paramslist))
            )
        return tuple(
            sum(tuple(pi * lambdasi for pi, lambdasi in zip(p, alph[0]))) for j, p in enumerate(zip(*self.paramslist))
        )

    def forward(self, inp, dataset_name):
        params = self.merged_params()
        load_weights(self.model, self.names, params)
        feature = self.model(inp)

        layer_name = "classifier_{}".format(dataset_name)
        classification_head = getattr(self, layer_name)
        out = classification_head(feature)

        return out


def reference_softmax_entropy(x):
    """Entropy of softmax distribution from logits."""
    return -(x.softmax(1) * x.log_softmax(1)).sum(1)


def reference_run(theta0, task_vectors, heads, loaders, layer_wise, epochs, prior=0.3, lr=1e-3):
    """The reference's setup and training loop; returns (lambdas(), merged params by name, losses)."""
    model = _net()
    _, names = make_functional(model)
    paramslist = []
    paramslist += [tuple(v.detach().requires_grad_() for _, v in theta0.items())]  # pretrain
    paramslist += [tuple(v.detach().requires_grad_() for _, v in tv.items()) for tv in task_vectors]  # task vectors
    exam_datasets = [f"task{t}" for t in range(len(task_vectors))]
    cls_heads = {d: ClassificationHead(normalize=True, weights=SCALE * h) for d, h in zip(exam_datasets, heads)}
    adamerging_mtl_model = AdaMerging(paramslist, model, names, exam_datasets, cls_heads, layer_wise, prior)
    optimizer = torch.optim.Adam(
        adamerging_mtl_model.collect_trainable_params(), lr=lr, betas=(0.9, 0.999), weight_decay=0.0
    )
    history = []
    for epoch in range(epochs):
        losses = 0.0
        for dataset_name, dataloader in zip(exam_datasets, loaders):
            for i, data in enumerate(dataloader):
                x = data
                outputs = adamerging_mtl_model(x, dataset_name)
                loss = reference_softmax_entropy(outputs).mean(0)
                losses += loss
                if i > 0:
                    break
        optimizer.zero_grad()
        losses.backward()
        optimizer.step()
        history.append(float(losses.detach()))  # (added: the record the comparison needs)
    merged = dict(zip(names, (p.detach() for p in adamerging_mtl_model.merged_params())))
    return adamerging_mtl_model.lambdas().detach(), merged, history


# --- a tiny model and its task vectors ---------------------------------------------------------------
def _net() -> nn.Module:
    return nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 5))


def _setup(seed: int = 0, scale: float = 0.3) -> tuple[dict[str, Tensor], list[dict[str, Tensor]], list[Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    theta0 = {k: torch.randn(v.shape, generator=gen) * 0.5 for k, v in _net().state_dict().items()}
    tvs = [{k: scale * torch.randn(v.shape, generator=gen) for k, v in theta0.items()} for _ in range(TASKS)]
    heads = [torch.nn.functional.normalize(torch.randn(4, 5, generator=gen), dim=-1) for _ in range(TASKS)]
    return theta0, tvs, heads


def _inputs(seed: int, n: int = 40) -> list[Tensor]:
    gen = torch.Generator().manual_seed(100 + seed)
    return [torch.randn(n, 6, generator=gen) for _ in range(TASKS)]


def _stream(x: Tensor, batch: int, seed: int):
    return (x[idx] for idx in seeded_batches(len(x), batch, seed))


def _streams(data: list[Tensor], batch: int, seed: int = 0):
    return [_stream(x, batch, seed + t) for t, x in enumerate(data)]


# --- against the reference -----------------------------------------------------------------------
@pytest.mark.parametrize("layer_wise", [False, True])
@pytest.mark.parametrize(("prior", "lr", "steps"), [(0.3, 1e-3, 6), (0.3, 0.08, 12)])
def test_learning_matches_the_reference(layer_wise: bool, prior: float, lr: float, steps: int) -> None:
    """Same batches, same λ, same merged model and entropies as the reference's loop; at lr 0.08 some
    coefficients reach the clamp at 0 or 1 and stay there as in the reference."""
    theta0, tvs, heads = _setup()
    data = _inputs(0)
    ref_lambdas, ref_merged, ref_losses = reference_run(
        theta0, tvs, heads, _streams(data, 16), layer_wise, steps, prior, lr
    )
    ours = adamerging(
        theta0,
        tvs,
        _net(),
        heads,
        _streams(data, 16),
        SCALE,
        granularity="layer" if layer_wise else "task",
        steps=steps,
        lr=lr,
        init=prior,
    )
    assert ref_lambdas.shape == (len(theta0) if layer_wise else 1, TASKS + 1)
    assert torch.allclose(ours.coefficients, ref_lambdas[:, 1:], atol=1e-6, rtol=0)
    for key, value in ref_merged.items():
        assert torch.allclose(ours.merged[key], value, atol=1e-6, rtol=0), key
    assert ours.entropy == pytest.approx(ref_losses, rel=1e-5)
    moved = (ours.coefficients - prior).abs().max()
    assert moved >= min(0.5 * lr * steps, prior)  # it learned: Adam moves ~lr per step, until the clamp
    if lr > 0.01:
        at_bounds = (ours.coefficients == 0) | (ours.coefficients == 1)
        assert at_bounds.any()  # the clamp was reached, and the reference agrees there


def test_merged_parameters_are_the_references_bit_for_bit() -> None:
    theta0, tvs, _ = _setup(seed=3)
    keys = list(theta0)
    lam = torch.rand(len(keys), TASKS, generator=torch.Generator().manual_seed(1))
    lam_with_base = torch.cat((torch.ones(len(keys), 1), lam), 1)
    paramslist = [tuple(theta0.values()), *(tuple(tv[k] for k in keys) for tv in tvs)]
    reference = tuple(
        sum(tuple(pi * lambdasi for pi, lambdasi in zip(p, lam_with_base[j]))) for j, p in enumerate(zip(*paramslist))
    )
    ours = merged_parameters(theta0, tvs, lam, keys)
    assert all(torch.equal(ours[k], r) for k, r in zip(keys, reference, strict=True))
    task_wise = merged_parameters(theta0, tvs, lam[:1], keys)  # one row: the same λ for every tensor
    assert all(
        torch.equal(task_wise[k], merged_parameters(theta0, tvs, lam[:1].expand(len(keys), -1), keys)[k]) for k in keys
    )


def test_entropy_and_clamp_are_the_references() -> None:
    logits = torch.randn(7, 5, generator=torch.Generator().manual_seed(2)) * 4
    assert torch.equal(softmax_entropy(logits), reference_softmax_entropy(logits))
    p = logits.softmax(1)
    assert torch.allclose(softmax_entropy(logits), -(p * p.log()).sum(1), atol=1e-6)  # Shannon entropy, nats
    raw = torch.tensor([[-0.5, 0.0, 0.3, 1.0, 1.7]])
    assert torch.equal(clamped(raw), torch.tensor([[0.0, 0.0, 0.3, 1.0, 1.0]]))


# --- behaviour ----------------------------------------------------------------------------------------
def _entropy(theta0, tvs, heads, data, coefficients) -> float:
    keys = list(tvs[0])
    params = {**theta0, **merged_parameters(theta0, tvs, coefficients, keys)}
    model = _net()
    total = 0.0
    with torch.no_grad():
        for head, x in zip(heads, data, strict=True):
            out = torch.func.functional_call(model, params, (x,))
            total += float(softmax_entropy(cosine_logits(out, head, SCALE)).mean())
    return total


@pytest.mark.parametrize("granularity", ["task", "layer"])
def test_learned_coefficients_reduce_the_entropy(granularity: str) -> None:
    """Full batches (the objective is then deterministic): the learned λ give lower entropy than λ=0.3."""
    theta0, tvs, heads = _setup(seed=5)
    data = _inputs(5, n=32)
    result = adamerging(
        theta0, tvs, _net(), heads, _streams(data, 32), SCALE, granularity=granularity, steps=40, lr=1e-2,
        batches_per_step=1,
    )  # fmt: skip
    before = _entropy(theta0, tvs, heads, data, torch.full((1, TASKS), 0.3))
    after = _entropy(theta0, tvs, heads, data, result.coefficients)
    assert result.entropy[0] == pytest.approx(before, rel=1e-5)
    assert after < before - 0.01
    assert result.entropy[-1] < result.entropy[0]


def test_task_wise_and_layer_wise_shapes_and_summary() -> None:
    theta0, tvs, heads = _setup()
    data = _inputs(1)
    task = adamerging(theta0, tvs, _net(), heads, _streams(data, 16), SCALE, granularity="task", steps=2)
    layer = adamerging(theta0, tvs, _net(), heads, _streams(data, 16), SCALE, granularity="layer", steps=2)
    assert task.coefficients.shape == (1, TASKS)
    assert layer.coefficients.shape == (len(theta0), TASKS) and layer.keys == tuple(theta0)
    assert coefficient_count("task", len(theta0), TASKS) == TASKS
    assert coefficient_count("layer", len(theta0), TASKS) == len(theta0) * TASKS
    assert set(task.merged) == set(theta0) and len(task.entropy) == 2
    summary = layer.summary()
    assert summary["mean"] == pytest.approx(float(layer.coefficients.mean()))
    assert len(summary["per_task"]) == TASKS and summary["min"] <= summary["mean"] <= summary["max"]


def test_the_trust_region_masks_before_learning() -> None:
    """Masked coordinates are 0 in every τ_t, so they keep θ_0's value whatever λ is learned."""
    theta0, tvs, heads = _setup(seed=7)
    finetuned = [{k: theta0[k] + tv[k] for k in theta0} for tv in tvs]
    plan = plan_merge(theta0, finetuned, trust_region="zero-shot")
    q = 0.7
    masked = masked_task_vectors(plan, q)
    keep = plan.keep_mask(q)
    dropped = 0
    for i, key in enumerate(plan.space.keys):
        kept = plan.space.view(keep, i)
        dropped += int((~kept).sum())
        for t in range(TASKS):
            tau = finetuned[t][key] - theta0[key]
            assert torch.equal(masked[t][key], torch.where(kept, tau, torch.zeros(()))), (key, t)
    assert dropped == plan.drop_count(q) > 0
    data = _inputs(2)
    result = adamerging(theta0, masked, _net(), heads, _streams(data, 16), SCALE, granularity="layer", steps=5, lr=0.05)
    unmasked = adamerging(theta0, masked_task_vectors(plan_merge(theta0, finetuned, trust_region="off"), 1.0),
                          _net(), heads, _streams(data, 16), SCALE, granularity="layer", steps=5, lr=0.05)  # fmt: skip
    for i, key in enumerate(plan.space.keys):
        kept = plan.space.view(keep, i)
        assert torch.equal(result.merged[key][~kept], theta0[key][~kept]), key
        assert not torch.equal(result.merged[key][kept], theta0[key][kept]), key
        assert not torch.equal(unmasked.merged[key][~kept], theta0[key][~kept]), key  # the mask made the difference


def test_memory_estimate_and_refusal_in_one_line() -> None:
    # ViT-B/32 (87,849,216 merged coordinates, float32), 8 tasks, task-wise: (8 + 5)·P·4 + 16·8 bytes
    assert memory_bytes(8, 87_849_216, 4, 8) == 13 * 87_849_216 * 4 + 128
    check_memory(100, 100, "x")  # fits exactly: fine
    with pytest.raises(TatrError) as err:
        check_memory(10 * 2**30, 2**30, "8 task vectors of 87,849,216 coordinates (4-byte)")
    message = str(err.value)
    assert "\n" not in message and "10.00 GiB" in message and "1.00 GiB is available" in message
    assert "adamerging.max_memory_gib" in message


def test_bad_inputs_are_one_line_errors() -> None:
    theta0, tvs, heads = _setup()
    streams = _streams(_inputs(0), 16)
    cases = [
        ({"granularity": "block"}, "granularity must be one of task, layer"),
        ({"steps": 0}, "steps must be an integer ≥ 1"),
        ({"lr": float("nan")}, "lr must be a positive finite number"),
        ({"init": float("inf")}, "initial λ must be finite"),
    ]
    for kwargs, message in cases:
        with pytest.raises(TatrError, match=message):
            adamerging(theta0, tvs, _net(), heads, streams, SCALE, **kwargs)
    with pytest.raises(TatrError, match="one head and one input stream per task vector"):
        adamerging(theta0, tvs, _net(), heads[:2], streams, SCALE)
    with pytest.raises(TatrError, match="other keys than task vector 0"):
        adamerging(theta0, [tvs[0], {"0.weight": tvs[1]["0.weight"]}, tvs[2]], _net(), heads, streams, SCALE)


def test_labels_and_the_fixed_lambda_path_refuses() -> None:
    assert merge_label("adamerging-task") == "AdaMerging (task-wise)"
    assert merge_label("adamerging-layer", "zero-shot") == "AdaMerging (layer-wise)+TR"
    assert {METHODS.get(m).coefficients for m in ADAMERGING} == {"task", "layer"}
    theta0, tvs, _ = _setup()
    finetuned = [{k: theta0[k] + tv[k] for k in theta0} for tv in tvs]
    with pytest.raises(TatrError, match="learns its coefficients") as err:  # refused at the door, before any pass
        plan_merge(theta0, finetuned, method="adamerging-task", trust_region="off")
    assert "\n" not in str(err.value)


def test_seeded_batches_cover_each_pass_and_refuse_empty_sets() -> None:
    first = seeded_batches(10, 4, seed=1)
    batches = [next(first) for _ in range(4)]  # two passes of two full batches (2 items left out each)
    assert all(len(b) == 4 for b in batches)
    assert len(set(torch.cat(batches[:2]).tolist())) == 8 and len(set(torch.cat(batches[2:]).tolist())) == 8
    again = seeded_batches(10, 4, seed=1)
    assert all(torch.equal(b, next(again)) for b in batches)
    assert not torch.equal(next(seeded_batches(10, 4, seed=2)), batches[0])
    assert next(seeded_batches(3, 16, seed=0)).sort().values.tolist() == [0, 1, 2]  # fewer than a batch: all
    with pytest.raises(TatrError, match="split is empty"):
        seeded_batches(0, 16, seed=0)


# --- the suites ---------------------------------------------------------------------------------------
@pytest.mark.slow
def test_testbed_unlabeled_loader(tiny_testbed) -> None:
    from tatr.suites.testbed import build as tb

    suite = tiny_testbed
    task = suite.tasks[0]
    stream = suite.unlabeled_loader(task, "test")
    batch = next(stream)
    assert isinstance(batch, Tensor) and batch.shape[0] == 16  # inputs only, batch 16 by default
    x_test, _ = suite._split(task, "test")
    pool = tb.preprocess(x_test).flatten(1)
    per_pass = len(pool) // 16
    seen = torch.cat([batch] + [next(stream) for _ in range(per_pass - 1)]).flatten(1)
    matches = (seen[:, None, :] == pool[None, :, :]).all(-1)
    assert (matches.sum(1) >= 1).all()  # every input is a test input
    assert len({int(i) for i in matches.float().argmax(1)}) == 16 * per_pass  # one pass: no repeats
    assert torch.equal(next(suite.unlabeled_loader(task, "test", seed=0)), batch)  # seeded
    assert not torch.equal(next(suite.unlabeled_loader(task, "test", seed=1)), batch)
    assert not torch.equal(next(suite.unlabeled_loader(suite.tasks[1], "test")), batch)  # tasks differ
    x_val, _ = suite._split(task, "validation")
    val = next(suite.unlabeled_loader(task, "validation", batch_size=8)).flatten(1)
    assert val.shape[0] == 8 and (val[:, None, :] == tb.preprocess(x_val).flatten(1)[None]).all(-1).any(1).all()
    with pytest.raises(TatrError, match="unknown split"):
        suite.unlabeled_loader(task, "tests")


@pytest.mark.slow  # imports open_clip through the fixtures: seconds
def test_clip8_unlabeled_loader(tmp_path: Path) -> None:
    from torchvision.transforms.functional import pil_to_tensor

    from tatr.suites import get_suite
    from tatr.suites.clip8.data import load_task
    from tests.clip_fixtures import write_mnist

    write_mnist(tmp_path / "data", n_train=20, n_test=6)
    options = {"finetuned": "{task}.safetensors", "data_root": str(tmp_path / "data"), "tasks": ["MNIST"]}
    suite = get_suite("clip8", {**options, "num_workers": 0, "device": "cpu"}, tmp_path / "cache")
    data = load_task("MNIST", tmp_path / "data", lambda im: pil_to_tensor(im).float())
    suite._data["MNIST"] = data  # the eval transform needs open_clip's weights; any transform will do
    stream = suite.unlabeled_loader("MNIST", "test", batch_size=4, seed=3)
    batches = [next(stream) for _ in range(3)]
    assert all(isinstance(b, Tensor) and b.shape[0] == 4 for b in batches)  # inputs only
    test = torch.stack([data.split("test")[i][0] for i in range(6)]).flatten(1)
    for b in batches:
        hits = (b.flatten(1)[:, None, :] == test[None]).all(-1)
        assert hits.any(1).all() and len(set(hits.float().argmax(1).tolist())) == 4  # test inputs, no repeats
    again = suite.unlabeled_loader("MNIST", "test", batch_size=4, seed=3)
    assert torch.equal(next(again), batches[0])


# --- the run path -------------------------------------------------------------------------------------
@pytest.mark.slow
def test_an_ablation_with_adamerging_variants_writes_rows(tiny_testbed, tiny_testbed_cache: Path, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    from tatr.report.labels import method_label
    from tatr.runs import ablation_spec, ablations
    from tatr.store.rows import read_store

    monkeypatch.setenv("WANDB_MODE", "disabled")
    path = tmp_path / "ada.yaml"
    body = {
        "name": "ada",
        "benchmark": "testbed",
        "suite": {"preset": "tiny", "progress": False},
        "adamerging": {"steps": 3},
        "ablation": {
            "kind": "plugin",
            "q": [0.9, 0.99],
            "variants": [
                {"method": "adamerging-task", "trust_region": "off"},
                {"method": "adamerging-layer", "trust_region": "zero-shot"},
            ],
        },
    }
    path.write_text(json.dumps(body))
    config, spec = ablation_spec.load_ablation(path)
    tuned = ablations.run(config, spec, root=tmp_path / "results", cache_dir=tiny_testbed_cache, log=lambda _: None,
                          wandb=False)  # fmt: skip
    assert [len(t.trials) for t in tuned] == [1, 2]  # no trust region: one model; with it: one per q
    rows = read_store(tmp_path / "results")
    test = rows[(rows["split"] == "test") & rows["trial"].isna()]
    assert set(test["method"]) == {"adamerging-task", "adamerging-layer"}
    assert len(test) == 2 * len(tiny_testbed.tasks)
    layer = test[test["method"] == "adamerging-layer"]
    assert set(layer["q"]) <= {0.9, 0.99} and set(layer["trust_region"]) == {"zero-shot"}
    assert test["lam"].between(0, 1).all()  # the mean learned coefficient
    assert test[test["method"] == "adamerging-task"]["q"].isna().all()
    trials = rows[rows["trial"].notna()]
    assert len(trials) == 3 * len(tiny_testbed.tasks) and set(trials["split"]) == {"validation"}
    labels = {method_label(m, t) for m, t in zip(test["method"], test["trust_region"], strict=True)}
    assert labels == {"AdaMerging (task-wise)", "AdaMerging (layer-wise)+TR"}
    # the AdaMerging settings are part of a point's identity (resume), other methods' hashes unchanged
    point = ablation_spec.points(config, spec)[0]
    longer = config.model_copy(update={"adamerging": config.adamerging.model_copy(update={"steps": 4})})
    assert ablations.point_hash(config, spec, point) != ablations.point_hash(longer, spec, point)


@pytest.mark.slow
def test_memory_refusal_comes_before_any_task_vector_is_read(tiny_testbed, monkeypatch: pytest.MonkeyPatch) -> None:
    from tatr.runs import adamerging as glue
    from tatr.runs.config import AdaMergingConfig, ExperimentConfig, MergeConfig
    from tatr.runs.plan import PlanBook

    def never(*_: object) -> None:
        raise AssertionError("task vectors were read before the memory check")

    monkeypatch.setattr(glue, "masked_task_vectors", never)
    book = PlanBook(tiny_testbed, ExperimentConfig(), cache_root=tiny_testbed.cache_root)
    settings = AdaMergingConfig(max_memory_gib=1e-6)
    with pytest.raises(TatrError, match="AdaMerging needs about") as err:
        glue.learn(book, MergeConfig(method="adamerging-task", trust_region="off"), 1.0, settings)
    assert "\n" not in str(err.value)


def test_config_section_is_checked_at_the_door() -> None:
    from tatr.runs.config import load_config

    config = load_config(None, ["adamerging.steps=100", "adamerging.inputs=validation"])
    assert (config.adamerging.steps, config.adamerging.inputs, config.adamerging.lr) == (100, "validation", 1e-3)
    assert load_config(None).adamerging.model_dump() == {
        "steps": 500, "lr": 1e-3, "batch": 16, "batches_per_step": 2, "init": 0.3, "inputs": "test",
        "max_memory_gib": None,
    }  # fmt: skip
    for override, message in [
        ("adamerging.lr=.nan", "adamerging.lr"),
        ("adamerging.inputs=train", "adamerging.inputs"),
        ("adamerging.steps=0", "adamerging.steps"),
        ("adamerging.step=3", "did you mean 'adamerging.steps'"),
    ]:
        with pytest.raises(TatrError, match=message):
            load_config(None, [override])


def test_the_plugin_ablation_runs_adamerging_at_testbed_scale() -> None:
    from tatr.runs import ablation_spec

    plugin = Path(__file__).resolve().parents[1] / "experiments" / "ablations" / "plugin.yaml"
    config, spec = ablation_spec.load_ablation(plugin)
    assert (config.adamerging.steps, config.adamerging.inputs, config.adamerging.lr) == (100, "test", 1e-3)
    pairs = [(p.merge.method, p.merge.trust_region, p.qs) for p in ablation_spec.points(config, spec)]
    for method in ADAMERGING:
        assert [(mode, qs) for m, mode, qs in pairs if m == method] == [("off", (1.0,)), ("zero-shot", spec.q)]


def test_report_places_adamerging_beside_its_published_numbers(tmp_path: Path) -> None:
    """A plug-in ablation's AdaMerging rows meet the AdaMerging paper's rows of published.csv."""
    import pandas as pd

    from tatr.report import build as report
    from tatr.store.rows import append_rows
    from tatr.suites.clip8.data import TASKS as CLIP_TASKS

    for method, acc in (("adamerging-task", 70.0), ("adamerging-layer", 79.0)):
        run_id = f"ablation-plugin-{method}"
        rows = [
            {"run_id": run_id, "benchmark": "clip8", "model": "ViT-B-32", "split": "test", "task": task,
             "accuracy": acc, "normalized_accuracy": acc / 0.9, "job_type": "ablation", "ablation": "plugin",
             "method": method, "trust_region": "off", "lam": 0.3, "seed": 0, "timestamp": 1.7e9}
            for task in CLIP_TASKS
        ]  # fmt: skip
        append_rows(tmp_path, rows, run_id)
    published = Path(__file__).resolve().parents[1] / "results" / "reference" / "published.csv"
    report.generate(tmp_path, benchmarks=["clip8"], published=published, figures=False)
    ref = pd.read_csv(tmp_path / "clip8" / "tables" / "reference.csv", index_col=0)
    assert ref.at["ViT-B/32 AdaMerging (task-wise)", "Published"] == 71.1
    assert ref.at["ViT-B/32 AdaMerging (task-wise)", "Ours"] == pytest.approx(70.0)
    assert ref.at["ViT-B/32 AdaMerging (layer-wise)", "Published"] == 80.1
    assert ref.at["ViT-B/32 AdaMerging (layer-wise)", "Ours"] == pytest.approx(79.0)


def test_tatr_merge_and_sweeps_refuse_adamerging_at_the_door(tmp_path: Path, capsys) -> None:
    """Its coefficients are learned: `tatr merge` and a sweep space refuse it in one line, before any pass."""
    from safetensors.torch import save_file

    from tatr.cli import main
    from tatr.runs.sweep.space import check_value

    theta0, tvs, _ = _setup()
    save_file(theta0, tmp_path / "pre.safetensors")
    save_file({k: theta0[k] + tvs[0][k] for k in theta0}, tmp_path / "ft.safetensors")
    args = ["merge", "-p", str(tmp_path / "pre.safetensors"), "-f", str(tmp_path / "ft.safetensors")]
    code = main([*args, "--method", "adamerging-layer", "-o", str(tmp_path / "out.safetensors")])
    err = capsys.readouterr().err.strip()
    assert code != 0 and "learns its coefficients" in err and "\n" not in err
    assert not (tmp_path / "out.safetensors").exists()
    with pytest.raises(ValueError, match="learns its coefficients"):
        check_value("method", "adamerging-task")
