"""Fuzz the whole inline graph: switches in a loop, VLAN trunks, garbage frames.

Whatever comes in, nothing raises, every packet is accounted for (per device and
per appliance), no packet slot leaks, nothing longer than a slot comes out.

Saved regressions (``regressions/*.txt``: lines ``TIME PORT HEX``) are replayed
first. When a generated input fails, it is written to ``regressions/`` as a new
file to keep.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from workload import PORTS, graph_inputs, run_graph

REGRESSIONS = Path(__file__).parent / "regressions"


def check(inputs) -> None:
    try:
        res, sent, pool_ok = run_graph(inputs)
        assert res.accounting_errors == []
        assert pool_ok, "packet slots leaked"
        assert all(len(f) <= 2048 for fr in sent.values() for f in fr)
        n_in = sum(v for k, v in res.counters.items() if k.startswith("attach") and
                   k.endswith(" rx"))
        assert n_in == len(inputs)
    except Exception:
        save(inputs)
        raise


def save(inputs) -> None:
    text = "".join(f"{t!r} {p} {f.hex()}\n" for t, p, f in inputs)
    name = hashlib.sha1(text.encode()).hexdigest()[:12]
    (REGRESSIONS / f"new-{name}.txt").write_text(text)


def load(path: Path):
    out = []
    for line in path.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            t, p, h = (line.split() + [""])[:3]
            out.append((float(t), p, bytes.fromhex(h)))
    return out


@pytest.mark.parametrize("path", sorted(REGRESSIONS.glob("*.txt")), ids=lambda p: p.stem)
def test_saved_regressions(path: Path) -> None:
    check(load(path))


@pytest.mark.parametrize("seed", range(6))
def test_random_workloads(seed: int) -> None:
    check(graph_inputs(seed, 400))


frame = st.one_of(
    st.binary(max_size=120),
    st.builds(lambda h, tail: h + tail,
              st.sampled_from([bytes.fromhex("ffffffffffff020000000001"),
                               bytes.fromhex("020000000002020000000003")]),
              st.binary(max_size=100)),
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.floats(0, 20, allow_nan=False), st.sampled_from(PORTS), frame),
                max_size=40))
def test_hypothesis_inputs(inputs) -> None:
    check(sorted(inputs, key=lambda x: x[0]))
