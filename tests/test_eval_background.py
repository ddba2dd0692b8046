"""`eval --background`: centred variants of every band/filter and the baselines, vs explicit numpy references."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from embfilter_cli.cli import app
from embfilter_cli.errors import InputDataError
from embfilter_cli.filters import postprocess as pp
from embfilter_cli.filters.band import band_from_rank, band_from_ratio
from embfilter_cli.filters.spectral import exact_spectrum
from embfilter_cli.text.baselines import load_background
from embfilter_cli.text.datasets import PairData
from embfilter_cli.text.evaluation import baseline_results, best_band_result, evaluate_all, score_vectors
from tests.conftest import planted_matrix

PAIRS = [
    ("The cat sat on the mat.", "A cat sat on a mat.", 4.8),
    ("A dog ran in the park.", "The dog ran in the park.", 4.5),
    ("Rain is expected over the weekend.", "Stock markets fell sharply on Monday.", 0.2),
    ("The recipe needs two eggs and some flour.", "Two eggs and flour.", 3.9),
    ("Stock markets fell sharply on Monday.", "Markets fell on Monday.", 4.1),
    ("The cat sat on the mat.", "Rain is expected over the weekend.", 0.4),
]
BACKGROUND = [
    "Bushfires forced hundreds of residents to leave their homes.",
    "The central bank left interest rates unchanged this month.",
    "A storm cell moved east across the mountains overnight.",
    "The team won the final after extra time.",
    "Parliament debated the new budget for several hours.",
    "Scientists reported a new species of frog in the rainforest.",
    "Police closed the highway after a serious accident.",
    "The museum reopened with an exhibition of modern art.",
]


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("EMBFILTER_CACHE", str(tmp_path / "cache"))


@pytest.fixture
def tsv(tmp_path) -> Path:
    path = tmp_path / "pairs.tsv"
    path.write_text("".join(f"{a}\t{b}\t{s}\n" for a, b, s in PAIRS))
    return path


@pytest.fixture
def background_file(tmp_path) -> Path:
    path = tmp_path / "background.txt"
    path.write_text("\n".join(f"  {t} " for t in BACKGROUND) + "\n")  # surrounding spaces are stripped
    return path


@pytest.fixture
def planted():
    """A planted W_U (known V) with its exact spectrum, offset 'embeddings' and a background."""
    d = 12
    w, v = planted_matrix(100, d, np.geomspace(50, 1, d), seed=3)
    spectrum = exact_spectrum(torch.from_numpy(w))
    rng = np.random.default_rng(1)
    offset = rng.standard_normal(d) * 3  # a shared component, as in pooled LLM states
    raw = (rng.standard_normal((9, d)) + offset).astype(np.float32)
    background = rng.standard_normal((30, d)) + offset
    rows, cols = np.triu_indices(9, 1)
    data = PairData("toy", [f"t{i}" for i in range(9)], np.stack([rows, cols], 1), rng.uniform(0, 5, len(rows)))
    assert raw.shape == (9, 12) and background.shape == (30, 12)
    return raw, background, spectrum, data, v


def _by_name(results):
    return {r.name: r for r in results}


def test_centred_bands_and_filters_equal_explicit_references(planted, make_filter):
    raw, background, spectrum, data, v = planted
    from embfilter_cli.filters.artifact import load_artifact

    art = load_artifact(make_filter(d=12, top=2, bottom=1))
    results, grid = evaluate_all(
        raw,
        data,
        spectrum=spectrum,
        filters=[art],
        ratios=[2.0],
        tops=[0, 3],
        bottoms=[0, 2],
        background=background,
        baselines={"abtt": [1, 2], "whiten": [4]},
    )
    rows = _by_name(results)
    x = raw.astype(np.float64)

    def band_then_center(band):
        proj = v[:, band.start : band.stop]  # float64 planted directions
        return x @ proj - (background @ proj).mean(axis=0)

    tau = band_from_ratio(12, 2)
    assert rows["paper τ=2 + centering"].spearman == pytest.approx(
        score_vectors(band_then_center(tau), data)[0], abs=1e-9
    )
    assert rows["paper τ=2 + centering"].centered and not rows["paper τ=2"].centered
    for top, bottom in [(0, 0), (3, 2)]:
        want = score_vectors(band_then_center(band_from_rank(12, top, bottom)), data)[0]
        assert rows[f"top {top}, bottom {bottom} + centering"].spearman == pytest.approx(want, abs=1e-9)
    assert grid.centered is not None
    assert grid.centered.spearman[1, 1] == pytest.approx(rows["top 3, bottom 2 + centering"].spearman)
    assert grid.as_dict()["centered"]["spearman"][1][1] == pytest.approx(grid.centered.spearman[1, 1])
    # top 0, bottom 0, centred is plain centering: the same number as the centering baseline.
    assert rows["top 0, bottom 0 + centering"].spearman == pytest.approx(rows["centering"].spearman)
    filtered = art.apply(x) - art.apply(background).mean(axis=0)
    assert rows["f.safetensors + centering"].spearman == pytest.approx(score_vectors(filtered, data)[0], abs=1e-9)
    # Baselines: kind "baseline", each equal to the numpy reference.
    axes = pp.principal_axes(background)
    baselines = [r for r in results if r.kind == "baseline"]
    auto_dim = next(r for r in results if r.kind == "auto").output_dim
    assert [r.name for r in baselines] == [
        "centering",
        "all-but-the-top D=1",
        "all-but-the-top D=2",
        "whitening to 4",
        "PCA to 9",  # the filter's output dimension (12 - 2 - 1)
        *([f"PCA to {auto_dim}"] if auto_dim != 9 else []),  # the auto band's
        *(["PCA to 4"] if auto_dim != 4 else []),  # and the whitening dimension's
    ]
    pca9 = (x - axes.mean) @ axes.axes[:9].T
    assert rows["PCA to 9"].spearman == pytest.approx(score_vectors(pca9, data)[0], abs=1e-9)
    centred = x - background.mean(axis=0)
    assert rows["centering"].spearman == pytest.approx(score_vectors(centred, data)[0], abs=1e-12)
    top2 = axes.axes[:2]
    abtt2 = centred - centred @ top2.T @ top2
    assert rows["all-but-the-top D=2"].spearman == pytest.approx(score_vectors(abtt2, data)[0], abs=1e-9)
    white = centred @ axes.axes[:4].T / np.sqrt(axes.eigenvalues[:4])
    assert rows["whitening to 4"].spearman == pytest.approx(score_vectors(white, data)[0], abs=1e-9)
    assert rows["whitening to 4"].as_dict()["kind"] == "baseline" and rows["whitening to 4"].output_dim == 4
    # The best row is marked over ALL rows, baselines and centred rows included.
    best = [r for r in results if r.best]
    assert len(best) == 1 and best[0].spearman == max(r.spearman for r in results)


def test_save_best_only_considers_bands_an_artifact_can_hold(planted):
    raw, background, spectrum, data, _ = planted
    results, _ = evaluate_all(
        raw,
        data,
        spectrum=spectrum,
        tops=[0, 3],
        bottoms=[0, 2],
        background=background,
        baselines={"abtt": [], "whiten": []},
    )
    chosen = best_band_result(results)
    assert chosen is not None and not chosen.centered and chosen.kind in ("ratio", "auto", "sweep")
    assert chosen.spearman == max(r.spearman for r in results if r.kind in ("auto", "sweep") and not r.centered)


def test_impossible_default_dimensions_are_skipped_with_a_note_and_asked_ones_are_errors(planted):
    raw, background, _, data, _ = planted
    small = background[:5]
    notes: list[str] = []
    rows = baseline_results(
        raw.astype(np.float64),
        small,
        data,
        abtt=[1, 8],
        whiten=[3, 6],
        pca=[4, 9],
        skip_impossible=("abtt", "whiten"),
        note=notes.append,
    )
    assert [r.name for r in rows] == [
        "centering",
        "all-but-the-top D=1",
        "whitening to 3",
        "PCA to 4",
    ]
    assert len(notes) == 3 and all("needs at least" in n for n in notes)
    assert "all-but-the-top D=8 skipped" in notes[0] and "needs at least 9 background texts" in notes[0]
    with pytest.raises(InputDataError, match=r"whitening to 6 dims needs at least 7 background texts .*got 5"):
        baseline_results(raw.astype(np.float64), small, data, abtt=[], whiten=[6])


def test_background_of_another_dimension_is_refused(planted):
    raw, background, spectrum, data, _ = planted
    with pytest.raises(InputDataError, match=r"background embeddings have shape \(30, 11\)"):
        evaluate_all(raw, data, spectrum=spectrum, ratios=[2.0], background=background[:, :11])


def test_lee_has_a_default_background_and_other_data_has_none():
    bg = load_background(None, "lee")
    assert bg is not None and len(bg.texts) == 300 and bg.source.endswith("lee_background.cor")
    assert all(t == t.strip() and t for t in bg.texts)
    assert load_background(None, "pairs.tsv") is None


# --------------------------------------------------------------------------- the CLI


def _eval(runner, tiny_llama, tsv, *extra):
    return runner.invoke(
        app, ["eval", "-v", "-m", str(tiny_llama), "--device", "cpu", "--data", str(tsv), "--ratio", "2", *extra]
    )


def test_cli_background_rows_json_and_cache(runner, tiny_llama, tsv, background_file, monkeypatch):
    args = ("--background", str(background_file), "--abtt", "1,2", "--whiten", "4", "--json")
    first = _eval(runner, tiny_llama, tsv, *args)
    assert first.exit_code == 0, first.stderr
    doc = json.loads(first.stdout)
    assert doc["background"]["texts"] == len(BACKGROUND) and doc["background"]["abtt"] == [1, 2]
    assert doc["background"]["embedding"]["cached"] is False
    kinds = [(r["kind"], r["centered"]) for r in doc["results"]]
    assert kinds[:5] == [("raw", False), ("ratio", False), ("ratio", True), ("auto", False), ("auto", True)]
    assert kinds[5:] == [("baseline", False)] * 5  # PCA to the auto band's dimension needs more texts
    names = [r["name"] for r in doc["results"] if r["kind"] == "baseline"]
    assert names == ["centering", "all-but-the-top D=1", "all-but-the-top D=2", "whitening to 4", "PCA to 4"]
    assert sum(r["best"] for r in doc["results"]) == 1
    auto_dims = next(r["output_dim"] for r in doc["results"] if r["kind"] == "auto")
    assert f"PCA to {auto_dims} skipped" in first.stderr  # 8 texts cannot give the auto band's dims
    # Second run: both the data and the background come from the cache; the model is never loaded.
    import embfilter_cli.text.embedding as embedding

    monkeypatch.setattr(embedding, "load_encoder_at", lambda *a, **k: pytest.fail("model loaded despite the cache"))
    second = _eval(runner, tiny_llama, tsv, *args)
    assert second.exit_code == 0, second.stderr
    doc2 = json.loads(second.stdout)
    assert doc2["background"]["embedding"]["cached"] is True and doc2["results"] == doc["results"]
    assert "Background embeddings: from cache" in second.stderr


def test_cli_table_shows_baselines_and_centred_rows(runner, tiny_llama, tsv, background_file):
    result = _eval(
        runner, tiny_llama, tsv, "--background", str(background_file), "--sweep-top", "0,2", "--sweep-bottom", "0,1"
    )
    assert result.exit_code == 0, result.stderr
    out = result.stdout
    assert "baseline: centering " in out and "baseline: all-but-the-top D=4" in out
    assert "paper τ=2 + centering" in out and "best of sweep: top 2, bottom 1" in out and " + centering" in out
    assert "each band followed by centering on the background" in out
    assert out.count("★") >= 1
    # Default dimensions the 8 background texts cannot support are skipped with a warning, not an error.
    assert "all-but-the-top D=8 skipped" in result.stderr and "whitening to 64 skipped" in result.stderr


@pytest.mark.parametrize(
    ("content", "message"),
    [("", "holds no non-empty text"), ("\n   \n\t\n", "holds no non-empty text")],
)
def test_cli_empty_or_blank_background_is_a_one_line_error(runner, tiny_llama, tsv, tmp_path, content, message):
    path = tmp_path / "bg.txt"
    path.write_text(content)
    result = _eval(runner, tiny_llama, tsv, "--background", str(path))
    assert result.exit_code == 1
    assert result.stdout == ""
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and errors[0].startswith("Error: --background: ") and message in errors[0]
    assert result.stderr.endswith(errors[0] + "\n")  # the error is the last line; nothing after it


def test_cli_too_few_texts_for_asked_whitening_says_how_many(runner, tiny_llama, tsv, background_file, tmp_path):
    result = _eval(runner, tiny_llama, tsv, "--background", str(background_file), "--whiten", "16")
    assert result.exit_code == 1, result.stderr
    assert result.stdout == ""
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith("Error: whitening to 16 dims needs at least 17 background texts") and "got 8" in line


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--abtt", "1"], "--abtt and --whiten are fitted on background texts; add --background TEXTS"),
        (["--no-background", "--whiten", "4"], "--no-background cannot be combined"),
        (["--background", "x.txt", "--whiten", "0,4"], "whitening needs at least 1 dimension"),
        (["--background", "x.txt", "--abtt", "a"], "'a' is not a whole number"),
        (["--background", "emb.npy"], "eval needs background TEXTS"),
    ],
)
def test_cli_background_usage_errors(runner, tiny_llama, tsv, args, message):
    result = _eval(runner, tiny_llama, tsv, *args)
    assert result.exit_code == 2, result.stderr
    assert message in result.stderr and result.stdout == ""


def test_cli_missing_background_file(runner, tiny_llama, tsv, tmp_path):
    result = _eval(runner, tiny_llama, tsv, "--background", str(tmp_path / "nope.txt"))
    assert result.exit_code == 1 and result.stdout == ""
    assert "Error: --background: input file" in result.stderr and "does not exist" in result.stderr
