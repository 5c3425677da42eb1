"""Histogram: each observation lands in the first bucket whose upper bound is at or above it (Prometheus's le)."""

import bisect
import itertools

from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.stats import LATENCY_BUCKETS, Histogram


def test_an_observation_counts_in_the_first_bucket_whose_bound_is_at_or_above_it() -> None:
    histogram = Histogram()
    values = [0.0, 0.0001, 0.00010001, 0.00025, 0.0003, 0.0021, 1.0, 1.5, 30.0, 30.5, 1e9]
    for value in values:
        histogram.observe(value)
    by_bound = dict(histogram.cumulative())
    for bound in (*LATENCY_BUCKETS, float("inf")):
        assert by_bound[bound] == sum(1 for value in values if value <= bound), bound
    assert histogram.count == len(values)
    assert histogram.sum == sum(values)


def test_observations_past_the_largest_bound_count_only_under_infinity() -> None:
    histogram = Histogram((0.5, 1.0))
    histogram.observe(2.0)
    assert histogram.cumulative() == [(0.5, 0), (1.0, 0), (float("inf"), 1)]


def test_zeros_and_values_between_bounds_add_up_in_every_bucket() -> None:
    histogram = Histogram((0.5, 1.0))
    histogram.observe(0.0)
    histogram.observe(0.7)
    histogram.observe(0.0)
    assert histogram.cumulative() == [(0.5, 2), (1.0, 3), (float("inf"), 3)]
    assert histogram.count == 3
    assert histogram.sum == 0.7


@settings(max_examples=300, deadline=None)
@given(bounds=st.lists(st.floats(0.0, 100.0), max_size=12, unique=True).map(lambda found: tuple(sorted(found))),
       picks=st.lists(st.tuples(st.integers(0, 12), st.sampled_from([-1e-9, 0.0, 1e-9]))),
       others=st.lists(st.floats(0.0, 200.0)))
def test_every_bucket_native_or_not_counts_as_the_first_bound_at_or_above_the_value(
        bounds: tuple[float, ...], picks: list[tuple[int, float]], others: list[float]) -> None:
    # Values on and just around each bound, and anywhere: the native buckets (the first eight), the list past
    # them, and bounds fewer than eight must all agree with the definition.
    values = [max(0.0, bounds[index % len(bounds)] + nudge) for index, nudge in picks] if bounds else []
    values += others
    histogram = Histogram(bounds)
    for value in values:
        histogram.observe(value)
    expected = [0] * (len(bounds) + 1)
    for value in values:
        expected[bisect.bisect_left(bounds, value)] += 1
    assert [count for _, count in histogram.cumulative()] == list(itertools.accumulate(expected))
