"""Benchmark the built-in model's load (first use vs later uses) and `embed` vs sentence-transformers.

Everything runs in one invocation, each measurement in its own process, against a fresh cache:

  load-first   load_encoder(None) with an EMPTY $EMBFILTER_CACHE: transformers' GGUF loader runs and
               the model is converted to the cached Hugging Face folder (what a user's first
               `embed` / `eval` / `inspect text` pays)
  load-later   the same call again: the cached folder is verified (stat memo) and loaded
  load-gguf    load_encoder(None, use_cache=False): the GGUF path every load paid before the cache
  throughput   a filter (top 64 + bottom 16) exported with `embfilter export --format
               sentence-transformers`; then, in one process, on the same texts (the first N Lee
               documents) and batch size: `Encoder.embed` + the filter (what `embfilter embed
               --filter` runs) vs `SentenceTransformer(folder).encode`; best of --repeat runs after a
               warm-up, plus the minimum cosine between the two outputs

Usage: python bench/bench_load_st.py [--texts 50] [--batch-size 16] [--repeat 3] [--pooling mean]
Prints a markdown table with the machine and the load average; paste it into bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # `python bench/x.py` puts only bench/ on the path

from bench._common import describe_machine, load_average  # noqa: E402

CHILD_LOAD = r"""
import json, sys, time
use_cache = json.loads(sys.argv[1])
t0 = time.perf_counter()
# The imports every load pays whatever the cache holds (torch, transformers, the Llama classes)
# are timed apart from the load itself, so the ratio shows what the cache changes.
import torch, transformers
from transformers import AutoConfig, AutoModel, AutoTokenizer
import transformers.models.llama.modeling_llama
from embfilter_cli.text.embedding import load_encoder
notes = []
t1 = time.perf_counter()
enc = load_encoder(None, device="cpu", use_cache=use_cache, notify=notes.append)
t2 = time.perf_counter()
vec = enc.embed(["The cat sat on the mat."])
print(json.dumps({"import_s": t1 - t0, "load_s": t2 - t1, "converted": bool(notes), "dim": int(vec.shape[1])}))
"""

CHILD_THROUGHPUT = r"""
import json, sys, time
import numpy as np
folder, filt, n, batch, repeat, pooling = json.loads(sys.argv[1])
from embfilter_cli.filters.artifact import load_artifact
from embfilter_cli.text.embedding import load_encoder
from embfilter_cli.text.datasets import load_dataset
from sentence_transformers import SentenceTransformer
texts = load_dataset("lee").texts[:n]
art = load_artifact(filt)
enc = load_encoder(None, device="cpu")
st = SentenceTransformer(folder, device="cpu")
def ours():
    return art.apply(enc.embed(texts, pooling=pooling, batch_size=batch))
def theirs():
    return st.encode(texts, batch_size=batch, convert_to_numpy=True)
a, b = ours(), theirs()  # warm-up (and the outputs compared)
cos = np.sum(a * b, axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
best = {}
for name, fn in (("embed", ours), ("st", theirs)):
    times = []
    for _ in range(repeat):
        t = time.perf_counter(); fn(); times.append(time.perf_counter() - t)
    best[name] = min(times)
tokens = sum(len(enc.tokenizer(t)["input_ids"]) for t in texts)
print(json.dumps({"texts": len(texts), "tokens": tokens, "embed_s": best["embed"], "st_s": best["st"],
                  "min_cosine": float(cos.min())}))
"""


def run_child(code: str, arg: object, env: dict[str, str]) -> tuple[dict, float]:
    start = time.perf_counter()
    out = subprocess.run(
        [sys.executable, "-c", code, json.dumps(arg)], env=env, capture_output=True, text=True, check=False
    )
    wall = time.perf_counter() - start
    if out.returncode != 0:
        raise SystemExit(f"child failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1]), wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--texts", type=int, default=50)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--pooling", choices=["mean", "last"], default="mean")
    args = parser.parse_args()

    import sentence_transformers
    import torch
    import transformers

    with tempfile.TemporaryDirectory(prefix="bench-load-st-") as tmp:
        env = dict(os.environ, EMBFILTER_CACHE=str(Path(tmp) / "cache"), PYTHONPATH=str(ROOT))
        rows = []
        for label, use_cache in (("load-first", True), ("load-later", True), ("load-gguf", False)):
            result, wall = run_child(CHILD_LOAD, use_cache, env)
            rows.append((label, result, wall))
            print(f"{label}: load {result['load_s']:.2f} s (process {wall:.1f} s)", file=sys.stderr)
        filt = Path(tmp) / "smol.safetensors"
        folder = Path(tmp) / "smol-st"
        cli = [sys.executable, "-m", "embfilter_cli"]
        for argv in (
            ["fit", "--rank", "64", "--bottom", "16", "-o", str(filt), "-q"],
            [
                "export",
                str(filt),
                "--format",
                "sentence-transformers",
                "--pooling",
                args.pooling,
                "-o",
                str(folder),
                "-q",
            ],
        ):
            subprocess.run([*cli, *argv], env=env, check=True)
        spec = [str(folder), str(filt), args.texts, args.batch_size, args.repeat, args.pooling]
        tp, _ = run_child(CHILD_THROUGHPUT, spec, env)

    first, later, gguf = (r[1]["load_s"] for r in rows)
    wall_first, wall_later = rows[0][2], rows[1][2]
    load = load_average()
    print(
        "Machine: "
        + describe_machine(
            f"torch {torch.__version__}",
            f"transformers {transformers.__version__}",
            f"sentence-transformers {sentence_transformers.__version__}",
        )
    )
    if load:
        print(f"Load average at the end: {load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f} (1/5/15 min)")
    print(f"Python {platform.python_version()}; built-in SmolLM2-135M-Instruct GGUF (Q4_1)\n")
    print("| model load (own process each) | load s | vs first | imports s (torch, transformers) | whole process s |")
    print("|---|---|---|---|---|")
    for label, result, wall in rows:
        print(
            f"| {label}{' (converts)' if result['converted'] else ''} | {result['load_s']:.2f} | "
            f"{result['load_s'] / first:.3f}× | {result['import_s']:.2f} | {wall:.1f} |"
        )
    print(
        f"\nLater load / first load = {later / first:.3f} (target ≤ 0.15); later / direct GGUF = {later / gguf:.3f}; "
        f"whole process, later / first = {wall_later / wall_first:.3f} (imports and interpreter start are not cacheable)\n"
    )
    rate_ours = tp["texts"] / tp["embed_s"]
    rate_st = tp["texts"] / tp["st_s"]
    print(
        f"| {tp['texts']} Lee documents ({tp['tokens']} tokens), batch {args.batch_size}, {args.pooling} pooling | seconds (best of {args.repeat}) | texts/s |"
    )
    print("|---|---|---|")
    print(f"| `embed` + filter (Encoder.embed, artifact.apply) | {tp['embed_s']:.2f} | {rate_ours:.1f} |")
    print(f"| SentenceTransformer(exported folder).encode | {tp['st_s']:.2f} | {rate_st:.1f} |")
    print(
        f"\nembed / sentence-transformers throughput = {rate_ours / rate_st:.2f}× (target ≥ 1.0); min cosine {tp['min_cosine']:.7f}"
    )


if __name__ == "__main__":
    main()
