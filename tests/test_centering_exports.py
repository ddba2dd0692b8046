"""A centred filter (y = P·x − m) everywhere it is applied outside Python: apply, ONNX, Dense, npy, safetensors.

Every output is compared with the float64 numpy reference x @ Pᵀ − m (then normalised where asked),
computed from the artifact's own float32 P and m.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from embfilter_cli.cli import app
from embfilter_cli.filters.artifact import load_artifact, save_artifact
from embfilter_cli.filters.centering import Centering
from tests.test_export_onnx import gather_host, ids, rel_err

D, K = 16, 13


def _record() -> Centering:
    return Centering(
        count=7,
        source="embeddings",
        sha256="b" * 64,
        pooling="mean",
        recipe="none",
        template="{text}",
        max_length=512,
        model_source="test/planted",
        unembedding_sha256="0" * 64,
        input="bg.npy",
    )


@pytest.fixture
def centred(make_filter, tmp_path) -> Path:
    """make_filter's d=16 → k=13 filter, centred on a mean as large as the projected vectors themselves."""
    art = load_artifact(make_filter())
    mean = (np.random.default_rng(11).standard_normal(K) * 1.5).astype(np.float32)
    return save_artifact(art.with_mean(mean, _record()), tmp_path / "centred.safetensors")


def reference(art_path: Path, x: np.ndarray, normalize: bool = False) -> np.ndarray:
    art = load_artifact(art_path)
    y = x.astype(np.float64) @ art.projection.astype(np.float64).T - art.mean.astype(np.float64)
    if normalize:
        y = y / np.maximum(np.linalg.norm(y, axis=-1, keepdims=True), 1e-12)
    return y


def vectors(n: int = 9, seed: int = 12) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, D)).astype(np.float32)


def _ok(result) -> None:
    assert result.exit_code == 0, result.stderr


# --------------------------------------------------------------------------- apply


@pytest.mark.parametrize("normalize", [False, True])
def test_apply_npy_jsonl_safetensors_subtract_the_mean(runner, centred, tmp_path, normalize):
    from safetensors import safe_open
    from safetensors.numpy import save_file

    x = vectors()
    ref = reference(centred, x, normalize)
    norm = ["--normalize"] if normalize else []
    np.save(tmp_path / "x.npy", x)
    _ok(runner.invoke(app, ["apply", str(centred), str(tmp_path / "x.npy"), "-o", str(tmp_path / "y.npy"), *norm]))
    assert rel_err(np.load(tmp_path / "y.npy"), ref) <= 1e-6

    (tmp_path / "x.jsonl").write_text(
        "".join(json.dumps({"id": i, "embedding": r.tolist()}) + "\n" for i, r in enumerate(x))
    )
    _ok(runner.invoke(app, ["apply", str(centred), str(tmp_path / "x.jsonl"), "-o", str(tmp_path / "y.jsonl"), *norm]))
    rows = [json.loads(line) for line in (tmp_path / "y.jsonl").read_text().splitlines()]
    assert [r["id"] for r in rows] == list(range(len(x)))
    assert rel_err(np.array([r["embedding"] for r in rows]), ref) <= 1e-12  # JSONL is computed in float64

    save_file({"emb": x}, str(tmp_path / "x.safetensors"))
    result = runner.invoke(
        app,
        [
            "apply",
            str(centred),
            str(tmp_path / "x.safetensors"),
            "-o",
            str(tmp_path / "y.safetensors"),
            "--json",
            *norm,
        ],
    )
    _ok(result)
    summary = json.loads(result.stdout)
    mean_sha = load_artifact(centred).metadata["mean_sha256"]
    assert summary["mean_sha256"] == mean_sha
    with safe_open(str(tmp_path / "y.safetensors"), "np") as fh:
        assert rel_err(fh.get_tensor("emb"), ref) <= 1e-6
        assert fh.metadata()["embfilter.mean_sha256"] == mean_sha  # which mean made these vectors


def test_apply_stdin_jsonl_and_parquet_subtract_the_mean(runner, centred, tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    x = vectors(5)
    ref = reference(centred, x)
    stdin = "".join(json.dumps({"embedding": r.tolist()}) + "\n" for r in x)
    result = runner.invoke(app, ["apply", str(centred), "-", "--format", "jsonl"], input=stdin)
    _ok(result)
    got = np.array([json.loads(line)["embedding"] for line in result.stdout.splitlines()])
    assert rel_err(got, ref) <= 1e-12

    table = pa.table({"embedding": pa.array(list(x), type=pa.list_(pa.float32(), D))})
    pq.write_table(table, tmp_path / "x.parquet")
    _ok(runner.invoke(app, ["apply", str(centred), str(tmp_path / "x.parquet"), "-o", str(tmp_path / "y.parquet")]))
    out = pq.read_table(tmp_path / "y.parquet")
    assert rel_err(np.array(out.column("embedding").to_pylist()), ref) <= 1e-6
    meta = {k.decode(): v.decode() for k, v in (out.schema.metadata or {}).items()}
    assert meta["embfilter.mean_sha256"] == load_artifact(centred).metadata["mean_sha256"]


def test_outputs_of_another_mean_are_foreign(centred, make_filter, tmp_path):
    """--resume and fingerprint checks must not take vectors made with another (or no) mean for finished ones."""
    from safetensors.numpy import save_file

    from embfilter_cli.vectors.fingerprints import check_vector_file
    from embfilter_cli.vectors.shards import WorkUnit, output_state

    art = load_artifact(centred)
    p_sha, m_sha = art.metadata["projection_sha256"], art.metadata["mean_sha256"]
    plain = tmp_path / "plain.safetensors"
    save_file(
        {"e": np.zeros((2, K), np.float32)},
        str(plain),
        metadata={"embfilter.projection_sha256": p_sha, "embfilter.normalized": "false"},
    )
    mine = tmp_path / "mine.safetensors"
    save_file(
        {"e": np.zeros((2, K), np.float32)},
        str(mine),
        metadata={
            "embfilter.projection_sha256": p_sha,
            "embfilter.mean_sha256": m_sha,
            "embfilter.normalized": "false",
        },
    )
    unit = WorkUnit(Path("in"), plain, "safetensors", "safetensors")
    settings = {"embfilter.normalized": "false"}

    def identity(mean: str) -> dict[str, str]:
        return {"embfilter.projection_sha256": p_sha, "embfilter.mean_sha256": mean}

    assert output_state(unit, 2, identity(""), settings) == "complete"  # uncentred filter, uncentred output
    assert output_state(unit, 2, identity(m_sha), settings) == "foreign"
    mine_unit = WorkUnit(Path("in"), mine, "safetensors", "safetensors")
    assert output_state(mine_unit, 2, identity(m_sha), settings) == "complete"
    assert check_vector_file(mine, p_sha, m_sha).ok
    bad = check_vector_file(plain, p_sha, m_sha)
    assert not bad.ok and "was made with the same projection but another mean" in bad.detail


# --------------------------------------------------------------------------- ONNX


def _session(path: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


@pytest.mark.parametrize(
    ("flags", "bound"),
    [([], 1e-5), (["--normalize"], 1e-5), (["--per-token"], 1e-5), (["--fp16"], 2e-3), (["--opset", "8"], 1e-5)],
    ids=["plain", "normalize", "per-token", "fp16", "opset8-ir3"],
)
def test_standalone_onnx_matmul_then_sub(runner, centred, tmp_path, flags, bound):
    out = tmp_path / "f.onnx"
    _ok(runner.invoke(app, ["export", str(centred), "--onnx", "-o", str(out), *flags]))
    model = onnx.load(str(out))
    ops = [n.op_type for n in model.graph.node]
    assert ops[ops.index("MatMul") + 1] == "Sub"  # the mean comes off before any normalisation
    meta = {p.key: p.value for p in model.metadata_props}
    assert meta["embfilter.mean_sha256"] == load_artifact(centred).metadata["mean_sha256"]
    assert json.loads(meta["embfilter.centering"])["count"] == 7
    per_token = "--per-token" in flags
    x = np.random.default_rng(13).standard_normal((4, 3, D) if per_token else (4, D))
    x = x.astype(np.float16 if "--fp16" in flags else np.float32)
    (got,) = _session(out).run(None, {"embeddings": x})
    assert got.shape == (*x.shape[:-1], K)
    assert rel_err(got, reference(centred, x, "--normalize" in flags)) <= bound


@pytest.mark.parametrize("normalize", [False, True])
def test_appended_onnx_subtracts_the_mean(runner, centred, tmp_path, normalize):
    host = gather_host(tmp_path / "host" / "model.onnx")
    out = tmp_path / "host" / "model.filtered.onnx"
    _ok(
        runner.invoke(
            app,
            ["export", str(centred), "--onnx", "--append-to", str(host), "-o", str(out)]
            + (["--normalize"] if normalize else []),
        )
    )
    feeds = {"input_ids": ids()}
    host_out = dict(zip([o.name for o in _session(host).get_outputs()], _session(host).run(None, feeds)))
    sess = _session(out)
    got = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feeds)))
    assert rel_err(got["sentence_embedding"], reference(centred, host_out["sentence_embedding"], normalize)) <= 1e-5
    assert np.array_equal(got["sentence_embedding_unfiltered"], host_out["sentence_embedding"])
    assert "Sub" in [n.op_type for n in onnx.load(str(out)).graph.node]


def test_appended_onnx_after_a_token_level_output_subtracts_per_token(runner, centred, tmp_path):
    host = gather_host(tmp_path / "host" / "model.onnx")
    out = tmp_path / "host" / "tok.onnx"
    _ok(
        runner.invoke(
            app, ["export", str(centred), "--onnx", "--append-to", str(host), "--output", "tokens", "-o", str(out)]
        )
    )
    feeds = {"input_ids": ids()}
    (host_tokens,) = _session(host).run(["tokens"], feeds)
    (got,) = _session(out).run(["tokens"], feeds)
    assert got.shape == (3, 6, K) and rel_err(got, reference(centred, host_tokens)) <= 1e-5


# --------------------------------------------------------------------------- sentence-transformers, npy, safetensors


def test_dense_module_has_bias_minus_mean(runner, centred, tmp_path):
    pytest.importorskip("sentence_transformers")
    import torch

    from embfilter_cli.export import formats

    out = tmp_path / "st" / "2_Dense"
    result = runner.invoke(
        app, ["export", str(centred), "--format", "sentence-transformers", "--dense-only", "-o", str(out), "--json"]
    )
    _ok(result)
    assert json.loads(result.stdout)["loader"].startswith("sentence-transformers ")
    assert json.loads((out / "config.json").read_text())["bias"] is True
    dense = formats._load_dense(out)
    art = load_artifact(centred)
    np.testing.assert_array_equal(dense.linear.bias.detach().numpy(), -art.mean)
    x = vectors()
    with torch.no_grad():
        got = dense({"sentence_embedding": torch.from_numpy(x)})["sentence_embedding"].double().numpy()
    assert rel_err(got, reference(centred, x)) <= 1e-6


def test_dense_check_without_the_library_rereads_the_bias(runner, centred, tmp_path, monkeypatch):
    from embfilter_cli.export import formats

    monkeypatch.setattr(formats, "_load_dense", lambda folder: None)
    result = runner.invoke(
        app,
        [
            "export",
            str(centred),
            "--format",
            "sentence-transformers",
            "--dense-only",
            "-o",
            str(tmp_path / "d"),
            "--json",
        ],
    )
    _ok(result)
    assert json.loads(result.stdout)["max_rel_error"] <= 1e-5


def test_npy_export_writes_the_mean_beside_p(runner, centred, tmp_path):
    out = tmp_path / "P.npy"
    result = runner.invoke(app, ["-v", "export", str(centred), "--format", "npy", "-o", str(out)])
    _ok(result)
    mean_file = tmp_path / "P.mean.npy"
    assert "Apply it as y = x @ P.T - m, with P = np.load(" in result.stderr and str(mean_file) in result.stderr
    p, m = np.load(out), np.load(mean_file)
    x = vectors()
    assert rel_err(x.astype(np.float64) @ p.T.astype(np.float64) - m, reference(centred, x)) <= 1e-12
    # both files or neither: an existing mean file stops the export before either is written
    (tmp_path / "Q.mean.npy").write_bytes(b"someone else's")
    result = runner.invoke(app, ["-v", "export", str(centred), "--format", "npy", "-o", str(tmp_path / "Q.npy")])
    assert result.exit_code == 1 and "Q.mean.npy already exists" in result.stderr
    assert not (tmp_path / "Q.npy").exists() and (tmp_path / "Q.mean.npy").read_bytes() == b"someone else's"
    assert not list(tmp_path.glob(".*.tmp"))


def test_npy_export_failed_check_leaves_neither_file(runner, centred, tmp_path, monkeypatch):
    from embfilter_cli.export import formats

    monkeypatch.setattr(formats, "REL_BOUND_FP32", -1.0)  # any result now fails the check
    result = runner.invoke(app, ["export", str(centred), "--format", "npy", "-o", str(tmp_path / "P.npy")])
    assert result.exit_code == 1 and "nothing was written" in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["centred.safetensors", "f.safetensors"]


def test_safetensors_exports_keep_the_mean(runner, centred, tmp_path):
    from safetensors import safe_open

    _ok(
        runner.invoke(
            app, ["-v", "export", str(centred), "--format", "safetensors", "-o", str(tmp_path / "copy.safetensors")]
        )
    )
    copy = load_artifact(tmp_path / "copy.safetensors")
    np.testing.assert_array_equal(copy.mean, load_artifact(centred).mean)
    result = runner.invoke(
        app, ["-v", "export", str(centred), "--format", "safetensors", "--fp16", "-o", str(tmp_path / "h.safetensors")]
    )
    _ok(result)
    assert "Apply it as y = x @ projection.T - mean" in result.stderr
    with safe_open(str(tmp_path / "h.safetensors"), "np") as fh:
        p, m = fh.get_tensor("projection"), fh.get_tensor("mean")
        assert p.dtype == np.float16 and m.dtype == np.float32
    x = vectors()
    assert rel_err(x.astype(np.float64) @ p.astype(np.float64).T - m, reference(centred, x)) <= 2e-3


def test_uncentred_exports_are_unchanged(runner, make_filter, tmp_path):
    """No mean: no Sub node, no bias, no second .npy file (the version-1 behaviour)."""
    art = make_filter()
    _ok(runner.invoke(app, ["export", str(art), "--onnx", "-o", str(tmp_path / "f.onnx")]))
    assert [n.op_type for n in onnx.load(str(tmp_path / "f.onnx")).graph.node] == ["MatMul"]
    _ok(runner.invoke(app, ["export", str(art), "--format", "npy", "-o", str(tmp_path / "P.npy")]))
    assert not (tmp_path / "P.mean.npy").exists()
    _ok(
        runner.invoke(
            app, ["export", str(art), "--format", "sentence-transformers", "--dense-only", "-o", str(tmp_path / "d")]
        )
    )
    assert json.loads((tmp_path / "d" / "config.json").read_text())["bias"] is False
