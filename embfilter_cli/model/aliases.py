"""Short names for well-known models: alias -> Hugging Face Hub id.

Only ids whose unembedding layout embfilter understands are listed. `embfilter models` prints
this table; any other Hub id works too when given in full (`org/name`).
"""

from __future__ import annotations

DEFAULT_MODEL_ALIAS = "smollm2-135m"

MODEL_ALIASES: dict[str, str] = {
    "smollm2-135m": "HuggingFaceTB/SmolLM2-135M-Instruct",
    "smollm2-360m": "HuggingFaceTB/SmolLM2-360M-Instruct",
    "qwen2-7b": "Qwen/Qwen2-7B-Instruct",
    "qwen2.5-0.5b": "Qwen/Qwen2.5-0.5B-Instruct",
    "qwen2.5-7b": "Qwen/Qwen2.5-7B-Instruct",
    "llama-3.1-8b": "meta-llama/Llama-3.1-8B-Instruct",
    "llama-3.2-1b": "meta-llama/Llama-3.2-1B-Instruct",
    "mistral-7b": "mistralai/Mistral-7B-Instruct-v0.2",
    "gemma-2-2b": "google/gemma-2-2b-it",
    "gpt2": "openai-community/gpt2",
}
