"""IPv4 longest-prefix match: a DIR-24-8 table (Gupta, Lin, McKeown 1998; DPDK rte_lpm).

Two arrays of ``int32`` entries:

* ``tbl24`` -- 2**24 entries, one per /24 (indexed by the top 24 bits of the address);
* ``tbl8`` -- groups of 256 entries, one group per /24 that holds a prefix longer
  than /24 (indexed by ``group * 256 + the low 8 bits``).

An entry is a next-hop number (``0``: no route), or, in ``tbl24`` only, ``EXT | g``:
"look in tbl8 group ``g``". The default route (``/0``) is not written into the tables:
it sits in one extra entry after the last tbl8 group and answers where an entry is 0.
A lookup is therefore one read, or two (three for an address only the default route
covers): O(1) whatever the number of routes, and :func:`lpm_lookup` is a kernel
callable from device kernels.

Building (plain numpy, once per config): prefixes are applied shortest first, so a
longer prefix overwrites the range of a shorter one it lies in. A /k with k <= 24
fills 2**(24-k) tbl24 entries; a /k with k > 24 gets (or creates) the tbl8 group of
its /24 -- a new group starts as a copy of the tbl24 entry it replaces, which is the
shorter prefix covering it -- and fills 2**(32-k) entries of it. Equal prefixes: the
later one wins. 100k random routes build in well under a second (``tests/unit/test_lpm.py``
prints the time).

Memory: ``tbl24`` is 64 MiB of address space (int32 so that next-hop numbers and group
numbers have 30 bits, unlike rte_lpm's original 8-bit next hops); each tbl8 group is
1 KiB. Pages of ``tbl24`` that no prefix touches are never written (``np.zeros`` is
lazily mapped), which is why the default route is kept apart: written into tbl24 it
would touch all 64 MiB, and a small tenant's router (connected /24s and a default
route) would cost that much memory instead of a few pages (``benchmarks/tenants.py``).
For the same reason a table with few prefixes gets a mapping of 4 KiB pages of its
own, outside the commit limit (with numpy's transparent-huge-page advice each entry
written would make a 2 MiB page resident); a large one keeps ``np.zeros`` and its
huge pages, which spare random lookups TLB misses.
"""

from __future__ import annotations

import mmap
import sys

import numpy as np

from dva._jit import i64, kernel

EXT = 1 << 30  # tbl24 entry flag: the rest is a tbl8 group number
NH_MAX = EXT - 1  # largest next-hop number
TBL24_SIZE = 1 << 24
GROUP = 256
SPARSE = 4096  # at most this many prefixes of /24 or shorter: tbl24 in 4 KiB pages
# (Python's mmap module names it from 3.13 on; 0x4000 on Linux)
MAP_NORESERVE = getattr(mmap, "MAP_NORESERVE", 0x4000 if sys.platform == "linux" else 0)


def _zeros(n: int, huge: bool) -> np.ndarray:
    """``n`` zeroed int32 entries. ``huge``: ``np.zeros`` (numpy advises transparent
    huge pages for it). Else a private anonymous mapping of its own with
    ``MAP_NORESERVE``: 4 KiB pages, made resident only where written, and not
    counted against the commit limit -- with the kernel's default (heuristic)
    overcommit a process holding a thousand 64 MiB tables could not ``fork`` a worker
    otherwise (its 64 GiB of writable address space is checked as a whole)."""
    if huge:
        return np.zeros(n, np.int32)
    flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | MAP_NORESERVE
    return np.frombuffer(mmap.mmap(-1, 4 * n, flags=flags), np.int32)


@kernel
def lpm_lookup(tbl24, tbl8, addr):
    """Next-hop number of the longest prefix matching ``addr`` (0: no route)."""
    e = i64(tbl24[(addr >> 8) & 0xFFFFFF])
    if e & EXT:
        e = i64(tbl8[((e ^ EXT) << 8) | (addr & 0xFF)])
    if e == 0:
        e = i64(tbl8[tbl8.shape[0] - 1])  # the default route, 0 if there is none
    return e


@kernel
def lpm_lookup_many(tbl24, tbl8, addrs, out):
    """``out[i] = lpm_lookup(addrs[i])`` for every address."""
    for i in range(addrs.shape[0]):
        out[i] = lpm_lookup(tbl24, tbl8, i64(addrs[i]))


def prefix_mask(length: int) -> int:
    return (0xFFFFFFFF << (32 - length)) & 0xFFFFFFFF


class Lpm:
    """A built DIR-24-8 table. Immutable once built (a new config builds a new one).

    ``Lpm(prefixes, lengths, nexthops)``: three equally long array-likes; addresses as
    unsigned 32-bit integers (host bits beyond the length are ignored), lengths 0..32,
    next hops 1..NH_MAX.
    """

    def __init__(self, prefixes, lengths, nexthops) -> None:
        p = np.asarray(prefixes, np.int64).reshape(-1)
        ln = np.asarray(lengths, np.int64).reshape(-1)
        nh = np.asarray(nexthops, np.int64).reshape(-1)
        if not (len(p) == len(ln) == len(nh)):
            raise ValueError("prefixes, lengths and next hops differ in number")
        if len(p):
            if ln.min() < 0 or ln.max() > 32:
                raise ValueError("prefix lengths must be 0..32")
            if nh.min() < 1 or nh.max() > NH_MAX:
                raise ValueError(f"next hops must be 1..{NH_MAX}")
            if p.min() < 0 or p.max() > 0xFFFFFFFF:
                raise ValueError("IPv4 addresses are 0..2**32-1")
        masks = (0xFFFFFFFF << (32 - ln)) & 0xFFFFFFFF
        p = p & masks
        # Equal prefixes: keep the last (first in reverse), so each range is filled once
        # per distinct prefix (at most 2**k prefixes of length k: bounded work).
        _, last = np.unique(((p << 6) | ln)[::-1], return_index=True)
        keep = len(p) - 1 - last
        p, ln, nh = p[keep], ln[keep], nh[keep]
        self.routes = len(p)
        order = np.argsort(ln, kind="stable")  # shortest first
        short = order[ln[order] <= 24]
        long_ = order[ln[order] > 24]
        tbl24 = _zeros(TBL24_SIZE, huge=len(short) > SPARSE)
        default = 0
        for a, k, h in zip((p[short] >> 8).tolist(), ln[short].tolist(), nh[short].tolist()):
            if k == 0:
                default = h
            else:
                tbl24[a:a + (1 << (24 - k))] = h
        ngroups = len(np.unique(p[long_] >> 8)) if len(long_) else 0
        tbl8 = np.zeros(max(ngroups, 1) * GROUP + 1, np.int32)
        tbl8[-1] = default
        g_next = 0
        for a, k, h in zip(p[long_].tolist(), ln[long_].tolist(), nh[long_].tolist()):
            i24 = a >> 8
            e = int(tbl24[i24])
            if e & EXT:
                g = e ^ EXT
            else:
                g = g_next
                g_next += 1
                tbl8[g * GROUP:(g + 1) * GROUP] = e
                tbl24[i24] = EXT | g
            lo = g * GROUP + (a & 0xFF)
            tbl8[lo:lo + (1 << (32 - k))] = h
        self.tbl24 = tbl24
        self.tbl8 = tbl8
        self.groups = g_next

    @property
    def nbytes(self) -> int:
        return self.tbl24.nbytes + self.tbl8.nbytes

    def lookup(self, addr: int) -> int:
        return int(lpm_lookup(self.tbl24, self.tbl8, int(addr)))

    def lookup_many(self, addrs) -> np.ndarray:
        a = np.asarray(addrs, np.int64).reshape(-1)
        out = np.zeros(len(a), np.int64)
        lpm_lookup_many(self.tbl24, self.tbl8, a, out)
        return out
