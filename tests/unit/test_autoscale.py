"""The autoscaler's decisions on load sequences: sustain, hold-down, hysteresis."""

from __future__ import annotations

import numpy as np
import pytest

from dva.dispatch.autoscale import Autoscaler, Load, Policy, hot_buckets


def drive(policy: Policy, offered: list[float], n0: int = 1, capacity: float = 1.0):
    """Offered load (in workers' worth of busy time) once a second; the busy fraction
    each worker sees is offered / n (capped at 1). Returns the worker count each
    second and the decisions."""
    a = Autoscaler(policy)
    n = n0
    counts, decisions = [], []
    for t, load in enumerate(offered):
        busy = min(load / n / capacity, 1.0)
        d = a.observe(float(t), [Load(busy=busy, ring=0.0, drops=0)] * n)
        if d is not None:
            decisions.append((t, n, *d))
            n = d[0]
        counts.append(n)
    return counts, decisions


def test_the_worker_count_follows_a_rise_and_a_fall_without_flapping():
    p = Policy(min_workers=1, max_workers=4, sustain=3, hold_down=10)
    offered = [0.3] * 10 + [2.5] * 60 + [0.3] * 60
    counts, decisions = drive(p, offered)
    assert max(counts) == 4 and counts[-1] == 1
    # up while loaded, down after: never down during the rise nor up during the fall
    ups = [t for t, n, target, _ in decisions if target > n]
    downs = [t for t, n, target, _ in decisions if target < n]
    assert ups and downs and max(ups) < 70 <= min(downs)
    # decisions at least hold_down apart, each after sustain seconds of its condition
    times = [t for t, *_ in decisions]
    assert all(b - a >= 10 for a, b in zip(times, times[1:]))
    assert min(ups) >= 10 + 3
    assert all("busy" in why for *_, why in decisions)


def test_a_load_between_the_thresholds_changes_nothing():
    p = Policy(min_workers=1, max_workers=4, sustain=2, hold_down=5)
    counts, decisions = drive(p, [1.0] * 50, n0=2)  # 50% busy each on 2 workers
    assert decisions == [] and set(counts) == {2}


def test_no_scale_in_that_would_have_to_scale_out_again():
    """0.9 workers' worth on 2 workers is 45% each, under in_busy (50%), but on one
    worker it would be 90%, over out_busy: a scale-in would be undone (flapping)."""
    p = Policy(min_workers=1, max_workers=4, in_busy=0.5, out_busy=0.75, sustain=1,
               hold_down=2)
    counts, decisions = drive(p, [0.9] * 60, n0=2)
    assert decisions == [] and set(counts) == {2}
    counts, decisions = drive(p, [0.4] * 60, n0=2)  # 40% alone: fine on one
    assert counts[-1] == 1 and len(decisions) == 1


def test_short_spikes_do_not_scale():
    p = Policy(min_workers=1, max_workers=4, sustain=3, hold_down=5)
    spiky = ([0.3] * 5 + [3.0] * 2) * 8  # 2 s over the threshold, never 3
    counts, decisions = drive(p, spiky)
    assert decisions == []


def test_ring_fill_and_bus_drops_count_as_overload():
    p = Policy(min_workers=1, max_workers=2, sustain=0, hold_down=0)
    a = Autoscaler(p)
    assert a.observe(0.0, [Load(0.1, 0.9, 0)]) == (2, "ring 90% full for 0 s")
    a = Autoscaler(p)
    assert a.observe(0.0, [Load(0.1, 0.0, 5)])[1].startswith("5 packets dropped")
    assert a.observe(1.0, [Load(0.9, 0.9, 9)] * 2) is None  # at max already


def test_bad_policies_are_refused():
    with pytest.raises(ValueError, match="in < out"):
        Policy(in_busy=0.8, out_busy=0.5)
    with pytest.raises(ValueError, match="min <= max"):
        Policy(min_workers=3, max_workers=2)


def test_rebalance_moves_the_hot_buckets_of_an_overloaded_worker():
    p = Policy(min_workers=2, max_workers=2)
    table = np.array([0, 1] * 8)
    hits = np.zeros(16, np.int64)
    hits[[0, 2, 4]] = [900, 50, 50]  # worker 0: one very hot bucket
    hits[[1, 3]] = 10
    got = hot_buckets(table, hits, [0.95, 0.05], p)
    assert got is not None
    buckets, src, dst = got
    assert (src, dst) == (0, 1) and list(buckets) == [0]
    assert hot_buckets(table, hits, [0.5, 0.4], p) is None  # nobody overloaded
    assert hot_buckets(table, hits, [0.95, 0.9], p) is None  # nowhere to go
