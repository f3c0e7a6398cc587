"""Bucket aliases: keep both directions of address-rewritten flows in one flow bucket.

A flow's bucket is the sum of its two endpoint terms (``parse.py``), so both
directions of an unmodified flow share a bucket. A device that rewrites an endpoint
without choosing a bucket-keeping port breaks that: a port forward turns
``client -> (X, 8080)`` into ``client -> (10.0.0.50, 80)``, and the reply
``(10.0.0.50, 80) -> client`` sums other terms, so a multi-worker dispatcher would send
it to a worker that does not know the connection. Devices declare such rewrites as
*aliases* (``Device.bucket_aliases``): an endpoint pattern and the endpoint it stands
for. After parsing, :func:`alias_buckets` replaces the term of every endpoint that
matches an alias by the term of its canonical endpoint, on every packet of the
appliance, whichever side the endpoint is on -- so the rewritten direction and the
original one land in the same bucket, and so does any other flow of that endpoint
(consistently both ways). Only ``BUCKET`` changes; ``HASH`` (which devices use to
pick backends, source ports) stays the wire's.

An alias row (int64 ``[k, ALIAS_WORDS]``): protocol (-1: any), address (-1: any),
port range ``lo..hi``, canonical address, canonical port for ``lo`` (-1: the port
itself), i.e. port ``p`` in the range stands for ``(addr', p - lo + port')``.
Applied to IPv4 packets with a complete L4 header (TCP/UDP by ports, other
protocols as port 0, as the flow hash does); fragments and ICMP errors keep their
bucket (a fragment's has no ports; an error is steered by the flow it quotes, which
is not aliased here: a limit).
"""

from __future__ import annotations

import numpy as np

from dva._jit import i64, kernel
from dva.packet import layout as L
from dva.packet.checksum import rd32
from dva.packet.parse import M32, addr_hash, endpoint_term, l4_ports

ALIAS_WORDS = 6
A_PROTO, A_ADDR, A_LO, A_HI, A_TO_ADDR, A_TO_PORT = range(ALIAS_WORDS)


def alias_table(rows) -> np.ndarray:
    """The alias rows as the kernel's array (an empty ``[0, 6]`` array for none)."""
    a = np.zeros((len(rows), ALIAS_WORDS), np.int64)
    for i, r in enumerate(rows):
        if len(r) != ALIAS_WORDS:
            raise ValueError(f"an alias has {ALIAS_WORDS} words, not {len(r)}")
        a[i] = r
    return a


def plan_aliases(plan) -> np.ndarray:
    """Every alias the devices of a compiled plan declare, as one table."""
    return alias_table([r for d in plan.devices for r in d.bucket_aliases()])


@kernel
def _term_delta(alias, proto, addr, port):
    """Term of the canonical endpoint minus the endpoint's own (0 if none matches)."""
    for k in range(alias.shape[0]):
        ap = alias[k, A_PROTO]
        if ap >= 0 and ap != proto:
            continue
        aa = alias[k, A_ADDR]
        if aa >= 0 and aa != addr:
            continue
        lo = alias[k, A_LO]
        if port < lo or port > alias[k, A_HI]:
            continue
        tp = alias[k, A_TO_PORT]
        np_ = port if tp < 0 else port - lo + tp
        own = endpoint_term(addr_hash(addr, 0, 0, 0), port)
        canon = endpoint_term(addr_hash(alias[k, A_TO_ADDR], 0, 0, 0), np_)
        return (canon - own) & M32
    return 0


@kernel
def alias_buckets(data, meta, start_row, end_row, alias, bucket_mask):
    """Rebucket rows ``[start_row, end_row)`` (parsed) whose endpoints match ``alias``."""
    if alias.shape[0] == 0:
        return
    for i in range(start_row, end_row):
        row = meta[i]
        fl = row[L.PFLAGS]
        if (fl & L.F_IPV4) == 0 or (fl & L.F_L4_OK) == 0:
            continue
        if (fl & (L.F_FRAG | L.F_ICMP_ERROR)) != 0:
            continue
        s = row[L.START]
        pkt = data[row[L.SLOT], s:s + row[L.LEN]]
        l3 = row[L.L3_OFF]
        l4 = row[L.L4_OFF]
        proto = i64(row[L.PROTO])
        src = rd32(pkt, l3 + 12)
        dst = rd32(pkt, l3 + 16)
        sport, dport = l4_ports(pkt, l4, proto)
        d = _term_delta(alias, proto, src, sport) + _term_delta(alias, proto, dst, dport)
        if d != 0:
            row[L.BUCKET] = (row[L.BUCKET] + d) & bucket_mask


def flow_buckets(frames, *, tenant: int = 0, nbuckets: int = 4096,
                 alias: np.ndarray | None = None) -> np.ndarray:
    """The flow bucket a dispatcher gives each frame (tools and tests: which worker
    owns a flow, with the instance's indirection table)."""
    from dva.packet.batch import PacketBatch
    from dva.packet.parse import parse_batch
    from dva.packet.pool import PacketPool

    frames = list(frames)
    b = PacketBatch(PacketPool(max(len(frames), 1)), max(len(frames), 1))
    for f in frames:
        b.add_frame(f, tenant=tenant)
    parse_batch(b.pool.data, b.meta, 0, b.n, nbuckets - 1)
    if alias is not None:
        alias_buckets(b.pool.data, b.meta, 0, b.n, alias, nbuckets - 1)
    return b.meta[:b.n, L.BUCKET].copy()


def owner_buckets(devices, *, tenant: int, nbuckets: int, alias: np.ndarray) -> dict:
    """Device name -> the bucket whose worker owns the device's shared tables, for
    devices that are not replicated (``Device.replicate_shared`` False,
    ``Device.owner_frame``)."""
    out = {}
    for d in devices:
        frame = None if d.replicate_shared else d.owner_frame()
        if frame is not None:
            out[d.name] = int(flow_buckets([frame], tenant=tenant, nbuckets=nbuckets,
                                           alias=alias)[0])
    return out
