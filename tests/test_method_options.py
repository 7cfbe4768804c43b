"""A method owns its options: each is declared once (`tatr.core.options.Option`), and the config, the
`tatr merge` flags, the store columns, the search-space checks, the identity and the report labels follow.

The toy sparsifying method below has two options and is registered here only (the two registrations a
new method needs, `SPARSIFIERS.add` and `METHODS.add`); nothing else in tatr names it. Import-time
derivations (config fields, flags, columns) are shown in a fresh process that registers it first, as
`tatr.core.sparsify` and `tatr.core.methods` register the built-in ones; the rest in this process.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from core_helpers import make_models
from safetensors.torch import save_file

from tatr import merge
from tatr.cli import main
from tatr.core.errors import TatrError
from tatr.core.methods import METHODS
from tatr.core.options import SPARSIFIERS, all_options, check_options, get_option
from tatr.runs.config import MergeConfig, load_config
from tatr.runs.sweep.space import check_value

ROOT = Path(__file__).resolve().parents[1]

# The whole of a new sparsifying method with two options: its sparsifier, its options, its method.
TOY = textwrap.dedent(
    """
    import torch
    from tatr.core.methods import METHODS, MergeMethod
    from tatr.core.options import SPARSIFIERS, Option, SparsifierKind

    def toy_sparsifier(values, key):
        scale, every = values["toy_scale"], values["toy_every"]

        def for_task(task, tau):
            keep = (torch.arange(tau.numel()) % every == 0).view(tau.shape)
            return lambda x: torch.where(keep, x * scale, torch.zeros((), dtype=x.dtype))

        return for_task

    TOY_OPTIONS = (
        Option("toy_scale", float, 0.5, "--toy-scale", "Toy: scale of the kept entries", "Toy scale", "s",
               low=0.0, high=1.0, low_open=True),
        Option("toy_every", int, 2, "--toy-every", "Toy: keep every n-th entry", "Toy every", "n", low=1),
    )
    SPARSIFIERS.add("toy", SparsifierKind("toy", TOY_OPTIONS, make=toy_sparsifier))
    METHODS.add("toy", MergeMethod("toy", "Toy", "toy", False, "sum", 0.3, "a toy sparsifier"))
    """
)


@pytest.fixture()
def toy() -> Iterator[None]:
    exec(compile(TOY, "toy_method", "exec"), {})
    try:
        yield
    finally:
        METHODS._items.pop("toy", None)
        SPARSIFIERS._items.pop("toy", None)
    assert "toy" not in METHODS and all(o.name != "toy_scale" for o in all_options())


# --- in this process: the checks, the API, the search space and the labels read the registry -------
def test_toy_options_are_checked_merged_searched_and_labelled(toy: None) -> None:
    from tatr.report.labels import options_label

    with pytest.raises(TatrError, match=r"^Toy scale must be in \(0, 1\], got 2\.0$"):
        check_options({"toy_scale": 2.0})
    with pytest.raises(TatrError, match=r"^Toy every must be an integer in \[1, ∞\), got 0$"):
        check_options({"toy_every": 0})
    with pytest.raises(TatrError, match=r"unknown merge option 'toy_scal'; did you mean 'toy_scale'"):
        check_options({"toy_scal": 0.5})
    with pytest.raises(ValueError, match=r"^Toy scale must be in \(0, 1\], got 2\.0$"):
        check_value("toy_scale", 2.0)  # the search space's check is the declaration's
    check_value("toy_scale", 0.25)

    pre, tasks = make_models(2)
    with pytest.raises(TatrError, match=r"Toy scale must be in \(0, 1\], got 2\.0"):
        merge(pre, tasks, method="toy", toy_scale=2.0)
    merged = merge(pre, tasks, method="toy", trust_region="off", lam=1.0, toy_scale=0.5, toy_every=1)
    key = "blocks.0.attn.weight"
    expected = pre[key] + 0.5 * sum(t[key] - pre[key] for t in tasks)
    assert torch.allclose(merged[key], expected, atol=1e-6)
    assert not torch.equal(merge(pre, tasks, method="toy", trust_region="off", toy_every=3)[key], merged[key])

    assert options_label("toy", {"toy_scale": 0.5, "toy_every": 3}) == "s=0.5 n=3"
    assert options_label("ties-sum", {"ties_k": 20.0}) == "k=20%"
    assert options_label("dare", {"dare_p": 0.5, "dare_seed": 0}) == "p=0.5 seed=0"
    assert options_label("ta", {"ties_k": 20.0}) == ""


# --- in a fresh process: what is derived when the upper layers are imported --------------------------
PROBE = textwrap.dedent(
    """
    import json, sys
    exec(open(sys.argv[1]).read())  # register the toy method, as tatr.core.methods registers its own
    from click.testing import CliRunner
    from tatr.cli.merge import command
    from tatr.core.errors import TatrError
    from tatr.runs.ablation_spec import Variant
    from tatr.runs.config import MergeConfig, load_config
    from tatr.runs.sweep import space
    from tatr.store import schema

    out = {}
    out["fields"] = list(MergeConfig.model_fields)
    out["variant"] = "toy_scale" in Variant.model_fields and "toy_every" in Variant.model_fields
    try:
        load_config(None, ["merge.method=toy", "merge.toy_scale=1.5"])
    except TatrError as exc:
        out["config_error"] = str(exc)
    out["identity_toy"] = MergeConfig(method="toy", toy_scale=0.25).identity()
    out["identity_ta"] = MergeConfig(method="ta", toy_scale=0.25).identity()
    out["columns"] = list(schema.COLUMNS)
    out["numbers"], out["integers"] = list(schema.NUMBERS), list(schema.INTEGERS)
    out["params"] = list(space.PARAMS)
    out["help"] = CliRunner().invoke(command, ["--help"]).output
    out["cli"] = str(CliRunner().invoke(command, sys.argv[2:]).exception)  # the TatrError `tatr` prints
    print(json.dumps(out))
    """
)


def test_a_new_method_gets_a_field_flag_column_identity_and_search_space(tmp_path: Path) -> None:
    toy_file = tmp_path / "toy.py"
    toy_file.write_text(TOY)
    pre, tasks = make_models(2)
    save_file(pre, tmp_path / "pre.safetensors")
    save_file(tasks[0], tmp_path / "a.safetensors")
    argv = ["-p", tmp_path / "pre.safetensors", "-f", tmp_path / "a.safetensors", "--method", "toy"]
    argv += ["--toy-every", "0", "-o", tmp_path / "m.safetensors"]
    proc = subprocess.run(
        [sys.executable, "-c", PROBE, str(toy_file), *map(str, argv)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    last = [o.name for o in all_options() if any(o in k.options for k in SPARSIFIERS.values())][-1]  # built-in
    after = out["fields"][out["fields"].index(last) + 1 :]
    assert after[:2] == ["toy_scale", "toy_every"] and out["variant"]  # the sparsifiers' options, then the combiners'

    assert out["config_error"] == "merge.toy_scale: Toy scale must be in (0, 1], got 1.5"
    assert out["identity_toy"]["toy_scale"] == 0.25 and out["identity_toy"]["toy_every"] == 2
    assert "toy_scale" not in out["identity_ta"] and "toy_every" not in out["identity_ta"]
    assert out["columns"][out["columns"].index(last) + 1 :][:2] == ["toy_scale", "toy_every"]
    assert "toy_scale" in out["numbers"] and "toy_every" in out["integers"]
    assert "toy_scale" in out["params"] and "toy_every" not in out["params"]  # an integer is set, not searched
    assert "--toy-scale" in out["help"] and "Toy: keep every n-th entry" in out["help"]
    assert "Toy every must be an integer in [1, ∞), got 0" in out["cli"]
    assert not (tmp_path / "m.safetensors").exists()


# --- the existing options: one check, one message, at every door --------------------------------------
BAD = [
    ("ties_k", "ties-sum", 101.0, "ties_k must be in (0, 100], got 101.0"),
    ("dare_p", "dare", 1.0, "DARE drop rate p must be in [0, 1), got 1.0"),
    ("dare_seed", "dare", -1, "DARE seed must be a non-negative integer, got -1"),
    ("breadcrumbs_beta", "breadcrumbs", 1.5, "Breadcrumbs β (beta) must be in [0, 1], got 1.5"),
    ("breadcrumbs_density", "breadcrumbs", 1.2, "Breadcrumbs density must be in [0, 1], got 1.2"),
]


@pytest.mark.parametrize(("name", "method", "value", "message"), BAD)
def test_a_bad_option_is_refused_alike_by_the_api_config_cli_and_space(
    name: str, method: str, value: object, message: str, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    pre, tasks = make_models(2)
    with pytest.raises(TatrError) as api:
        merge(pre, tasks, method=method, **{name: value})
    assert str(api.value) == message
    with pytest.raises(TatrError) as config:
        load_config(None, [f"merge.method={method}", f"merge.{name}={value}"])
    assert str(config.value) == f"merge.{name}: {message}"
    if get_option(name).searchable:
        with pytest.raises(ValueError) as space:
            check_value(name, value)
        assert str(space.value) == message
    save_file(pre, tmp_path / "pre.safetensors")
    save_file(tasks[0], tmp_path / "a.safetensors")
    flag = get_option(name).flag
    argv = ["merge", "-p", tmp_path / "pre.safetensors", "-f", tmp_path / "a.safetensors", "--method", method]
    code = main([*map(str, argv), flag, str(value), "-o", str(tmp_path / "m.safetensors")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err == f"tatr: error: {message}"


def test_the_declarations_give_todays_config_columns_and_identity() -> None:
    """The derived facts equal the ones the first stores were written with."""
    from tatr.store import schema

    options = ("ties_k", "dare_p", "dare_seed", "breadcrumbs_beta", "breadcrumbs_density")
    options += ("mergekit_density", "mergekit_rescale", "mergekit_dare_rescale", "mergekit_gamma")  # issue 22
    combined = ("tall_mask_lambda", "consensus_k", "common_space_fraction")  # the combiners' (issue 20)
    combined += ("fisher_normalize", "minimal_fisher_weight", "regmean_reduce_ratio")  # registered after them
    assert (*options, *combined) == schema.METHOD_OPTIONS
    assert schema.COLUMNS[schema.COLUMNS.index("lam_neg") + 1 :][:16] == (*options, *combined, "components")
    assert list(MergeConfig.model_fields) == [
        *("method", "trust_region", "q", "lam", "ties_k", "components", "lam_neg"),
        *options[1:],
        *combined,
    ]
    assert {k: f.default for k, f in MergeConfig.model_fields.items() if k in (*options, *combined)} == {
        "ties_k": 20.0,
        "dare_p": 0.5,
        "dare_seed": 0,
        "breadcrumbs_beta": 0.01,
        "breadcrumbs_density": 0.9,
        "mergekit_density": 1.0,
        "mergekit_rescale": 0,
        "mergekit_dare_rescale": 1,
        "mergekit_gamma": 0.01,
        "tall_mask_lambda": 0.6,
        "consensus_k": 2,
        "common_space_fraction": 0.8,
        "fisher_normalize": 1,
        "minimal_fisher_weight": 1e-6,
        "regmean_reduce_ratio": 0.95,
    }
    assert set(MergeConfig().identity()) == {"method", "trust_region", "q", "lam", "ties_k", "components"}
    assert set(MergeConfig(method="breadcrumbs").identity()) >= {"ties_k", "breadcrumbs_beta", "breadcrumbs_density"}


# --- modes, components and splits: checked against their registries ------------------------------------
@pytest.mark.parametrize(
    ("override", "needle"),
    [
        ("merge.trust_region=zero-shoot", "merge.trust_region: unknown trust-region mode 'zero-shoot'; did you mean"),
        ("merge.components=[orthogonl]", "merge.components.0: unknown component 'orthogonl'; did you mean"),
        ("split=tset", "split: unknown split 'tset'; did you mean 'test'?"),
    ],
)
def test_unknown_names_get_did_you_mean(override: str, needle: str) -> None:
    with pytest.raises(TatrError) as caught:
        load_config(None, [override])
    assert needle in str(caught.value) and "\n" not in str(caught.value)


def test_ablation_names_are_checked_against_the_registries(tmp_path: Path) -> None:
    from tatr.runs.ablation_spec import load_ablation

    path = tmp_path / "abl.yaml"
    path.write_text("ablation:\n  kind: trust-region\n  tune_split: valdation\n  variants: [{trust_region: off}]\n")
    with pytest.raises(TatrError, match=r"ablation.tune_split: unknown split 'valdation'; did you mean 'validation'"):
        load_ablation(path)
    path.write_text("ablation:\n  kind: trust-region\n  variants: [{trust_region: exemplr}]\n  q: [1.5]\n")
    with pytest.raises(TatrError, match=r"unknown trust-region mode 'exemplr'; did you mean 'exemplar'"):
        load_ablation(path)
    path.write_text("ablation:\n  kind: trust-region\n  variants: [{trust_region: off}]\n  q: [1.5]\n")
    with pytest.raises(TatrError, match=r"ablation: q must be in \(0, 1\], got 1\.5"):
        load_ablation(path)


# --- a per-key combiner: the T masked task vectors of a tensor together ------------------------------
@pytest.fixture()
def toy_combiner() -> Iterator[list[int]]:
    """'toy-max': per coordinate, the task vector entry of largest magnitude (a combiner with an option)."""
    from tatr.core.methods import MergeMethod
    from tatr.core.options import COMBINERS, CombinerKind, Option

    seen: list[int] = []

    def combine(key, taus, theta0, values):
        seen.append(len(taus))
        stacked = torch.stack(taus)
        pick = stacked.abs().argmax(dim=0, keepdim=True)
        return values["toy_gain"] * stacked.gather(0, pick)[0]

    gain = Option("toy_gain", float, 1.0, "--toy-gain", "Toy combiner: gain", "Toy gain", "g", low=0.0, high=4.0)
    COMBINERS.add("toy-max", CombinerKind("toy-max", combine, (gain,)))
    METHODS.add("toy-max", MergeMethod("toy-max", "Toy max", "none", False, "sum", 1.0, "toy", combine="toy-max"))
    try:
        yield seen
    finally:
        METHODS._items.pop("toy-max", None)
        COMBINERS._items.pop("toy-max", None)
    assert all(o.name != "toy_gain" for o in all_options())


def test_a_combiner_sees_the_masked_task_vectors_of_each_tensor_together(toy_combiner: list[int]) -> None:
    pre, tasks = make_models(3)
    assert not METHODS.get("toy-max").linear
    assert "toy_gain" in METHODS.get("toy-max").options
    merged = merge(pre, tasks, method="toy-max", trust_region="off", lam=0.5, toy_gain=2.0)
    assert toy_combiner and set(toy_combiner) == {3}
    for key in pre:
        if not pre[key].is_floating_point():
            continue
        stacked = torch.stack([t[key] - pre[key] for t in tasks])
        biggest = stacked.gather(0, stacked.abs().argmax(dim=0, keepdim=True))[0]
        assert torch.allclose(merged[key], pre[key] + 0.5 * 2.0 * biggest, atol=1e-6), key
    with pytest.raises(TatrError, match=r"Toy gain must be in \[0, 4\], got 5\.0"):
        merge(pre, tasks, method="toy-max", toy_gain=5.0)
    # the trust region masks each τ_t before the combiner: dropped coordinates take no task's entry
    masked = merge(pre, tasks, method="toy-max", trust_region="zero-shot", q=0.5, lam=1.0)
    plain = merge(pre, tasks, method="toy-max", trust_region="off", lam=1.0)
    moved = sum(int((masked[k] != pre[k]).sum()) for k in pre if pre[k].is_floating_point())
    assert 0 < moved < sum(int((plain[k] != pre[k]).sum()) for k in pre if pre[k].is_floating_point())
