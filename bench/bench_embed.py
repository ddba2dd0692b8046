"""Benchmark `embfilter embed` throughput and the cost of an `embfilter eval` sweep, cold and cached.

Each measurement runs in its own process (wall time and peak RSS from os.wait4):

  embed      load the model (built-in SmolLM2-135M GGUF by default), then embed the first N Lee
             documents at each --batch-sizes value: texts/s and real tokens/s, plus how much
             padding length-sorted batches need compared with batches in input order
  eval-cold  `embfilter eval --data lee --sweep-top … --sweep-bottom … --ratio …` with an EMPTY
             cache dir (reads W_U, decomposes it, loads the model, embeds, scores every band)
  eval-warm  the same command again: raw embeddings and spectrum come from the cache, so no model
             load, no forward pass and no decomposition

Usage: python bench/bench_embed.py [--model SPEC] [--texts 50] [--batch-sizes 1,16] [--skip-eval]
Prints a markdown table (with the machine and the load average) on stdout; paste it into
bench/RESULTS.md. On a shared machine the load average matters: rerun when it is high.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # `python bench/x.py` puts only bench/ on the path

from bench._common import load_average  # noqa: E402

SWEEP = ["--sweep-top", "0,4,16,64,128", "--sweep-bottom", "0,4,8,16,32,64", "--ratio", "2,4,8"]

CHILD_EMBED = r"""
import json, sys, time
spec, n, batch_sizes = json.loads(sys.argv[1])
import torch
from embfilter_cli.text.embedding import load_encoder
from embfilter_cli.text.recipes import resolve_recipe
from embfilter_cli.text.datasets import load_lee
texts = load_lee().texts[:n]
t0 = time.perf_counter()
enc = load_encoder(spec, device="cpu", dtype="float32")
load_s = time.perf_counter() - t0
prepared = [enc.prepare(t, resolve_recipe("none"), enc.effective_max_length(512)) for t in texts]
lengths = [len(p.ids) for p in prepared]
def padded(order, b):
    return sum(max(lengths[i] for i in order[k:k + b]) * len(order[k:k + b]) for k in range(0, len(order), b))
runs = []
enc.embed(texts[:2], batch_size=2)  # warm-up: first-call allocations and kernel selection
for b in batch_sizes:
    t = time.perf_counter()
    enc.embed(texts, batch_size=b)
    s = time.perf_counter() - t
    sorted_order = sorted(range(len(texts)), key=lambda i: -lengths[i])
    runs.append({"batch_size": b, "seconds": s, "texts_per_s": len(texts) / s, "tokens_per_s": sum(lengths) / s,
                 "padded_tokens_sorted": padded(sorted_order, b), "padded_tokens_input_order": padded(list(range(len(texts))), b)})
print("RESULT " + json.dumps({"load_s": load_s, "threads": torch.get_num_threads(), "texts": len(texts),
                              "tokens": sum(lengths), "max_tokens": max(lengths), "runs": runs}))
"""


def run_measured(argv: list[str]) -> tuple[float, float, str, str]:
    """Run argv in a child; return (wall seconds, its peak RSS in GiB, stdout, stderr)."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        start = time.perf_counter()
        proc = subprocess.Popen(argv, stdout=out, stderr=err, text=True, cwd=ROOT)
        # os.wait4 (not proc.wait) so that this child's own resource usage comes back.
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
    if proc.returncode:
        sys.exit(f"{' '.join(argv[:4])}… failed ({proc.returncode}):\n{stderr[-2000:]}")
    return wall, usage.ru_maxrss / 2**20, stdout, stderr


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="model spec (default: built-in SmolLM2-135M GGUF)")
    parser.add_argument("--texts", type=int, default=50, help="how many Lee documents to embed (max 50)")
    parser.add_argument("--batch-sizes", default="1,16", help="comma-separated batch sizes")
    parser.add_argument("--skip-eval", action="store_true", help="only measure embedding throughput")
    args = parser.parse_args()
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]

    rows: list[str] = []
    _, rss, out, _ = run_measured(
        [sys.executable, "-c", CHILD_EMBED, json.dumps([args.model, args.texts, batch_sizes])]
    )
    result = json.loads(next(line for line in out.splitlines() if line.startswith("RESULT "))[7:])
    rows.append(
        f"| model load (tokenizer + config + weights) | {result['load_s']:.1f} s | peak RSS of the embed process {rss:.2f} GiB |"
    )
    for run in result["runs"]:
        saved = 1 - run["padded_tokens_sorted"] / max(run["padded_tokens_input_order"], 1)
        rows.append(
            f"| embed {result['texts']} Lee docs ({result['tokens']} tokens, max {result['max_tokens']}), batch {run['batch_size']} "
            f"| {run['seconds']:.1f} s | {run['texts_per_s']:.2f} texts/s, {run['tokens_per_s']:.0f} tokens/s; "
            f"length sorting pads {run['padded_tokens_sorted']} vs {run['padded_tokens_input_order']} tokens in input order "
            f"({100 * saved:.0f}% fewer) |"
        )
    if not args.skip_eval:
        cache = Path(tempfile.mkdtemp(prefix="embfilter-bench-cache-"))
        try:
            model = ["--model", args.model] if args.model else []
            cmd = [
                sys.executable,
                "-m",
                "embfilter_cli",
                "eval",
                *model,
                "--data",
                "lee",
                *SWEEP,
                "--json",
                "--cache-dir",
                str(cache),
                "--device",
                "cpu",
            ]
            cold, rss_cold, out_cold, _ = run_measured(cmd)
            warm, rss_warm, out_warm, _ = run_measured(cmd)
            doc_cold, doc_warm = json.loads(out_cold), json.loads(out_warm)
            assert doc_warm["embedding"]["cached"] and doc_warm["grid"] == doc_cold["grid"]
            cells = sum(v is not None for row in doc_cold["grid"]["spearman"] for v in row)
            rows.append(
                f"| eval sweep, empty cache ({cells} bands + {len(doc_cold['results'])} rows) | {cold:.1f} s | "
                f"model load {doc_cold['embedding']['load_seconds']:.1f} s + embedding "
                f"{doc_cold['embedding']['seconds']:.1f} s + W_U read/decompose + imports; "
                f"peak RSS {rss_cold:.2f} GiB |"
            )
            rows.append(
                f"| eval sweep, cached (same command again) | {warm:.1f} s | no model load, no forward pass, "
                f"no decomposition; peak RSS {rss_warm:.2f} GiB |"
            )
        finally:
            shutil.rmtree(cache, ignore_errors=True)

    avg = load_average()
    load = "{:.1f}/{:.1f}/{:.1f}".format(*avg) if avg is not None else "n/a"
    print(
        f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch threads "
        f"{result['threads']}, load average {load}; "
        f"model: {args.model or 'built-in SmolLM2-135M-Instruct GGUF (Q4_1 weights, Q8_0 W_U), float32'}\n"
    )
    print("| step | wall | notes |\n|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
