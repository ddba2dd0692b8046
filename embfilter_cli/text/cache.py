"""The on-disk cache of `embfilter eval`: raw embeddings, W_U's facts and its exact spectrum.

Entries live under `$EMBFILTER_CACHE` (default `~/.cache/embfilter`), keyed by a cheap model
fingerprint (`model.head.model_fingerprint`), the recipe, pooling, max length, dtype and the
data's SHA-256, so a second sweep over the same model and data runs no model at all. Files are
written atomically; an unreadable entry counts as a miss and is overwritten.

`cached_head_spectrum` is `filters.solve.head_spectrum` with this cache as its store;
`cached_embeddings` embeds texts once and keeps the raw vectors. Log lines, warnings and the
progress bar go through callbacks (the command wires them to the console).

Not handled: eviction (delete the folder to clear it), sharing between machines.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
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

CACHE_VERSION = "1"

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

    Files are written atomically; an unreadable entry counts as a miss and is overwritten.
    """

    def __init__(self, root: Path | None = None, enabled: bool = True) -> None:
        self.root = Path(root) if root is not None else default_cache_dir()
        self.enabled = enabled

    def _path(self, kind: str, key: str, suffix: str) -> Path:
        return self.root / kind / f"{key}{suffix}"

    def load_embeddings(self, key: str) -> np.ndarray | None:
        """Cached embeddings under `key`, or None (disabled, missing or unreadable)."""
        if not self.enabled:
            return None
        path = self._path("embeddings", key, ".npy")
        if not path.is_file():
            return None
        try:
            array = np.load(path, allow_pickle=False)
        except (OSError, ValueError):
            return None
        return array if array.ndim == 2 and array.dtype == np.float32 else None

    def save_embeddings(self, key: str, array: np.ndarray) -> None:
        """Store embeddings under `key` (atomically; no-op when disabled)."""
        if not self.enabled:
            return
        from embfilter_cli.files import atomic_path

        with atomic_path(self._path("embeddings", key, ".npy"), force=True) as tmp, tmp.open("wb") as handle:
            np.save(handle, np.ascontiguousarray(array, dtype=np.float32))

    def load_spectrum(self, key: str) -> tuple[Spectrum, dict[str, Any]] | None:
        """A cached (spectrum, head facts) under `key`, or None."""
        if not self.enabled:
            return None
        path = self._path("spectra", key, ".npz")
        if not path.is_file():
            return None
        from embfilter_cli.filters.spectral import Spectrum

        try:
            with np.load(path, allow_pickle=False) as npz:
                meta = json.loads(str(npz["meta"]))
                spectrum = Spectrum(
                    singular_values=np.array(npz["singular_values"], dtype=np.float64),
                    vectors=np.array(npz["vectors"], dtype=np.float64),
                    solver=meta["solver"],
                    params=meta["params"],
                    certificate=meta["certificate"],
                    frobenius_sq=float(meta["frobenius_sq"]),
                    seconds=0.0,
                )
        except (OSError, ValueError, KeyError, json.JSONDecodeError):
            return None
        return spectrum, meta["head"]

    def save_spectrum(self, key: str, spectrum: Spectrum, head: dict[str, Any]) -> None:
        """Store a spectrum and its head facts under `key` (atomically; no-op when disabled)."""
        if not self.enabled:
            return
        from embfilter_cli.files import atomic_path

        meta = {
            "solver": spectrum.solver,
            "params": spectrum.params,
            "certificate": spectrum.certificate,
            "frobenius_sq": spectrum.frobenius_sq,
            "head": head,
        }
        with atomic_path(self._path("spectra", key, ".npz"), force=True) as tmp, tmp.open("wb") as handle:
            np.savez(
                handle,
                singular_values=spectrum.singular_values,
                vectors=spectrum.vectors,
                meta=np.array(json.dumps(meta, default=json_default)),
            )

    def load_json(self, kind: str, key: str) -> dict[str, Any] | None:
        """A cached JSON object of `kind` under `key`, or None."""
        if not self.enabled:
            return None
        path = self._path(kind, key, ".json")
        with contextlib.suppress(OSError, ValueError):
            value = json.loads(path.read_text())
            return value if isinstance(value, dict) else None
        return None

    def save_json(self, kind: str, key: str, value: dict[str, Any]) -> None:
        """Store a JSON object of `kind` under `key` (atomically; no-op when disabled)."""
        if not self.enabled:
            return
        from embfilter_cli.files import atomic_path

        with atomic_path(self._path(kind, key, ".json"), force=True) as tmp:
            tmp.write_text(json.dumps(value, default=json_default))


def cached_head_spectrum(
    location: ModelLocation, cache: Cache, device: str = "auto", need_spectrum: bool = True
) -> tuple[HeadFacts, Spectrum | None, bool]:
    """W_U's facts and (optionally) its exact spectrum, from `cache` when possible.

    Returns (facts, spectrum, from_cache); see `filters.solve.head_spectrum`.
    """
    from embfilter_cli.filters.solve import head_spectrum
    from embfilter_cli.model.head import model_fingerprint

    key = cache_key(model=model_fingerprint(location), what="head")
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
) -> tuple[np.ndarray, dict[str, Any]]:
    """Raw pooled embeddings of every text of `data`, from the cache or by running the model once.

    `data` is anything with `.texts` and `.sha256` (the scored pairs, or `eval --background`'s
    texts); `what` names it in the log lines. Pass the same `encoders` dict to several calls to
    load the model at most once between them.

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
    raw = cache.load_embeddings(key)
    if raw is not None and raw.shape[0] == len(data.texts):
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
