"""Benchmark `embfilter apply` (.npy → .npy, streamed) against an in-memory numpy matmul of the same data.

Creates, under a temporary folder that is deleted afterwards (unless --keep):
  - a ROWS × DIM float32 .npy of standard normal vectors (default 200000 × 3584 = 2.9 GB), written
    chunk by chunk so this script never holds it in memory;
  - a realistic filter for DIM: `fitting.build_artifact` on a random orthonormal basis with a
    decaying spectrum, removing the top --remove-top directions (default 256: 3584 → 3328).

Then, each in its own process, with wall time around the process and peak resident memory read
from the child's own /proc/self/status VmHWM (ru_maxrss is not usable: Linux carries the parent's
RSS over fork/exec into the child's ru_maxrss):

  baseline   np.load(x.npy) fully into memory, then x @ P.T; load and matmul timed separately
  apply      embfilter apply F x.npy -o y.npy (start-up, filter load, mmap read, matmul, write)

and reports rows/s for both, the ratio apply ÷ matmul-only (target ≥ 0.7×), and apply's peak RSS
against the input size (target: bounded by the batch, about batch × (d + k) × 4 bytes + P, not the
file). A sample of apply's output rows is checked against a float64 reference.

Page cache: the input was just written, so by default both runs read it from the page cache
(RAM permitting): the comparison is compute, not disk. --cold evicts the input from the cache
(posix_fadvise DONTNEED, this file only) before each run, to include the disk read.

Usage: python bench/bench_apply.py [--rows 200000] [--dim 3584] [--remove-top 256] [--batch-size 8192]
                                   [--repeat 1] [--work DIR] [--cold] [--keep]
On a shared machine use --repeat 3: runs are interleaved and the best time of each side is kept.
Prints a markdown table (with the machine) to stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # `python bench/x.py` puts only bench/ on the path

from bench._common import describe_machine, load_average  # noqa: E402

# Every child prints its own peak resident memory (kB) as the last stderr line.
PEAK_FOOTER = (
    "\nimport re as _re, sys as _sys\n"
    "_m = _re.search(r'VmHWM:\\s+(\\d+) kB', open('/proc/self/status').read())\n"
    "print('PEAK_KB=%s' % (_m.group(1) if _m else '0'), file=_sys.stderr)\n"
)

BASELINE = """
import json, sys, time
import numpy as np
from embfilter_cli.filters.artifact import load_artifact
p = load_artifact(sys.argv[2]).projection
t0 = time.perf_counter()
x = np.load(sys.argv[1])          # the whole file into memory
t1 = time.perf_counter()
y = x @ p.T                       # one GEMM over everything
t2 = time.perf_counter()
print(json.dumps({"load_s": t1 - t0, "matmul_s": t2 - t1, "checksum": float(y[:4].sum())}))
"""


def apply_child(argv: list[str]) -> str:
    """Python code that runs the embfilter CLI in-process with argv, then prints its peak memory."""
    return (f"from embfilter_cli.cli import app\napp.main(args={argv!r}, standalone_mode=False)\n") + PEAK_FOOTER


def run_measured(code: str, args: list[str] | None = None) -> tuple[float, float, str]:
    """Run python -c code in its own process: (wall seconds, peak RSS MiB, stdout)."""
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", code, *(args or [])], capture_output=True, text=True, cwd=ROOT)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"child failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    peak_kb = int(proc.stderr.strip().splitlines()[-1].split("PEAK_KB=")[1])
    return wall, peak_kb / 1024, proc.stdout


def write_input(path: Path, rows: int, dim: int, seed: int = 0, chunk: int = 8192) -> None:
    """A float32 (rows, dim) .npy written chunk by chunk (never whole in memory)."""
    from embfilter_cli.vectors.npy_format import npy_header

    rng = np.random.default_rng(seed)
    with path.open("wb") as fh:
        fh.write(npy_header(np.dtype(np.float32), (rows, dim)))
        for r0 in range(0, rows, chunk):
            fh.write(rng.standard_normal((min(chunk, rows - r0), dim), dtype=np.float32).tobytes())


def make_filter(path: Path, dim: int, remove_top: int, seed: int = 0) -> None:
    """A real artifact from a random orthonormal basis and a decaying spectrum (what `fit` would save)."""
    from embfilter_cli.filters.artifact import save_artifact
    from embfilter_cli.filters.band import band_from_rank
    from embfilter_cli.filters.fitting import build_artifact
    from embfilter_cli.filters.spectral import Spectrum

    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.standard_normal((dim, dim)))
    sigma = 100.0 * np.arange(1, dim + 1, dtype=np.float64) ** -0.35
    spectrum = Spectrum(singular_values=sigma, vectors=q, solver="synthetic", frobenius_sq=float((sigma**2).sum()))
    band = band_from_rank(dim, remove_top, 0)
    artifact = build_artifact(
        spectrum,
        band,
        reduce=True,
        model_source="bench/synthetic",
        model_revision="local",
        tensor_name="lm_head.weight",
        unembedding_sha256="0" * 64,
        vocab_size=dim,
    )
    save_artifact(artifact, path, force=True)


def evict(path: Path) -> None:
    """Drop this file's clean pages from the page cache (no effect on other files)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def machine() -> str:
    try:
        blas = np.show_config(mode="dicts")["Build Dependencies"]["blas"]
        blas_s = f"{blas.get('name')} {blas.get('version')}"
    except Exception:  # older numpy: no dict mode
        blas_s = "unknown BLAS"
    avg = load_average()
    load = "load avg {:.2f} {:.2f} {:.2f}".format(*avg) if avg is not None else ""
    return describe_machine(f"numpy {np.__version__} ({blas_s})") + f"; {load} at start"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--dim", type=int, default=3584)
    parser.add_argument("--remove-top", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=8192)
    parser.add_argument(
        "--work", type=Path, default=None, help="parent folder for the temporary data [default: system temp]"
    )
    parser.add_argument("--cold", action="store_true", help="evict the input from the page cache before each run")
    parser.add_argument("--repeat", type=int, default=1, help="interleaved runs of each; times are best of N")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder")
    args = parser.parse_args()
    rows, d = args.rows, args.dim
    k = d - args.remove_top
    header = machine()  # before our own load shows up in the load average
    work = Path(tempfile.mkdtemp(prefix="embfilter-bench-apply-", dir=args.work))
    try:
        t0 = time.perf_counter()
        make_filter(work / "filter.safetensors", d, args.remove_top)
        write_input(work / "x.npy", rows, d)
        print(f"prepared filter and {rows}×{d} input in {time.perf_counter() - t0:.1f}s under {work}", file=sys.stderr)
        in_mib = (work / "x.npy").stat().st_size / 2**20

        argv = [
            "apply",
            str(work / "filter.safetensors"),
            str(work / "x.npy"),
            "-o",
            str(work / "y.npy"),
            "--batch-size",
            str(args.batch_size),
            "--json",
            "-q",
            "--force",
        ]
        runs: dict[str, list[tuple[float, float, dict]]] = {"baseline": [], "apply": []}
        for _ in range(args.repeat):  # interleaved, so a burst of load elsewhere hits both sides alike
            if args.cold:
                evict(work / "x.npy")
            wall, peak, out = run_measured(
                BASELINE + PEAK_FOOTER, [str(work / "x.npy"), str(work / "filter.safetensors")]
            )
            runs["baseline"].append((wall, peak, json.loads(out)))
            if args.cold:
                evict(work / "x.npy")
            wall, peak, out = run_measured(apply_child(argv))
            runs["apply"].append((wall, peak, json.loads(out)))
        # best of N for times (the least disturbed run), worst of N for memory
        base_wall = min(r[0] for r in runs["baseline"])
        base_peak = max(r[1] for r in runs["baseline"])
        base = {
            "matmul_s": min(r[2]["matmul_s"] for r in runs["baseline"]),
            "load_s": min(r[2]["load_s"] for r in runs["baseline"]),
        }
        base["load_matmul_s"] = min(r[2]["load_s"] + r[2]["matmul_s"] for r in runs["baseline"])
        app_wall = min(r[0] for r in runs["apply"])
        app_peak = max(r[1] for r in runs["apply"])
        summary = min((r[2] for r in runs["apply"]), key=lambda doc: doc["seconds"])
        spread = {name: [round(r[0], 1) for r in rs] for name, rs in runs.items()}

        # correctness: a sample of rows against float64
        from embfilter_cli.filters.artifact import load_artifact

        p64 = load_artifact(work / "filter.safetensors").projection.astype(np.float64)
        x = np.load(work / "x.npy", mmap_mode="r")
        y = np.load(work / "y.npy", mmap_mode="r")
        idx = np.unique(np.random.default_rng(1).integers(0, rows, size=min(rows, 256)))
        ref = np.asarray(x[idx], dtype=np.float64) @ p64.T
        max_rel = float(np.abs(y[idx] - ref).max() / np.abs(ref).max())
        del x, y
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)

    matmul_rate = rows / base["matmul_s"]
    batch_mib = (args.batch_size * (d + k) * 4 + k * d * 4) / 2**20
    cache = "evicted before each run (--cold)" if args.cold else "warm (the input was just written)"
    print(f"Machine: {header}\n")
    print(
        f"Input: {rows} × {d} float32 .npy ({in_mib:,.0f} MiB); filter {d} → {k} (top {args.remove_top} removed); "
        f"batch {args.batch_size} rows (≈ {batch_mib:,.0f} MiB of batch buffers + P); page cache {cache}.\n"
    )
    print("| run | seconds | rows/s | vs in-memory matmul | peak RSS MiB | RSS / input size |")
    print("|---|---|---|---|---|---|")
    print(
        f"| baseline: x @ P.T in memory (matmul only) | {base['matmul_s']:.2f} | {matmul_rate:,.0f} | 1.00× | "
        f"{base_peak:,.0f} | {base_peak / in_mib:.2f} |"
    )
    print(
        f"| baseline: np.load + matmul | {base['load_matmul_s']:.2f} | {rows / base['load_matmul_s']:,.0f} | "
        f"{rows / base['load_matmul_s'] / matmul_rate:.2f}× | — | — |"
    )
    print(
        f"| embfilter apply, whole process (start-up, read, write) | {app_wall:.2f} | {rows / app_wall:,.0f} | "
        f"{rows / app_wall / matmul_rate:.2f}× | {app_peak:,.0f} | {app_peak / in_mib:.2f} |"
    )
    print(
        f"| embfilter apply, streaming loop only | {summary['seconds']:.2f} | {summary['rows_per_second']:,.0f} | "
        f"{summary['rows_per_second'] / matmul_rate:.2f}× | — | — |"
    )
    print(
        f"\nTargets: apply ≥ 0.7× the in-memory matmul's rows/s; peak RSS bounded by the batch, not the file. "
        f"Output checked on {len(idx)} rows against float64: max error {max_rel:.1e} relative to the largest value. "
        f"Baseline process wall {base_wall:.1f}s (load {base['load_s']:.2f}s). "
        f"Times are the best of {args.repeat} interleaved run(s); process walls per run: {spread}."
    )


if __name__ == "__main__":
    main()
