"""The multi-process runtime on one host: a dispatcher, N data-plane workers, a manager.

This process is the **dispatcher** (it owns every port of the running appliances)
and, on one host, the **manager** too (config generations, worker health, shared-state
replication, the control socket). Workers are forked children
(:mod:`dva.worker.proc`) that share the packet pool and the rings with it
(:mod:`dva.worker.bus`). ``workers=0`` is not this module: it is the inline runners
(:mod:`dva.dispatch.offline`, :mod:`dva.dispatch.live`).

Data path, per batch read from a port: parse and bucket the frames as the workers'
engines will (tenant, symmetric flow hash, the appliance's bucket aliases), look each
bucket up in the indirection table (bucket -> worker), and push one descriptor per
packet on that worker's rx ring; a full ring drops the packet, counted per worker
(``bus wN drop/ring_full``). What workers send back is transmitted on its port;
slots go home to their owners. Each dispatcher slot lent to a worker is noted
(``lent``), so a worker that dies gives them back (``bus wN slots_reclaimed``; the
packets it had taken from its ring were lost with it, those still in its ring are
counted as ``bus wN drop/worker_died``).

Manager duties, between batches: every ``TICK`` look for dead workers (restarted at
once with the current generation; its buckets keep their worker number, so they are
served again as soon as it runs); every ``REPLICATE`` seconds gather each worker's
shared tables and merge every replica into the others (newest entry wins, so MAC
tables, ARP caches, NAT mappings and leases converge); ``apply`` a new generation
(validated and built here first: an invalid file never reaches a worker); counters
aggregated over the workers under the names of an inline run, plus ``bus ...`` and
``worker ...`` ones.

Elastic: :meth:`Runtime.move` moves buckets with their flow state between workers
without loss or reordering (their new packets held here meanwhile, see
``docs/design.md``), :meth:`Runtime.scale` starts or stops workers and moves as few
buckets as even shares need, and with an autoscale policy the manager decides the
worker count itself once a second (:mod:`dva.dispatch.autoscale`).

Offline (pcap/memory ports) the run is deterministic enough to compare with an
inline run: inputs are read in capture-time order as :class:`OfflineRunner` does,
ring pushes wait instead of dropping, and replication happens at every
``REPLICATE`` boundary of capture time after all workers finished what they had
(``sync``), so a trace whose shared tables are warm gives the same per-port output
as one worker (worker-count invariance).
"""

from __future__ import annotations

import multiprocessing as mp
import os
import select
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from dva._jit import kernel
from dva.dispatch.autoscale import Autoscaler, Load, Policy, hot_buckets
from dva.dispatch.live import PUMP_ROUNDS, check_live_attachments
from dva.graph.appliance import Appliance, ApplianceError, load_appliance, parse_appliance
from dva.graph.plan import compile_plan
from dva.packet import layout as L
from dva.packet.batch import PacketBatch
from dva.packet.parse import parse_batch
from dva.packet.pool import PacketPool, pool_release
from dva.packet.ring import (
    D_APP,
    D_ATTACH,
    D_BUCKET,
    D_KIND,
    D_LEN,
    D_SLOT,
    D_START,
    D_TIME,
    DESC_WORDS,
    K_FREE,
    K_PKT,
    TAIL,
    ring_count,
    ring_pop,
    ring_push,
    ring_reset,
    ring_taken,
)
from dva.packet.steer import alias_buckets, owner_buckets, plan_aliases
from dva.ports.offline import MemoryPort, PcapPort, PortError
from dva.worker import stage
from dva.worker.bus import (
    LOAD_BATCHES,
    LOAD_BEAT_NS,
    LOAD_BUSY_NS,
    LOAD_GEN,
    LOAD_PACKETS,
    Bus,
)
from dva.worker.engine import DEFAULT_HOP_LIMIT, Engine
from dva.worker.proc import free_descs, worker_entry
from dva.worker.reload import ReloadRejected, attachment_problems

TICK = 0.1
REPLICATE = 0.1
BUS_DROPS = ("ring_full", "worker_died")
STOP_TIMEOUT = 10.0
SAVE_INTERVAL = 0.5  # persisted state is gathered (and saved if changed) this often
DEFAULT_MAX_WORKERS = 8  # rings and slot ranges the bus is made with (dva scale's limit)
MIGRATION_COUNTERS = ("moves", "buckets_moved", "flows_moved", "packets_held",
                      "hold_us_total", "hold_us_max", "rollbacks", "drop/hold_full")


class MoveFailed(RuntimeError):
    """A bucket move was rolled back (the source kept its state); the message says why."""


def default_workers() -> int:
    """One worker per core left after the dispatcher (at least one)."""
    return max(1, (os.cpu_count() or 2) - 1)


@kernel
def steer_kernel(data, meta, n, tenant, alias, bucket_mask, table, app, att, t_ns,
                 out, counts, lent, hits):
    """Parse and bucket ``n`` frames, then write each one's descriptor into the
    buffer of the worker its bucket maps to (``out[w, counts[w]]``)."""
    for i in range(n):
        meta[i, L.TENANT] = tenant
    parse_batch(data, meta, 0, n, bucket_mask)
    alias_buckets(data, meta, 0, n, alias, bucket_mask)
    for i in range(n):
        b = meta[i, L.BUCKET]
        hits[b] += 1
        w = table[b]
        c = counts[w]
        out[w, c, D_KIND] = K_PKT
        out[w, c, D_SLOT] = meta[i, L.SLOT]
        out[w, c, D_START] = meta[i, L.START]
        out[w, c, D_LEN] = meta[i, L.LEN]
        out[w, c, D_APP] = app
        out[w, c, D_ATTACH] = att
        out[w, c, D_BUCKET] = b
        out[w, c, D_TIME] = t_ns
        counts[w] = c + 1
        lent[meta[i, L.SLOT]] = w


@kernel
def collect_kernel(desc, k, free, top, lent, app_base, ometa, on, otime):
    """Descriptors from a worker: ``K_FREE`` slots go back on our stack; ``K_PKT``
    rows are appended to the output of their (appliance, attachment), in order, and
    ``otime`` of that output takes their time. Returns the packets collected."""
    got = 0
    lo = top[1]
    hi = top[2]
    for i in range(k):
        s = desc[i, D_SLOT]
        if s >= lo and s < hi:
            lent[s] = -1
        if desc[i, D_KIND] == K_FREE:
            pool_release(free, top, s)
            continue
        g = app_base[desc[i, D_APP]] + desc[i, D_ATTACH]
        r = on[g]
        for f in range(L.NFIELDS):
            ometa[g, r, f] = 0
        ometa[g, r, L.SLOT] = s
        ometa[g, r, L.START] = desc[i, D_START]
        ometa[g, r, L.LEN] = desc[i, D_LEN]
        ometa[g, r, L.VLAN] = -1
        ometa[g, r, L.BUCKET] = desc[i, D_BUCKET]
        on[g] = r + 1
        otime[g] = desc[i, D_TIME]
        got += 1
    return got


@dataclass
class WorkerHandle:
    index: int
    proc: mp.Process | None = None
    conn: object = None
    expect: deque = field(default_factory=deque)  # reply handlers, in request order
    started: float = 0.0
    restarts: int = 0
    last: dict | None = None  # the last counters it reported
    pending_free: list = field(default_factory=list)  # its slots waiting to go home


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def _end(proc) -> None:
    """Wait for a worker process told to stop; kill it if it does not end in time."""
    if proc is not None:
        proc.join(STOP_TIMEOUT)
        if proc.is_alive():
            proc.kill()
            proc.join()


class Runtime:
    """Dispatcher + manager of one host running ``apps`` on ``workers`` processes."""

    def __init__(self, apps: list[Appliance], *, workers: int, live: bool,
                 batch_size: int = 256, hop_limit: int = DEFAULT_HOP_LIMIT,
                 nbuckets: int = 4096, max_workers: int | None = None,
                 ring_capacity: int = 4096, dispatcher_slots: int = 16384,
                 worker_slots: int = 4096, memory: dict[str, MemoryPort] | None = None,
                 say: Callable[[str], None] | None = None,
                 state_dir: str | None = None, hold_capacity: int = 65536,
                 autoscale: Policy | None = None) -> None:
        if workers < 1:
            raise ValueError("the runtime needs at least one worker (0 runs inline)")
        if nbuckets <= 0 or nbuckets & (nbuckets - 1):
            raise ValueError(f"bucket count must be a power of two, not {nbuckets}")
        if live:
            for a in apps:
                check_live_attachments(a)
        names = [a.qualified_name for a in apps]
        if len(set(names)) != len(names):
            raise ValueError("two appliances with the same tenant and name")
        self.apps = list(apps)
        self.live = live
        self.batch_size = batch_size
        self.hop_limit = hop_limit
        self.nbuckets = nbuckets
        self.say = say
        self.messages: list[str] = []
        self.max_workers = max(workers, max_workers or DEFAULT_MAX_WORKERS)
        self.bus = Bus(max_workers=self.max_workers, dispatcher_slots=dispatcher_slots,
                       worker_slots=worker_slots, ring_capacity=ring_capacity)
        self.pool: PacketPool = self.bus.pool(-1)
        tenants: list[str] = []
        for a in apps:
            if a.tenant not in tenants:
                tenants.append(a.tenant)
        self.tenant_ids = [tenants.index(a.tenant) for a in apps]
        self.plans = [compile_plan(a) for a in apps]
        self.alias: list[np.ndarray] = [None] * len(apps)
        self.owner_bucket: list[dict[str, int]] = [{}] * len(apps)
        for a in range(len(apps)):
            self._plan_changed(a)
        self.app_base = np.zeros(len(apps) + 1, np.int64)
        for i, p in enumerate(self.plans):
            self.app_base[i + 1] = self.app_base[i] + len(p.attachments)
        self.nattach = int(self.app_base[-1])
        self.attach_refs = [(i, att.ref) for i, p in enumerate(self.plans)
                            for att in p.attachments]
        # bucket -> worker: round robin to start (dva scale rebalances later)
        self.table = (np.arange(nbuckets, dtype=np.int64) % workers)
        self.nworkers = workers
        self.hits = np.zeros(nbuckets, np.int64)  # packets per bucket since the last look
        self.autoscaler = Autoscaler(autoscale) if autoscale is not None else None
        self._load_seen: dict[int, tuple[int, int]] = {}  # worker -> (busy ns, drops)
        self._load_at = time.monotonic()
        self.lent = np.full(self.bus.dispatcher_slots, -1, np.int64)
        cap = max(batch_size, 256)
        # row HOLD (= max_workers) of the steering buffers: packets of buckets being
        # moved, kept in order in ``held`` until the move ends
        self.HOLD = self.max_workers
        self.steer_out = np.zeros((self.max_workers + 1, cap, DESC_WORDS), np.int64)
        self.steer_n = np.zeros(self.max_workers + 1, np.int64)
        self.held = np.zeros((hold_capacity, DESC_WORDS), np.int64)
        self.nheld = 0
        self.mig = dict.fromkeys(MIGRATION_COUNTERS, 0)
        self._pump_in_wait = False
        self.rxdesc = np.zeros((ring_capacity, DESC_WORDS), np.int64)
        self.ocap = ring_capacity
        self.ometa = np.zeros((max(self.nattach, 1), self.ocap, L.NFIELDS), np.int64)
        self.on = np.zeros(max(self.nattach, 1), np.int64)
        self.otime = np.zeros(max(self.nattach, 1), np.int64)
        self.obatches = []
        for g in range(self.nattach):
            b = PacketBatch(self.pool, 1)
            b.meta = self.ometa[g]
            self.obatches.append(b)
        self.bus_drops = np.zeros((self.max_workers, len(BUS_DROPS)), np.int64)
        self.reclaimed = np.zeros(self.max_workers, np.int64)
        self.ingress_drops = np.zeros((max(self.nattach, 1), 2), np.int64)  # too_long, pool
        self.generation = 1
        self.reloads_rejected = 0
        self.decisions: list[str] = []
        self.memory = dict(memory or {})
        self.ports: list = []
        self.batch = PacketBatch(self.pool, batch_size)
        self._stop = False
        self._reload_queue: list[str] = []
        self._ctx = mp.get_context("fork")
        self.workers = [WorkerHandle(w) for w in range(self.max_workers)]
        self.started = time.monotonic()
        self._warm()
        stage.clean_stale()
        self.persist: list = [None] * len(apps)
        self.shadow: list = [None] * len(apps)
        try:
            self._open_state(state_dir)
            self._open_ports()
            for w in range(workers):
                self._start_worker(w)
        except BaseException:
            self.close()
            raise

    # -- set-up ----------------------------------------------------------------------
    def _warm(self) -> None:
        """Compile every kernel before forking, so the workers inherit compiled code
        and the first frames wait for no compiler."""
        for p, t in zip(self.plans, self.tenant_ids):
            Engine(p, PacketPool(256), tenant_id=t, nbuckets=self.nbuckets,
                   hop_limit=self.hop_limit).warm()
        b = PacketBatch(PacketPool(64), 4)
        steer_kernel(b.pool.data, b.meta, 0, 0, self.alias[0], self.nbuckets - 1, self.table,
                     0, 0, 0, self.steer_out, self.steer_n, self.lent, self.hits)
        collect_kernel(self.rxdesc, 0, self.pool.free, self.pool.top, self.lent,
                       self.app_base, self.ometa, self.on, self.otime)
        free_descs(np.zeros(0, np.int64), self.rxdesc, 0)
        ring_push(self.bus.rx[0], self.rxdesc, 0, 0)
        ring_pop(self.bus.tx[0], self.rxdesc, 0)
        ring_count(self.bus.tx[0])
        ring_taken(self.bus.rx[0])

    def _open_ports(self) -> None:
        for a, plan in enumerate(self.plans):
            app = self.apps[a]
            for att in plan.attachments:
                spec = att.spec
                if self.live:
                    from dva.dispatch.live import AF_PACKET_RING
                    from dva.ports.live import open_live
                    kw = AF_PACKET_RING if spec.kind == "af_packet" else {}
                    port = open_live(att.ref, spec.kind, spec.target, **kw)
                    port.warm(self.batch)
                elif spec.kind == "memory":
                    port = self.memory.get(spec.memory)
                    if port is None:
                        port = self.memory[spec.memory] = MemoryPort(att.ref)
                elif spec.kind == "pcap":
                    r = app.resolve(spec.pcap.read) if spec.pcap.read else None
                    if r is not None and not r.is_file():
                        raise PortError(f"{att.ref}: pcap input {r} does not exist")
                    w = app.resolve(spec.pcap.write) if spec.pcap.write else None
                    port = PcapPort(att.ref, r, w)
                else:
                    raise PortError(f"{att.ref}: {spec.kind} attachments need a live run")
                self.ports.append(port)

    def _start_worker(self, w: int) -> None:
        h = self.workers[w]
        parent, child = self._ctx.Pipe(duplex=True)
        kw = dict(batch_size=self.batch_size, hop_limit=self.hop_limit,
                  nbuckets=self.nbuckets, ticks=self.live, generation=self.generation,
                  tenant_ids=self.tenant_ids, initial=self._initial(w))
        ring_reset(self.bus.rx[w])
        ring_reset(self.bus.tx[w])
        self.bus.load[w, :] = 0
        p = self._ctx.Process(target=worker_entry, args=(w, self.bus, self.apps, child, kw),
                              name=f"dva-worker-{w}", daemon=True)
        p.start()
        child.close()
        h.proc, h.conn, h.started = p, parent, time.monotonic()
        h.expect.clear()
        h.pending_free = []

    def _tell(self, line: str) -> None:
        self.messages.append(line)
        if self.say is not None:
            self.say(line)

    # -- requests to workers ---------------------------------------------------------
    def _request(self, w: int, msg, handler=None) -> bool:
        """Send ``msg``; False when the worker is gone (the health check restarts it
        within ``TICK``, and the request is dropped with it)."""
        h = self.workers[w]
        try:
            h.conn.send(msg)
        except OSError:
            return False
        h.expect.append(handler)
        return True

    def _poll_replies(self, w: int, block_for=None, timeout: float = 30.0):
        """Handle replies that arrived; with ``block_for`` (a handler), wait until that
        request's reply is handled and return it."""
        h = self.workers[w]
        end = time.monotonic() + timeout
        result = None
        while h.expect:
            if block_for is None:
                if not h.conn.poll():
                    return None
            else:
                left = end - time.monotonic()
                while not h.conn.poll(min(max(left, 0), 0.001 if self._pump_in_wait
                                          else 0.01)):
                    self._collect_all()  # the worker may wait on a full tx ring
                    if self._pump_in_wait:  # a move: traffic goes on (its buckets held)
                        for g in range(len(self.ports)):
                            self._pump(g)
                    left = end - time.monotonic()
                    if left <= 0:
                        raise TimeoutError(f"worker {w} did not answer")
            try:
                reply = h.conn.recv()
            except (EOFError, OSError):
                if block_for is None:  # dead: _check_workers restarts it
                    return None
                raise TimeoutError(f"worker {w} is gone") from None
            handler = h.expect.popleft()
            if handler is not None:
                handler(reply)
            if block_for is not None and handler is block_for:
                return reply
        return result

    def call(self, w: int, msg, timeout: float = 30.0):
        box = []

        def done(reply):
            box.append(reply)
        if not self._request(w, msg, done):
            raise TimeoutError(f"worker {w} is gone")
        self._poll_replies(w, block_for=done, timeout=timeout)
        status, value = box[0]
        if status != "ok":
            raise RuntimeError(f"worker {w}: {value}")
        return value

    def active(self) -> list[int]:
        return list(range(self.nworkers))

    # -- the data path ---------------------------------------------------------------
    def _steer(self, a: int, att: int, b: PacketBatch, t_ns: int, wait: bool) -> None:
        n = b.n
        if n == 0:
            return
        self.steer_n[:] = 0
        steer_kernel(self.pool.data, b.meta, n, self.tenant_ids[a], self.alias[a],
                     self.nbuckets - 1, self.table, a, att, t_ns, self.steer_out,
                     self.steer_n, self.lent, self.hits)
        b.n = 0
        for w in np.flatnonzero(self.steer_n):
            c = int(self.steer_n[w])
            if w == self.HOLD:
                self._hold(c)
                continue
            ring = self.bus.rx[w]
            i = ring_push(ring, self.steer_out[w], 0, c)
            while i < c and wait:
                self._collect_all()
                i += ring_push(ring, self.steer_out[w], i, c - i)
                if i < c:
                    self._check_workers()
                    time.sleep(0.0001)
            if i < c:
                self.bus_drops[w, 0] += c - i
                for s in self.steer_out[w, i:c, D_SLOT]:
                    self.lent[s] = -1
                    self.pool.release(int(s))

    def _hold(self, c: int) -> None:
        """Keep ``c`` steered packets of buckets being moved (row HOLD), in order; what
        the bounded buffer cannot take is dropped, counted."""
        k = min(c, self.held.shape[0] - self.nheld)
        self.held[self.nheld:self.nheld + k] = self.steer_out[self.HOLD, :k]
        self.nheld += k
        self.mig["packets_held"] += k
        if k < c:
            self.mig["drop/hold_full"] += c - k
            for sl in self.steer_out[self.HOLD, k:c, D_SLOT]:
                self.lent[sl] = -1
                self.pool.release(int(sl))

    def _collect_all(self) -> int:
        got = 0
        for w in self.active():
            got += self._drain_tx(w)
        self._return_slots()
        return got

    def _drain_tx(self, w: int) -> int:
        """Transmit everything on worker ``w``'s tx ring; the packets sent."""
        got = 0
        ring = self.bus.tx[w]
        while True:
            k = ring_pop(ring, self.rxdesc, self.ocap)
            if k == 0:
                return got
            got += collect_kernel(self.rxdesc, k, self.pool.free, self.pool.top,
                                  self.lent, self.app_base, self.ometa, self.on,
                                  self.otime)
            self._transmit()

    def _transmit(self) -> None:
        for g in np.flatnonzero(self.on[:self.nattach]):
            b = self.obatches[g]
            b.n = int(self.on[g])
            port = self.ports[g]
            if self.live:
                port.send(b)
            else:
                port.send(self.otime[g] / 1e9, b.frames())
            b.release_all()
            self.on[g] = 0

    def _return_slots(self) -> None:
        """Send released worker slots home (``K_FREE`` on their rx ring)."""
        if self.pool.top[3]:
            back = self.pool.take_returns()
            owners = self.bus.owner_of(back)
            for w in np.unique(owners):
                self.workers[int(w)].pending_free.extend(back[owners == w].tolist())
        for h in self.workers:
            if h.pending_free and h.proc is not None:
                slots = np.array(h.pending_free, np.int64)
                k = free_descs(slots, self.rxdesc, 0)
                i = ring_push(self.bus.rx[h.index], self.rxdesc, 0, k)
                h.pending_free = h.pending_free[i:]

    # -- health ----------------------------------------------------------------------
    def _check_workers(self) -> None:
        for w in self.active():
            h = self.workers[w]
            if h.proc is not None and not h.proc.is_alive():
                self._worker_died(w)

    def _worker_died(self, w: int) -> None:
        h = self.workers[w]
        code = h.proc.exitcode
        self._drain_tx(w)  # what it already sent is good: out before the rings reset
        self.bus_drops[w, 1] += ring_count(self.bus.rx[w])
        mine = np.flatnonzero(self.lent == w)
        self.reclaimed[w] += len(mine)
        for s in mine:
            self.lent[s] = -1
            self.pool.release(int(s))
        if h.last is not None:
            self._retire(h.last)
            h.last = None
        h.restarts += 1
        h.pending_free = []
        self._tell(f"worker {w} (pid {h.proc.pid}) died (exit code {code}); restarting it "
                   f"with generation {self.generation}")
        self._start_worker(w)
        self.decisions.append(f"{time.strftime('%H:%M:%S')} restarted worker {w}: it died "
                              f"(exit code {code})")

    _retired: dict | None = None

    def _retire(self, snap: dict) -> None:
        """Keep the counters a dead worker last reported, so totals do not go back."""
        if self._retired is None:
            self._retired = {}
        for a, part in enumerate(snap["apps"]):
            d = self._retired.setdefault(a, {})
            for k, v in part["counters"].items():
                d[k] = d.get(k, 0) + v

    # -- bucket moves and scaling ------------------------------------------------------
    def move(self, buckets, dst: int) -> dict:
        """Move ``buckets`` (with their flow state) to worker ``dst``, losing and
        reordering nothing: new packets of those buckets are held here in order; each
        source processes what it already has of them, exports their flow state (and
        tables owned through them), ``dst`` imports it; then the held packets go to
        ``dst`` and the table flips. If the import fails, or a worker dies or does not
        answer, the move is rolled back (the sources still have the state: they drop
        it only after the flip) and :class:`MoveFailed` says why."""
        if dst not in self.active():
            raise ValueError(f"no worker {dst} (workers 0..{self.nworkers - 1})")
        b = np.unique(np.asarray(buckets, np.int64))
        if len(b) and (b[0] < 0 or b[-1] >= self.nbuckets):
            raise ValueError(f"buckets are 0..{self.nbuckets - 1}")
        srcs = {int(w): b[self.table[b] == w] for w in np.unique(self.table[b])
                if w != dst}
        if not srcs:
            return {"buckets": 0, "to": dst, "from": [], "ms": 0.0, "held": 0, "flows": 0}
        moving = np.concatenate(list(srcs.values()))
        before = self.table.copy()
        now, _ = self._clock()
        t0 = time.perf_counter()
        held0 = self.mig["packets_held"]
        self.table[moving] = self.HOLD
        try:
            return self._move(srcs, moving, dst, before, now, t0, held0)
        finally:
            self._pump_in_wait = False

    def _move(self, srcs, moving, dst, before, now, t0, held0) -> dict:
        self._pump_in_wait = self.live
        flows = 0
        self._moves_made += 1
        path = str(stage.stage_dir() / f"{stage.PREFIX}{os.getpid()}-{self._moves_made}")
        try:
            upto = {w: int(self.bus.rx[w][TAIL]) for w in srcs}
            parts = {w: self.call(w, ("move_out", srcs[w], upto[w], now, f"{path}-{w}",
                                      self._area_path(w)))
                     for w in srcs}
            t_out = time.perf_counter()
            for w in srcs:
                flows += self.call(dst, ("move_in", srcs[w], parts[w], now, f"{path}-{w}"))
            t_in = time.perf_counter()
        except (RuntimeError, TimeoutError) as e:
            self._unstage(path, srcs)
            self.mig["rollbacks"] += 1
            self._release_held(before)
            self._pump_in_wait = False
            self._tell(f"move of {len(moving)} buckets to worker {dst} rolled back: {e}")
            raise MoveFailed(str(e)) from None
        self._unstage(path, srcs)
        final = before.copy()
        final[moving] = dst
        self._release_held(final)
        self._pump_in_wait = False
        us = (time.perf_counter() - t0) * 1e6
        for w in srcs:
            try:
                self.call(w, ("drop_flows", srcs[w], now))
            except (RuntimeError, TimeoutError):
                pass  # it died: its state went with it
        m = self.mig
        m["moves"] += 1
        m["buckets_moved"] += len(moving)
        m["flows_moved"] += flows
        m["hold_us_total"] += int(us)
        m["hold_us_max"] = max(m["hold_us_max"], int(us))
        return {"buckets": int(len(moving)), "to": dst, "from": sorted(srcs),
                "ms": round(us / 1e3, 3), "held": m["packets_held"] - held0,
                "flows": int(flows),
                # where the hold time went: sources drain and export, the destination
                # imports, the held packets go out
                "out_ms": round((t_out - t0) * 1e3, 3), "in_ms": round((t_in - t_out) * 1e3, 3),
                "release_ms": round(us / 1e3 - (t_in - t0) * 1e3, 3)}

    _moves_made = 0

    def _area_path(self, w: int) -> str:
        """Worker ``w``'s staging area (:class:`dva.worker.stage.Area`: kept between
        moves; removed when the worker stops and at close)."""
        return str(stage.stage_dir() / f"{stage.PREFIX}{os.getpid()}-area-{w}")

    def _remove_area(self, w: int) -> None:
        _unlink(self._area_path(w))

    @staticmethod
    def _unstage(path: str, srcs) -> None:
        for w in srcs:
            _unlink(f"{path}-{w}")

    def _release_held(self, final: np.ndarray) -> None:
        """Hand the held packets, in order, to the workers ``final`` gives their
        buckets; packets that arrive meanwhile join the end of the queue; once it is
        empty the table becomes ``final`` (before any newer packet is steered)."""
        while True:
            i = 0
            while i < self.nheld:
                w = int(final[self.held[i, D_BUCKET]])
                j = i + 1
                while j < self.nheld and final[self.held[j, D_BUCKET]] == w:
                    j += 1
                k = ring_push(self.bus.rx[w], self.held, i, j - i)
                self.lent[self.held[i:i + k, D_SLOT]] = w
                i += k
                if i < j:
                    break  # that ring is full: later packets wait (order kept)
            if i:
                self.held[:self.nheld - i] = self.held[i:self.nheld]
                self.nheld -= i
            if self.nheld == 0:
                self.table[:] = final
                return
            self._collect_all()
            self._check_workers()
            if self.live:
                for g in range(len(self.ports)):
                    self._pump(g)
            time.sleep(0.0001)

    def scale(self, n: int, reason: str = "asked") -> list[dict]:
        """Run ``n`` workers: start or stop workers and move as few buckets as an even
        share needs (adding the n-th worker moves about 1/n of them, to it)."""
        if not 1 <= n <= self.max_workers:
            raise ValueError(f"workers must be 1..{self.max_workers} (this instance's bus)")
        moves = []
        old = self.nworkers
        while self.nworkers < n:
            w = self.nworkers
            self._start_worker(w)
            self.nworkers += 1
            self.wait_ready()
            self._seed_shared(w)
            counts = np.bincount(self.table[self.table < self.HOLD],
                                 minlength=self.nworkers)
            want = self._shares(self.nworkers)
            take = []
            for v in range(w):
                extra = int(counts[v] - want[v])
                if extra > 0:
                    take.append(np.flatnonzero(self.table == v)[-extra:])
            if take:
                moves.append(self.move(np.concatenate(take), w))
        while self.nworkers > n:
            w = self.nworkers - 1
            mine = np.flatnonzero(self.table == w)
            counts = np.bincount(self.table[self.table < w], minlength=w)
            want = self._shares(w)
            cursor = 0
            for v in range(w):
                k = max(int(want[v] - counts[v]), 0)
                part = mine[cursor:cursor + k]
                cursor += k
                if len(part):
                    moves.append(self.move(part, v))
            if cursor < len(mine):
                moves.append(self.move(mine[cursor:], 0))
            self._stop_worker(w)
            self.nworkers -= 1
        if n != old:
            self.decisions.append(f"{time.strftime('%H:%M:%S')} scaled {old} -> {n} "
                                  f"workers ({reason}); moved "
                                  f"{sum(m['buckets'] for m in moves)} buckets")
            self._tell(self.decisions[-1].split(" ", 1)[1])
        return moves

    def loads(self, now: float) -> list[Load]:
        """Each worker's load since the last call: busy fraction, ring fill, drops."""
        dt = max(now - self._load_at, 1e-6)
        out = []
        for w in self.active():
            busy = int(self.bus.load[w, LOAD_BUSY_NS])
            drops = int(self.bus_drops[w].sum())
            b0, d0 = self._load_seen.get(w, (0, 0))
            if busy < b0:  # restarted: its words began again at 0
                b0 = 0
            out.append(Load(busy=min((busy - b0) / 1e9 / dt, 1.0),
                            ring=int(ring_count(self.bus.rx[w])) / self.bus.ring_capacity,
                            drops=drops - d0))
            self._load_seen[w] = (busy, drops)
        self._load_at = now
        return out

    def _watch_load(self, now: float) -> None:
        """Once a second (live): the autoscaler's decision, or a rebalance."""
        if self.autoscaler is None:
            return
        loads = self.loads(now)
        self.last_loads = loads
        try:
            decision = self.autoscaler.observe(now, loads)
            if decision is not None:
                target, why = decision
                self.scale(target, reason=why)
            else:
                busy = [x.busy for x in loads]
                hot = hot_buckets(self.table, self.hits, busy, self.autoscaler.policy)
                if hot is not None:
                    bk, src, dst = hot
                    self.move(bk, dst)
                    self.decisions.append(
                        f"{time.strftime('%H:%M:%S')} rebalanced: {len(bk)} hot buckets "
                        f"from worker {src} (busy {busy[src]:.0%}) to worker {dst} "
                        f"(busy {busy[dst]:.0%})")
                    self._tell(self.decisions[-1].split(" ", 1)[1])
        except (MoveFailed, ValueError) as e:
            self.decisions.append(f"{time.strftime('%H:%M:%S')} scaling failed: {e}")
        self.hits[:] = 0
        self.loads(time.monotonic())  # the next interval starts after the moves

    last_loads: list[Load] = []  # the autoscaler's last look, per worker

    def _shares(self, n: int) -> np.ndarray:
        want = np.full(n, self.nbuckets // n, np.int64)
        want[:self.nbuckets % n] += 1
        return want

    def _seed_shared(self, w: int) -> None:
        """A new worker starts with worker 0's replicated shared tables (MACs, ARP,
        NAT mappings), before any bucket is moved to it."""
        if w == 0:
            return
        now, _ = self._clock()
        try:
            parts = self.call(0, ("export", now))
            self.call(w, ("merge", parts, now))
        except (RuntimeError, TimeoutError):
            pass  # replication brings them within a round

    def _stop_worker(self, w: int) -> None:
        """Stop worker ``w`` (it owns no bucket any more): drain, keep its counters."""
        h = self.workers[w]
        try:
            snap = self.call(w, ("stop",), timeout=STOP_TIMEOUT)
            self._retire(snap)
        except (RuntimeError, TimeoutError, OSError):
            if h.last is not None:
                self._retire(h.last)
        self._drain_tx(w)
        self._return_slots()
        _end(h.proc)
        h.proc = None
        h.last = None
        self._remove_area(w)

    # -- persisted state (DHCP leases) ------------------------------------------------
    def _clock(self) -> tuple[float, float]:
        """(now, wall - now) as persisted state is stamped: the monotonic clock live,
        capture time (offset 0) offline."""
        from dva.worker.persist import live_offset

        if self.live:
            return time.monotonic(), live_offset()
        return self.last_time or 0.0, 0.0

    last_time: float | None = None  # offline: capture time of the last batch

    def _open_state(self, state_dir: str | None) -> None:
        """Load persisted device state into the manager's shadow engines; workers get
        it when they start (the owner of each device's tables: :meth:`_owner`)."""
        if state_dir is None:
            return
        from dva.worker.persist import Persistence

        now, offset = self._clock()
        for a, (app, plan) in enumerate(zip(self.apps, self.plans)):
            if not Persistence.wanted(plan):
                continue
            p = Persistence(state_dir, app.tenant, app.name, say=self._tell)
            eng = Engine(plan, PacketPool(64), tenant_id=self.tenant_ids[a],
                         nbuckets=self.nbuckets, hop_limit=self.hop_limit)
            p.load(eng, now if self.live else None, offset)
            self.persist[a], self.shadow[a] = p, eng
        self._saved: dict[tuple[int, str], bytes] = {}

    def _owner(self, a: int, dev) -> int:
        """The worker that owns ``dev``'s shared tables: every worker for replicated
        tables (-1), else the worker of the bucket its traffic is steered to."""
        b = self.owner_bucket[a].get(dev.name)
        return -1 if b is None else int(self.table[b])

    def _plan_changed(self, a: int) -> None:
        """What the dispatcher derives from appliance ``a``'s plan: its bucket aliases
        and the buckets that own tables (at start and after an apply)."""
        self.alias[a] = plan_aliases(self.plans[a])
        self.owner_bucket[a] = owner_buckets(self.plans[a].devices, tenant=self.tenant_ids[a],
                                             nbuckets=self.nbuckets, alias=self.alias[a])

    def _initial(self, w: int):
        """What worker ``w`` starts with of the persisted state: per appliance, device
        name -> its shared tables (those it owns, or all if replicated)."""
        if not any(e is not None for e in self.shadow):
            return None
        now, _ = self._clock()
        parts = []
        for a, eng in enumerate(self.shadow):
            named = {}
            if eng is not None:
                for d, st in zip(eng.plan.devices, eng.states):
                    if d.persist and self._owner(a, d) in (-1, w):
                        named[d.name] = st.export_shared(now)
            parts.append(named)
        return parts, now

    def save_state(self, wait: bool = False, force: bool = False) -> None:
        """Gather the persisted devices' tables from their owners and save those that
        changed (at most every ``SAVE_INTERVAL`` unless ``force``); ``wait``: now,
        else when the workers answer."""
        if not any(p is not None for p in self.persist):
            return
        now, _ = self._clock()
        if wait:
            got: dict[int, list] = {}
            for w in self.active():
                try:
                    got[w] = self.call(w, ("export_persisted", now), timeout=STOP_TIMEOUT)
                except (RuntimeError, TimeoutError):
                    pass
            self._store(got, force)
        else:
            self._ask_all(("export_persisted", now), lambda got: self._store(got, force))

    def _ask_all(self, msg, then: Callable[[dict[int, object]], None]) -> None:
        """Send ``msg`` to every worker; once each has answered it, ``then(answers)``
        (worker -> value; a round in which a worker fails or dies is dropped)."""
        ws = self.active()
        got: dict[int, object] = {}

        def answer(w):
            def h(reply):
                if reply[0] == "ok":
                    got[w] = reply[1]
                    if len(got) == len(ws):
                        then(got)
            return h
        for w in ws:
            self._request(w, msg, answer(w))

    def _store(self, got: dict[int, list], force: bool) -> None:
        now, offset = self._clock()
        for a, p in enumerate(self.persist):
            if p is None:
                continue
            eng = self.shadow[a]
            for i, d in enumerate(eng.plan.devices):
                if not d.persist:
                    continue
                owner = self._owner(a, d)
                fresh = d.new_state()
                fresh.bucket_mask = eng.bucket_mask
                for w, parts in got.items():
                    data = parts[a].get(d.name) if a < len(parts) else None
                    if data is not None and owner in (-1, w):
                        fresh.merge_shared(data, now)
                data = fresh.export_shared(now)
                if self._saved.get((a, d.name)) != data:  # changed: the next save writes
                    eng.states[i] = fresh
                    self._saved[(a, d.name)] = data
            p.maybe_save(eng, now, offset, force)

    def _shadow_follows(self, a: int, plan) -> None:
        """After an apply: the shadow engine takes the new plan, keeping the state of
        persisted devices of the same name and type."""
        old = self.shadow[a]
        if old is None:
            return
        eng = Engine(plan, PacketPool(64), tenant_id=self.tenant_ids[a],
                     nbuckets=self.nbuckets, hop_limit=self.hop_limit)
        before = {d.name: (d.type_name, st) for d, st in zip(old.plan.devices, old.states)}
        for i, d in enumerate(plan.devices):
            kept = before.get(d.name)
            if d.persist and kept is not None and kept[0] == d.type_name:
                eng.states[i] = kept[1]
        self.shadow[a] = eng

    # -- replication -----------------------------------------------------------------
    def replicate(self, now: float, wait: bool = False) -> None:
        """Every worker's shared tables merged into every other's (newest wins)."""
        ws = self.active()
        if len(ws) < 2:
            return
        self._ask_all(("export", now), lambda got: self._spread(got, now))
        if wait:
            for w in ws:
                self.call(w, ("sync",))

    def _spread(self, got: dict[int, list], now: float) -> None:
        for w in got:
            for src, parts in got.items():
                if src != w:
                    self._request(w, ("merge", parts, now))

    # -- offline ---------------------------------------------------------------------
    def run_offline(self, between: Callable[[Runtime, float], None] | None = None
                    ) -> dict[str, int]:
        """Run every input through the workers, then stop; returns the aggregated
        counters."""
        self.run_inputs(between)
        return self.stop()

    def run_inputs(self, between: Callable[[Runtime, float], None] | None = None) -> None:
        """Run every input there is through the workers, until each has sent out what
        it made of them (the runtime keeps running: memory ports may get more).
        ``between(runtime, t)`` is called before each batch (capture time ``t`` of its
        first packet): tests move buckets or scale there, with traffic around."""
        next_rep = self._next_rep
        while True:
            best, t0 = -1, None
            for i, p in enumerate(self.ports):
                t = p.peek()
                if t is not None and (t0 is None or t < t0):
                    best, t0 = i, t
            if best < 0:
                break
            if next_rep is None:
                next_rep = t0 + REPLICATE
            if t0 >= next_rep:
                self.sync()
                self.replicate(t0, wait=True)
                self.sync()
                while next_rep <= t0:
                    next_rep += REPLICATE
            if between is not None:
                between(self, t0)
            self._offline_batch(best, t0)
            self._collect_all()
            self._check_workers()
        self._next_rep = next_rep
        self.sync()

    _next_rep: float | None = None

    def _offline_batch(self, g: int, t0: float) -> None:
        others = [p.peek() for j, p in enumerate(self.ports) if j != g]
        limit = min([t for t in others if t is not None], default=None)
        port = self.ports[g]
        b = self.batch
        b.clear()
        self.last_time = t0
        while b.n < self.batch_size:
            t = port.peek()
            if t is None or t > t0 + 1e-3 or (limit is not None and t > limit):
                break
            _, frame = port.take()
            if len(frame) > self.pool.max_frame:
                self.ingress_drops[g, 0] += 1
                continue
            while self.pool.available == 0:
                self._collect_all()
                self._check_workers()
            b.add_frame(frame, origin=g)
        a, _ = self.attach_refs[g]
        self._steer(a, g - int(self.app_base[a]), b, int(round(t0 * 1e9)), wait=True)

    def sync(self) -> None:
        """Wait until every worker has processed its ring; collect what it sent."""
        for w in self.active():
            self.call(w, ("sync",))
        self._collect_all()
        for w in self.active():
            self._poll_replies(w)

    # -- live ------------------------------------------------------------------------
    def run_live(self, duration: float | None = None,
                 every_second: Callable[[Runtime], None] | None = None,
                 control=None) -> None:
        poller = select.poll()
        for p in self.ports:
            poller.register(p.fileno(), select.POLLIN)
        end = None if duration is None else time.monotonic() + duration
        next_tick = next_rep = next_save = time.monotonic()
        next_second = next_tick + 1.0
        idle = 0
        while not self._stop:
            now = time.monotonic()
            if end is not None and now >= end:
                break
            poller.poll(1 if idle < 200 else 20)
            moved = 0
            for g in range(len(self.ports)):
                moved += self._pump(g)
            moved += self._collect_all()
            idle = 0 if moved else idle + 1
            now = time.monotonic()
            for w in self.active():
                if self.workers[w].expect:
                    self._poll_replies(w)
            if now >= next_tick:
                self._check_workers()
                next_tick = now + TICK
            if now >= next_rep:
                self.replicate(now)
                next_rep = now + REPLICATE
            if now >= next_save:
                self.save_state()
                next_save = now + SAVE_INTERVAL
            if control is not None:
                control.serve(self)
            if self._reload_job is not None and not self._reload_job.is_alive():
                self._reload_job = None
                self._finish_apply()
            if self._reload_queue and self._reload_job is None and self._applying is None:
                self.apply(self._reload_queue.pop(0))
            if now >= next_second:
                self._read_kernel_drops()
                self._watch_load(now)
                for w in self.active():
                    self._request(w, ("counters",), self._snapshot(w))
                if every_second is not None:
                    every_second(self)
                next_second = now + 1.0
        self._read_kernel_drops()

    def _snapshot(self, w: int):
        def h(reply):
            if reply[0] == "ok":
                self.workers[w].last = reply[1]
        return h

    def _pump(self, g: int) -> int:
        port = self.ports[g]
        a, _ = self.attach_refs[g]
        att = g - int(self.app_base[a])
        b = self.batch
        moved = 0
        for _ in range(PUMP_ROUNDS):
            if not self._room_for_batch():
                # back-pressure: the frames wait in the port's kernel ring (which
                # counts what it cannot hold as kernel_drops) until workers catch up
                self._collect_all()
                if not self._room_for_batch():
                    break
            b.clear()
            n = port.recv(b, self.batch_size)
            if n == 0:
                break
            moved += n
            self._steer(a, att, b, time.monotonic_ns(), wait=False)
            if moved >= 4 * self.batch_size:
                self._collect_all()
        return moved

    def _room_for_batch(self) -> bool:
        """Every worker's rx ring can take a whole batch (whichever buckets it has)."""
        need = self.bus.ring_capacity - self.batch_size
        for w in range(self.nworkers):
            if ring_count(self.bus.rx[w]) > need:
                return False
        return True

    def _read_kernel_drops(self) -> None:
        for p in self.ports:
            try:
                p.kernel_stats()
            except (PortError, AttributeError):
                pass

    def request_stop(self) -> None:
        self._stop = True

    def request_reload(self) -> None:
        """Apply every appliance's file again at the next wake-up (safe in a signal
        handler: SIGHUP)."""
        self._reload_queue.extend(a.source for a in self.apps)

    def wait_ready(self, timeout: float = 120.0) -> None:
        """Until every worker runs its loop (its engines built): only then is the
        appliance ready; meanwhile frames wait in the workers' rings."""
        end = time.monotonic() + timeout
        for w in self.active():
            while not self.bus.load[w, LOAD_BEAT_NS]:
                h = self.workers[w]
                if h.proc is None or not h.proc.is_alive():
                    raise RuntimeError(f"worker {w} exited while starting "
                                       f"(exit code {h.proc.exitcode if h.proc else None})")
                if time.monotonic() > end:
                    raise TimeoutError(f"worker {w} did not start within {timeout:g} s")
                self._collect_all()
                time.sleep(0.005)

    @property
    def app(self) -> Appliance:
        """The first (on ``dva run``: the only) appliance."""
        return self.apps[0]

    @property
    def plan(self):
        return self.plans[0]

    # -- config generations ----------------------------------------------------------
    _reload_job: threading.Thread | None = None
    _reload_built = None
    _reload_done: Callable | None = None
    _reload_source = ""

    def apply(self, path: str | None = None, text: str | None = None,
              done: Callable[[bool, str], None] | None = None) -> None:
        """Validate and build the new config for the appliance of the same name in the
        background; when built, every worker swaps to it (``done(ok, message)``)."""
        if self._reload_job is not None or self._applying is not None:
            if done:
                done(False, "another apply is in progress")
            return
        self._reload_done = done
        self._reload_source = path or "<apply>"
        self._reload_job = threading.Thread(target=self._build, args=(path, text),
                                            daemon=True, name="dva-apply")
        self._reload_job.start()

    def _build(self, path, text) -> None:
        try:
            base = Path(path).resolve().parent if path else None
            if text is None:
                try:  # read once: what is validated here is what the workers run
                    text = Path(path).read_text()
                except (OSError, UnicodeDecodeError):
                    load_appliance(path)  # raises ApplianceError, saying why
                    raise
            app = parse_appliance(text, source=path or "<apply>", base_dir=base)
            names = [x.qualified_name for x in self.apps]
            if app.qualified_name not in names:
                raise ReloadRejected(f"no running appliance {app.qualified_name} (this "
                                     f"instance runs {', '.join(names)})")
            a = names.index(app.qualified_name)
            plan = compile_plan(app)
            problems = attachment_problems(self.plans[a], plan)
            if problems:
                raise ReloadRejected("attachments cannot change while running", problems)
            Engine(plan, PacketPool(256), tenant_id=self.tenant_ids[a],
                   nbuckets=self.nbuckets, hop_limit=self.hop_limit).warm()
            self._reload_built = (a, app, text)
        except ApplianceError as e:
            n = len(e.issues)
            self._reload_built = ReloadRejected(
                f"invalid appliance ({n} problem{'s' if n != 1 else ''})",
                e.render().splitlines()[1:])
        except ReloadRejected as e:
            self._reload_built = ReloadRejected(e.reason, [f"  {p}" for p in e.problems])
        except Exception as e:
            self._reload_built = ReloadRejected(f"{type(e).__name__}: {e}")

    def _finish_apply(self) -> None:
        built, self._reload_built = self._reload_built, None
        done, self._reload_done = self._reload_done, None
        if isinstance(built, ReloadRejected):
            self.reloads_rejected += 1
            msg = (f"reload of {self._reload_source} rejected: {built.reason}; generation "
                   f"{self.generation} keeps running")
            self._tell(msg)
            for p in built.problems:
                self._tell(p)
            if done:
                done(False, "\n".join([msg, *built.problems]))
            return
        a, app, text = built
        gen = self.generation + 1
        self.apps[a] = app  # a worker (re)started from now on starts with it
        self.plans[a] = compile_plan(app)
        self._plan_changed(a)  # e.g. port forwards edited
        self._shadow_follows(a, self.plans[a])
        self.generation = gen
        ws = self.active()
        replies: dict[int, tuple] = {}
        self._applying = (app.source, gen, done)

        def answered(w):
            def h(reply):
                replies[w] = reply
                if len(replies) == len(ws):
                    self._applied(replies)
            return h
        for w in ws:  # each answers once it has swapped (at its next quiet batch edge)
            if not self._request(w, ("apply", gen, a, text, app.source, app.base_dir),
                                 answered(w)):
                replies[w] = ("ok", None)  # dead: it restarts with the new generation
        if len(replies) == len(ws):
            self._applied(replies)

    _applying: tuple | None = None  # (source, generation, done) until every worker swapped

    def _applied(self, replies: dict[int, tuple]) -> None:
        source, gen, done = self._applying
        self._applying = None
        errors = [f"worker {w}: {v}" for w, (st, v) in sorted(replies.items()) if st != "ok"]
        reports = [v for st, v in replies.values() if st == "ok" and v]
        summary = reports[0]["summary"] if reports else ""
        for p in sorted({p for r in reports for p in r["problems"]}):
            self._tell(f"reload of {source}: {p}")
        msg = f"reloaded {source}: generation {gen}" + (f" ({summary})" if summary else "")
        if errors:
            msg += "; " + "; ".join(errors)
        self._tell(msg)
        if done:
            done(not errors, msg)

    def wait_apply(self, timeout: float = 60.0) -> None:
        """Offline/tests: finish a pending apply now."""
        end = time.monotonic() + timeout
        while self._reload_job is not None and self._reload_job.is_alive():
            if time.monotonic() > end:
                raise TimeoutError("apply did not finish")
            self._collect_all()
            time.sleep(0.001)
        if self._reload_job is not None:
            self._reload_job = None
            self._finish_apply()
        while self._applying is not None:
            if time.monotonic() > end:
                raise TimeoutError("the workers did not swap to the new generation")
            self._collect_all()
            for w in self.active():
                self._poll_replies(w)
            time.sleep(0.001)

    # -- counters and status ---------------------------------------------------------
    def worker_counters(self) -> list[dict]:
        out = []
        for w in self.active():
            try:
                snap = self.call(w, ("counters",), timeout=5.0)
            except (RuntimeError, TimeoutError):
                snap = self.workers[w].last
            if snap is not None:
                self.workers[w].last = snap
                out.append(snap)
        return out

    def counters(self, snaps: list[dict] | None = None) -> dict[str, int]:
        """Every counter of an inline run (device, graph, attachment ones), summed
        over the workers, plus the runtime's own."""
        snaps = self.worker_counters() if snaps is None else snaps
        c: dict[str, int] = {}
        multi = len(self.apps) > 1
        for a, app in enumerate(self.apps):
            pre = f"{app.qualified_name}: " if multi else ""
            tot: dict[str, int] = dict((self._retired or {}).get(a, {}))
            for s in snaps:
                for k, v in s["apps"][a]["counters"].items():
                    tot[k] = tot.get(k, 0) + v
            for k, v in tot.items():
                c[pre + k] = v
        for g, (a, ref) in enumerate(self.attach_refs):
            pre = f"{self.apps[a].qualified_name}: " if multi else ""
            p = self.ports[g]
            if not self.live:  # the names of an offline run (a full pool waits here)
                c[f"{pre}attach {ref} drop/too_long"] = int(self.ingress_drops[g, 0])
                c[f"{pre}attach {ref} drop/pool_exhausted"] = int(self.ingress_drops[g, 1])
            else:
                c[f"{pre}port {ref} rx"] = p.rx
                c[f"{pre}port {ref} tx"] = p.tx
                for name, v in p.drops.items():
                    c[f"{pre}attach {ref} drop/{name}"] = v
        for w in range(self.max_workers):
            if w >= self.nworkers and not self.bus_drops[w].any():
                continue
            for r, name in enumerate(BUS_DROPS):
                c[f"bus w{w} drop/{name}"] = int(self.bus_drops[w, r])
            c[f"bus w{w} slots_reclaimed"] = int(self.reclaimed[w])
            c[f"worker w{w} restarts"] = self.workers[w].restarts
        for k in MIGRATION_COUNTERS:
            c[f"migration {k}"] = self.mig[k]
        c["runtime workers"] = self.nworkers
        c["config generation"] = self.generation
        c["config reloads_rejected"] = self.reloads_rejected
        return c

    def accounting_errors(self, snaps: list[dict] | None = None) -> list[str]:
        snaps = self.worker_counters() if snaps is None else snaps
        errs = []
        for s in snaps:
            for part in s["apps"]:
                errs += [f"worker {s['worker']}: {e}" for e in part["errors"]]
        return errs

    def status(self) -> dict:
        now = time.monotonic()
        units = []
        for w in self.active():
            h = self.workers[w]
            ld = self.bus.load[w]
            alive = h.proc is not None and h.proc.is_alive()
            units.append({
                "unit": f"worker {w}", "pid": h.proc.pid if h.proc else None,
                "alive": alive, "restarts": h.restarts,
                "buckets": int((self.table == w).sum()),
                "busy_s": round(int(ld[LOAD_BUSY_NS]) / 1e9, 3),
                "busy_fraction": round(int(ld[LOAD_BUSY_NS]) / 1e9
                                       / max(now - h.started, 1e-9), 4),
                "batches": int(ld[LOAD_BATCHES]), "packets": int(ld[LOAD_PACKETS]),
                "generation": int(ld[LOAD_GEN]),
                "busy_last_s": (round(self.last_loads[w].busy, 4)
                                if w < len(self.last_loads) else None),
                "ring": int(ring_count(self.bus.rx[w])),
                "heartbeat_age_s": (round(now - int(ld[LOAD_BEAT_NS]) / 1e9, 3)
                                    if ld[LOAD_BEAT_NS] else None),
            })
        return {"generation": self.generation, "workers": self.nworkers,
                "max_workers": self.max_workers, "held": self.nheld,
                "migration": dict(self.mig),
                "appliances": [a.qualified_name for a in self.apps],
                "uptime_s": round(now - self.started, 1), "units": units,
                "dispatcher": {"pid": os.getpid(), "free_slots": self.pool.available,
                               "owned_slots": self.pool.owned},
                "autoscale": (vars(self.autoscaler.policy) if self.autoscaler else None),
                "decisions": self.decisions[-20:]}

    # -- stop ------------------------------------------------------------------------
    def stop(self) -> dict[str, int]:
        """Drain every worker, collect its final counters, end it; returns the
        aggregated counters (also in ``final``)."""
        self.save_state(wait=True, force=True)
        snaps = []
        for w in self.active():
            h = self.workers[w]
            if h.proc is None or not h.proc.is_alive():
                continue
            try:
                snaps.append(self.call(w, ("stop",), timeout=STOP_TIMEOUT))
            except (RuntimeError, TimeoutError, OSError):
                pass
        self._collect_all()
        for w in self.active():
            _end(self.workers[w].proc)
        self.final_snaps = snaps
        self.final = self.counters(snaps)
        self.final_errors = self.accounting_errors(snaps)
        self.stopped = True
        return self.final

    stopped = False

    def close(self) -> None:
        for w in range(self.max_workers):
            self._remove_area(w)
        for p in self.persist:
            if p is not None:
                p.close()
        self.persist = [None] * len(self.apps)
        for h in self.workers:
            if h.proc is not None and h.proc.is_alive():
                h.proc.kill()
                h.proc.join()
        for p in self.ports:
            try:
                p.close()
            except Exception:
                pass
        self.ports = []

    def __enter__(self) -> Runtime:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

