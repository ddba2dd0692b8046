"""Embed a text column of Parquet (or Arrow) tables, record batch by record batch.

`EmbedBatch` is a picklable callable like `vectors.arrow_batches.FilterBatch`: an Arrow batch in,
the same columns out plus an `embedding` column (`fixed_size_list<float32>[k]`, appended last; another
name with `output_column`). An input that already has a column of that name is refused, unless the
name was chosen explicitly (`output_column`): then that column is replaced in place, on purpose. The encoder (and the filter) are loaded on first use,
so a Ray actor loads them once. Empty or null texts are kept as rows whose embedding is null (the
row still lines up with its id); `null_texts` counts them.

Not handled: texts in list or struct columns, and `large_string` columns above 2 GB per batch.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import pyarrow as pa

from embfilter_cli.errors import InputDataError
from embfilter_cli.filters.finite import unit_rows
from embfilter_cli.signals import raise_if_signalled
from embfilter_cli.vectors.arrow_batches import (
    describe_columns,
    fingerprint_metadata,
    require_unique_column,
    vector_array,
)

EMBEDDING_COLUMN = "embedding"


class EmbedBatch:
    """Embed `text_column` of Arrow batches: `EmbedBatch("smollm2-135m")(batch) -> batch + embedding`.

    Args:
        model: a model spec as `embfilter embed --model` takes it (None: the built-in default).
        text_column: the column holding the texts.
        filter: an artifact path applied to the raw vectors (refused if fitted on another model).
        normalize: L2-normalise each output vector.
        pooling, recipe, batch_size, max_length, device, dtype, revision: as `embfilter embed`.
        output_column: the vectors' column; an existing column of that name is replaced. None:
            `embedding`, and an input that already has an `embedding` column is refused.
    """

    def __init__(
        self,
        model: str | None = None,
        text_column: str = "text",
        *,
        filter: str | os.PathLike[str] | None = None,  # noqa: A002 - the public name users expect
        normalize: bool = False,
        pooling: str = "mean",
        recipe: str = "none",
        batch_size: int = 16,
        max_length: int = 512,
        device: str = "auto",
        dtype: str = "auto",
        revision: str | None = None,
        use_cache: bool = True,
        output_column: str | None = None,
    ) -> None:
        self.model, self.text_column = model, text_column
        self.output_column, self.replace_column = output_column or EMBEDDING_COLUMN, output_column is not None
        self.filter_path = None if filter is None else str(filter)
        self.normalize, self.pooling, self.recipe = normalize, pooling, recipe
        self.batch_size, self.max_length = batch_size, max_length
        self.device, self.dtype, self.revision, self.use_cache = device, dtype, revision, use_cache
        self.null_texts = 0
        self.truncated = 0
        self._encoder: Any = None
        self._artifact: Any = None
        self._location: Any = None

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_encoder"] = state["_artifact"] = state["_location"] = None  # each worker loads its own
        return state

    @property
    def location(self) -> Any:
        """The resolved model (`model.locate.resolve_model`), on first use."""
        if self._location is None:
            from embfilter_cli.model.locate import resolve_model

            self._location = resolve_model(self.model, revision=self.revision)
        return self._location

    @property
    def artifact(self) -> Any:
        """The filter, checked against the model once (None without a filter)."""
        if self._artifact is None and self.filter_path is not None:
            from embfilter_cli.filters.artifact import load_artifact
            from embfilter_cli.filters.centering import check_centering_use
            from embfilter_cli.model.head import read_head_for_filter
            from embfilter_cli.text.recipes import resolve_recipe

            artifact = load_artifact(self.filter_path)
            rec = resolve_recipe(self.recipe)
            check_centering_use(artifact.centering, self.pooling, rec.name, rec.template, str(artifact.path))
            read_head_for_filter(self.location, artifact)  # refuses a filter fitted on another model
            self._artifact = artifact
        return self._artifact

    @property
    def encoder(self) -> Any:
        """The loaded encoder, on first use (once per process or Ray actor)."""
        if self._encoder is None:
            from embfilter_cli.text.embedding import load_encoder_at

            self._encoder = load_encoder_at(
                self.location, device=self.device, dtype=self.dtype, revision=self.revision, use_cache=self.use_cache
            )
        return self._encoder

    def dims(self) -> tuple[int, int]:
        """(the model's hidden size, the output dimension)."""
        hidden = self.artifact.hidden_size if self.artifact is not None else self.encoder.hidden_size
        return hidden, self.output_dim()

    def output_dim(self) -> int:
        """k: the filter's output dimension, or the model's hidden size without a filter."""
        return self.artifact.output_dim if self.artifact is not None else self.encoder.hidden_size

    def fingerprint(self) -> tuple[dict[str, str], dict[str, str]]:
        """(identity, settings) recorded in outputs; `--resume` redoes outputs whose settings differ."""
        identity = {"embfilter.embed_model": self.location.source}
        if self.artifact is not None:
            identity["embfilter.projection_sha256"] = self.artifact.metadata.get("projection_sha256", "")
            identity["embfilter.mean_sha256"] = self.artifact.metadata.get("mean_sha256", "")
        settings = {
            "embfilter.pooling": self.pooling,
            "embfilter.recipe": self.recipe,
            "embfilter.max_length": str(self.max_length),
            "embfilter.normalized": "true" if self.normalize else "false",
        }
        return identity, settings

    def resume_options(self) -> dict[str, str]:
        """Options that decide an output's bytes beyond its `metadata` (kept in the resume record, `shards`)."""
        return {
            "text_column": self.text_column,
            "output_column": self.output_column,
            "batch_size": str(self.batch_size),
            "device": self.device,
            "dtype": self.dtype,
            "revision": self.revision or "",
        }

    def metadata(self) -> dict[str, str]:
        """The `embfilter.*` schema metadata of outputs: the filter's fingerprints, the model and settings."""
        meta = fingerprint_metadata(self.artifact, self.normalize, self.output_column) if self.artifact else {}
        identity, settings = self.fingerprint()
        return {**meta, **identity, **settings}

    def output_schema(self, schema: pa.Schema, name: str = "input") -> pa.Schema:
        """`schema` plus (or with, in place) the embedding column, and the run's metadata."""
        self._text_index(schema, name)
        field = pa.field(self.output_column, pa.list_(pa.float32(), self.output_dim()))
        if self._replaces(schema, name):
            schema = schema.set(schema.get_field_index(self.output_column), field)
        else:
            schema = schema.append(field)
        meta = dict(schema.metadata or {})
        meta.update({k.encode(): v.encode() for k, v in self.metadata().items()})
        return schema.with_metadata(meta)

    def _replaces(self, schema: pa.Schema, name: str) -> bool:
        """Whether the vectors replace an existing column; refused unless its name was chosen explicitly."""
        if self.output_column not in schema.names:
            return False
        if not self.replace_column:
            kind = schema.field(self.output_column).type
            raise InputDataError(
                f"{name} already has a column {self.output_column!r} ({kind}) that the vectors would replace; pass "
                f"--output-column NAME for another name, or --output-column {self.output_column} to replace it"
            )
        return True

    def _text_index(self, schema: pa.Schema, name: str) -> int:
        if self.text_column not in schema.names:
            raise InputDataError(
                f"{name} has no column {self.text_column!r} (its columns: {describe_columns(schema)}); "
                "pass --text-column NAME"
            )
        require_unique_column(schema, self.text_column, name)
        kind = schema.field(self.text_column).type
        if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
            raise InputDataError(
                f"{name}: column {self.text_column!r} is {kind}, not text (its columns: {describe_columns(schema)}); "
                "pass --text-column NAME"
            )
        return schema.get_field_index(self.text_column)

    def embed_texts(self, texts: list[str]) -> np.ndarray:
        """Raw vectors of non-empty texts, then the filter and normalisation: (n, k) float32."""
        if not texts:
            return np.empty((0, self.output_dim()), np.float32)
        encoder = self.encoder
        vectors = encoder.embed(
            texts, pooling=self.pooling, recipe=self.recipe, batch_size=self.batch_size, max_length=self.max_length
        )
        self.truncated += encoder.last_truncated
        if self.artifact is not None:
            vectors = self.artifact.apply(vectors)
        vectors = np.asarray(vectors, dtype=np.float32)
        if self.normalize:
            vectors = unit_rows(vectors)
        return vectors

    def __call__(self, batch: pa.RecordBatch | pa.Table, name: str = "batch", row_offset: int = 0) -> Any:
        raise_if_signalled()  # between batches: stop even if a library swallowed the signal's exception
        i = self._text_index(batch.schema, name)
        texts = batch.column(i).to_pylist()
        valid = np.array([t is not None and t.strip() != "" for t in texts], dtype=bool)
        self.null_texts += int((~valid).sum())
        vectors = self.embed_texts([t for t, ok in zip(texts, valid) if ok])
        column = vector_array(vectors, None if valid.all() else valid, "float32")
        field = pa.field(self.output_column, column.type)
        if self._replaces(batch.schema, name):
            return batch.set_column(batch.schema.get_field_index(self.output_column), field, column)
        return batch.append_column(field, column)


def records_table(records: list[dict[str, Any]], name: str) -> pa.Table:
    """JSONL records as an Arrow table for a Parquet output (their fields as columns).

    JSON allows what a Parquet column does not: one field of several types across records, integers
    beyond 64 bits, empty objects. Each is one InputDataError naming the field and the record (1-based),
    instead of pyarrow's exception at conversion or at write time.
    """
    rows = records
    try:
        table = pa.Table.from_pylist(rows)
    except (pa.ArrowException, OverflowError, TypeError, ValueError) as exc:
        raise InputDataError(_field_problem(rows, name) or f"{name}: the records cannot form a table ({exc})") from None
    for field in table.schema:
        if _holds_empty_struct(field.type):
            raise InputDataError(
                f"{name}: field {field.name!r} holds empty objects ({{}}), which Parquet cannot store; "
                "give them a key, drop the field, or write .jsonl"
            )
    return table


def _json_kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    kinds: dict[type, str] = {str: "a string", list: "a list", dict: "an object"}
    return kinds.get(type(value), type(value).__name__)


def _field_problem(rows: list[dict[str, Any]], name: str) -> str | None:
    """The first field pyarrow cannot make one column of, and why (None if none is found)."""
    fields = list(dict.fromkeys(k for row in rows for k in row))
    for key in fields:
        values = [row.get(key) for row in rows]
        try:
            pa.array(values)
            continue
        except (pa.ArrowException, OverflowError, TypeError, ValueError):
            pass
        for i, value in enumerate(values):
            if isinstance(value, int) and not isinstance(value, bool) and not -(2**63) <= value < 2**64:
                return (
                    f"{name} record {i + 1}: field {key!r} holds the integer {str(value)[:40]}, beyond 64 bits, "
                    "which Parquet cannot store; write it as a string, or write .jsonl"
                )
        kinds: dict[str, int] = {}
        for i, value in enumerate(values):
            if value is not None:
                kinds.setdefault(_json_kind(value), i)
        if len(kinds) > 1:
            (first, i), (second, j) = list(kinds.items())[:2]
            return (
                f"{name}: field {key!r} is {first} in record {i + 1} but {second} in record {j + 1}; a Parquet "
                "column holds one type: make the field's values one type, or write .jsonl"
            )
        return f"{name}: field {key!r} cannot be stored as a Parquet column (its values are nested inconsistently)"
    return None


def _holds_empty_struct(kind: pa.DataType) -> bool:
    if pa.types.is_struct(kind):
        return kind.num_fields == 0 or any(_holds_empty_struct(kind.field(i).type) for i in range(kind.num_fields))
    if pa.types.is_list(kind) or pa.types.is_large_list(kind) or pa.types.is_fixed_size_list(kind):
        return _holds_empty_struct(kind.value_type)
    return False
