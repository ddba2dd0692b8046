"""The library at the package root (`embfilter_cli.fit`, `load`, `Filter`, `Encoder`) against the CLI.

The CLI commands call these same functions, so files and vectors must agree: artifacts tensor for
tensor (bit-equal; only `created_utc` differs), vectors within float32 rounding (atol 1e-6 relative
to the largest value, stated per test).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import embfilter_cli
from embfilter_cli.cli import app
from embfilter_cli.errors import ArtifactError, BandError, EmbfilterError, InputDataError
from embfilter_cli.filters.artifact import load_artifact

TEXTS = ["The cat sat on the mat.", "A dog ran in the park.", "Stocks fell.", "the recipe needs two eggs"]


@pytest.fixture(scope="module")
def llama_fit(tiny_llama, tmp_path_factory):
    """(the CLI's artifact path, the library's Filter) for the same band on the tiny Llama."""
    from click.testing import CliRunner

    out = tmp_path_factory.mktemp("api_fit") / "cli.safetensors"
    result = CliRunner().invoke(app, ["fit", "-m", str(tiny_llama), "--rank", "3", "--bottom", "2", "-o", str(out)])
    assert result.exit_code == 0, result.stderr
    return out, embfilter_cli.fit(str(tiny_llama), rank=3, bottom=2)


def _same_artifact(a, b) -> None:
    for name in ("projection", "singular_values", "kept_indices", "removed_directions"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name), err_msg=name)
    # Saving adds format, format_version and the digests; an unsaved filter has the rest.
    saved_only = {"created_utc", "format", "format_version", "projection_sha256", "mean_sha256"}
    meta_a = {k: v for k, v in a.metadata.items() if k not in saved_only}
    meta_b = {k: v for k, v in b.metadata.items() if k not in saved_only}
    assert meta_a == meta_b
    if a.path is not None and b.path is not None:
        assert {k: v for k, v in a.metadata.items() if k != "created_utc"} == {
            k: v for k, v in b.metadata.items() if k != "created_utc"
        }
    assert (a.mean is None) == (b.mean is None)
    if a.mean is not None:
        np.testing.assert_array_equal(a.mean, b.mean)


def _texts_file(tmp_path: Path) -> Path:
    path = tmp_path / "texts.txt"
    path.write_text("\n".join(TEXTS) + "\n")
    return path


def test_fit_and_save_give_the_clis_file(runner, llama_fit, tiny_llama, tmp_path):
    cli_path, filt = llama_fit
    saved = filt.save(tmp_path / "api.safetensors")
    _same_artifact(load_artifact(saved), load_artifact(cli_path))
    assert filt.path == saved and (filt.input_dim, filt.output_dim) == (32, 27)
    assert filt.band["top"] == 3 and filt.band["bottom"] == 2 and not filt.centered
    assert filt.model_source == str(tiny_llama)
    result = runner.invoke(app, ["verify", str(saved), "--model", str(tiny_llama)])
    assert result.exit_code == 0, result.stderr
    # the default band is --band auto, as in the CLI
    auto_cli = tmp_path / "auto.safetensors"
    assert runner.invoke(app, ["fit", "-m", str(tiny_llama), "-o", str(auto_cli)]).exit_code == 0
    _same_artifact(embfilter_cli.fit(str(tiny_llama)).artifact, load_artifact(auto_cli))


def test_fit_errors_are_the_clis(runner, tiny_llama, tmp_path):
    with pytest.raises(BandError) as api:
        embfilter_cli.fit(str(tiny_llama), rank=3, band="auto")
    cli = runner.invoke(app, ["fit", "-m", str(tiny_llama), "--rank", "3", "--band", "auto", "-o", str(tmp_path / "x")])
    assert cli.exit_code == 2 and str(api.value) in " ".join(cli.stderr.split())  # BandError is a usage error
    with pytest.raises(BandError) as api:
        embfilter_cli.fit(str(tiny_llama), rank=40)
    cli = runner.invoke(app, ["fit", "-m", str(tiny_llama), "--rank", "40", "-o", str(tmp_path / "x")])
    assert cli.exit_code == 2 and str(api.value) in " ".join(cli.stderr.split())
    assert not (tmp_path / "x").exists()


def test_load_runs_verifys_checks(runner, llama_fit, tmp_path):
    cli_path, _ = llama_fit
    loaded = embfilter_cli.load(cli_path)
    _same_artifact(loaded.artifact, load_artifact(cli_path))
    assert repr(loaded).count("\n") == 0 and repr(loaded).startswith("Filter(32 → 27 dims, top 3 + bottom 2 removed")
    # Rows that are no longer orthonormal, with a digest that still matches: load refuses like verify.
    from embfilter_cli.filters.artifact import save_artifact

    art = load_artifact(cli_path)
    art.projection = art.projection * 1.01
    bent = save_artifact(art, tmp_path / "bent.safetensors")
    with pytest.raises(ArtifactError) as api:
        embfilter_cli.load(bent)
    cli = runner.invoke(app, ["verify", str(bent)])
    assert cli.exit_code == 1 and str(api.value) in " ".join(cli.stderr.split())
    with pytest.raises(ArtifactError, match="does not exist"):
        embfilter_cli.load(tmp_path / "missing.safetensors")


def test_apply_keeps_array_type_dtype_and_rank_and_equals_the_cli(runner, llama_fit, tmp_path):
    cli_path, filt = llama_fit
    x = np.random.default_rng(0).standard_normal((5, 32)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    result = runner.invoke(app, ["apply", str(cli_path), str(tmp_path / "x.npy"), "-o", str(tmp_path / "y.npy")])
    assert result.exit_code == 0, result.stderr
    cli = np.load(tmp_path / "y.npy")
    y = filt(x)
    assert isinstance(y, np.ndarray) and y.dtype == np.float32 and y.shape == (5, 27)
    np.testing.assert_allclose(y, cli, rtol=0, atol=1e-6 * np.abs(cli).max())
    np.testing.assert_allclose(filt.apply(x[0]), cli[0], rtol=0, atol=1e-6 * np.abs(cli).max())
    for dtype, tol in ((np.float16, 2e-3), (np.float64, 1e-6)):
        got = filt(x.astype(dtype))
        assert got.dtype == dtype and got.shape == (5, 27)
        np.testing.assert_allclose(got.astype(np.float64), cli, rtol=0, atol=tol * np.abs(cli).max())
    t = torch.from_numpy(x)
    for tensor in (t, t[0], t.to(torch.bfloat16), t.double()):
        got_t = filt(tensor)
        assert isinstance(got_t, torch.Tensor) and got_t.dtype == tensor.dtype and got_t.device == tensor.device
        assert got_t.shape == (*tensor.shape[:-1], 27)
    np.testing.assert_allclose(filt(t).numpy(), cli, rtol=0, atol=1e-6 * np.abs(cli).max())
    np.testing.assert_allclose(filt.to_torch()(t).numpy(), cli, rtol=0, atol=1e-6 * np.abs(cli).max())


def test_apply_refuses_the_wrong_dimension_and_integers(llama_fit):
    _, filt = llama_fit
    with pytest.raises(ArtifactError, match="vectors have dimension 31 but the filter expects 32"):
        filt(np.zeros((2, 31), np.float32))
    with pytest.raises(ArtifactError, match="vectors have dimension 31 but the filter expects 32"):
        filt(torch.zeros(31))
    with pytest.raises(InputDataError, match="floating-point"):
        filt(np.zeros((2, 32), np.int64))


def test_center_equals_the_cli_and_to_torch_carries_the_bias(runner, llama_fit, tmp_path):
    cli_path, filt = llama_fit
    texts = _texts_file(tmp_path)
    out = tmp_path / "centred.safetensors"
    result = runner.invoke(app, ["center", str(cli_path), str(texts), "-o", str(out)])
    assert result.exit_code == 0, result.stderr
    centred = filt.center(texts)
    assert centred.centered and not filt.centered
    cli = load_artifact(out)
    np.testing.assert_allclose(centred.artifact.mean, cli.mean, rtol=0, atol=1e-6 * np.abs(cli.mean).max())
    assert centred.centering is not None and centred.centering.as_dict() == cli.centering.as_dict()
    # in-memory texts give the same mean (the record names "<texts>" as the input)
    listed = filt.center(TEXTS)
    np.testing.assert_allclose(listed.artifact.mean, cli.mean, rtol=0, atol=1e-6 * np.abs(cli.mean).max())
    layer = centred.to_torch()
    x = torch.randn(3, 32, generator=torch.Generator().manual_seed(0))
    assert layer.bias is not None
    np.testing.assert_allclose(layer(x).numpy(), centred(x.numpy()), rtol=0, atol=1e-5)


def test_encoder_equals_embed(runner, llama_fit, tiny_llama, tmp_path):
    cli_path, filt = llama_fit
    texts = _texts_file(tmp_path)
    args = ["--pooling", "last", "--recipe", "Query: {text}", "--filter", str(cli_path), "--normalize"]
    result = runner.invoke(app, ["embed", str(texts), "-m", str(tiny_llama), *args, "-o", str(tmp_path / "e.npy")])
    assert result.exit_code == 0, result.stderr
    cli = np.load(tmp_path / "e.npy")
    enc = embfilter_cli.Encoder(str(tiny_llama), pooling="last", recipe="Query: {text}", filter=filt, normalize=True)
    got = enc.encode(TEXTS)
    assert got.dtype == np.float32 and got.shape == (4, 27) and enc.get_sentence_embedding_dimension() == 27
    np.testing.assert_allclose(got, cli, rtol=0, atol=1e-6)
    np.testing.assert_allclose(enc.encode(TEXTS[1]), cli[1], rtol=0, atol=1e-6)
    np.testing.assert_allclose(enc.embed_query(TEXTS[2]), cli[2], rtol=0, atol=1e-6)
    assert "\n" not in repr(enc)


def test_encoder_refuses_like_embed(runner, tiny_llama, tiny_llama_b, llama_fit, tmp_path):
    cli_path, _ = llama_fit
    texts = _texts_file(tmp_path)
    with pytest.raises(ArtifactError) as api:
        embfilter_cli.Encoder(str(tiny_llama_b), filter=cli_path)
    result = runner.invoke(
        app, ["embed", str(texts), "-m", str(tiny_llama_b), "--filter", str(cli_path), "-o", str(tmp_path / "e.npy")]
    )
    assert result.exit_code == 1 and str(api.value) in " ".join(result.stderr.split())
    with pytest.raises(EmbfilterError) as api_err:
        embfilter_cli.Encoder(str(tiny_llama), recipe="no slot here")
    result = runner.invoke(
        app, ["embed", str(texts), "-m", str(tiny_llama), "--recipe", "no slot here", "-o", str(tmp_path / "e.npy")]
    )
    assert result.exit_code != 0 and str(api_err.value) in " ".join(result.stderr.split())
    assert not (tmp_path / "e.npy").exists()


def test_onnx_and_sentence_transformers_exports_equal_the_clis(runner, llama_fit, tiny_llama, tmp_path):
    import onnxruntime as ort

    cli_path, filt = llama_fit
    cli_onnx, api_onnx = tmp_path / "cli.onnx", tmp_path / "api.onnx"
    assert runner.invoke(app, ["export", str(cli_path), "--onnx", "-o", str(cli_onnx)]).exit_code == 0
    result = embfilter_cli.load(cli_path).to_onnx(api_onnx)
    assert result.path == api_onnx and result.check is not None and result.check.max_rel_error < 1e-5
    x = np.random.default_rng(1).standard_normal((4, 32)).astype(np.float32)
    outs = [ort.InferenceSession(str(p)).run(None, {"embeddings": x})[0] for p in (cli_onnx, api_onnx)]
    np.testing.assert_array_equal(outs[0], outs[1])
    np.testing.assert_allclose(outs[1], filt(x), rtol=0, atol=1e-5)

    pytest.importorskip("sentence_transformers")
    from sentence_transformers import SentenceTransformer

    cli_st, api_st = tmp_path / "cli_st", tmp_path / "api_st"
    args = ["--format", "sentence-transformers", "--recipe", "Query: {text}"]
    result = runner.invoke(app, ["export", str(cli_path), *args, "-o", str(cli_st)])
    assert result.exit_code == 0, result.stderr
    loaded = embfilter_cli.load(cli_path)
    loaded.to_sentence_transformers(api_st, recipe="Query: {text}")
    for name in ("modules.json", "config_sentence_transformers.json", "sentence_bert_config.json"):
        assert json.loads((cli_st / name).read_text()) == json.loads((api_st / name).read_text()), name
    enc = embfilter_cli.Encoder(str(tiny_llama), recipe="Query: {text}", filter=loaded)
    ref = enc.encode(TEXTS)
    for folder in (cli_st, api_st):
        got = SentenceTransformer(str(folder), device="cpu").encode_query(TEXTS)
        np.testing.assert_allclose(got, ref, rtol=0, atol=1e-5 * np.abs(ref).max())


def test_the_package_root_is_lazy():
    """`import embfilter_cli` and reading its names load neither torch nor transformers; calling does."""
    code = (
        "import sys, embfilter_cli\n"
        "names = [embfilter_cli.fit, embfilter_cli.load, embfilter_cli.Filter, embfilter_cli.Encoder]\n"
        "heavy = [m for m in ('torch', 'transformers', 'onnx', 'sentence_transformers') if m in sys.modules]\n"
        "print(heavy, sorted(embfilter_cli.__all__))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[] ['Encoder', 'Filter', 'Hooks', '__version__', 'fit', 'load']"
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        _ = embfilter_cli.nope  # type: ignore[attr-defined]
