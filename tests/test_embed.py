"""`embfilter embed` and the Encoder core: pooling, recipes, truncation, batching, text input, filters.

Everything runs on a tiny seeded Llama (and a tiny GPT-2 for absolute positions); the references
are direct forward passes of the same model on one unpadded text at a time.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from embfilter_cli.cli import app
from embfilter_cli.errors import ArtifactError, InputDataError, ModelNotFoundError
from embfilter_cli.model.head import check_filter_matches, model_fingerprint
from embfilter_cli.model.location import ModelLocation
from embfilter_cli.text.embedding import Encoder, Prepared, load_encoder, pad_batch, pool_hidden
from embfilter_cli.text.recipes import resolve_recipe
from embfilter_cli.text.texts import describe_skipped, read_texts
from tests.tiny_models import make_gpt2, make_llama

TEXTS = [
    "The cat sat on the mat.",
    "A dog ran in the park and the quick brown fox jumps over the lazy dog.",
    "Rain",
    "Stock markets fell sharply on Monday.",
    "The recipe needs two eggs and some flour.",
]


@pytest.fixture(scope="module")
def encoder(tiny_llama) -> Encoder:
    return load_encoder(str(tiny_llama), device="cpu")


def _reference(enc: Encoder, ids: list[int]) -> np.ndarray:
    """last_hidden_state of ONE unpadded sequence, float64 (no batching, no masks)."""
    with torch.inference_mode():
        out = enc.model(input_ids=torch.tensor([ids]))
    return out.last_hidden_state[0].double().numpy()


# --------------------------------------------------------------------------- the model's output


def test_last_hidden_state_is_post_final_norm(tiny_llama, encoder):
    """The base model's last_hidden_state = final norm(last decoder layer), and the LM head reads it."""
    from transformers import LlamaForCausalLM

    lm = LlamaForCausalLM.from_pretrained(str(tiny_llama)).eval()
    captured = {}
    hook = lm.model.layers[-1].register_forward_hook(
        lambda mod, args, out: captured.update(h=out[0] if isinstance(out, tuple) else out)
    )
    ids = encoder.prepare(TEXTS[1], resolve_recipe("none"), 128).ids
    with torch.inference_mode():
        logits = lm(input_ids=torch.tensor([ids])).logits[0]
        normed = lm.model.norm(captured["h"])[0]
    hook.remove()
    hidden = torch.from_numpy(_reference(encoder, ids)).float()
    assert not torch.allclose(captured["h"][0], hidden, atol=1e-3)  # the norm changes the values…
    torch.testing.assert_close(hidden, normed, atol=1e-5, rtol=1e-5)  # …and that is what we pool
    torch.testing.assert_close(lm.lm_head(hidden), logits, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("pooling", ["mean", "last"])
def test_pooling_matches_unpadded_reference_and_input_order(encoder, pooling):
    got = encoder.embed(TEXTS, pooling=pooling, batch_size=2)
    assert got.dtype == np.float32 and got.shape == (len(TEXTS), 32)
    for i, text in enumerate(TEXTS):
        hidden = _reference(encoder, encoder.prepare(text, resolve_recipe("none"), 128).ids)
        expected = hidden.mean(axis=0) if pooling == "mean" else hidden[-1]
        np.testing.assert_allclose(got[i], expected, atol=2e-5, err_msg=f"text {i}")
    # Length batching reorders internally; the result must follow the input order.
    perm = [3, 0, 4, 2, 1]
    np.testing.assert_allclose(
        encoder.embed([TEXTS[i] for i in perm], pooling=pooling, batch_size=3), got[perm], atol=2e-5
    )


def test_left_padding_with_absolute_positions_is_padding_invariant(tmp_path):
    """GPT-2 has learned absolute positions: without explicit position ids, left padding would shift them."""
    enc = load_encoder(str(make_gpt2(tmp_path / "gpt2")), device="cpu")
    batch = enc.embed(TEXTS[:3], pooling="last", batch_size=3)
    alone = np.stack([enc.embed([t], pooling="last")[0] for t in TEXTS[:3]])
    np.testing.assert_allclose(batch, alone, atol=2e-5)


def test_pool_hidden_against_loops():
    rng = np.random.default_rng(0)
    hidden = rng.standard_normal((3, 5, 4))
    mask = np.array([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [1, 1, 0, 0, 0]])  # left-, un-, right-padded
    spans = [(2, 5), (1, 4), (0, 5)]
    mean = pool_hidden(hidden, mask, spans, "mean")
    np.testing.assert_allclose(mean[0], hidden[0, 2:5].mean(0), rtol=1e-6)
    np.testing.assert_allclose(mean[1], hidden[1, 1:4].mean(0), rtol=1e-6)
    np.testing.assert_allclose(mean[2], hidden[2, 0:2].mean(0), rtol=1e-6)
    last = pool_hidden(hidden, mask, spans, "last")
    np.testing.assert_allclose(last, np.stack([hidden[0, 4], hidden[1, 4], hidden[2, 1]]), rtol=1e-6)
    with pytest.raises(InputDataError, match="no tokens to pool"):
        pool_hidden(hidden, mask, [(0, 2), (0, 1), (0, 1)], "mean")


def test_pad_batch_shifts_spans_for_left_padding():
    batch = [Prepared([5, 6, 7], (1, 3), False), Prepared([8], (0, 1), False)]
    ids, mask, spans = pad_batch(batch, pad_id=0, left=True)
    assert ids == [[5, 6, 7], [0, 0, 8]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]] and spans == [(1, 3), (2, 3)]
    ids, mask, spans = pad_batch(batch, pad_id=0, left=False)
    assert ids == [[5, 6, 7], [8, 0, 0]] and spans == [(1, 3), (0, 1)]


# --------------------------------------------------------------------------- recipes and echo


def test_recipes_render_with_literal_braces_and_reject_missing_slot():
    assert resolve_recipe("prompteol").render("hi")[0] == 'This sentence: "hi" means in one word:"'
    assert resolve_recipe("summarize").render("hi")[0] == 'Summarize the sentence: "hi" in one word:"'
    custom = resolve_recipe("{json} Query: {text}!")
    prompt, span = custom.render("ab")
    assert custom.name == "custom" and prompt == "{json} Query: ab!" and prompt[span[0] : span[1]] == "ab"
    with pytest.raises(InputDataError, match=r"neither a known recipe .* containing \{text\}"):
        resolve_recipe("summarise")


def test_echo_span_is_exactly_the_second_copy(encoder):
    echo = resolve_recipe("echo")
    for text in ["The cat sat on the mat.", "the quick brown fox", "Rain"]:
        prep = encoder.prepare(text, echo, 128)
        span_text = encoder.tokenizer.decode(prep.ids[prep.span[0] : prep.span[1]])
        assert span_text.strip() == text
        assert prep.span[1] == len(prep.ids)  # the second copy ends the prompt
        prompt, chars = echo.render(text)
        # The prefix-counting path (slow tokenizers, no offsets) finds the same span.
        assert encoder._token_span(prompt, prep.ids, None, chars) == prep.span


def test_echo_mean_pools_over_second_copy_only(encoder):
    text = "Stock markets fell sharply on Monday."
    prep = encoder.prepare(text, resolve_recipe("echo"), 128)
    hidden = _reference(encoder, prep.ids)
    got = encoder.embed([text, "Rain"], recipe="echo", batch_size=2)[0]
    np.testing.assert_allclose(got, hidden[prep.span[0] : prep.span[1]].mean(0), atol=2e-5)
    assert not np.allclose(got, hidden.mean(0), atol=1e-3)


# --------------------------------------------------------------------------- truncation


def test_truncation_cuts_the_text_and_keeps_the_template_tail(encoder):
    rec = resolve_recipe("prompteol")
    overhead = len(encoder.prepare("x", rec, 128).ids)
    long_text = "the quick brown fox jumps over the lazy dog " * 6
    limit = overhead + 10
    prep = encoder.prepare(long_text, rec, limit)
    decoded = encoder.tokenizer.decode(prep.ids)
    assert prep.truncated and overhead < len(prep.ids) <= limit
    assert decoded.startswith('This sentence: "the quick brown') and decoded.endswith('" means in one word:"')
    vectors = encoder.embed([long_text, "Rain"], recipe=rec.template, pooling="last", max_length=limit)
    assert encoder.last_truncated == 1 and vectors.shape == (2, 32)
    # Short texts are untouched.
    assert not encoder.prepare("Rain", rec, limit).truncated


def test_truncation_cuts_both_echo_copies_alike(encoder):
    echo = resolve_recipe("echo")
    text = "A dog ran in the park. " * 8
    prep = encoder.prepare(text, echo, 60)
    decoded = encoder.tokenizer.decode(prep.ids)
    assert prep.truncated and len(prep.ids) <= 60
    first, second = decoded.split(". The rewritten paragraph: ")
    assert first.removeprefix("Rewrite the following paragraph: ") == second
    assert encoder.tokenizer.decode(prep.ids[prep.span[0] : prep.span[1]]).strip() == second.strip()


def test_template_longer_than_max_length_is_an_error(encoder):
    with pytest.raises(InputDataError, match=r"template alone takes \d+ tokens.*--max-length 5"):
        encoder.prepare("some text that needs room", resolve_recipe("prompteol"), 5)


def test_max_length_is_capped_by_the_model_context(encoder):
    assert encoder.max_positions == 128 and encoder.effective_max_length(512) == 128
    with pytest.raises(InputDataError, match="at least 1"):
        encoder.effective_max_length(0)


def test_embed_rejects_empty_texts_and_bad_options(encoder):
    with pytest.raises(InputDataError, match="text 1 is empty"):
        encoder.embed(["ok", "   "])
    with pytest.raises(InputDataError, match="pooling 'max'"):
        encoder.embed(["ok"], pooling="max")
    with pytest.raises(InputDataError, match="--batch-size"):
        encoder.embed(["ok"], batch_size=0)


def test_progress_callback_counts_every_text(encoder):
    seen = []
    encoder.embed(TEXTS, batch_size=2, progress=lambda done, total: seen.append((done, total)))
    assert seen == [(2, 5), (4, 5), (5, 5)]


def test_progress_bar_goes_to_stderr_only(encoder, monkeypatch, capsys):
    import embfilter_cli.console as console

    monkeypatch.setattr(console, "progress_enabled", lambda: True)
    with console.progress_bar("Embedding", 3) as progress:
        assert progress is not None
        got = encoder.embed(TEXTS[:3], batch_size=1, progress=progress)
    np.testing.assert_allclose(got, encoder.embed(TEXTS[:3]), atol=2e-5)
    assert capsys.readouterr().out == ""


# --------------------------------------------------------------------------- loading and fingerprints


def test_single_weights_file_is_refused_with_the_folder_hint(tiny_llama):
    from embfilter_cli.text.embedding import load_encoder_at

    file = next(tiny_llama.glob("*.safetensors"))
    loc = ModelLocation(str(file), "safetensors_file", file, str(file), "local")
    with pytest.raises(ModelNotFoundError, match=r"single weights file.*config\.json and tokenizer.*--model"):
        load_encoder_at(loc, device="cpu")


def test_bad_dtype_is_refused(tiny_llama):
    with pytest.raises(InputDataError, match="--dtype 'float8'"):
        load_encoder(str(tiny_llama), device="cpu", dtype="float8")


def test_model_fingerprint_tracks_weight_files(tmp_path):
    folder = make_llama(tmp_path / "m")
    from embfilter_cli.model.locate import resolve_model

    first = model_fingerprint(resolve_model(str(folder)))
    assert model_fingerprint(resolve_model(str(folder))) == first
    weights = next(folder.glob("*.safetensors"))
    stat = weights.stat()
    import os

    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    assert model_fingerprint(resolve_model(str(folder))) != first


def test_check_filter_matches_names_both_fingerprints(make_filter):
    from embfilter_cli.filters.artifact import load_artifact

    art = load_artifact(make_filter(d=16))
    with pytest.raises(ArtifactError, match=r"expects hidden size 16 .*test/planted.* has 32"):
        check_filter_matches(art, hidden_size=32, unembedding_sha256="a" * 64, model_source="tiny")
    with pytest.raises(
        ArtifactError, match=r"W_U sha256 0000000000000000…\) but tiny has W_U sha256 aaaaaaaaaaaaaaaa…"
    ):
        check_filter_matches(art, hidden_size=16, unembedding_sha256="a" * 64, model_source="tiny")
    check_filter_matches(art, hidden_size=16, unembedding_sha256="0" * 64, model_source="tiny")


# --------------------------------------------------------------------------- reading texts


def test_read_lines_skips_blank_lines_and_keeps_order(tmp_path):
    f = tmp_path / "t.txt"
    f.write_bytes("\ufeffone\r\n\r\ntwo  \n   \nthree\n".encode())
    got = read_texts(f)
    assert (
        got.texts == ["one", "two  ", "three"] and got.records is None and got.skipped == [2, 4] and got.fmt == "lines"
    )
    assert (
        describe_skipped(got.skipped) == "2 empty texts skipped (lines 2, 4); the output has one row per non-empty text"
    )


def test_read_jsonl_keeps_records_and_detects_format(tmp_path):
    f = tmp_path / "t.data"
    f.write_text('{"id": 1, "text": "a b"}\n\n{"id": 2, "text": " "}\n{"text": "c", "tags": ["x"]}\n')
    got = read_texts(f)
    assert got.fmt == "jsonl" and got.texts == ["a b", "c"] and got.skipped == [2, 3]
    assert got.records == [{"id": 1, "text": "a b"}, {"text": "c", "tags": ["x"]}]
    assert read_texts("-", stdin=io.StringIO('{"text": "z"}\n')).texts == ["z"]
    assert read_texts(f, fmt="lines").texts[0] == '{"id": 1, "text": "a b"}'


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ('{"text": "a"}\n{"text": \n', r"line 2 is not valid JSON"),
        ('{"text": "a"}\n["a"]\n', r"line 2 is a JSON array, not an object"),
        ('{"text": "a"}\n{"body": "b"}\n', r"line 2 has no 'text' field.*fields seen: body"),
        ('{"text": 3}\n', r"line 1 has a int 'text' field"),
        ("\n  \n", r"holds no non-empty text"),
    ],
)
def test_bad_text_input_names_the_line(tmp_path, content, message):
    f = tmp_path / "bad.jsonl"
    f.write_text(content)
    with pytest.raises(InputDataError, match=message):
        read_texts(f)


def test_non_utf8_input_names_the_line(tmp_path):
    f = tmp_path / "latin.txt"
    f.write_bytes(b"ok\ncaf\xe9\n")
    with pytest.raises(InputDataError, match=r"line 2 is not valid UTF-8"):
        read_texts(f)


# --------------------------------------------------------------------------- the CLI


def _no_stray_files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def test_cli_lines_to_npy_equals_core(runner, tiny_llama, encoder, tmp_path):
    src = tmp_path / "in.txt"
    src.write_text("\n".join(TEXTS) + "\n\n")
    out = tmp_path / "raw.npy"
    result = runner.invoke(
        app, ["-v", "embed", "--model", str(tiny_llama), "--device", "cpu", str(src), "-o", str(out)]
    )
    assert result.exit_code == 0, result.stderr
    assert result.stdout == ""
    assert "1 empty text skipped (line 6)" in result.stderr and "Embedded 5 texts" in result.stderr
    np.testing.assert_allclose(np.load(out), encoder.embed(TEXTS), atol=1e-6)


def test_cli_jsonl_keeps_fields_and_matches_npy(runner, tiny_llama, tmp_path):
    src = tmp_path / "in.jsonl"
    src.write_text(
        "".join(json.dumps({"id": i, "text": t, "embedding": "old"}) + "\n" for i, t in enumerate(TEXTS[:3]))
    )
    result = runner.invoke(
        app,
        [
            "embed",
            "-m",
            str(tiny_llama),
            "--device",
            "cpu",
            "--pooling",
            "last",
            "--recipe",
            "summarize",
            str(src),
            "-o",
            str(tmp_path / "out.jsonl"),
            "--output-column",
            "embedding",  # the input's own `embedding` field is replaced only when named on purpose
        ],
    )
    assert result.exit_code == 0, result.stderr
    rows = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [r["id"] for r in rows] == [0, 1, 2] and [r["text"] for r in rows] == TEXTS[:3]
    result = runner.invoke(
        app,
        [
            "embed",
            "-m",
            str(tiny_llama),
            "--device",
            "cpu",
            "--pooling",
            "last",
            "--recipe",
            "summarize",
            str(src),
            "-o",
            str(tmp_path / "out.npy"),
        ],
    )
    assert result.exit_code == 0, result.stderr
    # %.9g text round-trips float32 exactly.
    np.testing.assert_array_equal(
        np.array([r["embedding"] for r in rows], dtype=np.float32), np.load(tmp_path / "out.npy")
    )


def test_cli_jsonl_refuses_to_replace_an_embedding_field_unless_named(runner, tiny_llama, tmp_path):
    src = tmp_path / "in.jsonl"
    src.write_text(
        "".join(json.dumps({"id": i, "text": t, "embedding": [1, 2]}) + "\n" for i, t in enumerate(TEXTS[:3]))
    )
    base = ["embed", "-m", str(tiny_llama), "--device", "cpu", str(src)]
    out = tmp_path / "out.jsonl"
    result = runner.invoke(app, [*base, "-o", str(out)])
    assert result.exit_code == 1 and result.stdout == ""
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("Error: ") and "3 of its records already have a field 'embedding'" in line
    assert "--output-column NAME" in line and not out.exists()
    result = runner.invoke(app, [*base, "-o", "-"])  # stdout too: nothing printed
    assert result.exit_code == 1 and result.stdout == ""
    # Another name keeps the old field next to the new one; the .npy output has no field to clash with.
    result = runner.invoke(app, [*base, "-o", str(out), "--output-column", "vec"])
    assert result.exit_code == 0, result.stderr
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["embedding"] for r in rows] == [[1, 2]] * 3 and all(len(r["vec"]) > 2 for r in rows)
    assert runner.invoke(app, [*base, "-o", str(tmp_path / "o.npy")]).exit_code == 0
    result = runner.invoke(app, [*base, "-o", str(tmp_path / "p.npy"), "--output-column", "vec"])
    assert result.exit_code == 2 and ".npy has none" in result.stderr and not (tmp_path / "p.npy").exists()


def test_cli_stdin_to_stdout_with_normalize(runner, tiny_llama, encoder):
    result = runner.invoke(
        app,
        ["embed", "-m", str(tiny_llama), "--device", "cpu", "--normalize", "-q", "-", "-o", "-"],
        input="The cat sat on the mat.\nRain\n",
    )
    assert result.exit_code == 0, result.stderr
    assert result.stderr == ""
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert [r["text"] for r in rows] == ["The cat sat on the mat.", "Rain"]
    vectors = np.array([r["embedding"] for r in rows])
    ref = encoder.embed(["The cat sat on the mat.", "Rain"])
    np.testing.assert_allclose(vectors, ref / np.linalg.norm(ref, axis=1, keepdims=True), atol=1e-6)


def test_cli_filter_is_applied_before_normalisation(runner, tiny_llama, encoder, tmp_path):
    from embfilter_cli.filters.artifact import load_artifact

    filt = tmp_path / "f.safetensors"
    assert (
        runner.invoke(
            app, ["fit", "-m", str(tiny_llama), "--rank", "3", "--bottom", "2", "-o", str(filt), "-q"]
        ).exit_code
        == 0
    )
    src = tmp_path / "in.txt"
    src.write_text("\n".join(TEXTS) + "\n")
    result = runner.invoke(
        app,
        [
            "embed",
            "-m",
            str(tiny_llama),
            "--device",
            "cpu",
            "--filter",
            str(filt),
            "--normalize",
            "--json",
            str(src),
            "-o",
            str(tmp_path / "f.npy"),
        ],
    )
    assert result.exit_code == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["rows"] == 5 and summary["dim"] == 27 and summary["normalized"] and summary["filter"] == str(filt)
    proj = load_artifact(filt).projection.astype(np.float64)
    ref = encoder.embed(TEXTS).astype(np.float64) @ proj.T
    np.testing.assert_allclose(np.load(tmp_path / "f.npy"), ref / np.linalg.norm(ref, axis=1, keepdims=True), atol=1e-5)


def test_cli_refuses_filter_from_another_model(runner, tiny_llama, tmp_path, make_filter):
    src = tmp_path / "in.txt"
    src.write_text("hello\n")
    out = tmp_path / "o.npy"
    wrong_dim = make_filter(d=16, name="d16.safetensors")
    result = runner.invoke(app, ["embed", "-m", str(tiny_llama), "--filter", str(wrong_dim), str(src), "-o", str(out)])
    assert result.exit_code == 1 and result.stdout == ""
    assert "expects hidden size 16" in result.stderr and "has 32" in result.stderr
    same_dim = make_filter(d=32, name="d32.safetensors")
    result = runner.invoke(app, ["embed", "-m", str(tiny_llama), "--filter", str(same_dim), str(src), "-o", str(out)])
    assert result.exit_code == 1
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith("Error: ") and "W_U sha256 0000000000000000…" in line and "test/planted" in line
    from embfilter_cli.model.locate import resolve_model
    from embfilter_cli.model.unembedding import read_unembedding

    assert read_unembedding(resolve_model(str(tiny_llama))).sha256[:16] in line
    assert not out.exists() and _no_stray_files(tmp_path) == []


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (["-o", "{tmp}/o.txt"], 2, "must end in .npy or .jsonl"),
        (["-o", "-", "--json"], 2, "--json prints a summary"),
        (["-o", "{tmp}/o.npy", "--recipe", "no slot"], 1, "neither a known recipe"),
        (["-o", "{tmp}/o.npy", "--max-length", "0"], 2, "--max-length"),
    ],
)
def test_cli_bad_options(runner, tiny_llama, tmp_path, args, code, message):
    src = tmp_path / "in.txt"
    src.write_text("hello\n")
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    result = runner.invoke(app, ["embed", "-m", str(tiny_llama), str(src), *args])
    assert result.exit_code == code, result.stderr
    assert message in result.stderr and result.stdout == ""
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.txt"]


def test_cli_bad_input_line_and_existing_output(runner, tiny_llama, tmp_path):
    src = tmp_path / "in.jsonl"
    src.write_text('{"text": "a"}\nnot json\n')
    result = runner.invoke(app, ["embed", "-m", str(tiny_llama), str(src), "-o", str(tmp_path / "o.npy")])
    assert result.exit_code == 1 and "line 2 is not valid JSON" in result.stderr
    assert not (tmp_path / "o.npy").exists()
    existing = tmp_path / "old.npy"
    existing.write_bytes(b"keep")
    result = runner.invoke(app, ["embed", "-m", str(tiny_llama), str(src), "-o", str(existing)])
    assert result.exit_code == 1 and "already exists; pass --force" in result.stderr
    assert existing.read_bytes() == b"keep"
