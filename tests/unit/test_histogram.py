"""Histogram: each observation lands in the first bucket whose upper bound is at or above it (Prometheus's le)."""

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
