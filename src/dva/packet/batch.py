"""``PacketBatch``: slot ids plus per-packet metadata, the unit every stage works on.

A batch does not own packet bytes; it names slots of a :class:`PacketPool` and keeps
one metadata row per packet (columns in :mod:`dva.packet.layout`). Device kernels may
append rows (generated packets: flood copies, ARP requests, ICMP errors) up to the
batch's capacity. Batches are reused: ``clear()`` forgets the rows but not the slots,
which the owner releases or hands on.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from dva._jit import kernel
from dva.packet import layout as L
from dva.packet.pool import PacketPool, PoolExhausted, pool_alloc, pool_release


@kernel
def row_copy(dst, di, src, si):
    """dst[di] = src[si] for metadata matrices (no slice assignment: kernels have no
    runtime to allocate the temporary it may need)."""
    for f in range(L.NFIELDS):
        dst[di, f] = src[si, f]


NO_ROW, NO_SLOT = -1, -2  # take_slot's failures


@kernel
def take_slot(free, top, meta, total):
    """A pool slot for the row a device is about to append at ``total``: the slot,
    ``NO_ROW`` when the batch has no room for another row, ``NO_SLOT`` when the pool
    is empty."""
    if total >= meta.shape[0]:
        return NO_ROW
    c = pool_alloc(free, top)
    return c if c >= 0 else NO_SLOT


@kernel
def new_row(meta, r, slot, start, length, verdict, hops, note):
    """Row ``r`` for a packet a device generated (in pool slot ``slot``): every other
    column zeroed, untagged; the engine stamps tenant and origin and parses it."""
    for f in range(L.NFIELDS):
        meta[r, f] = 0
    meta[r, L.SLOT] = slot
    meta[r, L.START] = start
    meta[r, L.LEN] = length
    meta[r, L.VERDICT] = verdict
    meta[r, L.HOPS] = hops
    meta[r, L.NOTE] = note
    meta[r, L.VLAN] = -1


@kernel
def release_rows(free, top, meta, n):
    """Every slot of rows ``0..n`` back to the pool (own stack or return list)."""
    for i in range(n):
        pool_release(free, top, meta[i, L.SLOT])


class PacketBatch:
    __slots__ = ("pool", "meta", "n")

    def __init__(self, pool: PacketPool, capacity: int = 256) -> None:
        if capacity <= 0:
            raise ValueError("batch capacity must be positive")
        self.pool = pool
        self.meta = np.zeros((capacity, L.NFIELDS), dtype=np.int64)
        self.n = 0

    @property
    def capacity(self) -> int:
        return self.meta.shape[0]

    def __len__(self) -> int:
        return self.n

    def clear(self) -> None:
        self.n = 0

    def ensure_capacity(self, capacity: int) -> None:
        """Grow the metadata matrix (keeping rows) to hold at least ``capacity``."""
        if capacity > self.capacity:
            meta = np.zeros((max(capacity, 2 * self.capacity), L.NFIELDS), np.int64)
            meta[: self.n] = self.meta[: self.n]
            self.meta = meta

    def add_frame(self, frame: bytes, *, in_port: int = 0, tenant: int = 0,
                  origin: int = -1) -> int:
        """Copy ``frame`` into a fresh slot and append a row for it; returns the row."""
        slot = self.pool.alloc()
        try:
            self.pool.write(slot, frame)
        except ValueError:
            self.pool.release(slot)
            raise
        self.ensure_capacity(self.n + 1)
        i = self.n
        row = self.meta[i]
        row[:] = 0
        row[L.SLOT] = slot
        row[L.START] = self.pool.headroom
        row[L.LEN] = len(frame)
        row[L.IN_PORT] = in_port
        row[L.TENANT] = tenant
        row[L.ORIGIN] = origin
        row[L.VLAN] = -1
        self.n = i + 1
        return i

    def add_frames(self, frames: Iterable[bytes], **kw) -> None:
        for f in frames:
            self.add_frame(f, **kw)

    def frame(self, i: int) -> bytes:
        row = self.meta[i]
        return self.pool.read(int(row[L.SLOT]), int(row[L.START]), int(row[L.LEN]))

    def frames(self) -> list[bytes]:
        return [self.frame(i) for i in range(self.n)]

    def release_all(self) -> None:
        """Return every slot of the batch to the pool and empty it."""
        if self.n:
            release_rows(self.pool.free, self.pool.top, self.meta, self.n)
        self.n = 0


__all__ = ["PacketBatch", "PacketPool", "PoolExhausted", "row_copy"]
