"""`embfilter eval` and its core: datasets, metrics vs scipy, band scoring vs explicit projections, cache."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from embfilter_cli.cli import app
from embfilter_cli.errors import BandError, InputDataError, MissingDependencyError
from embfilter_cli.filters.band import Band, band_from_rank, band_from_ratio
from embfilter_cli.filters.spectral import exact_spectrum
from embfilter_cli.text.cache import Cache
from embfilter_cli.text.cache import cached_head_spectrum as head_spectrum
from embfilter_cli.text.datasets import PairData, load_dataset, load_lee, load_tsv
from embfilter_cli.text.evaluation import (
    BandScorer,
    evaluate_all,
    pair_cosines,
    parse_float_list,
    parse_int_list,
    pearson,
    rankdata,
    score_vectors,
    spearman,
)
from tests.conftest import planted_matrix

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


@pytest.fixture
def tsv(tmp_path) -> Path:
    path = tmp_path / "pairs.tsv"
    path.write_text("text1\ttext2\tscore\n" + "".join(f"{a}\t{b}\t{s}\n" for a, b, s in PAIRS) + "\n\n")
    return path


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("EMBFILTER_CACHE", str(tmp_path / "cache"))


# --------------------------------------------------------------------------- metrics


def test_metrics_match_scipy_with_ties():
    from scipy import stats

    rng = np.random.default_rng(0)
    x = rng.integers(0, 6, 200).astype(float)  # many ties
    y = x + rng.standard_normal(200)
    np.testing.assert_allclose(rankdata(x), stats.rankdata(x))
    assert spearman(x, y) == pytest.approx(stats.spearmanr(x, y).statistic, abs=1e-12)
    assert pearson(x, y) == pytest.approx(stats.pearsonr(x, y).statistic, abs=1e-12)
    assert np.isnan(pearson(np.ones(5), np.arange(5.0)))


def test_pair_cosines_by_hand():
    vectors = np.array([[1.0, 0.0], [1.0, 1.0], [0.0, 0.0], [-2.0, 0.0]])
    got = pair_cosines(vectors, np.array([[0, 1], [0, 3], [1, 2]]))
    np.testing.assert_allclose(got, [1 / np.sqrt(2), -1.0, 0.0])


# --------------------------------------------------------------------------- datasets


def test_lee_has_50_documents_and_1225_pairs():
    data = load_lee()
    assert len(data.texts) == 50 and data.pairs.shape == (1225, 2) and data.name == "lee"
    assert data.texts[0].startswith("The national executive of the strife-torn Democrats")
    assert np.all(data.pairs[:, 0] < data.pairs[:, 1]) and data.scores.min() > 0 and data.scores.max() <= 1
    assert data.sha256 == load_dataset("lee").sha256


def test_lee_without_gensim_names_the_pip_command(monkeypatch):
    import importlib.metadata
    import importlib.util

    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", missing)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(MissingDependencyError, match=r"pip install gensim"):
        load_lee()


def test_tsv_header_dedup_and_blank_lines(tsv):
    data = load_tsv(tsv)
    assert data.pairs.shape == (8, 2) and len(data.texts) == 11  # repeated texts are embedded once
    assert data.texts[data.pairs[6, 0]] == "The cat sat on the mat." and data.pairs[6, 0] == data.pairs[0, 0]
    np.testing.assert_allclose(data.scores, [p[2] for p in PAIRS])


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ("a\tb\t1\nc\td\n", r"line 2 has 2 tab-separated field\(s\)"),
        ("a\tb\t1\nc\td\thigh\n", r"line 2: score 'high' is not a number"),
        ("a\tb\t1\nc\td\tnan\n", r"line 2: score 'nan' is not finite"),
        ("a\tb\t1\n\t d\t2\n", r"line 2 has an empty text"),
        ("a\tb\t1\nc\td\t2\n", r"2 scored pair\(s\); a correlation needs at least 3"),
        ("a\tb\t1\nc\td\t1\ne\tf\t1\n", r"every score is 1.0"),
    ],
)
def test_bad_tsv_rows_name_the_line(tmp_path, body, message):
    path = tmp_path / "bad.tsv"
    path.write_text(body)
    with pytest.raises(InputDataError, match=message):
        load_tsv(path)


def test_unknown_data_spec():
    with pytest.raises(InputDataError, match="neither 'lee' nor an existing TSV"):
        load_dataset("sts-b")


def test_list_parsing():
    assert parse_int_list("0, 4,16,4", "--sweep-top") == [0, 4, 16]
    assert parse_float_list("1,2,8", "--ratio") == [1.0, 2.0, 8.0]
    with pytest.raises(BandError, match=r"--sweep-top '0,x': 'x' is not a whole number"):
        parse_int_list("0,x", "--sweep-top")
    with pytest.raises(BandError, match=r"-3 is negative"):
        parse_int_list("-3", "--sweep-bottom")
    with pytest.raises(BandError, match=r"0.5 must be a number >= 1"):
        parse_float_list("2,0.5", "--ratio")


# --------------------------------------------------------------------------- band scoring


@pytest.fixture
def planted():
    """A planted W_U (known V), its exact spectrum, random 'embeddings' and scores."""
    d = 12
    w, v = planted_matrix(100, d, np.geomspace(50, 1, d), seed=3)
    spectrum = exact_spectrum(torch.from_numpy(w))
    rng = np.random.default_rng(1)
    raw = rng.standard_normal((9, d)).astype(np.float32)
    rows, cols = np.triu_indices(9, 1)
    data = PairData("toy", [f"t{i}" for i in range(9)], np.stack([rows, cols], 1), rng.uniform(0, 5, len(rows)))
    return raw, spectrum, data, v


def test_band_scores_equal_explicit_projection_with_the_planted_basis(planted):
    raw, spectrum, data, v = planted
    scorer = BandScorer(raw, spectrum, data)
    for band in [Band(12, 0, 12), band_from_rank(12, 3, 2), band_from_ratio(12, 2), Band(12, 5, 1)]:
        reference = raw.astype(np.float64) @ v[:, band.start : band.stop]  # the float64 planted directions
        assert scorer.score(band) == pytest.approx(score_vectors(reference, data), abs=1e-9), band


def test_evaluate_all_grid_filters_and_best(planted, make_filter):
    raw, spectrum, data, _ = planted
    from embfilter_cli.filters.artifact import load_artifact

    art = load_artifact(make_filter(d=12, top=2, bottom=1))
    results, grid = evaluate_all(
        raw, data, spectrum=spectrum, filters=[art], ratios=[2.0], tops=[0, 4, 10], bottoms=[0, 2]
    )
    kinds = [r.kind for r in results]
    assert kinds[:4] == ["raw", "filter", "ratio", "auto"] and kinds.count("sweep") == 5
    assert np.isnan(grid.spearman[2, 1]) and grid.as_dict()["spearman"][2][1] is None  # 10 + 2 removes everything
    assert results[0].spearman == pytest.approx(score_vectors(raw, data)[0])
    assert results[1].spearman == pytest.approx(score_vectors(art.apply(raw.astype(np.float64)), data)[0])
    assert grid.spearman[0, 0] == pytest.approx(results[0].spearman)  # top 0, bottom 0 is the identity
    best = [r for r in results if r.best]
    assert len(best) == 1 and best[0].spearman == max(r.spearman for r in results)


def test_cache_round_trip_disable_and_corruption(tmp_path, planted):
    _, spectrum, _, _ = planted
    cache = Cache(tmp_path / "c")
    array = np.arange(6, dtype=np.float32).reshape(2, 3)
    cache.save_embeddings("k", array)
    np.testing.assert_array_equal(cache.load_embeddings("k"), array)
    facts = {"sha256": "x", "tensor_name": "lm_head.weight", "vocab_size": 100, "stored_rows": 100, "hidden_size": 12}
    cache.save_spectrum("s", spectrum, facts)
    loaded, head = cache.load_spectrum("s")
    np.testing.assert_array_equal(loaded.vectors, spectrum.vectors)
    np.testing.assert_array_equal(loaded.singular_values, spectrum.singular_values)
    assert head == facts and loaded.certificate == spectrum.certificate
    warned = []
    cache.warn = warned.append
    (tmp_path / "c" / "embeddings" / "k.safetensors").write_bytes(b"garbage")
    assert cache.load_embeddings("k") is None and len(warned) == 1 and "damaged" in warned[0]
    off = Cache(tmp_path / "off", enabled=False)
    off.save_embeddings("k", array)
    assert off.load_embeddings("k") is None and not (tmp_path / "off").exists()


def test_head_spectrum_is_cached(tiny_llama, tmp_path):
    from embfilter_cli.model.locate import resolve_model

    cache = Cache(tmp_path / "c")
    loc = resolve_model(str(tiny_llama))
    facts, spectrum, hit = head_spectrum(loc, cache, device="cpu")
    assert not hit and facts.hidden_size == 32 and facts.tensor_name == "lm_head.weight"
    facts2, spectrum2, hit2 = head_spectrum(loc, cache, device="cpu")
    assert hit2 and facts2 == facts
    np.testing.assert_array_equal(spectrum2.singular_values, spectrum.singular_values)


# --------------------------------------------------------------------------- the CLI


def _eval(runner, tiny_llama, tsv, *extra):
    return runner.invoke(app, ["eval", "-v", "-m", str(tiny_llama), "--device", "cpu", "--data", str(tsv), *extra])


def test_cli_json_schema_and_second_run_uses_the_cache(runner, tiny_llama, tsv, monkeypatch):
    first = _eval(runner, tiny_llama, tsv, "--sweep-top", "0,2,4", "--sweep-bottom", "0,3", "--ratio", "1,2", "--json")
    assert first.exit_code == 0, first.stderr
    doc = json.loads(first.stdout)
    assert doc["schema"] == "embfilter.eval/1" and doc["data"]["pairs"] == 8 and doc["data"]["texts"] == 11
    assert doc["embedding"]["cached"] is False and doc["settings"]["dtype"] == "float32"
    assert [r["kind"] for r in doc["results"]] == ["raw", "ratio", "ratio", "auto"]
    assert doc["results"][1]["spearman"] == pytest.approx(doc["results"][0]["spearman"])  # τ = 1 is the identity
    assert doc["grid"]["top"] == [0, 2, 4] and len(doc["grid"]["spearman"][0]) == 2
    assert doc["best"]["best"] is True
    # Second run: the model must not be loaded at all.
    import embfilter_cli.text.embedding as embedding

    monkeypatch.setattr(embedding, "load_encoder_at", lambda *a, **k: pytest.fail("model loaded despite the cache"))
    second = _eval(runner, tiny_llama, tsv, "--sweep-top", "0,2,4", "--sweep-bottom", "0,3", "--ratio", "1,2", "--json")
    assert second.exit_code == 0, second.stderr
    doc2 = json.loads(second.stdout)
    assert doc2["embedding"]["cached"] is True and "from cache" in second.stderr
    assert doc2["grid"] == doc["grid"] and doc2["results"] == doc["results"]


def test_cli_no_cache_recomputes(runner, tiny_llama, tsv, tmp_path):
    result = _eval(runner, tiny_llama, tsv, "--ratio", "2", "--no-cache", "--json")
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["embedding"]["cached"] is False
    assert not (tmp_path / "cache").exists()


def test_cli_table_on_stdout_and_filters(runner, tiny_llama, tsv, tmp_path):
    filt = tmp_path / "f.safetensors"
    assert runner.invoke(app, ["-v", "fit", "-m", str(tiny_llama), "--rank", "2", "-o", str(filt)]).exit_code == 0
    result = _eval(runner, tiny_llama, tsv, "--filter", str(filt), "--sweep-top", "0,2", "--sweep-bottom", "0")
    assert result.exit_code == 0, result.stderr
    assert "f.safetensors" in result.stdout and "Spearman by band" in result.stdout and "★" in result.stdout
    assert "Data: pairs.tsv" in result.stderr and "Data:" not in result.stdout
    # The filter fitted with --rank 2 and the sweep cell (top 2, bottom 0) are the same map.
    doc = json.loads(
        _eval(
            runner, tiny_llama, tsv, "--filter", str(filt), "--sweep-top", "0,2", "--sweep-bottom", "0", "--json"
        ).stdout
    )
    assert doc["results"][1]["spearman"] == pytest.approx(doc["grid"]["spearman"][1][0], abs=1e-9)


def test_cli_save_best_equals_fit_for_that_band(runner, tiny_llama, tsv, tmp_path):
    from embfilter_cli.filters.artifact import load_artifact

    best = tmp_path / "best.safetensors"
    result = _eval(
        runner,
        tiny_llama,
        tsv,
        "--sweep-top",
        "0,1,3",
        "--sweep-bottom",
        "0,2",
        "--no-auto",
        "--save-best",
        str(best),
        "--json",
    )
    assert result.exit_code == 0, result.stderr
    doc = json.loads(result.stdout)
    band = doc["saved_best"]["band"]
    sweep = np.array(doc["grid"]["spearman"], dtype=float)
    assert doc["saved_best"]["spearman"] == pytest.approx(np.nanmax(sweep))
    ref = tmp_path / "ref.safetensors"
    fitted = runner.invoke(
        app,
        [
            "fit",
            "-m",
            str(tiny_llama),
            "--rank",
            str(band["top"]),
            "--bottom",
            str(band["bottom"]),
            "-o",
            str(ref),
            "-q",
        ],
    )
    assert fitted.exit_code == 0
    saved, reference = load_artifact(best), load_artifact(ref)
    np.testing.assert_allclose(saved.projection, reference.projection, atol=1e-6)
    assert saved.unembedding_sha256 == reference.unembedding_sha256
    assert json.loads(saved.metadata["selected_by_eval"])["data"] == "pairs.tsv"


def test_cli_plot_writes_a_png(runner, tiny_llama, tsv, tmp_path):
    png = tmp_path / "heat.png"
    result = _eval(runner, tiny_llama, tsv, "--sweep-top", "0,2", "--sweep-bottom", "0,2", "--plot", str(png), "-q")
    assert result.exit_code == 0, result.stderr
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_plot_without_matplotlib_names_the_extra(runner, tiny_llama, tsv, tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "matplotlib", None)
    result = _eval(runner, tiny_llama, tsv, "--sweep-top", "0,2", "--plot", str(tmp_path / "h.png"))
    assert result.exit_code == 1 and "pip install 'embfilter[plot]'" in result.stderr
    assert result.stdout == "" and not (tmp_path / "h.png").exists()


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (["--plot", "h.png", "--filter", "x"], 2, "--plot draws the sweep heatmap"),
        (["--save-best", "b.safetensors", "--filter", "x"], 2, "--save-best saves the best band"),
        (["--sweep-top", "0,a"], 2, "'a' is not a whole number"),
        (["--ratio", "0.5"], 2, "must be a number >= 1"),
        (["--recipe", "nope"], 1, "neither a known recipe"),
    ],
)
def test_cli_bad_options_fail_before_work(runner, tiny_llama, tsv, tmp_path, monkeypatch, args, code, message):
    monkeypatch.chdir(tmp_path)
    result = _eval(runner, tiny_llama, tsv, *args)
    assert result.exit_code == code, result.stderr
    assert message in result.stderr and result.stdout == ""
    assert not (tmp_path / "h.png").exists() and not (tmp_path / "b.safetensors").exists()


def test_cli_refuses_filter_from_another_model(runner, tiny_llama, tsv, make_filter):
    result = _eval(runner, tiny_llama, tsv, "--filter", str(make_filter(d=32)))
    assert result.exit_code == 1 and result.stdout == ""
    assert "was fitted on test/planted (W_U sha256 0000000000000000…)" in result.stderr


def test_cli_existing_outputs_are_refused(runner, tiny_llama, tsv, tmp_path):
    best = tmp_path / "best.safetensors"
    best.write_bytes(b"keep")
    result = _eval(runner, tiny_llama, tsv, "--ratio", "2", "--save-best", str(best))
    assert result.exit_code == 1 and "already exists; pass --force" in result.stderr
    assert best.read_bytes() == b"keep"


def test_cli_bad_tsv_names_the_line(runner, tiny_llama, tmp_path):
    bad = tmp_path / "bad.tsv"
    bad.write_text("a\tb\t1\nc\td\tx\n")
    result = _eval(runner, tiny_llama, bad)
    assert result.exit_code == 1 and "line 2: score 'x' is not a number" in result.stderr
