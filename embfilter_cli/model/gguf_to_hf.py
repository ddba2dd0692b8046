"""The default converter of `model.gguf_convert`: a GGUF file to a Hugging Face folder, through transformers.

transformers' own GGUF loader dequantizes every tensor to float32; the folder keeps each tensor as
float32, or as float16/bfloat16 when that type holds all of its values exactly (a GGUF's F16 and
BF16 tensors), so it loads back to the same float32 model at up to half the disk. What it wrote is
checked before the caller caches it: tensors bit for bit, the tokenizer on probe strings.

Not handled: models transformers cannot load from GGUF (the error says so), lossy narrowing.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from embfilter_cli.errors import ConversionError, ModelNotFoundError
from embfilter_cli.jsonable import loads as json_loads

if TYPE_CHECKING:
    import torch

# Tokenizer probes for the conversion check: plain words, punctuation, non-ASCII, digits, whitespace.
_PROBES = ("The cat sat on the mat.", "Stocks fell 3.5% on Monday, said Über-naïve café owners.\n\tEnd")


def _narrowed(tensor: torch.Tensor) -> torch.Tensor | None:
    """`tensor` as float16 or bfloat16 when that type holds every one of its float32 values exactly, else None.

    A GGUF's F16/BF16 tensors come back from transformers' loader as float32 copies of 16-bit values:
    stored in 16 bits again they take half the disk and load to the same float32 numbers. Dequantized
    Q8_0/Q4 blocks (a 16-bit scale times a small integer) rarely fit 16 bits and stay float32.
    """
    import torch

    if tensor.dtype != torch.float32 or tensor.numel() == 0:
        return None
    for dtype in (torch.float16, torch.bfloat16):
        narrow = tensor.to(dtype)
        if torch.equal(narrow.to(torch.float32), tensor):
            return narrow
    return None


def convert_with_transformers(gguf_path: Path, out: Path) -> None:
    """Dequantize `gguf_path` with transformers' own GGUF loader and save it as a Hugging Face folder.

    Every tensor is saved as float32, or as float16/bfloat16 when that holds its values exactly
    (`_narrowed`: a GGUF's F16/BF16 tensors), so the folder loads (as float32, `config.json` says so)
    to the GGUF model bit for bit at up to half the disk. Checks what it wrote: the saved tensors,
    read back as float32, must equal the loaded model's bit for bit, and the saved tokenizer must
    give the GGUF tokenizer's ids on a few probe strings.
    """
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModel, AutoTokenizer

    from embfilter_cli.model.gguf_header import check_file
    from embfilter_cli.model.quiet import quiet_transformers

    check_file(gguf_path)  # one clean line for a corrupt or wrongly typed header, not transformers' traceback
    kwargs: dict[str, Any] = {"gguf_file": gguf_path.name}
    with contextlib.suppress(ImportError):  # transformers >= 5.x: ask for a plain dense model explicitly
        from transformers.utils.quantization_config import GgufConfig

        kwargs["quantization_config"] = GgufConfig(gguf_file=str(gguf_path), dequantize=True)
    try:
        with quiet_transformers():
            tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
            model = AutoModel.from_pretrained(str(gguf_path.parent), dtype=torch.float32, **kwargs)
    except (OSError, ValueError, KeyError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelNotFoundError(
            f"transformers could not load {gguf_path} ({type(exc).__name__}: {first}); embedding needs a decoder LLM "
            "GGUF file that transformers supports"
        ) from exc
    # A dequantized model is a plain one; drop any leftover quantizer so save_pretrained accepts it.
    for attr in ("hf_quantizer", "quantization_method"):
        if hasattr(model, attr):
            delattr(model, attr)
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    state = model.state_dict()  # the float32 tensors, kept to check the saved (possibly 16-bit) ones against
    with torch.no_grad():
        for param in model.parameters():
            if (narrow := _narrowed(param.data)) is not None:
                param.data = narrow
    with quiet_transformers():
        model.save_pretrained(str(out), safe_serialization=True)
        tokenizer.save_pretrained(str(out))
        saved_tokenizer = AutoTokenizer.from_pretrained(str(out))
    _say_float32(out / "config.json")
    saved: dict[str, torch.Tensor] = {}
    for shard in sorted(out.glob("*.safetensors")):
        saved.update(load_file(str(shard)))
    for name, tensor in state.items():
        if name in saved and not torch.equal(saved[name].to(tensor.dtype), tensor.detach().cpu()):
            raise ConversionError(f"the converted {name} differs from the GGUF model's; nothing was cached")
    missing = [n for n in state if n not in saved]
    if missing:
        # Tied parameters are saved once; anything else absent is a broken save.
        names = {id(t): n for n, t in state.items() if n in saved}
        missing = [n for n in missing if id(state[n]) not in names]
    if missing:
        raise ConversionError(f"the converted folder lacks {', '.join(missing[:3])}; nothing was cached")
    for probe in _PROBES:
        if tokenizer(probe)["input_ids"] != saved_tokenizer(probe)["input_ids"]:
            raise ConversionError(
                f"the saved tokenizer splits {probe!r} differently from the GGUF tokenizer; nothing was cached"
            )


def _say_float32(config: Path) -> None:
    """`config.json`'s dtype is float32: save_pretrained wrote the first tensor's (16-bit when narrowed), but a
    loader that follows the config must build the float32 model the GGUF gives."""
    try:
        value = json_loads(config.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        value = None
    if not isinstance(value, dict):
        raise ConversionError(f"the converted folder's {config.name} is unreadable; nothing was cached")
    for key in ("dtype", "torch_dtype"):
        if key in value:
            value[key] = "float32"
    config.write_text(json.dumps(value, indent=2) + "\n", encoding="utf-8")


__all__ = ["convert_with_transformers"]
