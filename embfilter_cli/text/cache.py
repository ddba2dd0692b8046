"""The on-disk cache of `embfilter eval`: raw embeddings, W_U's facts and its exact spectrum.

Entries live under `$EMBFILTER_CACHE` (default `~/.cache/embfilter`), keyed by a cheap model
fingerprint (`model.head.model_fingerprint`), the recipe, pooling, max length, dtype and the
data's SHA-256, so a second sweep over the same model and data runs no model at all. Files are
written atomically. Every entry is checked when read (arrays: `text/cache_entry.py`, key, layout,
checksum, finite values; JSON: key and fields); a damaged entry is reported on the cache's `warn`
callback, counts as a miss and is overwritten, so it never reaches a score.

`cached_head_spectrum` is `filters.solve.head_spectrum` with this cache as its store;
`cached_embeddings` embeds texts once and keeps the raw vectors. Log lines, warnings and the
progress bar go through callbacks (the command wires them to the console).

Every hit touches the entry's last-use marker and every new entry is followed by the cache's size
limit (`cache_store`: least recently used entries go first); entries record the model they came
from (`source`) for `embfilter cache`.

Not handled: sharing between machines.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from embfilter_cli.files import default_cache_dir
from embfilter_cli.jsonable import json_default

if TYPE_CHECKING:
    from embfilter_cli.filters.spectral import Spectrum
    from embfilter_cli.model.head import HeadFacts
    from embfilter_cli.model.location import ModelLocation
    from embfilter_cli.text.baselines import BackgroundTexts
    from embfilter_cli.text.datasets import PairData

CACHE_VERSION = "2"  # 2: checked safetensors entries (text/cache_entry.py) replace .npy/.npz

Log = Callable[[str], None]
ProgressFn = Callable[[int, int], None]
BarFactory = Callable[
    [str, int], contextlib.AbstractContextManager[ProgressFn | None]
]  # (description, total) -> progress


def _silent(message: str) -> None:
    """The default log: drop the line."""


@contextlib.contextmanager
def _no_bar(description: str, total: int) -> Any:
    yield None


def cache_key(**parts: Any) -> str:
    """SHA-256 of the JSON of `parts` plus the cache format version."""
    payload = json.dumps({"cache_version": CACHE_VERSION, **parts}, sort_keys=True, default=str)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


class Cache:
    """Raw embeddings and spectra on disk; a disabled cache stores and finds nothing.

    Files are written atomically. Array entries are read through `cache_entry.read_entry`
    (key, layout, checksum and finiteness checked); a damaged entry is reported on `warn`
    and counts as a miss, so the caller recomputes it and overwrites it.

    Writes are best effort: the first store that cannot be written (read-only folder, full
    disk, quota) is reported once on `warn` and later stores are skipped, so a cache costs speed,
    never the run. Reading is unaffected: a read-only shared cache still gives its hits.
    """

    def __init__(
        self, root: Path | None = None, enabled: bool = True, warn: Log = _silent, notify: Log = _silent
    ) -> None:
        from embfilter_cli.cache_store import check_root, max_size

        self.root = Path(root) if root is not None else default_cache_dir()
        self.enabled = enabled
        self.warn = warn
        self.notify = notify  # the one line saying the size limit removed old entries
        self.write_failed = False
        self.source = ""  # the model the next stored entries come from (`describing`)
        if enabled:
            check_root(self.root)  # a file where the cache should be, or a bad size limit: say so before any work
            max_size()

    @contextlib.contextmanager
    def describing(self, source: str) -> Any:
        """Entries stored in the block record `source` (the model), for `embfilter cache`."""
        before, self.source = self.source, source
        try:
            yield
        finally:
            self.source = before

    def _hit(self, path: Path) -> None:
        from embfilter_cli.cache_lock import mark_used

        mark_used(self.root, path)

    def _stored(self, path: Path) -> None:
        """After a new entry: keep the cache within its size limit (best effort, like every store)."""
        from embfilter_cli.cache_store import enforce_limit

        if self._writable():
            with self._storing():
                enforce_limit(self.root, path, self.notify)

    def _writable(self) -> bool:
        return self.enabled and not self.write_failed

    @contextlib.contextmanager
    def _storing(self) -> Any:
        """Run one store; a failure to write turns storing off with one warning (other errors pass)."""
        from embfilter_cli.files import OutputWriteError, unwritable_reason

        try:
            yield
        except (OSError, OutputWriteError) as exc:
            reason = unwritable_reason(exc)
            if reason is None:  # not a write failure (a bug, or an input error): not ours to hide
                raise
            self.write_failed = True
            self.warn(
                f"the cache {self.root} cannot be written ({reason}); going on without storing results there "
                "(free space, or pass --cache-dir DIR or --no-cache)"
            )

    def _path(self, kind: str, key: str, suffix: str) -> Path:
        return self.root / kind / f"{key}{suffix}"

    def _read(
        self, kind: str, key: str, want: dict[str, tuple[str, int]], what: str
    ) -> tuple[dict[str, np.ndarray], dict[str, str]] | None:
        """An entry's checked arrays and metadata, or None (disabled, missing, or damaged: warned)."""
        from embfilter_cli.text.cache_entry import DamagedEntry, read_entry

        if not self.enabled:
            return None
        path = self._path(kind, key, ".safetensors")
        if not path.exists():
            return None
        try:
            hit = read_entry(path, key, want)
        except DamagedEntry as exc:
            self._damaged(what, path, str(exc))
            return None
        self._hit(path)
        return hit

    def _damaged(self, what: str, path: Path, why: str) -> None:
        self.warn(f"the cached {what} {path} is damaged ({why}); recomputing it")

    def load_embeddings(self, key: str, rows: int | None = None, cols: int | None = None) -> np.ndarray | None:
        """Cached (rows, cols) float32 embeddings under `key`, or None (disabled, missing or damaged)."""
        hit = self._read("embeddings", key, {"embeddings": ("F32", 2)}, "embeddings")
        if hit is None:
            return None
        array = hit[0]["embeddings"]
        n, d = array.shape
        if d < 1 or n != (n if rows is None else rows) or d != (d if cols is None else cols):
            wanted = f"{rows if rows is not None else 'n'}×{cols if cols is not None else 'd'}"
            self._damaged("embeddings", self._path("embeddings", key, ".safetensors"), f"shape {n}×{d}, not {wanted}")
            return None
        return array

    def save_embeddings(self, key: str, array: np.ndarray) -> None:
        """Store embeddings under `key` (atomically; no-op when disabled)."""
        from embfilter_cli.text.cache_entry import write_entry

        if self._writable():
            arrays = {"embeddings": np.ascontiguousarray(array, dtype=np.float32)}
            path = self._path("embeddings", key, ".safetensors")
            with self._storing():
                write_entry(path, key, arrays, {"source": self.source})
            self._stored(path)

    def load_spectrum(self, key: str) -> tuple[Spectrum, dict[str, Any]] | None:
        """A cached (spectrum, head facts) under `key`, or None (disabled, missing or damaged)."""
        from embfilter_cli.filters.spectral import Spectrum

        want = {"singular_values": ("F64", 1), "vectors": ("F64", 2)}
        hit = self._read("spectra", key, want, "spectrum")
        if hit is None:
            return None
        arrays, metadata = hit
        values, vectors = arrays["singular_values"], arrays["vectors"]
        try:
            meta = json.loads(metadata["meta"])
            head = meta["head"]
            spectrum = Spectrum(
                singular_values=values,
                vectors=np.asfortranarray(vectors) if meta.get("fortran") is True else vectors,
                solver=str(meta["solver"]),
                params=dict(meta["params"]),
                certificate=dict(meta["certificate"]),
                frobenius_sq=float(meta["frobenius_sq"]),
                seconds=0.0,
            )
            problem = _spectrum_problem(spectrum, head)
        except (KeyError, TypeError, ValueError, RecursionError):
            problem = "its facts are not the ones this version writes"
        if problem:
            self._damaged("spectrum", self._path("spectra", key, ".safetensors"), problem)
            return None
        return spectrum, head

    def save_spectrum(self, key: str, spectrum: Spectrum, head: dict[str, Any]) -> None:
        """Store a spectrum and its head facts under `key` (atomically; no-op when disabled)."""
        from embfilter_cli.text.cache_entry import write_entry

        if not self._writable():
            return
        meta = {
            "solver": spectrum.solver,
            "params": spectrum.params,
            "certificate": spectrum.certificate,
            "frobenius_sq": spectrum.frobenius_sq,
            "head": head,
            # Kept so a cached spectrum is bit-for-bit the computed one in use too: BLAS rounds
            # differently for the two memory layouts, and a sweep must not change on a cache hit.
            "fortran": bool(spectrum.vectors.flags.f_contiguous and not spectrum.vectors.flags.c_contiguous),
        }
        arrays = {
            "singular_values": np.asarray(spectrum.singular_values, dtype=np.float64),
            "vectors": np.asarray(spectrum.vectors, dtype=np.float64),
        }
        path = self._path("spectra", key, ".safetensors")
        with self._storing():
            write_entry(path, key, arrays, {"meta": json.dumps(meta, default=json_default), "source": self.source})
        self._stored(path)

    def load_json(self, kind: str, key: str) -> dict[str, Any] | None:
        """A cached JSON object of `kind` under `key`, or None (a "heads" object must be valid head facts)."""
        if not self.enabled:
            return None
        path = self._path(kind, key, ".json")
        if not path.is_file():
            return None
        try:
            stored = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError, RecursionError):
            stored = None
        value = stored.get("value") if isinstance(stored, dict) and stored.get("key") == key else None
        intact = isinstance(value, dict) and stored.get("sha256") == _json_digest(value)
        if not intact or (kind == "heads" and _head_problem(value)):
            self._damaged(kind.rstrip("s"), path, "it is not the JSON written for this key, or was edited")
            return None
        self._hit(path)
        return value

    def save_json(self, kind: str, key: str, value: dict[str, Any]) -> None:
        """Store a JSON object of `kind` under `key` (atomically; no-op when disabled)."""
        if not self._writable():
            return
        from embfilter_cli.files import atomic_path

        record = {"key": key, "value": value, "sha256": _json_digest(value), "source": self.source}
        text = json.dumps(record, default=json_default)
        path = self._path(kind, key, ".json")
        with self._storing(), atomic_path(path, force=True) as tmp:
            tmp.write_text(text, encoding="utf-8")
        self._stored(path)


def _json_digest(value: dict[str, Any]) -> str:
    """SHA-256 of `value`'s canonical JSON: an edited or damaged JSON entry no longer matches it."""
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=json_default).encode("utf-8")).hexdigest()


def _head_problem(head: object) -> str:
    """Why `head` is not a dict of head facts (see `model.head.HeadFacts`); "" when it is."""
    ints = ("vocab_size", "stored_rows", "hidden_size")
    if not isinstance(head, dict) or set(head) != {"sha256", "tensor_name", *ints}:
        return "its head facts have the wrong fields"
    if not all(isinstance(head[k], str) for k in ("sha256", "tensor_name")):
        return "its head facts have the wrong types"
    if not all(isinstance(head[k], int) and not isinstance(head[k], bool) and head[k] > 0 for k in ints):
        return "its head sizes are not positive whole numbers"
    return ""


def _spectrum_problem(spectrum: Spectrum, head: object) -> str:
    """Why a read spectrum cannot be W_U's of `head`; "" when it can."""
    values, vectors = spectrum.singular_values, spectrum.vectors
    d, k = vectors.shape
    problem = _head_problem(head)
    if problem:
        return problem
    assert isinstance(head, dict)
    if d != head["hidden_size"] or not 0 < k <= d or values.shape != (k,):
        return f"{k} singular values and vectors of {d} dims for a W_U of {head['hidden_size']} dims"
    if (values < 0).any() or (np.diff(values) > 0).any():
        return "its singular values are not non-negative and descending"
    if not (math.isfinite(spectrum.frobenius_sq) and spectrum.frobenius_sq >= 0):
        return "its Frobenius norm is not a finite non-negative number"
    return ""


def cached_head_spectrum(
    location: ModelLocation, cache: Cache, device: str = "auto", need_spectrum: bool = True
) -> tuple[HeadFacts, Spectrum | None, bool]:
    """W_U's facts and (optionally) its exact spectrum, from `cache` when possible.

    Returns (facts, spectrum, from_cache); see `filters.solve.head_spectrum`.
    """
    from embfilter_cli.filters.solve import head_spectrum
    from embfilter_cli.model.head import model_fingerprint

    key = cache_key(model=model_fingerprint(location), what="head")
    with cache.describing(location.source):
        return head_spectrum(location, cache, key, device=device, need_spectrum=need_spectrum)


def cached_embeddings(
    location: ModelLocation,
    data: PairData | BackgroundTexts,
    *,
    template: str,
    pooling: str,
    recipe: str,
    batch_size: int,
    max_length: int,
    device: str,
    dtype: str,
    revision: str | None,
    cache: Cache,
    log: Log = _silent,
    warn: Log = _silent,
    notify: Log = _silent,
    bar: BarFactory = _no_bar,
    what: str = "Raw embeddings",
    encoders: dict[str, Any] | None = None,
    hidden_size: int | None = None,
) -> tuple[np.ndarray, dict[str, Any]]:
    """Raw pooled embeddings of every text of `data`, from the cache or by running the model once.

    `data` is anything with `.texts` and `.sha256` (the scored pairs, or `eval --background`'s
    texts); `what` names it in the log lines. Pass the same `encoders` dict to several calls to
    load the model at most once between them. `hidden_size` (W_U's d, when known): a cached entry
    of another width is damaged, and a model whose hidden states have another width is an error.

    The cache's folder and switch also govern a GGUF model's cached Hugging Face conversion;
    `notify` receives the lines about building it (paths: printed literally by the CLI).

    Returns the (texts, d) float32 array and a summary (cached, seconds, truncated, dtype, key).
    """
    from embfilter_cli.filters.spectral import resolve_device
    from embfilter_cli.model.head import model_fingerprint
    from embfilter_cli.text import embedding

    dtype_name = str(embedding.resolve_dtype(dtype, resolve_device(device))).replace("torch.", "")
    key = cache_key(
        model=model_fingerprint(location),
        template=template,
        pooling=pooling,
        max_length=max_length,
        dtype=dtype_name,
        data=data.sha256,
    )
    raw = cache.load_embeddings(key, rows=len(data.texts), cols=hidden_size)
    if raw is not None:
        log(f"{what}: from cache ({raw.shape[0]}×{raw.shape[1]})")
        return raw, {
            "cached": True,
            "seconds": 0.0,
            "texts": raw.shape[0],
            "truncated": None,
            "dtype": dtype_name,
            "cache_key": key,
        }
    started = time.perf_counter()
    encoder = (encoders or {}).get("encoder")
    fresh = encoder is None
    if encoder is None:
        log(f"Loading {location.source} ({location.kind.replace('_', ' ')})…")
        encoder = embedding.load_encoder_at(
            location,
            device=device,
            dtype=dtype,
            revision=revision,
            cache_dir=cache.root,
            use_cache=cache.enabled,
            notify=notify,
        )
        if encoders is not None:
            encoders["encoder"] = encoder
    loaded = time.perf_counter()
    doing = (
        f"embedding {len(data.texts)} texts"
        if what == "Raw embeddings"
        else f"{what}: embedding {len(data.texts)} texts"
    )
    log(f"Loaded in {loaded - started:.1f}s; {doing}" if fresh else doing)
    with bar("Embedding", len(data.texts)) as progress:
        raw = encoder.embed(
            data.texts, pooling=pooling, recipe=recipe, batch_size=batch_size, max_length=max_length, progress=progress
        )
    seconds = time.perf_counter() - loaded
    if encoder.last_truncated:
        warn(
            f"{encoder.last_truncated} text(s) exceeded --max-length {encoder.effective_max_length(max_length)} tokens "
            "and were cut (the template was kept)"
        )
    bad = int((~np.isfinite(raw).all(axis=1)).sum()) if raw.size else 0
    if bad:
        from embfilter_cli.errors import InputDataError

        raise InputDataError(
            f"the model gave NaN or infinite embeddings for {bad} of {len(data.texts)} texts ({dtype_name}); "
            "try --dtype float32"
        )
    if hidden_size is not None and raw.shape[1] != hidden_size:
        from embfilter_cli.errors import InputDataError

        raise InputDataError(f"the model's hidden states have {raw.shape[1]} dims but its W_U has {hidden_size}")
    with cache.describing(location.source):
        cache.save_embeddings(key, raw)
    log(f"Embedded in {seconds:.1f}s ({len(data.texts) / max(seconds, 1e-9):.2f} texts/s)")
    return raw, {
        "cached": False,
        "seconds": round(seconds, 3),
        "load_seconds": round(loaded - started, 3),
        "texts": len(data.texts),
        "truncated": encoder.last_truncated,
        "dtype": dtype_name,
        "cache_key": key,
    }
