"""Optuna storages that a killed writer or a careless user damaged: a journal cut mid-line is
repaired (and the sweep goes on), a stale journal lock of a dead process is broken at once, and a
corrupted SQLite file or a bad PostgreSQL URL is one line naming it."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import warnings
from pathlib import Path

import optuna
import pytest

from tatr.core.errors import TatrError
from tatr.runs.sweep.journal import OwnedLock, repair_journal_bytes
from tatr.runs.sweep.owners import worker_identity
from tatr.runs.sweep.storage import open_storage
from tests.sweep_fixtures import REPO, cli_env, tatr_cmd, write_experiment
from tests.test_postgres import free_port

TATR = REPO / "sweeps" / "tatr.yaml"
TS = optuna.trial.TrialState


def cli_sweep(tmp: Path, storage: Path, trials: int) -> subprocess.CompletedProcess:
    cmd = tatr_cmd("sweep", write_experiment(tmp), "--sweep", TATR, "--trials", str(trials), "--storage",
                   storage, "--root", tmp / "results", "--no-wandb", "--no-progress", "--no-final",
                   "--pruner", "none")  # fmt: skip
    return subprocess.run(cmd, cwd=REPO, env=cli_env(tmp), capture_output=True, text=True, timeout=240)


def open_quiet(url: str) -> tuple[optuna.storages.BaseStorage, list[str]]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        storage = open_storage(url, heartbeat=False)
    return storage, [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]


def test_journal_cut_mid_line_is_repaired_with_one_warning_and_the_sweep_goes_on(tmp_path: Path) -> None:
    journal = tmp_path / "s.journal"
    out = cli_sweep(tmp_path, journal, 3)
    assert out.returncode == 0, out.stderr
    data = journal.read_bytes()
    last = data.rstrip(b"\n").rsplit(b"\n", 1)[1]
    cut = data[: len(data) - len(last) // 2 - 1]  # the last record half-written, no newline
    journal.write_bytes(cut)
    assert not cut.endswith(b"\n")

    storage, warned = open_quiet(f"journal:{journal}")
    assert len(warned) == 1 and str(journal) in warned[0] and "partial last record" in warned[0], warned
    assert journal.read_bytes() == cut[: cut.rfind(b"\n") + 1]  # exactly the partial record dropped
    study = optuna.load_study(study_name="toy-tatr", storage=storage)
    assert len(study.trials) == 3  # the cut record was the last one's last change, not a trial

    again = cli_sweep(tmp_path, journal, 5)  # the same storage goes on to 5 finished trials
    assert again.returncode == 0, again.stderr
    study = optuna.load_study(study_name="toy-tatr", storage=open_storage(f"journal:{journal}", heartbeat=False))
    assert len(study.get_trials(states=(TS.COMPLETE, TS.PRUNED))) == 5


def test_journal_damaged_by_an_append_after_a_partial_record_is_repaired(tmp_path: Path) -> None:
    """What a killed writer did to a journal before this fix: the next append glued to the partial
    record, and from then on every read raised. The glued record is kept, the partial one cut."""
    from optuna.storages.journal import JournalFileBackend

    journal = tmp_path / "s.journal"
    storage = open_storage(f"journal:{journal}", heartbeat=False)
    study = optuna.create_study(storage=storage, study_name="s")
    study.enqueue_trial({"x": 1.0})
    data = journal.read_bytes()
    journal.write_bytes(data[:-7])  # the enqueue record, cut
    plain = optuna.storages.JournalStorage(JournalFileBackend(str(journal)))  # Optuna alone
    optuna.load_study(study_name="s", storage=plain).set_user_attr("after", 1)  # glued to the partial
    with open(journal, "ab") as f:  # and one more record, as the next writer would append
        f.write(b'{"op_code":2,"worker_id":"w","study_id":0,"user_attr":{"later":2}}\n')
    with pytest.raises(ValueError):  # the bug: Optuna alone cannot read it any more
        optuna.storages.JournalStorage(JournalFileBackend(str(journal)))

    storage, warned = open_quiet(f"journal:{journal}")
    assert len(warned) == 1 and str(journal) in warned[0] and "cut a partial record off line" in warned[0]
    assert optuna.load_study(study_name="s", storage=storage).user_attrs == {"after": 1, "later": 2}


def test_journal_with_other_damage_is_one_line_naming_file_and_line(tmp_path: Path) -> None:
    journal = tmp_path / "s.journal"
    storage = open_storage(f"journal:{journal}", heartbeat=False)
    optuna.create_study(storage=storage, study_name="s").set_user_attr("a", 1)
    lines = journal.read_bytes().splitlines(keepends=True)
    journal.write_bytes(lines[0] + b"garbage, not a record\n" + b"".join(lines[1:]))
    with pytest.raises(TatrError) as err:
        open_storage(f"journal:{journal}", heartbeat=False)
    message = str(err.value)
    assert message.startswith(f"{journal}: line 2 is not a journal record") and "\n" not in message


def test_repair_keeps_clean_journals_byte_for_byte() -> None:
    clean = b'{"op_code":0,"worker_id":"w"}\n{"op_code":1}\n'
    assert repair_journal_bytes(clean, Path("j")) == (clean, [])
    fixed, notes = repair_journal_bytes(clean + b'{"op_co', Path("j"))
    assert fixed == clean and len(notes) == 1
    fixed, notes = repair_journal_bytes(clean + b'{"op_co\n', Path("j"))  # terminated but undecodable, last
    assert fixed == clean and "undecodable last record" in notes[0]


def test_a_stale_journal_lock_of_a_dead_process_is_broken_at_once(tmp_path: Path) -> None:
    journal = tmp_path / "s.journal"
    storage = open_storage(f"journal:{journal}", heartbeat=False)
    study = optuna.create_study(storage=storage, study_name="s")
    code = "import json; from tatr.runs.sweep.owners import worker_identity as w; print(json.dumps(w()))"
    dead = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    owner = json.loads(dead.stdout)
    Path(f"{journal}.lock").write_text(json.dumps(owner))  # what a writer killed inside append leaves
    start = time.monotonic()
    study.set_user_attr("after", 1)  # Optuna's own lock would wait its 30 s grace period here
    assert time.monotonic() - start < 5
    assert not Path(f"{journal}.lock").exists()
    assert optuna.load_study(study_name="s", storage=open_storage(f"journal:{journal}")).user_attrs == {"after": 1}


def test_a_lock_of_a_live_process_is_respected(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import tatr.runs.sweep.journal as st

    monkeypatch.setattr(st, "LOCK_GRACE_SECONDS", 1.5)
    lock_file = Path(f"{tmp_path / 's.journal'}.lock")
    lock_file.write_text(json.dumps(worker_identity()))  # held by this (live) process
    start = time.monotonic()
    lock = OwnedLock(tmp_path / "s.journal")
    lock.acquire()  # waits: broken only after the grace period, since its owner lives
    assert time.monotonic() - start >= 1.5
    lock.release()
    assert not lock_file.exists()


@pytest.mark.parametrize("damage", ["garbage", "truncated", "folder"])
def test_a_corrupted_sqlite_file_is_one_line_naming_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], damage: str
) -> None:
    from tatr.cli import main

    db = tmp_path / "optuna.db"
    if damage == "garbage":
        db.write_bytes(b"\x00garbage that is not SQLite" * 100)
    elif damage == "truncated":
        storage = open_storage(f"sqlite:///{db}", heartbeat=False)
        optuna.create_study(storage=storage, study_name="s").enqueue_trial({"x": 1.0})
        storage.engine.dispose()
        data = db.read_bytes()
        assert len(data) > 8192
        db.write_bytes(data[:100] + b"\xff" * 4000)  # header kept, pages cut and overwritten
    else:
        db.mkdir()
    exp = write_experiment(tmp_path)
    assert main(["sweep", str(exp), "--sweep", str(TATR), "--storage", str(db), "--root", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"tatr: error: {db}: ") and err.count("\n") == 1, err
    assert "Traceback" not in err and "sqlalchemy" not in err.lower()


@pytest.mark.parametrize(
    ("url", "fragment"),
    [
        ("postgresql://tatr:secret@127.0.0.1:{port}/db", "cannot open"),
        ("postgresql://tatr@127.0.0.1:notaport/db", "storage postgresql://tatr@127.0.0.1:notaport/db"),
        ("nosuchdb://u@h/db", "storage nosuchdb://u@h/db"),
    ],
)
def test_a_bad_or_unreachable_database_url_is_one_line_within_seconds(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], url: str, fragment: str
) -> None:
    from tatr.cli import main

    url = url.format(port=free_port())  # a closed port: connection refused
    start = time.monotonic()
    assert main(["sweep", str(write_experiment(tmp_path)), "--sweep", str(TATR), "--storage", url,
                 "--root", str(tmp_path / "r")]) == 2  # fmt: skip
    assert time.monotonic() - start < 15
    err = capsys.readouterr().err
    assert err.startswith("tatr: error: storage ") and fragment in err and err.count("\n") == 1, err
    assert "secret" not in err  # the password is never printed
