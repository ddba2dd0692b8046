import pytest

from embfilter_cli.errors import BandError
from embfilter_cli.filters.band import Band, band_from_rank, band_from_ratio, band_from_window, resolve_band


def test_rank_and_bottom_window():
    band = band_from_rank(576, 64, 16)
    assert (band.start, band.keep, band.top, band.bottom) == (64, 496, 64, 16)
    assert band.kept_indices()[0] == 64 and band.kept_indices()[-1] == 559
    assert band.removed_indices() == list(range(64)) + list(range(560, 576))


def test_paper_ratio_preset_matches_definition():
    # d = 576, τ = 2: k = 288, s = (576 - 288) // 2 = 144 (the paper's central block).
    band = band_from_ratio(576, 2)
    assert (band.start, band.keep, band.top, band.bottom) == (144, 288, 144, 144)
    # odd remainder: d = 10, τ = 3 -> k = 3, s = 3, bottom = 4
    band = band_from_ratio(10, 3)
    assert (band.start, band.keep, band.bottom) == (3, 3, 4)
    assert band_from_ratio(64, 1) == Band(64, 0, 64)  # τ = 1 is the identity


def test_explicit_window_covers_mistral_variant():
    band = band_from_window(4096, 128, 512)
    assert (band.top, band.keep, band.bottom) == (128, 512, 3456)
    assert band_from_window(100, 10, None).keep == 90


@pytest.mark.parametrize(
    "kwargs, needle",
    [
        ({"rank": 500, "bottom": 76}, "500 + --bottom 76 = 576"),
        ({"rank": -1}, "must be >= 0"),
        ({"ratio": 0.5}, "--ratio must be >= 1"),
        ({"ratio": 2, "rank": 4}, "cannot be combined"),
        ({"start": 4, "rank": 4}, "cannot be combined"),
        ({"start": 570, "keep": 10}, "keeps directions 570..579 but the model has 576"),
        ({"keep": 600}, "--keep 600"),
        ({"ratio": 2, "keep": 5}, "keeps 288 directions but --keep says 5"),
    ],
)
def test_impossible_bands_name_the_numbers(kwargs, needle):
    with pytest.raises(BandError, match=None) as info:
        resolve_band(576, **kwargs)
    assert needle in str(info.value)


def test_default_is_identity_when_nothing_removed():
    assert resolve_band(32) == Band(32, 0, 32)
    assert resolve_band(32, keep=8) == Band(32, 12, 8)
