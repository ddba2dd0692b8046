"""`embfilter embed --engine ray` with 2 actors against the local command on the same texts (issue 10).

Builds a small random Llama (tests/tiny_models.make_llama, hidden 256, 4 layers) and a corpus of
Parquet files with a `body` column (the Lee background documents from the gensim wheel, cut to
`--words` words, repeated to `--texts`), then runs, as separate processes and interleaved:

  local: embfilter embed DATA -o OUT --text-column body --model M
  ray:   the same with --engine ray --concurrency 2 (a fresh local Ray each run, so its start-up counts)

and `python -c "import ray; ray.init(num_cpus=2)"` alone, to split Ray's fixed cost from its throughput.
Outputs of both engines are compared (max |difference|). Times are best of --repeat.

    python bench/bench_embed_ray.py [--texts 2000] [--files 4] [--repeat 1]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # `python bench/x.py` puts only bench/ on the path

from bench._common import describe_machine, load_average  # noqa: E402


def corpus(texts: int, words: int) -> list[str]:
    """`texts` documents of at most `words` words from lee_background.cor (or synthetic ones without gensim)."""
    try:
        import gensim

        path = Path(gensim.__file__).parent / "test" / "test_data" / "lee_background.cor"
        docs = [
            " ".join(line.split()[:words]) for line in path.read_text(encoding="latin-1").splitlines() if line.strip()
        ]
    except ImportError:
        docs = [" ".join(f"word{(i * 7 + j) % 97}" for j in range(words)) for i in range(300)]
    return [docs[i % len(docs)] for i in range(texts)]


def timed(args: list[str]) -> float:
    """Wall seconds of one child process (fails loudly if it fails)."""
    start = time.perf_counter()
    proc = subprocess.run(args, capture_output=True, text=True, cwd=ROOT)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(args)} failed:\n{proc.stderr}")
    return time.perf_counter() - start


def vectors(folder: Path) -> np.ndarray:
    """All embeddings of a folder's Parquet files, in file-name order."""
    tables = [pq.read_table(f) for f in sorted(folder.glob("*.parquet"))]
    return np.concatenate([np.array(t.column("embedding").to_pylist(), dtype=np.float32) for t in tables])


def main() -> None:
    """Run both engines side by side and print the ratio and Ray's fixed start-up cost."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--texts", type=int, default=2000)
    parser.add_argument("--files", type=int, default=4)
    parser.add_argument("--words", type=int, default=64)
    parser.add_argument("--repeat", type=int, default=1)
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    from tests.tiny_models import make_llama

    with tempfile.TemporaryDirectory(prefix="bench-embed-ray-") as tmp:
        work = Path(tmp)
        model = make_llama(work / "model", hidden=256, vocab=300, layers=4, max_params=5_000_000)
        texts = corpus(args.texts, args.words)
        (work / "data").mkdir()
        for i, part in enumerate(np.array_split(np.arange(len(texts)), args.files)):
            table = pa.table({"id": part.astype(np.int64), "body": [texts[j] for j in part]})
            pq.write_table(table, work / "data" / f"part-{i}.parquet")
        common = ["--text-column", "body", "--model", str(model), "--device", "cpu", "-q", "-f"]
        embed = [sys.executable, "-m", "embfilter_cli", "embed", str(work / "data")]
        best = {"local": float("inf"), "ray": float("inf"), "ray start-up": float("inf")}
        for _ in range(args.repeat):
            best["local"] = min(best["local"], timed([*embed, "-o", str(work / "local"), *common]))
            best["ray"] = min(
                best["ray"], timed([*embed, "-o", str(work / "ray"), *common, "--engine", "ray", "--concurrency", "2"])
            )
            best["ray start-up"] = min(
                best["ray start-up"],
                timed([sys.executable, "-c", "import ray; ray.init(num_cpus=2, include_dashboard=False)"]),
            )
        diff = float(np.abs(vectors(work / "local") - vectors(work / "ray")).max())
    print(describe_machine(), f"load average {load_average()}", f"{os.cpu_count()} cores")
    print(
        f"{args.texts} texts of <= {args.words} words in {args.files} Parquet files; random Llama hidden 256, 4 layers"
    )
    for name, seconds in best.items():
        rate = f"{args.texts / seconds:8.1f} texts/s" if name != "ray start-up" else ""
        print(f"{name:<14} {seconds:8.2f} s {rate}")
    ray_work = best["ray"] - best["ray start-up"]
    print(
        f"ray / local wall time: {best['ray'] / best['local']:.2f}x; without Ray's start-up: {ray_work / best['local']:.2f}x"
    )
    print(f"max |local - ray| = {diff:.2e}")


if __name__ == "__main__":
    main()
