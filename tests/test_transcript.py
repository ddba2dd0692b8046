"""Transcript test: a recorded set of CLI invocations must keep its exit code, stdout, stderr and files.

Every case in `CASES` runs in order, in one shared working folder (later cases use the files that
earlier ones wrote), through click's runner in this process. For each case the golden file
`tests/transcripts/<NN>-<name>.txt` holds the command line, the exit code, any exception that
escaped the CLI, stdout, stderr, and one digest line per file that the case created, changed or
removed in the working folder. The test fails on any difference.

Regenerate the goldens (after checking that a difference is intended) with:

    EMBFILTER_UPDATE_TRANSCRIPTS=1 python -m pytest tests/test_transcript.py -q

The goldens hold on any x86-64 machine (another CPU, BLAS kernel or thread count moves floats
last bits): `tests/goldens.py` compares words, integers, names, shapes, dtypes and metadata keys
exactly and every float within a stated tolerance, and no file is described by a digest of float
bytes. The normaliser (`normalise`, `describe_file`) hides what differs between runs and machines:
- the working folder's absolute path (its length is fixed, so rich's table layout does not move)
  becomes `<W>`;
- timings: `*seconds` / `*per_second` JSON fields, `in 0.25s`, `in 0.00 s`, `N texts/s`, `N rows/s`;
- UTC timestamps (`2026-01-01T00:00:00Z`), eval's `cache_key` (a hash of the model's path);
- `created_utc` and `tool_version` in artifact metadata, the producer version of ONNX files, and
  other libraries' versions (`sentence-transformers 6.2.0`);
- the SHA-256 of computed floats (`projection_sha256`, `mean_sha256`) wherever it is printed;
- floats longer than 6 significant digits are rounded to 6.
A written file is described, not hashed: safetensors and ONNX by tensor names, dtypes, shapes,
L1/L2/max of float tensors, and their metadata; `.npy` the same; text files by a hash of their
words with the floats taken out, plus statistics of those floats. Integer tensors are summed exactly.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import struct
import tempfile
from collections.abc import Collection, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

from embfilter_cli import __version__
from embfilter_cli.cli import app
from tests.goldens import FLOAT, describe_array, round_floats, text_mismatch

GOLDEN_DIR = Path(__file__).parent / "transcripts"
UPDATE = os.environ.get("EMBFILTER_UPDATE_TRANSCRIPTS") == "1"
# The working folder's absolute path is padded to this many characters so that tables that
# contain it are laid out identically wherever the test runs.
WORKDIR_CHARS = 72
# Folders that are inputs or caches, not outputs: never digested.
NOT_OUTPUTS = ("llama", "cache")


@dataclass(frozen=True)
class Case:
    """One invocation: argv after `embfilter`, optional stdin bytes."""

    name: str
    argv: list[str]
    stdin: bytes | None = None
    env: dict[str, str] = field(default_factory=dict)


def _jsonl_vectors() -> bytes:
    rng = np.random.default_rng(3)
    rows = [{"id": i, "embedding": [round(float(x), 6) for x in rng.standard_normal(32)]} for i in range(3)]
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


PAIRS = [
    ("The cat sat on the mat.", "A cat sat on a mat.", 4.8),
    ("A dog ran in the park.", "The dog ran in the park.", 4.5),
    ("Rain is expected over the weekend.", "Stock markets fell sharply on Monday.", 0.2),
    ("The recipe needs two eggs and some flour.", "Two eggs and flour.", 3.9),
    ("the quick brown fox jumps over the lazy dog", "the lazy dog", 2.1),
    ("Stock markets fell sharply on Monday.", "Markets fell on Monday.", 4.1),
    ("The cat sat on the mat.", "Rain is expected over the weekend.", 0.4),
    ("A dog ran in the park.", "The recipe needs two eggs and some flour.", 0.3),
]

F = "artifacts/llama-r3-b1.safetensors"  # written by the first fit case

CASES: list[Case] = [
    # --- help of every command
    Case("help", ["--help"]),
    *[
        Case(f"help-{c.replace(' ', '-')}", [*c.split(), "--help"])
        for c in (
            "fit",
            "export",
            "apply",
            "verify",
            "inspect",
            "inspect directions",
            "inspect spectrum",
            "inspect text",
            "embed",
            "eval",
            "models",
        )
    ],
    Case("version", ["--version"]),
    Case("models", ["models"]),
    Case("models-json", ["models", "--json"]),
    # --- fit
    Case("fit-rank-bottom", ["-v", "fit", "-m", "llama", "--rank", "3", "--bottom", "1", "-o", F]),
    Case("fit-json-default-name", ["fit", "-m", "llama", "--rank", "2", "--json"]),
    Case("fit-ratio-no-reduce", ["fit", "-m", "llama", "--ratio", "2", "--no-reduce", "-o", "ratio.safetensors"]),
    Case("fit-start-keep-quiet", ["fit", "-m", "llama", "--start", "4", "--keep", "8", "-q", "-o", "sk.safetensors"]),
    Case("fit-band-auto-json", ["fit", "-m", "llama", "--band", "auto", "--json", "-o", "auto.safetensors"]),
    Case(
        "fit-randomized-json",
        ["fit", "-m", "llama", "--rank", "4", "--solver", "randomized", "--json", "-o", "rnd.safetensors"],
    ),
    Case(
        "fit-float32-keep-padding",
        ["fit", "-m", "llama", "--keep", "16", "--precision", "float32", "-o", "k16.safetensors"],
    ),
    # --- export
    Case("export-onnx", ["-v", "export", F, "--onnx", "-o", "f.onnx"]),
    Case("export-onnx-fp16-normalize-json", ["export", F, "--onnx", "--fp16", "--normalize", "-o", "h.onnx", "--json"]),
    Case("export-onnx-per-token-opset", ["export", F, "--onnx", "--per-token", "--opset", "13", "-o", "t.onnx"]),
    Case("export-onnx-external", ["export", F, "--onnx", "--external-data", "-o", "ext/f.onnx"]),
    Case("export-append-to", ["-v", "export", F, "--onnx", "--append-to", "host.onnx", "-o", "host.filtered.onnx"]),
    Case("export-st-json", ["export", F, "--format", "sentence-transformers", "--dense-only", "-o", "st", "--json"]),
    Case("export-npy", ["export", F, "--format", "npy", "-o", "P.npy"]),
    Case("export-safetensors-fp16", ["export", F, "--format", "safetensors", "--fp16", "-o", "P16.safetensors"]),
    Case("export-newest-default", ["export", "--format", "npy", "--json"]),
    # --- apply
    Case("apply-npy", ["-v", "apply", F, "vectors.npy", "-o", "out.npy"]),
    Case("apply-npy-json-normalize", ["apply", F, "vectors.npy", "-o", "outn.npy", "--normalize", "--json"]),
    Case("apply-jsonl-stdout", ["apply", F, "vectors.jsonl"]),
    Case("apply-stdin-jsonl-to-npy", ["apply", F, "-", "--format", "jsonl", "-o", "stdin.npy"], stdin=_jsonl_vectors()),
    Case("apply-safetensors", ["apply", F, "vectors.safetensors", "-o", "out.safetensors"]),
    Case("apply-npy-to-jsonl-float32", ["apply", F, "vectors.npy", "--to", "jsonl", "--dtype", "float32"]),
    # --- verify
    Case("verify", ["-v", "verify", F]),
    Case("verify-model-json", ["verify", F, "-m", "llama", "--json"]),
    # --- inspect
    Case("inspect-bare-json", ["inspect", "--top", "2", "--json"]),
    Case("inspect-directions", ["-v", "inspect", "directions", "-m", "llama", "--band", "0:3", "--top", "3"]),
    Case(
        "inspect-directions-filter-json", ["inspect", "directions", "--filter", F, "--removed", "--top", "2", "--json"]
    ),
    Case("inspect-spectrum", ["inspect", "spectrum", "-m", "llama", "--rank", "3", "--bottom", "1"]),
    Case("inspect-spectrum-json", ["inspect", "spectrum", "--filter", F, "--json"]),
    Case(
        "inspect-text", ["-v", "inspect", "text", "-m", "llama", "The cat sat on the mat.", "--filter", F, "--top", "3"]
    ),
    # --- embed
    Case("embed-npy", ["-v", "embed", "texts.txt", "-m", "llama", "--device", "cpu", "-o", "emb.npy"]),
    Case(
        "embed-jsonl-filter-json",
        [
            "embed",
            "texts.txt",
            "-m",
            "llama",
            "--device",
            "cpu",
            "--filter",
            F,
            "--normalize",
            "-o",
            "emb.jsonl",
            "--json",
        ],
    ),
    Case(
        "embed-stdin-last",
        ["embed", "-", "-m", "llama", "--device", "cpu", "--pooling", "last", "-o", "-"],
        stdin=b"a cat\n\nthe dog\n",
    ),
    # --- eval
    Case(
        "eval-ratio-json", ["eval", "-m", "llama", "--device", "cpu", "--data", "pairs.tsv", "--ratio", "2", "--json"]
    ),
    Case(
        "eval-sweep-filter-save-best",
        [
            "eval",
            "-m",
            "llama",
            "--device",
            "cpu",
            "--data",
            "pairs.tsv",
            "--sweep-top",
            "0,2,4",
            "--sweep-bottom",
            "0,1",
            "--filter",
            F,
            "--save-best",
            "best.safetensors",
            "--no-cache",
        ],
    ),
    # --- errors: usage (2)
    Case("err-unknown-command", ["frobnicate"]),
    Case("err-fit-rank-and-ratio", ["fit", "-m", "llama", "--rank", "3", "--ratio", "2"]),
    Case("err-fit-bad-solver", ["fit", "-m", "llama", "--solver", "bogus"]),
    Case("err-fit-rank-too-big", ["fit", "-m", "llama", "--rank", "40", "-o", "big.safetensors"]),
    Case("err-apply-batch-zero", ["apply", F, "vectors.npy", "--batch-size", "0"]),
    Case("err-export-per-token-npy", ["export", F, "--format", "npy", "--per-token", "-o", "x.npy"]),
    Case("err-inspect-bad-band", ["inspect", "directions", "-m", "llama", "--band", "99:100"]),
    Case("err-embed-no-output", ["embed", "texts.txt", "-m", "llama"]),
    # --- errors: failures (1)
    Case("err-fit-missing-model", ["fit", "-m", "./missing/model.gguf", "--rank", "1"]),
    Case("err-fit-exists", ["fit", "-m", "llama", "--rank", "3", "--bottom", "1", "-o", F]),
    Case("err-export-missing-filter", ["export", "nope.safetensors", "--onnx"]),
    Case("err-apply-wrong-dim", ["apply", F, "wrongdim.npy", "-o", "bad.npy"]),
    Case("err-apply-bad-jsonl", ["apply", F, "bad.jsonl", "-o", "bad.jsonl.npy"]),
    Case("err-verify-junk", ["verify", "junk.safetensors"]),
    Case("err-verify-wrong-tensor", ["verify", F, "-m", "llama", "--tensor", "model.embed_tokens.weight"]),
    Case("err-eval-missing-data", ["eval", "-m", "llama", "--device", "cpu", "--data", "missing.tsv"]),
]


# ---------------------------------------------------------------------------- normaliser

# Artifact metadata that hashes computed floats (the projection, the mean): their last bits, and so
# their digests, move with the CPU and thread count. Collected from the run's artifacts, then masked.
FLOAT_DIGEST_KEY = re.compile(r"(?:projection|mean)\w*_sha256$")  # projection_sha256, projection_fp16_sha256, …


def float_digests(workdir: Path) -> set[str]:
    """The float-derived digests that the artifacts in `workdir` store."""
    found = set()
    for path in workdir.rglob("*.safetensors"):
        try:
            data = path.read_bytes()
            n = struct.unpack("<Q", data[:8])[0]
            meta = json.loads(data[8 : 8 + n]).get("__metadata__", {})
        except (ValueError, struct.error, UnicodeDecodeError):
            continue
        found.update(v for k, v in meta.items() if FLOAT_DIGEST_KEY.search(k) and isinstance(v, str) and len(v) == 64)
    return found


def normalise(text: str, workdir: Path, digests: Collection[str] = ()) -> str:
    """Hide what is not reproducible between runs and machines: paths, timings, versions, float digests."""
    text = text.replace(str(workdir), "<W>")
    for digest in digests:  # full, and the 16-character prefixes that tables and messages show
        text = text.replace(digest, "<float-sha256>").replace(digest[:16], "<float-sha256>")
    text = re.sub(r"\b[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}Z", "<TIME>", text)
    # eval's cache key hashes the model's absolute path (and its mtimes), so it differs per run.
    text = re.sub(r'("cache_key": ")[0-9a-f]{64}"', r'\1<KEY>"', text)
    text = re.sub(r'("[a-z_]*(?:seconds|per_second)": )[0-9.e+-]+', r"\1<T>", text)
    text = re.sub(r"\bin [0-9]+(?:\.[0-9]+)? ?s\b", lambda m: "in <T> s" if " s" in m.group() else "in <T>s", text)
    text = re.sub(r"[0-9][0-9,]*(?:\.[0-9]+)? (texts|rows)/s", r"<T> \1/s", text)
    # Versions of other libraries (a fresh install may get a newer sentence-transformers than the goldens').
    text = re.sub(
        r"\b(sentence-transformers|transformers|torch|onnxruntime|onnx) [0-9][0-9a-z.+]*", r"\1 <version>", text
    )
    return round_floats(text)


def _metadata_lines(meta: dict[str, str], workdir: Path, digests: set[str]) -> list[str]:
    for key in ("created_utc", "tool_version"):
        if key in meta:
            meta[key] = f"<{key}>"
    return [f"    {k}: {normalise(str(v), workdir, digests)}" for k, v in sorted(meta.items())]


def _safetensors_description(path: Path, workdir: Path, digests: set[str]) -> str:
    from safetensors.numpy import load_file

    data = path.read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    meta = json.loads(data[8 : 8 + n]).get("__metadata__", {})
    tensors = load_file(str(path))
    lines = [f"safetensors {len(tensors)} tensors"]
    lines += [f"    {name}: {describe_array(tensors[name])}" for name in sorted(tensors)]
    return "\n".join(lines + _metadata_lines(meta, workdir, digests))


def _onnx_description(path: Path, workdir: Path, digests: set[str]) -> str:
    """Opset, ops, inputs/outputs, initializers (described, not hashed), metadata, and a hash of the rest."""
    import onnx
    from onnx import numpy_helper

    skeleton = onnx.load(str(path), load_external_data=False)
    arrays = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(path)).graph.initializer}
    if skeleton.producer_version == __version__:
        skeleton.producer_version = "<version>"
    meta = {p.key: p.value for p in skeleton.metadata_props}
    del skeleton.metadata_props[:]
    for tensor in skeleton.graph.initializer:  # the values are described below; their bytes are not pinned
        tensor.ClearField("raw_data")
        for field_name in ("float_data", "double_data", "int32_data", "int64_data"):
            tensor.ClearField(field_name)
    ops = ",".join(node.op_type for node in skeleton.graph.node)
    io = " ".join(f"{v.name}" for v in [*skeleton.graph.input, *skeleton.graph.output])
    lines = [
        f"onnx opset={skeleton.opset_import[0].version} ops=[{ops}] io=[{io}] rest "
        + _sha(skeleton.SerializeToString().replace(str(workdir).encode(), b"<W>"))
    ]
    lines += [f"    {name}: {describe_array(arrays[name])}" for name in sorted(arrays)]
    return "\n".join(lines + _metadata_lines(meta, workdir, digests))


def _sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()[:20]


def describe_file(path: Path, workdir: Path, digests: set[str]) -> str:
    """A normalised description of one written file: exact structure, floats as rounded statistics."""
    if path.suffix == ".safetensors" and not path.name.startswith("junk"):
        return _safetensors_description(path, workdir, digests)
    if path.suffix == ".onnx":
        return _onnx_description(path, workdir, digests)
    if path.suffix == ".npy":
        return "npy " + describe_array(np.load(path))
    data = path.read_bytes()
    if path.suffix in {".json", ".jsonl", ".txt", ".tsv"}:
        text = normalise(data.decode(), workdir, digests)
        floats = np.array([float(f) for f in FLOAT.findall(text)])
        summary = f" floats={describe_array(floats)}" if floats.size else ""
        return f"text {len(text.splitlines())} lines, words " + _sha(FLOAT.sub("<f>", text).encode()) + summary
    if path.name.endswith(".onnx.data"):  # external initializers: described with their graph
        return f"onnx external data, {len(data)} bytes"
    return _sha(data)


def snapshot(workdir: Path, digests: set[str]) -> dict[str, str]:
    """relative path -> description for every output file in the working folder."""
    out = {}
    for path in sorted(workdir.rglob("*")):
        rel = path.relative_to(workdir)
        if path.is_file() and rel.parts[0] not in NOT_OUTPUTS:
            out[rel.as_posix()] = describe_file(path, workdir, digests)
    return out


# ---------------------------------------------------------------------------- the run


def _make_inputs(workdir: Path, tiny_llama: Path) -> None:
    import onnx
    from onnx import TensorProto, helper, numpy_helper
    from safetensors.numpy import save_file

    shutil.copytree(tiny_llama, workdir / "llama")
    rng = np.random.default_rng(0)
    np.save(workdir / "vectors.npy", rng.standard_normal((5, 32)).astype(np.float32))
    np.save(workdir / "wrongdim.npy", rng.standard_normal((2, 31)).astype(np.float32))
    (workdir / "vectors.jsonl").write_bytes(_jsonl_vectors())
    (workdir / "bad.jsonl").write_text('{"embedding": [1, 2, "x"]}\n')
    save_file(
        {"embeddings": rng.standard_normal((4, 32)).astype(np.float32), "ids": np.arange(4, dtype=np.int64)},
        str(workdir / "vectors.safetensors"),
    )
    (workdir / "junk.safetensors").write_bytes(b"not a safetensors file")
    (workdir / "texts.txt").write_text("The cat sat on the mat.\n\nA dog ran in the park.\nRain is expected.\n")
    (workdir / "pairs.tsv").write_text("".join(f"{a}\t{b}\t{s}\n" for a, b, s in PAIRS))
    weight = numpy_helper.from_array(rng.standard_normal((8, 32)).astype(np.float32), "W")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["sentence_embedding"])],
        "host",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 8])],
        [helper.make_tensor_value_info("sentence_embedding", TensorProto.FLOAT, ["batch", 32])],
        [weight],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=7, producer_name="host")
    onnx.save_model(model, str(workdir / "host.onnx"))


def _render(case: Case, result, changes: list[str]) -> str:
    lines = [f"$ embfilter {' '.join(case.argv)}", f"exit: {result.exit_code}"]
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        lines.append(f"exception: {type(result.exception).__name__}: {result.exception}")
    lines += ["--- stdout", result.stdout.rstrip("\n"), "--- stderr", result.stderr.rstrip("\n"), "--- files", *changes]
    return "\n".join(lines) + "\n"


@pytest.fixture(scope="module")
def transcripts(tiny_llama) -> Iterator[dict[str, str]]:
    from click.testing import CliRunner

    base = Path(tempfile.mkdtemp(prefix="embf-tx-")).resolve()
    pad = WORKDIR_CHARS - len(str(base)) - 1
    assert pad >= 1, f"temporary folder {base} is too long for the transcript layout"
    workdir = base / ("w" * pad)
    workdir.mkdir()
    assert len(str(workdir)) == WORKDIR_CHARS
    _make_inputs(workdir, tiny_llama)

    mp = pytest.MonkeyPatch()
    mp.chdir(workdir)
    mp.setenv("COLUMNS", "200")
    mp.setenv("LINES", "25")
    mp.setenv("EMBFILTER_CACHE", str(workdir / "cache"))
    mp.setenv("HF_HUB_OFFLINE", "1")
    for var in ("EMBFILTER_DEBUG", "FORCE_COLOR", "NO_COLOR", "TTY_COMPATIBLE", "TTY_INTERACTIVE"):
        mp.delenv(var, raising=False)
    runner = CliRunner()
    out: dict[str, str] = {}
    try:
        digests: set[str] = set()
        before = snapshot(workdir, digests)
        for case in CASES:
            with mp.context() as m:
                for k, v in case.env.items():
                    m.setenv(k, v)
                result = runner.invoke(app, case.argv, input=case.stdin, prog_name="embfilter")
            digests |= float_digests(workdir)
            after = snapshot(workdir, digests)
            changes = [f"+ {p}  {d}" for p, d in after.items() if before.get(p) != d and p not in before]
            changes += [f"~ {p}  {d}" for p, d in after.items() if p in before and before[p] != d]
            changes += [f"- {p}" for p in before if p not in after]
            out[case.name] = normalise(_render(case, result, changes), workdir, digests)
            before = after
        yield out
    finally:
        mp.undo()
        shutil.rmtree(base, ignore_errors=True)


def _golden(index: int, case: Case) -> Path:
    return GOLDEN_DIR / f"{index:02d}-{case.name.replace(' ', '-')}.txt"


def test_case_names_are_unique_and_goldens_have_no_orphans():
    names = [c.name for c in CASES]
    assert len(names) == len(set(names))
    expected = {_golden(i, c).name for i, c in enumerate(CASES)}
    if UPDATE:
        for stale in GOLDEN_DIR.glob("*.txt"):
            if stale.name not in expected:
                stale.unlink()
    orphans = {p.name for p in GOLDEN_DIR.glob("*.txt")} - expected
    assert not orphans, f"golden files without a case: {sorted(orphans)}"


@pytest.mark.parametrize("index", range(len(CASES)), ids=[c.name for c in CASES])
def test_transcript(transcripts, index):
    case = CASES[index]
    golden = _golden(index, case)
    actual = transcripts[case.name]
    if UPDATE:
        GOLDEN_DIR.mkdir(exist_ok=True)
        golden.write_text(actual)
        return
    assert golden.exists(), f"no golden {golden.name}; run with EMBFILTER_UPDATE_TRANSCRIPTS=1"
    mismatch = text_mismatch(actual, golden.read_text())
    assert mismatch is None, f"{golden.name}: {mismatch}"
