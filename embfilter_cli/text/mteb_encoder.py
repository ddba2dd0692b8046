"""An encoder that mteb (2.x) can evaluate: embfilter's LLM embeddings, optionally filtered.

```python
import mteb
from embfilter_cli.text.mteb_encoder import MtebEncoder

model = MtebEncoder("qwen2.5-0.5b", filter="artifacts/qwen-r64-b16.safetensors", pooling="mean")
results = mteb.evaluate(model, mteb.get_tasks(tasks=["STSBenchmark"]))
```

`MtebEncoder` follows mteb's `EncoderProtocol` structurally (`encode(inputs, *, task_metadata,
hf_split, hf_subset, prompt_type, **kwargs)`, `similarity`, `similarity_pairwise`,
`mteb_model_meta`), so this module imports mteb only when an encoder is made. `encode` returns
exactly what `embfilter embed --model M --filter F --pooling P --recipe R` writes (float32 rows; the
filter's mean is subtracted when it has one; cosine similarity, so `--normalize` does not matter).
The model is loaded once per encoder and reused across tasks.

Not handled: task-specific prompts (one recipe for every task; mteb's prompt_type is ignored),
non-text modalities. Empty texts, which `embed` refuses, become zero vectors.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from embfilter_cli.errors import MissingDependencyError

if TYPE_CHECKING:
    from embfilter_cli.filters.artifact import FilterArtifact

MTEB_INSTALL = "pip install 'embfilter[mteb]'"


def _require_mteb() -> Any:
    try:
        import mteb
    except ImportError as exc:
        raise MissingDependencyError(f"evaluating with MTEB needs the mteb package; run `{MTEB_INSTALL}`") from exc
    return mteb


class MtebEncoder:
    """embfilter's encoder (+ an optional filter) behind mteb's encoder protocol.

    Args:
        model_name: alias, Hub id, folder or .gguf (None: the built-in default), as `--model`.
        revision: Hub revision.
        device: "auto", "cpu", "cuda", ….
        filter: a filter artifact (path or loaded); refused if fitted on another model.
        pooling: "mean" or "last".
        recipe: a recipe name or a template containing {text}.
        batch_size: texts per forward pass.
        max_length: token budget per prompt, as `embed --max-length`.
        dtype: model weights dtype, as `embed --dtype`.
        name: the model name mteb records in its results (default: `embfilter/<model>[+<filter>]`).
        use_cache: load a GGUF model from its cached Hugging Face conversion (as `--no-cache` off).
    """

    def __init__(
        self,
        model_name: str | None = None,
        revision: str | None = None,
        *,
        device: str | None = "auto",
        filter: str | os.PathLike[str] | FilterArtifact | None = None,  # noqa: A002 — mteb/embfilter vocabulary
        pooling: str = "mean",
        recipe: str = "none",
        batch_size: int = 16,
        max_length: int = 512,
        dtype: str = "float32",
        name: str | None = None,
        use_cache: bool = True,
        **kwargs: Any,
    ) -> None:
        _require_mteb()
        from embfilter_cli.filters.artifact import FilterArtifact, load_artifact
        from embfilter_cli.model.head import read_head_for_filter
        from embfilter_cli.model.locate import resolve_model
        from embfilter_cli.text.embedding import load_encoder_at
        from embfilter_cli.text.recipes import check_pooling, resolve_recipe

        check_pooling(pooling)
        resolve_recipe(recipe)
        location = resolve_model(model_name, revision=revision)
        artifact = None
        if filter is not None:
            artifact = filter if isinstance(filter, FilterArtifact) else load_artifact(filter)
            read_head_for_filter(location, artifact)  # refuses a filter fitted on another model
            if artifact.centered:
                from embfilter_cli.filters.centering import check_centering_use

                rec = resolve_recipe(recipe)
                check_centering_use(artifact.centering, pooling, rec.name, rec.template, str(artifact.path))
        self.artifact = artifact
        self.encoder = load_encoder_at(
            location, device=device or "auto", dtype=dtype, revision=revision, use_cache=use_cache
        )
        self.pooling = pooling
        self.recipe = recipe
        self.batch_size = batch_size
        self.max_length = max_length
        base = Path(location.source).name if Path(location.source).exists() else location.source
        if name is None:
            name = f"embfilter/{base.replace('/', '__')}"
            if artifact is not None and artifact.path is not None:
                name += f"+{Path(artifact.path).stem}"
        dim = artifact.output_dim if artifact is not None else self.encoder.hidden_size
        from mteb.models.model_meta import ModelMeta

        self.mteb_model_meta = ModelMeta.create_empty(
            overwrites={
                "name": name,
                "revision": location.revision or "local",
                "embed_dim": dim,
                "max_tokens": self.encoder.max_positions,
                "similarity_fn_name": "cosine",
                "framework": ["PyTorch"],
            }
        )

    def embed(self, texts: list[str]) -> np.ndarray:
        """`embfilter embed` + the filter for plain texts (empty texts give zero vectors)."""
        dim = self.artifact.output_dim if self.artifact is not None else self.encoder.hidden_size
        out = np.zeros((len(texts), dim), dtype=np.float32)
        keep = [i for i, t in enumerate(texts) if isinstance(t, str) and t.strip()]
        if not keep:
            return out
        raw = self.encoder.embed(
            [texts[i] for i in keep],
            pooling=self.pooling,
            recipe=self.recipe,
            batch_size=self.batch_size,
            max_length=self.max_length,
        )
        out[keep] = self.artifact.apply(raw) if self.artifact is not None else raw
        return out

    def encode(
        self,
        inputs: Any,
        *,
        task_metadata: Any = None,
        hf_split: str = "",
        hf_subset: str = "",
        prompt_type: Any = None,
        **kwargs: Any,
    ) -> np.ndarray:
        """Embed every text of mteb's batches (a DataLoader of dicts with a `text` list), in order."""
        texts: list[str] = []
        for batch in inputs:
            texts.extend(batch["text"])
        return self.embed(texts)

    def similarity(self, embeddings1: Any, embeddings2: Any) -> Any:
        """Cosine similarity matrix, [n1, n2] (a torch tensor, as sentence-transformers returns).

        A 1-D vector counts as one row, as in sentence-transformers' `cos_sim`: mteb's summarization
        evaluator passes single vectors and reads the [1, 1] result with `float()`.
        """
        return _unit_rows(embeddings1) @ _unit_rows(embeddings2).T

    def similarity_pairwise(self, embeddings1: Any, embeddings2: Any) -> Any:
        """Cosine similarity of corresponding rows, [n] (1-D inputs count as one row: [1])."""
        return (_unit_rows(embeddings1) * _unit_rows(embeddings2)).sum(dim=-1)


def _unit_rows(embeddings: Any) -> Any:
    """`embeddings` (array, tensor or list; 1-D or 2-D) as a 2-D float32 tensor of unit rows."""
    import torch

    rows = torch.as_tensor(np.asarray(embeddings), dtype=torch.float32)
    if rows.dim() == 1:
        rows = rows.unsqueeze(0)
    return torch.nn.functional.normalize(rows, dim=-1)


__all__ = ["MTEB_INSTALL", "MtebEncoder"]
