"""`--center-on self` (issue 17): the model's own samples as the background.

All on the tiny seeded Llama (hidden 32, vocab 300): sampling is deterministic, cached, recorded in
the artifact, and the stored mean is the float64 mean of the filtered embeddings of exactly the
texts the sampler wrote (tolerance 1e-5, float32 model). Byte equality is asserted only between
two runs in one process (same machine, same libraries), as the issue allows.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from embfilter_cli.cli import app
from embfilter_cli.errors import ArtifactError, InputDataError, ModelNotFoundError
from embfilter_cli.filters.artifact import load_artifact
from embfilter_cli.filters.centering import Centering, texts_sha256
from embfilter_cli.model.locate import resolve_model
from embfilter_cli.text import self_samples
from embfilter_cli.text.self_samples import SelfSampling, sample_token_ids, self_texts, start_ids

SMALL = ["--self-count", "6", "--self-tokens", "5"]


def _error_line(result) -> str:
    lines = result.stderr.strip().splitlines()
    assert lines and lines[-1].startswith("Error: "), result.stderr
    return lines[-1]


@pytest.fixture(scope="module")
def generator(tiny_llama):
    return self_samples.load_generator_at(resolve_model(str(tiny_llama)), device="cpu", dtype="float32")


def _draw(generator, **settings) -> list[list[int]]:
    lm, encoder = generator
    tok = encoder.tokenizer
    sampling = SelfSampling(**settings)
    return sample_token_ids(lm, start_ids(tok, "bos", "m"), sampling, vocab_size=len(tok), stops={2})


def _fit(runner, model: Path, out: Path, *extra: str):
    args = ["fit", "-m", str(model), "--rank", "3", "--bottom", "2", "--device", "cpu", "-o", str(out), "-q"]
    return runner.invoke(app, [*args, "--center-on", "self", *SMALL, *extra])


# --------------------------------------------------------------------------- the sampler


def test_sampling_is_seeded_and_independent_of_batching(generator, monkeypatch):
    first = _draw(generator, count=5, new_tokens=6, seed=3)
    assert first == _draw(generator, count=5, new_tokens=6, seed=3)
    assert first != _draw(generator, count=5, new_tokens=6, seed=4)
    monkeypatch.setattr(self_samples, "SAMPLE_BATCH", 2)  # other batches: sample i keeps its uniforms
    assert _draw(generator, count=5, new_tokens=6, seed=3) == first
    longer = _draw(generator, count=5, new_tokens=9, seed=3)
    assert all(long[: len(short)] == short for short, long in zip(first, longer, strict=True))
    assert all(0 < len(s) <= 6 and all(0 <= t < 300 and t != 2 for t in s) for s in first)


def test_temperature_sharpens_towards_the_argmax(generator):
    lm, encoder = generator
    cold = _draw(generator, count=8, new_tokens=1, temperature=1e-3, seed=0)
    import torch

    with torch.inference_mode():
        logits = lm(input_ids=torch.tensor([[encoder.tokenizer.bos_token_id]])).logits[0, -1, :300]
    assert {s[0] for s in cold} == {int(logits.argmax())}  # T → 0: every sample takes the top token


@pytest.mark.parametrize(
    ("settings", "needle"),
    [
        ({"count": 0}, "at least 1 sample"),
        ({"new_tokens": 0}, "at least 1 token"),
        ({"temperature": 0.0}, "temperature must be a finite number > 0"),
        ({"start": ""}, "start 'bos' or a non-empty text"),
    ],
)
def test_bad_settings_are_input_errors(settings, needle):
    with pytest.raises(InputDataError, match=needle):
        SelfSampling(**settings).checked()


def test_a_tokenizer_without_bos_needs_a_start_text():
    class NoBos:
        bos_token_id = None

        def __call__(self, text, add_special_tokens=False):
            return {"input_ids": [5, 6]}

    with pytest.raises(ModelNotFoundError, match=r"no BOS token.*--self-start"):
        start_ids(NoBos(), "bos", "m")
    assert start_ids(NoBos(), "The", "m") == [5, 6]


# --------------------------------------------------------------------------- cache and record


def test_texts_are_cached_with_a_header_and_reused(tiny_llama, tmp_path, monkeypatch):
    location = resolve_model(str(tiny_llama))
    sampling = SelfSampling(count=4, new_tokens=5, seed=1)
    first = self_texts(location, sampling, device="cpu", dtype="float32", cache_dir=tmp_path)
    assert not first.cached and first.encoder is not None
    (entry,) = (tmp_path / "self-texts").iterdir()
    stored = json.loads(entry.read_text())
    assert stored["kind"] == "self-texts" and stored["source"] == location.source and stored["created"]
    assert stored["settings"] == first.record and stored["texts"] == first.texts
    assert first.record == {
        "sampler": "ancestral/1",
        "count": 4,
        "new_tokens": 5,
        "temperature": 1.0,
        "seed": 1,
        "start": "bos",
        "dtype": "float32",
        "device": "cpu",
        "model_fingerprint": first.record["model_fingerprint"],
    }

    def no_sampling(*args, **kwargs):
        raise AssertionError("a cached draw must not sample again")

    monkeypatch.setattr(self_samples, "sample_token_ids", no_sampling)
    again = self_texts(location, sampling, device="cpu", dtype="float32", cache_dir=tmp_path)
    assert again.cached and again.texts == first.texts and again.sha256 == first.sha256
    stored["texts"][0] += "x"  # an edited entry no longer matches its digest: a miss
    entry.write_text(json.dumps(stored))
    with pytest.raises(AssertionError, match="must not sample"):
        self_texts(location, sampling, device="cpu", dtype="float32", cache_dir=tmp_path)
    with pytest.raises(AssertionError, match="must not sample"):  # other settings: another entry
        self_texts(location, SelfSampling(count=4, new_tokens=5, seed=2), device="cpu", cache_dir=tmp_path)


def test_centering_record_round_trips_the_sampling_and_rejects_damage():
    fields = dict(count=3, source="texts", sha256="a" * 64, pooling="mean", recipe="none", template="{text}")
    fields.update(max_length=512, model_source="m", unembedding_sha256="0" * 64, input="self")
    plain = Centering(**fields)
    assert "sampling" not in json.loads(plain.to_json())  # older records keep their bytes
    sampled = Centering(**fields, sampling={"sampler": "ancestral/1", "seed": 0, "new_tokens": 64})
    assert Centering.from_json(sampled.to_json(), "f") == sampled
    assert "self-generated texts" in sampled.describe() and "64 new tokens" in sampled.describe()
    bad = json.loads(sampled.to_json())
    bad["sampling"] = "seed 0"
    with pytest.raises(ArtifactError, match="sampling record"):
        Centering.from_json(json.dumps(bad), "f")


# --------------------------------------------------------------------------- the CLI


def test_fit_center_on_self_is_reproducible_recorded_and_cached(runner, tiny_llama, tmp_path, monkeypatch):
    monkeypatch.setenv("EMBFILTER_CACHE", str(tmp_path / "cache_a"))
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000000")  # the one field that is not a function of the inputs
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    texts_file = tmp_path / "texts.jsonl"
    result = _fit(runner, tiny_llama, a, "--save-texts", str(texts_file))
    assert result.exit_code == 0, result.stderr
    monkeypatch.setenv("EMBFILTER_CACHE", str(tmp_path / "cache_b"))  # a fresh cache: samples again
    result = _fit(runner, tiny_llama, b)
    assert result.exit_code == 0, result.stderr
    assert a.read_bytes() == b.read_bytes()  # same machine, same process: identical bytes

    art = load_artifact(a)
    rec = art.centering
    texts = [json.loads(line)["text"] for line in texts_file.read_text().splitlines()]
    assert (
        rec.input == "self" and rec.source == "texts" and rec.count == len(texts) and rec.sha256 == texts_sha256(texts)
    )
    assert rec.sampling["count"] == 6 and rec.sampling["new_tokens"] == 5 and rec.sampling["seed"] == 0
    assert rec.sampling["temperature"] == 1.0 and rec.sampling["start"] == "bos" and rec.sampling["sampler"]
    # The mean is that of the saved texts, embedded by the filter's model.
    from embfilter_cli.text.embedding import load_encoder

    raw = load_encoder(str(tiny_llama), device="cpu").embed(texts).astype(np.float64)
    np.testing.assert_allclose(art.mean, (raw @ art.projection.astype(np.float64).T).mean(0), rtol=0, atol=1e-5)
    # The saved texts centre a filter exactly as `self` did (the texts are the same bytes).
    via_file = tmp_path / "file.safetensors"
    args = ["fit", "-m", str(tiny_llama), "--rank", "3", "--bottom", "2", "--device", "cpu", "-q"]
    result = runner.invoke(app, [*args, "--center-on", str(texts_file), "-o", str(via_file)])
    assert result.exit_code == 0, result.stderr
    assert load_artifact(via_file).centering.sha256 == rec.sha256
    np.testing.assert_allclose(load_artifact(via_file).mean, art.mean, rtol=0, atol=1e-6)

    # Another recipe on the same samples: no sampling, the cached texts.
    def no_sampling(*args, **kwargs):
        raise AssertionError("the second fit must not sample")

    monkeypatch.setattr(self_samples, "sample_token_ids", no_sampling)
    c = tmp_path / "c.safetensors"
    result = _fit(runner, tiny_llama, c, "--pooling", "last", "--recipe", "prompteol")
    assert result.exit_code == 0, result.stderr
    assert load_artifact(c).centering.sha256 == rec.sha256 and load_artifact(c).centering.recipe == "prompteol"

    result = runner.invoke(app, ["verify", str(a), "-m", str(tiny_llama), "--json"])
    assert result.exit_code == 0, result.stderr
    mean = {c["name"]: c for c in json.loads(result.stdout)["checks"]}["mean"]
    assert mean["ok"] and mean["detail"].startswith("mean of 6 filtered self-generated texts (sampled by ancestral/1")


def test_center_self_matches_fit_and_json_summary(runner, tiny_llama, tmp_path, monkeypatch):
    monkeypatch.setenv("EMBFILTER_CACHE", str(tmp_path / "cache"))
    plain = tmp_path / "plain.safetensors"
    fitted = tmp_path / "fitted.safetensors"
    args = ["fit", "-m", str(tiny_llama), "--rank", "3", "--bottom", "2", "--device", "cpu", "-q"]
    assert runner.invoke(app, [*args, "--center-on", "none", "-o", str(plain)]).exit_code == 0
    assert load_artifact(plain).centering is None  # `none`: the head-only fit
    assert _fit(runner, tiny_llama, fitted).exit_code == 0
    out = tmp_path / "centred.safetensors"
    result = runner.invoke(
        app, ["center", str(plain), "self", *SMALL, "-o", str(out), "--device", "cpu", "--json", "-q"]
    )
    assert result.exit_code == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["centering"]["input"] == "self" and summary["centering"]["sampling"]["count"] == 6
    np.testing.assert_array_equal(load_artifact(out).mean, load_artifact(fitted).mean)  # one core, two commands
    result = runner.invoke(app, ["center", str(plain), "self", *SMALL, "-o", str(tmp_path / "t.safetensors")])
    assert result.exit_code == 0 and "texts sampled by the model" in result.stdout


def test_save_texts_needs_self(runner, tiny_llama, tmp_path):
    bg = tmp_path / "bg.txt"
    bg.write_text("hello there\n")
    args = ["fit", "-m", str(tiny_llama), "--rank", "3", "--center-on", str(bg), "--save-texts", str(tmp_path / "t")]
    result = runner.invoke(app, [*args, "-o", str(tmp_path / "f.safetensors")])
    assert result.exit_code == 2 and "--save-texts keeps the texts of --center-on self" in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bg.txt"]


def _without(folder: Path, out: Path, keep) -> Path:
    """A copy of a model folder whose weights keep only the tensors `keep(name)` accepts."""
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(folder, out)
    tensors = load_file(str(out / "model.safetensors"))
    save_file({k: v for k, v in tensors.items() if keep(k)}, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


@pytest.mark.parametrize(
    ("keep", "needle"),
    [
        (lambda k: "layers.1." not in k, "its weights lack"),
        (lambda k: k == "lm_head.weight", "its weights lack"),  # a head-only checkpoint
    ],
    ids=["missing-layer", "head-only"],
)
def test_a_model_that_cannot_generate_is_one_error_line(runner, tiny_llama, tmp_path, monkeypatch, keep, needle):
    monkeypatch.setenv("EMBFILTER_CACHE", str(tmp_path / "cache"))
    model = _without(tiny_llama, tmp_path / "broken", keep)
    out = tmp_path / "f.safetensors"
    result = _fit(runner, model, out)
    assert result.exit_code == 1 and result.stdout == ""
    line = _error_line(result)
    assert "cannot write texts for --center-on self" in line and needle in line and "--center-on FILE" in line
    assert not out.exists() and not (tmp_path / "cache" / "self-texts").exists()


def test_a_single_weights_file_cannot_generate(runner, tiny_llama, tmp_path):
    out = tmp_path / "f.safetensors"
    result = _fit(runner, tiny_llama / "model.safetensors", out)
    assert result.exit_code == 1
    assert "single weights file" in _error_line(result) and not out.exists()


# --------------------------------------------------------------------------- the mean everywhere it is applied


def test_apply_onnx_and_dense_honour_the_self_centred_mean(runner, tiny_llama, tmp_path, monkeypatch):
    import onnxruntime as ort

    monkeypatch.setenv("EMBFILTER_CACHE", str(tmp_path / "cache"))
    filt = tmp_path / "f.safetensors"
    assert _fit(runner, tiny_llama, filt).exit_code == 0
    art = load_artifact(filt)
    x = np.random.default_rng(5).standard_normal((7, 32)).astype(np.float32)
    ref = x.astype(np.float64) @ art.projection.astype(np.float64).T - art.mean
    np.save(tmp_path / "x.npy", x)
    result = runner.invoke(app, ["apply", str(filt), str(tmp_path / "x.npy"), "-o", str(tmp_path / "y.npy")])
    assert result.exit_code == 0, result.stderr
    np.testing.assert_allclose(np.load(tmp_path / "y.npy"), ref, rtol=0, atol=1e-5)
    onnx_path = tmp_path / "f.onnx"
    assert runner.invoke(app, ["export", str(filt), "--onnx", "-o", str(onnx_path)]).exit_code == 0
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {"embeddings": x})
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-5)
    import onnx

    props = {p.key: p.value for p in onnx.load(str(onnx_path)).metadata_props}
    assert json.loads(props["embfilter.centering"])["sampling"] == art.centering.sampling
    pytest.importorskip("sentence_transformers")
    from embfilter_cli.export import formats

    dense_dir = tmp_path / "st" / "2_Dense"
    args = ["export", str(filt), "--format", "sentence-transformers", "--dense-only", "-o", str(dense_dir)]
    assert runner.invoke(app, args).exit_code == 0
    np.testing.assert_array_equal(formats._load_dense(dense_dir).linear.bias.detach().numpy(), -art.mean)


def test_eval_center_self_rows_match_the_mean_fit_stores(runner, tiny_llama, tmp_path, monkeypatch):
    from embfilter_cli.text.datasets import load_dataset
    from embfilter_cli.text.embedding import load_encoder
    from embfilter_cli.text.evaluation import score_vectors
    from tests.test_centering import _pairs_tsv

    monkeypatch.setenv("EMBFILTER_CACHE", str(tmp_path / "cache"))
    tsv = _pairs_tsv(tmp_path / "pairs.tsv")
    filt = tmp_path / "f.safetensors"
    args = ["fit", "-m", str(tiny_llama), "--rank", "3", "--bottom", "2", "-o", str(filt), "-q"]
    assert runner.invoke(app, args).exit_code == 0
    base = ["eval", "-m", str(tiny_llama), "--device", "cpu", "--data", str(tsv), "--ratio", "2", "--json"]
    result = runner.invoke(app, [*base, "--filter", str(filt), "--center-self"])
    assert result.exit_code == 0, result.stderr
    rows = {r["name"]: r for r in json.loads(result.stdout)["results"]}
    selfish = [name for name in rows if name.endswith(" + self-centring")]
    assert len(selfish) == 3 and {rows[n]["kind"] for n in selfish} == {"filter", "ratio", "auto"}
    assert all(rows[n]["centring"] == "self" and rows[n]["centered"] is False for n in selfish)
    # The same texts (from the cache eval filled), embedded and averaged by hand.
    drawn = self_texts(resolve_model(str(tiny_llama)), SelfSampling(), device="cpu", cache_dir=tmp_path / "cache")
    assert drawn.cached and rows[selfish[0]]["self_samples"] == len(drawn.texts)
    encoder = load_encoder(str(tiny_llama), device="cpu")
    data = load_dataset(str(tsv))
    raw = encoder.embed(data.texts).astype(np.float64)
    mu = encoder.embed(drawn.texts).astype(np.float64).mean(0)
    p = load_artifact(filt).projection.astype(np.float64)
    assert rows["f.safetensors + self-centring"]["spearman"] == pytest.approx(
        score_vectors((raw - mu) @ p.T, data)[0], abs=1e-6
    )


def test_the_library_call_gives_the_cli_mean(runner, tiny_llama, tmp_path, monkeypatch):
    """`centre_filter(artifact, read_background("self"))`: what `fit --center-on self` runs, callable with plain arguments."""
    from embfilter_cli.text.background import centre_filter, read_background

    monkeypatch.setenv("EMBFILTER_CACHE", str(tmp_path / "cache"))
    plain, cli = tmp_path / "plain.safetensors", tmp_path / "cli.safetensors"
    args = ["fit", "-m", str(tiny_llama), "--rank", "3", "--bottom", "2", "--device", "cpu", "-q"]
    assert runner.invoke(app, [*args, "-o", str(plain)]).exit_code == 0
    assert _fit(runner, tiny_llama, cli).exit_code == 0
    background = read_background("self", sampling=SelfSampling(count=6, new_tokens=5))
    assert background.pending and background.count == 6
    centred, report = centre_filter(
        load_artifact(plain), background, location=resolve_model(str(tiny_llama)), device="cpu"
    )
    np.testing.assert_array_equal(centred.mean, load_artifact(cli).mean)
    assert centred.centering == load_artifact(cli).centering and report.count == centred.centering.count


def test_self_texts_record_their_use_and_keep_the_cache_within_its_limit(tiny_llama, tmp_path, monkeypatch):
    """A hit marks the entry used (least-recently-used pruning sees it); a new entry enforces the size limit."""
    import os

    from embfilter_cli import cache_lock, cache_store

    location = resolve_model(str(tiny_llama))
    old = tmp_path / "self-texts" / ("0" * 64 + ".json")  # an older entry that the limit must evict
    old.parent.mkdir(parents=True)
    old.write_text(json.dumps({"kind": "self-texts", "source": "elsewhere", "texts": ["x" * 4000]}))
    os.utime(old, (1_000_000, 1_000_000))
    monkeypatch.setenv(cache_store.MAX_SIZE_ENV, "3000")  # bytes: room for the new entry, not for both
    notes: list[str] = []
    first = self_texts(
        location, SelfSampling(count=2, new_tokens=3, seed=1), device="cpu", cache_dir=tmp_path, notify=notes.append
    )
    (entry,) = (tmp_path / "self-texts").glob("*.json")
    assert not old.exists() and entry.name != old.name
    assert any("removed 1 least recently used entry" in n for n in notes), notes
    stamp = cache_lock.last_used(tmp_path, entry)
    assert stamp is not None
    marker = cache_lock.marker_path(tmp_path, entry)
    os.utime(marker, (stamp - 1000, stamp - 1000))
    again = self_texts(location, SelfSampling(count=2, new_tokens=3, seed=1), device="cpu", cache_dir=tmp_path)
    assert again.cached and again.texts == first.texts
    assert cache_lock.last_used(tmp_path, entry) > stamp - 1000  # the hit touched the marker
