"""`Filter` and `load`: a fitted filter as a Python object, with the CLI's checks, exports and centring.

A `Filter` wraps the artifact `embfilter fit` writes (`filters.artifact.FilterArtifact`): calling it
on vectors gives what `embfilter apply` writes, and its export methods call the functions behind
`embfilter export` and `embfilter center`.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np

from embfilter_cli.api.hooks import Hooks
from embfilter_cli.errors import ArtifactError, InputDataError

if TYPE_CHECKING:
    import torch

    from embfilter_cli.export.report import ExportResult
    from embfilter_cli.filters.artifact import FilterArtifact
    from embfilter_cli.filters.centering import Centering

ArrayT = TypeVar("ArrayT")


class Filter:
    """A fitted filter y = P·x (− m when centred), from `fit` or `load`.

    Example:
        >>> import numpy as np, embfilter_cli
        >>> f = embfilter_cli.fit(rank=64, bottom=16)
        >>> f
        Filter(576 → 496 dims, top 64 + bottom 16 removed, fitted on HuggingFaceTB/SmolLM2-135M-Instruct..., not centred, unsaved)
        >>> x = np.ones((3, 576), dtype=np.float32)
        >>> f(x).shape, f(x[0]).shape, f(x.astype(np.float16)).dtype.name
        ((3, 496), (496,), 'float16')
    """

    def __init__(self, artifact: FilterArtifact) -> None:
        self.artifact = artifact

    # ------------------------------------------------------------------ facts

    @property
    def input_dim(self) -> int:
        """d: the model's hidden size, the length of the vectors the filter takes."""
        return self.artifact.hidden_size

    @property
    def output_dim(self) -> int:
        """k: the length of the filtered vectors (d for a `reduce=False` projector)."""
        return self.artifact.output_dim

    @property
    def band(self) -> dict[str, Any]:
        """The band: hidden_size, start, keep, top and bottom (directions removed at each end)."""
        return self.artifact.band

    @property
    def centered(self) -> bool:
        """Whether the filter subtracts a background mean (y = P·x − m)."""
        return self.artifact.centered

    @property
    def centering(self) -> Centering | None:
        """How the mean was made (background, pooling, recipe), or None."""
        return self.artifact.centering

    @property
    def model_source(self) -> str:
        """The model the filter was fitted on, as recorded at fit time."""
        return self.artifact.model_source

    @property
    def path(self) -> Path | None:
        """Where the filter was loaded from or last saved, or None."""
        return self.artifact.path

    def __repr__(self) -> str:
        """One line: dims, band, model, centring, path."""
        band = self.band
        model = self.model_source if len(self.model_source) <= 40 else self.model_source[:39] + "…"
        centred = "centred" if self.centered else "not centred"
        return (
            f"Filter({self.input_dim} → {self.output_dim} dims, top {band['top']} + bottom {band['bottom']} removed, "
            f"fitted on {model}, {centred}, {self.path or 'unsaved'})"
        )

    # ------------------------------------------------------------------ applying

    def __call__(self, vectors: ArrayT) -> ArrayT:
        """Same as `apply`."""
        return self.apply(vectors)

    def apply(self, vectors: ArrayT) -> ArrayT:
        """Filter vectors on their last axis: (..., d) → (..., k), P·x minus the mean when centred.

        A numpy array stays a numpy array and a torch tensor stays a tensor on its device; the dtype is
        kept (float16/bfloat16 are computed in float32, float64 in float64). Same values as `embfilter apply`.

        Raises:
            ArtifactError: the last axis is not the filter's input dimension.
            InputDataError: the vectors are not floating point.
        """
        torch = sys.modules.get("torch")  # a tensor can only exist once torch is imported
        if torch is not None and isinstance(vectors, torch.Tensor):
            return self._apply_torch(vectors)  # type: ignore[return-value]
        array = np.asarray(vectors)
        if not np.issubdtype(array.dtype, np.floating):
            raise InputDataError(f"vectors have dtype {array.dtype}; the filter takes floating-point vectors")
        self.artifact.check_input_dim(int(array.shape[-1]) if array.ndim else 0)
        return self.artifact.apply(array).astype(array.dtype, copy=False)  # type: ignore[return-value]

    def _apply_torch(self, vectors: torch.Tensor) -> torch.Tensor:
        import torch

        if not vectors.is_floating_point():
            raise InputDataError(f"vectors have dtype {vectors.dtype}; the filter takes floating-point vectors")
        self.artifact.check_input_dim(int(vectors.shape[-1]) if vectors.ndim else 0)
        work = torch.float64 if vectors.dtype == torch.float64 else torch.float32
        p = torch.from_numpy(np.asarray(self.artifact.projection)).to(device=vectors.device, dtype=work)
        y = vectors.to(work) @ p.T
        if self.artifact.mean is not None:
            y = y - torch.from_numpy(np.asarray(self.artifact.mean)).to(device=vectors.device, dtype=work)
        return y.to(vectors.dtype)

    # ------------------------------------------------------------------ files

    def save(self, path: str | os.PathLike[str], *, force: bool = False) -> Path:
        """Write the filter as a safetensors artifact (atomically; an existing file needs `force`).

        Example:
            >>> import embfilter_cli, tempfile, pathlib
            >>> f = embfilter_cli.fit(rank=64, bottom=16)
            >>> path = f.save(pathlib.Path(tempfile.mkdtemp()) / "smol.safetensors")
            >>> embfilter_cli.load(path).output_dim
            496
        """
        from embfilter_cli.filters.artifact import save_artifact

        return save_artifact(self.artifact, path, force=force)

    def center(
        self,
        texts_or_vectors: str | os.PathLike[str] | list[str] | np.ndarray,
        *,
        model: str | None = None,
        revision: str | None = None,
        pooling: str = "mean",
        recipe: str = "none",
        max_length: int = 512,
        batch_size: int = 16,
        device: str = "auto",
        dtype: str = "auto",
        input_format: str = "auto",
        hooks: Hooks | None = None,
    ) -> Filter:
        """A copy centred on the mean of the filtered background, as `embfilter center` makes it (not saved).

        Args:
            texts_or_vectors: a texts file (one per line or JSONL, as `embed` reads them), a .npy of raw
                (n, d) embeddings, a list of texts, or an (n, d) array of raw embeddings.
            model: the model that embeds texts (default: the filter's own); its W_U must match the filter's.
            pooling, recipe, max_length, batch_size, device, dtype, input_format: as `embfilter center`.
            hooks: where log lines, warnings and progress go.

        Example:
            >>> import numpy as np, embfilter_cli
            >>> f = embfilter_cli.fit(rank=64, bottom=16)
            >>> raw = np.random.default_rng(0).standard_normal((10, 576)).astype(np.float32)
            >>> c = f.center(raw)
            >>> c.centered, bool(np.allclose(c(raw).mean(axis=0), 0, atol=1e-5))
            (True, True)
        """
        from embfilter_cli.api.centring import centre_on

        centred, _ = centre_on(
            self.artifact,
            texts_or_vectors,
            model=model,
            revision=revision,
            pooling=pooling,
            recipe=recipe,
            max_length=max_length,
            batch_size=batch_size,
            device=device,
            dtype=dtype,
            input_format=input_format,
            hooks=hooks,
        )
        return Filter(centred)

    # ------------------------------------------------------------------ exports

    def to_torch(self) -> torch.nn.Linear:
        """The filter as a frozen float32 `torch.nn.Linear(d, k)`: weight P, bias −m when centred (else no bias).

        Example:
            >>> import torch, embfilter_cli
            >>> f = embfilter_cli.fit(rank=64, bottom=16)
            >>> layer = f.to_torch()
            >>> x = torch.randn(2, 576)
            >>> torch.allclose(layer(x), f(x), atol=1e-5)
            True
        """
        import torch

        layer = torch.nn.Linear(self.input_dim, self.output_dim, bias=self.centered, dtype=torch.float32)
        with torch.no_grad():
            layer.weight.copy_(torch.from_numpy(np.asarray(self.artifact.projection, dtype=np.float32)))
            if self.artifact.mean is not None:
                layer.bias.copy_(-torch.from_numpy(np.asarray(self.artifact.mean, dtype=np.float32)))
        return layer.requires_grad_(False).eval()

    def to_onnx(
        self,
        path: str | os.PathLike[str],
        *,
        normalize: bool = False,
        opset: int | None = None,
        fp16: bool = False,
        per_token: bool = False,
        external_data: bool | None = None,
        check: bool = True,
        force: bool = False,
    ) -> ExportResult:
        """A standalone ONNX graph, embeddings [batch, d] → filtered_embeddings [batch, k] (`embfilter export --onnx`).

        Checked with onnx.checker and onnxruntime against the float64 filter unless `check=False`.

        Example:
            >>> import embfilter_cli, tempfile, pathlib
            >>> f = embfilter_cli.fit(rank=64, bottom=16)
            >>> result = f.to_onnx(pathlib.Path(tempfile.mkdtemp()) / "filter.onnx")
            >>> result.output_dim, result.check.max_rel_error < 1e-5
            (496, True)
        """
        from embfilter_cli.api.exporting import ExportOptions, export_filter

        options = ExportOptions(
            normalize=normalize,
            opset=opset,
            fp16=fp16,
            per_token=per_token,
            external_data=external_data,
            check=check,
            force=force,
        )
        return export_filter(self.artifact, "onnx", path, options)

    def append_to_onnx(
        self,
        host: str | os.PathLike[str],
        path: str | os.PathLike[str],
        *,
        output: str | None = None,
        filtered_name: str | None = None,
        normalize: bool = False,
        external_data: bool | None = None,
        check: bool = True,
        force: bool = False,
        hooks: Hooks | None = None,
    ) -> ExportResult:
        """Add the filter after an output of the ONNX embedding model `host`, written to `path`
        (`embfilter export --onnx --append-to HOST`): the filtered tensor becomes output 0 under the host
        output's name (or `filtered_name`), the original stays as `<name>_unfiltered`.
        """
        from embfilter_cli.api.exporting import ExportOptions, export_filter

        options = ExportOptions(
            append_to=host,
            host_output=output,
            filtered_name=filtered_name,
            normalize=normalize,
            external_data=external_data,
            check=check,
            force=force,
        )
        return export_filter(self.artifact, "onnx", path, options, hooks)

    def to_sentence_transformers(
        self,
        folder: str | os.PathLike[str],
        *,
        model: str | None = None,
        revision: str | None = None,
        pooling: str = "mean",
        recipe: str = "none",
        max_length: int = 512,
        normalize: bool = False,
        dense_only: bool = False,
        use_cache: bool = True,
        check: bool = True,
        force: bool = False,
        hooks: Hooks | None = None,
    ) -> ExportResult:
        """A whole sentence-transformers model whose `encode` equals `Encoder(...).encode` (or with `dense_only`
        the filter's Dense module folder alone), as `embfilter export --format sentence-transformers` writes it.

        `model` defaults to the filter's own model when it is here; `recipe` must be a prefix template
        ('Query: {text}'), which becomes the model's default prompt.
        """
        from embfilter_cli.api.exporting import ExportOptions, export_filter

        options = ExportOptions(
            whole=not dense_only,
            model=model,
            revision=revision,
            pooling=pooling,
            recipe=recipe,
            max_length=max_length,
            normalize=normalize,
            no_cache=not use_cache,
            check=check,
            force=force,
        )
        return export_filter(self.artifact, "sentence-transformers", folder, options, hooks)


def load(path: str | os.PathLike[str]) -> Filter:
    """Load a filter artifact with `embfilter verify`'s integrity checks (digests, orthonormal rows, the mean).

    Raises:
        ArtifactError: an unreadable or damaged file, with the message `embfilter verify` prints.

    Example:
        >>> import embfilter_cli
        >>> embfilter_cli.load("no/such/filter.safetensors")
        Traceback (most recent call last):
        ...
        embfilter_cli.errors.ArtifactError: filter file no/such/filter.safetensors does not exist; run `embfilter fit` to create one
    """
    from embfilter_cli.filters.artifact import load_artifact
    from embfilter_cli.filters.checks import integrity_checks

    artifact = load_artifact(path)
    failed = [c for c in integrity_checks(artifact) if not c.ok]
    if failed:
        raise ArtifactError(failed[0].error)
    return Filter(artifact)


__all__ = ["Filter", "load"]
