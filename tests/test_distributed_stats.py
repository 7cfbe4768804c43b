"""The exemplar statistics data-parallel under torchrun (issue 22, item 6) equal the one-process results.

Two CPU ranks (gloo) run this file as a script under `torchrun` (`_worker`): each computes every statistic on
its share of the examples and saves what it got, every moment and Fisher and Gram matrix, then the exemplar
gradients and the Fisher/RegMean statistics of a toy suite through their caches. The test computes the same
calls in its own process (no torchrun) and compares: the values to float32 rounding, the rows each rank's
forward passes saw (their sum is one process's: no example twice, none left out), who wrote the cache (rank 0
only) and the cache keys (the same folders as one process's). The draws are uneven on purpose: 7 examples in
batches of 3 and 4 (4 + 3 per rank, a share that crosses a batch boundary), and 1 example (a rank with none).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from collections.abc import Callable
from functools import partial
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from tatr.core import distributed
from tatr.core.classify import cosine_logits
from tatr.core.errors import TatrError
from tatr.core.fisher import fisher_fusionbench, fisher_per_sample
from tatr.core.gradients import gradient_moments, per_example_moments
from tatr.core.regmean import regmean_grams
from tatr.suites.base import Checkpoints

TASKS = ("a", "b")
SCALE = 10.0


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 5)).eval()


def _data(seed: int = 1) -> tuple[Tensor, Tensor, Tensor]:
    """(x [7, 6], y [7] in 3 classes, a unit head [3, 5])."""
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(7, 6, generator=g),
        torch.randint(0, 3, (7,), generator=g),
        F.normalize(torch.randn(3, 5, generator=g), dim=-1),
    )


def _rows_seen(model: nn.Module) -> Callable[[], int]:
    """A counter of the rows the model's first layer sees (inside vmap: one per per-sample call)."""
    seen = [0]
    model[0].register_forward_pre_hook(lambda _m, args: seen.__setitem__(0, seen[0] + args[0].shape[0]))
    return lambda: seen[0]


def _core_statistics() -> tuple[dict[str, Tensor], dict[str, int]]:
    """Every estimator on uneven draws: (results keyed '<case>/<moment>/<param>', rows seen per case)."""
    x, y, head = _data()
    model = _model()
    rows = _rows_seen(model)
    classify = partial(cosine_logits, head=head, scale=SCALE)
    odd = [(x[:3], y[:3]), (x[3:], y[3:])]
    pairs = [(x[i : i + 2], y[i : i + 2]) for i in range(0, 7, 2)]  # batches of 2, 2, 2, 1

    def loss(i: int) -> Tensor:
        return F.cross_entropy(cosine_logits(model(x[i : i + 1]), head, SCALE), y[i : i + 1])

    cases: dict[str, Callable[[], dict]] = {
        "moments-7": lambda: gradient_moments(model, head, SCALE, odd, chunk=1),
        "moments-1": lambda: gradient_moments(model, head, SCALE, [(x[:1], y[:1])], chunk=1),
        "per-example-5": lambda: per_example_moments(model, [partial(loss, i) for i in range(5)]),
        "per-example-1": lambda: per_example_moments(model, [partial(loss, 0)]),
        "fisher-fusionbench": lambda: {"f": fisher_fusionbench(model, pairs, classify=classify, num_examples=5)},
        "fisher-per-sample": lambda: {"f": fisher_per_sample(model, odd, classify=classify, num_examples=5, chunk=1)},
        "fisher-empirical": lambda: {"f": fisher_per_sample(model, odd, empirical=True, classify=classify, chunk=1)},
        "gram-7": lambda: {"g": regmean_grams(model, pairs)},
        "gram-1": lambda: {"g": regmean_grams(model, [x[:2]])},
    }
    results: dict[str, Tensor] = {}
    seen: dict[str, int] = {}
    for case, run in cases.items():
        before = rows()
        for moment, state in run().items():
            results.update({f"{case}/{moment}/{k}": v for k, v in state.items()})
        seen[case] = rows() - before
    # the losses as tensors from a generator (the causal-LM suite's way today): right, but every rank runs
    # every forward pass, so its rows are not compared
    generated = per_example_moments(model, (loss(i) for i in range(5)))
    results.update({f"per-example-generator/{m}/{k}": v for m, s in generated.items() for k, v in s.items()})
    return results, seen


class ToySuite:
    """The `Suite` members `exemplar_gradients` and `task_statistics` read, over `_model` and `_data`."""

    name = "toy"
    tasks = TASKS

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def checkpoints(self) -> Checkpoints:
        return Checkpoints(self.folder / "theta0.safetensors", {t: self.folder / f"{t}.safetensors" for t in TASKS})

    def encoder(self, state_dict: dict[str, Tensor] | None = None) -> nn.Module:
        model = _model()
        if state_dict is not None:
            model.load_state_dict(state_dict)
        return model

    def head(self, task: str) -> Tensor:
        return _data(TASKS.index(task) + 1)[2]

    def logit_scale(self) -> float:
        return SCALE

    def exemplar_loader(self, task: str, n: int, seed: int) -> list[tuple[Tensor, Tensor]]:
        x, y, _ = _data(TASKS.index(task) + 1 + 10 * seed)
        return [(x[:3], y[:3]), (x[3:n], y[3:n])]


def write_checkpoints(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    theta0 = {k: v.detach().clone() for k, v in _model().state_dict().items()}
    save_file(theta0, str(folder / "theta0.safetensors"))
    for i, task in enumerate(TASKS):
        g = torch.Generator().manual_seed(100 + i)
        save_file(
            {k: v + 0.1 * torch.randn(v.shape, generator=g) for k, v in theta0.items()},
            str(folder / f"{task}.safetensors"),
        )


def _suite_statistics(folder: Path, cache: Path) -> tuple[dict[str, Tensor], dict[str, str]]:
    """Exemplar gradients (three moments) and the statistics of every kind of the toy suite, through their
    caches: (values keyed '<what>/<task>/<param>', the cache files relative to `cache`)."""
    from tatr.suites import evaluation as ev
    from tatr.suites.task_statistics import task_statistics

    suite = ToySuite(folder)
    grads = ev.exemplar_gradients(suite, 7, 0, cache_root=cache, chunk=2, squared=True)
    files = {f"{m}/{t}": getattr(grads, m)[t] for m in ("abs_mean", "signed_mean", "sq_mean") for t in TASKS}
    for kind, estimator in (("fisher", "fusionbench"), ("fisher", "per-sample"), ("gram", "fusionbench")):
        stats = task_statistics(suite, kind, 7, 0, estimator=estimator, batch_size=2, cache_root=cache, chunk=3)
        files.update({f"{kind}-{estimator}/{t}": p for t, p in stats.items()})
    values = {f"{what}/{k}": v for what, path in files.items() for k, v in load_file(str(path)).items()}
    return values, {what: str(Path(path).relative_to(cache)) for what, path in files.items()}


def _worker(out: Path) -> None:
    """One rank under torchrun: every statistic, then what it wrote and computed, into `out`."""
    from tatr.suites import evaluation as ev
    from tatr.suites import task_statistics as ts

    rank, size = distributed.world()
    results, seen = _core_statistics()
    writes, computed = [], []

    def recorded(write: Callable) -> Callable:
        def wrapper(*args, **kwargs):
            writes.append(str(args[1]))
            return write(*args, **kwargs)

        return wrapper

    for module, name in ((ev, "save_state_dict"), (ts, "save_fisher"), (ts, "save_grams")):
        setattr(module, name, recorded(getattr(module, name)))
    counted = ev.gradient_moments
    ev.gradient_moments = lambda *a, **k: computed.append(1) or counted(*a, **k)
    values, files = _suite_statistics(out / "inputs", out / "cache")
    first = len(computed)
    _, again = _suite_statistics(out / "inputs", out / "cache")  # every entry now read, none computed
    results.update(values)
    save_file({k: v.contiguous() for k, v in results.items()}, str(out / f"rank{rank}.safetensors"))
    report = {"world": [rank, size], "rows": seen, "writes": len(writes), "computed": first}
    report.update({"recomputed": len(computed) - first, "files": files, "files_again": again})
    (out / f"rank{rank}.json").write_text(json.dumps(report))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_two_ranks_equal_one_process(tmp_path: Path) -> None:
    write_checkpoints(tmp_path / "inputs")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("WORLD_SIZE", None)
    if Path("/sys/class/net/lo").exists():
        env["GLOO_SOCKET_IFNAME"] = "lo"
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1"]
    launch += ["--master_port", str(_free_port()), __file__, str(tmp_path)]
    done = subprocess.run(launch, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    expected, seen = _core_statistics()
    values, files = _suite_statistics(tmp_path / "inputs", tmp_path / "one-process")
    expected.update(values)
    reports = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    ranks = [load_file(str(tmp_path / f"rank{r}.safetensors")) for r in (0, 1)]
    for rank, (got, report) in enumerate(zip(ranks, reports, strict=True)):
        assert report["world"] == [rank, 2]
        assert got.keys() == expected.keys()
        for key, value in expected.items():  # every rank holds the whole result
            torch.testing.assert_close(got[key], value, msg=lambda m, key=key, rank=rank: f"rank {rank}, {key}: {m}")
        assert report["files"] == report["files_again"] == files  # the one-process cache keys
        assert report["computed"] == len(TASKS) and report["recomputed"] == 0  # each rank its share, once
    for case, rows in seen.items():  # each example's forward pass on one rank only
        shares = [report["rows"][case] for report in reports]
        assert sum(shares) == rows, (case, shares, rows)
        assert min(shares) > 0 or case.endswith("-1"), (case, shares)
    assert [report["rows"]["moments-7"] for report in reports] == [4, 3]
    assert [report["rows"]["moments-1"] for report in reports] == [1, 0]
    assert reports[0]["writes"] > 0 and reports[1]["writes"] == 0  # rank 0 alone writes the cache


def test_shares_cover_the_draw_once() -> None:
    """`shard_examples`' rows on W ranks: example i (counted across batches) on rank i mod W, the first n only."""
    batches = [(torch.arange(0, 3),), (torch.arange(3, 7),), (torch.arange(7, 8),)]
    for size in (2, 3, 5, 9):
        for n in (None, 1, 4, 8):
            taken = 8 if n is None else n
            for rank in range(size):
                share = [b[0] for b in distributed._strided_rows(batches, n, rank, size)]
                assert all(len(s) for s in share)  # no empty batch
                got = torch.cat(share).tolist() if share else []
                assert got == [i for i in range(taken) if i % size == rank]


def test_outside_torchrun_nothing_changes(monkeypatch: pytest.MonkeyPatch) -> None:
    """No process group, every input given back as itself, no sum touched."""
    for name in ("WORLD_SIZE", "RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    batches = [(torch.ones(3), torch.zeros(3))]
    assert distributed.world() == (0, 1) and distributed.is_main() and not distributed.active()
    assert distributed.shard(batches) is batches
    assert distributed.shard_examples(batches, 2) is batches and distributed.shard_batches(batches, 2) is batches
    sums = {"w": torch.ones(2)}
    assert distributed.all_reduce_sums([sums], 5) == 5 and torch.equal(sums["w"], torch.ones(2))
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert distributed.world() == (0, 1)
    assert not torch.distributed.is_initialized()


@pytest.mark.parametrize("value", ["two", "2"])
def test_world_size_without_torchrun_is_one_line(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    for name in ("MASTER_ADDR", "MASTER_PORT", "RANK"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("WORLD_SIZE", value)
    with pytest.raises(TatrError, match="WORLD_SIZE") as info:
        distributed.world()
    assert "\n" not in str(info.value)
    assert not torch.distributed.is_initialized()


if __name__ == "__main__":  # one rank of `test_two_ranks_equal_one_process`, under torchrun
    _worker(Path(sys.argv[1]))
    torch.distributed.destroy_process_group()
