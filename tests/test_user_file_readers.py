"""Every reader of a user's file (tasks, the store, configs, W&B tables) and the words in them.

* Task and class names are plain names (`tatr.core.outputs.safe_name`), refused when the tasks are
  read, before anything is built or written.
* Any failure to parse a file is one line `<file>:<line>: <problem>`: a CSV field over the csv
  module's limit, JSON nested 100,000 deep, an integer of 5,000 digits, a file over its size limit.
* `off`, `on`, `yes` and `no` are words, not booleans, wherever tatr reads YAML (overrides,
  experiment, ablation and search-space files): `merge.trust_region=off` is the mode "off". A
  bool field still takes them as booleans, and a name field takes a number back as its text.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import tests.sweep_fixtures  # noqa: F401  (registers the sweep-toy suite)
from tatr.cli import main
from tatr.core.errors import TatrError
from tatr.io.safe_yaml import read_yaml_mapping
from tatr.report import wandb_rows
from tatr.runs import ablation_spec
from tatr.runs.config import load_config
from tatr.runs.sweep.space import load_search_space
from tatr.store import rows as store
from tatr.suites import get_suite
from tatr.suites.text_tasks import read_rows, read_tasks_file

REPO = Path(__file__).resolve().parents[1]
TESTBED_YAML = REPO / "experiments" / "testbed.yaml"
DEEP = "[" * 100_000  # nested 100,000 deep: `RecursionError` in json, not a `JSONDecodeError`


def one_line(info: pytest.ExceptionInfo[TatrError]) -> str:
    text = str(info.value)
    assert "\n" not in text and len(text) < 1000, text[:2000]
    return text


def cli_error(capsys: pytest.CaptureFixture[str], *argv: object) -> str:
    assert main([str(a) for a in argv]) == 2
    captured = capsys.readouterr()
    err = captured.err
    assert err.startswith("tatr: error: ") and err.count("\n") == 1, err[:2000]
    return err.strip()


def tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def task_folder(tmp_path: Path, entry: dict, rows: list[dict] | None = None) -> Path:
    """A tasks.yaml with one task (`entry`, file `t.jsonl` by default) and its JSONL rows."""
    folder = tmp_path / "tasks"
    folder.mkdir(parents=True, exist_ok=True)
    rows = rows if rows is not None else [{"text": f"text {i}", "label": "ab"[i % 2]} for i in range(8)]
    (folder / "t.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / "tasks.yaml").write_text(json.dumps({"tasks": [{"file": "t.jsonl", **entry}]}))
    return folder / "tasks.yaml"


def stub_model(tmp_path: Path) -> Path:
    """Enough of a model folder for the text suite to get as far as reading its tasks."""
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    return folder


# --- 3: task and class names are plain names -----------------------------------------------------------
@pytest.mark.parametrize(
    ("entry", "rows", "message"),
    [
        ({"name": "../../../victim/evil"}, None, "task name '../../../victim/evil' is not a safe name"),
        ({"name": "a/b"}, None, "task name 'a/b' is not a safe name"),
        ({"name": ".hidden"}, None, "task name '.hidden' is not a safe name"),
        ({"name": "ok", "labels": {"a/b": "x", "b": "y"}}, None, "class 'a/b' is not a safe name"),
        (
            {"name": "ok"},
            [{"text": "t", "label": "a/b"}, {"text": "u", "label": "c"}],
            "class 'a/b' is not a safe name",
        ),
        ({"name": "ok"}, [{"text": "t", "label": ".."}, {"text": "u", "label": "c"}], "class '..' is not a safe name"),
    ],
)
def test_unsafe_task_and_class_names_are_one_line_and_nothing_is_written(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], entry: dict, rows: list | None, message: str
) -> None:
    tasks = task_folder(tmp_path, entry, rows)
    with pytest.raises(TatrError, match=message) as info:
        read_tasks_file(tasks)
    assert one_line(info).startswith(f"{tasks}: tasks[0]: ") or one_line(info).startswith(str(tasks.parent))
    model = stub_model(tmp_path)
    experiment = tmp_path / "exp.yaml"
    experiment.write_text(json.dumps({"benchmark": "text", "suite": {"model": str(model), "tasks": str(tasks)}}))
    before = tree(tmp_path)
    with pytest.raises(TatrError, match=message):
        get_suite("text", {"model": str(model), "tasks": str(tasks)}, tmp_path / "cache")
    assert message in cli_error(capsys, "evaluate", experiment, "--cache-dir", tmp_path / "cache")
    assert tree(tmp_path) == before and not (tmp_path / "cache").exists()  # nothing written, anywhere


def test_a_task_named_by_a_number_is_that_name(tmp_path: Path) -> None:
    tasks = task_folder(tmp_path, {})
    tasks.write_text("tasks:\n  - {name: 2024, file: t.jsonl}\n")
    assert [t.name for t in read_tasks_file(tasks)] == ["2024"]
    assert [t.name for t in read_tasks_file(tasks, ["2024"])] == ["2024"]
    from tatr.suites.text import spec_from_options

    assert spec_from_options({"only": [2024]}).only == ("2024",)


# --- 5: every failure to parse a user's file is one line `<file>:<line>: <problem>` ----------------------
def test_a_csv_header_over_the_field_limit_is_one_line(tmp_path: Path) -> None:
    path = tmp_path / "big.csv"
    path.write_text("text," + "x" * 200_000 + "\nhello,a\n")
    with pytest.raises(TatrError, match="longer than 131,072 characters") as info:
        read_rows(path, "text", "label")
    assert one_line(info).startswith(f"{path}:1: not valid CSV")


def test_a_csv_field_over_the_limit_names_its_line(tmp_path: Path) -> None:
    path = tmp_path / "big.csv"
    path.write_text("text,label\nhello,a\n" + "y" * 200_000 + ",b\n")
    with pytest.raises(TatrError, match="not valid CSV") as info:
        read_rows(path, "text", "label")
    assert one_line(info).startswith(f"{path}:3: ")


def test_jsonl_nested_100000_deep_in_a_task_file_is_one_line(tmp_path: Path) -> None:
    path = tmp_path / "t.jsonl"
    path.write_text('{"text": "hi", "label": "a"}\n' + DEEP + "\n")
    with pytest.raises(TatrError, match="nested") as info:
        read_rows(path, "text", "label")
    assert one_line(info).startswith(f"{path}:2: not JSON")


def test_bad_jsonl_and_bad_bytes_in_task_files_name_the_line(tmp_path: Path) -> None:
    path = tmp_path / "t.jsonl"
    path.write_text('{"text": "hi", "label": "a"}\n\n{"text": "x", "label": ' + "1" * 5000 + "}\n")
    with pytest.raises(TatrError) as info:
        read_rows(path, "text", "label")
    assert one_line(info).startswith(f"{path}:3: not JSON")
    path.write_bytes(b'{"text": "hi", "label": "a"}\n{"text": "\xff", "label": "b"}\n')
    with pytest.raises(TatrError, match="line 2 has a byte that is not UTF-8") as info:
        read_rows(path, "text", "label")
    one_line(info)


def test_a_json_string_may_hold_a_line_separator(tmp_path: Path) -> None:
    """U+2028 is valid inside a JSON string (ensure_ascii=False writes it raw); only "\\n" ends a JSON line."""
    path = tmp_path / "t.jsonl"
    path.write_text(json.dumps({"text": "one\u2028two", "label": "a"}, ensure_ascii=False) + "\n", encoding="utf-8")
    assert read_rows(path, "text", "label") == [("one\u2028two", "a")]


def test_tasks_yaml_errors_are_one_line_with_the_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    tasks = task_folder(tmp_path, {"name": "t"})
    tasks.write_text("tasks:\n  - name: t\n    file: t.jsonl\n    labels: {a: x, b: [unclosed\n")
    with pytest.raises(TatrError, match="not valid YAML") as info:
        read_tasks_file(tasks)
    assert one_line(info).startswith(f"{tasks}:5: ")
    tasks.write_text("tasks:\n  - {name: t, file: t.jsonl, 1: x, b: y}\n")  # keys of two types
    with pytest.raises(TatrError, match="unknown key '1'") as info:
        read_tasks_file(tasks)
    one_line(info)
    tasks.write_text("tasks:\n  - {name: t, file: t.jsonl}\n" + "# padding\n" * 200)
    from tatr.io import safe_yaml

    monkeypatch.setattr(safe_yaml, "MAX_YAML_BYTES", 1000)
    with pytest.raises(TatrError, match="MiB limit of this tasks file") as info:
        read_tasks_file(tasks)
    assert one_line(info).startswith(f"{tasks}: ")


def test_store_files_nested_deep_or_over_the_limit_are_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = store.store_dir(tmp_path)
    folder.mkdir(parents=True)
    path = folder / "run.jsonl"
    path.write_text("\n" + DEEP + "\n")
    with pytest.raises(TatrError, match="nested 100,000 levels deep") as info:
        store.read_store(tmp_path)
    assert one_line(info).startswith(f"{path}:2: not a JSON row")
    assert f"{path}:2: " in cli_error(capsys, "report", "--root", tmp_path, "--tables-only")
    path.write_text("{}\n" * 100)
    monkeypatch.setattr(store, "MAX_STORE_FILE_BYTES", 10)
    with pytest.raises(TatrError, match="limit of this store file") as info:
        store.read_store(tmp_path)
    assert one_line(info).startswith(f"{path}: ")


class _Table:
    def __init__(self, path: str, body: bytes) -> None:
        self.path, self.body = path, body

    def download(self, root: str, replace: bool = False) -> None:
        target = Path(root) / self.path
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(self.body)


class _Run:
    def __init__(self, body: bytes) -> None:
        self.id, self.group, self.job_type, self.commit, self.created_at = "r1", "s", "final", None, 1.0
        self.config = {"benchmark": "testbed", "merge": {"method": "ta", "trust_region": "off", "lam": 0.3}}
        self.summary = {"test/accuracy/digits": 70.0, "accuracy_table": {"_type": "table-file", "path": "t.json"}}
        self.body = body

    def file(self, path: str) -> _Table:
        return _Table(path, self.body)


class _Api:
    def __init__(self, body: bytes) -> None:
        self.body = body

    def runs(self, path: str) -> list[_Run]:
        return [_Run(self.body)]


@pytest.mark.parametrize(
    ("body", "line", "message"),
    [
        (b'{"columns": ["task", "split",\n "normalized_accuracy"], "data": [[}', 2, "not JSON"),
        (DEEP.encode(), 1, "nested 100,000 levels deep"),
        (b'{"columns": ["task"], "data": 7}', None, "'columns' and 'data' must be lists"),
        (b'{"columns": ["task", "split", "normalized_accuracy"], "data": [["digits"]]}', None, "data row 1"),
        (b"\xff\xfe", None, "not a text file"),
    ],
)
def test_a_broken_wandb_table_file_is_one_line(tmp_path: Path, body: bytes, line: int | None, message: str) -> None:
    with pytest.raises(TatrError, match=message) as info:
        wandb_rows.rows_from_wandb("team/tatr", api=_Api(body))
    text = one_line(info)
    assert "t.json" in text and (line is None or f"t.json:{line}: " in text)


def test_a_good_wandb_table_still_gives_normalized_accuracies() -> None:
    body = json.dumps({"columns": ["task", "split", "normalized_accuracy"], "data": [["digits", "test", 80.0]]})
    rows = wandb_rows.rows_from_wandb("team/tatr", api=_Api(body.encode()))
    assert rows["normalized_accuracy"].tolist() == [80.0]


@pytest.mark.parametrize(
    ("body", "line", "message"),
    [
        ("name: x\nmerge:\n  q: [0.5\nseed: 0\n", 4, "not valid YAML"),
        ("name: x\nseed: " + "1" * 5000 + "\n", 2, "not valid YAML"),  # int() refuses 5,000 digits: ValueError
        ("name: x\nsuite: {a: !!float nope}\n", 2, "not valid YAML"),
        ("name: x\nmerge:\n  q: " + "[" * 50_000 + "\n", 3, "nested too deeply"),
        ("name: x\nbenchmark: &b testbed\nname: *b\n", 3, "aliases"),
        ("a: 1\n---\nb: 2\n", 2, "not valid YAML"),
        ("name: x\nseed: 0\x00\n", 2, "not valid YAML"),
    ],
)
def test_config_files_that_do_not_parse_are_one_line_with_the_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], body: str, line: int, message: str
) -> None:
    path = tmp_path / "exp.yaml"
    path.write_text(body)
    with pytest.raises(TatrError, match=message) as info:
        load_config(path)
    assert one_line(info).startswith(f"{path}:{line}: ")
    assert cli_error(capsys, "evaluate", path).startswith(f"tatr: error: {path}:{line}: ")
    ablation = tmp_path / "abl.yaml"
    ablation.write_text(body)
    with pytest.raises(TatrError, match=message) as info:
        ablation_spec.load_ablation(ablation)
    assert one_line(info).startswith(f"{ablation}:{line}: ")
    space = tmp_path / "space.yaml"
    space.write_text(body)
    with pytest.raises(TatrError, match=message) as info:
        load_search_space(space)
    assert one_line(info).startswith(f"{space}:{line}: ")


def test_a_config_file_over_the_size_limit_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from tatr.io import safe_yaml

    path = tmp_path / "exp.yaml"
    path.write_text("name: x\n" + "# padding\n" * 200)
    monkeypatch.setattr(safe_yaml, "MAX_YAML_BYTES", 1000)
    with pytest.raises(TatrError, match="limit of this experiment file") as info:
        read_yaml_mapping(path, "experiment file")
    assert one_line(info).startswith(f"{path}: ")


# --- 6: `off` is a word ------------------------------------------------------------------------------
def test_evaluate_testbed_yaml_with_trust_region_off(tmp_path: Path, capsys, monkeypatch) -> None:
    """The issue's command, on the toy suite (milliseconds) instead of building the testbed."""
    monkeypatch.setenv("TATR_CACHE", str(tmp_path / "cache"))
    toy = ["benchmark=sweep-toy", "suite={tasks: 2, n: 16}"]
    assert main(["evaluate", str(TESTBED_YAML), "merge.trust_region=off", *toy, "--json"]) == 0
    payload = json.loads(capsys.readouterr().out)
    assert payload["config"]["merge"]["trust_region"] == "off"
    assert load_config(TESTBED_YAML, ["merge.trust_region=off"]).merge.trust_region == "off"


@pytest.mark.parametrize("word", ["off", "Off", "OFF"])
def test_off_unquoted_in_an_experiment_file(tmp_path: Path, word: str) -> None:
    path = tmp_path / "exp.yaml"
    path.write_text(f"merge:\n  trust_region: {word}\n")
    if word == "off":
        assert load_config(path).merge.trust_region == "off"
    else:  # a word, not a boolean: the mode list names the one spelling
        with pytest.raises(TatrError, match=rf"merge\.trust_region: unknown trust-region mode '{word}'.*\boff\b"):
            load_config(path)


def test_off_unquoted_in_an_ablation_file(tmp_path: Path) -> None:
    path = tmp_path / "abl.yaml"
    path.write_text(
        "benchmark: sweep-toy\nsuite: {tasks: 2, n: 16}\nablation:\n  kind: trust-region\n"
        "  baselines: yes\n  variants:\n    - {trust_region: off}\n    - {trust_region: zero-shot}\n"
    )
    config, spec = ablation_spec.load_ablation(path)
    assert [v.trust_region for v in spec.variants] == ["off", "zero-shot"]
    assert spec.baselines is True  # a bool field still reads yes/no/on/off as booleans
    points = ablation_spec.points(config, spec)
    assert points[0].merge.trust_region == "off" and points[0].qs == (1.0,)
    _, spec = ablation_spec.load_ablation(path, ["ablation.variants=[{trust_region: off}]", "ablation.baselines=off"])
    assert spec.variants[0].trust_region == "off" and spec.baselines is False


def test_off_in_a_search_space(tmp_path: Path) -> None:
    path = tmp_path / "space.yaml"
    path.write_text(
        "merge: {method: ta, trust_region: off}\nparams:\n  trust_region: [off, zero-shot]\n"
        "  lam: {low: 0.1, high: 1.0, log: true}\n"
    )
    space = load_search_space(path)
    assert space.param("trust_region").choices == ("off", "zero-shot")
    assert space.merge["trust_region"] == "off" and space.param("lam").log is True
    space = load_search_space(path, ["params.trust_region=[off]", "params.lam={low: 0.1, high: 1.0, log: false}"])
    assert space.param("trust_region").choices == ("off",) and space.param("lam").log is False
    with pytest.raises(TatrError, match="log must be true or false, got 'yes'"):  # a word, not a flag, as before
        load_search_space(path, ["params.lam={low: 0.1, high: 1.0, log: yes}"])


def test_booleans_meant_as_booleans_still_work(tmp_path: Path) -> None:
    from tatr.suites.testbed import make_testbed
    from tatr.suites.text import spec_from_options

    for word, value in [("true", True), ("True", True), ("yes", True), ("on", True), ("false", False), ("no", False)]:
        assert (
            spec_from_options({"allow_download": word if word not in ("true", "false") else value}).allow_download
            is value
        )
        config = load_config(None, [f"suite.progress={word}"])
        assert make_testbed({"preset": "tiny", **config.suite}, tmp_path).progress is value
    with pytest.raises(TatrError, match=r"suite\.progress must be true or false, got 'maybe'"):
        make_testbed({"preset": "tiny", "progress": "maybe"}, tmp_path)


def test_a_number_where_a_name_is_meant_is_that_name() -> None:
    config = load_config(None, ["name=2024", "benchmark=2024"])
    assert (config.name, config.benchmark) == ("2024", "2024")
    from tatr.runs.config import MergeConfig

    assert MergeConfig(method=7).method == "7"  # type: ignore[arg-type]  # a plugin's method may be named "7"
    assert load_config(None, ["merge.method=2024"]).merge.method == "2024"


def test_dates_are_text(tmp_path: Path) -> None:
    """YAML 1.1 reads 2024-01-01 as a date (and 2024-13-45 as a traceback); a tatr name never is one."""
    path = tmp_path / "exp.yaml"
    path.write_text("name: 2024-01-01\nsuite: {when: 2024-13-45}\n")
    config = load_config(path)
    assert config.name == "2024-01-01" and config.suite == {"when": "2024-13-45"}


# --- the other readers of user files: journal lines, pooling configs, published numbers, GTSRB labels ----


def test_journal_lines_nested_too_deep_are_damage_not_a_traceback(tmp_path: Path):
    from tatr.runs.sweep import journal

    assert journal._record(DEEP.encode()) is False
    assert journal._salvage(b"{" + b'{"a":' * 5000) is None
    lock = tmp_path / "owner.lock"
    lock.write_text(DEEP[:4000])
    assert journal.OwnedLock._read_owner(str(lock)) is None


def test_a_pooling_config_nested_too_deep_is_one_line(tmp_path: Path):
    from tatr.suites.text.model import read_pooling

    (tmp_path / "modules.json").write_text(DEEP)
    with pytest.raises(TatrError, match="cannot read the pooling module's config") as info:
        read_pooling(tmp_path)
    one_line(info)


def test_broken_published_numbers_are_one_line_not_an_empty_column(tmp_path: Path):
    from tatr.report.build import load_published

    assert load_published(None) is None and load_published(tmp_path / "absent.csv") is None
    bad = tmp_path / "published.csv"
    bad.write_bytes(b"method,accuracy\nTA,69.1\n\xff\xfe,1\n")
    with pytest.raises(TatrError, match="published numbers") as info:
        load_published(bad)
    one_line(info)


@pytest.mark.parametrize(
    "body, words",
    [
        ("Filename;ClassId\n00000.ppm;x\n", "00000.ppm"),
        ("Filename;ClassId\n" + "a" * 200_000 + ";1\n", "longer than"),
        ("Name;Label\n00000.ppm;1\n", "lacks the Filename;ClassId"),
    ],
)
def test_a_broken_gtsrb_label_file_is_one_line(tmp_path: Path, body: str, words: str):
    from tatr.suites.clip8.data import load_task
    from tests.clip_fixtures import write_gtsrb

    write_gtsrb(tmp_path, labels=(0, 14))
    (tmp_path / "gtsrb" / "GT-final_test.csv").write_text(body)
    with pytest.raises(TatrError, match=words) as info:
        load_task("GTSRB", tmp_path)
    one_line(info)
