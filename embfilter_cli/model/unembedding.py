"""Read ONLY the unembedding matrix W_U (vocab × hidden) from a checkpoint, and fingerprint it.

The model is never built. Safetensors tensors are memory-mapped straight from the file (bf16 is
viewed, not converted), `.bin` files go through `torch.load(weights_only=True, mmap=True)`, GGUF
tensors are dequantized with the `gguf` package. The SHA-256 covers the tensor's exact stored
bytes (quantized bytes for GGUF), so a filter can later be matched to the model it came from.

Which tensor: a head (`lm_head.weight`, `embed_out.weight`, GGUF `output.weight`) when present,
else, for tied models, the input embedding table. `tensor_name` overrides; an unresolvable
layout is an error that lists the names seen.

Not handled: tensors split across shards or ranks, quantization formats other than those the
`gguf` package dequantizes, int8/fp8 safetensors checkpoints.
"""

from __future__ import annotations

import hashlib
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from embfilter_cli.errors import BadTensorError, ModelNotFoundError, UnembeddingNotFoundError
from embfilter_cli.model.location import ModelLocation, read_json_object, read_weight_map, regular_file
from embfilter_cli.safetensors_header import (
    MAX_HEADER_BYTES,
    SafetensorsHeader,
    SafetensorsHeaderError,
    read_header,
)

HEAD_NAMES = ("lm_head.weight", "embed_out.weight", "output.weight")
TIED_NAMES = (
    "model.embed_tokens.weight",
    "transformer.wte.weight",
    "token_embd.weight",
    "gpt_neox.embed_in.weight",
    "model.decoder.embed_tokens.weight",
    "transformer.word_embeddings.weight",
    "model.language_model.embed_tokens.weight",
    "embed_tokens.weight",
    "wte.weight",
)
_SAFETENSORS_DTYPES: dict[str, tuple[np.dtype[Any], torch.dtype]] = {
    "F32": (np.dtype(np.float32), torch.float32),
    "F64": (np.dtype(np.float64), torch.float64),
    "F16": (np.dtype(np.float16), torch.float16),
    "BF16": (np.dtype(np.uint16), torch.bfloat16),  # numpy has no bf16: map as uint16, view in torch
}
_HASH_BLOCK = 8 << 20
_MAX_TOKEN_ID = 1 << 31  # token ids beyond this are corrupt (vocabularies are < 2**24)


@dataclass
class Unembedding:
    """W_U as read from disk plus the facts an artifact records about it."""

    matrix: torch.Tensor  # (rows, d): stored dtype, memory-mapped where possible; rows may exclude padding
    tensor_name: str
    sha256: str  # of the full tensor's stored bytes (padding rows included)
    stored_rows: int  # rows in the checkpoint
    stored_dtype: str
    tokenizer_vocab: int | None  # tokens the tokenizer can emit, when known
    tied: bool

    @property
    def vocab_size(self) -> int:
        """Rows of `matrix` (padding rows excluded where they were dropped)."""
        return int(self.matrix.shape[0])

    @property
    def hidden_size(self) -> int:
        """Columns of W_U: the model's hidden size."""
        return int(self.matrix.shape[1])


# --------------------------------------------------------------------------- tensor choice


def choose_unembedding(names: list[str], config: dict[str, Any], override: str | None, where: str) -> tuple[str, bool]:
    """Pick the unembedding tensor's name; returns (name, tied)."""
    if override:
        if override not in names:
            raise UnembeddingNotFoundError(
                f"--tensor {override!r} is not in {where}; tensors there include {_sample(names)}"
            )
        return override, override not in HEAD_NAMES
    present = set(names)
    for name in HEAD_NAMES:
        if name in present:
            return name, False
    suffixed = sorted(n for n in names if n.endswith(".lm_head.weight") or n.endswith(".embed_out.weight"))
    if len(suffixed) == 1:
        return suffixed[0], False
    tied_flag = config.get("tie_word_embeddings", config.get("text_config", {}).get("tie_word_embeddings"))
    for name in TIED_NAMES:
        if name in present:
            if tied_flag is False:
                raise UnembeddingNotFoundError(
                    f"{where} sets tie_word_embeddings=false but has no head tensor ({', '.join(HEAD_NAMES)}); "
                    f"pass --tensor NAME; tensors there include {_sample(names)}"
                )
            return name, True
    raise UnembeddingNotFoundError(
        f"cannot tell which tensor of {where} is the unembedding (looked for {', '.join(HEAD_NAMES)} and tied "
        f"input embeddings); pass --tensor NAME; tensors there include {_sample(names)}"
    )


def _sample(names: list[str], limit: int = 12) -> str:
    shown = sorted(names)[:limit]
    more = f" … (+{len(names) - limit} more)" if len(names) > limit else ""
    return ", ".join(shown) + more if shown else "(none)"


# --------------------------------------------------------------------------- safetensors


@dataclass
class _SafetensorsEntry:
    file: Path
    dtype: str
    shape: tuple[int, ...]
    begin: int  # absolute byte offset in the file
    end: int


def read_safetensors_header(path: Path) -> SafetensorsHeader:
    """Parse a checkpoint's safetensors header (the shared parser, with model-reader messages).

    Only structure is checked here: other tensors may use dtypes embfilter never reads, and the
    chosen tensor's dtype, shape and byte range are checked when it is mapped.
    """
    regular_file(path)
    size = path.stat().st_size
    try:
        with path.open("rb") as handle:
            return read_header(handle, max_length=min(size - 8, MAX_HEADER_BYTES), itemsizes=None)
    except OSError as exc:
        raise ModelNotFoundError(f"{path} could not be read ({exc.strerror or exc}); check the path") from None
    except SafetensorsHeaderError as exc:
        if exc.problem == "short":
            raise ModelNotFoundError(
                f"{path} is too short to be a safetensors file ({size} bytes); re-download it"
            ) from None
        if exc.problem == "length":
            raise ModelNotFoundError(
                f"{path} has a corrupt safetensors header (claims {exc.length} bytes); re-download it"
            ) from None
        if exc.problem == "json":
            raise ModelNotFoundError(
                f"{path} has an unreadable safetensors header ({exc.cause}); re-download it"
            ) from None
        if exc.problem == "metadata":
            raise ModelNotFoundError(
                f"{path} has a safetensors __metadata__ that is not an object of strings; re-download it"
            ) from None
        raise ModelNotFoundError(
            f"{path} has a malformed safetensors header entry {exc.names[0]!r}; re-download it"
        ) from None


def _safetensors_entries(files: list[Path]) -> dict[str, _SafetensorsEntry]:
    entries: dict[str, _SafetensorsEntry] = {}
    for file in files:
        header = read_safetensors_header(file)
        for e in header.entries:
            entries[e.name] = _SafetensorsEntry(
                file, e.dtype, e.shape, header.data_start + e.begin, header.data_start + e.end
            )
    return entries


def _file_range_sha256(path: Path, begin: int, end: int) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        handle.seek(begin)
        left = end - begin
        while left > 0:
            block = handle.read(min(_HASH_BLOCK, left))
            if not block:
                raise BadTensorError(
                    f"{path} ends {left} bytes before the tensor does; the file is truncated, re-download it"
                )
            digest.update(block)
            left -= len(block)
    return digest.hexdigest()


def _mmap_safetensors(entry: _SafetensorsEntry, name: str) -> torch.Tensor:
    if entry.dtype not in _SAFETENSORS_DTYPES:
        raise BadTensorError(
            f"{name} in {entry.file} is stored as {entry.dtype}; embfilter reads F32, F64, F16 and BF16 heads"
        )
    if len(entry.shape) != 2:
        raise BadTensorError(
            f"{name} in {entry.file} has shape {list(entry.shape)}; an unembedding must be 2-D (vocab, hidden)"
        )
    np_dtype, torch_dtype = _SAFETENSORS_DTYPES[entry.dtype]
    expected = int(np.prod(entry.shape)) * np_dtype.itemsize
    if entry.end - entry.begin != expected or entry.file.stat().st_size < entry.end:
        raise BadTensorError(f"{name} in {entry.file} is truncated or its header is wrong; re-download the file")
    mapped = np.memmap(entry.file, dtype=np_dtype, mode="r", offset=entry.begin, shape=entry.shape)
    tensor = readonly_tensor(mapped)
    return tensor.view(torch_dtype) if entry.dtype == "BF16" else tensor


# torch's UserWarning for torch.from_numpy on an array whose buffer cannot be written.
_NOT_WRITABLE = "The given NumPy array is not writable"


def readonly_tensor(array: np.ndarray) -> torch.Tensor:
    """`torch.from_numpy` that shares a read-only (memory-mapped) array instead of copying it.

    A head mapped read-only from the model file makes torch warn that the tensor is not writable,
    a warning meant for code that writes; W_U is only ever read (sliced, converted, multiplied), and
    copying it to make it writable would double the memory a multi-GB head takes. So this one
    warning, and only for this call, is silenced; a writable array goes straight through.
    """
    if array.flags.writeable:
        return torch.from_numpy(array)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_NOT_WRITABLE, category=UserWarning)
        return torch.from_numpy(array)


# --------------------------------------------------------------------------- tokenizer size


def tokenizer_vocab_size(folder: Path) -> int | None:
    """Number of token ids the tokenizer can produce (max id + 1), from its files alone."""
    tok = folder / "tokenizer.json"
    ids: list[object] = []
    fix = "fix or re-download the tokenizer files"
    if tok.exists() or tok.is_symlink():
        data = read_json_object(tok, fix)
        model = data.get("model") or {}
        vocab = model.get("vocab") if isinstance(model, dict) else None
        if isinstance(vocab, dict):
            ids.extend(vocab.values())
        elif isinstance(vocab, list):  # unigram: list of [piece, score]
            ids.append(len(vocab) - 1)
        added = data.get("added_tokens") or []
        if not isinstance(added, list) or not all(isinstance(t, dict) for t in added):
            raise ModelNotFoundError(f"{tok}: added_tokens is not a list of objects; {fix}")
        ids.extend(t.get("id") for t in added)
        where = tok
    else:
        where = folder / "vocab.json"
        for name in ("vocab.json", "added_tokens.json"):
            path = folder / name
            if path.exists() or path.is_symlink():
                ids.extend(read_json_object(path, fix).values())
    checked: list[int] = []
    for i in ids:
        if not isinstance(i, int) or isinstance(i, bool) or not 0 <= i < _MAX_TOKEN_ID:
            raise ModelNotFoundError(f"{where} holds the token id {i!r}, not a non-negative integer; {fix}")
        checked.append(i)
    return max(checked) + 1 if checked else None


# --------------------------------------------------------------------------- readers


def read_unembedding(
    location: ModelLocation, tensor_name: str | None = None, drop_padding_rows: bool = True
) -> Unembedding:
    """Read W_U of the model at `location` (see module docstring for the rules)."""
    if location.kind == "gguf_file":
        result = _read_gguf(location.path, tensor_name)
    elif location.kind == "safetensors_file":
        result = _read_safetensors(location, [location.path], tensor_name, {}, None)
    elif location.kind == "bin_file":
        result = _read_bin(location, [location.path], tensor_name, {}, None)
    else:
        result = _read_folder(location, tensor_name)
    rows, cols = result.matrix.shape
    if rows == 0 or cols == 0:
        raise BadTensorError(
            f"{result.tensor_name} in {location.path} has shape [{rows}, {cols}]; an unembedding needs at least "
            "one row (token) and one column (hidden unit), check --tensor or the checkpoint"
        )
    if drop_padding_rows and result.tokenizer_vocab and result.tokenizer_vocab < result.stored_rows:
        result.matrix = result.matrix[: result.tokenizer_vocab]
    return result


def _read_folder(location: ModelLocation, tensor_name: str | None) -> Unembedding:
    folder = location.path
    config = location.config
    tok_vocab = tokenizer_vocab_size(folder)
    st_index = folder / "model.safetensors.index.json"
    bin_index = folder / "pytorch_model.bin.index.json"
    shard = location.files.get("head_shard")
    if st_index.exists() or any(folder.glob("*.safetensors")):
        if st_index.exists():
            weight_map = read_weight_map(st_index)
            name, _ = choose_unembedding(list(weight_map), config, tensor_name, str(folder))
            files = [folder / weight_map[name]]
        else:
            files = sorted(folder.glob("*.safetensors"))
        if shard is not None:
            files = [shard]
        missing = [f for f in files if not f.exists()]
        if missing:
            raise ModelNotFoundError(
                f"{missing[0]} is listed in the checkpoint index but missing; re-download the model"
            )
        return _read_safetensors(location, files, tensor_name, config, tok_vocab)
    if bin_index.exists():
        weight_map = read_weight_map(bin_index)
        name, _ = choose_unembedding(list(weight_map), config, tensor_name, str(folder))
        return _read_bin(location, [folder / weight_map[name]], name, config, tok_vocab)
    bins = sorted(folder.glob("pytorch_model*.bin"))
    if bins:
        return _read_bin(location, bins, tensor_name, config, tok_vocab)
    raise ModelNotFoundError(f"{folder} holds no safetensors or pytorch_model*.bin weights")


def _read_safetensors(
    location: ModelLocation, files: list[Path], tensor_name: str | None, config: dict[str, Any], tok_vocab: int | None
) -> Unembedding:
    entries = _safetensors_entries(files)
    name, tied = choose_unembedding(list(entries), config, tensor_name, str(location.path))
    entry = entries[name]
    matrix = _mmap_safetensors(entry, name)
    sha = _file_range_sha256(entry.file, entry.begin, entry.end)
    return Unembedding(matrix, name, sha, int(matrix.shape[0]), entry.dtype, tok_vocab, tied)


def _read_bin(
    location: ModelLocation, files: list[Path], tensor_name: str | None, config: dict[str, Any], tok_vocab: int | None
) -> Unembedding:
    state: dict[str, Any] = {}
    for file in files:
        regular_file(file)
        try:
            # weights_only=True: never unpickle arbitrary objects from a downloaded checkpoint.
            loaded = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
        except Exception as exc:
            raise ModelNotFoundError(
                f"{file} could not be read as a PyTorch weights file with weights_only=True ({type(exc).__name__}); "
                "convert it to safetensors"
            ) from exc
        if not isinstance(loaded, dict):
            raise ModelNotFoundError(
                f"{file} holds a {type(loaded).__name__}, not a state dict; convert it to safetensors"
            )
        state.update(loaded)
    tensors = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
    name, tied = choose_unembedding(list(tensors), config, tensor_name, str(location.path))
    matrix = tensors[name]
    if matrix.ndim != 2:
        raise BadTensorError(f"{name} has shape {list(matrix.shape)}; an unembedding must be 2-D (vocab, hidden)")
    if not matrix.is_floating_point():
        raise BadTensorError(f"{name} is {matrix.dtype}; embfilter reads floating-point heads")
    raw = matrix.contiguous().view(torch.uint8).numpy()
    sha = hashlib.sha256(raw.data).hexdigest()
    stored = str(matrix.dtype).replace("torch.", "")
    return Unembedding(matrix, name, sha, int(matrix.shape[0]), stored, tok_vocab, tied)


def _read_gguf(path: Path, tensor_name: str | None) -> Unembedding:
    from gguf import GGMLQuantizationType
    from gguf.constants import GGML_QUANT_SIZES
    from gguf.quants import dequantize

    from embfilter_cli.model.gguf_header import UnsupportedGGUF, read_header

    regular_file(path)
    try:
        header = read_header(path)
    except UnsupportedGGUF:
        return _read_gguf_with_reader(path, tensor_name)
    except OSError as exc:
        raise ModelNotFoundError(f"{path} could not be read ({exc}); check the path and permissions") from exc
    name, tied = choose_unembedding(list(header.tensors), {}, tensor_name, str(path))
    info = header.tensors[name]
    try:
        qtype = GGMLQuantizationType(info.ggml_type)
    except ValueError as exc:
        raise BadTensorError(
            f"{name} in {path} has unknown GGML type {info.ggml_type}; upgrade the gguf package"
        ) from exc
    block, type_size = GGML_QUANT_SIZES[qtype]
    rows, cols = info.shape if len(info.shape) == 2 else (0, 0)
    if len(info.shape) != 2 or cols % block or rows == 0 or cols == 0:
        raise BadTensorError(
            f"{name} in {path} has shape {list(info.shape)}; an unembedding must be 2-D (vocab, hidden), "
            f"non-empty, with rows a multiple of the {qtype.name} block ({block})"
        )
    row_bytes = cols // block * type_size
    if info.offset + rows * row_bytes > path.stat().st_size:
        raise BadTensorError(f"{name} in {path} runs past the end of the file; the file is truncated, re-download it")
    raw = np.memmap(path, dtype=np.uint8, mode="r", offset=info.offset, shape=(rows, row_bytes))
    sha = hashlib.sha256(np.ascontiguousarray(raw).reshape(-1).data).hexdigest()
    return Unembedding(
        _dequantize(raw, qtype, dequantize, name, path, (rows, cols)),
        name,
        sha,
        rows,
        qtype.name,
        header.array_lengths.get("tokenizer.ggml.tokens"),
        tied,
    )


def _dequantize(
    raw: np.ndarray, qtype: Any, dequantize: Any, name: str, path: Path, shape: tuple[int, int]
) -> torch.Tensor:
    try:
        values = dequantize(raw, qtype)
    except NotImplementedError as exc:
        raise BadTensorError(
            f"{name} in {path} uses GGUF type {qtype.name}, which the installed gguf package cannot "
            "dequantize; upgrade gguf or use a Q8_0/Q4/F16 file"
        ) from exc
    # F32 dequantizes to a view of the read-only file mapping (no copy); the other types to new arrays
    return readonly_tensor(np.asarray(values, dtype=np.float32).reshape(shape))


def _read_gguf_with_reader(path: Path, tensor_name: str | None) -> Unembedding:
    """Fallback for GGUF layouts the fast header walk does not read (big-endian, v1)."""
    from gguf import GGUFReader
    from gguf.quants import dequantize

    try:
        reader = GGUFReader(str(path))
    except Exception as exc:
        raise ModelNotFoundError(
            f"{path} is not a readable GGUF file ({type(exc).__name__}: {exc}); re-download it"
        ) from exc
    from embfilter_cli.model.gguf_header import check_reader_fields

    check_reader_fields(reader, path)
    tensors = {t.name: t for t in reader.tensors}
    name, tied = choose_unembedding(list(tensors), {}, tensor_name, str(path))
    info = tensors[name]
    raw = np.ascontiguousarray(info.data)
    sha = hashlib.sha256(raw.view(np.uint8).reshape(-1).data).hexdigest()
    shape = tuple(int(x) for x in reversed(info.shape.tolist()))  # GGUF lists dims fastest-first
    matrix = _dequantize(info.data, info.tensor_type, dequantize, name, path, shape)  # type: ignore[arg-type]
    tok_field = reader.fields.get("tokenizer.ggml.tokens")
    tok_vocab = len(tok_field.data) if tok_field is not None else None
    return Unembedding(matrix, name, sha, shape[0], info.tensor_type.name, tok_vocab, tied)
