"""Careless and hostile config input: YAML alias bombs, non-finite or out-of-range numbers, unsafe names.

Every refusal is one line naming the file (or the override) and the key, and comes before any
suite is built or any row is stored.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

import tests.sweep_fixtures  # noqa: F401  (registers the sweep-toy suite)
from tatr.cli import main
from tatr.core.errors import TatrError
from tatr.io.safe_yaml import read_yaml_mapping
from tatr.runs import ablation_spec
from tatr.runs.config import load_config
from tatr.runs.sweep.space import load_search_space
from tatr.suites import get_suite
from tatr.suites.evaluation import evaluate_merged

# "billion laughs": 9 levels of 10 aliases is 10^9 leaves from a file of under 1 kB
BOMB = "a: &a [lol, lol, lol, lol, lol, lol, lol, lol, lol, lol]\n" + "".join(
    f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join(['*' + chr(97 + i)] * 10)}]\n" for i in range(8)
)


def one_line(exc: pytest.ExceptionInfo[TatrError]) -> str:
    text = str(exc.value)
    assert "\n" not in text, text
    return text


@pytest.mark.parametrize(
    ("body", "line"),
    [
        (BOMB, 2),
        ("name: &n testbed\nbenchmark: *n\n", 2),  # even a harmless alias: refused, not expanded
        ("merge:\n  <<: &m {q: 0.5}\n  lam: 0.3\nexemplars: {<<: *m}\n", 4),
    ],
)
def test_yaml_aliases_are_refused_in_experiment_files(tmp_path: Path, body: str, line: int) -> None:
    path = tmp_path / "exp.yaml"
    path.write_text(body)
    start = time.perf_counter()
    with pytest.raises(TatrError, match="aliases") as info:
        load_config(path)
    assert time.perf_counter() - start < 2
    assert one_line(info).startswith(f"{path}:{line}: ")


def test_yaml_aliases_are_refused_in_ablation_and_sweep_files(tmp_path: Path) -> None:
    ablation = tmp_path / "abl.yaml"
    ablation.write_text("benchmark: testbed\n" + BOMB + "ablation: {kind: plugin, variants: [{}], lam: *i}\n")
    with pytest.raises(TatrError, match="aliases") as info:
        ablation_spec.load_ablation(ablation)
    assert one_line(info).startswith(f"{ablation}:3: ")
    space = tmp_path / "space.yaml"
    space.write_text("params:\n  lam: &r {low: 0.1, high: 1.0}\n  q: *r\n")
    with pytest.raises(TatrError, match="aliases") as info:
        load_search_space(space)
    assert one_line(info).startswith(f"{space}:3: ")


def test_yaml_aliases_are_refused_in_overrides(tmp_path: Path) -> None:
    with pytest.raises(TatrError, match="aliases"):
        load_config(None, ["suite={a: &a [x, x], b: *a}"])
    path = tmp_path / "abl.yaml"
    path.write_text(json.dumps({"benchmark": "testbed", "ablation": {"kind": "plugin", "variants": [{}]}}))
    with pytest.raises(TatrError, match="aliases"):
        ablation_spec.load_ablation(path, ["ablation.lam=&l [0.1, *l]"])


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"\xff\xfe\x00\x01 not text", "not a text file"),
        (b"[" * 50_000, "nested too deeply|not valid YAML"),
        (b"- just\n- a list\n", "must be a mapping"),
        (b"key: [unclosed\n", "not valid YAML"),
    ],
)
def test_unreadable_yaml_files_get_one_line(tmp_path: Path, content: bytes, message: str) -> None:
    path = tmp_path / "bad.yaml"
    path.write_bytes(content)
    with pytest.raises(TatrError, match=message) as info:
        read_yaml_mapping(path, "experiment file")
    assert one_line(info).startswith(f"{path}:")


# --- numbers and names ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("merge.lam=.nan", "merge.lam"),
        ("merge.lam=.inf", "merge.lam"),
        ("merge.lam=-.inf", "merge.lam"),
        ("merge.lam=1e400", "merge.lam"),
        ("merge.q=.nan", "merge.q"),
        ("merge.q=0", "merge.q"),
        ("merge.q=1.0000001", "merge.q"),
        ("merge.ties_k=0", "merge.ties_k"),
        ("merge.ties_k=100.5", "merge.ties_k"),
        ("merge.ties_k=.nan", "merge.ties_k"),
        ("exemplars.n=0", "exemplars.n"),
        ("exemplars.n=-3", "exemplars.n"),
        ("exemplars.seed=-1", "exemplars.seed"),
        ("seed=-1", "seed"),
        ("name=../victim", "name"),
        ("name=a/b", "name"),
        ("benchmark=../victim", "benchmark"),
        ("benchmark=''", "benchmark"),
    ],
)
def test_bad_numbers_and_names_in_configs_get_one_line(tmp_path: Path, override: str, key: str) -> None:
    with pytest.raises(TatrError) as info:
        load_config(None, [override])
    assert one_line(info).startswith(f"{key}: ")
    path = tmp_path / "exp.yaml"  # the same value in a file names the file
    dotted, value = override.split("=", 1)
    nested: dict = {}
    node = nested
    *parents, last = dotted.split(".")
    for part in parents:
        node = node.setdefault(part, {})
    node[last] = "PLACEHOLDER"
    path.write_text(json.dumps(nested).replace('"PLACEHOLDER"', value if value != "''" else '""'))
    with pytest.raises(TatrError) as info:
        load_config(path)
    assert one_line(info).startswith(f"{path}: {key}: ")


@pytest.mark.parametrize("lam", ["-0.5", "0", "-1e3", "2.5"])
def test_finite_lambda_of_either_sign_is_allowed(lam: str) -> None:
    """Task negation (λ < 0) is real; only non-finite λ is refused."""
    assert load_config(None, [f"merge.lam={lam}"]).merge.lam == float(lam)


@pytest.mark.parametrize(
    ("block", "key"),
    [
        ({"lam": [0.1, ".nan"]}, "ablation.lam.1"),
        ({"lam": [".inf"]}, "ablation.lam.0"),
        ({"q": [0.9, ".nan"]}, "ablation.q.1"),
        ({"drops": [".inf"], "kind": "mask-ratio"}, "ablation.drops.0"),
        ({"seeds": [-1]}, "ablation.seeds.0"),
        ({"exemplars": [0], "kind": "exemplar-count"}, "ablation"),
        ({"variants": [{"ties_k": ".nan"}]}, "ablation.variants.0.ties_k"),
        ({"max_coordinates": 0}, "ablation.max_coordinates"),
    ],
)
def test_ablation_grids_must_be_finite_and_in_range(tmp_path: Path, block: dict, key: str) -> None:
    spec = {"kind": "plugin", "variants": [{}], **block}
    path = tmp_path / "abl.yaml"
    text = json.dumps({"benchmark": "testbed", "ablation": spec})
    path.write_text(text.replace('".nan"', ".nan").replace('".inf"', ".inf"))
    with pytest.raises(TatrError) as info:
        ablation_spec.load_ablation(path)
    assert one_line(info).startswith(f"{path}: {key}")


def test_evaluate_refuses_non_finite_lambda_before_building(tmp_path: Path, capsys, monkeypatch) -> None:
    monkeypatch.setenv("TATR_CACHE", str(tmp_path / "cache"))
    config = tmp_path / "exp.yaml"
    config.write_text("benchmark: sweep-toy\nsuite: {tasks: 2, n: 16}\n")
    assert main(["evaluate", str(config), "merge.lam=.nan"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"tatr: error: {config}: merge.lam: ") and "\n" not in err
    assert not (tmp_path / "cache").exists()  # nothing was built


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_a_merged_model_with_non_finite_values_is_not_evaluated(tmp_path: Path, monkeypatch, bad: float) -> None:
    """Whatever produced it (a merge from outside, an overflow), a NaN model is refused, not scored."""
    monkeypatch.setenv("TATR_CACHE", str(tmp_path / "cache"))
    suite = get_suite("sweep-toy", {"tasks": 2, "n": 16})
    from tatr.core.checkpoints import load_state_dict

    state = load_state_dict(suite.checkpoints().pretrained)
    key = sorted(state)[-1]
    state[key] = state[key].clone()
    state[key].view(-1)[-1] = bad
    with pytest.raises(TatrError, match=f"NaN or infinite values in '{key}'") as info:
        evaluate_merged(suite, state, "validation")
    assert "\n" not in str(info.value)
    state[key].view(-1)[-1] = 0.0
    assert set(evaluate_merged(suite, state, "validation").accuracy) == set(suite.tasks)


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("n_train", 0),
        ("n_test", -5),
        ("pretrain_steps", 0),
        ("finetune_batch", 0),
        ("width", 2.5),
        ("layers", "3"),
        ("heads", True),
        ("pretrain_lr", float("nan")),
        ("finetune_lr", float("inf")),
        ("logit_scale", 0.0),
        ("weight_decay", -0.1),
        ("seed", -1),
    ],
)
def test_testbed_sizes_must_be_positive(option: str, value: object) -> None:
    from tatr.suites.testbed import spec_from_options

    with pytest.raises(TatrError, match=f"suite.{option} must be") as info:
        spec_from_options({"preset": "tiny", option: value})
    one_line(info)


def test_testbed_zero_rates_and_seeds_that_may_be_zero_are_allowed() -> None:
    from tatr.suites.testbed import spec_from_options

    spec = spec_from_options({"preset": "tiny", "weight_decay": 0, "seed": 0, "logit_scale": 10})
    assert (spec.weight_decay, spec.seed, spec.logit_scale, spec.n_train) == (0, 0, 10, 128)


def test_evaluate_refuses_a_bad_suite_size_before_building(tmp_path: Path, capsys, monkeypatch) -> None:
    monkeypatch.setenv("TATR_CACHE", str(tmp_path / "cache"))
    config = str(Path(__file__).resolve().parents[1] / "experiments" / "testbed.yaml")
    assert main(["evaluate", config, "suite.preset=tiny", "suite.n_val=0"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("tatr: error: suite.n_val must be positive") and "\n" not in err
    assert not (tmp_path / "cache").exists()
