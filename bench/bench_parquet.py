"""Benchmark `embfilter apply` on Parquet against a hand-written pyarrow + numpy loop, and Ray vs local.

Creates, under a temporary folder that is deleted afterwards (unless --keep):
  - a dataset of --files Parquet files holding --rows vectors in all (float32, --dim, as
    `fixed_size_list<float>[dim]`) plus an `id` column, in row groups of --row-group rows;
  - the same dataset twice over (2 × rows, 2 × files) for the memory comparison;
  - a realistic filter for --dim (random orthonormal basis, decaying spectrum, top --remove-top removed).

Then, each in its own process (wall time around the process, peak RSS from the child's VmHWM):

  baseline   for each file: ParquetFile.iter_batches → x @ P.T → replace the column → ParquetWriter;
             the loop a person would write by hand with pyarrow and numpy (no checks, no atomic rename)
  apply      embfilter apply F data/ -o out/ (the CLI, in-process, start-up included)
  apply 2N   the same on the doubled dataset: peak RSS must not grow with the data
  ray        (--ray) embfilter apply … --engine ray with a local Ray of --ray-cpus CPUs; Ray's start-up
             (ray.init + one trivial task) is measured on its own in another child

Output values of apply are compared with the baseline's (max abs difference).

Usage: python bench/bench_parquet.py [--rows 1000000] [--files 8] [--dim 1024] [--remove-top 64]
           [--row-group 16384] [--batch-size 8192] [--repeat 1] [--ray] [--ray-cpus 2] [--work DIR] [--keep]
The issue's size is 1M × 1024 in 8 files (4 GiB of float32); on a shared 2-core machine use fewer rows.
Prints a markdown table (with the machine) to stdout.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # `python bench/x.py` puts only bench/ on the path

from bench._common import describe_machine, load_average  # noqa: E402
from bench.bench_apply import PEAK_FOOTER, apply_child, make_filter, run_measured  # noqa: E402

BASELINE = """
import json, sys, time
from pathlib import Path
import numpy as np, pyarrow as pa, pyarrow.parquet as pq
from safetensors.numpy import load_file
p = load_file(sys.argv[2])["projection"]          # (k, d) float32
pt = np.ascontiguousarray(p.T)
src, dst, batch = Path(sys.argv[1]), Path(sys.argv[3]), int(sys.argv[4])
dst.mkdir(parents=True, exist_ok=True)
t0 = time.perf_counter()
rows = 0
for f in sorted(src.glob("*.parquet")):
    pf = pq.ParquetFile(f)
    writer = None
    for b in pf.iter_batches(batch_size=batch):
        col = b.column(b.schema.get_field_index("embedding"))
        x = col.flatten().to_numpy().reshape(len(b), -1)
        y = x @ pt
        out = pa.FixedSizeListArray.from_arrays(pa.array(y.reshape(-1)), y.shape[1])
        b = b.set_column(b.schema.get_field_index("embedding"), "embedding", out)
        if writer is None:
            writer = pq.ParquetWriter(dst / f.name, b.schema)
        writer.write_batch(b)
        rows += len(b)
    writer.close()
print(json.dumps({"rows": rows, "seconds": time.perf_counter() - t0}))
"""

RAY_STARTUP = """
import json, time
t0 = time.perf_counter()
import ray
ray.init(num_cpus=int(__import__("sys").argv[1]), include_dashboard=False, log_to_driver=False, logging_level="ERROR")
t1 = time.perf_counter()
ray.get(ray.remote(lambda: 1).remote())
t2 = time.perf_counter()
import ray.data
ray.data.DataContext.get_current().enable_progress_bars = False
ray.data.range(2).map_batches(lambda b: b).take_all()
t3 = time.perf_counter()
print(json.dumps({"import_init_s": t1 - t0, "first_task_s": t2 - t1, "first_dataset_s": t3 - t2}))
ray.shutdown()
"""


def write_dataset(folder: Path, rows: int, files: int, dim: int, row_group: int, seed: int = 0) -> None:
    """`files` Parquet files with `rows` vectors in all, written row group by row group."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    first = 0
    for i in range(files):
        n = (i + 1) * rows // files - i * rows // files
        schema = pa.schema([("id", pa.int64()), ("embedding", pa.list_(pa.float32(), dim))])
        with pq.ParquetWriter(folder / f"part-{i:05d}.parquet", schema) as writer:
            for start in range(0, n, row_group):
                m = min(row_group, n - start)
                x = rng.standard_normal((m, dim), dtype=np.float32)
                vectors = pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), dim)
                ids = pa.array(np.arange(first + start, first + start + m))
                writer.write_table(pa.table({"id": ids, "embedding": vectors}), row_group_size=row_group)
        first += n


def max_difference(a: Path, b: Path) -> float:
    """Largest |a − b| over the embedding columns of two output folders (file by file)."""
    import pyarrow.parquet as pq

    worst = 0.0
    for fa in sorted(a.glob("*.parquet")):
        ta, tb = pq.read_table(fa), pq.read_table(b / fa.name)
        assert ta.column("id").equals(tb.column("id")), f"{fa.name}: ids or row order differ"
        xa = ta.column("embedding").combine_chunks().flatten().to_numpy()
        xb = tb.column("embedding").combine_chunks().flatten().to_numpy()
        worst = max(worst, float(np.abs(xa - xb).max()) if len(xa) else 0.0)
    return worst


def machine() -> str:
    import pyarrow

    avg = load_average()
    load = "load avg {:.2f} {:.2f} {:.2f}".format(*avg) if avg is not None else ""
    return describe_machine(f"numpy {np.__version__}", f"pyarrow {pyarrow.__version__}") + f"; {load} at start"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--files", type=int, default=8)
    parser.add_argument("--dim", type=int, default=1024)
    parser.add_argument("--remove-top", type=int, default=64)
    parser.add_argument("--row-group", type=int, default=16384)
    parser.add_argument("--batch-size", type=int, default=8192)
    parser.add_argument("--repeat", type=int, default=1, help="interleaved runs; times are best of N")
    parser.add_argument("--ray", action="store_true", help="also run --engine ray and measure Ray's start-up")
    parser.add_argument("--ray-cpus", type=int, default=2)
    parser.add_argument("--work", type=Path, default=None)
    parser.add_argument("--keep", action="store_true")
    args = parser.parse_args()
    header = machine()
    work = Path(tempfile.mkdtemp(prefix="embfilter-bench-parquet-", dir=args.work))
    try:
        t0 = time.perf_counter()
        make_filter(work / "f.safetensors", args.dim, args.remove_top)
        write_dataset(work / "data", args.rows, args.files, args.dim, args.row_group)
        write_dataset(work / "data2", 2 * args.rows, 2 * args.files, args.dim, args.row_group, seed=1)
        print(f"prepared in {time.perf_counter() - t0:.1f}s under {work}", file=sys.stderr)
        in_mib = sum(f.stat().st_size for f in (work / "data").glob("*.parquet")) / 2**20

        def cli(data: str, out: str, *extra: str) -> list[str]:
            return ["apply", str(work / "f.safetensors"), str(work / data), "-o", str(work / out), "--batch-size",
                    str(args.batch_size), "--json", "-q", "--force", *extra]  # fmt: skip

        runs: dict[str, list[tuple[float, float, dict]]] = {"baseline": [], "apply": [], "apply2": [], "ray": []}
        for _ in range(args.repeat):
            wall, peak, out = run_measured(
                BASELINE + PEAK_FOOTER,
                [str(work / "data"), str(work / "f.safetensors"), str(work / "base"), str(args.batch_size)],
            )
            runs["baseline"].append((wall, peak, json.loads(out)))
            shutil.rmtree(work / "base_keep", ignore_errors=True)
            (work / "base").rename(work / "base_keep")
            wall, peak, out = run_measured(apply_child(cli("data", "out")))
            runs["apply"].append((wall, peak, json.loads(out)))
            wall, peak, out = run_measured(apply_child(cli("data2", "out2")))
            runs["apply2"].append((wall, peak, json.loads(out)))
            if args.ray:
                code = (
                    f"import ray\nray.init(num_cpus={args.ray_cpus}, include_dashboard=False, log_to_driver=False, "
                    "logging_level='ERROR')\n" + apply_child(cli("data", "out_ray", "--engine", "ray"))
                )
                wall, peak, out = run_measured(code)
                runs["ray"].append((wall, peak, json.loads(out)))
        startup = json.loads(run_measured(RAY_STARTUP + PEAK_FOOTER, [str(args.ray_cpus)])[2]) if args.ray else None
        diff = max_difference(work / "out", work / "base_keep")
        diff_ray = max_difference(work / "out", work / "out_ray") if args.ray else None

        def best(name: str, key: str = "seconds") -> float:
            return min(r[2][key] for r in runs[name])

        rows = args.rows
        base_s, app_s = best("baseline"), best("apply")
        print(f"Machine: {header}\n")
        print(f"Data: {rows:,} × {args.dim} float32 in {args.files} Parquet files (+ id), row groups of "
              f"{args.row_group}, {in_mib:,.0f} MiB on disk; filter {args.dim} → {args.dim - args.remove_top}; "
              f"batch {args.batch_size}; best of {args.repeat}\n")  # fmt: skip
        print("| run | rows | seconds (work) | wall s (process) | rows/s | peak RSS MiB |")
        print("|---|---|---|---|---|---|")
        for name, label, n in (
            ("baseline", "hand-written pyarrow + numpy loop", rows),
            ("apply", "embfilter apply (local)", rows),
            ("apply2", "embfilter apply (local), 2N rows", 2 * rows),
            ("ray", f"embfilter apply --engine ray ({args.ray_cpus} CPUs, Ray already started)", rows),
        ):
            if not runs[name]:
                continue
            s = best(name)
            wall = min(r[0] for r in runs[name])
            peak = max(r[1] for r in runs[name])
            print(f"| {label} | {n:,} | {s:.2f} | {wall:.2f} | {n / s:,.0f} | {peak:,.0f} |")
        print()
        print(f"- apply ÷ baseline throughput: **{base_s / app_s:.2f}×** (target ≥ 0.8×); "
              f"max |apply − baseline| = {diff:.2e}")  # fmt: skip
        peak1 = max(r[1] for r in runs["apply"])
        peak2 = max(r[1] for r in runs["apply2"])
        print(f"- peak RSS: {peak1:,.0f} MiB at {rows:,} rows, {peak2:,.0f} MiB at {2 * rows:,} rows "
              f"(ratio {peak2 / peak1:.2f}; target: the same, under 1 GiB)")  # fmt: skip
        if args.ray:
            print(f"- Ray ÷ local throughput: **{app_s / best('ray'):.2f}×**; max |ray − local| = {diff_ray:.2e}")
            print(f"- Ray start-up: import + init {startup['import_init_s']:.1f} s, first task "
                  f"{startup['first_task_s']:.1f} s, first Ray Data job {startup['first_dataset_s']:.1f} s")  # fmt: skip
    finally:
        if args.keep:
            print(f"kept {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
