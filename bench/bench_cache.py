"""Is converting a GGUF model to the cached Hugging Face folder worth its disk? Load time saved vs bytes kept.

For each model, in one invocation, each measurement in its own process against a fresh cache:

  gguf      load_encoder_at(location, use_cache=False): transformers parses the GGUF header, rebuilds
            the tokenizer and dequantizes every tensor (what every load pays without the cache)
  convert   the first cached load: the same, plus writing and checking the converted folder
  folder    a later cached load: the converted folder is verified (stat memo) and loaded

Models: the built-in SmolLM2-135M GGUF (Q4_1), and synthetic Llama GGUFs written here with the
`gguf` package (random weights, SmolLM2's tokenizer copied so the tokenizer cost is the same; sizes
set by --hidden/--layers/--ffn) in Q8_0 and F16. The converted folder's size is measured on disk.
Imports (torch, transformers) are timed apart: every load pays them, whatever the cache holds.

Usage: python bench/bench_cache.py [--hidden 1536 --layers 16 --ffn 4096] [--only builtin,q8_0,f16]
Prints a markdown table with the machine and load average; paste it into bench/RESULTS.md.
Needs disk for the synthetic GGUFs and their conversions (~7 GB at the default size) and ~6 GB RAM.
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

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # `python bench/x.py` puts only bench/ on the path

from bench._common import describe_machine, load_average  # noqa: E402
from tests.tiny_models import make_llama_gguf  # noqa: E402

CHILD_LOAD = r"""
import json, sys, time
path, use_cache = sys.argv[1], json.loads(sys.argv[2])
t0 = time.perf_counter()
import torch, transformers
from transformers import AutoConfig, AutoModel, AutoTokenizer
import transformers.models.llama.modeling_llama
from embfilter_cli.model.locate import resolve_model
from embfilter_cli.text.embedding import load_encoder_at
t1 = time.perf_counter()
enc = load_encoder_at(resolve_model(path), device="cpu", dtype="float32", use_cache=use_cache)
t2 = time.perf_counter()
params = sum(p.numel() for p in enc.model.parameters())
print(json.dumps({"imports": t1 - t0, "load": t2 - t1, "params": params}))
"""


def folder_bytes(folder: Path) -> int:
    """Bytes on disk of every file under `folder` (allocated blocks, as `du` counts them)."""
    return sum(p.stat().st_blocks * 512 for p in folder.rglob("*") if p.is_file())


def child(path: Path, use_cache: bool, cache: Path) -> dict[str, float]:
    """Run one load in a fresh interpreter; its timings and parameter count."""
    env = {**os.environ, "EMBFILTER_CACHE": str(cache), "PYTHONPATH": str(ROOT)}
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-c", CHILD_LOAD, str(path), json.dumps(use_cache)],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        raise SystemExit(f"child failed on {path}:\n{done.stderr[-3000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result["process"] = time.perf_counter() - started
    return result


def measure(label: str, path: Path, work: Path) -> dict[str, object]:
    """gguf, convert and folder loads of one model, in that order, with a fresh cache."""
    cache = work / f"cache-{label}"
    shutil.rmtree(cache, ignore_errors=True)
    gguf_load = child(path, False, cache)
    convert = child(path, True, cache)
    folder = child(path, True, cache)
    converted = [p for p in (cache / "gguf").iterdir() if p.is_dir() and p.name != "sources"]
    size = folder_bytes(converted[0])
    shutil.rmtree(cache, ignore_errors=True)
    return {
        "label": label,
        "gguf_bytes": path.stat().st_size,
        "params": gguf_load["params"],
        "gguf": gguf_load["load"],
        "convert": convert["load"],
        "folder": folder["load"],
        "imports": folder["imports"],
        "folder_bytes": size,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--hidden", type=int, default=1536)
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--ffn", type=int, default=4096)
    parser.add_argument("--only", default="builtin,q8_0,f16")
    parser.add_argument("--work", type=Path, default=None, help="scratch folder (default: a temporary one)")
    args = parser.parse_args()
    from importlib.metadata import version

    import torch
    import transformers

    from embfilter_cli.model.locate import default_model_path as builtin_gguf_path

    work = args.work or Path(tempfile.mkdtemp(prefix="bench-cache-"))
    work.mkdir(parents=True, exist_ok=True)
    before = load_average()
    rows = []
    try:
        for label in args.only.split(","):
            if label == "builtin":
                rows.append(measure("SmolLM2-135M Q4_1 (built-in)", Path(builtin_gguf_path()), work))
            else:
                path = work / f"synthetic-{label}.gguf"
                make_llama_gguf(path, hidden=args.hidden, layers=args.layers, ffn=args.ffn, qtype=label)
                rows.append(measure(f"synthetic Llama {label.upper()}", path, work))
                path.unlink()
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    after = load_average()
    print(
        "Machine: "
        + describe_machine(
            f"torch {torch.__version__}", f"transformers {transformers.__version__}", f"gguf {version('gguf')}"
        )
    )
    start, end = (f"{avg[0]:.1f}" if avg else "n/a" for avg in (before, after))
    print(f"Load average: {start} at the start, {end} at the end\n")
    print(
        "| model | params | GGUF MB | folder MB | folder ÷ GGUF | gguf load s | first cached load s | later load s | later ÷ gguf | s saved per load per GB kept |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        gb_kept = r["folder_bytes"] / 1e9
        saved = r["gguf"] - r["folder"]
        print(
            f"| {r['label']} | {r['params'] / 1e6:.0f}M | {r['gguf_bytes'] / 1e6:.0f} | {r['folder_bytes'] / 1e6:.0f} "
            f"| {r['folder_bytes'] / r['gguf_bytes']:.2f}× | {r['gguf']:.2f} | {r['convert']:.2f} | {r['folder']:.2f} "
            f"| **{r['folder'] / r['gguf']:.3f}×** | {saved / gb_kept:.1f} |"
        )


if __name__ == "__main__":
    main()
