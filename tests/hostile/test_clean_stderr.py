"""Only embfilter's own lines reach stderr: no warnings or log lines from torch, transformers,
sentence-transformers or onnxruntime (issue 8).

Every run here is a real `python -m embfilter_cli` process with `PYTHONWARNINGS=default` (every
warning category shown, DeprecationWarning included) and `-q`, so its stderr may hold only our own
`Warning:` lines. Real processes, because CliRunner does not see what C++ libraries write to file
descriptor 2 (onnxruntime's logger), and torch raises some warnings only once per process.
Fixtures are tiny (tests/tiny_models.py), so the whole file takes a few seconds per command.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from embfilter_cli.cli import app
from tests.tiny_models import make_gguf

ROOT = Path(__file__).resolve().parents[2]
OURS = ("Warning: ", "Error: ")
# What other packages' lines look like, for a readable failure message.
FOREIGN_MARKS = ("Warning:", "UserWarning", "FutureWarning", "DeprecationWarning", "[W:onnxruntime", "[E:onnxruntime")


def run_quiet(args: list[str], cwd: Path, stdin: str = "") -> subprocess.CompletedProcess[str]:
    """One real embfilter process with every Python warning category enabled."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONWARNINGS": "default"}
    env.pop("EMBFILTER_DEBUG", None)
    return subprocess.run(
        [sys.executable, "-m", "embfilter_cli", *args],
        cwd=cwd,
        env=env,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=300,
    )


def foreign_lines(stderr: str) -> list[str]:
    """Lines on stderr that embfilter did not write (with -q it writes only Warning:/Error: lines)."""
    return [line for line in stderr.splitlines() if line.strip() and not line.startswith(OURS)]


def unused_initializer_host(path: Path, d: int = 32) -> Path:
    """ids → Gather → ReduceMean → sentence_embedding, plus an initializer no node uses, which makes
    onnxruntime log "[W:onnxruntime:...] Removing initializer 'unused'" when it loads the graph."""
    import onnx
    from onnx import TensorProto as TP
    from onnx import helper, numpy_helper

    table = np.random.default_rng(1).standard_normal((50, d)).astype(np.float32)
    nodes = [
        helper.make_node("Gather", ["E", "input_ids"], ["tokens"]),
        helper.make_node("ReduceMean", ["tokens"], ["sentence_embedding"], axes=[1], keepdims=0),
    ]
    graph = helper.make_graph(
        nodes,
        "host",
        [helper.make_tensor_value_info("input_ids", TP.INT64, ["batch", "seq"])],
        [helper.make_tensor_value_info("sentence_embedding", TP.FLOAT, ["batch", d])],
        [numpy_helper.from_array(table, "E"), numpy_helper.from_array(np.zeros(3, np.float32), "unused")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=7)
    onnx.checker.check_model(model)
    onnx.save_model(model, str(path))
    return path


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_llama) -> dict[str, Path]:
    """Inputs for every command: models (tiny Llama folder, F32 GGUF, BF16 head), filters, texts,
    ratings, vectors, raw embeddings and an ONNX host that makes onnxruntime warn. Built in this process."""
    from click.testing import CliRunner
    from safetensors.torch import save_file

    folder = tmp_path_factory.mktemp("clean_stderr")
    gguf, _ = make_gguf(folder / "f32.gguf", rows=64, hidden=32, head="f32")
    bf16 = folder / "bf16.safetensors"
    save_file({"lm_head.weight": torch.randn(40, 8, generator=torch.Generator().manual_seed(0)).bfloat16()}, str(bf16))
    texts = folder / "texts.txt"
    texts.write_text("The cat sat on the mat.\nA dog ran in the park.\nStocks fell.\nRain is expected.\n")
    pairs = folder / "pairs.tsv"
    rows = [("The cat sat.", "A cat sat down.", 4.5), ("Stocks fell.", "Rain.", 0.5), ("A dog ran.", "Dogs run.", 4.0)]
    pairs.write_text("".join(f"{a}\t{b}\t{s}\n" for a, b, s in rows))
    vectors = folder / "vectors.npy"
    np.save(vectors, np.random.default_rng(0).standard_normal((5, 32)).astype(np.float32))
    raw = folder / "raw_background.npy"
    np.save(raw, np.random.default_rng(1).standard_normal((6, 32)).astype(np.float32))
    runner = CliRunner()
    filters = {"llama": folder / "llama-filter.safetensors", "gguf": folder / "gguf-filter.safetensors"}
    for model, out in ((tiny_llama, filters["llama"]), (gguf, filters["gguf"])):
        result = runner.invoke(
            app, ["fit", "--model", str(model), "--rank", "2", "--bottom", "1", "-o", str(out), "-q"]
        )
        assert result.exit_code == 0, result.stderr
    return {
        "llama": tiny_llama,
        "gguf": gguf,
        "bf16": bf16,
        "texts": texts,
        "pairs": pairs,
        "vectors": vectors,
        "raw": raw,
        "host": unused_initializer_host(folder / "host.onnx"),
        "filter": filters["llama"],
        "gguf_filter": filters["gguf"],
    }


# (id, arguments with {name} for a `world` path, stdin); every run writes into its own cwd.
RUNS = [
    ("fit-f32-gguf", "fit --model {gguf} --rank 2 -o f.safetensors", ""),
    ("fit-bf16-safetensors", "fit --model {bf16} --rank 2 -o f.safetensors", ""),
    ("apply", "apply {filter} {vectors} -o out.npy", ""),
    ("apply-stdin-jsonl", "apply {filter} - --format jsonl", '{"embedding": [' + ", ".join(["0.5"] * 32) + "]}\n"),
    ("export-onnx", "export {filter} --onnx -o f.onnx", ""),
    ("export-onnx-fp16", "export {filter} --onnx --fp16 -o f.onnx", ""),
    ("export-onnx-append", "export {filter} --onnx --append-to {host} -o h.onnx", ""),
    ("export-st", "export {filter} --format sentence-transformers -o st", ""),
    ("verify-gguf", "verify {gguf_filter} --model {gguf}", ""),
    ("embed", "embed {texts} --model {llama} --filter {filter} -o e.npy", ""),
    (
        "eval",
        "eval --model {llama} --data {pairs} --background {texts} --sweep-top 0,2 --sweep-bottom 0,1 "
        "--abtt 1 --whiten 2 --plot heat.png --no-cache",
        "",
    ),
    ("inspect-directions-gguf", "inspect directions --model {gguf} --band 0:2 --top 3", ""),
    ("inspect-spectrum-plot", "inspect spectrum --model {llama} --rank 2 --plot s.png", ""),
    ("inspect-text", "inspect text --model {llama} --filter {filter} --top 3 The_cat_sat.", ""),
    ("center-npy", "center {filter} {raw} -o c.safetensors", ""),  # a read-only memory-mapped .npy
]


@pytest.mark.parametrize("args, stdin", [pytest.param(a, s, id=i) for i, a, s in RUNS])
def test_stderr_holds_only_our_own_lines(world, tmp_path, args, stdin):
    argv = [part.format(**{k: str(v) for k, v in world.items()}) for part in args.split()]
    proc = run_quiet([*argv, "-q"], tmp_path, stdin)
    assert proc.returncode == 0, proc.stderr
    assert foreign_lines(proc.stderr) == [], proc.stderr
    assert not any(mark in proc.stderr for mark in FOREIGN_MARKS if mark != "Warning:"), proc.stderr


def test_the_onnx_host_really_makes_onnxruntime_warn(world, capfd):
    """Control for export-onnx-append: without our settings the host's load logs a warning."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 2  # warnings, as onnxruntime's default
    ort.InferenceSession(str(world["host"]), sess_options=options, providers=["CPUExecutionProvider"])
    assert "[W:onnxruntime" in capfd.readouterr().err


def test_onnxruntime_process_wide_logger_is_set_to_errors(world, tmp_path):
    """onnxruntime has no getter for its default logger's severity, so observe it: in a fresh
    process a session with default options logs the host's warning before `onnx_check._ort()` runs
    and stays silent after it."""
    code = f"""
import sys
import onnxruntime as ort
host = {str(world["host"])!r}
ort.InferenceSession(host, providers=["CPUExecutionProvider"])
print("--- before/after ---", file=sys.stderr, flush=True)
from embfilter_cli.export.onnx_check import _ort
_ort()
ort.InferenceSession(host, providers=["CPUExecutionProvider"])
"""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    before, after = proc.stderr.split("--- before/after ---")
    assert "[W:onnxruntime" in before
    assert "onnxruntime" not in after, after
