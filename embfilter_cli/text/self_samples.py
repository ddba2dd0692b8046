"""A data-free background: texts the model samples itself (`--center-on self`).

What a filter should remove is the model's "average token"; the most direct data-free estimate of
the model's average text is text the model writes. `sample_token_ids` draws `count` continuations
of `new_tokens` tokens from a fixed start (the BOS token, or a given text) by plain ancestral
sampling at `temperature`, with no chat template, top-k or top-p. `self_texts` wraps it with an
on-disk cache under `$EMBFILTER_CACHE/self-texts/`, so centring a second filter (another recipe,
another band) on the same samples does not run the sampler again.

Determinism: sample i draws its uniforms from its own CPU `torch.Generator`, seeded from
(`seed`, i) (`sample_seed`); its token t is the inverse CDF of its float64 softmax at u[i, t]. So a
sample does not depend on which other samples share its batch, the first n samples of a larger
draw are the n-sample draw, and a longer run's first tokens are a shorter run's tokens. Batches have a fixed size
(`SAMPLE_BATCH`): every row of a batch has the same length (same start, no padding), so the
model sees the same shapes on every run. Same machine, same library versions, same dtype: same
texts, byte for byte. Logits on another device or dtype can differ in their last bits and, rarely,
flip a draw; the cache key and the artifact's record hold the dtype and the device type.

Not handled: chat templates, nucleus/top-k sampling, models without a causal-LM head
(`ModelNotFoundError` says so), sequence-to-sequence models.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from embfilter_cli.errors import InputDataError, ModelNotFoundError

# Only the standard library at import time: the CLI reads `SelfSampling`'s defaults for --help.

if TYPE_CHECKING:
    import torch

    from embfilter_cli.model.location import ModelLocation
    from embfilter_cli.text.embedding import Encoder

SAMPLER = "ancestral/1"  # bump when the sampling rule changes: old cache entries then miss
SAMPLE_BATCH = 32  # fixed, so the batched forward passes (and their rounding) never vary
CACHE_KIND = "self-texts"
ProgressFn = Callable[[int, int], None]  # (samples done, samples total)


@dataclass(frozen=True)
class SelfSampling:
    """How to sample the background (the defaults are chosen in bench/RESULTS.md, "Self-centring").

    Attributes:
        count: number of samples.
        new_tokens: tokens generated per sample (fewer when the model ends the text earlier).
        temperature: softmax temperature (> 0); 1 samples the model's own distribution.
        seed: seed of the CPU generator that draws every sample.
        start: "bos" (the tokenizer's BOS token) or a literal text every sample continues.
    """

    count: int = 200
    new_tokens: int = 64
    temperature: float = 1.0
    seed: int = 0
    start: str = "bos"

    def checked(self) -> SelfSampling:
        """Self, after checking every field; InputDataError names the bad one."""
        if self.count < 1 or self.new_tokens < 1:
            raise InputDataError(
                f"self-sampling needs at least 1 sample of at least 1 token, got {self.count} × {self.new_tokens}"
            )
        if not (self.temperature > 0 and self.temperature < float("inf")):
            raise InputDataError(f"the sampling temperature must be a finite number > 0, got {self.temperature}")
        if self.seed < 0 or not self.start:
            raise InputDataError("the sampling seed must be >= 0 and the start 'bos' or a non-empty text")
        return self

    def as_dict(self) -> dict[str, Any]:
        """The settings plus the sampler's name, as recorded in caches and artifacts."""
        return {"sampler": SAMPLER, **asdict(self)}


@dataclass
class SelfTexts:
    """Sampled texts and where they came from."""

    texts: list[str]
    sha256: str  # `texts_sha256(texts)`
    record: dict[str, Any]  # settings, model fingerprint, dtype, device type: what determines the texts
    cached: bool
    seconds: float
    encoder: Encoder | None = None  # the model that sampled them (None from the cache), to embed with


# --------------------------------------------------------------------------- sampling (the model in hand)


def start_ids(tokenizer: Any, start: str, where: str) -> list[int]:
    """Token ids every sample continues: [BOS] for "bos", else the text's tokens (with BOS if it has one)."""
    bos = tokenizer.bos_token_id
    if start == "bos":
        if bos is None:
            raise ModelNotFoundError(
                f"{where}'s tokenizer has no BOS token to start sampling from; give a start text "
                "(--self-start 'The') or centre on your own texts (--center-on FILE)"
            )
        return [int(bos)]
    ids = [int(i) for i in tokenizer(start, add_special_tokens=False)["input_ids"]]
    return ([int(bos)] if bos is not None else []) + ids


def stop_ids(tokenizer: Any, lm: Any) -> set[int]:
    """Token ids that end a sample: the tokenizer's EOS and the model's generation config's."""
    stops = {int(tokenizer.eos_token_id)} if tokenizer.eos_token_id is not None else set()
    config_eos = getattr(getattr(lm, "generation_config", None), "eos_token_id", None)
    if config_eos is not None:
        stops.update(int(i) for i in (config_eos if isinstance(config_eos, list | tuple) else [config_eos]))
    return stops


def sample_token_ids(
    lm: Any,
    start: list[int],
    sampling: SelfSampling,
    *,
    vocab_size: int,
    stops: set[int],
    device: torch.device | str = "cpu",
    progress: ProgressFn | None = None,
) -> list[list[int]]:
    """Ancestral samples of a causal LM: `sampling.count` lists of new token ids (stop token excluded).

    Args:
        lm: a transformers causal LM (`model(input_ids, past_key_values=..., use_cache=True)` returns
            `.logits` and `.past_key_values`).
        start: the prompt ids every sample continues.
        vocab_size: ids at or above it (padding rows of the head) are never drawn.
        stops: ids that end a sample.
        device: where `lm` lives.
        progress: `(samples done, samples total)` after each batch.
    """
    import torch

    sampling.checked()
    cache_name = _cache_argument(lm)
    # One uniform per (sample, step), drawn up front from the sample's own generator: see the module docstring.
    uniforms = torch.stack(
        [
            torch.rand(
                sampling.new_tokens,
                generator=torch.Generator().manual_seed(sample_seed(sampling.seed, i)),
                dtype=torch.float64,
            )
            for i in range(sampling.count)
        ]
    )
    out: list[list[int]] = []
    with torch.inference_mode():
        for b0 in range(0, sampling.count, SAMPLE_BATCH):
            rows = min(SAMPLE_BATCH, sampling.count - b0)
            ids = torch.tensor([start] * rows, dtype=torch.long, device=device)
            result = lm(input_ids=ids, use_cache=True)
            tokens: list[list[int]] = [[] for _ in range(rows)]
            done = [False] * rows
            for step in range(sampling.new_tokens):
                logits = result.logits[:, -1, :vocab_size].to("cpu", torch.float64) / sampling.temperature
                cdf = torch.softmax(logits, dim=-1).cumsum(dim=-1)
                drawn = torch.searchsorted(cdf, (uniforms[b0 : b0 + rows, step] * cdf[:, -1]).unsqueeze(1))
                drawn = drawn.squeeze(1).clamp(max=vocab_size - 1)
                for r, token in enumerate(drawn.tolist()):
                    if not done[r]:
                        done[r] = token in stops
                        if not done[r]:
                            tokens[r].append(token)
                if all(done) or step + 1 == sampling.new_tokens:
                    break
                next_ids = drawn.unsqueeze(1).to(device)
                past = getattr(result, "cache", None) or result.past_key_values
                result = lm(input_ids=next_ids, use_cache=True, **{cache_name: past})
            out.extend(tokens)
            if progress is not None:
                progress(len(out), sampling.count)
    return out


def sample_seed(seed: int, index: int) -> int:
    """The seed of sample `index`'s generator: 63 bits of SHA-256 of (seed, index)."""
    import hashlib

    return int.from_bytes(hashlib.sha256(f"{seed}:{index}".encode()).digest()[:8], "little") >> 1


def _cache_argument(lm: Any) -> str:
    """The forward argument that takes the KV cache: `cache` (transformers >= 5.x), else `past_key_values`."""
    import inspect

    return "cache" if "cache" in inspect.signature(lm.forward).parameters else "past_key_values"


def decode_samples(tokenizer: Any, samples: list[list[int]]) -> list[str]:
    """Decoded samples (special tokens dropped); a sample that decodes to blank text is left out."""
    texts = [str(tokenizer.decode(s, skip_special_tokens=True, clean_up_tokenization_spaces=False)) for s in samples]
    return [t for t in texts if t.strip()]


# --------------------------------------------------------------------------- loading a model that can generate


def load_generator_at(
    location: ModelLocation,
    device: str = "auto",
    dtype: str = "float32",
    *,
    cache_dir: str | Path | None = None,
    use_cache: bool = True,
    notify: Callable[[str], None] | None = None,
) -> tuple[Any, Encoder]:
    """The causal LM at `location` and an `Encoder` on its base model (one load serves both).

    Raises:
        ModelNotFoundError: one line saying why this model cannot write text (no causal-LM head,
            weights missing for some layers, no tokenizer, a single weights file).
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from embfilter_cli.filters.spectral import resolve_device
    from embfilter_cli.model.quiet import quiet_transformers
    from embfilter_cli.text.embedding import Encoder, model_target, resolve_dtype

    dev = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, dev)
    cannot = f"{location.source} cannot write texts for --center-on self"
    if location.kind in ("safetensors_file", "bin_file"):
        raise ModelNotFoundError(f"{cannot}: it is a single weights file; pass the model folder, or --center-on FILE")
    target, kwargs = model_target(location, cache_dir=cache_dir, use_cache=use_cache, notify=notify)
    try:
        with quiet_transformers():
            tokenizer = AutoTokenizer.from_pretrained(target, **kwargs)
            config = AutoConfig.from_pretrained(target, **kwargs)
            loaded: Any = AutoModelForCausalLM.from_pretrained(
                target, config=config, dtype=torch_dtype, output_loading_info=True, **kwargs
            )
    except (OSError, ValueError, KeyError, TypeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelNotFoundError(
            f"{cannot} ({type(exc).__name__}: {first[:200]}); it needs a causal LM with its tokenizer, "
            "or centre on your own texts with --center-on FILE"
        ) from exc
    lm, loading = loaded
    missing = sorted(loading.get("missing_keys") or [])
    if missing:
        # transformers would fill them with random numbers: samples and embeddings would be noise.
        raise ModelNotFoundError(
            f"{cannot}: its weights lack {len(missing)} tensor(s) ({', '.join(missing[:3])}"
            f"{', …' if len(missing) > 3 else ''}); pass the complete model, or --center-on FILE"
        )
    lm.to(dev)
    lm.eval()
    base = lm.get_decoder() if hasattr(lm, "get_decoder") else lm.base_model
    return lm, Encoder(location, tokenizer, base, dev, torch_dtype)


# --------------------------------------------------------------------------- the cache and the entry point


def cache_key(fingerprint: str, sampling: SelfSampling, dtype: str, device_type: str) -> str:
    """The cache file's name: SHA-256 of the model fingerprint and everything that determines the texts."""
    import hashlib

    payload = {"model": fingerprint, **sampling.as_dict(), "dtype": dtype, "device": device_type}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:32]


def cache_path(root: Path, key: str) -> Path:
    """Where the texts for `key` are kept: `<cache>/self-texts/<key>.json`."""
    return root / CACHE_KIND / f"{key}.json"


def read_cached(path: Path, record: dict[str, Any]) -> list[str] | None:
    """The cached texts, or None when the file is missing, damaged or for other settings."""
    from embfilter_cli.filters.centering import texts_sha256

    try:
        stored = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return None
    if not isinstance(stored, dict) or stored.get("settings") != record:
        return None
    texts = stored.get("texts")
    if not isinstance(texts, list) or not all(isinstance(t, str) and t.strip() for t in texts) or not texts:
        return None
    return texts if stored.get("texts_sha256") == texts_sha256(texts) else None


def write_cached(path: Path, record: dict[str, Any], texts: list[str], source: str) -> None:
    """Store the texts atomically with a small header (kind, source, settings, created); best effort."""
    import contextlib

    from embfilter_cli.files import OutputWriteError, atomic_path
    from embfilter_cli.filters.centering import texts_sha256

    header = {
        "kind": CACHE_KIND,
        "source": source,
        "settings": record,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "count": len(texts),
        "texts_sha256": texts_sha256(texts),
    }
    # A cache that cannot be written only costs sampling again next time.
    with contextlib.suppress(OSError, OutputWriteError):
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path, force=True) as tmp:
            tmp.write_text(json.dumps({**header, "texts": texts}, ensure_ascii=False, indent=0), encoding="utf-8")


def save_texts_jsonl(texts: list[str], path: str | Path, force: bool = False) -> None:
    """Write texts as JSONL ({"text": ...} per line: a sample may hold newlines), atomically.

    `embfilter fit/center --center-on FILE.jsonl` reads them back as the same texts.
    """
    from embfilter_cli.files import atomic_path

    with atomic_path(path, force=force) as tmp:
        tmp.write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in texts), encoding="utf-8")


def self_texts(
    location: ModelLocation,
    sampling: SelfSampling | None = None,
    *,
    device: str = "auto",
    dtype: str = "auto",
    cache_dir: str | Path | None = None,
    use_cache: bool = True,
    progress: ProgressFn | None = None,
    notify: Callable[[str], None] | None = None,
) -> SelfTexts:
    """Texts the model at `location` samples itself, from the cache when they were drawn before.

    Args:
        location: the model (`model.locate.resolve_model`).
        sampling: the settings (default `SelfSampling()`).
        device, dtype: as `embfilter embed` takes them; the sampling runs in this dtype.
        cache_dir: the embfilter cache (default `$EMBFILTER_CACHE` or `~/.cache/embfilter`).
        use_cache: False: neither read nor write `self-texts/` (nor the GGUF conversion).
        progress: `(samples done, samples total)`, called only when the sampler runs.
        notify: one-line messages about building the GGUF conversion and about the cache's size limit.

    Returns:
        The texts, their SHA-256, the record of what determined them, and (when the sampler ran)
        the loaded encoder, so the caller embeds with the same model without loading it again.
    """
    from embfilter_cli import cache_store
    from embfilter_cli.files import default_cache_dir
    from embfilter_cli.filters.centering import texts_sha256
    from embfilter_cli.filters.spectral import resolve_device
    from embfilter_cli.model.head import model_fingerprint
    from embfilter_cli.text.embedding import resolve_dtype

    sampling = (sampling or SelfSampling()).checked()
    dev = resolve_device(device)
    dtype_name = str(resolve_dtype(dtype, dev)).replace("torch.", "")
    fingerprint = model_fingerprint(location)
    record = {**sampling.as_dict(), "dtype": dtype_name, "device": dev.type, "model_fingerprint": fingerprint}
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    path = cache_path(root, cache_key(fingerprint, sampling, dtype_name, dev.type))
    started = time.perf_counter()
    if use_cache and (texts := read_cached(path, record)) is not None:
        cache_store.used(root, path)  # its last use, for `embfilter cache` and least-recently-used pruning
        return SelfTexts(texts, texts_sha256(texts), record, True, time.perf_counter() - started)
    lm, encoder = load_generator_at(
        location, device=device, dtype=dtype, cache_dir=cache_dir, use_cache=use_cache, notify=notify
    )
    tokenizer = encoder.tokenizer
    ids = sample_token_ids(
        lm,
        start_ids(tokenizer, sampling.start, location.source),
        sampling,
        vocab_size=min(len(tokenizer), int(lm.config.vocab_size)),
        stops=stop_ids(tokenizer, lm),
        device=dev,
        progress=progress,
    )
    texts = decode_samples(tokenizer, ids)
    if not texts:
        raise InputDataError(
            f"{location.source} ended all {sampling.count} samples before writing any text; "
            "try --self-start with a start text, or --center-on FILE"
        )
    if use_cache:
        write_cached(path, record, texts, location.source)
        if path.exists():
            cache_store.used(root, path)
            cache_store.enforce_limit(root, path, notify)
    return SelfTexts(texts, texts_sha256(texts), record, False, time.perf_counter() - started, encoder)


__all__ = [
    "CACHE_KIND",
    "SAMPLER",
    "SelfSampling",
    "SelfTexts",
    "decode_samples",
    "load_generator_at",
    "sample_token_ids",
    "save_texts_jsonl",
    "self_texts",
]
