"""`MtebEncoder`: mteb 2.x runs a local STS task with it, and its score equals `embfilter eval`'s.

Spearman is a step function of the cosines: two pairs whose cosines (nearly) tie swap ranks when
another batch size or BLAS moves the last bits. So `PAIRS` holds no pair twice (a reversed pair is
an exact tie) and the score test first checks that no two cosines lie within `MIN_COSINE_GAP`, far
above float32 noise (~1e-6), so the scores compared below cannot flip on another machine.
"""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from embfilter_cli.cli import app

PAIRS = [
    ("The cat sat on the mat.", "A dog ran in the park.", 1.5),
    ("The cat sat on the mat.", "the quick brown fox jumps over the lazy dog", 1.0),
    ("Stock markets fell sharply on Monday.", "Rain is expected over the weekend.", 0.5),
    ("The recipe needs two eggs and some flour.", "the recipe needs flour", 4.5),
    ("A dog ran in the park.", "the lazy dog sat in the park", 3.5),
    ("Rain is expected over the weekend.", "rain on Monday", 3.0),
    ("Stock markets fell sharply on Monday.", "markets fell", 4.0),
    ("the quick brown fox", "Rain is expected over the weekend.", 0.3),
    ("two eggs", "The recipe needs two eggs and some flour.", 3.2),
    ("The cat sat on the mat.", "the cat on the mat", 4.8),
    ("A dog ran in the park.", "Stock markets fell sharply on Monday.", 0.2),
    ("the lazy dog", "the quick brown fox", 2.0),
]


MIN_COSINE_GAP = 1e-4


def _assert_no_near_ties(model: Any) -> None:
    """Every pair's cosine is at least `MIN_COSINE_GAP` from every other's (else ranks could flip)."""
    left = model.embed([a for a, _, _ in PAIRS])
    right = model.embed([b for _, b, _ in PAIRS])
    cosines = np.sort(model.similarity_pairwise(left, right).numpy())
    gap = float(np.diff(cosines).min())
    assert gap > MIN_COSINE_GAP, f"test data has cosines {gap:.1e} apart; choose pairs without near-ties"


@pytest.fixture(scope="module")
def tsv(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("sts") / "pairs.tsv"
    path.write_text("".join(f"{a}\t{b}\t{s}\n" for a, b, s in PAIRS), encoding="utf-8")
    return path


def local_sts_task(path: Path) -> Any:
    """A custom mteb STS task whose test split is a local `text1<TAB>text2<TAB>score` file."""
    from datasets import Dataset, DatasetDict
    from mteb.abstasks.sts import AbsTaskSTS
    from mteb.abstasks.task_metadata import TaskMetadata

    class LocalSTS(AbsTaskSTS):
        metadata = TaskMetadata(
            name="EmbfilterLocalSTS",
            description="Pairs from a local TSV file (embfilter's test).",
            reference="https://example.org/embfilter",
            dataset={"path": "local", "revision": "local"},
            type="STS",
            category="t2t",
            modalities=["text"],
            eval_splits=["test"],
            eval_langs=["eng-Latn"],
            main_score="cosine_spearman",
            date=("2026-01-01", "2026-01-01"),
            domains=[],
            task_subtypes=[],
            license="cc-by-4.0",
            annotations_creators="derived",
            dialect=["Written"],
            sample_creation="found",
            bibtex_citation="",
        )
        min_score = 0
        max_score = 5

        def load_data(self, num_proc: int | None = None, **kwargs: Any) -> None:
            with path.open(encoding="utf-8") as handle:
                rows = list(csv.reader(handle, delimiter="\t"))
            self.dataset = DatasetDict(
                {
                    "test": Dataset.from_dict(
                        {
                            "sentence1": [r[0] for r in rows],
                            "sentence2": [r[1] for r in rows],
                            "score": [float(r[2]) for r in rows],
                        }
                    )
                }
            )
            self.data_loaded = True

    return LocalSTS()


def _eval_spearman(runner, model: Path, tsv: Path, *args: str) -> dict[str, float]:
    result = runner.invoke(app, ["eval", "--model", str(model), "--data", str(tsv), "--json", "--no-cache", *args])
    assert result.exit_code == 0, result.stderr
    return {r["name"]: r["spearman"] for r in json.loads(result.stdout)["results"]}


@pytest.mark.parametrize("pooling", ["mean", "last"])
def test_mteb_scores_equal_embfilter_eval(runner, tiny_llama, tsv, tmp_path, pooling):
    mteb = pytest.importorskip("mteb")
    from embfilter_cli.text.mteb_encoder import MtebEncoder

    filt = tmp_path / "f.safetensors"
    fit = runner.invoke(app, ["fit", "--model", str(tiny_llama), "--rank", "3", "--bottom", "2", "-o", str(filt)])
    assert fit.exit_code == 0, fit.stderr
    expected = _eval_spearman(runner, tiny_llama, tsv, "--pooling", pooling, "--filter", str(filt))
    task = local_sts_task(tsv)
    scores = {}
    for label, filter_ in (("raw", None), ("filtered", filt)):
        model = MtebEncoder(str(tiny_llama), device="cpu", filter=filter_, pooling=pooling, batch_size=4)
        assert isinstance(model, mteb.models.models_protocols.EncoderProtocol)
        _assert_no_near_ties(model)
        result = mteb.evaluate(model, task, cache=None, show_progress_bar=False)
        scores[label] = result.task_results[0].scores["test"][0]["cosine_spearman"]
    filter_name = next(name for name in expected if name != "raw")
    assert scores["raw"] == pytest.approx(expected["raw"], abs=1e-6)
    assert scores["filtered"] == pytest.approx(expected[filter_name], abs=1e-6)
    assert scores["raw"] != pytest.approx(scores["filtered"], abs=1e-6)  # the filter is seen


def test_encode_equals_embed_and_empty_texts_are_zero(runner, tiny_llama, tmp_path):
    pytest.importorskip("mteb")
    from embfilter_cli.text.mteb_encoder import MtebEncoder

    texts = ["The cat sat on the mat.", "", "Rain is expected over the weekend."]
    model = MtebEncoder(str(tiny_llama), device="cpu", pooling="last", recipe="Query: {text}")
    got = model.encode([{"text": texts[:2]}, {"text": texts[2:]}], task_metadata=None, hf_split="test", hf_subset="")
    src = tmp_path / "t.txt"
    src.write_text(texts[0] + "\n" + texts[2] + "\n")
    result = runner.invoke(
        app,
        [
            "embed",
            str(src),
            "--model",
            str(tiny_llama),
            "--pooling",
            "last",
            "--recipe",
            "Query: {text}",
            "-o",
            str(tmp_path / "e.npy"),
        ],
    )
    assert result.exit_code == 0, result.stderr
    np.testing.assert_allclose(got[[0, 2]], np.load(tmp_path / "e.npy"), rtol=0, atol=1e-6)
    assert not got[1].any() and got.dtype == np.float32
    sims = model.similarity(got[[0, 2]], got[[0, 2]])
    assert sims.shape == (2, 2) and float(sims[0, 0]) == pytest.approx(1.0, abs=1e-6)


@pytest.mark.filterwarnings("error")
def test_similarity_takes_1d_and_2d_like_sentence_transformers(tiny_llama):
    pytest.importorskip("mteb")
    from embfilter_cli.text.mteb_encoder import MtebEncoder

    model = MtebEncoder(str(tiny_llama), device="cpu")
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((3, 8)), rng.standard_normal((2, 8))
    unit_a = a / np.linalg.norm(a, axis=1, keepdims=True)
    unit_b = b / np.linalg.norm(b, axis=1, keepdims=True)
    np.testing.assert_allclose(model.similarity(a, b).numpy(), unit_a @ unit_b.T, atol=1e-6)
    one = model.similarity(a[0], b[0])  # mteb's summarization evaluator: float(similarity(v1, v2))
    assert one.shape == (1, 1) and float(one) == pytest.approx(float(unit_a[0] @ unit_b[0]), abs=1e-6)
    assert model.similarity(a[0], b).shape == (1, 2)
    np.testing.assert_allclose(model.similarity_pairwise(a[:2], b).numpy(), (unit_a[:2] * unit_b).sum(1), atol=1e-6)
    pair = model.similarity_pairwise(a[0], b[0])
    assert pair.shape == (1,) and float(pair) == pytest.approx(float(unit_a[0] @ unit_b[0]), abs=1e-6)


def test_a_filter_from_another_model_is_refused(tiny_llama, tiny_llama_b, runner, tmp_path):
    pytest.importorskip("mteb")
    from embfilter_cli.errors import ArtifactError
    from embfilter_cli.text.mteb_encoder import MtebEncoder

    filt = tmp_path / "b.safetensors"
    assert runner.invoke(app, ["fit", "--model", str(tiny_llama_b), "--rank", "2", "-o", str(filt)]).exit_code == 0
    with pytest.raises(ArtifactError, match="W_U sha256"):
        MtebEncoder(str(tiny_llama), filter=filt)


def test_without_mteb_the_error_names_the_pip_command(monkeypatch, tiny_llama):
    from embfilter_cli.errors import MissingDependencyError
    from embfilter_cli.text.mteb_encoder import MtebEncoder

    monkeypatch.setitem(sys.modules, "mteb", None)
    with pytest.raises(MissingDependencyError, match=r"pip install 'embfilter\[mteb\]'"):
        MtebEncoder(str(tiny_llama))
