"""A model's vocabulary as printable strings, read from the tokenizer files without transformers.

Sources, in order: a folder's `tokenizer.json` (any `tokenizers` model: BPE/WordPiece vocab dict
or Unigram list, plus `added_tokens`), a GPT-2 style `vocab.json` (+ `added_tokens.json`), the
`tokenizer.ggml.tokens` array of a GGUF file (via the `gguf` package). Only when none of these
exists (e.g. a folder with a bare sentencepiece `tokenizer.model`) is transformers' tokenizer
loaded as a fallback.

Rendering (`Vocabulary.display`): byte-level BPE pieces (`Ġthe`) are mapped back to bytes with
GPT-2's byte↔unicode table and decoded as UTF-8; sentencepiece pieces turn `▁` into a space and
`<0xNN>` into that byte. Then whitespace is made visible — space `·`, newline `⏎` — and every other
control/invisible character is escaped (`\\t`, `\\x00`, `\\u200b`); bytes that are not complete
UTF-8 (a lone byte token, half a multi-byte character) are shown as `\\xNN`.

Not handled: normalizers that rewrite text before tokenization (their effect is not undone),
tokenizers whose pieces need a model-specific decoder beyond byte-level / sentencepiece
(e.g. CTC or character-level decoders), and ambiguity between a literal `·`/`\\` in a token and
the markers above.
"""

from __future__ import annotations

import json
import re
import struct
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from embfilter_cli.errors import MissingDependencyError, ModelNotFoundError
from embfilter_cli.jsonable import loads as json_loads

if TYPE_CHECKING:
    from embfilter_cli.model.location import ModelLocation

Scheme = Literal["byte_level", "sentencepiece", "plain"]

SPACE_MARK = "·"
NEWLINE_MARK = "⏎"
_SP_BYTE = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")
WORDFREQ_INSTALL = "pip install 'embfilter[eval]'  (or: pip install wordfreq)"


@lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character table used by byte-level BPE."""
    printable = (
        list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    )
    chars = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            chars.append(256 + extra)  # bytes without a printable glyph are shifted past Latin-1
            extra += 1
    return {b: chr(c) for b, c in zip(printable, chars)}


@lru_cache(maxsize=1)
def _unicode_to_bytes() -> dict[str, int]:
    return {c: b for b, c in bytes_to_unicode().items()}


def piece_bytes(piece: str, scheme: Scheme) -> bytes | None:
    """The bytes a vocabulary piece stands for, or None when it is not a piece of that scheme.

    A byte-level piece must consist only of characters of the byte table (added tokens such as
    `<|endoftext|>` do not, and stay None); sentencepiece and plain pieces always map.
    """
    if scheme == "byte_level":
        table = _unicode_to_bytes()
        try:
            return bytes(table[ch] for ch in piece)
        except KeyError:
            return None
    if scheme == "sentencepiece":
        match = _SP_BYTE.match(piece)
        if match:
            return bytes([int(match.group(1), 16)])
        return piece.replace("▁", " ").encode("utf-8")
    return piece.encode("utf-8")


def _escape_char(ch: str) -> str:
    """Visible form of one character: markers for space/newline, escapes for the invisible."""
    if ch == " ":
        return SPACE_MARK
    if ch == "\n":
        return NEWLINE_MARK
    if ch == "\t":
        return "\\t"
    if ch == "\r":
        return "\\r"
    category = unicodedata.category(ch)
    # Cc control, Cf format (zero-width, BOM), Zl/Zp separators, Zs other than the plain space,
    # Co/Cs/Cn private/surrogate/unassigned: all print as nothing or confuse a terminal.
    if category in {"Cc", "Cf", "Zl", "Zp", "Zs", "Co", "Cs", "Cn"}:
        code = ord(ch)
        return f"\\x{code:02x}" if code < 0x100 else (f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}")
    return ch


def visible(text: str) -> str:
    """Make whitespace visible and escape control characters (see module docstring)."""
    return "".join(_escape_char(ch) for ch in text)


def decode_bytes(raw: bytes) -> tuple[str, bool]:
    """UTF-8 decode keeping invalid bytes as `\\xNN`; returns (visible text, complete)."""
    try:
        return visible(raw.decode("utf-8")), True
    except UnicodeDecodeError:
        pass
    # Decode valid runs normally and escape each invalid byte; escapes must not be re-escaped.
    parts: list[str] = []
    rest = raw
    while rest:
        try:
            parts.append(visible(rest.decode("utf-8")))
            break
        except UnicodeDecodeError as exc:
            parts.append(visible(rest[: exc.start].decode("utf-8")))
            parts.extend(f"\\x{b:02x}" for b in rest[exc.start : exc.end])
            rest = rest[exc.end :]
    return "".join(parts), False


@dataclass
class Vocabulary:
    """Token id -> piece, how pieces encode text, and which ids are special/added tokens."""

    pieces: list[str | None]  # index = token id; None where the tokenizer defines no token
    scheme: Scheme
    special: set[int] = field(default_factory=set)
    source: str = ""

    def __len__(self) -> int:
        return len(self.pieces)

    def piece(self, token_id: int) -> str | None:
        """The raw vocabulary piece of `token_id`, or None for an id outside the vocabulary."""
        return self.pieces[token_id] if 0 <= token_id < len(self.pieces) else None

    def text(self, token_id: int) -> tuple[str | None, bool]:
        """(decoded text, complete) of a token; text None for special or unknown ids."""
        piece = self.piece(token_id)
        if piece is None or token_id in self.special:
            return None, False
        raw = piece_bytes(piece, self.scheme)
        if raw is None:
            return None, False
        try:
            return raw.decode("utf-8"), True
        except UnicodeDecodeError:
            return None, False

    def display(self, token_id: int) -> str:
        """What to print for a token id (see module docstring)."""
        piece = self.piece(token_id)
        if piece is None:
            return f"<id {token_id}>"
        if token_id in self.special:
            return visible(piece)
        raw = piece_bytes(piece, self.scheme)
        if raw is None:  # an added token outside the byte table: print it as written
            return visible(piece)
        return decode_bytes(raw)[0]

    def word(self, token_id: int) -> str | None:
        """The dictionary form to look up for a word frequency, or None for a non-word.

        The leading-space marker (and WordPiece's `##`) is stripped; special tokens, partial
        UTF-8 and tokens without a letter (punctuation, digits, whitespace) are non-words.
        """
        text, complete = self.text(token_id)
        if text is None or not complete:
            return None
        word = text.strip()
        if self.scheme == "plain" and word.startswith("##"):
            word = word[2:]
        if not word or not any(unicodedata.category(ch).startswith("L") for ch in word):
            return None
        return word


# --------------------------------------------------------------------------- loading


def _scheme_from_tokenizer_json(data: dict) -> Scheme:
    """Byte-level if a ByteLevel pre-tokenizer/decoder is present, sentencepiece if `▁` is used."""
    model = data.get("model") or {}
    parts = json.dumps([data.get("pre_tokenizer"), data.get("decoder")], ensure_ascii=False)
    if '"ByteLevel"' in parts:
        return "byte_level"
    if "Metaspace" in parts or "▁" in parts or model.get("type") == "Unigram":
        return "sentencepiece"
    return "plain"


def _from_tokenizer_json(path: Path) -> Vocabulary:
    try:
        data = json_loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelNotFoundError(f"{path} is not valid JSON ({exc}); re-download the tokenizer files") from exc
    model = data.get("model") or {}
    vocab = model.get("vocab")
    by_id: dict[int, str] = {}
    if isinstance(vocab, dict):
        by_id.update({int(i): piece for piece, i in vocab.items()})
    elif isinstance(vocab, list):  # Unigram: [[piece, score], ...] in id order
        by_id.update({i: entry[0] for i, entry in enumerate(vocab)})
    special: set[int] = set()
    for added in data.get("added_tokens", []):
        by_id[int(added["id"])] = added["content"]
        special.add(int(added["id"]))
    return _assemble(by_id, _scheme_from_tokenizer_json(data), special, str(path))


def _from_vocab_json(folder: Path) -> Vocabulary:
    vocab = json_loads((folder / "vocab.json").read_text(encoding="utf-8"))
    by_id = {int(i): piece for piece, i in vocab.items()}
    special: set[int] = set()
    added = folder / "added_tokens.json"
    if added.exists():
        for piece, i in json_loads(added.read_text(encoding="utf-8")).items():
            by_id[int(i)] = piece
            special.add(int(i))
    # A bare vocab.json is the GPT-2 family's slow-tokenizer format, which is byte-level BPE.
    return _assemble(by_id, "byte_level", special, str(folder / "vocab.json"))


# The GGUF keys a vocabulary needs (read by gguf_header.read_header, which stops once it has them).
_GGUF_WANTED = frozenset({"tokenizer.ggml.tokens", "tokenizer.ggml.model", "tokenizer.ggml.token_type"})


def read_gguf_tokenizer_fields(path: Path) -> dict[str, object] | None:
    """The tokenizer's token list, model name and token types from a GGUF header, read directly.

    Uses `gguf_header.read_header`, which stops once the three wanted keys are found (seconds
    faster than `gguf.GGUFReader`). Returns None for layouts it does not read (big-endian or v1
    files, unknown value types), and the caller falls back to GGUFReader.
    """
    from embfilter_cli.model.gguf_header import UnsupportedGGUF, read_header

    try:
        header = read_header(path, wanted=_GGUF_WANTED, tensors=False)
    except UnsupportedGGUF:
        return None
    fields = dict(header.fields)
    types = fields.get("tokenizer.ggml.token_type")
    if types is not None:
        fields["tokenizer.ggml.token_type"] = types.astype("int64")  # type: ignore[attr-defined]
    return fields


def _from_gguf(path: Path) -> Vocabulary:
    try:
        fields = read_gguf_tokenizer_fields(path)
    except (struct.error, ValueError, OSError):
        fields = None
    if fields is None or "tokenizer.ggml.tokens" not in fields:
        fields = _gguf_fields_via_reader(path)
    tokens = fields.get("tokenizer.ggml.tokens")
    if tokens is None:
        raise ModelNotFoundError(
            f"{path} has no tokenizer.ggml.tokens array; use a GGUF file that embeds its tokenizer"
        )
    pieces: list[str | None] = list(tokens)  # type: ignore[call-overload]
    model = str(fields.get("tokenizer.ggml.model") or "")
    schemes: dict[str, Scheme] = {"gpt2": "byte_level", "llama": "sentencepiece", "t5": "sentencepiece"}
    scheme = schemes.get(model, "plain")
    special: set[int] = set()
    types = fields.get("tokenizer.ggml.token_type")
    if types is not None:
        # llama.cpp token types: 1 normal, 2 unknown, 3 control, 4 user-defined, 5 unused, 6 byte.
        special = {i for i, t in enumerate(types) if int(t) in (2, 3, 4, 5)}  # type: ignore[arg-type,var-annotated]
    return Vocabulary(pieces, scheme, special, str(path))


def _gguf_fields_via_reader(path: Path) -> dict[str, object]:
    """The same fields as `read_gguf_tokenizer_fields`, through the gguf package's full reader."""
    from gguf import GGUFReader

    try:
        reader = GGUFReader(str(path))
    except Exception as exc:
        raise ModelNotFoundError(
            f"{path} is not a readable GGUF file ({type(exc).__name__}: {exc}); re-download it"
        ) from exc
    from embfilter_cli.model.gguf_header import check_reader_fields

    check_reader_fields(reader, path)
    out: dict[str, object] = {}
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    if tokens is not None:
        out["tokenizer.ggml.tokens"] = [bytes(tokens.parts[i]).decode("utf-8", errors="replace") for i in tokens.data]
    model = reader.fields.get("tokenizer.ggml.model")
    if model is not None:
        out["tokenizer.ggml.model"] = bytes(model.parts[model.data[0]]).decode("utf-8", errors="replace")
    types = reader.fields.get("tokenizer.ggml.token_type")
    if types is not None:
        out["tokenizer.ggml.token_type"] = [int(types.parts[i][0]) for i in types.data]
    return out


def _from_transformers(folder: Path) -> Vocabulary:
    try:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(folder))
    except Exception as exc:
        raise ModelNotFoundError(
            f"cannot read the tokenizer in {folder} ({type(exc).__name__}: {exc}); it needs tokenizer.json, "
            "vocab.json or a tokenizer transformers can load"
        ) from exc
    ids = list(range(len(tok)))
    pieces: list[str | None] = list(tok.convert_ids_to_tokens(ids))
    special = set(getattr(tok, "all_special_ids", []))
    scheme: Scheme = "sentencepiece" if any(p and p.startswith("▁") for p in pieces[:2000]) else "plain"
    if any(p and p.startswith("Ġ") for p in pieces[:2000]):
        scheme = "byte_level"
    return Vocabulary(pieces, scheme, special, str(folder))


def _assemble(by_id: dict[int, str], scheme: Scheme, special: set[int], source: str) -> Vocabulary:
    size = max(by_id) + 1 if by_id else 0
    pieces: list[str | None] = [None] * size
    for i, piece in by_id.items():
        pieces[i] = piece
    return Vocabulary(pieces, scheme, special, source)


def load_vocabulary_from_folder(folder: Path) -> Vocabulary | None:
    """The vocabulary of a tokenizer folder, or None when it holds no tokenizer files at all."""
    if (folder / "tokenizer.json").exists():
        return _from_tokenizer_json(folder / "tokenizer.json")
    if (folder / "vocab.json").exists():
        return _from_vocab_json(folder)
    if (folder / "tokenizer.model").exists() or (folder / "tokenizer_config.json").exists():
        return _from_transformers(folder)
    return None


def load_vocabulary(location: ModelLocation) -> Vocabulary | None:
    """The vocabulary for a resolved model (`locate.ModelLocation`), or None when none is found.

    A single weights file looks for tokenizer files in its own folder.
    """
    if location.kind == "gguf_file":
        return _from_gguf(Path(location.path))
    folder = Path(location.path)
    if location.kind != "hf_folder":
        folder = folder.parent
    return load_vocabulary_from_folder(folder)


# --------------------------------------------------------------------------- word frequency


def english_zipf() -> Callable[[str], float]:
    """A Zipf-frequency lookup for English words (wordfreq, offline; 0.0 for unknown words)."""
    try:
        from wordfreq import zipf_frequency
    except ImportError as exc:
        raise MissingDependencyError(f"word frequencies need the wordfreq package; run `{WORDFREQ_INSTALL}`") from exc

    cache: dict[str, float] = {}

    def lookup(word: str) -> float:
        if word not in cache:
            cache[word] = float(zipf_frequency(word, "en"))
        return cache[word]

    return lookup
