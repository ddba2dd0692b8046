"""Vocabulary loading and token rendering (`embfilter_cli.text.tokens`)."""

import json
import sys

import numpy as np
import pytest

from embfilter_cli.errors import MissingDependencyError, ModelNotFoundError
from embfilter_cli.text.tokens import (
    Vocabulary,
    bytes_to_unicode,
    decode_bytes,
    english_zipf,
    load_vocabulary,
    load_vocabulary_from_folder,
    read_gguf_tokenizer_fields,
    visible,
)


def _bl(raw: bytes) -> str:
    """The byte-level BPE piece that stands for `raw`."""
    table = bytes_to_unicode()
    return "".join(table[b] for b in raw)


def test_byte_table_is_a_bijection_with_gpt2_landmarks():
    table = bytes_to_unicode()
    assert len(table) == 256 and len(set(table.values())) == 256
    assert table[ord(" ")] == "Ġ" and table[ord("\n")] == "Ċ" and table[ord("\t")] == "ĉ"
    assert table[ord("A")] == "A" and table[0xE9] == "é"


BYTE_LEVEL_CASES = [
    ("Ġthe", "·the"),  # leading space
    ("ĠĠĠĠ", "····"),
    ("Ċ", "⏎"),
    ("ĊĊĠ", "⏎⏎·"),
    (_bl(b"\t"), "\\t"),
    (_bl(b"\r\n"), "\\r⏎"),
    (_bl(b"\x00"), "\\x00"),
    (_bl(b"\x1b[0m"), "\\x1b[0m"),  # an ANSI escape must not reach the terminal
    (_bl("é".encode()), "é"),  # a two-byte character decoded
    (_bl(b"\xc3"), "\\xc3"),  # half of it: a byte token
    (_bl(b" \xe2\x80"), "·\\xe2\\x80"),  # two of three bytes of '’'
    (_bl("\u200b".encode()), "\\u200b"),  # zero-width space
    (_bl("\u00a0".encode()), "\\xa0"),  # no-break space
    (_bl("日本".encode()), "日本"),
]


@pytest.mark.parametrize("piece, shown", BYTE_LEVEL_CASES)
def test_byte_level_rendering(piece, shown):
    vocab = Vocabulary([piece], "byte_level")
    assert vocab.display(0) == shown


SENTENCEPIECE_CASES = [
    ("▁the", "·the", "the"),
    ("▁▁", "··", None),
    ("<0x0A>", "⏎", None),
    ("<0x09>", "\\t", None),
    ("<0xE2>", "\\xe2", None),  # a lone byte of a multi-byte character
    ("ing", "ing", "ing"),
    ("▁Ünïcode", "·Ünïcode", "Ünïcode"),
]


@pytest.mark.parametrize("piece, shown, word", SENTENCEPIECE_CASES)
def test_sentencepiece_rendering_and_words(piece, shown, word):
    vocab = Vocabulary([piece], "sentencepiece")
    assert vocab.display(0) == shown
    assert vocab.word(0) == word


def test_special_unknown_and_added_tokens():
    vocab = Vocabulary(["<|endoftext|>", "Ġthe", "<tool call>", None], "byte_level", special={0})
    assert vocab.display(0) == "<|endoftext|>" and vocab.word(0) is None
    assert vocab.display(2) == "<tool·call>"  # not in the byte table: shown as written, space visible
    assert vocab.display(3) == "<id 3>" and vocab.display(99) == "<id 99>"
    assert vocab.piece(-1) is None and vocab.word(99) is None


@pytest.mark.parametrize(
    "piece, word",
    [
        ("Ġthe", "the"),
        ("the", "the"),
        (",", None),
        ("Ġ123", None),
        ("Ġ", None),
        ("Ċ", None),
        (_bl(b"\xc3"), None),
        (_bl(" café".encode()), "café"),
        ("ĠU.S", "U.S"),
    ],
)
def test_word_form_for_frequency_lookup(piece, word):
    assert Vocabulary([piece], "byte_level").word(0) == word


def test_wordpiece_continuation_is_stripped_for_lookup():
    vocab = Vocabulary(["##ing", "[CLS]"], "plain", special={1})
    assert vocab.display(0) == "##ing" and vocab.word(0) == "ing" and vocab.word(1) is None


def test_visible_and_decode_bytes():
    assert visible("a b\nc\x7f") == "a·b⏎c\\x7f"
    assert decode_bytes(b"ok") == ("ok", True)
    assert decode_bytes(b"a\xffb\xc3") == ("a\\xffb\\xc3", False)


def test_tokenizer_json_matches_the_tokenizers_decoder(tmp_path):
    """Reference: every id's rendering equals the visible form of the real byte-level decoder."""
    from tests.tiny_models import tiny_tokenizer

    tok = tiny_tokenizer()
    tok.save_pretrained(tmp_path)
    vocab = load_vocabulary_from_folder(tmp_path)
    assert vocab is not None and vocab.scheme == "byte_level" and len(vocab) == len(tok)
    assert vocab.special == {0, 1, 2, 3}
    checked = 0
    for i in range(4, len(tok)):
        assert vocab.piece(i) == tok.convert_ids_to_tokens(i)
        decoded = tok.decode([i])
        if "\ufffd" not in decoded:
            assert vocab.display(i) == visible(decoded), i
            checked += 1
        else:  # a byte that is not valid UTF-8 on its own: escaped, never a replacement character
            assert "\\x" in vocab.display(i) and "\ufffd" not in vocab.display(i)
    assert checked > 150


def test_vocab_json_and_unigram_tokenizer_json(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "vocab.json").write_text(json.dumps({"Ġthe": 0, "cat": 1}))
    (tmp_path / "a" / "added_tokens.json").write_text(json.dumps({"<pad>": 3}))
    vocab = load_vocabulary_from_folder(tmp_path / "a")
    assert vocab.scheme == "byte_level" and vocab.pieces == ["Ġthe", "cat", None, "<pad>"] and vocab.special == {3}
    (tmp_path / "b").mkdir()
    spec = {
        "model": {"type": "Unigram", "vocab": [["<unk>", 0.0], ["▁the", -1.0], ["<0x0A>", -2.0]]},
        "added_tokens": [{"id": 0, "content": "<unk>", "special": True}],
        "pre_tokenizer": {"type": "Metaspace", "replacement": "▁"},
        "decoder": None,
    }
    (tmp_path / "b" / "tokenizer.json").write_text(json.dumps(spec))
    vocab = load_vocabulary_from_folder(tmp_path / "b")
    assert vocab.scheme == "sentencepiece" and [vocab.display(i) for i in range(3)] == ["<unk>", "·the", "⏎"]


def test_folder_without_tokenizer_and_broken_json(tmp_path):
    assert load_vocabulary_from_folder(tmp_path) is None
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(ModelNotFoundError, match=r"tokenizer\.json is not valid JSON"):
        load_vocabulary_from_folder(tmp_path)


def _write_gguf(path, tokens, types, model="gpt2"):
    from gguf import GGUFWriter

    writer = GGUFWriter(str(path), "llama")
    writer.add_block_count(1)
    writer.add_tokenizer_model(model)
    writer.add_token_list(tokens)
    writer.add_token_merges(["Ġ t", "h e"])
    writer.add_token_types(types)
    writer.add_float32("some.float", 1.5)
    writer.add_array("some.ints", [1, 2, 3])
    writer.add_tensor("token_embd.weight", np.zeros((len(tokens), 4), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_gguf_vocabulary_fast_reader_agrees_with_gguf_reader(tmp_path, monkeypatch):
    from embfilter_cli.model.location import ModelLocation
    from embfilter_cli.text import tokens as tokens_mod

    pieces = ["<|endoftext|>", "Ġthe", "Ċ", "caf" + bytes_to_unicode()[0xC3] + bytes_to_unicode()[0xA9], "ñ"]
    path = _write_gguf(tmp_path / "t.gguf", pieces, [3, 1, 1, 1, 6])
    fast = read_gguf_tokenizer_fields(path)
    slow = tokens_mod._gguf_fields_via_reader(path)
    assert fast["tokenizer.ggml.tokens"] == slow["tokenizer.ggml.tokens"] == pieces
    assert fast["tokenizer.ggml.model"] == slow["tokenizer.ggml.model"] == "gpt2"
    assert list(fast["tokenizer.ggml.token_type"]) == slow["tokenizer.ggml.token_type"] == [3, 1, 1, 1, 6]
    loc = ModelLocation("", "gguf_file", path, str(path), "local")
    vocab = load_vocabulary(loc)
    assert vocab.scheme == "byte_level" and vocab.special == {0}
    assert [vocab.display(i) for i in range(4)] == ["<|endoftext|>", "·the", "⏎", "café"]
    # When the direct reader gives up, the gguf package's reader gives the same vocabulary.
    monkeypatch.setattr(tokens_mod, "read_gguf_tokenizer_fields", lambda p: None)
    assert load_vocabulary(loc).pieces == pieces


def test_gguf_sentencepiece_model_and_missing_token_list(tmp_path):
    from embfilter_cli.model.location import ModelLocation
    from tests.tiny_models import make_gguf

    path = _write_gguf(tmp_path / "sp.gguf", ["<unk>", "▁the", "<0x0A>"], [2, 1, 6], model="llama")
    vocab = load_vocabulary(ModelLocation("", "gguf_file", path, str(path), "local"))
    assert vocab.scheme == "sentencepiece" and [vocab.display(i) for i in range(3)] == ["<unk>", "·the", "⏎"]
    plain, _ = make_gguf(tmp_path / "p.gguf", rows=8, hidden=32, tokens=8)
    vocab = load_vocabulary(ModelLocation("", "gguf_file", plain, str(plain), "local"))
    assert vocab.pieces == [f"tok{i}" for i in range(8)] and vocab.scheme == "plain"
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF\x03\x00\x00\x00" + b"\x00" * 4)
    with pytest.raises(ModelNotFoundError, match=r"not a readable GGUF file|too short to be a GGUF file"):
        load_vocabulary(ModelLocation("", "gguf_file", bad, str(bad), "local"))


def test_single_weights_file_uses_tokenizer_beside_it(tmp_path):
    from embfilter_cli.model.location import ModelLocation

    (tmp_path / "vocab.json").write_text(json.dumps({"Ġa": 0}))
    loc = ModelLocation("", "safetensors_file", tmp_path / "w.safetensors", "x", "local")
    assert load_vocabulary(loc).display(0) == "·a"


def test_english_zipf_and_missing_wordfreq(monkeypatch):
    zipf = english_zipf()
    assert zipf("the") > 7 > zipf("cat") > 3 > zipf("xqzvkw") == 0.0
    monkeypatch.setitem(sys.modules, "wordfreq", None)
    with pytest.raises(MissingDependencyError, match=r"pip install 'embfilter\[eval\]'"):
        english_zipf()
