"""`text.directions`: band groups, the default band, energy shares and where directions come from."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from embfilter_cli.errors import BandError
from embfilter_cli.filters.artifact import load_artifact
from embfilter_cli.filters.band import Band
from embfilter_cli.text.directions import (
    DirectionSource,
    band_groups,
    choose_band,
    default_rank,
    energy_removed,
    group_of,
    token_entries,
)
from tests.conftest import planted_matrix


@pytest.mark.parametrize(("d", "expected"), [(1, 0), (2, 1), (16, 2), (576, 64), (4096, 64)])
def test_default_rank_is_min_64_d_over_8(d, expected):
    assert default_rank(d) == expected


def test_band_groups_and_group_of_partition_the_spectrum():
    band = Band(10, 2, 5)  # remove 0..1, keep 2..6, remove 7..9
    groups = band_groups(band)
    assert groups == {"removed_top": [0, 1], "kept": [2, 3, 4, 5, 6], "removed_bottom": [7, 8, 9]}
    for name, indices in groups.items():
        assert all(group_of(i, band) == name for i in indices)


def test_energy_removed_matches_numpy():
    sigma = np.geomspace(10.0, 0.1, 12)
    band = Band(12, 3, 7)
    s2 = sigma**2
    assert energy_removed(sigma, band) == pytest.approx((s2[:3].sum() + s2[10:].sum()) / s2.sum(), rel=1e-15)
    assert energy_removed(np.zeros(12), band) == 0.0


def test_choose_band_sources():
    assert choose_band(32, None, None, None, None, None, None) == (Band(32, 4, 28), "default")
    assert choose_band(32, None, 3, 1, None, None, None) == (Band(32, 3, 28), "options")
    assert choose_band(32, None, None, None, 2.0, None, None) == (Band(32, 8, 16), "options")

    from types import SimpleNamespace

    art = SimpleNamespace(band={"hidden_size": 32, "start": 5, "keep": 20})
    assert choose_band(32, art, 3, None, None, None, None) == (Band(32, 5, 20), "filter")
    with pytest.raises(BandError):
        choose_band(32, None, 40, None, None, None, None)


def _aligned(a: np.ndarray, b: np.ndarray) -> float:
    """|cos| between two vectors (singular vectors are defined up to sign)."""
    return float(abs(a @ b) / (np.linalg.norm(a) * np.linalg.norm(b)))


def test_directions_from_a_reduced_filter_need_no_decomposition(make_filter):
    art = load_artifact(make_filter(d=16, top=2, bottom=1, reduce=True))
    w, v = planted_matrix(200, 16, np.geomspace(100.0, 1.0, 16), 0)
    logged: list[str] = []
    source = DirectionSource(torch.from_numpy(w).float(), art, Band(16, 2, 13), log=logged.append)
    vecs, sigmas = source.get(list(range(16)))
    assert vecs.shape == (16, 16) and vecs.dtype == np.float32 and logged == []
    for i in range(16):
        assert _aligned(vecs[i].astype(np.float64), v[:, i]) == pytest.approx(1.0, abs=1e-5)
    np.testing.assert_allclose(sigmas, np.geomspace(100.0, 1.0, 16), rtol=1e-5)


def test_projector_filter_falls_back_to_the_exact_spectrum_once(make_filter):
    art = load_artifact(make_filter(d=16, top=2, bottom=1, reduce=False, name="p.safetensors"))
    w, v = planted_matrix(200, 16, np.geomspace(100.0, 1.0, 16), 0)
    logged: list[str] = []
    source = DirectionSource(torch.from_numpy(w).float(), art, Band(16, 2, 13), log=logged.append)
    first, _ = source.get([0, 5])  # 0 is stored (removed), 5 is kept: not stored in a projector
    again, _ = source.get([6])
    assert logged == ["Computing the exact spectrum of W_U (float64 Gram + eigh)"]
    assert _aligned(first[1].astype(np.float64), v[:, 5]) == pytest.approx(1.0, abs=1e-5)
    assert _aligned(again[0].astype(np.float64), v[:, 6]) == pytest.approx(1.0, abs=1e-5)


def test_without_a_filter_everything_comes_from_the_spectrum():
    w, v = planted_matrix(50, 8, np.geomspace(8.0, 1.0, 8), 1)
    source = DirectionSource(torch.from_numpy(w).float(), None, Band(8, 1, 6))
    vecs, sigmas = source.get([0, 7])
    np.testing.assert_allclose(sigmas, [8.0, 1.0], rtol=1e-5)
    assert _aligned(vecs[0].astype(np.float64), v[:, 0]) == pytest.approx(1.0, abs=1e-5)
    assert source.get([])[0].shape == (0, 8)


class _Vocab:
    def piece(self, i: int) -> str:
        return f"▁w{i}"

    def display(self, i: int) -> str:
        return f"w{i}"

    def word(self, i: int) -> str | None:
        return f"w{i}" if i % 2 == 0 else None


def test_token_entries_round_logits_and_zipf():
    entries = token_entries(_Vocab(), [2, 3], [0.12345678, -1.0], zipf=lambda word: 4.567)
    assert entries == [
        {"id": 2, "token": "▁w2", "text": "w2", "logit": 0.123457, "zipf": 4.57},
        {"id": 3, "token": "▁w3", "text": "w3", "logit": -1.0, "zipf": None},
    ]
    assert "zipf" not in token_entries(_Vocab(), [1], [0.5])[0]
