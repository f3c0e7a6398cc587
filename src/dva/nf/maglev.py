"""Maglev consistent hashing (Eisenbud et al., NSDI 2016, section 3.4).

A lookup table of ``M`` entries (``M`` prime) maps a flow hash to a backend: entry
``hash % M``. Each backend has a permutation of the table positions,
``(offset + j * skip) % M`` with ``offset`` and ``skip`` from two hashes of its name;
backends take turns claiming their next free preferred position until the table is
full. So every backend gets about ``M / N`` entries (within a few percent when ``M``
is much larger than ``N``, e.g. 65537 for up to a few hundred backends), and adding
or removing one backend changes about ``1/N`` of the entries: few flows that were on
other backends move (the paper measures this; ``tests/unit/test_lb.py`` bounds it).

Weights: in every round a backend of weight ``w`` claims ``w`` positions, so its
share is ``w / sum(weights)``. A backend that is down takes no turns. The table
depends only on the backends' names, weights and states, never on history, so every
worker (and a restarted one) computes the same table.
"""

from __future__ import annotations

import hashlib

import numpy as np

from dva._jit import kernel

DEFAULT_SIZE = 65537
MAX_SIZE = 1_000_003


def is_prime(m: int) -> bool:
    if m < 2:
        return False
    if m % 2 == 0:
        return m == 2
    f = 3
    while f * f <= m:
        if m % f == 0:
            return False
        f += 2
    return True


def permutation(name: str, m: int) -> tuple[int, int]:
    """(offset, skip) of the backend called ``name`` in a table of ``m`` entries."""
    d = hashlib.blake2b(name.encode(), digest_size=16).digest()
    h1 = int.from_bytes(d[:8], "little")
    h2 = int.from_bytes(d[8:], "little")
    return h1 % m, h2 % (m - 1) + 1


@kernel
def _fill(offset, skip, weight, up, nxt, entry):
    """Populate ``entry`` (-1 everywhere when no backend is up)."""
    m = entry.shape[0]
    n = offset.shape[0]
    for c in range(m):
        entry[c] = -1
    live = 0
    for i in range(n):
        nxt[i] = 0
        if up[i]:
            live += 1
    if live == 0:
        return 0
    filled = 0
    while True:
        for i in range(n):
            if not up[i]:
                continue
            for _ in range(weight[i]):
                c = (offset[i] + nxt[i] * skip[i]) % m
                while entry[c] >= 0:
                    nxt[i] += 1
                    c = (offset[i] + nxt[i] * skip[i]) % m
                entry[c] = i
                nxt[i] += 1
                filled += 1
                if filled == m:
                    return filled


def build_table(names: list[str], weights: list[int], up: list[bool], m: int,
                out: np.ndarray | None = None) -> np.ndarray:
    """The Maglev table (int32 backend index per entry, -1: no backend up)."""
    if not is_prime(m):
        raise ValueError(f"table size {m} is not prime")
    if len(names) >= m:
        raise ValueError(f"table size {m} must exceed the number of backends")
    perms = [permutation(n, m) for n in names]
    offset = np.array([p[0] for p in perms], np.int64)
    skip = np.array([p[1] for p in perms], np.int64)
    entry = np.empty(m, np.int32) if out is None else out
    _fill(offset, skip, np.asarray(weights, np.int64), np.asarray(up, np.bool_),
          np.zeros(len(names), np.int64), entry)
    return entry


def shares(table: np.ndarray, n: int) -> np.ndarray:
    """Fraction of the table's entries held by each of ``n`` backends."""
    return np.bincount(table[table >= 0], minlength=n)[:n] / len(table)
