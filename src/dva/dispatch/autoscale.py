"""The manager's autoscaler: how many workers, from the workers' own load.

Every second the runtime gives :meth:`Autoscaler.observe` one :class:`Load` per worker,
measured over the last second: the busy fraction (time in the engines, from the
worker's own load words), the rx ring's fill (what waits for it) and the packets the
bus dropped for it. The appliance is

* **overloaded** when the workers' mean busy fraction is above ``out_busy``, or any
  ring is fuller than ``ring_high``, or the bus dropped packets for a worker;
* **underloaded** when the mean busy fraction is below ``in_busy`` and the same work
  on one worker fewer would still stay below ``out_busy`` times ``margin`` (so a
  scale-in is not followed by a scale-out: hysteresis).

A condition must hold for ``sustain`` seconds in a row, and no decision comes within
``hold_down`` seconds of the previous one (it takes the new worker count time to
show in the load): together they keep the count from flapping. Each decision says
why (the runtime logs it and shows it in ``dva status``). Scale-out goes one worker
at a time up to ``max_workers``, scale-in one at a time down to ``min_workers``.

Rebalance (:func:`hot_buckets`): with several workers, when one is overloaded and
another has room, the busiest buckets of the first (by packets the dispatcher steered
to each bucket over the last second) move to the least loaded worker, as many as
bring the two halfway to their mean.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class Policy:
    min_workers: int = 1
    max_workers: int = 2
    out_busy: float = 0.75
    in_busy: float = 0.25
    ring_high: float = 0.5
    sustain: float = 3.0
    hold_down: float = 10.0
    margin: float = 0.8

    def __post_init__(self) -> None:
        problems = []
        if not 1 <= self.min_workers <= self.max_workers:
            problems.append(f"workers {self.min_workers}..{self.max_workers}: need "
                            f"1 <= min <= max")
        if not 0 < self.in_busy < self.out_busy <= 1:
            problems.append(f"busy thresholds in {self.in_busy} / out {self.out_busy}: "
                            f"need 0 < in < out <= 1")
        if not 0 < self.ring_high <= 1 or not 0 < self.margin <= 1:
            problems.append("ring_high and margin are fractions in (0, 1]")
        if self.sustain < 0 or self.hold_down < 0:
            problems.append("sustain and hold_down are seconds >= 0")
        if problems:
            raise ValueError("autoscale policy: " + "; ".join(problems))


@dataclass
class Load:
    busy: float  # fraction of the last interval spent processing
    ring: float  # rx ring fill, 0..1
    drops: int  # bus drops for this worker in the interval


class Autoscaler:
    def __init__(self, policy: Policy) -> None:
        self.policy = policy
        self.since: tuple[str, float] | None = None  # (condition, when it started)
        self.last_decision = -1e18

    def observe(self, now: float, loads: list[Load]) -> tuple[int, str] | None:
        """The worker count to go to and why, or None (stay)."""
        p = self.policy
        n = len(loads)
        mean = sum(x.busy for x in loads) / max(n, 1)
        ring = max((x.ring for x in loads), default=0.0)
        drops = sum(x.drops for x in loads)
        cond = None
        if mean > p.out_busy or ring > p.ring_high or drops > 0:
            if n < p.max_workers:
                why = (f"mean busy {mean:.0%} > {p.out_busy:.0%}" if mean > p.out_busy
                       else f"ring {ring:.0%} full" if ring > p.ring_high
                       else f"{drops} packets dropped on the bus")
                cond = ("out", why)
        elif n > p.min_workers and mean < p.in_busy and \
                mean * n / (n - 1) < p.out_busy * p.margin:
            cond = ("in", f"mean busy {mean:.0%} < {p.in_busy:.0%}")
        if cond is None:
            self.since = None
            return None
        if self.since is None or self.since[0] != cond[0]:
            self.since = (cond[0], now)
        if now - self.since[1] < p.sustain or now - self.last_decision < p.hold_down:
            return None
        self.last_decision = now
        self.since = None
        target = n + 1 if cond[0] == "out" else n - 1
        return target, f"{cond[1]} for {p.sustain:g} s"


def hot_buckets(table: np.ndarray, hits: np.ndarray, busy: list[float],
                policy: Policy) -> tuple[np.ndarray, int, int] | None:
    """Buckets to move from the busiest worker to the least busy one when the first
    is overloaded and the second has room: ``(buckets, src, dst)`` or None."""
    n = len(busy)
    if n < 2:
        return None
    src = int(np.argmax(busy))
    dst = int(np.argmin(busy))
    if busy[src] <= policy.out_busy or busy[dst] >= policy.in_busy:
        return None
    mine = np.flatnonzero(table == src)
    load = hits[mine].astype(np.float64)
    total = load.sum()
    if total <= 0:
        return None
    # move the hottest buckets until about half the difference moved
    share = (busy[src] - busy[dst]) / 2 / busy[src]
    order = mine[np.argsort(-load, kind="stable")]
    cum = np.cumsum(np.sort(load)[::-1]) / total
    k = int(np.searchsorted(cum, share)) + 1
    if k >= len(mine):  # never empty a worker by rebalancing
        k = len(mine) - 1
    if k <= 0:
        return None
    return order[:k], src, dst
