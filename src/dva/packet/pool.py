"""A pool of fixed-size packet slots.

Packet bytes live in one ``uint8[nslots, slot_size]`` array. A packet is named by its
slot id everywhere else (batches, rings between processes), so moving a packet never
copies its bytes. The array may be backed by any buffer (``buffer=``), which is how a
later runtime puts it in shared memory.

Free slots are a stack of ids (``free[:top[0]]``) so that allocation and release are
O(1) kernels callable from inside device kernels (flood copies, ARP requests, ICMP
errors). Every frame starts ``headroom`` bytes into its slot, so a VLAN tag or a
tunnel header can be pushed in front of it without moving the payload.
"""

from __future__ import annotations

import numpy as np

from dva._jit import kernel

DEFAULT_SLOTS = 16384
DEFAULT_SLOT_SIZE = 2240
DEFAULT_HEADROOM = 128


class PoolExhausted(RuntimeError):
    """No free slot was left for a packet."""


@kernel
def pool_alloc(free, top):
    """Pop one free slot id, or -1 when the pool is exhausted."""
    t = top[0]
    if t == 0:
        return -1
    t -= 1
    top[0] = t
    return int(free[t])


@kernel
def pool_release(free, top, slot):
    """Push ``slot`` back on the free stack.

    A stack already full means a slot was released twice: refusing keeps the
    compiled code (which has no bounds checks) from writing past the stack.
    """
    t = top[0]
    if t >= free.shape[0]:
        return False
    free[t] = slot
    top[0] = t + 1
    return True


@kernel
def pool_copy(data, free, top, src_slot, start, length):
    """Copy a frame into a new slot at the same start offset; -1 when exhausted."""
    s = pool_alloc(free, top)
    if s < 0:
        return -1
    for k in range(start, start + length):
        data[s, k] = data[src_slot, k]
    return s


class PacketPool:
    """Fixed-size slots for packet bytes plus the free-slot stack."""

    def __init__(self, nslots: int = DEFAULT_SLOTS, slot_size: int = DEFAULT_SLOT_SIZE,
                 headroom: int = DEFAULT_HEADROOM, buffer=None) -> None:
        if nslots <= 0 or slot_size <= headroom + 64:
            raise ValueError(f"bad pool geometry: {nslots} slots of {slot_size} bytes, "
                             f"headroom {headroom}")
        self.nslots = nslots
        self.slot_size = slot_size
        self.headroom = headroom
        if buffer is None:
            self.data = np.zeros((nslots, slot_size), dtype=np.uint8)
        else:
            self.data = np.ndarray((nslots, slot_size), dtype=np.uint8, buffer=buffer)
        # Popped from the end: low slot ids are handed out first, which keeps small
        # runs inside a few pages.
        self.free = np.arange(nslots - 1, -1, -1, dtype=np.int32)
        self.top = np.array([nslots], dtype=np.int64)

    @property
    def max_frame(self) -> int:
        """Largest frame a slot holds."""
        return self.slot_size - self.headroom

    @property
    def available(self) -> int:
        return int(self.top[0])

    def alloc(self) -> int:
        slot = pool_alloc(self.free, self.top)
        if slot < 0:
            raise PoolExhausted(f"packet pool exhausted ({self.nslots} slots)")
        return slot

    def release(self, slot: int) -> None:
        pool_release(self.free, self.top, slot)

    def write(self, slot: int, frame: bytes) -> None:
        """Put ``frame`` at the headroom offset of ``slot``."""
        if len(frame) > self.max_frame:
            raise ValueError(f"frame of {len(frame)} bytes exceeds the slot's "
                             f"{self.max_frame}")
        h = self.headroom
        self.data[slot, h:h + len(frame)] = np.frombuffer(frame, dtype=np.uint8)

    def read(self, slot: int, start: int, length: int) -> bytes:
        return self.data[slot, start:start + length].tobytes()
