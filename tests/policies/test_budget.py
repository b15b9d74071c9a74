"""Per-layer budget curves: the split Gaussian's defining values, scaling, floor and validation."""

import numpy as np
import pytest

from spacache_kernels.policies.budget import PRESETS, GaussianProfile, update_ratios


def test_gaussian_hits_its_defining_values():
    prof = GaussianProfile(peak_pos=0.75, freq_start=0.03, freq_peak=0.25, freq_end=0.13)
    # Evaluate on a fine grid so that t = 0, mu and (almost) 1 are sample points.
    n = 400
    values = prof.curve(n)
    assert values[0] == pytest.approx(0.03, rel=1e-9)
    assert values[int(0.75 * n)] == pytest.approx(0.25, rel=1e-9)
    # t = (n-1)/n, just before 1: between the peak and freq_end, close to the end value.
    assert 0.13 < values[-1] < 0.133
    assert values.argmax() == int(0.75 * n)


def test_llada_preset_scaled_to_max_ratio_and_floored():
    ratios = update_ratios(32, "gaussian", max_update_ratio=0.25, preset="llada-8b")
    assert ratios.shape == (32,)
    assert ratios.max() == pytest.approx(0.25)
    assert ratios.argmax() == 24  # peak at 0.75 of depth
    # Layer 0: 0.03 is below the 2^-5 floor, so the floor applies.
    assert ratios[0] == pytest.approx(2**-5)
    # Right side is not floored and decreases monotonically past the peak.
    assert np.all(np.diff(ratios[24:]) < 0)
    assert np.all(np.diff(ratios[:25]) >= 0)


def test_scaling_by_max_ratio_is_linear_before_the_floor():
    a = update_ratios(32, max_update_ratio=0.5, preset="dream-7b", min_update_ratio=0.0)
    b = update_ratios(32, max_update_ratio=0.25, preset="dream-7b", min_update_ratio=0.0)
    np.testing.assert_allclose(a, 2 * b)


def test_avg_ratio_sets_the_unfloored_mean():
    ratios = update_ratios(
        28, avg_update_ratio=0.2, max_update_ratio=None, preset="dream-7b", min_update_ratio=0
    )
    assert ratios.mean() == pytest.approx(0.2)


def test_uniform_and_explicit():
    np.testing.assert_allclose(update_ratios(5, "uniform", max_update_ratio=0.3), [0.3] * 5)
    np.testing.assert_allclose(update_ratios(3, [0.1, 1.0, 0.5]), [0.1, 1.0, 0.5])


def test_presets_exist():
    assert set(PRESETS) == {"llada-8b", "llada-1.5", "dream-7b"}
    assert PRESETS["llada-1.5"].peak_pos == 0.8


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(n_layers=0), "n_layers"),
        (dict(n_layers=4, budget="triangle"), "budget"),
        (dict(n_layers=4, budget=[0.1, 0.2]), "budget"),
        (dict(n_layers=2, budget=[0.1, 1.5]), "budget"),
        (dict(n_layers=4, max_update_ratio=0.0), "max_update_ratio"),
        (dict(n_layers=4, max_update_ratio=None, avg_update_ratio=1.5), "avg_update_ratio"),
        (dict(n_layers=4, max_update_ratio=None), "max_update_ratio"),
        (dict(n_layers=4, preset="gpt"), "preset"),
    ],
)
def test_bad_budget_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        update_ratios(**kwargs)
