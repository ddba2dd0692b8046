"""Right singular vectors and values of W_U: an exact solver and a certified randomized one.

Exact: G = W_Uᵀ W_U accumulated in float64 over row chunks (so W_U is never upcast whole), then
a symmetric eigendecomposition of the d×d Gram matrix. (A float32 variant forms each chunk's
Gram in float32 and sums chunks in float64: about twice as fast on CPUs, float32-accurate.) Eigenvalues are σ², eigenvectors are the
right singular vectors. On the CPU the chunk update is BLAS `dsyrk` (half the flops of a GEMM);
on CUDA it is a float64 `addmm_` on the device.

Randomized: subspace iteration on the operator G = W_Uᵀ W_U (Halko, Martinsson & Tropp 2011,
Alg. 4.4 applied to the Gram operator) with a Rayleigh–Ritz step after every pass. The Ritz
residuals ‖G v − θ v‖ / θ come for free from the last product, so the iteration can stop as
soon as every requested direction is certified below `tol` ("auto" iterations).

Sign convention (both solvers): each singular vector is flipped so that its entry of largest
magnitude is positive; ties go to the lowest index. Values are descending.

Not handled: fp16/bf16 arithmetic (inputs are upcast per chunk; autocast is disabled), complex
matrices, out-of-core d×d Gram matrices (d up to ~30k fits comfortably in RAM).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from embfilter_cli.errors import BadTensorError, EmbfilterError, SolverAccuracyError

ProgressFn = Callable[[int, int], None]  # (rows done, rows total)

DEFAULT_CHUNK_ROWS = 8192
CERTIFIED_COLUMNS = 512
EXACT_BACKWARD_BOUND = 1e-8  # eigh in float64 reaches ~1e-15; anything worse means broken input


@dataclass
class Spectrum:
    """Singular values (descending) and right singular vectors (columns) of W_U.

    A complete spectrum has all d vectors, column i being v_i. A partial one has some: the top n
    (randomized solver; `indices` None), or those listed in `indices` (refined solver: the removed
    directions, while `singular_values` still holds all d values).
    """

    singular_values: np.ndarray  # float64 (n,) or (d,)
    vectors: np.ndarray  # float64 (d, n); column j is v_{indices[j]} (v_j when indices is None)
    solver: str
    params: dict[str, Any] = field(default_factory=dict)
    certificate: dict[str, Any] = field(default_factory=dict)
    frobenius_sq: float = 0.0  # ‖W_U‖_F², for energy fractions when n < d
    seconds: float = 0.0
    indices: np.ndarray | None = None  # int64 (n,): which singular directions `vectors` holds

    @property
    def hidden_size(self) -> int:
        """d, the length of each singular vector."""
        return int(self.vectors.shape[0])

    @property
    def complete(self) -> bool:
        """True when every direction of the hidden space was computed."""
        return self.vectors.shape[1] == self.vectors.shape[0]

    @property
    def vector_indices(self) -> np.ndarray:
        """The singular directions held by the columns of `vectors`, in column order."""
        n = self.vectors.shape[1]
        return np.arange(n, dtype=np.int64) if self.indices is None else np.asarray(self.indices, np.int64)


def resolve_device(device: str) -> torch.device:
    """`auto` → cuda if available, else mps, else cpu; anything else is checked."""
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as exc:
        raise EmbfilterError(f"--device {device!r} is not a device name; use cpu, cuda, cuda:N, mps or auto") from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise EmbfilterError("--device cuda was requested but no CUDA GPU is visible; use --device cpu or auto")
    if dev.type == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise EmbfilterError("--device mps was requested but MPS is not available; use --device cpu or auto")
    return dev


def canonical_signs(vectors: np.ndarray) -> np.ndarray:
    """Flip columns so each one's largest-magnitude entry is positive (deterministic output)."""
    idx = np.argmax(np.abs(vectors), axis=0)
    signs = np.sign(vectors[idx, np.arange(vectors.shape[1])])
    signs[signs == 0] = 1.0
    return vectors * signs


class _Overflow(Exception):
    """Finite inputs overflowed the working precision: the caller retries on W / max|W|."""


def max_abs(matrix: torch.Tensor, chunk_rows: int = DEFAULT_CHUNK_ROWS) -> float:
    """max |w| over W in float64, chunk by chunk (the scale used when W's squares overflow)."""
    peak = 0.0
    for row0 in range(0, matrix.shape[0], chunk_rows):
        chunk = matrix[row0 : row0 + chunk_rows]
        if chunk.numel():
            peak = max(peak, float(chunk.abs().max().double()))
    return peak


def _check_finite(chunk: torch.Tensor, row0: int, source: torch.Tensor | None = None) -> None:
    # One reduction instead of an elementwise mask: a NaN or ±Inf anywhere makes the sum non-finite,
    # and finite bf16/fp16/fp32 values cannot overflow a sum in the chunk's dtype (float32/float64).
    if math.isfinite(float(chunk.sum())):
        return
    if not bool(torch.isfinite(chunk).all()):
        bad = (~torch.isfinite(chunk)).nonzero()[0].tolist()
        if source is not None and math.isfinite(float(source[bad[0], bad[1]])):
            raise _Overflow  # a float64 value beyond float32's range, not a damaged checkpoint
        raise BadTensorError(
            f"the unembedding has a non-finite value (NaN or Inf) at row {row0 + bad[0]}, column {bad[1]}; "
            "the checkpoint is damaged, re-download or re-export it"
        )


def gram_matrix(
    matrix: torch.Tensor,
    device: torch.device,
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
    progress: ProgressFn | None = None,
    precision: str = "float64",
    scale: float = 1.0,
) -> tuple[np.ndarray, float]:
    """G = (W/scale)ᵀ (W/scale) accumulated over row chunks into float64; returns (G, ‖W/scale‖_F²).

    precision "float64": every chunk is upcast to float64 (float64 accuracy).
    precision "float32": each chunk's Gram is formed in float32 and the chunk results are summed in
    float64, so rounding grows only with the chunk length, not with the vocabulary size; about 2×
    faster on CPUs, at float32-level accuracy (relative entry errors ~1e-7·√chunk).
    """
    rows, d = matrix.shape
    work = torch.float64 if precision == "float64" else torch.float32
    if device.type == "cpu":
        from scipy.linalg.blas import dsyrk, ssyrk

        gram = np.zeros((d, d), dtype=np.float64, order="F")
        part = np.zeros((d, d), dtype=np.float32, order="F") if work == torch.float32 else None
        # One reused upcast buffer: a fresh chunk-sized allocation per step costs page faults.
        buffer = torch.empty((min(chunk_rows, rows), d), dtype=work)
        for row0 in range(0, rows, chunk_rows):
            source = matrix[row0 : row0 + chunk_rows]
            chunk = buffer[: source.shape[0]]
            chunk.copy_(source if scale == 1.0 else source.double() / scale)
            _check_finite(chunk, row0, source)
            # chunk.T is F-contiguous (d × c): syrk(trans=0) gives chunkᵀ chunk in the upper triangle.
            if part is None:
                gram = dsyrk(1.0, chunk.numpy().T, beta=1.0, c=gram, trans=0, lower=0, overwrite_c=1)
            else:
                part = ssyrk(1.0, chunk.numpy().T, beta=0.0, c=part, trans=0, lower=0, overwrite_c=1)
                gram += part
            if progress:
                progress(min(row0 + chunk_rows, rows), rows)
        # syrk wrote only the upper triangle; the lower one is still the zeros it started as, so
        # G + Gᵀ with the diagonal put back is the full matrix (two triu copies cost ~0.8 s at d = 3584).
        full = gram + gram.T
        np.fill_diagonal(full, np.diagonal(gram))
    else:
        acc = torch.zeros((d, d), dtype=torch.float64, device=device)
        pinned = device.type == "cuda"
        for row0 in range(0, rows, chunk_rows):
            chunk = matrix[row0 : row0 + chunk_rows]
            if pinned:
                chunk = chunk.pin_memory()
            chunk = chunk.to(device, non_blocking=pinned)
            chunk = chunk.to(work) if scale == 1.0 else (chunk.double() / scale).to(work)
            _check_finite(chunk, row0, matrix[row0 : row0 + chunk_rows])
            if work == torch.float64:
                acc.addmm_(chunk.T, chunk)
            else:
                acc += (chunk.T @ chunk).double()
            if progress:
                progress(min(row0 + chunk_rows, rows), rows)
        full = acc.cpu().numpy()
    return full, float(np.trace(full))


def _scaled_gram(
    matrix: torch.Tensor, device: torch.device, chunk_rows: int, progress: ProgressFn | None, precision: str
) -> tuple[np.ndarray, float, float]:
    """The Gram of W, or of W / max|W| when W's squares overflow or underflow: (G, ‖·‖_F², scale).

    The common case costs nothing extra (one d×d finiteness check). A head whose values are huge
    but finite (float64, or float32 near its maximum) would otherwise give an infinite Gram and an
    all-NaN filter; one whose values are tiny would give an all-zero Gram.
    """
    try:
        gram, fro_sq = gram_matrix(matrix, device, chunk_rows, progress, precision)
        # Far from 1 the certificate's own products (norms of G·v) overflow or underflow: rescale.
        if np.isfinite(gram).all() and 1e-150 < fro_sq < 1e150:
            return gram, fro_sq, 1.0
    except _Overflow:
        pass
    scale = max_abs(matrix, chunk_rows)
    if scale == 0.0:
        raise BadTensorError("the unembedding is all zeros; it has no directions to filter, check --tensor")
    gram, fro_sq = gram_matrix(matrix, device, chunk_rows, progress, precision, scale=scale)
    if not math.isfinite(fro_sq * scale * scale):
        raise BadTensorError(
            f"the unembedding's values are too large (max |w| = {scale:.3g}): its squared singular values "
            "overflow float64; rescale the checkpoint"
        )
    return gram, fro_sq, scale


def symmetric_eigh(gram: np.ndarray, device: torch.device) -> tuple[np.ndarray, np.ndarray]:
    """Eigenvalues (descending) and eigenvectors of a symmetric float64 matrix, on `device` (cuda) or LAPACK."""
    if device.type == "cuda":
        evals_t, evecs_t = torch.linalg.eigh(torch.from_numpy(gram).to(device))
        evals, evecs = evals_t.cpu().numpy(), evecs_t.cpu().numpy()
    else:
        from scipy.linalg import eigh

        evals, evecs = eigh(gram, driver="evd", overwrite_a=False, check_finite=False)
    order = np.argsort(evals)[::-1]
    return evals[order], evecs[:, order]


def exact_spectrum(
    matrix: torch.Tensor,
    device: torch.device | None = None,
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
    progress: ProgressFn | None = None,
    precision: str = "float64",
) -> Spectrum:
    """All d singular values and right singular vectors of `matrix`.

    With precision "float64" (the default) the result is exact to float64 accuracy; "float32"
    trades that for speed (see `gram_matrix`). The eigendecomposition is float64 either way.
    """
    if precision not in ("float64", "float32"):
        raise EmbfilterError(f"precision must be float64 or float32, got {precision!r}")
    device = device or torch.device("cpu")
    start = time.perf_counter()
    with torch.autocast(device_type=device.type, enabled=False):
        gram, fro_sq, scale = _scaled_gram(matrix, device, chunk_rows, progress, precision)
    evals, evecs = symmetric_eigh(gram, device)
    # Backward-error certificate: ‖G v − λ v‖ relative to λ_max (what float64 can promise), on every
    # column up to CERTIFIED_COLUMNS and on that many evenly spaced ones (both ends included) beyond;
    # the full check would cost a d³ product (over a second at d = 3584) for a bound eigh already gives.
    cols = np.unique(np.linspace(0, len(evals) - 1, min(len(evals), CERTIFIED_COLUMNS)).round().astype(int))
    residual = np.linalg.norm(gram @ evecs[:, cols] - evecs[:, cols] * evals[cols], axis=0)
    lam_max = max(float(evals[0]), np.finfo(np.float64).tiny)
    sigma = np.sqrt(np.clip(evals, 0.0, None)) * scale
    backward = float(residual.max() / lam_max)
    passed = bool(np.isfinite(backward) and backward <= EXACT_BACKWARD_BOUND and np.isfinite(evecs).all())
    if not passed or not np.isfinite(sigma).all():
        raise SolverAccuracyError(
            f"the exact solver's backward error is {backward:.2e} (bound {EXACT_BACKWARD_BOUND:g}) or its values "
            "are not finite; no filter was written — check the checkpoint's values (embfilter inspect spectrum)"
        )
    return Spectrum(
        singular_values=sigma,
        vectors=canonical_signs(evecs),
        solver="exact",
        params={
            "method": f"gram-{precision}+eigh-float64",
            "precision": precision,
            "chunk_rows": chunk_rows,
            "device": str(device),
        },
        certificate={
            "max_backward_error": backward,
            "columns_checked": len(cols),
            "passed": passed,
        },
        frobenius_sq=fro_sq * scale * scale,
        seconds=time.perf_counter() - start,
    )


def randomized_spectrum(
    matrix: torch.Tensor,
    rank: int,
    *,
    oversample: int | None = None,
    power_iters: int | None = None,
    tol: float = 1e-3,
    seed: int = 0,
    device: torch.device | None = None,
    max_iters: int = 200,
    chunk_rows: int = 32768,
    dtype: torch.dtype | None = None,
    strict: bool = True,
    progress: ProgressFn | None = None,
) -> Spectrum:
    """Top-`rank` right singular pairs by randomized subspace iteration with Ritz certificates.

    `power_iters=None` iterates until max_i ‖G v_i − θ_i v_i‖ / θ_i ≤ tol over the requested
    directions (or `max_iters`); an integer runs exactly that many passes. With `strict`, a
    missed tolerance raises SolverAccuracyError; otherwise the certificate says passed=False.
    """
    device = device or torch.device("cpu")
    rows, d = matrix.shape
    if rank < 1 or rank > d:
        raise EmbfilterError(f"randomized solver needs 1 <= rank <= {d}, got {rank}")
    if oversample is None:
        oversample = max(16, rank // 2)
    width = min(d, rank + oversample)
    # float64 on GPUs (cheap there and certifies tighter); float32 on the CPU for speed.
    work = dtype or (torch.float64 if device.type == "cuda" else torch.float32)
    start = time.perf_counter()
    gen = torch.Generator(device="cpu").manual_seed(seed)
    basis = torch.randn(d, width, generator=gen, dtype=torch.float64).to(device=device, dtype=work)
    basis, _ = torch.linalg.qr(basis)

    resident: torch.Tensor | None = None
    keep_resident = _fits_on(device, matrix, work)
    scale = 1.0  # becomes max|W| when W's products overflow the working precision (see _scaled_gram)
    fro_sq = 0.0
    with torch.autocast(device_type=device.type, enabled=False):

        def scaled(chunk: torch.Tensor) -> torch.Tensor:
            return chunk.to(work) if scale == 1.0 else (chunk.double() / scale).to(work)

        def gram_apply(block: torch.Tensor) -> tuple[torch.Tensor, float]:
            """G·block = Wᵀ (W block), streaming W by rows when it is not resident."""
            if resident is not None:
                out, fro = resident.T @ (resident @ block), float((resident * resident).sum())
            else:
                out = torch.zeros_like(block)
                fro = 0.0
                for row0 in range(0, rows, chunk_rows):
                    source = matrix[row0 : row0 + chunk_rows].to(device=device)
                    chunk = scaled(source)
                    _check_finite(chunk, row0, source)
                    out.addmm_(chunk.T, chunk @ block)
                    fro += float((chunk * chunk).sum())
            if not (math.isfinite(fro) and bool(torch.isfinite(out).all())):
                raise _Overflow
            return out, fro

        start_basis = basis
        for attempt in range(2):
            try:
                if keep_resident:
                    resident = scaled(matrix.to(device=device))
                    _check_finite(resident, 0, matrix)
                iters = 0
                history: list[float] = []
                target = power_iters if power_iters is not None else max_iters
                basis = start_basis
                while True:
                    product, fro_sq = gram_apply(basis)
                    iters += 1
                    # Rayleigh–Ritz on span(basis): H = Qᵀ G Q, in float64 (tiny).
                    h = (basis.T @ product).double()
                    h = (h + h.T) / 2
                    theta, ritz = torch.linalg.eigh(h)
                    theta, ritz = theta.flip(0), ritz.flip(1)
                    q64, p64 = basis.double(), product.double()
                    vecs = q64 @ ritz
                    resid = torch.linalg.vector_norm(p64 @ ritz - vecs * theta, dim=0)
                    rel = (resid[:rank] / theta[:rank].clamp_min(torch.finfo(torch.float64).tiny)).max().item()
                    history.append(rel)
                    if progress:
                        progress(iters, target)
                    if (power_iters is None and rel <= tol) or iters >= target:
                        break
                    basis, _ = torch.linalg.qr(product)
                break
            except _Overflow:
                if attempt:
                    raise BadTensorError(
                        f"the unembedding's values are too large (max |w| = {scale:.3g}) for the randomized "
                        "solver even after scaling; use --solver exact or rescale the checkpoint"
                    ) from None
                scale = max_abs(matrix, chunk_rows)
    if float(theta[0]) <= 0.0:
        raise BadTensorError("the unembedding is all zeros; it has no directions to filter, check --tensor")
    if not math.isfinite(rel):
        raise SolverAccuracyError(
            "the randomized solver's residual is not finite; no filter was written — use --solver exact"
        )
    sigma = theta[:rank].clamp_min(0).sqrt().cpu().numpy() * scale
    vectors = canonical_signs(vecs[:, :rank].cpu().numpy())
    passed = bool(rel <= tol)
    certificate = {
        "max_relative_residual": rel,
        "tol": tol,
        "passed": passed,
        "iterations": iters,
        "residual_history": [float(f"{h:.3e}") for h in history],
    }
    if strict and not passed:
        raise SolverAccuracyError(
            f"randomized solver reached max relative residual {rel:.2e} > --tol {tol:g} after {iters} passes "
            f"(rank {rank}, subspace width {width}); raise --oversample or --power-iters, loosen --tol, "
            "or use --solver exact"
        )
    return Spectrum(
        singular_values=sigma,
        vectors=vectors,
        solver="randomized",
        params={
            "rank": rank,
            "oversample": oversample,
            "power_iters": "auto" if power_iters is None else power_iters,
            "seed": seed,
            "device": str(device),
            "dtype": str(work).replace("torch.", ""),
        },
        certificate=certificate,
        frobenius_sq=fro_sq * scale * scale,
        seconds=time.perf_counter() - start,
    )


def _fits_on(device: torch.device, matrix: torch.Tensor, dtype: torch.dtype) -> bool:
    """Keep W resident on the device when that costs under half its free memory."""
    need = matrix.numel() * torch.tensor([], dtype=dtype).element_size()
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return need < free // 2
    # On the CPU a resident upcast copy would break the "one float32 copy" memory bound for
    # low-precision checkpoints; keep float32 inputs as they are and stream the rest.
    return matrix.dtype == dtype and math.prod(matrix.shape) > 0
