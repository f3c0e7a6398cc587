"""The in-band bus: one shared-memory region holding the packet pool and the rings.

Layout (one anonymous ``MAP_SHARED`` mapping, made by the dispatcher before it forks
its workers, so every worker -- a restarted one too -- inherits it; nothing is named
in ``/dev/shm`` and the kernel frees it when the last process exits):

* the packet slots, ``uint8[nslots, slot_size]``;
* per worker ``w`` (up to ``max_workers``): an **rx ring** (dispatcher -> worker:
  packets to process, slots handed back) and a **tx ring** (worker -> dispatcher:
  packets to transmit, slots handed back), descriptors of :mod:`dva.packet.ring`;
* per worker a row of load words the worker writes and the manager reads
  (``LOAD_*``: busy time, batches, packets, last heartbeat).

Slot ownership (:mod:`dva.packet.pool`): the dispatcher owns slots
``[0, dispatcher_slots)``, worker ``w`` owns the next ``worker_slots`` after
``dispatcher_slots + w * worker_slots``. A slot always goes home to its owner's free
stack (``K_FREE`` descriptors), so a worker that dies loses only its own range (which
its replacement starts afresh) plus the dispatcher's slots it had, which the
dispatcher tracks per slot and takes back.
"""

from __future__ import annotations

import mmap

import numpy as np

from dva.packet.pool import DEFAULT_HEADROOM, DEFAULT_SLOT_SIZE, PacketPool
from dva.packet.ring import ring_init, ring_words

LOAD_WORDS = 8
LOAD_BUSY_NS, LOAD_BATCHES, LOAD_PACKETS, LOAD_BEAT_NS, LOAD_GEN = range(5)


class Bus:
    def __init__(self, *, max_workers: int, dispatcher_slots: int = 16384,
                 worker_slots: int = 4096, ring_capacity: int = 4096,
                 slot_size: int = DEFAULT_SLOT_SIZE, headroom: int = DEFAULT_HEADROOM) -> None:
        if max_workers < 1:
            raise ValueError("a bus needs room for at least one worker")
        self.max_workers = max_workers
        self.dispatcher_slots = dispatcher_slots
        self.worker_slots = worker_slots
        self.nslots = dispatcher_slots + max_workers * worker_slots
        self.slot_size = slot_size
        self.headroom = headroom
        self.ring_capacity = ring_capacity
        rw = ring_words(ring_capacity)
        pool_bytes = self.nslots * slot_size
        pool_bytes += -pool_bytes % 4096
        self.size = pool_bytes + 8 * (2 * max_workers * rw + max_workers * LOAD_WORDS)
        self.map = mmap.mmap(-1, self.size, flags=mmap.MAP_SHARED,
                             prot=mmap.PROT_READ | mmap.PROT_WRITE)
        self.data = np.ndarray((self.nslots, slot_size), np.uint8, buffer=self.map)
        words = np.ndarray((self.size - pool_bytes) // 8, np.int64, buffer=self.map,
                           offset=pool_bytes)
        self.rx = [words[(2 * w) * rw:(2 * w + 1) * rw] for w in range(max_workers)]
        self.tx = [words[(2 * w + 1) * rw:(2 * w + 2) * rw] for w in range(max_workers)]
        base = 2 * max_workers * rw
        self.load = words[base:base + max_workers * LOAD_WORDS].reshape(max_workers,
                                                                        LOAD_WORDS)
        for w in range(max_workers):
            ring_init(self.rx[w], ring_capacity)
            ring_init(self.tx[w], ring_capacity)

    def slot_range(self, unit: int) -> tuple[int, int]:
        """Slots owned by ``unit``: -1 the dispatcher, ``w >= 0`` worker ``w``."""
        if unit < 0:
            return 0, self.dispatcher_slots
        lo = self.dispatcher_slots + unit * self.worker_slots
        return lo, lo + self.worker_slots

    def owner_of(self, slots: np.ndarray) -> np.ndarray:
        """Owning unit of each slot (-1 the dispatcher)."""
        return np.where(slots < self.dispatcher_slots, -1,
                        (slots - self.dispatcher_slots) // self.worker_slots)

    def pool(self, unit: int) -> PacketPool:
        """A pool over the shared slots with ``unit``'s own free stack."""
        return PacketPool(self.nslots, self.slot_size, self.headroom, buffer=self.map,
                          own=self.slot_range(unit))

    def close(self) -> None:
        # Views into the mapping keep it alive until they go; closing early would
        # turn any later access into a crash, so only drop our references here.
        self.rx = self.tx = []
        self.data = self.load = None
