"""GPU check for `embfilter fit`: is the fit bound by moving W_U to the GPU?

Run on a machine with a CUDA GPU (from the repo root, package installed):
    python bench/gpu_fit.py [--rows 152064 --hidden 3584 --rank 256]
Without a GPU, `--device cpu --rows 8192 --hidden 256 --rank 16` runs the same steps on the CPU
(a dry run of the script, not a measurement).

It builds the same synthetic Qwen2-7B-shaped bf16 checkpoint as bench/bench_fit.py, then in one
process (after a warm-up fit on a small matrix, so CUDA/cuBLAS/cuSOLVER start-up is not counted):
  floor       read lm_head's bytes from the (warm) file and copy them to the GPU
  exact       embfilter's exact solver on cuda (float64 Gram over streamed chunks + eigh)
  refined     embfilter's refined solver on cuda (float32 Gram + a full eigh on the device,
              the top R refined and certified in float64 against W_U; issue 19)
  randomized  embfilter's randomized solver on cuda (float64, certified to --tol)
and checks refined and randomized against the exact solver: the largest principal-angle sine
between the top-R subspaces. Target: exact fit ≤ 1.5 × floor. Prints a markdown table with the device.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.bench_fit import make_checkpoint
from embfilter_cli.filters.band import Band
from embfilter_cli.filters.refine import refined_spectrum
from embfilter_cli.filters.spectral import exact_spectrum, randomized_spectrum
from embfilter_cli.model.locate import resolve_model
from embfilter_cli.model.unembedding import read_unembedding


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def max_sin(a: np.ndarray, b: np.ndarray) -> float:
    """Largest principal-angle sine between two column spans (orthonormal columns): ‖A Aᵀ − B Bᵀ‖₂."""
    return float(np.linalg.norm(a @ a.T - b @ b.T, 2))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=152064)
    parser.add_argument("--hidden", type=int, default=3584)
    parser.add_argument("--rank", type=int, default=256)
    parser.add_argument("--work", type=Path, default=Path("bench/out/gpu"))
    parser.add_argument("--device", default="cuda", help="cuda, or cpu for a dry run of the script")
    args = parser.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        sys.exit("no CUDA device visible; run this on a GPU machine (or --device cpu for a dry run)")
    dev = torch.device(args.device)
    folder = args.work / "ckpt"
    if not (folder / "config.json").exists():
        make_checkpoint(folder, args.rows, args.hidden)

    exact_spectrum(torch.randn(4096, 256), device=dev)  # warm-up: CUDA context, cuBLAS, cuSOLVER
    randomized_spectrum(torch.randn(4096, 256), 8, device=dev)
    refined_spectrum(torch.randn(4096, 256), lambda s: Band(256, 8, 248), device=dev)
    band = Band(args.hidden, args.rank, args.hidden - args.rank)

    t0 = time.perf_counter()
    unemb = read_unembedding(resolve_model(str(folder)), drop_padding_rows=False)
    on_gpu = unemb.matrix.to(dev)
    sync()
    floor = time.perf_counter() - t0
    del on_gpu
    torch.cuda.empty_cache()

    rows = []
    t0 = time.perf_counter()
    unemb = read_unembedding(resolve_model(str(folder)), drop_padding_rows=False)
    exact = exact_spectrum(unemb.matrix, device=dev, chunk_rows=32768)
    sync()
    rows.append(("exact (float64 Gram + eigh)", time.perf_counter() - t0, exact.certificate))
    t0 = time.perf_counter()
    unemb = read_unembedding(resolve_model(str(folder)), drop_padding_rows=False)
    refined, _ = refined_spectrum(unemb.matrix, lambda s: band, device=dev, chunk_rows=32768)
    sync()
    rows.append(
        (
            "refined (float32 Gram; removed directions refined and certified in float64)",
            time.perf_counter() - t0,
            refined.certificate,
        )
    )
    t0 = time.perf_counter()
    unemb = read_unembedding(resolve_model(str(folder)), drop_padding_rows=False)
    rand = randomized_spectrum(unemb.matrix, args.rank, device=dev, oversample=args.rank)
    sync()
    rows.append(("randomized (float64, certified)", time.perf_counter() - t0, rand.certificate))
    top = exact.vectors[:, : args.rank]
    sin_rand, sin_refined = max_sin(top, rand.vectors), max_sin(top, refined.vectors[:, : args.rank])

    name = torch.cuda.get_device_name(0) if dev.type == "cuda" else "CPU (dry run, not a measurement)"
    print(f"Device: {name}, torch {torch.__version__}\n")
    print(f"Head {args.rows} × {args.hidden} bf16; floor (read + copy to GPU) {floor:.2f} s\n")
    print("| solver | wall s (incl. read) | × floor | certificate |")
    print("|---|---|---|---|")
    for name, wall, cert in rows:
        brief = {k: v for k, v in cert.items() if k != "residual_history"}
        print(f"| {name} | {wall:.2f} | {wall / floor:.2f} | {brief} |")
    print(f"\nrandomized vs exact top-{args.rank} subspace: max sin θ = {sin_rand:.2e}")
    print(f"refined vs exact top-{args.rank} subspace: max sin θ = {sin_refined:.2e} (target ≤ 1e-6)")


if __name__ == "__main__":
    main()
