"""Wall time and a child process's *own* peak RSS, for the benchmarks that compare processes.

Why not `os.wait4`'s `ru_maxrss`: Linux carries a process's peak RSS across fork and exec, so a child
of a benchmark that has generated large checkpoints reports at least the parent's own peak. Measured
here: a `python -c pass` child of a parent holding 1.5 GB reported 1,514 MiB through `wait4` and
13 MiB through its own `VmHWM`. The child therefore reads `VmHWM` from /proc/self/status as it exits
and prints it on stderr's last line.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

# Runs `-m module args…` or `script.py args…` as __main__, then prints this process's own peak RSS (kB).
RUNNER = (
    "import atexit, runpy, sys\n"
    "def report():\n"
    "    hwm = [l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM:')][0]\n"
    "    print('VmHWM', hwm, file=sys.stderr, flush=True)\n"
    "atexit.register(report)\n"
    "args = sys.argv[1:]\n"
    "if args[0] == '-m':\n"
    "    sys.argv = args[1:]\n"
    "    runpy.run_module(args[1], run_name='__main__', alter_sys=True)\n"
    "else:\n"
    "    sys.argv = args\n"
    "    runpy.run_path(args[0], run_name='__main__')\n"
)


def own_peak_mib() -> float:
    """This process's own peak RSS (VmHWM) in MiB, for a benchmark child that reports itself."""
    status = Path("/proc/self/status").read_text().splitlines()
    return int(next(line for line in status if line.startswith("VmHWM:")).split()[1]) / 1024


def measured(argv: list[str], env: dict[str, str] | None = None, cwd: Path | None = None) -> tuple[float, float]:
    """(wall seconds, peak RSS in MiB) of `python <argv>` (argv: `-m module …` or `script.py …`)."""
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", RUNNER, *argv], env=env, cwd=cwd, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"command failed ({proc.returncode}): {proc.stderr.strip()[-2000:]}")
    lines = [line for line in proc.stderr.splitlines() if line.startswith("VmHWM ")]
    return seconds, int(lines[-1].split()[1]) / 1024
