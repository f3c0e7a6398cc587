"""DIR-24-8 longest-prefix match against a brute-force reference."""

from __future__ import annotations

import os
import random
import time

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dva._jit import JIT_ENABLED
from dva.nf.lpm import EXT, NH_MAX, Lpm, lpm_lookup, prefix_mask


def reference(routes: list[tuple[int, int, int]], addrs) -> np.ndarray:
    """Brute force: the longest matching prefix; of equal prefixes the last given."""
    if not routes:
        return np.zeros(len(addrs), np.int64)
    p = np.array([r[0] for r in routes], np.int64)
    ln = np.array([r[1] for r in routes], np.int64)
    nh = np.array([r[2] for r in routes], np.int64)
    masks = (0xFFFFFFFF << (32 - ln)) & 0xFFFFFFFF
    p &= masks
    # rank: longer wins, then later wins
    rank = ln * (len(routes) + 1) + np.arange(len(routes))
    out = np.zeros(len(addrs), np.int64)
    for i, a in enumerate(addrs):
        hit = (int(a) & masks) == p
        if hit.any():
            out[i] = nh[np.flatnonzero(hit)[np.argmax(rank[hit])]]
    return out


def edge_addresses(routes, r: random.Random, n_random: int) -> list[int]:
    """Each prefix's first and last address and their neighbours, plus random ones."""
    out = []
    for p, ln, _ in routes:
        lo = p & prefix_mask(ln)
        hi = lo + (1 << (32 - ln)) - 1
        out += [lo, hi, max(lo - 1, 0), min(hi + 1, 0xFFFFFFFF), r.randrange(lo, hi + 1)]
    out += [r.randrange(1 << 32) for _ in range(n_random)]
    return out


def check(routes, addrs) -> None:
    t = Lpm([r[0] for r in routes], [r[1] for r in routes], [r[2] for r in routes])
    got = t.lookup_many(addrs)
    want = reference(routes, addrs)
    bad = np.flatnonzero(got != want)
    assert len(bad) == 0, [(hex(addrs[i]), int(got[i]), int(want[i])) for i in bad[:5]]


def ip(s: str) -> int:
    a, b, c, d = (int(x) for x in s.split("."))
    return a << 24 | b << 16 | c << 8 | d


def test_hand_written_table():
    routes = [
        (0, 0, 1),                      # default
        (ip("10.0.0.0"), 8, 2),
        (ip("10.1.0.0"), 16, 3),
        (ip("10.1.2.0"), 24, 4),
        (ip("10.1.2.128"), 25, 5),
        (ip("10.1.2.192"), 26, 6),
        (ip("10.1.2.200"), 32, 7),
        (ip("10.1.3.0"), 31, 8),        # a /31 in a /24 with no /24 route of its own
    ]
    t = Lpm(*zip(*routes))
    expect = {
        "1.2.3.4": 1, "10.200.0.1": 2, "10.1.9.9": 3, "10.1.2.1": 4, "10.1.2.127": 4,
        "10.1.2.128": 5, "10.1.2.191": 5, "10.1.2.192": 6, "10.1.2.199": 6, "10.1.2.200": 7,
        "10.1.2.201": 6, "10.1.2.255": 6, "10.1.3.0": 8, "10.1.3.1": 8, "10.1.3.2": 3,
        "255.255.255.255": 1, "0.0.0.0": 1,
    }
    for a, nh in expect.items():
        assert t.lookup(ip(a)) == nh, a
    assert t.groups == 2
    check(routes, [ip(a) for a in expect])


def test_empty_table_and_no_default():
    t = Lpm([], [], [])
    assert t.lookup(0) == 0 and t.lookup(0xFFFFFFFF) == 0
    t = Lpm([ip("192.168.0.0")], [16], [9])
    assert t.lookup(ip("192.168.77.1")) == 9
    assert t.lookup(ip("192.169.0.0")) == 0
    assert t.lookup(ip("192.167.255.255")) == 0


def test_host_bits_are_ignored_and_later_equal_prefix_wins():
    t = Lpm([ip("10.1.2.3"), ip("10.1.0.0")], [16, 16], [1, 2])
    assert t.lookup(ip("10.1.200.200")) == 2
    t = Lpm([ip("10.1.2.3"), ip("10.1.2.3")], [32, 32], [1, 2])
    assert t.lookup(ip("10.1.2.3")) == 2


def test_longer_prefix_given_first_still_wins():
    t = Lpm([ip("10.1.2.128"), ip("10.1.2.0"), ip("10.0.0.0")], [25, 24, 8], [3, 2, 1])
    assert t.lookup(ip("10.1.2.129")) == 3
    assert t.lookup(ip("10.1.2.1")) == 2
    assert t.lookup(ip("10.9.9.9")) == 1


@pytest.mark.parametrize("bad", [
    dict(prefixes=[0], lengths=[33], nexthops=[1]),
    dict(prefixes=[0], lengths=[-1], nexthops=[1]),
    dict(prefixes=[0], lengths=[8], nexthops=[0]),
    dict(prefixes=[0], lengths=[8], nexthops=[NH_MAX + 1]),
    dict(prefixes=[1 << 32], lengths=[8], nexthops=[1]),
    dict(prefixes=[0, 1], lengths=[8], nexthops=[1]),
])
def test_bad_input(bad):
    with pytest.raises(ValueError):
        Lpm(**bad)


LENGTHS = st.sampled_from([0, 1, 7, 8, 9, 15, 16, 17, 23, 24, 25, 26, 28, 30, 31, 32])
ROUTE = st.tuples(st.integers(0, 0xFFFFFFFF), LENGTHS, st.integers(1, 50))
# Prefixes clustered in a few /16s so that they overlap and nest.
CLUSTERED = st.tuples(st.sampled_from([ip("10.0.0.0"), ip("10.0.1.0"), ip("192.168.0.0")]),
                      st.integers(0, 0x1FF), LENGTHS, st.integers(1, 50)).map(
    lambda t: (t[0] | t[1], t[2], t[3]))


@settings(max_examples=60, deadline=None)
@given(st.lists(st.one_of(ROUTE, CLUSTERED), max_size=40), st.integers(0, 2**32 - 1))
def test_random_route_sets_match_the_reference(routes, seed):
    r = random.Random(seed)
    check(routes, edge_addresses(routes, r, 50))


@pytest.mark.parametrize("seed", range(3))
def test_large_random_route_sets(seed):
    r = random.Random(seed)
    routes = []
    for _ in range(3000):
        ln = r.choice([0, 8, 12, 16, 20, 22, 23, 24, 24, 24, 25, 26, 27, 28, 29, 30, 31, 32])
        if r.random() < 0.5:  # nest inside an earlier route
            p, pl, _ = r.choice(routes) if routes else (0, 0, 0)
            ln = max(ln, pl)
            p = (p & prefix_mask(pl)) | (r.randrange(1 << 32) & ~prefix_mask(pl) & 0xFFFFFFFF)
        else:
            p = r.randrange(1 << 32)
        routes.append((p, ln, r.randrange(1, 5000)))
    addrs = edge_addresses(r.sample(routes, 500), r, 2000)
    check(routes, addrs)


def test_100k_random_routes_build_fast_and_look_up_right():
    r = np.random.default_rng(7)
    n = 100_000
    p = r.integers(0, 2**32, n)
    ln = r.integers(0, 33, n)
    nh = r.integers(1, 10_000, n)
    t0 = time.perf_counter()
    t = Lpm(p, ln, nh)
    dt = time.perf_counter() - t0
    print(f"\nDIR-24-8 build: {n} random routes in {dt:.3f} s, {t.routes} distinct, "
          f"{t.groups} tbl8 groups, {t.nbytes / 2**20:.0f} MiB")
    addrs = r.integers(0, 2**32, 300)
    routes = list(zip(p.tolist(), ln.tolist(), nh.tolist()))
    got = t.lookup_many(addrs)
    assert np.array_equal(got, reference(routes, addrs))
    t0 = time.perf_counter()
    many = r.integers(0, 2**32, 1_000_000)
    t.lookup_many(many)
    print(f"lookups: {(time.perf_counter() - t0) * 1e3:.0f} ns each (1M batch)")


def test_compiled_lookup_equals_python_lookup():
    """The kernel against its own source run as plain Python (numba's py_func)."""
    r = random.Random(3)
    routes = [(r.randrange(1 << 32), r.choice([0, 8, 16, 24, 25, 32]), r.randrange(1, 99))
              for _ in range(500)]
    t = Lpm(*zip(*routes))
    py = getattr(lpm_lookup, "py_func", lpm_lookup)
    if JIT_ENABLED:
        assert py is not lpm_lookup
    for a in edge_addresses(routes[:100], r, 500):
        assert py(t.tbl24, t.tbl8, a) == lpm_lookup(t.tbl24, t.tbl8, a) == t.lookup(a)


def test_table_layout():
    """A /25 makes a tbl8 group whose other half keeps the covering /24's next hop."""
    t = Lpm([ip("10.1.2.0"), ip("10.1.2.128")], [24, 25], [4, 5])
    e = int(t.tbl24[ip("10.1.2.0") >> 8])
    assert e & EXT
    g = e ^ EXT
    assert (t.tbl8[g * 256:g * 256 + 128] == 4).all()
    assert (t.tbl8[g * 256 + 128:g * 256 + 256] == 5).all()
    assert t.tbl24.dtype == np.int32 and len(t.tbl24) == 1 << 24


def test_default_route_is_kept_out_of_tbl24():
    """A default route answers every address without writing tbl24 (whose 64 MiB of
    pages then stay unmapped: a small tenant's router costs a few pages, not 64 MiB),
    and longer prefixes, /25 groups included, still win over it."""
    t = Lpm([0, 0x0A000000, 0x0A000100], [0, 24, 25], [7, 3, 4])
    assert np.count_nonzero(t.tbl24) == 2  # the /24 and the /25 group's EXT entry
    assert t.lookup(0x08080808) == 7
    assert t.lookup(0x0A000005) == 3
    assert t.lookup(0x0A000105) == 4
    assert t.lookup(0x0A000185) == 7  # the /25 group's other half: only the default covers
    assert Lpm([], [], []).lookup(0x08080808) == 0


def _pss_kib() -> int | None:
    try:
        with open(f"/proc/{os.getpid()}/smaps_rollup") as f:
            return next(int(ln.split()[1]) for ln in f if ln.startswith("Pss:"))
    except (OSError, StopIteration):
        return None


def test_a_small_table_costs_pages_not_megabytes():
    """A tenant's router (two connected /24s far apart, a /25, a default route) makes a
    few 4 KiB pages of tbl24 resident, not 2 MiB huge pages per entry written (4 MiB
    each before) nor the whole 64 MiB (a default route written into tbl24)."""
    if _pss_kib() is None:
        pytest.skip("needs /proc/PID/smaps_rollup")
    tables = []
    before = _pss_kib()
    for i in range(20):
        tables.append(Lpm([0x0A000000 + (i << 8), 0xC6336400, 0xC6336480, 0],
                          [24, 24, 25, 0], [1, 2, 3, 4]))
    grew = _pss_kib() - before
    assert grew < 20 * 512, f"{grew} KiB for 20 small tables"
    assert tables[7].lookup(0x0A000705) == 1 and tables[7].lookup(0x08080808) == 4


def test_a_thousand_small_tables_leave_room_to_fork():
    """A dispatcher with 1,000 tenant routers (64 GiB of tbl24 address space) must still
    fork its workers: sparse tables are mapped outside the commit limit (with the
    default heuristic overcommit the fork failed with ENOMEM)."""
    tables = [Lpm([0x0A000000, 0xC6336400, 0], [24, 24, 0], [1, 2, 3]) for _ in range(1000)]
    pid = os.fork()
    if pid == 0:
        os._exit(0 if tables[999].lookup(0x0A000001) == 1 else 1)
    assert os.waitpid(pid, 0)[1] == 0
