"""`embfilter export --onnx`: standalone graphs and filters appended to host embedding graphs.

Every graph is run in onnxruntime here, independently of the command's own check, and compared with
the float64 numpy reference x @ Pᵀ (normalised where asked). Hosts are tiny and hand-built (ids →
Gather → ReduceMean → sentence_embedding), or exported from a tiny transformers Llama. Every bad input
checks its one-line message, exit status, and that nothing (no output, temp or side file) is left.
"""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto as TP
from onnx import helper, numpy_helper

from embfilter_cli.cli import app
from embfilter_cli.errors import ExportError
from embfilter_cli.export import onnx_check, onnx_data, onnx_export, onnx_graph, onnx_host, report
from embfilter_cli.filters.artifact import load_artifact

D, K = 16, 13  # make_filter's default: d=16, top 2 and bottom 1 removed
VOCAB = 50


def reference(x: np.ndarray, art_path: Path, normalize: bool = False) -> np.ndarray:
    p = load_artifact(art_path).projection.astype(np.float64)
    y = x.astype(np.float64) @ p.T
    if normalize:
        y = y / np.maximum(np.linalg.norm(y, axis=-1, keepdims=True), 1e-12)
    return y


def rel_err(got: np.ndarray, ref: np.ndarray) -> float:
    k = ref.shape[-1]
    g, r = got.astype(np.float64).reshape(-1, k), ref.reshape(-1, k)
    den = np.linalg.norm(r, axis=1)
    num = np.linalg.norm(g - r, axis=1)
    return float(np.where(den > 0, num / np.where(den > 0, den, 1), num).max())


def session(path: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def listing(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def gather_host(
    path: Path,
    *,
    d: int = D,
    vocab: int = VOCAB,
    dtype=np.float32,
    opset: int = 13,
    ir: int = 7,
    external: str | None = None,
    token_output: bool = True,
    pooled_name: str = "sentence_embedding",
    metadata: dict[str, str] | None = None,
) -> Path:
    """ids [batch, seq] → Gather(E) → tokens [batch, seq, d] → ReduceMean → pooled [batch, d]."""
    etype = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    table = np.random.default_rng(1).standard_normal((vocab, d)).astype(dtype)
    if opset >= 18:
        axes = helper.make_node("Constant", [], ["axes"], value=helper.make_tensor("axes", TP.INT64, [1], [1]))
        pool = [axes, helper.make_node("ReduceMean", ["tokens", "axes"], [pooled_name], keepdims=0)]
    else:
        pool = [helper.make_node("ReduceMean", ["tokens"], [pooled_name], axes=[1], keepdims=0)]
    nodes = [helper.make_node("Gather", ["E", "input_ids"], ["tokens"]), *pool]
    inputs = [helper.make_tensor_value_info("input_ids", TP.INT64, ["batch", "seq"])]
    if ir < 4:
        inputs.append(helper.make_tensor_value_info("E", etype, [vocab, d]))
    outputs = [helper.make_tensor_value_info(pooled_name, etype, ["batch", d])]
    if token_output:
        outputs.insert(0, helper.make_tensor_value_info("tokens", etype, ["batch", "seq", d]))
    graph = helper.make_graph(nodes, "host", inputs, outputs, [numpy_helper.from_array(table, "E")])
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=ir, producer_name="test-host"
    )
    if metadata:
        helper.set_model_props(model, metadata)
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    if external:
        (path.parent / external).parent.mkdir(parents=True, exist_ok=True)
        onnx.save_model(
            model,
            str(path),
            save_as_external_data=True,
            all_tensors_to_one_file=True,
            location=external,
            size_threshold=0,
        )
    else:
        onnx.save_model(model, str(path))
    return path


def ids(batch: int = 3, seq: int = 6, vocab: int = VOCAB, seed: int = 5) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, vocab, size=(batch, seq)).astype(np.int64)


# ---------------------------------------------------------------------------------------------
# Standalone graphs


@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("opset", [11, 17, 18])
def test_standalone_graph_matches_float64_reference(runner, art, tmp_path, normalize, opset):
    out = tmp_path / "filter.onnx"
    args = ["export", "-v", str(art), "--onnx", "-o", str(out), "--opset", str(opset)] + (
        ["--normalize"] if normalize else []
    )
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.stderr
    assert result.stdout == ""
    assert "Check passed: max relative error" in result.stderr

    model = onnx.load(str(out))
    onnx.checker.check_model(model, full_check=True)
    assert [o.name for o in model.graph.input] == ["embeddings"]
    assert [o.name for o in model.graph.output] == ["filtered_embeddings"]
    in_dims = [d.dim_param or d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    out_dims = [d.dim_param or d.dim_value for d in model.graph.output[0].type.tensor_type.shape.dim]
    assert in_dims == ["batch", D] and out_dims == ["batch", K]
    assert onnx_graph.default_opset_version(model) == opset
    assert model.ir_version == helper.find_min_ir_version_for([helper.make_opsetid("", opset)])
    ops = [n.op_type for n in model.graph.node]
    assert ("ReduceL2" in ops) == normalize
    if normalize:  # axes: an attribute before opset 18, an input from 18
        red = next(n for n in model.graph.node if n.op_type == "ReduceL2")
        assert (len(red.input) == 2) == (opset >= 18)

    sess = session(out)
    for batch in (1, 7):  # batch is dynamic
        x = np.random.default_rng(batch).standard_normal((batch, D)).astype(np.float32)
        (got,) = sess.run(None, {"embeddings": x})
        assert got.shape == (batch, K) and got.dtype == np.float32
        assert rel_err(got, reference(x, art, normalize)) <= 1e-5


def test_standalone_metadata_records_the_filter(runner, art, tmp_path):
    out = tmp_path / "filter.onnx"
    assert runner.invoke(app, ["export", str(art), "--onnx", "-o", str(out), "--normalize"]).exit_code == 0
    meta = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
    a = load_artifact(art)
    assert meta["embfilter.format_version"] == a.metadata["format_version"] == "2"
    assert meta["embfilter.model_source"] == "test/planted"
    assert json.loads(meta["embfilter.band"]) == a.band
    assert meta["embfilter.unembedding_sha256"] == a.unembedding_sha256
    assert meta["embfilter.projection_sha256"] == a.metadata["projection_sha256"]
    assert meta["embfilter.normalize"] == "true"
    # ...and onnxruntime exposes it to serving code
    assert (
        session(out).get_modelmeta().custom_metadata_map["embfilter.projection_sha256"]
        == a.metadata["projection_sha256"]
    )


def test_per_token_graph_filters_each_token_and_default_graph_is_rank_2(runner, art, tmp_path):
    tok = tmp_path / "tok.onnx"
    result = runner.invoke(app, ["export", str(art), "--onnx", "--per-token", "--normalize", "-o", str(tok)])
    assert result.exit_code == 0, result.stderr
    x = np.random.default_rng(0).standard_normal((2, 5, D)).astype(np.float32)
    (got,) = session(tok).run(None, {"embeddings": x})
    assert got.shape == (2, 5, K)
    assert rel_err(got, reference(x, art, normalize=True)) <= 1e-5
    # The rank is part of an ONNX signature: the pooled graph rejects token-level input (the design choice).
    pooled = tmp_path / "pooled.onnx"
    assert runner.invoke(app, ["export", str(art), "--onnx", "-o", str(pooled)]).exit_code == 0
    with pytest.raises(Exception, match="rank"):
        session(pooled).run(None, {"embeddings": x})


@pytest.mark.parametrize("fp16", [False, True])
def test_normalize_keeps_zero_vectors_zero(runner, art, tmp_path, fp16):
    out = tmp_path / "n.onnx"
    result = runner.invoke(
        app, ["export", str(art), "--onnx", "--normalize", "-o", str(out)] + (["--fp16"] if fp16 else [])
    )
    assert result.exit_code == 0, result.stderr
    dtype = np.float16 if fp16 else np.float32
    x = np.zeros((2, D), dtype=dtype)
    x[1, 0] = 1e-3
    (got,) = session(out).run(None, {"embeddings": x})
    assert np.isfinite(got).all()
    assert np.array_equal(got[0], np.zeros(K, dtype=dtype))
    assert abs(np.linalg.norm(got[1].astype(np.float64)) - 1) < (2e-3 if fp16 else 1e-6)


def test_fp16_graph_is_half_precision_within_documented_bound(runner, art, tmp_path):
    out = tmp_path / "h.onnx"
    result = runner.invoke(app, ["export", str(art), "--onnx", "--fp16", "-o", str(out), "--json"])
    assert result.exit_code == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["dtype"] == "float16" and summary["bound"] == onnx_check.REL_BOUNDS["float16"] == 2e-3
    assert 0 < summary["max_rel_error"] <= 2e-3
    model = onnx.load(str(out))
    assert model.graph.input[0].type.tensor_type.elem_type == TP.FLOAT16
    assert model.graph.output[0].type.tensor_type.elem_type == TP.FLOAT16
    assert model.graph.initializer[0].data_type == TP.FLOAT16
    x = np.random.default_rng(3).standard_normal((6, D)).astype(np.float16)
    (got,) = session(out).run(None, {"embeddings": x})
    assert got.dtype == np.float16
    assert rel_err(got, reference(x, art)) <= 2e-3


def test_json_summary_is_the_only_stdout(runner, art, tmp_path):
    out = tmp_path / "f.onnx"
    result = runner.invoke(app, ["export", str(art), "--onnx", "-o", str(out), "--json"])
    assert result.exit_code == 0, result.stderr
    doc = json.loads(result.stdout)
    assert doc["path"] == str(out) and doc["kind"] == "onnx" and doc["filter"] == str(art)
    assert (doc["input_dim"], doc["output_dim"], doc["opset"], doc["checked"]) == (D, K, 17, True)
    assert 0 <= doc["max_rel_error"] <= 1e-5
    assert "{" not in result.stderr


def test_quiet_silences_info(runner, art, tmp_path):
    result = runner.invoke(app, ["export", str(art), "--onnx", "-o", str(tmp_path / "q.onnx"), "-q"])
    assert result.exit_code == 0 and result.stdout == "" and result.stderr == ""


def test_no_check_skips_and_says_so(runner, art, tmp_path, monkeypatch):
    def boom(*a, **k):
        raise AssertionError("the check ran despite --no-check")

    monkeypatch.setattr(onnx_export, "check_standalone", boom)
    result = runner.invoke(
        app, ["-v", "export", str(art), "--onnx", "-o", str(tmp_path / "n.onnx"), "--no-check", "--json"]
    )
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["checked"] is False and json.loads(result.stdout)["max_rel_error"] is None
    result = runner.invoke(app, ["-v", "export", str(art), "--onnx", "-o", str(tmp_path / "m.onnx"), "--no-check"])
    assert "Not checked (--no-check)" in result.stderr


def test_external_filter_data_sits_next_to_the_graph(runner, art, tmp_path):
    out = tmp_path / "sub" / "f.onnx"
    result = runner.invoke(app, ["export", str(art), "--onnx", "--external-data", "-o", str(out), "--json"])
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["external_data"] == "f.onnx.data"
    assert listing(out.parent) == ["f.onnx", "f.onnx.data"]
    assert (out.parent / "f.onnx.data").stat().st_size == D * K * 4
    assert onnx.load(str(out), load_external_data=False).graph.initializer[0].data_location == TP.EXTERNAL
    x = np.random.default_rng(0).standard_normal((3, D)).astype(np.float32)
    assert rel_err(session(out).run(None, {"embeddings": x})[0], reference(x, art)) <= 1e-5


def test_failed_check_is_an_error_and_leaves_nothing(runner, art, tmp_path, monkeypatch):
    # A bound no float32 computation meets: the check must fail and the output must not appear.
    monkeypatch.setitem(onnx_check.REL_BOUNDS, "float32", 0.0)
    outdir = tmp_path / "o"
    outdir.mkdir()
    for extra in ([], ["--external-data"]):
        result = runner.invoke(app, ["export", str(art), "--onnx", "-o", str(outdir / "f.onnx"), *extra])
        assert result.exit_code == 1
        assert result.stdout == ""
        err = result.stderr.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(
            "Error: the exported graph differs from the filter: max relative error"
        )
        assert listing(outdir) == []


def test_existing_output_needs_force(runner, art, tmp_path):
    out = tmp_path / "f.onnx"
    out.write_bytes(b"keep me")
    result = runner.invoke(app, ["export", str(art), "--onnx", "-o", str(out)])
    assert result.exit_code == 1 and result.stdout == ""
    assert result.stderr == f"Error: {out} already exists; pass --force to overwrite it or choose another -o path\n"
    assert out.read_bytes() == b"keep me" and listing(tmp_path) == ["f.onnx", "f.safetensors"]
    result = runner.invoke(app, ["export", str(art), "--onnx", "-o", str(out), "--force"])
    assert result.exit_code == 0, result.stderr
    onnx.checker.check_model(str(out))


def test_filter_that_is_not_an_artifact(runner, art, tmp_path):
    host = gather_host(tmp_path / "host.onnx")
    missing = tmp_path / "missing.safetensors"
    for bad, message in [
        (host, f"Error: {host} is not a readable safetensors file"),
        (missing, f"Error: filter file {missing} does not exist; run `embfilter fit`"),
    ]:
        result = runner.invoke(app, ["export", str(bad), "--onnx", "-o", str(tmp_path / "x.onnx")])
        assert result.exit_code == 1 and result.stdout == ""
        assert result.stderr.startswith(message) and result.stderr.count("\n") == 1
        assert not (tmp_path / "x.onnx").exists()


def test_without_filter_uses_newest_artifact(runner, make_filter, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    old = make_filter(name="artifacts/old.safetensors", model_source="old")
    new = make_filter(name="artifacts/new.safetensors", model_source="new", top=3)
    os.utime(old, (1_000_000, 1_000_000))
    result = runner.invoke(app, ["-v", "export", "--onnx", "--json"])
    assert result.exit_code == 0, result.stderr
    assert "Using the newest filter in artifacts/: new.safetensors" in result.stderr
    doc = json.loads(result.stdout)
    assert doc["path"] == str(Path("artifacts/new.onnx")) and doc["output_dim"] == D - 4
    meta = {p.key: p.value for p in onnx.load("artifacts/new.onnx").metadata_props}
    assert meta["embfilter.model_source"] == "new" and new.exists()


def test_without_filter_and_no_artifacts_says_fit_first(runner, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, ["export", "--onnx"])
    assert result.exit_code == 1 and result.stdout == ""
    assert "run `embfilter fit` first" in result.stderr and result.stderr.count("\n") == 1
    assert listing(tmp_path) == []


@pytest.mark.parametrize(
    "args, message",
    [
        (["--format", "npy", "--onnx"], "--onnx and --format npy contradict each other"),
        ([], "say what to export"),
        (["--onnx", "--output", "x"], "--output names the host output to filter and needs --append-to"),
        (["--onnx", "--filtered-name", "x"], "--filtered-name needs --append-to"),
        (["--onnx", "--append-to", "h.onnx", "--opset", "13"], "with --append-to the host's opset is kept"),
        (["--onnx", "--append-to", "h.onnx", "--fp16"], "with --append-to the host output's dtype decides"),
        (["--onnx", "--append-to", "h.onnx", "--per-token"], "filtered per token automatically"),
        (["--format", "npy", "--normalize"], "--normalize applies to --onnx and whole sentence-transformers models"),
        (["--format", "npy", "--append-to", "h.onnx"], "--append-to applies to --onnx only"),
        (["--onnx", "--opset", "3"], "Invalid value for --opset: 3 is outside 8.."),
    ],
)
def test_flag_combinations_are_usage_errors(runner, art, tmp_path, args, message):
    result = runner.invoke(app, ["export", str(art), *args, "-o", str(tmp_path / "x.onnx")])
    assert result.exit_code == 2, result.stderr
    assert message in result.stderr and result.stdout == ""
    assert not (tmp_path / "x.onnx").exists()


# ---------------------------------------------------------------------------------------------
# Appending to a host graph


def run_host(path: Path, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    sess = session(path)
    return dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feeds)))


@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("opset, ir", [(8, 3), (13, 7), (18, 8)])
def test_append_to_pooled_host(runner, art, tmp_path, normalize, opset, ir):
    host = gather_host(tmp_path / "host" / "model.onnx", opset=opset, ir=ir, metadata={"owner": "host"})
    out = tmp_path / "host" / "model.filtered.onnx"
    args = ["-v", "export", str(art), "--onnx", "--append-to", str(host), "-o", str(out)] + (
        ["--normalize"] if normalize else []
    )
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.stderr
    assert result.stdout == ""
    assert (
        "Filtering output 'sentence_embedding' of model.onnx (the host's 'sentence_embedding' output); "
        "the result is output 0 sentence_embedding [batch, 13] float32"
    ) in result.stderr

    model, before = onnx.load(str(out)), onnx.load(str(host))
    onnx.checker.check_model(model)
    assert model.ir_version == before.ir_version and list(model.opset_import) == list(before.opset_import)
    names = [o.name for o in model.graph.output]
    assert names == ["sentence_embedding", "tokens", "sentence_embedding_unfiltered"]
    meta = {p.key: p.value for p in model.metadata_props}
    assert meta["owner"] == "host" and meta["embfilter.unfiltered_output"] == "sentence_embedding_unfiltered"
    assert meta["embfilter.projection_sha256"] == load_artifact(art).metadata["projection_sha256"]

    feeds = {"input_ids": ids()}
    host_out = run_host(host, feeds)
    got = run_host(out, feeds)
    assert got["sentence_embedding"].shape == (3, K)
    assert rel_err(got["sentence_embedding"], reference(host_out["sentence_embedding"], art, normalize)) <= 1e-5
    assert np.array_equal(got["sentence_embedding_unfiltered"], host_out["sentence_embedding"])
    assert np.array_equal(got["tokens"], host_out["tokens"])


def test_append_with_filtered_name_leaves_host_output_alone(runner, art, tmp_path):
    host = gather_host(tmp_path / "model.onnx")
    out = tmp_path / "f.onnx"
    result = runner.invoke(
        app,
        [
            "export",
            str(art),
            "--onnx",
            "--append-to",
            str(host),
            "-o",
            str(out),
            "--filtered-name",
            "filtered",
            "--json",
        ],
    )
    assert result.exit_code == 0, result.stderr
    doc = json.loads(result.stdout)
    assert (doc["filtered_output"], doc["unfiltered_output"], doc["host_output"]) == (
        "filtered",
        "sentence_embedding",
        "sentence_embedding",
    )
    assert [o.name for o in onnx.load(str(out)).graph.output] == ["filtered", "tokens", "sentence_embedding"]
    got = run_host(out, {"input_ids": ids()})
    assert rel_err(got["filtered"], reference(got["sentence_embedding"], art)) <= 1e-5


def test_append_after_token_level_output_filters_each_token(runner, art, tmp_path):
    host = gather_host(tmp_path / "model.onnx")
    out = tmp_path / "f.onnx"
    result = runner.invoke(
        app,
        [
            "-v",
            "export",
            str(art),
            "--onnx",
            "--append-to",
            str(host),
            "-o",
            str(out),
            "--output",
            "tokens",
            "--normalize",
            "--json",
        ],
    )
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["per_token"] is True
    assert "output 0 tokens [batch, seq, 13] float32" in result.stderr
    feeds = {"input_ids": ids()}
    host_out, got = run_host(host, feeds), run_host(out, feeds)
    assert got["tokens"].shape == (3, 6, K)
    assert rel_err(got["tokens"], reference(host_out["tokens"], art, normalize=True)) <= 1e-5
    assert np.array_equal(got["tokens_unfiltered"], host_out["tokens"])
    # the pooled output, computed from the renamed token tensor, is unchanged
    assert np.array_equal(got["sentence_embedding"], host_out["sentence_embedding"])


def _vi(name: str, shape: list) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, TP.FLOAT, shape)


@pytest.mark.parametrize(
    "outputs, expected, reason",
    [
        (
            [_vi("last_hidden_state", ["b", "s", D]), _vi("pooler_output", ["b", D])],
            "pooler_output",
            "its only pooled (rank-2) output; not last_hidden_state",
        ),
        (
            [_vi("last_hidden_state", ["b", "s", D])],
            "last_hidden_state",
            "its only output (rank 3, filtered per token)",
        ),
        (
            [_vi("a", ["b", D]), _vi("sentence_embedding", ["b", D])],
            "sentence_embedding",
            "the host's 'sentence_embedding' output",
        ),
    ],
)
def test_output_choice_rules(outputs, expected, reason):
    model = helper.make_model(helper.make_graph([], "g", [], outputs))
    choice = onnx_host.choose_output(model, None)
    assert (choice.name, choice.reason) == (expected, reason)


def test_output_choice_ambiguous_lists_outputs():
    model = helper.make_model(helper.make_graph([], "g", [], [_vi("a", ["b", D]), _vi("c", ["b", 8])]))
    with pytest.raises(ExportError, match=r"pass --output NAME, one of: a \[b, 16\] float32, c \[b, 8\] float32"):
        onnx_host.choose_output(model, None)


def test_append_errors_are_one_line_and_leave_nothing(runner, art, make_filter, tmp_path):
    folder = tmp_path / "w"
    host = gather_host(folder / "model.onnx")
    small = gather_host(folder / "small.onnx", d=8)
    text = folder / "notes.onnx"
    text.write_text("this is not a model\n")
    empty = folder / "empty.onnx"
    empty.write_bytes(b"")
    existing = folder / "exists.onnx"
    existing.write_bytes(b"old")
    ambiguous = gather_host(folder / "amb.onnx", pooled_name="pooled")
    already = gather_host(folder / "already.onnx", metadata={"embfilter.projection_sha256": "ab" * 32})
    no_outputs = folder / "no_outputs.onnx"
    m = onnx.load(str(gather_host(folder / "tmp_host.onnx")))
    (folder / "tmp_host.onnx").unlink()
    del m.graph.output[:]
    onnx.save(m, str(no_outputs))
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    out = folder / "out.onnx"
    cases = [
        (
            [str(host), "--output", "nope"],
            out,
            "Error: the host has no output 'nope'; its outputs are: tokens [batch, seq, 16] float32, sentence_embedding [batch, 16] float32",
        ),
        (
            [str(small)],
            out,
            f"Error: output 'sentence_embedding' of {small} has dimension 8 but the filter expects 16 (fitted on test/planted)",
        ),
        ([str(text)], out, f"Error: {text} is not an ONNX model"),
        ([str(empty)], out, f"Error: {empty} is not an ONNX model"),
        ([str(art)], out, f"Error: {art} is not an ONNX model"),
        ([str(no_outputs)], out, f"Error: {no_outputs} is an ONNX model but its graph declares no outputs"),
        ([str(folder / "missing.onnx")], out, f"Error: --append-to {folder / 'missing.onnx'}: no such file"),
        ([str(host)], existing, f"Error: {existing} already exists; pass --force"),
        ([str(already)], out, f"Error: {already} already contains an embfilter filter"),
    ]
    for args, target, message in cases:
        result = runner.invoke(app, ["export", str(art), "--onnx", "--append-to", *args, "-o", str(target)])
        assert result.exit_code == 1, (args, result.stderr)
        assert result.stdout == ""
        assert result.stderr.startswith(message), result.stderr
        assert result.stderr.count("\n") == 1
        assert {p.name: p.read_bytes() for p in folder.iterdir()} == before  # nothing written or changed
    # two rank-2 outputs, none called sentence_embedding: ambiguous
    ambiguous2 = folder / "amb2.onnx"
    m = onnx.load(str(ambiguous))
    m.graph.output.append(_vi("other", ["batch", D]))
    m.graph.node.append(helper.make_node("Identity", ["pooled"], ["other"]))
    onnx.save(m, str(ambiguous2))
    result = runner.invoke(app, ["export", str(art), "--onnx", "--append-to", str(ambiguous2), "-o", str(out)])
    assert (
        result.exit_code == 1 and "pass --output NAME, one of: tokens [batch, seq, 16] float32, pooled" in result.stderr
    )
    assert not out.exists()


def test_append_failed_check_leaves_nothing(runner, art, tmp_path, monkeypatch):
    monkeypatch.setitem(onnx_check.REL_BOUNDS, "float32", 0.0)
    host = gather_host(tmp_path / "h" / "model.onnx", external="model.data")
    outdir = tmp_path / "out"
    outdir.mkdir()
    result = runner.invoke(
        app, ["export", str(art), "--onnx", "--append-to", str(host), "-o", str(outdir / "f.onnx"), "--external-data"]
    )
    assert result.exit_code == 1
    assert result.stdout == ""
    assert result.stderr.splitlines()[-1].startswith(
        "Error: the filtered output differs from host-output·Pᵀ: max relative error"
    )
    assert listing(outdir) == []  # no graph, no filter data, no links to the host's data
    assert listing(host.parent) == ["model.data", "model.onnx"]


def _spy_onnx_load(monkeypatch) -> list[dict]:
    calls: list[dict] = []
    real = onnx.load

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(onnx, "load", spy)
    monkeypatch.setattr(
        onnx.external_data_helper,
        "load_external_data_for_model",
        lambda *a, **k: (_ for _ in ()).throw(AssertionError("pulled external data into memory")),
    )
    return calls


@pytest.mark.parametrize("external_filter", [False, True])
def test_append_to_external_data_host_next_to_it(runner, art, tmp_path, monkeypatch, external_filter):
    host = gather_host(tmp_path / "model.onnx", external="model.onnx.weights")
    data = tmp_path / "model.onnx.weights"
    data_bytes, data_stat = data.read_bytes(), data.stat()
    out = tmp_path / "model.filtered.onnx"
    calls = _spy_onnx_load(monkeypatch)
    args = ["export", str(art), "--onnx", "--append-to", str(host), "-o", str(out), "--json"]
    result = runner.invoke(app, args + (["--external-data"] if external_filter else []))
    monkeypatch.undo()
    assert result.exit_code == 0, result.stderr
    assert calls and all(c.get("load_external_data") is False for c in calls)
    doc = json.loads(result.stdout)
    assert doc["linked_host_data"] == []
    expected = ["model.filtered.onnx", "model.onnx", "model.onnx.weights"]
    if external_filter:
        assert doc["external_data"] == "model.filtered.onnx.data"
        expected.append("model.filtered.onnx.data")
    else:
        assert doc["external_data"] is None  # a tiny filter stays inline
    assert listing(tmp_path) == sorted([*expected, "f.safetensors"])
    assert data.read_bytes() == data_bytes and data.stat().st_mtime_ns == data_stat.st_mtime_ns
    model = onnx.load(str(out), load_external_data=False)
    table = next(t for t in model.graph.initializer if t.name == "E")
    assert table.data_location == TP.EXTERNAL and onnx_data._location(table) == "model.onnx.weights"
    feeds = {"input_ids": ids()}
    host_out, got = run_host(host, feeds), run_host(out, feeds)
    assert rel_err(got["sentence_embedding"], reference(host_out["sentence_embedding"], art)) <= 1e-5


def test_append_to_external_data_host_in_another_folder_links_its_data(runner, art, tmp_path):
    host = gather_host(tmp_path / "hub" / "model.onnx", external="weights/model.data")
    data = tmp_path / "hub" / "weights" / "model.data"
    data_bytes = data.read_bytes()
    out = tmp_path / "deploy" / "model.filtered.onnx"
    result = runner.invoke(
        app, ["-v", "export", str(art), "--onnx", "--append-to", str(host), "-o", str(out), "--json"]
    )
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["linked_host_data"] == ["weights/model.data"]
    assert "Hard-linked 1 external data file(s) of the host" in result.stderr
    linked = out.parent / "weights" / "model.data"
    assert os.path.samefile(linked, data) and data.read_bytes() == data_bytes  # a link, not a copy or an edit
    feeds = {"input_ids": ids()}
    host_out, got = run_host(host, feeds), run_host(out, feeds)
    assert rel_err(got["sentence_embedding"], reference(host_out["sentence_embedding"], art)) <= 1e-5
    # A second export into the same folder reuses the link.
    out2 = out.parent / "second.onnx"
    result = runner.invoke(
        app, ["-v", "export", str(art), "--onnx", "--append-to", str(host), "-o", str(out2), "--json"]
    )
    assert result.exit_code == 0 and json.loads(result.stdout)["linked_host_data"] == []


def test_append_across_filesystems_refuses_clearly(runner, art, tmp_path, monkeypatch):
    host = gather_host(tmp_path / "hub" / "model.onnx", external="model.data")
    out = tmp_path / "deploy" / "model.filtered.onnx"
    out.parent.mkdir()

    def no_link(src, dst):
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    monkeypatch.setattr(os, "link", no_link)
    result = runner.invoke(app, ["export", str(art), "--onnx", "--append-to", str(host), "-o", str(out)])
    assert result.exit_code == 1
    assert (
        "(another filesystem); onnxruntime only reads external data from the model's own folder, so write the "
        f"output next to the host: -o {(tmp_path / 'hub').resolve()}/NAME.onnx" in result.stderr
    )
    assert result.stderr.splitlines()[-1].startswith("Error: cannot hard-link the host's external data")
    assert listing(out.parent) == []


@pytest.mark.parametrize("normalize", [False, True])
def test_append_to_fp16_host_casts_around_a_float32_filter(runner, art, tmp_path, normalize):
    host = gather_host(tmp_path / "model16.onnx", dtype=np.float16)
    out = tmp_path / "f16.onnx"
    args = ["export", str(art), "--onnx", "--append-to", str(host), "-o", str(out), "--json"] + (
        ["--normalize"] if normalize else []
    )
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.stderr
    doc = json.loads(result.stdout)
    assert doc["dtype"] == "float16" and doc["bound"] == 2e-3 and doc["max_rel_error"] <= 2e-3
    model = onnx.load(str(out))
    assert model.graph.output[0].type.tensor_type.elem_type == TP.FLOAT16
    proj = next(t for t in model.graph.initializer if t.name.startswith("embfilter/projection_t"))
    assert proj.data_type == TP.FLOAT  # the exact float32 P; Casts convert the host's fp16 in and out
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("Cast") == 2
    feeds = {"input_ids": ids()}
    host_out, got = run_host(host, feeds), run_host(out, feeds)
    assert got["sentence_embedding"].dtype == np.float16
    assert rel_err(got["sentence_embedding"], reference(host_out["sentence_embedding"], art, normalize)) <= 2e-3
    assert np.array_equal(got["sentence_embedding_unfiltered"], host_out["sentence_embedding"])


def test_host_inputs_follow_the_signature(tmp_path):
    host = onnx.load(str(gather_host(tmp_path / "m.onnx", vocab=37)))
    host.graph.input.append(helper.make_tensor_value_info("attention_mask", TP.INT64, ["batch", "seq"]))
    host.graph.input.append(helper.make_tensor_value_info("pixel", TP.FLOAT, [1, 3]))
    feeds = onnx_check.host_inputs(host)
    assert feeds["input_ids"].shape == feeds["attention_mask"].shape == (2, 5)
    assert feeds["input_ids"].max() < 37 and feeds["input_ids"].dtype == np.int64
    assert (feeds["attention_mask"] == 1).all() and feeds["pixel"].shape == (1, 3)


def test_max_relative_error_flags_nonfinite():
    ref = np.ones((2, 3))
    assert report.max_relative_error(ref.copy(), ref) == 0.0
    bad = ref.copy()
    bad[1, 2] = np.nan
    assert report.max_relative_error(bad, ref) == float("inf")
    assert report.max_relative_error(np.array([[0.0, 3.0]]), np.zeros((1, 2))) == 3.0


def _export_tiny_llama(tmp_path: Path) -> Path:
    """A token-level host from a real (tiny) transformers model via the TorchScript exporter."""
    import warnings

    import torch
    from transformers import AutoModel

    from tests.tiny_models import make_llama

    folder = make_llama(tmp_path / "llama", hidden=32)
    model = AutoModel.from_pretrained(folder).eval()

    class LastHidden(torch.nn.Module):
        def __init__(self, inner: torch.nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
            return self.inner(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state

    path = tmp_path / "llama.onnx"
    example = torch.randint(0, 300, (2, 5))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # dynamo=False: the TorchScript exporter works offline without onnxscript (torch 2.13's default needs it)
        torch.onnx.export(
            LastHidden(model),
            (example, torch.ones_like(example)),
            str(path),
            dynamo=False,
            input_names=["input_ids", "attention_mask"],
            output_names=["last_hidden_state"],
            dynamic_axes={
                "input_ids": {0: "batch", 1: "seq"},
                "attention_mask": {0: "batch", 1: "seq"},
                "last_hidden_state": {0: "batch", 1: "seq"},
            },
            opset_version=17,
        )
    return path


def test_append_to_transformers_exported_host(runner, make_filter, tmp_path):
    host = _export_tiny_llama(tmp_path)
    art32 = make_filter(d=32, top=4, bottom=2, name="f32.safetensors")
    out = tmp_path / "llama.filtered.onnx"
    result = runner.invoke(
        app, ["-v", "export", str(art32), "--onnx", "--append-to", str(host), "-o", str(out), "--json"]
    )
    assert result.exit_code == 0, result.stderr
    assert (
        "Filtering output 'last_hidden_state' of llama.onnx (its only output (rank 3, filtered per token))"
        in result.stderr
    )
    doc = json.loads(result.stdout)
    assert doc["per_token"] is True and doc["max_rel_error"] <= 1e-5
    assert doc["check"]["inputs"] == {"input_ids": [2, 5], "attention_mask": [2, 5]}
    # the check drew ids from the embedding table it found: 300 rows
    assert onnx_check._gather_vocab(onnx.load(str(host), load_external_data=False), "input_ids") == 300
    rng = np.random.default_rng(7)
    feeds = {"input_ids": rng.integers(0, 300, (3, 9)).astype(np.int64), "attention_mask": np.ones((3, 9), np.int64)}
    feeds["attention_mask"][0, :4] = 0  # left padding
    host_out, got = run_host(host, feeds), run_host(out, feeds)
    assert got["last_hidden_state"].shape == (3, 9, 26)
    assert rel_err(got["last_hidden_state"], reference(host_out["last_hidden_state"], art32)) <= 1e-5
    assert np.array_equal(got["last_hidden_state_unfiltered"], host_out["last_hidden_state"])


def test_failed_forced_reexport_keeps_the_previous_output(runner, art, tmp_path, monkeypatch):
    out = tmp_path / "o" / "f.onnx"
    args = ["export", str(art), "--onnx", "--external-data", "-o", str(out)]
    assert runner.invoke(app, args).exit_code == 0
    before = {p.name: p.read_bytes() for p in out.parent.iterdir()}
    monkeypatch.setitem(onnx_check.REL_BOUNDS, "float32", 0.0)
    result = runner.invoke(app, [*args, "--force", "--normalize"])
    assert result.exit_code == 1 and "max relative error" in result.stderr
    # the old graph and the data file it refers to are both back, byte for byte; no backups left
    assert {p.name: p.read_bytes() for p in out.parent.iterdir()} == before


def test_bfloat16_host_needs_no_check_and_computes_in_float32(runner, art, tmp_path):
    table = np.random.default_rng(1).standard_normal((VOCAB, D)).astype(np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("Gather", ["E", "ids"], ["e32"]),
            helper.make_node("Cast", ["e32"], ["sentence_embedding"], to=TP.BFLOAT16),
        ],
        "bf16",
        [helper.make_tensor_value_info("ids", TP.INT64, ["batch"])],
        [helper.make_tensor_value_info("sentence_embedding", TP.BFLOAT16, ["batch", D])],
        [numpy_helper.from_array(table, "E")],
    )
    host = tmp_path / "bf16.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), str(host))
    out = tmp_path / "bf16.f.onnx"
    result = runner.invoke(app, ["export", str(art), "--onnx", "--append-to", str(host), "-o", str(out)])
    assert result.exit_code == 1 and "is bfloat16, which onnxruntime's Python API cannot return" in result.stderr
    assert not out.exists()
    result = runner.invoke(app, ["export", str(art), "--onnx", "--append-to", str(host), "-o", str(out), "--no-check"])
    assert result.exit_code == 0, result.stderr
    # numpy cannot hold bfloat16: read both outputs through an extra float32 Cast to compare
    model = onnx.load(str(out))
    assert model.graph.output[0].type.tensor_type.elem_type == TP.BFLOAT16
    for name in ("sentence_embedding", "sentence_embedding_unfiltered"):
        model.graph.node.append(helper.make_node("Cast", [name], [f"{name}_f32"], to=TP.FLOAT))
        model.graph.output.append(helper.make_tensor_value_info(f"{name}_f32", TP.FLOAT, None))
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    filtered, unfiltered = sess.run(
        ["sentence_embedding_f32", "sentence_embedding_unfiltered_f32"], {"ids": np.arange(5)}
    )
    assert np.abs(unfiltered - table[:5]).max() <= 2**-8 * np.abs(table[:5]).max()  # bf16 rounding of the host
    assert rel_err(filtered, reference(unfiltered, art)) <= onnx_check.REL_BOUNDS["bfloat16"]


def test_projector_filter_keeps_the_dimension(runner, make_filter, tmp_path):
    # --no-reduce artifacts hold the d×d projector I − V_e V_eᵀ: same graph, output dimension d
    proj = make_filter(reduce=False, name="proj.safetensors")
    out = tmp_path / "p.onnx"
    result = runner.invoke(app, ["export", str(proj), "--onnx", "-o", str(out), "--normalize", "--json"])
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["output_dim"] == D
    x = np.random.default_rng(2).standard_normal((4, D)).astype(np.float32)
    assert rel_err(session(out).run(None, {"embeddings": x})[0], reference(x, proj, normalize=True)) <= 1e-5


def test_append_default_output_is_beside_the_host(runner, art, tmp_path):
    host = gather_host(tmp_path / "hub" / "model.onnx", external="model.data")
    result = runner.invoke(app, ["-v", "export", str(art), "--onnx", "--append-to", str(host)])
    assert result.exit_code == 0, result.stderr
    out = tmp_path / "hub" / "model.filtered.onnx"
    assert f"Writing {out}" in result.stderr
    assert listing(out.parent) == ["model.data", "model.filtered.onnx", "model.onnx"]  # no links needed
    feeds = {"input_ids": ids()}
    assert (
        rel_err(run_host(out, feeds)["sentence_embedding"], reference(run_host(host, feeds)["sentence_embedding"], art))
        <= 1e-5
    )
