"""Single-producer/single-consumer rings of packet descriptors, for shared memory.

The in-band bus between the dispatcher and each worker (ARCHITECTURE.md): a ring
carries *descriptors* -- a slot id of the shared packet pool plus a few words of
metadata -- never packet bytes. Exactly one process pushes and one pops.

Layout of the ``int64`` array (``ring_words`` gives its size)::

    [HEAD]        consumer position (entries taken so far), written by the consumer
    [TAIL]        producer position (entries published so far), written by the producer
    [CAP], [WIDTH] capacity (a power of two) and words per descriptor
    [DATA + (pos % CAP) * WIDTH ...]   the descriptors

HEAD and TAIL sit on cache lines of their own so the two sides do not write the same
line. Positions only grow (int64: no wrap in practice). The producer writes the
descriptors, then publishes TAIL with a release store; the consumer reads TAIL with an
acquire load, copies the descriptors, then publishes HEAD with a release store (the
slots it read may be overwritten from then on). A full ring refuses what does not
fit: the caller counts that as a named drop (back-pressure), nothing waits here.

Descriptor words (``D_*``): kind (``K_PKT`` a packet to process or transmit,
``K_FREE`` a slot handed back to its owner), slot, start, length, appliance index,
attachment index, flow bucket, time (ns).
"""

from __future__ import annotations

import numpy as np

from dva._jit import kernel, load_acquire, store_release

HEAD, TAIL, CAP, WIDTH = 0, 8, 16, 17
DATA = 24

D_KIND, D_SLOT, D_START, D_LEN, D_APP, D_ATTACH, D_BUCKET, D_TIME = range(8)
DESC_WORDS = 8
K_PKT, K_FREE = 1, 2


def ring_words(capacity: int, width: int = DESC_WORDS) -> int:
    if capacity <= 0 or capacity & (capacity - 1):
        raise ValueError(f"ring capacity must be a power of two, not {capacity}")
    return DATA + capacity * width


def ring_init(ring: np.ndarray, capacity: int, width: int = DESC_WORDS) -> None:
    """Format ``ring`` (an int64 array of ``ring_words`` words) as an empty ring."""
    if ring.shape[0] < ring_words(capacity, width):
        raise ValueError("ring array too small for its capacity")
    ring[:DATA] = 0
    ring[CAP] = capacity
    ring[WIDTH] = width


@kernel
def ring_count(ring):
    """Entries published and not yet taken (either side may ask)."""
    return load_acquire(ring, TAIL) - load_acquire(ring, HEAD)


@kernel
def ring_taken(ring):
    """How many descriptors the consumer has taken so far (its head position)."""
    return load_acquire(ring, HEAD)


@kernel
def ring_push(ring, src, i0, n):
    """Publish rows ``src[i0:i0+n]`` (descriptors, ``WIDTH`` words each) as far as
    they fit; returns how many were published (the first ones)."""
    cap = ring[CAP]
    w = ring[WIDTH]
    tail = ring[TAIL]  # only this side writes it
    room = cap - (tail - load_acquire(ring, HEAD))
    k = n if n < room else room
    for j in range(k):
        o = DATA + ((tail + j) & (cap - 1)) * w
        for f in range(w):
            ring[o + f] = src[i0 + j, f]
    if k > 0:
        store_release(ring, TAIL, tail + k)
    return k


@kernel
def ring_pop(ring, dst, max_n):
    """Take up to ``max_n`` descriptors into ``dst[0:k]``; returns ``k``."""
    cap = ring[CAP]
    w = ring[WIDTH]
    head = ring[HEAD]  # only this side writes it
    avail = load_acquire(ring, TAIL) - head
    k = max_n if max_n < avail else avail
    for j in range(k):
        o = DATA + ((head + j) & (cap - 1)) * w
        for f in range(w):
            dst[j, f] = ring[o + f]
    if k > 0:
        store_release(ring, HEAD, head + k)
    return k


def ring_reset(ring: np.ndarray) -> None:
    """Empty the ring (only while neither side is running: a crashed worker's)."""
    ring[HEAD] = 0
    ring[TAIL] = 0
