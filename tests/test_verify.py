"""`embfilter verify`: artifact integrity (digest, orthonormality, complement) and the model fingerprint."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from embfilter_cli.cli import app
from embfilter_cli.filters.artifact import load_artifact, save_artifact
from embfilter_cli.filters.checks import ORTHONORMAL_TOL, integrity_checks
from tests.tiny_models import make_gguf

HEX64 = re.compile(r"\b[0-9a-f]{64}\b")


@pytest.fixture(scope="module")
def llamas(tmp_path_factory, tiny_llama, tiny_llama_b):
    """Two tiny Llama folders that differ only in their seed, and a filter fitted on the first."""
    from click.testing import CliRunner

    root = tmp_path_factory.mktemp("verify_models")
    a, b = tiny_llama, tiny_llama_b
    filt = root / "a.safetensors"
    result = CliRunner().invoke(app, ["fit", "--model", str(a), "--rank", "4", "-o", str(filt), "-q"])
    assert result.exit_code == 0, result.stderr
    return a, b, filt


def _error_line(result) -> str:
    lines = result.stderr.strip().splitlines()
    assert lines and lines[-1].startswith("Error: "), result.stderr
    assert sum(line.startswith("Error:") for line in lines) == 1
    return lines[-1]


def _projection_offset(path: Path) -> int:
    """Absolute byte offset of the projection tensor's data in a safetensors file."""
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + n])
    return 8 + n + header["projection"]["data_offsets"][0]


def test_good_artifact_passes_every_check(runner, make_filter):
    path = make_filter()
    result = runner.invoke(app, ["verify", str(path)])
    assert result.exit_code == 0, result.stderr
    assert result.stderr == ""
    for name in ("format", "digest", "orthonormal", "complement"):
        assert re.search(rf"^{name}\s+OK", result.stdout, re.M), result.stdout
    assert "13 kept + 3 removed = 16" in result.stdout
    assert "FAIL" not in result.stdout


def test_json_report_holds_the_numbers(runner, make_filter):
    path = make_filter()
    result = runner.invoke(app, ["verify", str(path), "--json"])
    assert result.exit_code == 0, result.stderr
    doc = json.loads(result.stdout)
    assert doc["ok"] is True and doc["model"] is None
    checks = {c["name"]: c for c in doc["checks"]}
    assert list(checks) == ["format", "digest", "orthonormal", "complement"]
    art = load_artifact(path)
    assert (
        checks["digest"]["values"]["stored"]
        == checks["digest"]["values"]["actual"]
        == art.metadata["projection_sha256"]
    )
    p = art.projection.astype(np.float64)
    assert checks["orthonormal"]["values"]["max_error"] == pytest.approx(
        np.abs(p @ p.T - np.eye(len(p))).max(), abs=1e-12
    )
    assert checks["orthonormal"]["values"]["max_error"] < ORTHONORMAL_TOL
    assert doc["artifact"]["output_dim"] == 13


def test_projector_artifact_is_checked_as_a_projector(runner, make_filter):
    path = make_filter(reduce=False)
    result = runner.invoke(app, ["verify", str(path), "--json"])
    assert result.exit_code == 0, result.stderr
    checks = {c["name"]: c for c in json.loads(result.stdout)["checks"]}
    assert checks["projector"]["ok"] and checks["complement"]["values"]["kept"] == 13


def test_tampered_projection_bytes_fail_with_both_digests(runner, make_filter):
    path = make_filter()
    stored = load_artifact(path).metadata["projection_sha256"]
    raw = bytearray(path.read_bytes())
    off = _projection_offset(path)
    raw[off : off + 4] = np.float32(0.123).tobytes()
    path.write_bytes(bytes(raw))
    result = runner.invoke(app, ["verify", str(path)])
    assert result.exit_code == 1
    line = _error_line(result)
    assert "the projection does not match its stored SHA-256" in line and "refit it" in line
    hashes = HEX64.findall(line)
    assert hashes[0] == stored and len(hashes) == 2 and hashes[1] != stored
    assert re.search(r"^digest\s+FAIL", result.stdout, re.M)


def test_consistent_digest_but_non_orthonormal_rows_fail(runner, make_filter, tmp_path):
    art = load_artifact(make_filter())
    art.projection = art.projection * np.float32(1.01)  # rescaled rows; save_artifact re-digests them
    save_artifact(art, tmp_path / "scaled.safetensors")
    result = runner.invoke(app, ["verify", str(tmp_path / "scaled.safetensors")])
    assert result.exit_code == 1
    line = _error_line(result)
    # |1.01² − 1| = 0.0201 on the diagonal
    assert "the rows of the projection are not orthonormal (max |P Pᵀ − I| = 2.0e-02 > 1e-05)" in line
    assert re.search(r"^digest\s+OK", result.stdout, re.M) and re.search(r"^orthonormal\s+FAIL", result.stdout, re.M)


def test_removed_directions_that_overlap_the_kept_space_fail(make_filter):
    art = load_artifact(make_filter())
    art.removed_directions = art.removed_directions.copy()
    art.removed_directions[0] = art.projection[0]
    checks = {c.name: c for c in integrity_checks(art)}
    assert checks["orthonormal"].ok and not checks["complement"].ok
    assert checks["complement"].values["max_cross"] == pytest.approx(1.0, abs=1e-6)
    assert "do not split the hidden space" in checks["complement"].error


@pytest.mark.parametrize(
    "damage, needle",
    [
        (lambda p: p.write_bytes(p.read_bytes()[: len(p.read_bytes()) // 2]), "is not a readable safetensors file"),
        (lambda p: p.write_text("just some text, not a filter\n"), "is not a readable safetensors file"),
        (
            lambda p: __import__("safetensors.numpy").numpy.save_file({"w": np.ones((2, 2), np.float32)}, str(p)),
            "is a safetensors file but not an embfilter filter",
        ),
    ],
    ids=["truncated", "not-safetensors", "plain-safetensors"],
)
def test_damaged_files_exit_1_with_one_line(runner, make_filter, damage, needle):
    path = make_filter()
    damage(path)
    result = runner.invoke(app, ["verify", str(path)])
    assert result.exit_code == 1
    assert needle in _error_line(result)
    assert result.stdout == ""


def test_no_filter_argument_uses_the_newest_artifact(runner, make_filter, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, ["-v", "verify"])
    assert result.exit_code == 1
    assert "none found in artifacts/; run `embfilter fit` first" in _error_line(result)
    (tmp_path / "artifacts").mkdir()
    old, new = make_filter(name="old.safetensors"), make_filter(name="new.safetensors", top=3)
    for path, when in ((old, 1_000_000), (new, 2_000_000)):
        shutil.move(path, tmp_path / "artifacts" / path.name)
        os.utime(tmp_path / "artifacts" / path.name, (when, when))
    result = runner.invoke(app, ["-v", "verify"])
    assert result.exit_code == 0, result.stderr
    assert "Filter: artifacts/new.safetensors (the newest in artifacts/)" in result.stderr
    assert "remove top 3" in result.stdout


def test_matching_model_passes(runner, llamas):
    a, _, filt = llamas
    result = runner.invoke(app, ["-v", "verify", str(filt), "--model", str(a), "--json"])
    assert result.exit_code == 0, result.stderr
    doc = json.loads(result.stdout)
    assert doc["ok"] and doc["model"]["match"] is True and doc["model"]["tensor_name"] == "lm_head.weight"
    assert doc["model"]["unembedding_sha256"] == load_artifact(filt).unembedding_sha256
    assert f"Model: {a}" in result.stderr


def test_different_model_is_a_mismatch_naming_both_fingerprints(runner, llamas):
    _, b, filt = llamas
    stored = load_artifact(filt).unembedding_sha256
    result = runner.invoke(app, ["verify", str(filt), "--model", str(b)])
    assert result.exit_code == 1
    line = _error_line(result)
    assert f"was not fitted on {b}" in line and f"refit with `embfilter fit --model {b}`" in line
    hashes = HEX64.findall(line)
    assert len(hashes) == 2 and hashes[0] == stored and hashes[1] != stored
    assert re.search(r"^unembedding\s+FAIL", result.stdout, re.M)


def test_model_without_the_stored_tensor_name_falls_back_and_mismatches(runner, llamas, tmp_path):
    """A GGUF has no `lm_head.weight`: verify fingerprints the tensor fit would pick (token_embd.weight)."""
    _, _, filt = llamas
    gguf, _ = make_gguf(tmp_path / "m.gguf", rows=64, hidden=32)
    result = runner.invoke(app, ["verify", str(filt), "--model", str(gguf), "--json"])
    assert result.exit_code == 1
    doc = json.loads(result.stdout)
    assert doc["model"]["tensor_name"] == "token_embd.weight" and doc["model"]["match"] is False
    assert len(HEX64.findall(_error_line(result))) == 2


def test_gguf_fit_then_verify_round_trip(runner, tmp_path):
    gguf, _ = make_gguf(tmp_path / "m.gguf", rows=64, hidden=32)
    filt = tmp_path / "g.safetensors"
    assert runner.invoke(app, ["fit", "--model", str(gguf), "--rank", "2", "-o", str(filt), "-q"]).exit_code == 0
    result = runner.invoke(app, ["verify", str(filt), "--model", str(gguf)])
    assert result.exit_code == 0, result.stderr
    assert re.search(r"^unembedding\s+OK", result.stdout, re.M)


def test_wrong_tensor_override_is_explained(runner, llamas):
    a, _, filt = llamas
    result = runner.invoke(app, ["verify", str(filt), "--model", str(a), "--tensor", "nope.weight"])
    assert result.exit_code == 1
    assert "--tensor 'nope.weight' is not in" in _error_line(result)
