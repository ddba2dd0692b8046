"""Centring (issue 9 §1): the affine filter y = P·x − m, artifact format version 2, `center` and `fit --center-on`.

References are float64 numpy: m = mean_i(P·x_i) computed from the raw vectors, y = P·x − m.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import numpy as np
import pytest

from embfilter_cli.cli import app
from embfilter_cli.errors import ArtifactError, InputDataError
from embfilter_cli.filters import centering as centering_mod
from embfilter_cli.filters.artifact import FORMAT_VERSION, load_artifact, save_artifact
from embfilter_cli.filters.centering import (
    Centering,
    apply_affine,
    check_centering_use,
    filtered_mean,
    texts_sha256,
)

DATA = Path(__file__).parent / "data"
V1_FIXTURE = DATA / "filter_v1.safetensors"
HEX64 = re.compile(r"\b[0-9a-f]{64}\b")
TEXTS = ["The cat sat on the mat.", "Stock markets fell sharply on Monday.", "Rain is expected.", "A dog ran."]


def _error_line(result) -> str:
    lines = result.stderr.strip().splitlines()
    assert lines and lines[-1].startswith("Error: "), result.stderr
    assert sum(line.startswith("Error:") for line in lines) == 1
    return lines[-1]


def _files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def _record(k_sha: str = "0" * 64, **changes) -> Centering:
    fields = {
        "count": 3,
        "source": "embeddings",
        "sha256": "a" * 64,
        "pooling": "mean",
        "recipe": "none",
        "template": "{text}",
        "max_length": 512,
        "model_source": "test/planted",
        "unembedding_sha256": k_sha,
        "input": "bg.npy",
    }
    fields.update(changes)
    return Centering(**fields)


def _orthonormal_rows(k: int, d: int, seed: int = 0) -> np.ndarray:
    q, _ = np.linalg.qr(np.random.default_rng(seed).standard_normal((d, d)))
    return q[:k]


def _tensor_offset(path: Path, name: str) -> int:
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + n])
    return 8 + n + header[name]["data_offsets"][0]


# --------------------------------------------------------------------------- the pure math


def test_filtered_mean_is_the_mean_of_the_filtered_vectors(monkeypatch):
    rng = np.random.default_rng(1)
    raw = (rng.standard_normal((37, 12)) * 3 + 5).astype(np.float32)
    proj = _orthonormal_rows(7, 12).astype(np.float32)
    ref = (raw.astype(np.float64) @ proj.astype(np.float64).T).mean(axis=0)
    np.testing.assert_allclose(filtered_mean(raw, proj), ref, rtol=0, atol=1e-12)
    monkeypatch.setattr(centering_mod, "_CHUNK_ROWS", 5)  # several chunks, the last one short
    np.testing.assert_allclose(filtered_mean(raw, proj), ref, rtol=0, atol=1e-12)
    # hand-checkable: the mean of (1, 2) and (3, 4) through the identity is (2, 3)
    assert filtered_mean(np.array([[1.0, 2.0], [3.0, 4.0]]), np.eye(2)).tolist() == [2.0, 3.0]


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (np.zeros((4, 9), np.float32), "holds 9-dimensional vectors but the filter expects 12"),
        (np.zeros((0, 12), np.float32), "holds no vectors"),
        (np.zeros(12, np.float32), "needs a 2-D (n, 12) array"),
        (np.zeros((3, 12), np.int64), "has dtype int64"),
        (np.array([[0.0] * 12, [np.nan] + [0.0] * 11]), "row 1 holds NaN or Inf"),
    ],
    ids=["wrong-dim", "empty", "1-d", "ints", "nan"],
)
def test_filtered_mean_refuses_bad_backgrounds(raw, message):
    with pytest.raises(InputDataError, match=re.escape(message)):
        filtered_mean(raw, np.eye(12)[:5], where="bg.npy")


def test_apply_affine_matches_float64_reference():
    rng = np.random.default_rng(2)
    proj = _orthonormal_rows(5, 8).astype(np.float32)
    mean = rng.standard_normal(5).astype(np.float32)
    x = rng.standard_normal((6, 3, 8)).astype(np.float32)  # any leading shape
    ref = x.astype(np.float64) @ proj.astype(np.float64).T - mean.astype(np.float64)
    y32 = apply_affine(x, proj, mean)
    assert y32.dtype == np.float32 and y32.shape == (6, 3, 5)
    np.testing.assert_allclose(y32, ref, rtol=0, atol=1e-5)
    y64 = apply_affine(x.astype(np.float64), proj, mean)
    assert y64.dtype == np.float64
    np.testing.assert_allclose(y64, ref, rtol=0, atol=1e-12)
    np.testing.assert_array_equal(apply_affine(x, proj, None), x @ proj.T)


def test_texts_sha256_is_length_prefixed():
    by_hand = hashlib.sha256((3).to_bytes(8, "little") + b"a\nb").hexdigest()
    assert texts_sha256(["a\nb"]) == by_hand
    assert texts_sha256(["a\nb"]) != texts_sha256(["a", "b"]) != texts_sha256(["b", "a"])
    assert texts_sha256(["é"]) == hashlib.sha256((2).to_bytes(8, "little") + "é".encode()).hexdigest()


def test_centering_record_round_trips_and_refuses_damage():
    rec = _record()
    assert Centering.from_json(rec.to_json(), "f") == rec
    for text, needle in [
        ("not json", "not valid JSON"),
        ("[1]", "not a JSON object"),
        (json.dumps({**rec.as_dict(), "count": "3"}), "wrongly typed ['count']"),
        (json.dumps({k: v for k, v in rec.as_dict().items() if k != "pooling"}), "lacks ['pooling']"),
        (json.dumps({**rec.as_dict(), "count": 0}), "inconsistent (count 0"),
    ]:
        with pytest.raises(ArtifactError, match=re.escape(needle)):
            Centering.from_json(text, "f")


def test_centred_filter_refuses_another_pooling_or_recipe():
    rec = _record(pooling="last", recipe="summarize", template='Summarize the sentence: "{text}" in one word:"')
    check_centering_use(None, "mean", "none", "{text}", "f.safetensors")  # uncentred: anything goes
    check_centering_use(rec, "last", "summarize", rec.template, "f.safetensors")
    with pytest.raises(ArtifactError) as info:
        check_centering_use(rec, "mean", "none", "{text}", "f.safetensors")
    message = str(info.value)
    assert "centred on last-pooled vectors with recipe 'summarize'" in message
    assert "this run uses mean pooling with recipe 'none'" in message
    assert "run with --pooling last --recipe summarize" in message
    assert "`embfilter center f.safetensors TEXTS --pooling mean --recipe none -o NEW.safetensors`" in message
    custom = _record(recipe="custom", template="Query: {text}")
    with pytest.raises(ArtifactError, match=re.escape("--recipe 'Query: {text}'")):
        check_centering_use(custom, "mean", "custom", "Doc: {text}", "f.safetensors")


# --------------------------------------------------------------------------- the artifact, version 2


def test_centred_artifact_round_trip_and_header(make_filter, tmp_path):
    art = load_artifact(make_filter(d=16, top=2, bottom=1))
    mean = np.linspace(-1, 1, 13).astype(np.float32)
    centred = art.with_mean(mean, _record())
    assert art.mean is None and "centering" not in art.metadata  # the original is untouched
    path = save_artifact(centred, tmp_path / "c.safetensors")
    raw = path.read_bytes()
    header = json.loads(raw[8 : 8 + int.from_bytes(raw[:8], "little")])
    assert header["mean"] == {"dtype": "F32", "shape": [13], "data_offsets": header["mean"]["data_offsets"]}
    meta = header["__metadata__"]
    assert meta["format_version"] == FORMAT_VERSION == "2"
    assert meta["mean_sha256"] == hashlib.sha256(mean.tobytes()).hexdigest()
    assert json.loads(meta["centering"])["count"] == 3
    back = load_artifact(path)
    np.testing.assert_array_equal(back.mean, mean)
    assert back.centering == _record() and back.summary()["centering"]["pooling"] == "mean"
    x = np.random.default_rng(3).standard_normal((4, 16)).astype(np.float32)
    ref = x.astype(np.float64) @ back.projection.astype(np.float64).T - mean
    np.testing.assert_allclose(back.apply(x), ref, rtol=0, atol=1e-5)
    # uncentring drops the mean and its metadata
    plain = save_artifact(back.with_mean(None, None), tmp_path / "plain.safetensors")
    again = load_artifact(plain)
    assert again.mean is None and "centering" not in again.metadata and "mean_sha256" not in again.metadata


def test_version_1_file_loads_and_behaves_as_before(tmp_path):
    v1 = load_artifact(V1_FIXTURE)
    assert v1.metadata["format_version"] == "1" and v1.mean is None and v1.centering is None
    assert v1.projection.shape == (6, 8) and v1.summary()["centering"] is None
    x = np.random.default_rng(4).standard_normal((5, 8)).astype(np.float32)
    np.testing.assert_array_equal(v1.apply(x), x @ v1.projection.T)  # exactly the version-1 map
    # the v1 digest check still works, and rewriting a v1 filter gives a v2 file with the same projection
    resaved = load_artifact(save_artifact(v1, tmp_path / "v2.safetensors"))
    assert resaved.metadata["format_version"] == "2"
    assert resaved.metadata["projection_sha256"] == v1.metadata["projection_sha256"]


def test_version_1_filter_verifies_and_applies_from_the_cli(runner, tmp_path):
    result = runner.invoke(app, ["verify", str(V1_FIXTURE), "--json"])
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["ok"] and [c["name"] for c in report["checks"]] == ["format", "digest", "orthonormal", "complement"]
    x = np.random.default_rng(5).standard_normal((3, 8)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    result = runner.invoke(app, ["apply", str(V1_FIXTURE), str(tmp_path / "x.npy"), "-o", str(tmp_path / "y.npy")])
    assert result.exit_code == 0, result.stderr
    np.testing.assert_allclose(np.load(tmp_path / "y.npy"), x @ load_artifact(V1_FIXTURE).projection.T, atol=1e-6)


def _save_raw(path: Path, tensors: dict, metadata: dict) -> Path:
    from safetensors.numpy import save_file

    save_file(tensors, str(path), metadata=metadata)
    return path


def _parts(path: Path) -> tuple[dict, dict]:
    from safetensors import safe_open

    with safe_open(str(path), framework="numpy") as handle:
        return {k: handle.get_tensor(k) for k in handle.keys()}, dict(handle.metadata())


@pytest.mark.parametrize(
    ("edit", "needle"),
    [
        (lambda t, m: t.__setitem__("mean", np.zeros(5, np.float32)), "the mean must be 13 float32 values"),
        (lambda t, m: t.__setitem__("mean", t["mean"].astype(np.float64)), "found float64 (13,)"),
        (lambda t, m: t.pop("mean"), "has ['centering', 'mean_sha256'] metadata but no `mean` tensor"),
        (lambda t, m: m.pop("centering"), "has a `mean` tensor but lacks metadata ['centering']"),
        (lambda t, m: m.__setitem__("format_version", "1"), "is a version-1 filter but holds a `mean` tensor"),
        (lambda t, m: m.__setitem__("format_version", "3"), "reads versions 1 and 2"),
        (
            lambda t, m: m.__setitem__("centering", _record(k_sha="f" * 64).to_json()),
            "the mean was made with a model whose W_U sha256 is ffffffffffffffff…",
        ),
        (lambda t, m: t["mean"].__setitem__(0, np.inf), "the mean holds NaN or Inf"),
        (lambda t, m: t["mean"].__setitem__(0, 7.0), "the mean does not match its stored SHA-256"),
    ],
    ids=["shape", "dtype", "no-tensor", "no-record", "v1-with-mean", "v3", "other-model", "inf", "digest"],
)
def test_loader_validates_the_mean(make_filter, tmp_path, edit, needle):
    art = load_artifact(make_filter())
    good = save_artifact(art.with_mean(np.ones(13, np.float32), _record()), tmp_path / "good.safetensors")
    tensors, metadata = _parts(good)
    tensors = {k: v.copy() for k, v in tensors.items()}
    edit(tensors, metadata)
    bad = _save_raw(tmp_path / "bad.safetensors", tensors, metadata)
    with pytest.raises(ArtifactError, match=re.escape(needle)):
        load_artifact(bad)


def test_with_mean_refuses_a_background_from_another_model(make_filter):
    art = load_artifact(make_filter())
    with pytest.raises(ArtifactError, match="embed it with the filter's model"):
        art.with_mean(np.ones(13, np.float32), _record(k_sha="1" * 64))
    with pytest.raises(ArtifactError, match="the mean has 5 values but the filter outputs 13"):
        art.with_mean(np.ones(5, np.float32), _record())


# --------------------------------------------------------------------------- verify


def test_verify_checks_the_mean_and_catches_a_tampered_one(runner, make_filter, tmp_path):
    art = load_artifact(make_filter())
    path = save_artifact(art.with_mean(np.full(13, 0.5, np.float32), _record()), tmp_path / "c.safetensors")
    result = runner.invoke(app, ["verify", str(path), "--json"])
    assert result.exit_code == 0, result.stderr
    checks = {c["name"]: c for c in json.loads(result.stdout)["checks"]}
    assert checks["mean"]["ok"] and checks["mean"]["values"]["centering"]["count"] == 3
    stored = load_artifact(path).metadata["mean_sha256"]
    raw = bytearray(path.read_bytes())
    off = _tensor_offset(path, "mean")
    raw[off : off + 4] = np.float32(0.25).tobytes()  # still finite, still 13 float32s: only the digest notices
    path.write_bytes(bytes(raw))
    result = runner.invoke(app, ["verify", str(path)])
    assert result.exit_code == 1
    line = _error_line(result)
    assert "the mean does not match its stored SHA-256" in line and "embfilter center" in line
    hashes = HEX64.findall(line)
    assert hashes[0] == stored and len(hashes) == 2 and hashes[1] != stored
    assert re.search(r"^mean\s+FAIL", result.stdout, re.M) and re.search(r"^digest\s+OK", result.stdout, re.M)
    # and every command that applies the filter refuses it too
    np.save(tmp_path / "x.npy", np.zeros((2, 16), np.float32))
    result = runner.invoke(app, ["apply", str(path), str(tmp_path / "x.npy"), "-o", str(tmp_path / "y.npy")])
    assert result.exit_code == 1 and "the mean does not match its stored SHA-256" in _error_line(result)
    assert not (tmp_path / "y.npy").exists()


# --------------------------------------------------------------------------- `embfilter center` with .npy


def test_center_with_npy_embeddings_matches_numpy(runner, make_filter, tmp_path):
    filt = make_filter()
    raw = np.random.default_rng(6).standard_normal((25, 16)).astype(np.float32) + 2
    np.save(tmp_path / "bg.npy", raw)
    out = tmp_path / "c.safetensors"
    result = runner.invoke(
        app, ["center", str(filt), str(tmp_path / "bg.npy"), "-o", str(out), "--pooling", "last", "--json"]
    )
    assert result.exit_code == 0, result.stderr
    summary = json.loads(result.stdout)
    art = load_artifact(out)
    ref = (raw.astype(np.float64) @ art.projection.astype(np.float64).T).mean(axis=0)
    np.testing.assert_allclose(art.mean, ref, rtol=0, atol=1e-6)
    rec = art.centering
    assert (rec.count, rec.source, rec.pooling, rec.recipe, rec.input) == (
        25,
        "embeddings",
        "last",
        "none",
        str(tmp_path / "bg.npy"),
    )
    assert rec.sha256 == hashlib.sha256((tmp_path / "bg.npy").read_bytes()).hexdigest()
    assert summary["centering"]["count"] == 25 and summary["mean_sha256"] == art.metadata["mean_sha256"]
    assert summary["filter"] == str(filt) and summary["output"] == str(out)
    np.testing.assert_array_equal(art.projection, load_artifact(filt).projection)  # P is kept
    # recentring a centred filter replaces the mean (it is always the mean of P·x, not of P·x − m_old)
    np.save(tmp_path / "bg2.npy", raw[:5])
    result = runner.invoke(app, ["center", str(out), str(tmp_path / "bg2.npy"), "-o", str(tmp_path / "c2.safetensors")])
    assert result.exit_code == 0, result.stderr
    ref2 = (raw[:5].astype(np.float64) @ art.projection.astype(np.float64).T).mean(axis=0)
    np.testing.assert_allclose(load_artifact(tmp_path / "c2.safetensors").mean, ref2, rtol=0, atol=1e-6)
    assert "background" in result.stdout and "y = P·x − m" in result.stdout


@pytest.mark.parametrize(
    ("make_input", "needle"),
    [
        (lambda p: np.save(p / "bg.npy", np.zeros((4, 12), np.float32)), "holds 12-dimensional embeddings but"),
        (lambda p: np.save(p / "bg.npy", np.zeros((0, 16), np.float32)), "holds no vectors (shape (0, 16))"),
        (lambda p: np.save(p / "bg.npy", np.zeros(16, np.float32)), "centring needs a 2-D (n, d) float array"),
        (lambda p: np.save(p / "bg.npy", np.full((2, 16), np.nan, np.float32)), "row 0 holds NaN or Inf"),
        (lambda p: (p / "bg.npy").write_bytes(b"not an npy file"), "is not a readable .npy array"),
    ],
    ids=["wrong-dim", "empty", "1-d", "nan", "garbage"],
)
def test_center_bad_npy_is_one_line_and_writes_nothing(runner, make_filter, tmp_path, make_input, needle):
    filt = make_filter()
    make_input(tmp_path)
    before = _files(tmp_path)
    result = runner.invoke(app, ["center", str(filt), str(tmp_path / "bg.npy"), "-o", str(tmp_path / "c.safetensors")])
    assert result.exit_code == 1, result.stderr
    line = _error_line(result)
    assert needle in line and result.stdout == ""
    if "12-dimensional" in needle:
        assert "expects 16" in line  # both dimensions named
    assert _files(tmp_path) == before  # nothing written, no temporary left


def test_center_refuses_existing_output_and_missing_filter(runner, make_filter, tmp_path):
    filt = make_filter()
    np.save(tmp_path / "bg.npy", np.zeros((2, 16), np.float32))
    (tmp_path / "c.safetensors").write_text("keep me")
    result = runner.invoke(app, ["center", str(filt), str(tmp_path / "bg.npy"), "-o", str(tmp_path / "c.safetensors")])
    assert result.exit_code == 1 and "already exists; pass --force" in _error_line(result)
    assert (tmp_path / "c.safetensors").read_text() == "keep me"
    result = runner.invoke(
        app,
        ["center", str(tmp_path / "nope.safetensors"), str(tmp_path / "bg.npy"), "-o", str(tmp_path / "d.safetensors")],
    )
    assert result.exit_code == 1 and "does not exist" in _error_line(result)


# --------------------------------------------------------------------------- with the tiny Llama


@pytest.fixture(scope="module")
def llama_filter(tmp_path_factory, tiny_llama):
    from click.testing import CliRunner

    root = tmp_path_factory.mktemp("centering")
    filt = root / "f.safetensors"
    result = CliRunner().invoke(
        app, ["fit", "-m", str(tiny_llama), "--rank", "3", "--bottom", "2", "-o", str(filt), "-q"]
    )
    assert result.exit_code == 0, result.stderr
    return filt


@pytest.fixture(scope="module")
def encoder(tiny_llama):
    from embfilter_cli.text.embedding import load_encoder

    return load_encoder(str(tiny_llama), device="cpu")


def test_center_on_texts_uses_the_filters_own_model(runner, llama_filter, encoder, tmp_path):
    src = tmp_path / "bg.txt"
    src.write_text("\n".join(TEXTS) + "\n\n")
    out = tmp_path / "c.safetensors"
    result = runner.invoke(
        app,
        [
            "center",
            str(llama_filter),
            str(src),
            "-o",
            str(out),
            "--device",
            "cpu",
            "--pooling",
            "last",
            "--recipe",
            "summarize",
        ],
    )
    assert result.exit_code == 0, result.stderr
    assert "1 empty text skipped (line 5)" in result.stderr
    art = load_artifact(out)
    raw = encoder.embed(TEXTS, pooling="last", recipe="summarize").astype(np.float64)
    np.testing.assert_allclose(art.mean, (raw @ art.projection.astype(np.float64).T).mean(axis=0), rtol=0, atol=1e-5)
    rec = art.centering
    assert (rec.count, rec.source, rec.pooling, rec.recipe, rec.max_length) == (4, "texts", "last", "summarize", 128)
    assert rec.sha256 == texts_sha256(TEXTS) and rec.model_source == art.model_source  # 128: the model's context
    assert rec.template == 'Summarize the sentence: "{text}" in one word:"'


@pytest.mark.parametrize("content", ["", "\n  \n\t\n"], ids=["empty", "all-blank"])
def test_center_and_fit_refuse_empty_backgrounds(runner, llama_filter, tiny_llama, tmp_path, content):
    src = tmp_path / "bg.txt"
    src.write_text(content)
    before = _files(tmp_path)
    result = runner.invoke(app, ["center", str(llama_filter), str(src), "-o", str(tmp_path / "c.safetensors")])
    assert result.exit_code == 1 and result.stdout == ""
    assert "holds no non-empty text" in _error_line(result)
    result = runner.invoke(
        app,
        ["fit", "-m", str(tiny_llama), "--rank", "3", "--center-on", str(src), "-o", str(tmp_path / "f.safetensors")],
    )
    assert result.exit_code == 1 and result.stdout == ""
    assert "holds no non-empty text" in _error_line(result) and "Solver" not in result.stderr  # before decomposing
    result = runner.invoke(
        app,
        ["fit", "-m", str(tiny_llama), "--rank", "3", "--center-on", "-", "-o", str(tmp_path / "f.safetensors")],
        input=content,
    )
    assert result.exit_code == 1 and "stdin holds no non-empty text" in _error_line(result)
    assert _files(tmp_path) == before


def test_center_refuses_a_model_with_another_unembedding(runner, llama_filter, tiny_llama_b, tmp_path):
    src = tmp_path / "bg.txt"
    src.write_text("hello there\n")
    result = runner.invoke(
        app, ["center", str(llama_filter), str(src), "-m", str(tiny_llama_b), "-o", str(tmp_path / "c.safetensors")]
    )
    assert result.exit_code == 1
    assert "fit a filter on this model" in _error_line(result)
    assert not (tmp_path / "c.safetensors").exists()


def test_fit_center_on_texts_stores_the_filtered_mean(runner, tiny_llama, encoder, tmp_path):
    src = tmp_path / "bg.jsonl"
    src.write_text("".join(json.dumps({"text": t, "id": i}) + "\n" for i, t in enumerate(TEXTS)))
    out = tmp_path / "f.safetensors"
    result = runner.invoke(
        app,
        [
            "fit",
            "-m",
            str(tiny_llama),
            "--rank",
            "3",
            "--bottom",
            "2",
            "--center-on",
            str(src),
            "--max-length",
            "8",
            "--batch-size",
            "3",
            "--device",
            "cpu",
            "-o",
            str(out),
            "--json",
        ],
    )
    assert result.exit_code == 0, result.stderr
    summary = json.loads(result.stdout)
    art = load_artifact(out)
    raw = encoder.embed(TEXTS, max_length=8).astype(np.float64)
    ref = (raw @ art.projection.astype(np.float64).T).mean(axis=0)
    np.testing.assert_allclose(art.mean, ref, rtol=0, atol=1e-5)
    assert summary["centering"]["centering"]["count"] == 4 and summary["centering"]["centering"]["max_length"] == 8
    assert summary["centering"]["mean_norm"] == pytest.approx(float(np.linalg.norm(ref)), rel=1e-5)
    assert "exceeded --max-length 8" in result.stderr  # some texts are longer than 8 tokens
    result = runner.invoke(app, ["verify", str(out), "-m", str(tiny_llama), "--json"])
    assert result.exit_code == 0, result.stderr
    checks = {c["name"]: c for c in json.loads(result.stdout)["checks"]}
    assert checks["mean"]["ok"] and checks["unembedding"]["ok"]
    assert checks["mean"]["detail"].startswith("mean of 4 filtered text embeddings (mean pooling, recipe none)")


def test_fit_center_on_npy_of_the_wrong_dimension_fails_before_solving(runner, tiny_llama, tmp_path):
    np.save(tmp_path / "bg.npy", np.zeros((3, 16), np.float32))
    out = tmp_path / "f.safetensors"
    result = runner.invoke(
        app, ["fit", "-m", str(tiny_llama), "--rank", "3", "--center-on", str(tmp_path / "bg.npy"), "-o", str(out)]
    )
    assert result.exit_code == 1
    line = _error_line(result)
    assert "holds 16-dimensional embeddings but" in line and "expects 32" in line
    assert "Solver" not in result.stderr and not out.exists()


def test_fit_center_on_npy_runs_no_model(runner, tiny_llama, tmp_path, monkeypatch):
    raw = np.random.default_rng(7).standard_normal((9, 32)).astype(np.float32)
    np.save(tmp_path / "bg.npy", raw)

    def no_model(*args, **kwargs):
        raise AssertionError("a .npy background must not load the model")

    monkeypatch.setattr("embfilter_cli.text.embedding.load_encoder_at", no_model)
    out = tmp_path / "f.safetensors"
    result = runner.invoke(
        app,
        ["fit", "-m", str(tiny_llama), "--rank", "3", "--center-on", str(tmp_path / "bg.npy"), "-o", str(out), "-q"],
    )
    assert result.exit_code == 0, result.stderr
    art = load_artifact(out)
    np.testing.assert_allclose(
        art.mean, (raw.astype(np.float64) @ art.projection.astype(np.float64).T).mean(0), atol=1e-6
    )
    assert art.centering.source == "embeddings"


def test_embed_honours_the_mean_and_refuses_another_recipe(runner, tiny_llama, llama_filter, encoder, tmp_path):
    bg = tmp_path / "bg.txt"
    bg.write_text("\n".join(TEXTS) + "\n")
    centred = tmp_path / "c.safetensors"
    result = runner.invoke(app, ["center", str(llama_filter), str(bg), "-o", str(centred), "-q"])
    assert result.exit_code == 0, result.stderr
    src = tmp_path / "in.txt"
    queries = ["A cat on a mat.", "Markets fell."]
    src.write_text("\n".join(queries) + "\n")
    for normalize in (False, True):
        out = tmp_path / f"o{normalize}.npy"
        args = ["embed", "-m", str(tiny_llama), "--device", "cpu", "--filter", str(centred), str(src), "-o", str(out)]
        result = runner.invoke(app, args + (["--normalize"] if normalize else []))
        assert result.exit_code == 0, result.stderr
        art = load_artifact(centred)
        ref = encoder.embed(queries).astype(np.float64) @ art.projection.astype(np.float64).T - art.mean
        if normalize:  # the mean is subtracted BEFORE normalising
            ref /= np.linalg.norm(ref, axis=1, keepdims=True)
        np.testing.assert_allclose(np.load(out), ref, rtol=0, atol=1e-5)
    out = tmp_path / "bad.npy"
    result = runner.invoke(
        app, ["embed", "-m", str(tiny_llama), "--filter", str(centred), "--pooling", "last", str(src), "-o", str(out)]
    )
    assert result.exit_code == 1 and result.stdout == ""
    line = _error_line(result)
    assert "centred on mean-pooled vectors with recipe 'none'" in line and "uses last pooling" in line
    assert "embfilter center" in line and not out.exists()


def test_center_module_keeps_help_light():
    """`embfilter center --help` must not import torch (the CLI's help promise)."""
    import subprocess
    import sys

    code = "import sys; from embfilter_cli.cli import app; app(['center','--help'], standalone_mode=False); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=Path(__file__).parent.parent)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "False"


def test_v1_fixture_is_tiny():
    assert V1_FIXTURE.stat().st_size < 4096


# --------------------------------------------------------------------------- eval and inspect text


def test_lens_after_a_centred_filter_is_the_centred_output_lifted_back():
    from embfilter_cli.text.lens import filtered_in_hidden_space

    basis, _ = np.linalg.qr(np.random.default_rng(8).standard_normal((8, 8)))
    v = basis.T
    reduced, removed = v[1:], v[[0]]
    projector = np.eye(8) - removed.T @ removed
    background = np.random.default_rng(9).standard_normal((20, 8)) + 3
    e = np.random.default_rng(10).standard_normal((3, 8))
    m_reduced = filtered_mean(background, reduced)  # (7,)
    m_projector = filtered_mean(background, projector)  # (8,): the same mean, in hidden coordinates
    a = filtered_in_hidden_space(e, reduced, m_reduced)
    b = filtered_in_hidden_space(e, projector, m_projector)
    np.testing.assert_allclose(a, b, atol=1e-12)  # both artifact kinds agree
    kept = e - (e @ removed.T) @ removed
    np.testing.assert_allclose(a, kept - (background.mean(0) - (background.mean(0) @ removed.T) @ removed), atol=1e-12)


def _pairs_tsv(path: Path) -> Path:
    pairs = [
        ("The cat sat on the mat.", "A cat sat on a mat.", 4.8),
        ("A dog ran in the park.", "The dog ran in the park.", 4.5),
        ("Rain is expected over the weekend.", "Stock markets fell sharply on Monday.", 0.2),
        ("The recipe needs two eggs and some flour.", "Two eggs and flour.", 3.9),
        ("Stock markets fell sharply on Monday.", "Markets fell on Monday.", 4.1),
        ("The cat sat on the mat.", "Rain is expected over the weekend.", 0.4),
    ]
    path.write_text("text1\ttext2\tscore\n" + "".join(f"{a}\t{b}\t{s}\n" for a, b, s in pairs))
    return path


def test_eval_scores_a_centred_filter_with_its_mean(runner, tiny_llama, llama_filter, encoder, tmp_path, monkeypatch):
    from embfilter_cli.text.datasets import load_dataset
    from embfilter_cli.text.evaluation import score_vectors

    monkeypatch.setenv("EMBFILTER_CACHE", str(tmp_path / "cache"))
    tsv = _pairs_tsv(tmp_path / "pairs.tsv")
    # a strongly off-centre background makes centring change the cosines visibly
    raw_bg = encoder.embed(TEXTS).astype(np.float32) * 3
    np.save(tmp_path / "bg.npy", raw_bg)
    centred = tmp_path / "c.safetensors"
    assert (
        runner.invoke(app, ["center", str(llama_filter), str(tmp_path / "bg.npy"), "-o", str(centred)]).exit_code == 0
    )
    base = ["eval", "-m", str(tiny_llama), "--device", "cpu", "--data", str(tsv), "--json"]
    result = runner.invoke(app, [*base, "--filter", str(llama_filter), "--filter", str(centred)])
    assert result.exit_code == 0, result.stderr
    rows = {r["name"]: r for r in json.loads(result.stdout)["results"]}
    data = load_dataset(str(tsv))
    raw = encoder.embed(data.texts).astype(np.float64)
    art = load_artifact(centred)
    p = art.projection.astype(np.float64)
    ref_centred, _ = score_vectors(raw @ p.T - art.mean, data)
    ref_plain, _ = score_vectors(raw @ p.T, data)
    assert rows["c.safetensors"]["spearman"] == pytest.approx(ref_centred, abs=1e-9)
    assert rows["f.safetensors"]["spearman"] == pytest.approx(ref_plain, abs=1e-9)
    result = runner.invoke(app, [*base, "--filter", str(centred), "--pooling", "last"])
    assert result.exit_code == 1 and result.stdout == ""
    assert "centred on mean-pooled vectors" in _error_line(result)


def test_inspect_text_lens_after_a_centred_filter(runner, tiny_llama, llama_filter, encoder, tmp_path):
    np.save(tmp_path / "bg.npy", encoder.embed(TEXTS).astype(np.float32))
    centred = tmp_path / "c.safetensors"
    assert (
        runner.invoke(app, ["center", str(llama_filter), str(tmp_path / "bg.npy"), "-o", str(centred)]).exit_code == 0
    )
    texts = ["The cat sat on the mat.", "Markets fell."]
    args = ["inspect", "text", "-m", str(tiny_llama), *texts, "--filter", str(centred), "--top", "5", "--device", "cpu"]
    result = runner.invoke(app, [*args, "--json"])
    assert result.exit_code == 0, result.stderr
    doc = json.loads(result.stdout)
    assert doc["centered"] is True
    from safetensors import safe_open

    with safe_open(str(tiny_llama / "model.safetensors"), "np") as fh:
        w = fh.get_tensor("lm_head.weight").astype(np.float64)
    art = load_artifact(centred)
    p = art.projection.astype(np.float64)
    e = encoder.embed(texts).astype(np.float64)
    after = (e @ p.T - art.mean) @ p
    for n, entry in enumerate(doc["texts"]):
        assert [t["id"] for t in entry["after"]] == np.argsort(-(w @ after[n]))[:5].tolist()
        assert [t["id"] for t in entry["before"]] == np.argsort(-(w @ e[n]))[:5].tolist()
    result = runner.invoke(app, args)
    assert result.exit_code == 0 and "centred: mean of 4 filtered pre-computed embeddings" in result.stdout
    result = runner.invoke(app, [*args, "--recipe", "prompteol"])
    assert result.exit_code == 1 and result.stdout == ""
    assert "this run uses mean pooling with recipe 'prompteol'" in _error_line(result)


def test_center_turns_a_version_1_filter_into_a_centred_version_2_one(runner, tmp_path):
    raw = np.random.default_rng(14).standard_normal((6, 8)).astype(np.float32)
    np.save(tmp_path / "bg.npy", raw)
    out = tmp_path / "v2.safetensors"
    result = runner.invoke(app, ["center", str(V1_FIXTURE), str(tmp_path / "bg.npy"), "-o", str(out), "-q"])
    assert result.exit_code == 0, result.stderr
    art, v1 = load_artifact(out), load_artifact(V1_FIXTURE)
    assert (
        art.metadata["format_version"] == "2" and art.metadata["projection_sha256"] == v1.metadata["projection_sha256"]
    )
    ref = (raw.astype(np.float64) @ v1.projection.astype(np.float64).T).mean(axis=0)
    np.testing.assert_allclose(art.mean, ref, rtol=0, atol=1e-6)
    assert load_artifact(V1_FIXTURE).mean is None


def test_center_reads_background_texts_from_stdin(runner, llama_filter, encoder, tmp_path):
    out = tmp_path / "c.safetensors"
    result = runner.invoke(
        app,
        ["center", str(llama_filter), "-", "-o", str(out), "--device", "cpu", "--json"],
        input="\n".join(TEXTS) + "\n",
    )
    assert result.exit_code == 0, result.stderr
    doc = json.loads(result.stdout)
    assert doc["centering"]["input"] == "-" and doc["centering"]["count"] == 4
    art = load_artifact(out)
    raw = encoder.embed(TEXTS).astype(np.float64)
    np.testing.assert_allclose(art.mean, (raw @ art.projection.astype(np.float64).T).mean(axis=0), rtol=0, atol=1e-5)
