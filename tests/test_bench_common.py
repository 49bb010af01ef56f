"""The benchmarks' summary of a ratio over rounds: median, range, rounds, and the warning."""

import pytest

from benchmarks.common import rounds_ratio


def test_ratio_per_round_is_summarised_by_median_and_range():
    r = rounds_ratio([2.0, 3.0, 2.2, 4.0, 2.1], [1.0, 1.5, 1.0, 2.0, 1.0])  # ratios 2, 2, 2.2, 2, 2.1
    assert (r.median, r.low, r.high, r.rounds) == (2.0, 2.0, 2.2, 5)
    assert not r.too_wide and "WARNING" not in str(r) and str(r).startswith("2.00x (median of 5 rounds, range 2.00-2.20)")
    assert r.short() == "2.00x [2.00-2.20] n=5"


@pytest.mark.parametrize("numerators, denominators, why", [
    ([1.0, 2.0, 1.0], [1.0, 1.0, 1.0], "range 100% of the median"),
    ([1.0, 1.0], [1.0, 1.0], "fewer than 3 rounds"),
])
def test_a_wide_or_short_ratio_is_flagged(numerators, denominators, why):
    r = rounds_ratio(numerators, denominators)
    assert r.too_wide and why in str(r) and r.short().endswith("too spread")


def test_unpaired_times_are_refused():
    with pytest.raises(ValueError, match="one time of each side per round"):
        rounds_ratio([1.0, 2.0], [1.0])
