"""Text embeddings from a decoder LLM: load the model, apply a recipe, pool the last hidden states.

Public API (stable; `embfilter inspect text` and `embfilter eval` build on it):

    encoder = load_encoder(spec, device="auto", dtype="float32", revision=None)
    vectors = encoder.embed(texts, pooling="mean", recipe="none", batch_size=16, max_length=512)
    # (n, d) float32, RAW: no filter, no normalisation

What `embed` returns is the base model's `last_hidden_state`, which for Llama, Qwen2, Mistral and
GPT-2 is taken AFTER the final norm (tests check this against the model's own norm on a tiny
Llama), pooled per text:
  - `mean`: average over the real (attention-masked) tokens; for the `echo` recipe only over the
    tokens of the second copy of the text;
  - `last`: the hidden state of the last real token (batches are left-padded).
Explicit position ids (cumulative attention mask) make every vector independent of how much
padding its batch needed, for rotary and absolute position embeddings alike.

Recipes (`text.recipes`) wrap each text in a template with a `{text}` slot (`RECIPES`, or any custom string that
contains `{text}`). Truncation to `max_length` tokens shortens the TEXT, never the template, so a
prompt's tail (e.g. `means in one word:"`) always survives. Texts are batched by token length
(longest first) to limit padding; results come back in input order.

Loading: Hugging Face folders and Hub ids through `transformers.AutoModel` (the base model, no LM
head). A GGUF file is converted once by transformers' own GGUF loader into a cached float32
Hugging Face folder (`model.gguf_convert`) and loaded from there (seconds instead of ~45 s for the
built-in model); `use_cache=False` loads it through `from_pretrained(folder, gguf_file=name)`.

Not handled: encoder-only or encoder-decoder models, single `.safetensors`/`.bin` files without
their folder (no config or tokenizer), chat templates (apply them yourself, or via a custom
recipe), sequence packing.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from embfilter_cli.errors import InputDataError, ModelNotFoundError
from embfilter_cli.model.locate import resolve_model
from embfilter_cli.model.location import ModelLocation
from embfilter_cli.model.quiet import quiet_transformers as _quiet_transformers
from embfilter_cli.text.recipes import Recipe, check_pooling, resolve_recipe

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedTokenizerBase


DTYPES = ("auto", "float32", "bfloat16", "float16")
ProgressFn = Callable[[int, int], None]  # (texts done, texts total)

_MAX_TRUNCATION_ROUNDS = 8


# --------------------------------------------------------------------------- pooling (pure)


def pool_hidden(hidden: np.ndarray, mask: np.ndarray, spans: Sequence[tuple[int, int]], pooling: str) -> np.ndarray:
    """Pool a padded batch of hidden states.

    Args:
        hidden: (b, t, d) hidden states (padded positions hold anything).
        mask: (b, t) 1 for real tokens, 0 for padding.
        spans: per row, the [start, end) positions (in padded coordinates) that mean pooling
            averages over; padding inside a span is ignored.
        pooling: "mean" or "last" (the last real token; spans are ignored).

    Returns:
        (b, d) float32.
    """
    hidden = np.asarray(hidden, dtype=np.float32)
    mask = np.asarray(mask)
    b, t, _ = hidden.shape
    if pooling == "last":
        # Index of the last real token; correct for left and right padding alike.
        last = t - 1 - np.argmax(mask[:, ::-1] > 0, axis=1)
        return hidden[np.arange(b), last]
    weights = np.zeros((b, t), dtype=np.float32)
    for row, (start, end) in enumerate(spans):
        weights[row, start:end] = mask[row, start:end] > 0
    counts = weights.sum(axis=1, keepdims=True)
    if np.any(counts == 0):
        row = int(np.argmax(counts[:, 0] == 0))
        raise InputDataError(f"text {row} of the batch has no tokens to pool over; it may be empty after truncation")
    return np.einsum("bt,btd->bd", weights, hidden) / counts


# --------------------------------------------------------------------------- the encoder


@dataclass
class Prepared:
    """One text turned into model input."""

    ids: list[int]
    span: tuple[int, int]  # token positions [start, end) that mean pooling averages over
    truncated: bool


class Encoder:
    """A loaded base model plus its tokenizer; `embed` turns texts into raw pooled vectors.

    Attributes:
        location: where the model came from (`locate.resolve_model`).
        tokenizer: the model's tokenizer.
        hidden_size: dimension d of the vectors `embed` returns.
        max_positions: the model's context length when its config states one, else None.
        last_truncated: how many texts the latest `embed` call had to shorten.
    """

    def __init__(
        self,
        location: ModelLocation,
        tokenizer: PreTrainedTokenizerBase,
        model: Any,
        device: torch.device,
        dtype: torch.dtype,
    ) -> None:
        self.location = location
        self.tokenizer = tokenizer
        self.model = model
        self.device = device
        self.dtype = dtype
        config = model.config
        self.hidden_size = int(getattr(config, "hidden_size", None) or config.n_embd)
        positions = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
        self.max_positions: int | None = int(positions) if positions else None
        self.last_truncated = 0
        pad = tokenizer.pad_token_id
        if pad is None:
            pad = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
        # The pad id only fills masked positions, so any valid id is fine.
        self.pad_id = int(pad)

    # ----------------------------------------------------------------- tokenization

    def effective_max_length(self, max_length: int) -> int:
        """`max_length`, capped at the model's context length."""
        if max_length < 1:
            raise InputDataError(f"--max-length must be at least 1, got {max_length}")
        return min(max_length, self.max_positions) if self.max_positions else max_length

    def _encode(self, prompt: str) -> tuple[list[int], list[tuple[int, int]] | None]:
        if self.tokenizer.is_fast:
            enc = self.tokenizer(prompt, add_special_tokens=True, return_offsets_mapping=True)
            return list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]
        return list(self.tokenizer(prompt, add_special_tokens=True)["input_ids"]), None

    def _token_span(
        self, prompt: str, ids: list[int], offsets: list[tuple[int, int]] | None, chars: tuple[int, int]
    ) -> tuple[int, int]:
        """Token positions whose characters overlap `chars` (the last copy of the text)."""
        c0, c1 = chars
        if offsets is not None:
            # Special tokens have empty (0, 0) offsets and never overlap; a token straddling the
            # boundary (a merged leading space) counts as part of the copy.
            inside = [j for j, (a, b) in enumerate(offsets) if b > a and a < c1 and b > c0]
            if inside:
                return inside[0], inside[-1] + 1
            return 0, len(ids)
        # Slow tokenizers give no offsets: count the tokens of the prompt's prefixes instead.
        special = set(self.tokenizer.all_special_ids)
        leading = next((j for j, t in enumerate(ids) if t not in special), len(ids))
        prefix = self.tokenizer(prompt[:c0], add_special_tokens=False)["input_ids"]
        if ids[leading : leading + len(prefix)] == prefix:
            start = leading + len(prefix)
        else:
            # The prefix's trailing space merged into the text's first token (byte-level BPE "Ġword").
            start = leading + len(self.tokenizer(prompt[:c0].rstrip(), add_special_tokens=False)["input_ids"])
        end = leading + len(self.tokenizer(prompt[:c1], add_special_tokens=False)["input_ids"])
        return min(start, len(ids)), min(max(end, start + 1), len(ids))

    def _cut_text(self, text: str, budget: int) -> str:
        """The longest prefix of `text` that is at most `budget` tokens on its own."""
        if self.tokenizer.is_fast:
            enc = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
            offsets = enc["offset_mapping"]
            if len(offsets) <= budget:
                return text
            return text[: offsets[budget - 1][1]]
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) <= budget:
            return text
        # A cut inside a multi-byte character decodes to U+FFFD; drop it rather than invent text.
        return str(self.tokenizer.decode(ids[:budget], clean_up_tokenization_spaces=False)).rstrip("\ufffd")

    def prepare(self, text: str, recipe: Recipe, max_length: int) -> Prepared:
        """Render, tokenize and if needed truncate one text (the template is never cut)."""
        prompt, chars = recipe.render(text)
        ids, offsets = self._encode(prompt)
        truncated = False
        if len(ids) > max_length:
            truncated = True
            overhead = len(self._encode(recipe.render("")[0])[0])
            copies = max(recipe.copies, 1)
            budget = (max_length - overhead) // copies
            for _ in range(_MAX_TRUNCATION_ROUNDS):
                if budget < 1:
                    break
                cut = self._cut_text(text, budget)
                prompt, chars = recipe.render(cut)
                ids, offsets = self._encode(prompt)
                if len(ids) <= max_length:
                    break
                # Tokens can merge across the text/template boundary; shrink by the excess and retry.
                budget -= max(1, math.ceil((len(ids) - max_length) / copies))
            if budget < 1 or len(ids) > max_length:
                raise InputDataError(
                    f"the {recipe.name} template alone takes {overhead} tokens, leaving no room for the text within "
                    f"--max-length {max_length}; raise --max-length or use a shorter template"
                )
        span = self._token_span(prompt, ids, offsets, chars) if recipe.pool_last_copy else (0, len(ids))
        return Prepared(ids, span, truncated)

    # ----------------------------------------------------------------- the forward pass

    def embed(
        self,
        texts: list[str],
        pooling: str = "mean",
        recipe: str = "none",
        batch_size: int = 16,
        max_length: int = 512,
        progress: ProgressFn | None = None,
    ) -> np.ndarray:
        """Embed `texts` into raw pooled vectors.

        Args:
            texts: the texts, in order; each must be non-empty.
            pooling: "mean" (attention-masked; second copy only for echo) or "last" (last token,
                left padding).
            recipe: a name from `RECIPES` or a custom template containing `{text}`.
            batch_size: texts per forward pass (batched by length, longest first).
            max_length: token budget per prompt, template included; longer texts are cut so the
                template survives (see `last_truncated`). Capped at the model's context length.
            progress: a callback `(texts done, texts total)`, called after every batch (the CLI
                wires it to a progress bar on stderr).

        Returns:
            (len(texts), hidden_size) float32 array: post-final-norm last hidden states, pooled;
            no filter, no normalisation.
        """
        import torch

        check_pooling(pooling)
        rec = resolve_recipe(recipe)
        if batch_size < 1:
            raise InputDataError(f"--batch-size must be at least 1, got {batch_size}")
        limit = self.effective_max_length(max_length)
        for i, text in enumerate(texts):
            if not isinstance(text, str) or not text.strip():
                raise InputDataError(f"text {i} is empty; remove empty texts before embedding")
        prepared = [self.prepare(t, rec, limit) for t in texts]
        self.last_truncated = sum(p.truncated for p in prepared)
        out = np.zeros((len(texts), self.hidden_size), dtype=np.float32)
        order = sorted(range(len(texts)), key=lambda i: -len(prepared[i].ids))
        done = 0
        left_pad = pooling == "last"
        with torch.inference_mode():
            for b0 in range(0, len(order), batch_size):
                rows = order[b0 : b0 + batch_size]
                batch = [prepared[i] for i in rows]
                ids, mask, spans = pad_batch(batch, self.pad_id, left=left_pad)
                input_ids = torch.tensor(ids, dtype=torch.long, device=self.device)
                attention = torch.tensor(mask, dtype=torch.long, device=self.device)
                # Positions count real tokens only, so padding never shifts a text's positions.
                positions = (attention.cumsum(-1) - 1).clamp(min=0)
                result = self.model(input_ids=input_ids, attention_mask=attention, position_ids=positions)
                hidden = result.last_hidden_state.float().cpu().numpy()
                out[rows] = pool_hidden(hidden, mask, spans, pooling)
                done += len(rows)
                if progress is not None:
                    progress(done, len(texts))
        return out


def pad_batch(
    batch: Sequence[Prepared], pad_id: int, left: bool
) -> tuple[list[list[int]], np.ndarray, list[tuple[int, int]]]:
    """Pad token lists to a common length; returns (ids, mask (b, t), spans shifted by the padding)."""
    width = max(len(p.ids) for p in batch)
    ids: list[list[int]] = []
    mask = np.zeros((len(batch), width), dtype=np.int64)
    spans: list[tuple[int, int]] = []
    for row, p in enumerate(batch):
        pad = width - len(p.ids)
        if left:
            ids.append([pad_id] * pad + p.ids)
            mask[row, pad:] = 1
            spans.append((p.span[0] + pad, p.span[1] + pad))
        else:
            ids.append(p.ids + [pad_id] * pad)
            mask[row, : len(p.ids)] = 1
            spans.append(p.span)
    return ids, mask, spans


# --------------------------------------------------------------------------- loading


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """`auto` → float32 on CPU/MPS, bfloat16 on CUDA; otherwise the named dtype."""
    import torch

    if dtype not in DTYPES:
        raise InputDataError(f"--dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, dtype)


def load_encoder(
    spec: str | None,
    device: str = "auto",
    dtype: str = "float32",
    revision: str | None = None,
    *,
    cache_dir: str | os.PathLike[str] | None = None,
    use_cache: bool = True,
    notify: Callable[[str], None] | None = None,
) -> Encoder:
    """Resolve `spec` (alias, Hub id, folder, .gguf; None = built-in default) and load it."""
    return load_encoder_at(
        resolve_model(spec, revision=revision),
        device=device,
        dtype=dtype,
        revision=revision,
        cache_dir=cache_dir,
        use_cache=use_cache,
        notify=notify,
    )


def model_target(
    location: ModelLocation,
    revision: str | None = None,
    *,
    cache_dir: str | os.PathLike[str] | None = None,
    use_cache: bool = True,
    notify: Callable[[str], None] | None = None,
    require_folder: bool = False,
) -> tuple[str, dict[str, Any]]:
    """What to hand `from_pretrained` for `location`: (folder or Hub id, extra kwargs).

    A GGUF file becomes its cached Hugging Face conversion (`model.gguf_convert`, built on first
    use unless it would take over half the cache's size limit; `use_cache=False` loads the GGUF
    itself every time). `require_folder`: convert whatever the size (a caller that ships the folder).
    """
    if location.kind in ("safetensors_file", "bin_file"):
        raise ModelNotFoundError(
            f"{location.path} is a single weights file; embedding needs the model's config.json and tokenizer "
            f"too, so pass the folder that holds them (e.g. --model {location.path.parent})"
        )
    kwargs: dict[str, Any] = {}
    if location.kind == "gguf_file":
        if use_cache:
            from embfilter_cli.model.gguf_convert import cached_conversion

            folder = cached_conversion(location.path, cache_dir, notify=notify, any_size=require_folder)
            if folder is not None:
                return str(folder), kwargs  # (None: the cache cannot be written, or the folder would not fit it)
        from embfilter_cli.model.gguf_header import check_file

        check_file(location.path)  # as the conversion does: transformers never meets a corrupt header
        kwargs["gguf_file"] = location.path.name
        return str(location.path.parent), kwargs
    if Path(location.source).exists():
        from embfilter_cli.model.location import plain_folder

        return str(plain_folder(location.path)), kwargs  # a FIFO config.json must not reach transformers
    # A Hub id: locate.py fetched only the head; transformers downloads the rest into its cache.
    rev = location.revision if location.revision not in ("", "local") else revision
    if rev:
        kwargs["revision"] = rev
    return location.source, kwargs


def load_encoder_at(
    location: ModelLocation,
    device: str = "auto",
    dtype: str = "float32",
    revision: str | None = None,
    *,
    cache_dir: str | os.PathLike[str] | None = None,
    use_cache: bool = True,
    notify: Callable[[str], None] | None = None,
) -> Encoder:
    """Load the base model and tokenizer found at `location` (see module docstring).

    A GGUF file is loaded from its cached Hugging Face conversion under `cache_dir` unless
    `use_cache` is False; `notify` receives the one-line messages about building that conversion.
    """
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    from embfilter_cli.filters.spectral import resolve_device

    dev = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, dev)
    target, kwargs = model_target(location, revision, cache_dir=cache_dir, use_cache=use_cache, notify=notify)
    try:
        with _quiet_transformers():
            tokenizer = AutoTokenizer.from_pretrained(target, **kwargs)
            # Parse the config once and hand it to the model (a GGUF header parse takes seconds).
            config = AutoConfig.from_pretrained(target, **kwargs)
            model = AutoModel.from_pretrained(target, config=config, dtype=torch_dtype, **kwargs)
    except (OSError, ValueError, KeyError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelNotFoundError(
            f"transformers could not load {location.source} as a model with a tokenizer ({type(exc).__name__}: "
            f"{first}); embedding needs a decoder LLM folder, Hub id or GGUF file"
        ) from exc
    if getattr(model.config, "is_encoder_decoder", False):
        raise ModelNotFoundError(f"{location.source} is an encoder-decoder model; embfilter embeds with decoder LLMs")
    model.to(dev)
    model.eval()
    return Encoder(location, tokenizer, model, dev, torch_dtype)


__all__ = [
    "Encoder",
    "Prepared",
    "load_encoder",
    "load_encoder_at",
    "model_target",
    "pad_batch",
    "pool_hidden",
]
