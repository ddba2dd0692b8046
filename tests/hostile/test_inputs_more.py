"""More hostile inputs: a damaged eval cache, hostile JSONL, GGUF metadata of the wrong type, FIFOs.

A damaged cache entry is rebuilt with one warning and never reaches a score; everything else is
refused with one `Error:` line, nothing left behind and existing files untouched.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from embfilter_cli.cli import app
from embfilter_cli.text.cache import Cache
from embfilter_cli.text.cache_entry import write_entry
from tests.hostile._util import Snapshot, expect_error

# --------------------------------------------------------------------------- the eval cache

PAIRS = [
    ("The cat sat on the mat.", "A cat sat on a mat.", 4.8),
    ("A dog ran in the park.", "The dog ran in the park.", 4.5),
    ("Rain is expected over the weekend.", "Stock markets fell sharply on Monday.", 0.2),
    ("The recipe needs two eggs and some flour.", "Two eggs and flour.", 3.9),
    ("Stock markets fell sharply on Monday.", "Markets fell on Monday.", 4.1),
]
EVAL_ARGS = ["--device", "cpu", "--sweep-top", "0,2", "--sweep-bottom", "0,1", "--ratio", "2", "--json"]


def _eval(runner: CliRunner, model: Path, tsv: Path, cache: Path):
    return runner.invoke(app, ["eval", "-m", str(model), "--data", str(tsv), "--cache-dir", str(cache), *EVAL_ARGS])


@pytest.fixture(scope="module")
def filled(tiny_llama, tmp_path_factory) -> tuple[Path, Path, dict]:
    """(pairs file, a cache filled by one clean eval run, that run's JSON document)."""
    root = tmp_path_factory.mktemp("evalcache")
    tsv = root / "pairs.tsv"
    tsv.write_text("text1\ttext2\tscore\n" + "".join(f"{a}\t{b}\t{s}\n" for a, b, s in PAIRS))
    first = _eval(CliRunner(), tiny_llama, tsv, root / "cache")
    assert first.exit_code == 0, first.stderr
    doc = json.loads(first.stdout)
    assert doc["embedding"]["cached"] is False
    return tsv, root / "cache", doc


def _entry(cache: Path, kind: str) -> Path:
    (path,) = (cache / kind).iterdir()
    return path


def _rewrite_embeddings(path: Path, change) -> None:
    key = path.name.removesuffix(".safetensors")
    array = Cache(path.parent.parent).load_embeddings(key)
    assert array is not None and array.shape == (9, 32)  # 9 distinct texts, tiny Llama's d = 32
    write_entry(path, key if change != "key" else "0" * 64, {"embeddings": _changed(array, change)}, {})


def _changed(array: np.ndarray, change: str) -> np.ndarray:
    if change == "nan":
        return np.full_like(array, np.nan)
    if change == "inf":
        out = array.copy()
        out[3, 5] = np.inf
        return out
    if change == "rows":
        return array[:-1]
    if change == "width":
        return np.concatenate([array, array[:, :1]], axis=1)
    return array  # "key": same values, written for another key


def _damage_bytes(path: Path, how: str) -> None:
    raw = path.read_bytes()
    if how == "truncated":
        path.write_bytes(raw[:-7])
    elif how == "garbled":  # one flipped bit in the data section: still finite, but not what was written
        path.write_bytes(raw[:-40] + bytes([raw[-40] ^ 0x01]) + raw[-39:])
    elif how == "garbage":
        path.write_bytes(b"\x00\x01 not a cache entry")
    elif how == "empty":
        path.write_bytes(b"")
    elif how == "huge-header":  # a forged header claiming 10^12 rows must not allocate anything
        header = {"embeddings": {"dtype": "F32", "shape": [10**12, 32], "data_offsets": [0, 4 * 32 * 10**12]}}
        body = json.dumps(header).encode()
        path.write_bytes(len(body).to_bytes(8, "little") + body + b"\0" * 64)
    elif how == "fifo":
        path.unlink()
        os.mkfifo(path)


def _assert_rebuilt(result, doc: dict, cache: Path) -> None:
    assert result.exit_code == 0, (result.stderr, result.exception)
    assert "Traceback" not in result.stderr
    warnings = [line for line in result.stderr.splitlines() if line.startswith("Warning:") and "cache" in line]
    assert len(warnings) == 1 and "damaged" in warnings[0] and "recomputing" in warnings[0], result.stderr
    assert str(cache) in warnings[0]
    again = json.loads(result.stdout)
    assert again["results"] == doc["results"] and again["grid"] == doc["grid"]  # the scores of a clean run


@pytest.mark.parametrize(
    "how", ["nan", "inf", "rows", "width", "key", "truncated", "garbled", "garbage", "empty", "huge-header", "fifo"]
)
def test_a_damaged_embeddings_entry_is_rebuilt_with_one_warning(runner, tiny_llama, filled, tmp_path, how):
    tsv, filled_cache, doc = filled
    cache = tmp_path / "cache"
    shutil.copytree(filled_cache, cache)
    entry = _entry(cache, "embeddings")
    if how in ("nan", "inf", "rows", "width", "key"):
        _rewrite_embeddings(entry, how)
    else:
        _damage_bytes(entry, how)
    result = _eval(runner, tiny_llama, tsv, cache)
    _assert_rebuilt(result, doc, cache)
    assert json.loads(result.stdout)["embedding"]["cached"] is False
    warned: list[str] = []
    assert Cache(cache, warn=warned.append).load_embeddings(entry.stem) is not None and not warned  # rewritten whole
    assert not list(cache.rglob("*.tmp"))


@pytest.mark.parametrize("how", ["nan-values", "nan-vectors", "wrong-width", "bad-head", "garbled"])
def test_a_damaged_spectrum_entry_is_rebuilt_with_one_warning(runner, tiny_llama, filled, tmp_path, how):
    tsv, filled_cache, doc = filled
    cache = tmp_path / "cache"
    shutil.copytree(filled_cache, cache)
    entry = _entry(cache, "spectra")
    key = entry.stem
    spectrum, head = Cache(cache).load_spectrum(key)
    values, vectors = spectrum.singular_values.copy(), np.ascontiguousarray(spectrum.vectors)
    meta = {"solver": spectrum.solver, "params": spectrum.params, "certificate": spectrum.certificate}
    meta.update(frobenius_sq=spectrum.frobenius_sq, head=dict(head))
    if how == "nan-values":
        values[:] = np.nan
    elif how == "nan-vectors":
        vectors = vectors.copy()
        vectors[0, 0] = np.nan
    elif how == "wrong-width":
        vectors = vectors[:-1]
    elif how == "bad-head":
        meta["head"]["hidden_size"] = "32"
    if how == "garbled":
        _damage_bytes(entry, "garbled")
    else:
        arrays = {"singular_values": values, "vectors": vectors}
        write_entry(entry, key, arrays, {"meta": json.dumps(meta)})
    _assert_rebuilt(_eval(runner, tiny_llama, tsv, cache), doc, cache)


def test_a_damaged_head_facts_entry_is_rebuilt(runner, tiny_llama, filled, tmp_path):
    tsv, filled_cache, _ = filled
    cache = tmp_path / "cache"
    shutil.copytree(filled_cache, cache)
    shutil.rmtree(cache / "spectra")  # the facts are read first only when the spectrum is not cached
    (entry,) = (cache / "heads").iterdir()
    stored = json.loads(entry.read_text())
    stored["value"]["hidden_size"] = 33
    entry.write_text(json.dumps(stored))
    filt = tmp_path / "f.safetensors"
    assert runner.invoke(app, ["fit", "-q", "-m", str(tiny_llama), "--rank", "2", "-o", str(filt)]).exit_code == 0
    # Only a filter (no band): eval then needs the facts, not the spectrum.
    args = ["eval", "-m", str(tiny_llama), "--data", str(tsv), "--cache-dir", str(cache), "--device", "cpu"]
    result = runner.invoke(app, [*args, "--filter", str(filt), "--no-auto", "--json"])
    assert result.exit_code == 0, result.stderr
    warnings = [line for line in result.stderr.splitlines() if line.startswith("Warning:") and "cache" in line]
    assert len(warnings) == 1 and "damaged" in warnings[0] and str(entry) in warnings[0], result.stderr


def test_a_model_giving_nan_embeddings_is_an_error_and_nothing_is_cached(tiny_llama, tmp_path):
    from embfilter_cli.errors import InputDataError
    from embfilter_cli.model.locate import resolve_model
    from embfilter_cli.text.cache import cached_embeddings
    from embfilter_cli.text.datasets import PairData

    class NanEncoder:  # an fp16 overflow, say: the model itself gives NaN for one text
        last_truncated = 0

        def embed(self, texts, **_):
            out = np.ones((len(texts), 32), dtype=np.float32)
            out[1, 0] = np.nan
            return out

    data = PairData("toy", ["a", "b", "c"], np.array([[0, 1], [1, 2]]), np.array([1.0, 2.0]))
    cache = Cache(tmp_path / "cache")
    options = dict(template="{text}", pooling="mean", recipe="plain", batch_size=2, max_length=16, device="cpu")
    with pytest.raises(InputDataError, match="NaN or infinite embeddings for 1 of 3 texts"):
        cached_embeddings(
            resolve_model(str(tiny_llama)), data, **options, dtype="float32", revision=None, cache=cache,
            encoders={"encoder": NanEncoder()},
        )  # fmt: skip
    assert not (tmp_path / "cache" / "embeddings").exists()


# --------------------------------------------------------------------------- hostile JSONL

DEEP = 200_000
GOOD = json.dumps({"id": 1, "embedding": [float(i) for i in range(16)]})


def _row(values: str) -> str:
    return '{"id": 2, "embedding": ' + values + "}"


@pytest.mark.parametrize(
    ("line", "match"),
    [
        (_row("[" * DEEP + "]" * DEEP), "line 2 is not valid JSON (nested too deeply"),
        ("[" * DEEP + "]" * DEEP, "line 2 is not valid JSON (nested too deeply"),
        ('{"a": ' * DEEP + "1" + "}" * DEEP, "line 2 is not valid JSON (nested too deeply"),
        ('{"embedding": [0], "extra": ' + "[" * DEEP + "]" * DEEP + "}", "nested too deeply"),
        (_row("[1, " + "9" * 5000 + "]"), "line 2 is not valid JSON (a whole number with more than"),
        ("9" * 5000, "line 2 is not valid JSON (a whole number with more than"),
        (_row("[" + "9" * 400 + ", 1]"), "at position 0 (a number too large for a float)"),
        ('"just a string"', "line 2 is a JSON string, not an object"),
        ("12", "line 2 is a JSON number, not an object"),
        ('{"id": 2, "vector": [1, 2]}', "line 2 has no field 'embedding' (its fields: id, vector)"),
        (_row('"1,2,3"'), "line 2: field 'embedding' is a JSON string, expected a list of numbers"),
        (_row(json.dumps(list(range(15)))), "line 2: field 'embedding' has 15 numbers but earlier lines have 16"),
        (_row("[[1, 2], [3, 4]]"), "line 2: field 'embedding' holds [1, 2] at position 0"),
        (_row("[1, null" + ", 1" * 14 + "]"), "holds null at position 1; vectors must be flat lists"),
        (_row("[true" + ", 1" * 15 + "]"), "holds true at position 0; vectors must be flat lists"),
        (_row("[NaN" + ", 1" * 15 + "]"), "line 2 has nan at position 0"),
        (_row("[1, -Infinity" + ", 1" * 14 + "]"), "line 2 has -inf at position 1"),
        (_row("[1e999" + ", 1" * 15 + "]"), "line 2 has inf at position 0"),
    ],
    ids=[
        "deep-vector",
        "deep-array-line",
        "deep-object-line",
        "deep-other-field",
        "int-5000-digits",
        "line-5000-digits",
        "int-past-float",
        "string-line",
        "number-line",
        "wrong-field",
        "vector-is-string",
        "ragged",
        "nested-lists",
        "null-in-vector",
        "bool-in-vector",
        "nan-literal",
        "infinity-literal",
        "overflowing-float",
    ],
)
def test_hostile_jsonl_vectors_give_one_line_naming_file_and_line(runner, make_filter, tmp_path, line, match):
    art = make_filter()
    vectors = tmp_path / "in.jsonl"
    vectors.write_text(GOOD + "\n" + line + "\n")
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.jsonl").write_text("existing\n")
    before = Snapshot(out)
    result = runner.invoke(app, ["apply", "-q", str(art), str(vectors), "-o", str(out / "f.jsonl")])
    error = expect_error(result, 1, match)
    assert "in.jsonl" in error and result.stdout == ""
    before.assert_unchanged()


def test_the_same_deep_line_in_a_vector_file_on_stdin_names_stdin(runner, make_filter):
    line = _row("[" * DEEP + "]" * DEEP)
    result = runner.invoke(app, ["apply", "-q", str(make_filter()), "-", "--format", "jsonl"], input=line + "\n")
    expect_error(result, 1, "line 1 is not valid JSON (nested too deeply")
    assert result.stdout == ""


@pytest.mark.parametrize(
    ("line", "match"),
    [
        ('{"text": ' + "[" * DEEP + "]" * DEEP + "}", "line 2 is not valid JSON (nested too deeply"),
        ("[" * DEEP + "]" * DEEP, "line 2 is not valid JSON (nested too deeply"),
        ('{"text": "a", "n": ' + "9" * 5000 + "}", "line 2 is not valid JSON (a whole number with more than"),
        ('["a"]', "line 2 is a JSON array, not an object"),
        ('{"text": 3}', "line 2 has a int 'text' field"),
    ],
    ids=["deep-text", "deep-line", "int-5000-digits", "array-line", "text-not-string"],
)
def test_hostile_jsonl_texts_for_embed_and_eval_background(runner, tiny_llama, tmp_path, monkeypatch, line, match):
    import embfilter_cli.text.embedding as embedding

    monkeypatch.setattr(embedding, "load_encoder_at", lambda *a, **k: pytest.fail("model loaded for bad input"))
    texts = tmp_path / "texts.jsonl"
    texts.write_text('{"text": "fine"}\n' + line + "\n")
    out = tmp_path / "out"
    out.mkdir()
    before = Snapshot(out)
    embedded = runner.invoke(app, ["embed", "-q", "-m", str(tiny_llama), str(texts), "-o", str(out / "e.npy")])
    assert "texts.jsonl" in expect_error(embedded, 1, match)
    tsv = tmp_path / "pairs.tsv"
    tsv.write_text("".join(f"{a}\t{b}\t{s}\n" for a, b, s in PAIRS))
    args = ["eval", "-q", "-m", str(tiny_llama), "--data", str(tsv), "--background", str(texts), "--device", "cpu"]
    evaluated = runner.invoke(app, [*args, "--cache-dir", str(out / "cache")])
    assert "texts.jsonl" in expect_error(evaluated, 1, match)
    before.assert_unchanged()


def test_a_deep_jsonl_line_as_eval_data_is_a_bad_row(runner, tiny_llama, tmp_path):
    data = tmp_path / "pairs.tsv"
    data.write_text("a\tb\t1\n" + "[" * DEEP + "]" * DEEP + "\n")
    result = runner.invoke(app, ["eval", "-q", "-m", str(tiny_llama), "--data", str(data), "--no-cache"])
    assert "line 2" in expect_error(result, 1)


@pytest.mark.parametrize(
    "text",
    ['{"hidden_size": ' + "[" * DEEP + "]" * DEEP + "}", '{"hidden_size": ' + "9" * 5000 + "}"],
    ids=["deep", "int-5000-digits"],
)
def test_hostile_json_in_a_model_folder_gives_one_line(runner, tmp_path, text):
    from tests.hostile._util import head_file

    model = tmp_path / "model"
    model.mkdir()
    head_file(model / "model.safetensors")
    (model / "config.json").write_text(text)
    before = Snapshot(tmp_path)
    result = runner.invoke(app, ["fit", "-q", "-m", str(model), "--rank", "1", "-o", str(tmp_path / "f.safetensors")])
    assert "config.json is not valid JSON" in expect_error(result, 1)
    before.assert_unchanged()


# --------------------------------------------------------------------------- GGUF metadata of the wrong type

_U8, _I32, _U32, _F32, _STR, _ARR = 0, 5, 4, 6, 8, 9


def _s(text: str) -> bytes:
    raw = text.encode()
    return struct.pack("<Q", len(raw)) + raw


def _arr(itype: int, items: list) -> bytes:
    if itype == _STR:
        body = b"".join(_s(x) for x in items)
    else:
        body = b"".join(struct.pack({_U8: "<B", _I32: "<i", _U32: "<I", _F32: "<f"}[itype], x) for x in items)
    return struct.pack("<IQ", itype, len(items)) + body


TOKENS = ("tokenizer.ggml.tokens", _ARR, _arr(_STR, ["a", "b", "c", "d"]))
BAD_METADATA = {
    "token_type-string": (
        [TOKENS, ("tokenizer.ggml.token_type", _STR, _s("1,1,1,1"))],
        "tokenizer.ggml.token_type is a GGUF string, expected an array of integers",
    ),
    "token_type-strings": (
        [TOKENS, ("tokenizer.ggml.token_type", _ARR, _arr(_STR, ["1"] * 4))],
        "tokenizer.ggml.token_type is a GGUF array of string, expected an array of integers",
    ),
    "token_type-floats": (
        [TOKENS, ("tokenizer.ggml.token_type", _ARR, _arr(_F32, [1.0] * 4))],
        "expected an array of integers",
    ),
    "token_type-short": (
        [TOKENS, ("tokenizer.ggml.token_type", _ARR, _arr(_I32, [1] * 3))],
        "tokenizer.ggml.token_type has 3 entries but tokenizer.ggml.tokens has 4",
    ),
    "tokens-string": (
        [("tokenizer.ggml.tokens", _STR, _s("abcd"))],
        "tokenizer.ggml.tokens is a GGUF string, expected an array of strings",
    ),
    "tokens-ints": (
        [("tokenizer.ggml.tokens", _ARR, _arr(_U32, [1, 2, 3, 4]))],
        "tokenizer.ggml.tokens is a GGUF array of u32, expected an array of strings",
    ),
    "tokens-nested": (
        [("tokenizer.ggml.tokens", _ARR, struct.pack("<IQ", _ARR, 0))],
        "tokenizer.ggml.tokens is a GGUF array of array",
    ),
    "scores-strings": (
        [TOKENS, ("tokenizer.ggml.scores", _ARR, _arr(_STR, ["0"] * 4))],
        "tokenizer.ggml.scores is a GGUF array of string, expected an array of numbers",
    ),
    "scores-long": (
        [TOKENS, ("tokenizer.ggml.scores", _ARR, _arr(_F32, [0.0] * 5))],
        "tokenizer.ggml.scores has 5 entries but tokenizer.ggml.tokens has 4",
    ),
    "merges-ints": (
        [("tokenizer.ggml.merges", _ARR, _arr(_I32, [1, 2]))],
        "tokenizer.ggml.merges is a GGUF array of i32, expected an array of strings",
    ),
    "model-strings": (
        [("tokenizer.ggml.model", _ARR, _arr(_STR, ["gpt2"]))],
        "tokenizer.ggml.model is a GGUF array of string, expected a string",
    ),
    "bos-string": (
        [("tokenizer.ggml.bos_token_id", _STR, _s("1"))],
        "tokenizer.ggml.bos_token_id is a GGUF string, expected a non-negative integer",
    ),
    "architecture-u32": (
        [("general.architecture", _U32, struct.pack("<I", 7))],
        "general.architecture is a GGUF u32, expected a string",
    ),
    "embedding_length-string": (
        [("llama.embedding_length", _STR, _s("8"))],
        "llama.embedding_length is a GGUF string, expected a positive integer",
    ),
    "embedding_length-zero": (
        [("llama.embedding_length", _U32, struct.pack("<I", 0))],
        "llama.embedding_length is 0, expected a positive integer",
    ),
    "block_count-float": (
        [("llama.block_count", _F32, struct.pack("<f", 2.0))],
        "llama.block_count is a GGUF f32, expected a positive integer",
    ),
    "head_count-strings": (
        [("llama.attention.head_count", _ARR, _arr(_STR, ["2"]))],
        "expected a positive integer or an array of integers",
    ),
    "alignment-float": (
        [("general.alignment", _F32, struct.pack("<f", 32.0))],
        "general.alignment is a GGUF f32, expected a positive integer",
    ),
}


def _gguf_with(kvs: list) -> bytes:
    from tests.hostile._util import gguf_bytes

    head = np.ones((4, 8), dtype=np.float32)
    return gguf_bytes(
        kvs=[("general.architecture", _STR, _s("llama")), *kvs],
        tensors=[("output.weight", [8, 4], 0, 0)],
        data=head.tobytes(),
    )


def test_the_gguf_fixture_with_good_metadata_is_read(runner, tmp_path):
    types = ("tokenizer.ggml.token_type", _ARR, _arr(_I32, [1, 1, 3, 1]))
    scores = ("tokenizer.ggml.scores", _ARR, _arr(_F32, [0.0, -1.0, -2.0, -3.0]))
    sizes = [("llama.embedding_length", _U32, struct.pack("<I", 8)), ("general.alignment", _U32, struct.pack("<I", 32))]
    model = tmp_path / "m.gguf"
    model.write_bytes(_gguf_with([TOKENS, types, scores, *sizes]))
    fitted = runner.invoke(app, ["fit", "-q", "-m", str(model), "--rank", "1", "-o", str(tmp_path / "f.safetensors")])
    assert fitted.exit_code == 0, fitted.stderr
    shown = runner.invoke(app, ["inspect", "directions", "-m", str(model), "--band", "0:1", "--top", "2", "--json"])
    assert shown.exit_code == 0, shown.stderr


@pytest.mark.parametrize("case", sorted(BAD_METADATA))
def test_gguf_metadata_of_the_wrong_type_gives_one_line_everywhere(runner, tmp_path, monkeypatch, case):
    import embfilter_cli.model.gguf_convert as gguf_convert

    kvs, match = BAD_METADATA[case]
    model = tmp_path / "models" / "m.gguf"
    model.parent.mkdir()
    model.write_bytes(_gguf_with(kvs))
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("existing")
    before, models = Snapshot(out), Snapshot(model.parent)
    # The header is refused before transformers' GGUF loader ever reads it.
    monkeypatch.setattr(
        "transformers.AutoTokenizer.from_pretrained", lambda *a, **k: pytest.fail("transformers reached")
    )
    runs = {
        "fit": ["fit", "-q", "-m", str(model), "--rank", "1", "-o", str(out / "f.safetensors")],
        "inspect directions": ["inspect", "directions", "-q", "-m", str(model), "--band", "0:1"],
        "embed --no-cache": [
            "embed",
            "-q",
            "-m",
            str(model),
            "--no-cache",
            "-o",
            str(out / "e.npy"),
            str(out / "keep.txt"),
        ],
    }
    for what, args in runs.items():
        line = expect_error(runner.invoke(app, args), 1, match)
        assert str(model) in line, (what, line)
    # The cached conversion refuses it too, before transformers, and leaves nothing in the cache.
    with pytest.raises(Exception, match="corrupt GGUF header") as caught:
        gguf_convert.converted_folder(model, tmp_path / "cache")
    assert type(caught.value).__name__ == "CorruptGGUF" and match in str(caught.value)
    assert not [p for p in (tmp_path / "cache").rglob("*") if p.is_dir() and p.name.endswith(".tmp")]
    before.assert_unchanged()
    models.assert_unchanged()


def _big_endian_gguf(token_field: bytes) -> bytes:
    """A big-endian v3 GGUF (read through gguf.GGUFReader, the fallback) with a 4×8 F32 head."""

    def s(text: str) -> bytes:
        return struct.pack(">Q", len(text)) + text.encode()

    kvs = s("general.architecture") + struct.pack(">I", _STR) + s("llama")
    kvs += s("tokenizer.ggml.tokens") + token_field
    tensor = s("output.weight") + struct.pack(">I", 2) + struct.pack(">QQ", 8, 4) + struct.pack(">IQ", 0, 0)
    out = b"GGUF" + struct.pack(">IQQ", 3, 1, 2) + kvs + tensor
    out += b"\0" * (-len(out) % 32)
    return out + np.ones((4, 8), dtype=">f4").tobytes()


def test_the_fallback_gguf_reader_checks_the_same_types(runner, tmp_path):
    good = tmp_path / "good.gguf"
    good.write_bytes(
        _big_endian_gguf(
            struct.pack(">IIQ", _ARR, _STR, 4) + b"".join(struct.pack(">Q", 1) + c for c in [b"a", b"b", b"c", b"d"])
        )
    )
    fitted = runner.invoke(app, ["fit", "-q", "-m", str(good), "--rank", "1", "-o", str(tmp_path / "f.safetensors")])
    assert fitted.exit_code == 0, fitted.stderr  # the big-endian fixture is readable
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(_big_endian_gguf(struct.pack(">I", _STR) + struct.pack(">Q", 4) + b"abcd"))
    match = "tokenizer.ggml.tokens is a GGUF string, expected an array of strings"
    before = Snapshot(tmp_path)
    expect_error(
        runner.invoke(app, ["fit", "-q", "-m", str(bad), "--rank", "1", "-o", str(tmp_path / "g.safetensors")]),
        1,
        match,
    )
    expect_error(runner.invoke(app, ["inspect", "directions", "-q", "-m", str(bad), "--band", "0:1"]), 1, match)
    before.assert_unchanged()


# --------------------------------------------------------------------------- FIFOs named like model files

ROOT = Path(__file__).resolve().parents[2]


def _model_copy(tiny_llama: Path, where: Path, fifo: str) -> Path:
    """A copy of the tiny Llama folder with `fifo` replaced by a named pipe nobody writes to."""
    folder = where / f"model-{fifo.replace('.', '-')}"
    shutil.copytree(tiny_llama, folder)
    (folder / fifo).unlink(missing_ok=True)
    os.mkfifo(folder / fifo)
    return folder


def test_fifos_named_like_model_files_are_refused_without_blocking(tiny_llama, tmp_path):
    """Every command that reads a model refuses a FIFO quickly; run in subprocesses, so a hang fails."""
    import subprocess
    import sys

    lone = tmp_path / "lone"
    lone.mkdir()
    for name in ("model.safetensors", "model.gguf"):
        os.mkfifo(lone / name)
    texts = tmp_path / "texts.txt"
    texts.write_text("hello\n")
    tsv = tmp_path / "pairs.tsv"
    tsv.write_text("".join(f"{a}\t{b}\t{s}\n" for a, b, s in PAIRS))
    out = tmp_path / "out"
    out.mkdir()
    folders = {
        name: _model_copy(tiny_llama, tmp_path, name) for name in ("model.safetensors", "config.json", "tokenizer.json")
    }
    fit = ["fit", "-q", "--rank", "1", "-o", str(out / "f.safetensors"), "-m"]
    embed = ["embed", "-q", "--device", "cpu", "--no-cache", "-o", str(out / "e.npy"), str(texts), "-m"]
    runs = {
        "fit lone safetensors": [*fit, str(lone / "model.safetensors")],
        "fit lone gguf": [*fit, str(lone / "model.gguf")],
        "fit folder weights": [*fit, str(folders["model.safetensors"])],
        "fit folder config": [*fit, str(folders["config.json"])],
        "inspect tokenizer": ["inspect", "directions", "-q", "--band", "0:1", "-m", str(folders["tokenizer.json"])],
        "embed lone gguf": [*embed, str(lone / "model.gguf")],
        "embed config": [*embed, str(folders["config.json"])],
        "embed tokenizer": [*embed, str(folders["tokenizer.json"])],
        "eval tokenizer": [
            "eval",
            "-q",
            "--device",
            "cpu",
            "--no-cache",
            "--data",
            str(tsv),
            "-m",
            str(folders["tokenizer.json"]),
        ],
    }
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("EMBFILTER_DEBUG", None)
    before = Snapshot(out)
    procs = {
        what: subprocess.Popen(
            [sys.executable, "-m", "embfilter_cli", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env,
            text=True,
        )
        for what, args in runs.items()
    }
    failures = []
    for what, proc in procs.items():
        try:
            stdout, stderr = proc.communicate(timeout=90)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
            failures.append(f"{what}: still running after 90 s (blocked on the FIFO?)")
            continue
        lines = stderr.strip().splitlines()
        ok = proc.returncode == 1 and len(lines) == 1 and lines[0].startswith("Error:") and stdout == ""
        if not ok or "not a regular file" not in lines[-1]:
            failures.append(f"{what}: exit {proc.returncode}, stderr {stderr[-400:]!r}")
    assert not failures, "\n".join(failures)
    before.assert_unchanged()
