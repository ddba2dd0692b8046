"""The model's head: the one place that turns a `ModelLocation` into W_U's facts, and checks filters.

Every command that needs the head goes through here: `fit` and `eval` read W_U and its facts,
`inspect`, `embed --filter` and `verify` read the tensor a filter was fitted on and check the
filter belongs to the model. What lives here:

- `HeadFacts`: what an artifact records about W_U (SHA-256 of the stored bytes, tensor name,
  vocabulary rows used, stored rows, hidden size); `Unembedding.facts` gives them.
- `read_head`: W_U with fit's defaults, or, for a filter, the tensor the filter names, falling
  back to the default choice when this model has no such tensor (so the mismatch is then
  reported as "fitted on another model" rather than "no such tensor").
- `locate_for_filter`: `--model` if given, else the model the filter was fitted on, else the
  built-in default.
- `check_filter_matches`: refuse a filter fitted on another model (hidden size or SHA-256).
- `model_fingerprint`: a cheap identity of the model's files, the key of on-disk caches.

What does NOT live here, because of the layering (model < filters < text): the spectrum of W_U
and the solver policy (`filters/solve.py`, which needs the solvers of `filters/spectral.py`),
and the on-disk cache (`text/cache.py`). This module never imports `filters`; a filter is seen
through the small `FilterRecord` protocol (its attributes), which `FilterArtifact` satisfies.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from embfilter_cli.errors import ArtifactError, ModelNotFoundError, UnembeddingNotFoundError
from embfilter_cli.model.location import ModelLocation

if TYPE_CHECKING:
    from embfilter_cli.model.unembedding import Unembedding


class FilterRecord(Protocol):
    """What the head needs to know about a filter (a `filters.artifact.FilterArtifact`)."""

    @property
    def path(self) -> Any:
        """Where the filter was read from (None when built in memory)."""

    @property
    def metadata(self) -> Mapping[str, str]:
        """The artifact's str→str metadata (`tensor_name`, `model_revision`, …)."""

    @property
    def hidden_size(self) -> int:
        """d, the hidden size the filter was fitted for."""

    @property
    def model_source(self) -> str:
        """The model the filter was fitted on."""

    @property
    def unembedding_sha256(self) -> str:
        """SHA-256 of that model's W_U, recorded at fit time."""


@dataclass
class HeadFacts:
    """What an artifact records about W_U (enough to check a filter and to build one)."""

    sha256: str
    tensor_name: str
    vocab_size: int
    stored_rows: int
    hidden_size: int

    def as_dict(self) -> dict[str, Any]:
        """The facts as a JSON-ready dict (the cache stores them this way)."""
        return {
            "sha256": self.sha256,
            "tensor_name": self.tensor_name,
            "vocab_size": self.vocab_size,
            "stored_rows": self.stored_rows,
            "hidden_size": self.hidden_size,
        }


def facts_of(unemb: Unembedding) -> HeadFacts:
    """The facts of a read W_U."""
    return HeadFacts(unemb.sha256, unemb.tensor_name, unemb.vocab_size, unemb.stored_rows, unemb.hidden_size)


def read_head(
    location: ModelLocation,
    tensor_name: str | None = None,
    filter_tensor: str | None = None,
    drop_padding_rows: bool = True,
) -> Unembedding:
    """Read W_U at `location`.

    Args:
        tensor_name: an explicit tensor (`--tensor`); a missing one is an error.
        filter_tensor: the tensor a filter was fitted on; when this model has none of that name,
            the default choice is read instead, so that its different SHA-256 ends in the
            "fitted on another model" message.
        drop_padding_rows: drop rows past the tokenizer's vocabulary (fit's default).
    """
    from embfilter_cli.model import unembedding  # torch: only once W_U is really needed

    if tensor_name or not filter_tensor:
        return unembedding.read_unembedding(location, tensor_name=tensor_name, drop_padding_rows=drop_padding_rows)
    try:
        return unembedding.read_unembedding(location, tensor_name=filter_tensor, drop_padding_rows=drop_padding_rows)
    except UnembeddingNotFoundError:
        return unembedding.read_unembedding(location, drop_padding_rows=drop_padding_rows)


def read_head_for_filter(location: ModelLocation, artifact: FilterRecord) -> Unembedding:
    """W_U as `artifact` was fitted on it (its tensor, else the default), checked to match the filter."""
    unemb = read_head(location, filter_tensor=artifact.metadata.get("tensor_name") or None)
    check_filter_matches(
        artifact, hidden_size=unemb.hidden_size, unembedding_sha256=unemb.sha256, model_source=location.source
    )
    return unemb


def locate_for_filter(
    model: str | None, revision: str | None, artifact: FilterRecord | None
) -> tuple[str | None, ModelLocation]:
    """--model if given; else the model the filter was fitted on; else the built-in default.

    Returns the spec to load the model with (None for the built-in default) and its location.
    """
    from embfilter_cli.model.locate import resolve_model

    if model or artifact is None:
        return model, resolve_model(model, revision=revision)
    source = artifact.model_source
    try:
        default = resolve_model(None)
        if default.source == source:
            return None, default
    except ModelNotFoundError:
        pass
    stored_rev = artifact.metadata.get("model_revision")
    try:
        return source, resolve_model(
            source, revision=revision or (stored_rev if stored_rev not in ("", "local") else None)
        )
    except ModelNotFoundError as exc:
        raise ModelNotFoundError(
            f"filter {artifact.path} was fitted on {source!r}, which cannot be found here ({exc}); pass --model"
        ) from exc


def check_filter_matches(
    artifact: FilterRecord, *, hidden_size: int, unembedding_sha256: str | None, model_source: str
) -> None:
    """Refuse a filter fitted on another model (different hidden size or W_U fingerprint).

    Args:
        artifact: the loaded filter.
        hidden_size: d of the model's hidden states.
        unembedding_sha256: the model's W_U SHA-256 (as `read_head` computes it), or None to
            check the hidden size only.
        model_source: the model's name, for the message.
    """
    where = artifact.path or "the filter"
    if artifact.hidden_size != hidden_size:
        raise ArtifactError(
            f"{where} expects hidden size {artifact.hidden_size} (fitted on {artifact.model_source}) but {model_source} "
            f"has {hidden_size}; fit a filter on this model with `embfilter fit --model ...`"
        )
    if unembedding_sha256 is not None and artifact.unembedding_sha256 != unembedding_sha256:
        raise ArtifactError(
            f"{where} was fitted on {artifact.model_source} (W_U sha256 {artifact.unembedding_sha256[:16]}…) but "
            f"{model_source} has W_U sha256 {unembedding_sha256[:16]}…; fit a filter on this model with "
            "`embfilter fit --model ...`"
        )


_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt")
_CONFIG_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "generation_config.json")


def model_fingerprint(location: ModelLocation) -> str:
    """A cheap key for caches: the model's identity without hashing gigabytes of weights.

    Covers the source and revision, every weight file's name, size and modification time, and the
    bytes of the config and tokenizer files. A re-downloaded or edited model gets a new key; the
    same files at the same place keep it.
    """
    digest = hashlib.sha256()
    digest.update(json.dumps([location.source, location.revision, location.kind]).encode())
    if location.revision not in ("", "local") and not Path(location.source).exists():
        # A Hub commit hash names the exact files; the snapshot folder fills up as weights download.
        return digest.hexdigest()
    folder = location.path if location.path.is_dir() else location.path.parent
    weights = (
        [location.path]
        if location.path.is_file()
        else sorted(f for f in folder.iterdir() if f.suffix in _WEIGHT_SUFFIXES)
    )
    for file in weights:
        stat = file.stat()
        digest.update(f"{file.name}:{stat.st_size}:{stat.st_mtime_ns}\n".encode())
    if location.path.is_dir():
        for name in _CONFIG_FILES:
            if (folder / name).is_file():
                digest.update(name.encode() + (folder / name).read_bytes())
    return digest.hexdigest()
