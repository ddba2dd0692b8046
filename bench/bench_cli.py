"""How long `embfilter --help` takes, against a bare Python start-up measured in the same run.

Issue 7's target: `--help` stays under 0.3 s. The figure that matters is what the CLI adds on top of
the interpreter, so the script times both child processes side by side (CPU time of the child from
`getrusage`, and wall time), best of N each, interleaved so that load on the machine hits both.

    python bench/bench_cli.py [--repeats 7]
"""

from __future__ import annotations

import argparse
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # `python bench/x.py` puts only bench/ on the path

from bench._common import describe_machine, load_average  # noqa: E402


def _run(args: list[str]) -> tuple[float, float]:
    """(CPU seconds, wall seconds) of one child process."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    subprocess.run(args, capture_output=True, cwd=ROOT, check=True)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime), wall


def main() -> None:
    """Print the machine, then best-of-N CPU and wall time of `python -c pass` and `embfilter --help`."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    cases = {
        "python -c pass": [sys.executable, "-c", "pass"],
        "embfilter --help": [sys.executable, "-m", "embfilter_cli", "--help"],
    }
    best = {name: (float("inf"), float("inf")) for name in cases}
    for _ in range(args.repeats):
        for name, command in cases.items():
            cpu, wall = _run(command)
            best[name] = (min(best[name][0], cpu), min(best[name][1], wall))
    print(describe_machine(), f"load average {load_average()}")
    print(f"{'command':<20} {'CPU s':>7} {'wall s':>7}")
    for name, (cpu, wall) in best.items():
        print(f"{name:<20} {cpu:7.3f} {wall:7.3f}")
    base, cli = best["python -c pass"], best["embfilter --help"]
    print(
        f"--help adds {cli[0] - base[0]:.3f} s CPU / {cli[1] - base[1]:.3f} s wall over the interpreter "
        f"({cli[1] / base[1]:.1f}x its wall time); target: under 0.3 s in all"
    )


if __name__ == "__main__":
    main()
