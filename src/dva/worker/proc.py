"""A data-plane worker process: every appliance's graph over the batches it is given.

The dispatcher forks one per worker (``dva.dispatch.runtime``). A worker owns the
flow state of the buckets the dispatcher steers to it and keeps a replica of every
device's shared tables (MAC tables, ARP caches, NAT mappings, leases), which the
manager keeps converging (``merge`` messages, newest entry wins).

Loop: take up to a batch of descriptors from the rx ring; ``K_FREE`` ones put own
slots back on the free stack; runs of ``K_PKT`` of one (appliance, attachment) become
a batch for that appliance's engine (``now`` = the dispatcher's receive time); what
the engines send out of attachments goes on the tx ring as ``K_PKT``, the slots of
others released here go home as ``K_FREE``. A full tx ring makes the worker wait
(the dispatcher always drains it); it then takes no new input, so back-pressure
reaches the dispatcher's rx-ring push, which counts it. Live (``ticks``), every
``TICK`` seconds the engines tick (ARP retries, held packets).

Control (a pipe; the out-of-band bus), between batches: ``counters``, ``export``
(shared tables to replicate), ``export_persisted`` (those of devices that persist
their state, for the manager to save), ``merge`` (another replica's), ``apply`` (a
new config generation: built, then swapped in once nothing is held or after
``HOLD_DRAIN``, and only then answered, with the swap's summary; no other request is
read meanwhile, so answers stay in request order), ``move_out`` / ``move_in`` /
``drop_flows`` (a bucket move: process the ring up to the dispatcher's hold point and
stage the buckets' flow state in a file, import one, forget moved buckets), ``sync``
(answer once the rx ring is empty and every output is on the tx ring), ``stop``
(drain, answer the final counters, exit). Load words on the bus (busy ns, batches,
packets, heartbeat) are written every loop.
"""

from __future__ import annotations

import os
import signal
import time
import traceback

import numpy as np

from dva._jit import kernel
from dva.graph.appliance import parse_appliance
from dva.packet import layout as L
from dva.packet.batch import PacketBatch
from dva.packet.pool import pool_release
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
    ring_count,
    ring_pop,
    ring_push,
    ring_taken,
)
from dva.packet.steer import owner_buckets
from dva.worker import stage
from dva.worker.bus import LOAD_BATCHES, LOAD_BEAT_NS, LOAD_BUSY_NS, LOAD_GEN, LOAD_PACKETS
from dva.worker.engine import Engine
from dva.worker.reload import HOLD_DRAIN, held_packets, prepare, swap

TICK = 0.1


@kernel
def take_run(desc, i, k, meta, free, top):
    """From descriptor ``i`` on: release ``K_FREE`` slots, copy the run of ``K_PKT``
    descriptors of one (appliance, attachment) into ``meta``. Returns the index after
    the run, the rows copied (in ``meta``'s first rows), the run's appliance and
    attachment, and its first packet's receive time (ns; ``K_FREE`` ones carry none)."""
    n = 0
    app = -1
    att = -1
    t_ns = 0
    while i < k:
        kind = desc[i, D_KIND]
        if kind == K_FREE:
            pool_release(free, top, desc[i, D_SLOT])
            i += 1
            continue
        if n == 0:
            app = desc[i, D_APP]
            att = desc[i, D_ATTACH]
            t_ns = desc[i, D_TIME]
        elif desc[i, D_APP] != app or desc[i, D_ATTACH] != att or n >= meta.shape[0]:
            break
        for f in range(L.NFIELDS):
            meta[n, f] = 0
        meta[n, L.SLOT] = desc[i, D_SLOT]
        meta[n, L.START] = desc[i, D_START]
        meta[n, L.LEN] = desc[i, D_LEN]
        meta[n, L.VLAN] = -1
        n += 1
        i += 1
    return i, n, app, att, t_ns


@kernel
def put_descs(meta, n, app, att, t_ns, out, k0):
    """``K_PKT`` descriptors for ``n`` rows sent out attachment ``att``."""
    for j in range(n):
        o = k0 + j
        out[o, D_KIND] = K_PKT
        out[o, D_SLOT] = meta[j, L.SLOT]
        out[o, D_START] = meta[j, L.START]
        out[o, D_LEN] = meta[j, L.LEN]
        out[o, D_APP] = app
        out[o, D_ATTACH] = att
        out[o, D_BUCKET] = meta[j, L.BUCKET]
        out[o, D_TIME] = t_ns
    return k0 + n


@kernel
def free_descs(slots, out, k0):
    for j in range(slots.shape[0]):
        o = k0 + j
        for f in range(DESC_WORDS):
            out[o, f] = 0
        out[o, D_KIND] = K_FREE
        out[o, D_SLOT] = slots[j]
    return k0 + slots.shape[0]


class AppSlot:
    """One appliance as a worker runs it: its engine and the map between the
    dispatcher's attachment numbers (the first generation's) and the engine's."""

    def __init__(self, engine: Engine, first_refs: list[str]) -> None:
        self.first_refs = first_refs
        self.set_engine(engine)
        self.pending: tuple[Engine, int, float] | None = None  # (engine, gen, deadline)

    def set_engine(self, engine: Engine) -> None:
        self.engine = engine
        self.owner_buckets = owner_buckets(engine.plan.devices, tenant=engine.tenant_id,
                                           nbuckets=engine.bucket_mask + 1,
                                           alias=engine.alias)
        refs = [a.ref for a in engine.plan.attachments]
        self.to_engine = [refs.index(r) for r in self.first_refs]
        self.to_disp = [self.first_refs.index(r) for r in refs]


class Worker:
    def __init__(self, index: int, bus, apps, conn, *, batch_size: int = 256,
                 hop_limit: int = 16, nbuckets: int = 4096, ticks: bool = True,
                 generation: int = 1, tenant_ids: list[int] | None = None,
                 initial=None) -> None:
        self.index = index
        self.bus = bus
        self.pool = bus.pool(index)
        self.rx = bus.rx[index]
        self.tx = bus.tx[index]
        self.load = bus.load[index]
        self.conn = conn
        self.batch_size = batch_size
        self.ticks = ticks
        self.generation = generation
        tids = tenant_ids or [0] * len(apps)
        from dva.graph.plan import compile_plan
        self.apps = [AppSlot(Engine(compile_plan(a), self.pool, tenant_id=t,
                                    nbuckets=nbuckets, hop_limit=hop_limit),
                             [x.ref for x in a.attachments]) for a, t in zip(apps, tids)]
        self.desc = np.zeros((batch_size, DESC_WORDS), np.int64)
        self.batch = PacketBatch(self.pool, batch_size)
        self.out = np.zeros((4 * batch_size, DESC_WORDS), np.int64)
        self.nout = 0
        self.stopping = False
        self.load[LOAD_GEN] = generation
        if initial is not None:  # persisted state (leases) the manager holds
            by_name, t = initial
            for s, named in zip(self.apps, by_name):
                for d, st in zip(s.engine.plan.devices, s.engine.states):
                    if d.name in named:
                        st.merge_shared(named[d.name], t)

    # -- output ----------------------------------------------------------------------
    def _room(self, n: int) -> None:
        if self.nout + n > self.out.shape[0]:
            self._flush()
            if n > self.out.shape[0]:
                self.out = np.zeros((2 * n, DESC_WORDS), np.int64)

    def _flush(self) -> None:
        """Put every pending descriptor on the tx ring, waiting while it is full."""
        i = 0
        spins = 0
        while i < self.nout:
            k = ring_push(self.tx, self.out, i, self.nout - i)
            i += k
            if k == 0:
                spins += 1
                if spins > 64:
                    time.sleep(0.0001)
        self.nout = 0

    def _emit(self, a: int, outputs, t_ns: int) -> None:
        self._emit_raw(a, outputs, self.apps[a].to_disp, t_ns)

    def _returns(self) -> None:
        while self.pool.top[3]:
            back = self.pool.take_returns(self.out.shape[0] // 2)
            self._room(len(back))
            self.nout = free_descs(back, self.out, self.nout)

    # -- the loop --------------------------------------------------------------------
    def step(self) -> int:
        """One batch from the rx ring; returns the descriptors taken."""
        k = ring_pop(self.rx, self.desc, self.batch_size)
        if k == 0:
            return 0
        t0 = time.perf_counter_ns()
        b = self.batch
        i = 0
        moved = 0
        while i < k:
            i, n, a, d_att, t_ns = take_run(self.desc, i, k, b.meta, self.pool.free,
                                            self.pool.top)
            if n == 0:
                continue
            t_ns = int(t_ns)
            slot = self.apps[a]
            b.n = n
            att = slot.to_engine[d_att]
            outputs = slot.engine.process(att, b, t_ns / 1e9)
            moved += n
            self._emit(a, outputs, t_ns)
        self._returns()
        self._flush()
        ld = self.load
        ld[LOAD_BUSY_NS] += time.perf_counter_ns() - t0
        ld[LOAD_BATCHES] += 1
        ld[LOAD_PACKETS] += moved
        return k

    def tick(self, now: float) -> None:
        t_ns = int(now * 1e9)
        for a, slot in enumerate(self.apps):
            self._emit(a, slot.engine.tick(now), t_ns)
            self._maybe_swap(a, now)
        self._returns()
        self._flush()

    def drain(self) -> None:
        while ring_count(self.rx):
            self.step()

    def run(self) -> None:
        next_tick = time.monotonic() + TICK
        idle = 0
        while True:
            k = self.step()
            now = time.monotonic()
            self.load[LOAD_BEAT_NS] = time.monotonic_ns()
            if self.ticks and now >= next_tick:
                self.tick(now)
                next_tick = now + TICK
            if (k == 0 or idle % 64 == 0) and not self.swapping():
                if self.conn.poll():
                    if not self.control(self.conn.recv()):
                        return
            if k:
                idle = 0 if idle else 1
                continue
            idle += 1
            # spin a little, then sleep in short naps: a worker with nothing to do
            # must leave the core to the dispatcher on small machines
            if idle > 32:
                time.sleep(0.0002 if idle < 2000 else 0.001)

    # -- control ---------------------------------------------------------------------
    def control(self, msg) -> bool:
        op = msg[0]
        if op == "counters":
            self.conn.send(("ok", self.counters()))
        elif op == "export":  # shared tables to replicate (None: not replicated)
            t = msg[1]
            self.conn.send(("ok", [[st.export_shared(t) if d.replicate_shared else None
                                    for d, st in zip(s.engine.plan.devices,
                                                     s.engine.states)]
                                   for s in self.apps]))
        elif op == "export_persisted":  # shared tables of devices that persist state
            t = msg[1]
            self.conn.send(("ok", [{d.name: st.export_shared(t)
                                    for d, st in zip(s.engine.plan.devices, s.engine.states)
                                    if d.persist} for s in self.apps]))
        elif op == "merge":
            _, parts, t = msg
            self.merge(parts, t)
            self.conn.send(("ok", None))
        elif op == "move_out":
            _, buckets, upto, t, path, area_path = msg
            area = stage.area(area_path)
            self.conn.send(("ok", stage.write(self.move_out(buckets, upto, t, area), path,
                                              area)))
        elif op == "move_in":
            _, buckets, staged, t, path = msg
            try:
                n = self.move_in(buckets, stage.read(*staged, path), t)
            except Exception as e:  # refused (a table too small): nothing of it stays
                self.drop_flows(buckets, t, owned=False)
                self.conn.send(("error", f"{type(e).__name__}: {e}"))
            else:
                self.conn.send(("ok", n))
        elif op == "drop_flows":
            _, buckets, t = msg
            self.conn.send(("ok", self.drop_flows(buckets, t)))
        elif op == "sync":
            self.drain()
            self.conn.send(("ok", None))
        elif op == "apply":
            _, gen, a, text, source, base_dir = msg
            try:
                app = parse_appliance(text, source=source, base_dir=base_dir)
                new = prepare(app, self.apps[a].engine)
            except Exception as e:  # the manager validated it: this is a bug, say so
                self.conn.send(("error", f"{type(e).__name__}: {e}"))
                return True
            # answered by the swap; until then no other request is read (replies stay
            # in request order)
            self.apps[a].pending = (new, gen, time.monotonic() + HOLD_DRAIN)
            self._maybe_swap(a, time.monotonic(), force=not self.ticks)
        elif op == "stop":
            self.drain()
            for a in range(len(self.apps)):
                self._maybe_swap(a, time.monotonic(), force=True)
            self._returns()
            self._flush()
            self.conn.send(("ok", self.counters()))
            return False
        else:
            self.conn.send(("error", f"unknown request {op!r}"))
        return True

    # -- bucket moves (dva.dispatch.runtime.Runtime.move) -----------------------------
    def _owned_here(self, s, d, buckets) -> bool:
        """Device ``d`` of appliance slot ``s`` owns its shared tables through a
        bucket among ``buckets`` (they move with it)."""
        return bool(s.owner_buckets.get(d.name, -1) in buckets)

    def move_out(self, buckets: np.ndarray, upto: int, t: float,
                 area: stage.Area | None = None) -> list:
        """Process the rx ring up to position ``upto`` (every packet of ``buckets``
        the dispatcher sent before holding them), then export those buckets' flow
        state (and tables owned through them): per appliance, per device, ``(flows,
        owned shared or None)``, the records written into the staging ``area`` when
        given. The state stays here until ``drop_flows``."""
        while ring_taken(self.rx) < upto:
            if self.step() == 0:
                time.sleep(0)
        self._returns()
        self._flush()
        bset = set(int(b) for b in buckets)
        alloc = None
        if area is not None:
            words = sum(st.flow_words() for s in self.apps for st in s.engine.states)
            room = area.reserve(8 * words).view(np.int64)
            used = [0]

            def alloc(rows: int, width: int) -> np.ndarray:
                a = room[used[0]:used[0] + rows * width].reshape(rows, width)
                used[0] += (rows * width + 7) // 8 * 8  # next one cache-line aligned
                return a
        out = []
        for s in self.apps:
            e = s.engine
            out.append([(st.take_flows(buckets, t, alloc),
                         st.export_shared(t) if self._owned_here(s, d, bset) else None)
                        for d, st in zip(e.plan.devices, e.states)])
        return out

    def move_in(self, buckets: np.ndarray, parts: list, t: float) -> int:
        """Import what ``move_out`` gave (another worker's); returns the entries."""
        n = 0
        for s, per_dev in zip(self.apps, parts):
            for st, (flows, shared) in zip(s.engine.states, per_dev):
                n += st.put_flows(flows, t)
                if shared is not None:
                    st.merge_shared(shared, t)
        return n

    def drop_flows(self, buckets: np.ndarray, t: float, owned: bool = True) -> int:
        """Forget the flow state of ``buckets`` (they moved away), and the tables owned
        through them."""
        bset = set(int(b) for b in buckets)
        n = 0
        for s in self.apps:
            e = s.engine
            for d, st in zip(e.plan.devices, e.states):
                n += st.remove_flows(buckets, t)
                if owned and self._owned_here(s, d, bset):
                    for tb in st.shared_tables.values():
                        tb.remove_buckets(None, t)
        return n

    def swapping(self) -> bool:
        """A new generation waits for its swap (its apply is not answered yet)."""
        return any(s.pending is not None for s in self.apps)

    def merge(self, parts, t: float) -> None:
        """Fold exports of shared tables in (per appliance, per device; None: none)."""
        for s, per_dev in zip(self.apps, parts):
            for st, data in zip(s.engine.states, per_dev or ()):
                if data is not None:
                    st.merge_shared(data, t)

    def _maybe_swap(self, a: int, now: float, force: bool = False) -> None:
        slot = self.apps[a]
        if slot.pending is None:
            return
        new, gen, deadline = slot.pending
        if not force and held_packets(slot.engine) and now < deadline:
            return
        old = slot.engine
        try:
            report = swap(old, new, now)
        except Exception as e:  # a bug in a device's export/import: keep running
            self._emit_raw(a, old.outputs, slot.to_disp, int(now * 1e9))
            slot.pending = None
            self.conn.send(("error", f"the swap failed ({type(e).__name__}: {e}); "
                                     f"generation {self.generation} keeps running here"))
            return
        old_disp = slot.to_disp
        self._emit_raw(a, report.outputs, old_disp, int(now * 1e9))
        slot.set_engine(new)
        slot.pending = None
        self.generation = gen
        self.load[LOAD_GEN] = gen
        self.conn.send(("ok", {"summary": report.summary(), "problems": report.problems}))

    def _emit_raw(self, a, outputs, to_disp, t_ns) -> None:
        for e_att, ob in enumerate(outputs):
            if ob.n:
                self._room(ob.n)
                self.nout = put_descs(ob.meta, ob.n, a, to_disp[e_att], t_ns, self.out,
                                      self.nout)
                ob.n = 0

    def counters(self) -> dict:
        res = []
        for s in self.apps:
            e = s.engine
            res.append({"counters": e.counter_table(),
                        "errors": e.accounting_errors(),
                        "held": sum(st.held_slots() for st in e.states),
                        "attach_refs": s.first_refs})
        return {"apps": res, "worker": self.index, "generation": self.generation,
                "pid": os.getpid(),
                "free": self.pool.available, "owned": self.pool.owned}


def worker_entry(index: int, bus, apps, conn, kw: dict) -> None:
    """The child's body after fork: run until told to stop (or the parent dies)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the dispatcher decides when to stop
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        Worker(index, bus, apps, conn, **kw).run()
    except (EOFError, BrokenPipeError):
        pass  # the dispatcher went away
    except BaseException:
        traceback.print_exc()
        os._exit(70)
    os._exit(0)
