"""A pool of fixed-size packet slots.

Packet bytes live in one ``uint8[nslots, slot_size]`` array. A packet is named by its
slot id everywhere else (batches, rings between processes), so moving a packet never
copies its bytes. The array may be backed by any buffer (``buffer=``), which is how a
later runtime puts it in shared memory.

Free slots are a stack of ids (``free[:top[0]]``) so that allocation and release are
O(1) kernels callable from inside device kernels (flood copies, ARP requests, ICMP
errors). Every frame starts ``headroom`` bytes into its slot, so a VLAN tag or a
tunnel header can be pushed in front of it without moving the payload.

Ownership (the multi-process runtime, :mod:`dva.worker.bus`): several processes share
one slot array, each *owning* a range of slot ids ``[top[T_LO], top[T_HI])`` with its
own free stack. Releasing a slot another process owns (a packet the dispatcher handed
to a worker and the worker dropped) does not put it on this stack: it goes on the
*return list*, kept at the far end of ``free`` (``free[len-1]`` downwards, ``top[T_RET]``
entries), for the runtime to hand back to its owner (:meth:`PacketPool.take_returns`).
Own stack and return list never meet: together they hold at most every slot once. A
pool that owns every slot (the default) never returns anything.
"""

from __future__ import annotations

import numpy as np

from dva._jit import kernel

DEFAULT_SLOTS = 16384
DEFAULT_SLOT_SIZE = 2240
DEFAULT_HEADROOM = 128
# words of ``top``: free-stack size, owned range [lo, hi), return-list size
T_N, T_LO, T_HI, T_RET = 0, 1, 2, 3


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
    """Push ``slot`` back on the free stack, or on the return list if another process
    owns it (module docstring).

    A stack already full means a slot was released twice: refusing keeps the
    compiled code (which has no bounds checks) from writing past the stack.
    """
    lo = top[T_LO]
    if slot >= lo and slot < top[T_HI]:
        t = top[T_N]
        if t >= top[T_HI] - lo:
            return False
        free[t] = slot
        top[T_N] = t + 1
        return True
    r = top[T_RET]
    if top[T_N] + r >= free.shape[0]:
        return False
    free[free.shape[0] - 1 - r] = slot
    top[T_RET] = r + 1
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
                 headroom: int = DEFAULT_HEADROOM, buffer=None,
                 own: tuple[int, int] | None = None) -> None:
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
        lo, hi = own if own is not None else (0, nslots)
        if not 0 <= lo < hi <= nslots:
            raise ValueError(f"bad owned slot range [{lo}, {hi}) of {nslots} slots")
        self.own = (lo, hi)
        # Popped from the end: low slot ids are handed out first, which keeps small
        # runs inside a few pages.
        self.free = np.zeros(nslots, dtype=np.int32)
        self.free[:hi - lo] = np.arange(hi - 1, lo - 1, -1, dtype=np.int32)
        self.top = np.array([hi - lo, lo, hi, 0], dtype=np.int64)

    @property
    def max_frame(self) -> int:
        """Largest frame a slot holds."""
        return self.slot_size - self.headroom

    @property
    def available(self) -> int:
        return int(self.top[T_N])

    @property
    def owned(self) -> int:
        """Slots this pool owns (all of them unless ``own`` was given)."""
        return self.own[1] - self.own[0]

    def owns(self, slot: int) -> bool:
        return self.own[0] <= slot < self.own[1]

    def take_returns(self, limit: int | None = None) -> np.ndarray:
        """Remove and return (oldest first) up to ``limit`` slots of other owners that
        were released here."""
        r = int(self.top[T_RET])
        k = r if limit is None else min(r, limit)
        end = self.nslots
        out = self.free[end - k:end][::-1].astype(np.int64)
        # the rest moves to the far end again (the list stays contiguous)
        rest = self.free[end - r:end - k].copy()
        self.free[end - (r - k):end] = rest
        self.top[T_RET] = r - k
        return out

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
