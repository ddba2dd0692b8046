"""Tiny, seeded, offline model checkpoints built from transformers configs.

Every builder asserts the parameter count it promises, so a misspelled config key can never
silently produce a full-size model (the tuned-lens mistake).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

CORPUS = [
    "The cat sat on the mat.",
    "A dog ran in the park.",
    "the quick brown fox jumps over the lazy dog",
    "Stock markets fell sharply on Monday.",
    "The recipe needs two eggs and some flour.",
    "Rain is expected over the weekend.",
] * 10


def tiny_tokenizer(vocab_size: int = 300):
    """A byte-level BPE tokenizer trained on CORPUS (deterministic)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<unk>", "<s>", "</s>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )


def _count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def seed_weights(model: torch.nn.Module, seed: int, std: float = 0.02) -> None:
    """Every matrix parameter drawn from numpy's seeded N(0, std²); vectors (norms, biases) kept.

    torch's own initialisers run CPU-specific vectorised kernels, so the "same" seeded tiny model
    has other weights (another W_U sha256) on a CPU that takes another code path. numpy's PCG64
    stream is the same everywhere, so every fixture, golden and digest of W_U holds on any machine.
    """
    import numpy as np

    rng = np.random.default_rng(seed)
    with torch.no_grad():
        for _, param in sorted(model.named_parameters(), key=lambda item: item[0]):
            if param.dim() >= 2:
                values = rng.standard_normal(tuple(param.shape)) * std
                param.copy_(torch.from_numpy(values.astype(np.float32)).to(param.dtype))


def make_llama(
    path: Path,
    *,
    hidden: int = 32,
    vocab: int = 300,
    padded_vocab: int | None = None,
    tie: bool = False,
    layers: int = 2,
    shard_size: str | None = None,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    max_params: int = 200_000,
) -> Path:
    """A Llama-architecture checkpoint folder with a matching tokenizer.

    `padded_vocab` > vocab gives W_U extra never-emitted rows (like Qwen2-7B's 152064 for ~151.6k
    tokens). `shard_size` (e.g. "20KB") forces a sharded checkpoint with an index.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    tokenizer = tiny_tokenizer(vocab)
    rows = padded_vocab or len(tokenizer)
    config = LlamaConfig(
        vocab_size=rows,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        tie_word_embeddings=tie,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=3,
    )
    model = LlamaForCausalLM(config)
    seed_weights(model, seed, config.initializer_range)
    model = model.to(dtype)
    n = _count(model)
    assert n <= max_params, f"tiny Llama has {n} parameters, more than the promised {max_params}"
    kwargs = {"max_shard_size": shard_size} if shard_size else {}
    model.save_pretrained(path, **kwargs)
    tokenizer.save_pretrained(path)
    return path


def make_gpt2(
    path: Path, *, hidden: int = 32, vocab: int = 300, layers: int = 2, seed: int = 0, max_params: int = 200_000
) -> Path:
    """A GPT-2-style checkpoint: tied, no lm_head.weight key, head is transformer.wte.weight."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    tokenizer = tiny_tokenizer(vocab)
    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_embd=hidden,
        n_layer=layers,
        n_head=4,
        n_positions=128,
        bos_token_id=1,
        eos_token_id=2,
    )
    model = GPT2LMHeadModel(config)
    seed_weights(model, seed, config.initializer_range)
    n = _count(model)
    assert n <= max_params, f"tiny GPT-2 has {n} parameters, more than the promised {max_params}"
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def read_config(path: Path) -> dict:
    return json.loads((path / "config.json").read_text())


def make_gguf(
    path: Path, *, rows: int = 64, hidden: int = 32, tokens: int | None = None, head: str = "quantized", seed: int = 0
):
    """A minimal GGUF file with a W_U and a token list, written by gguf's own writer.

    head: "quantized" -> only token_embd.weight in Q8_0 (tied, like SmolLM2's file);
          "f16" -> an untied output.weight in F16 beside a Q8_0 token_embd.weight;
          "f32" -> the same in F32 (read as a view of the file, not a copy).
    Returns (path, the float32 matrix that the head tensor dequantizes to).
    """
    import numpy as np
    from gguf import GGMLQuantizationType, GGUFWriter
    from gguf.quants import dequantize, quantize

    rng = np.random.default_rng(seed)
    emb = rng.standard_normal((rows, hidden)).astype(np.float32)
    writer = GGUFWriter(str(path), "llama")
    writer.add_block_count(1)
    writer.add_embedding_length(hidden)
    writer.add_token_list([f"tok{i}" for i in range(tokens if tokens is not None else rows)])
    q = quantize(emb, GGMLQuantizationType.Q8_0)
    writer.add_tensor("token_embd.weight", q, raw_shape=q.shape, raw_dtype=GGMLQuantizationType.Q8_0)
    expected = dequantize(q, GGMLQuantizationType.Q8_0).reshape(rows, hidden)
    if head in ("f16", "f32"):
        out = rng.standard_normal((rows, hidden)).astype(np.float16 if head == "f16" else np.float32)
        writer.add_tensor("output.weight", out)
        expected = out.astype(np.float32)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path, expected
