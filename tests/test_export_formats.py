"""`embfilter export --format sentence-transformers|npy|safetensors`.

Each written file is read back independently (numpy, safetensors, sentence-transformers' own loader)
and compared with the artifact's projection and with `FilterArtifact.apply` (what `embfilter apply`
computes); bad inputs check their one-line message and that nothing was left behind.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from safetensors import safe_open

from embfilter_cli.cli import app
from embfilter_cli.export import formats
from embfilter_cli.filters.artifact import load_artifact

D, K = 16, 13


def vectors(n: int = 5, d: int = D, seed: int = 11) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)


def reference(art_path: Path, x: np.ndarray) -> np.ndarray:
    return x.astype(np.float64) @ load_artifact(art_path).projection.astype(np.float64).T


def listing(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


# ---------------------------------------------------------------------------------------------
# npy


@pytest.mark.parametrize("fp16", [False, True])
def test_npy_is_the_projection_matrix(runner, art, tmp_path, fp16):
    out = tmp_path / "P.npy"
    result = runner.invoke(
        app, ["export", str(art), "--format", "npy", "-o", str(out), "--json"] + (["--fp16"] if fp16 else [])
    )
    assert result.exit_code == 0, result.stderr
    doc = json.loads(result.stdout)
    assert (doc["kind"], doc["input_dim"], doc["output_dim"]) == ("npy", D, K)
    p = np.load(out)
    expected = load_artifact(art).projection
    assert p.shape == (K, D)
    if fp16:
        assert p.dtype == np.float16 and np.array_equal(p, expected.astype(np.float16))
        assert 0 < doc["max_rel_error"] <= 2e-3
    else:
        assert p.dtype == np.float32 and np.array_equal(p, expected)
        assert doc["max_rel_error"] == 0.0
    x = vectors()
    err = np.abs(x.astype(np.float64) @ p.astype(np.float64).T - reference(art, x)).max()
    assert err <= (1e-2 if fp16 else 1e-12)


def test_npy_default_path_is_beside_the_filter(runner, art):
    result = runner.invoke(app, ["-v", "export", str(art), "--format", "npy"])
    assert result.exit_code == 0, result.stderr
    assert f"Writing {art.with_suffix('.npy')}" in result.stderr and result.stdout == ""
    assert art.with_suffix(".npy").exists()


# ---------------------------------------------------------------------------------------------
# safetensors


def test_safetensors_float32_is_still_an_artifact(runner, art, tmp_path):
    out = tmp_path / "copy.safetensors"
    result = runner.invoke(app, ["export", str(art), "--format", "safetensors", "-o", str(out), "--json"])
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["artifact"] is True
    a, b = load_artifact(art), load_artifact(out)
    assert np.array_equal(a.projection, b.projection) and a.metadata == b.metadata
    assert np.array_equal(a.removed_directions, b.removed_directions)


def test_safetensors_fp16_is_a_deployment_file_not_an_artifact(runner, art, tmp_path):
    out = tmp_path / "f16.safetensors"
    result = runner.invoke(app, ["export", str(art), "--format", "safetensors", "--fp16", "-o", str(out), "--json"])
    assert result.exit_code == 0, result.stderr
    doc = json.loads(result.stdout)
    assert doc["dtype"] == "float16" and doc["artifact"] is False and doc["max_rel_error"] <= 2e-3
    a = load_artifact(art)
    with safe_open(str(out), framework="numpy") as handle:
        assert list(handle.keys()) == ["projection"]
        p = handle.get_tensor("projection")
        meta = handle.metadata()
    assert p.dtype == np.float16 and np.array_equal(p, a.projection.astype(np.float16))
    assert meta["format"] == "embfilter.projection" and meta["projection_dtype"] == "float16"
    # provenance kept: the float32 filter's fingerprint, band, model
    for key in ("projection_sha256", "unembedding_sha256", "band", "model_source", "format_version"):
        assert meta[key] == a.metadata[key]
    with pytest.raises(Exception, match="not an embfilter filter"):
        load_artifact(out)


# ---------------------------------------------------------------------------------------------
# sentence-transformers Dense folder


def test_sentence_transformers_folder_layout(runner, art, tmp_path):
    out = tmp_path / "model" / "2_Dense"
    result = runner.invoke(
        app, ["-v", "export", str(art), "--format", "sentence-transformers", "--dense-only", "-o", str(out)]
    )
    assert result.exit_code == 0, result.stderr
    assert result.stdout == ""
    assert "modules.json" in result.stderr  # how to wire it in
    assert listing(out) == ["config.json", "model.safetensors"]
    assert listing(out.parent) == ["2_Dense"]  # no temp folder left beside it
    config = json.loads((out / "config.json").read_text())
    # bias off and the identity written out: the library's default activation is Tanh
    assert config == {
        "in_features": D,
        "out_features": K,
        "bias": False,
        "activation_function": "torch.nn.modules.linear.Identity",
    }
    with safe_open(str(out / "model.safetensors"), framework="numpy") as handle:
        assert list(handle.keys()) == ["linear.weight"]
        w = handle.get_tensor("linear.weight")
        assert handle.metadata()["embfilter.projection_sha256"] == load_artifact(art).metadata["projection_sha256"]
    assert w.dtype == np.float32 and np.array_equal(w, load_artifact(art).projection)


def test_sentence_transformers_loader_gives_the_same_vectors_as_apply(runner, art, tmp_path):
    pytest.importorskip("sentence_transformers")
    import torch

    out = tmp_path / "st" / "1_Dense"
    result = runner.invoke(
        app, ["export", str(art), "--format", "sentence-transformers", "--dense-only", "-o", str(out), "--json"]
    )
    assert result.exit_code == 0, result.stderr
    doc = json.loads(result.stdout)
    assert doc["loader"].startswith("sentence-transformers ") and doc["max_rel_error"] <= 1e-5

    dense = formats._load_dense(out)
    assert isinstance(dense.activation_function, torch.nn.Identity) and dense.linear.bias is None
    x = vectors()
    with torch.no_grad():
        got = dense({"sentence_embedding": torch.from_numpy(x)})["sentence_embedding"].numpy()
    applied = load_artifact(art).apply(x)
    assert np.abs(got - applied).max() <= 1e-6 * np.abs(applied).max()
    assert np.abs(got - reference(art, x)).max() <= 1e-5 * np.abs(reference(art, x)).max()

    # ...and as a module of a SentenceTransformer model folder, through modules.json
    from sentence_transformers import SentenceTransformer

    (out.parent / "modules.json").write_text(
        json.dumps([{"idx": 0, "name": "0", "path": "1_Dense", "type": "sentence_transformers.models.Dense"}])
    )
    model = SentenceTransformer(str(out.parent), device="cpu")
    with torch.no_grad():
        via_model = model.forward({"sentence_embedding": torch.from_numpy(x)})["sentence_embedding"].numpy()
    assert np.array_equal(via_model, got)


def test_sentence_transformers_check_without_the_library(runner, art, tmp_path, monkeypatch):
    monkeypatch.setattr(formats, "_load_dense", lambda folder: None)
    out = tmp_path / "d"
    result = runner.invoke(
        app, ["export", str(art), "--format", "sentence-transformers", "--dense-only", "-o", str(out), "--json"]
    )
    assert result.exit_code == 0, result.stderr
    doc = json.loads(result.stdout)
    assert doc["loader"] == "not installed" and doc["check"]["compared"].startswith("files re-read")


def test_sentence_transformers_existing_folder(runner, art, tmp_path):
    out = tmp_path / "d"
    out.mkdir()
    (out / "README.md").write_text("mine")
    (out / "config.json").write_text("{}")
    dense = ["export", str(art), "--format", "sentence-transformers", "--dense-only", "-o", str(out)]
    result = runner.invoke(app, dense)
    assert result.exit_code == 1 and result.stdout == ""
    assert result.stderr == (
        f"Error: {out} already exists and is not empty; pass --force to replace an earlier export there, or choose "
        "another -o folder\n"
    )
    assert (out / "config.json").read_text() == "{}" and listing(tmp_path) == ["d", "f.safetensors"]
    # --force replaces only what an earlier export made: this folder is someone else's
    result = runner.invoke(app, [*dense, "--force"])
    assert result.exit_code == 1 and "is not an earlier export of a sentence-transformers Dense module" in result.stderr
    assert (out / "config.json").read_text() == "{}" and listing(out) == ["README.md", "config.json"]
    # an earlier export of ours is replaced in place: our two files, the rest left alone
    (out / "config.json").unlink()
    assert runner.invoke(app, dense).exit_code == 1  # still not empty (README.md)
    (out / "README.md").rename(tmp_path / "README.md")
    assert runner.invoke(app, dense).exit_code == 0
    (tmp_path / "README.md").rename(out / "README.md")
    result = runner.invoke(app, [*dense, "--force"])
    assert result.exit_code == 0, result.stderr
    assert listing(out) == ["README.md", "config.json", "model.safetensors"]  # other files left alone
    assert json.loads((out / "config.json").read_text())["out_features"] == K
    assert listing(tmp_path) == ["d", "f.safetensors"]
    # an empty folder is fine without --force; a file is not a folder
    empty = tmp_path / "empty"
    empty.mkdir()
    assert (
        runner.invoke(
            app, ["export", str(art), "--format", "sentence-transformers", "--dense-only", "-o", str(empty)]
        ).exit_code
        == 0
    )
    assert listing(empty) == ["config.json", "model.safetensors"]
    result = runner.invoke(
        app, ["export", str(art), "--format", "sentence-transformers", "--dense-only", "-o", str(art)]
    )
    assert result.exit_code == 1 and "is a file; a sentence-transformers Dense module is a folder" in result.stderr


# ---------------------------------------------------------------------------------------------
# Failures leave nothing


@pytest.mark.parametrize(
    "fmt, name", [("npy", "P.npy"), ("safetensors", "c.safetensors"), ("sentence-transformers", "dense")]
)
def test_failed_check_leaves_nothing(runner, art, tmp_path, monkeypatch, fmt, name):
    # a reference the written matrix cannot match: every writer's check must fail and clean up
    monkeypatch.setattr(formats, "_reference", lambda a, x: x.astype(np.float64)[:, :K] + 1.0)
    outdir = tmp_path / "o"
    outdir.mkdir()
    dense = ["--dense-only"] if fmt == "sentence-transformers" else []
    result = runner.invoke(app, ["export", str(art), "--format", fmt, *dense, "-o", str(outdir / name)])
    assert result.exit_code == 1, result.stderr
    assert result.stdout == ""
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("Error: ") and "nothing was" in last
    assert listing(outdir) == []


def test_existing_file_needs_force(runner, art, tmp_path):
    out = tmp_path / "P.npy"
    out.write_bytes(b"keep")
    result = runner.invoke(app, ["export", str(art), "--format", "npy", "-o", str(out)])
    assert (
        result.exit_code == 1
        and result.stderr == f"Error: {out} already exists; pass --force to overwrite it or choose another -o path\n"
    )
    assert out.read_bytes() == b"keep"
    assert runner.invoke(app, ["export", str(art), "--format", "npy", "-o", str(out), "--force"]).exit_code == 0
    assert np.load(out).shape == (K, D)


@pytest.mark.parametrize(
    "args, message",
    [
        (
            ["--format", "sentence-transformers", "--dense-only", "--normalize"],
            "add a sentence-transformers Normalize module after the Dense one",
        ),
        (
            ["--format", "sentence-transformers", "--dense-only", "--fp16"],
            "--fp16 is not available for sentence-transformers",
        ),
        (["--format", "safetensors", "--per-token"], "--per-token applies to --onnx only"),
        (["--format", "npy", "--opset", "13"], "--opset applies to --onnx only"),
    ],
)
def test_format_flag_errors(runner, art, tmp_path, args, message):
    result = runner.invoke(app, ["export", str(art), *args, "-o", str(tmp_path / "x")])
    assert result.exit_code == 2 and message in result.stderr and result.stdout == ""
    assert not (tmp_path / "x").exists()


def test_outputs_get_normal_permissions(runner, art, tmp_path):
    # safetensors' writer and mkdtemp make owner-only files; a served model must be readable by others
    import os
    import stat

    umask = os.umask(0o022)
    try:
        for args, path in [
            (["--format", "safetensors", "--fp16"], tmp_path / "h.safetensors"),
            (["--format", "safetensors"], tmp_path / "c.safetensors"),
            (["--format", "sentence-transformers", "--dense-only"], tmp_path / "dense"),
        ]:
            assert runner.invoke(app, ["export", str(art), *args, "-o", str(path), "--no-check"]).exit_code == 0
            mode = stat.S_IMODE(path.stat().st_mode)
            assert mode == (0o755 if path.is_dir() else 0o644), (path, oct(mode))
        assert stat.S_IMODE((tmp_path / "dense" / "model.safetensors").stat().st_mode) == 0o644
    finally:
        os.umask(umask)
