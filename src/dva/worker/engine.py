"""Run an appliance's plan over batches, inline, with exact accounting.

``Engine.process(attachment, batch, now)`` takes a batch that arrived on one
attachment, parses it, and runs it through the devices until every packet has left
by an attachment, been dropped for a named reason, or been held by a device. It
returns the packets to transmit, one batch per attachment.

Counters (per device): ``rx[port]``, ``tx[port]``, ``drops[reason]``, ``emitted``
(rows a device generated), ``replicas`` (extra copies of MULTI verdicts), ``held``.
Per appliance: graph drops (``GRAPH_DROPS``), and per attachment ``rx``/``tx``.
The invariants checked by :meth:`Engine.accounting_errors`:

* per device: ``sum(rx) + emitted + replicas == sum(tx) + sum(drops) + held``;
* per appliance: every frame that left a device port or came in from outside was
  received by a device, sent out an attachment, or dropped by the graph (device
  counters a config reload restarted at 0 stay in the sums: ``retired_rx``/``_tx``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from dva._jit import KernelCall, kernel
from dva.graph.plan import (
    G_BAD_VERDICT,
    G_EMPTY,
    G_HOP_LIMIT,
    G_POOL,
    G_UNCONNECTED,
    GRAPH_DROPS,
    Plan,
)
from dva.nf.base import DROP_BASE, HOLD, MULTI, Device, DeviceState
from dva.packet import layout as L
from dva.packet.batch import PacketBatch, row_copy
from dva.packet.parse import parse_batch
from dva.packet.pool import PacketPool, pool_copy, pool_release
from dva.packet.steer import alias_buckets, plan_aliases
from dva.worker.fused import find_pairs

DEFAULT_HOP_LIMIT = 16
# device counter slots besides rx/tx/drops; "invalid" are verdicts the engine could
# not honour (unset, unknown port or reason, empty flood mask): a device bug, counted
C_EMITTED, C_REPLICAS, C_HELD, C_INVALID = 0, 1, 2, 3
LINK_DROPS = (G_UNCONNECTED, G_HOP_LIMIT, G_POOL)


@dataclass
class DeviceCounters:
    rx: np.ndarray
    tx: np.ndarray
    drops: np.ndarray
    misc: np.ndarray = field(default_factory=lambda: np.zeros(4, np.int64))

    @classmethod
    def for_device(cls, d: Device) -> DeviceCounters:
        return cls(np.zeros(len(d.ports), np.int64), np.zeros(len(d.ports), np.int64),
                   np.zeros(len(d.drop_reasons), np.int64))


@kernel
def ingress_kernel(data, meta, n, port, tenant, origin, bucket_mask, alias):
    """Stamp rows that arrived on ``port``, parse them, apply the bucket aliases."""
    for i in range(n):
        meta[i, L.IN_PORT] = port
        meta[i, L.TENANT] = tenant
        meta[i, L.ORIGIN] = origin
        meta[i, L.HOPS] = 1
    parse_batch(data, meta, 0, n, bucket_mask)
    alias_buckets(data, meta, 0, n, alias, bucket_mask)


@kernel
def finish_generated(data, meta, start, end, tenant, bucket_mask, alias):
    """Rows a device generated: stamp tenant and origin, parse them (keeping the
    verdict, mask and hop count the device gave)."""
    for i in range(start, end):
        meta[i, L.TENANT] = tenant
        meta[i, L.ORIGIN] = -1
    parse_batch(data, meta, start, end, bucket_mask)
    alias_buckets(data, meta, start, end, alias, bucket_mask)


@kernel
def count_rx(meta, n, rx, unset):
    """Count rows per input port and preset their verdict to ``unset`` (a device that
    forgets a row gets it counted as a bad verdict)."""
    for i in range(n):
        rx[meta[i, L.IN_PORT]] += 1
        meta[i, L.VERDICT] = unset


@kernel
def _target(dest_q, meta, i, p, hop_limit, ndev, gdrops):
    """Queue for row ``i`` sent out port ``p``; -1 when the graph drops it."""
    q = dest_q[p]
    if q < 0:
        gdrops[G_UNCONNECTED] += 1
        return -1
    if q < ndev and meta[i, L.HOPS] >= hop_limit:
        gdrops[G_HOP_LIMIT] += 1
        return -1
    return q


@kernel
def route_kernel(data, free, top, meta, n_in, n, dest_q, dest_port, ndev, nq, hop_limit,
                 tx, drops, misc, gdrops, sr, sp, ss, sq, out, qstart):
    """Decode verdicts, count, copy MULTI rows, and group rows by destination queue.

    Rows leave in ``out[qstart[q]:qstart[q+1]]`` per queue ``q``, in their original
    order. Dropped rows' slots are released here. Returns the number of rows in ``out``.
    """
    nports = dest_q.shape[0]
    nreasons = drops.shape[0]
    misc[C_EMITTED] += n - n_in
    k = 0
    for i in range(n):
        row = meta[i]
        v = row[L.VERDICT]
        slot = row[L.SLOT]
        if v >= 0:
            if v >= nports:
                gdrops[G_BAD_VERDICT] += 1
                misc[C_INVALID] += 1
                pool_release(free, top, slot)
                continue
            tx[v] += 1
            q = _target(dest_q, meta, i, v, hop_limit, ndev, gdrops)
            if q < 0:
                pool_release(free, top, slot)
                continue
            sr[k] = i
            sp[k] = v
            ss[k] = slot
            sq[k] = q
            k += 1
        elif v == MULTI:
            m = row[L.MASK]
            first = True
            cnt = 0
            for p in range(nports):
                if (m >> p) & 1 == 0:
                    continue
                tx[p] += 1
                cnt += 1
                q = _target(dest_q, meta, i, p, hop_limit, ndev, gdrops)
                if q < 0:
                    continue
                if first:
                    s = slot
                    first = False
                else:
                    s = pool_copy(data, free, top, slot, row[L.START], row[L.LEN])
                    if s < 0:
                        gdrops[G_POOL] += 1
                        continue
                sr[k] = i
                sp[k] = p
                ss[k] = s
                sq[k] = q
                k += 1
            if cnt == 0:
                gdrops[G_EMPTY] += 1
                misc[C_INVALID] += 1
            else:
                misc[C_REPLICAS] += cnt - 1
            if first:
                pool_release(free, top, slot)
        elif v == HOLD:
            misc[C_HELD] += 1
        else:
            r = DROP_BASE - v
            if r < nreasons:
                drops[r] += 1
            else:
                gdrops[G_BAD_VERDICT] += 1
                misc[C_INVALID] += 1
            pool_release(free, top, slot)
    # Stable counting sort by queue.
    for q in range(nq + 1):
        qstart[q] = 0
    for j in range(k):
        qstart[sq[j] + 1] += 1
    for q in range(nq):
        qstart[q + 1] += qstart[q]
    for j in range(k):
        q = sq[j]
        o = qstart[q]
        qstart[q] = o + 1
        row_copy(out, o, meta, sr[j])
        out[o, L.SLOT] = ss[j]
        out[o, L.IN_PORT] = dest_port[sp[j]]
        if q < ndev:
            out[o, L.HOPS] += 1
    for q in range(nq, 0, -1):
        qstart[q] = qstart[q - 1]
    qstart[0] = 0
    return k


class Engine:
    """Inline execution of one appliance plan (the worker's inner loop)."""

    def __init__(self, plan: Plan, pool: PacketPool, *, tenant_id: int = 0,
                 nbuckets: int = 4096, hop_limit: int = DEFAULT_HOP_LIMIT,
                 states: list[DeviceState] | None = None, fuse: bool = True) -> None:
        if nbuckets <= 0 or nbuckets & (nbuckets - 1):
            raise ValueError(f"bucket count must be a power of two, not {nbuckets}")
        if hop_limit < 1:
            raise ValueError("hop limit must be at least 1")
        if not 0 <= tenant_id < L.TENANT_LIMIT:
            raise ValueError(f"tenant id must be in 0 .. {L.TENANT_LIMIT - 1}, not {tenant_id}")
        self.plan = plan
        self.pool = pool
        self.tenant_id = tenant_id
        self.bucket_mask = nbuckets - 1
        self.hop_limit = hop_limit
        self.states = states or [d.new_state() for d in plan.devices]
        # endpoints devices rewrite without keeping the bucket (dva.packet.steer)
        self.alias = plan_aliases(plan)
        for st in self.states:  # devices that choose flow buckets (nat) need the count
            st.bucket_mask = self.bucket_mask
        self.counters = [DeviceCounters.for_device(d) for d in plan.devices]
        # a firewall linked straight to a NAT's inside runs with it, one table
        # (dva.worker.fused); ``fused_of[d]``: the pair device d belongs to
        self.fuse = fuse
        self.fused, self.unfused = find_pairs(plan) if fuse else ([], [])
        self.fused_of = [None] * plan.ndev
        for fp in self.fused:
            self.fused_of[fp.fw] = self.fused_of[fp.nat] = fp
            fp.scratch = DeviceCounters(np.zeros(2, np.int64), np.zeros(2, np.int64),
                                        np.zeros(len(fp.nat_dev.drop_reasons), np.int64))
        nattach = len(plan.attachments)
        self.attach_rx = np.zeros(nattach, np.int64)
        self.attach_tx = np.zeros(nattach, np.int64)
        self.graph_drops = np.zeros(len(GRAPH_DROPS), np.int64)
        self.injected = 0  # packets put straight into a device port (dva trace)
        # rx and tx of device counters a config reload restarted at 0 (devices removed
        # or changed, dva.worker.reload): the appliance balance still includes them.
        self.retired_rx = 0
        self.retired_tx = 0
        self.nq = plan.ndev + nattach
        self.inq = [PacketBatch(pool, 256) for _ in plan.devices]
        # Output batches are reused: what process() returns is valid until the next call.
        self.outputs = [PacketBatch(pool, 256) for _ in plan.attachments]
        self.qstart = np.zeros(self.nq + 1, np.int64)
        self._scratch(1024)
        self._route = KernelCall(route_kernel)  # 20 arguments, allocated alike always
        self.tracer = None  # callable(device_index, batch, n_in) for dva trace

    def _scratch(self, n: int) -> None:
        self.sr = np.zeros(n, np.int64)
        self.sp = np.zeros(n, np.int64)
        self.ss = np.zeros(n, np.int64)
        self.sq = np.zeros(n, np.int64)
        self.out = np.zeros((n, L.NFIELDS), np.int64)

    def process(self, attachment: int, batch: PacketBatch, now: float) -> list[PacketBatch]:
        """Run packets that arrived on ``attachment``; returns per-attachment output."""
        self.attach_rx[attachment] += batch.n
        dev, port = self.plan.entry[attachment]
        return self.inject(dev, port, batch, now, origin=attachment)

    def inject(self, dev: int, port: int, batch: PacketBatch, now: float,
               origin: int = -1) -> list[PacketBatch]:
        """Run ``batch`` as if it arrived on port ``port`` of device ``dev``.

        The rows (and their slots) pass to the engine; ``batch`` is left empty. The
        returned per-attachment batches are reused by the next call.
        """
        fp = self.fused_of[dev]
        if fp is not None and port == (fp.link if dev == fp.fw else 0):
            d = self.plan.devices[dev]
            raise ValueError(f"{d.name}.{d.ports[port]} is inside a firewall and NAT that "
                             f"run fused (an engine made with fuse=False runs them apart)")
        outputs = self._fresh_outputs()
        n = batch.n
        if n == 0:
            return outputs
        if origin < 0:
            self.injected += n
        ingress_kernel(self.pool.data, batch.meta, n, port, self.tenant_id, origin,
                       self.bucket_mask, self.alias)
        q = self.inq[dev]
        if q.n == 0 and q.capacity >= batch.capacity:
            # Take the rows without copying: swap metadata matrices (the caller's
            # batch keeps at least the capacity it had).
            q.meta, batch.meta = batch.meta, q.meta
            q.n = n
        else:
            q.ensure_capacity(q.n + n)
            q.meta[q.n:q.n + n] = batch.meta[:n]
            q.n += n
        batch.n = 0
        self._drain([dev], outputs, now)
        return outputs

    def _fresh_outputs(self) -> list[PacketBatch]:
        """The reused per-attachment output batches, emptied."""
        for o in self.outputs:
            o.n = 0
        return self.outputs

    def warm(self) -> None:
        """Compile every kernel a batch can reach, with no packet: the engine's own
        (ingress, counting, generated rows, routing) and each device's process().
        Meant for a throwaway engine on the same plan: device time starts at 0."""
        b = PacketBatch(self.pool, 4)
        data, meta = self.pool.data, b.meta
        ingress_kernel(data, meta, 0, 0, self.tenant_id, -1, self.bucket_mask, self.alias)
        finish_generated(data, meta, 0, 0, self.tenant_id, self.bucket_mask, self.alias)
        for d, dev in enumerate(self.plan.devices):
            c = self.counters[d]
            count_rx(meta, 0, c.rx, DROP_BASE - len(dev.drop_reasons))
            b.n = 0
            dev.process(b, self.states[d], 0.0)
            b.ensure_capacity(len(dev.ports))
            self._route.target(
                data, self.pool.free, self.pool.top, b.meta, 0, 0, self.plan.dest_q[d],
                self.plan.dest_port[d], self.plan.ndev, self.nq, self.hop_limit, c.tx,
                c.drops, c.misc, self.graph_drops, self.sr, self.sp, self.ss, self.sq,
                self.out, self.qstart)
        for fp in self.fused:
            b.n = 0
            fp.to_ports.target(meta, 0, 0)
            fp.process(b, self.states[fp.nat], self.states[fp.fw], 0.0)
            fp.count(meta, 0, 0, self.counters[fp.fw], self.counters[fp.nat],
                     self.states[fp.fw], self.states[fp.nat])

    def tick(self, now: float, devices: list[int] | None = None) -> list[PacketBatch]:
        """Let devices that act on time alone (``Device.ticks``; only those among
        ``devices`` if given) run; returns what they sent out of attachments, like
        :meth:`process`."""
        outputs = self._fresh_outputs()
        ticking: list[int] = []
        for d, dev in enumerate(self.plan.devices):
            if dev.ticks and (devices is None or d in devices):
                fp = self.fused_of[d]  # a fused pair ticks once, as its NAT
                t = d if fp is None else fp.nat
                if t not in ticking:
                    ticking.append(t)
        if ticking:
            self._drain(ticking, outputs, now, ticking=True)
        return outputs

    def _drain(self, ready: list[int], outputs: list[PacketBatch], now: float,
               ticking: bool = False) -> None:
        plan = self.plan
        ndev = plan.ndev
        pending = list(ready)
        while pending:
            d = pending.pop(0)
            b = self.inq[d]
            # During a tick a ticking device runs even with no input.
            if b.n == 0 and not (ticking and plan.devices[d].ticks):
                continue
            dev = plan.devices[d]
            fp = self.fused_of[d]
            n_in = b.n
            if fp is None:
                b.ensure_capacity(n_in * (1 + dev.max_emit) + dev.emit_reserve)
                c = self.counters[d]
                dest_q, dest_port = plan.dest_q[d], plan.dest_port[d]
                count_rx(b.meta, n_in, c.rx, DROP_BASE - len(dev.drop_reasons))
                dev.process(b, self.states[d], now)
            else:
                b.ensure_capacity(n_in * (1 + fp.max_emit))
                c = fp.scratch
                dest_q, dest_port = fp.dest_q, fp.dest_port
                fp.to_ports.target(b.meta, n_in, 0 if d == fp.fw else 1)
                count_rx(b.meta, n_in, c.rx, DROP_BASE - len(fp.nat_dev.drop_reasons))
                fp.process(b, self.states[fp.nat], self.states[fp.fw], now)
            if b.n > n_in:
                finish_generated(self.pool.data, b.meta, n_in, b.n, self.tenant_id,
                                 self.bucket_mask, self.alias)
            if self.tracer is not None:
                self.tracer(d, b, n_in)
            if fp is not None:
                fp.count(b.meta, n_in, b.n, self.counters[fp.fw], self.counters[fp.nat],
                         self.states[fp.fw], self.states[fp.nat])
            worst = b.n * max(1, len(dev.ports))
            if worst > self.sr.shape[0]:
                self._scratch(2 * worst)
            k = self._route.target(
                self.pool.data, self.pool.free, self.pool.top, b.meta, n_in, b.n,
                dest_q, dest_port, ndev, self.nq, self.hop_limit, c.tx,
                c.drops, c.misc, self.graph_drops, self.sr, self.sp, self.ss, self.sq,
                self.out, self.qstart)
            if fp is not None:  # the pass's generated rows are the firewall's reject
                # answers; a verdict the engine could not honour is the NAT's bug
                self.counters[fp.fw].misc[C_EMITTED] += c.misc[C_EMITTED]
                self.counters[fp.nat].misc[C_INVALID] += c.misc[C_INVALID]
                c.misc[:] = 0
            b.n = 0
            if k == 0:
                continue
            qs = self.qstart.tolist()  # a few queues: plain ints beat numpy calls here
            for q in range(self.nq):
                lo, hi = qs[q], qs[q + 1]
                if lo == hi:
                    continue
                dst = self.inq[q] if q < ndev else outputs[q - ndev]
                dst.ensure_capacity(dst.n + hi - lo)
                dst.meta[dst.n:dst.n + hi - lo] = self.out[lo:hi]
                dst.n += hi - lo
                if q < ndev:
                    if q not in pending:
                        pending.append(q)
                else:
                    self.attach_tx[q - ndev] += hi - lo

    # -- accounting -------------------------------------------------------------
    def accounting_errors(self) -> list[str]:
        errs = []
        dev_in = self.retired_rx
        dev_out = self.retired_tx
        for d, c in zip(self.plan.devices, self.counters):
            lhs = int(c.rx.sum() + c.misc[C_EMITTED] + c.misc[C_REPLICAS])
            rhs = int(c.tx.sum() + c.drops.sum() + c.misc[C_HELD] + c.misc[C_INVALID])
            if lhs != rhs:
                errs.append(f"device {d.name}: rx+emitted+replicas={lhs} but "
                            f"tx+drops+held+invalid={rhs}")
            dev_in += int(c.rx.sum())
            dev_out += int(c.tx.sum())
        lhs = int(self.attach_rx.sum()) + self.injected + dev_out
        rhs = dev_in + int(self.attach_tx.sum()) + int(self.graph_drops[list(LINK_DROPS)].sum())
        if lhs != rhs:
            errs.append(f"appliance: in from attachments + device tx = {lhs} but device rx "
                        f"+ out to attachments + graph drops = {rhs}")
        return errs

    def counter_table(self) -> dict[str, int]:
        """Every counter by name: ``DEVICE.PORT rx``, ``DEVICE drop/REASON``, ..."""
        out: dict[str, int] = {}
        for d, c, st in zip(self.plan.devices, self.counters, self.states):
            for p, name in enumerate(d.ports):
                out[f"{d.name}.{name} rx"] = int(c.rx[p])
                out[f"{d.name}.{name} tx"] = int(c.tx[p])
            for r, name in enumerate(d.drop_reasons):
                out[f"{d.name} drop/{name}"] = int(c.drops[r])
            for e, name in enumerate(d.counters):
                out[f"{d.name} {name}"] = int(st.events[e])
            out[f"{d.name} emitted"] = int(c.misc[C_EMITTED])
            out[f"{d.name} replicas"] = int(c.misc[C_REPLICAS])
            out[f"{d.name} held"] = int(c.misc[C_HELD])
            out[f"{d.name} invalid_verdict"] = int(c.misc[C_INVALID])
        for a, att in enumerate(self.plan.attachments):
            out[f"attach {att.ref} rx"] = int(self.attach_rx[a])
            out[f"attach {att.ref} tx"] = int(self.attach_tx[a])
        for r, name in enumerate(GRAPH_DROPS):
            out[f"graph drop/{name}"] = int(self.graph_drops[r])
        return out
