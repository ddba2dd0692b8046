"""Silence transformers while it loads a model (its logs and tqdm bars would clutter stderr)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """Silence transformers' info/warning logs and tqdm bars (they would clutter stderr)."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    # The GGUF converter calls tqdm.auto directly (not transformers' switchable wrapper), so its
    # bar ignores disable_progress_bar(); swap in a disabled tqdm for the duration of the load.
    gguf_utils: Any = None
    original_tqdm: Any = None
    with contextlib.suppress(ImportError):
        import functools

        from transformers import modeling_gguf_pytorch_utils as gguf_utils

        original_tqdm = getattr(gguf_utils, "tqdm", None)
        if original_tqdm is not None:
            gguf_utils.tqdm = functools.partial(original_tqdm, disable=True)
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()
        if gguf_utils is not None and original_tqdm is not None:
            gguf_utils.tqdm = original_tqdm
