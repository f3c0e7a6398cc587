"""Offline runs: feed an appliance from memory/pcap ports, in capture-time order.

All input ports are merged by timestamp. Consecutive frames of one port form a batch
(up to ``batch_size``) as long as they fall within ``window`` seconds of the batch's
first frame and no other port has an earlier frame; the batch runs with
``now`` = its first frame's time, and what it sends is stamped with that time.

Frames that cannot enter the data plane are counted per attachment and reason
(``INGRESS_DROPS``), never dropped silently.

Persisted state (:mod:`dva.worker.persist`) is loaded and saved only when a
``state_dir`` is given (``dva run --state-dir``): loaded before the first batch, saved
when ``run`` ends. The device clock offline is capture time, taken as wall time
(clock offset 0).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from dva.graph.appliance import Appliance
from dva.graph.plan import Plan, compile_plan
from dva.packet.batch import PacketBatch
from dva.packet.pool import PacketPool
from dva.ports.offline import MemoryPort, OfflinePort, PcapPort, PortError
from dva.worker.engine import DEFAULT_HOP_LIMIT, Engine
from dva.worker.persist import Persistence

INGRESS_DROPS = ("too_long", "pool_exhausted")


@dataclass
class RunResult:
    counters: dict[str, int]
    accounting_errors: list[str] = field(default_factory=list)
    batches: int = 0


def _needs_live(att) -> PortError:
    return PortError(f"{att.ref}: {att.spec.kind} attachments need live ports, which an "
                     f"offline run does not open (use memory or pcap)")


class OfflineRunner:
    """Owns the pool, the engine and the offline ports of one appliance."""

    def __init__(self, app: Appliance, *, batch_size: int = 256, window: float = 1e-3,
                 hop_limit: int = DEFAULT_HOP_LIMIT, nbuckets: int = 4096,
                 pool_slots: int = 16384, memory: dict[str, MemoryPort] | None = None,
                 open_files: bool = True, state_dir: str | None = None,
                 say=None, fuse: bool = True) -> None:
        if batch_size <= 0:
            raise ValueError("batch size must be positive")
        self.app = app
        self.plan: Plan = compile_plan(app)
        self.pool = PacketPool(pool_slots)
        self.engine = Engine(self.plan, self.pool, nbuckets=nbuckets, hop_limit=hop_limit,
                             fuse=fuse)
        self.batch_size = batch_size
        self.window = window
        self.ingress_drops = np.zeros((len(self.plan.attachments), len(INGRESS_DROPS)),
                                      np.int64)
        self.memory = dict(memory or {})
        self.ports: list[OfflinePort] = []
        if open_files:
            self._check_inputs()
        try:
            for att in self.plan.attachments:
                self.ports.append(self._open(att, open_files))
        except BaseException:
            self.close()
            raise
        self.batch = PacketBatch(self.pool, batch_size)
        self.batches = 0
        self.last_time: float | None = None
        self.persist: Persistence | None = None
        if state_dir is not None and Persistence.wanted(self.plan):
            self.persist = Persistence(state_dir, app.tenant, app.name, say=say)
            self.persist.load(self.engine, None, 0.0)

    def _check_inputs(self) -> None:
        """Fail before any output file is created (and emptied)."""
        for att in self.plan.attachments:
            spec = att.spec
            if spec.kind == "pcap" and spec.pcap.read:
                path = self.app.resolve(spec.pcap.read)
                if not path.is_file():
                    raise PortError(f"{att.ref}: pcap input {path} does not exist")
            elif spec.kind in ("af_packet", "tap"):
                raise _needs_live(att)

    def _open(self, att, open_files: bool) -> OfflinePort:
        spec = att.spec
        if spec.kind == "memory":
            port = self.memory.get(spec.memory)
            if port is None:
                port = self.memory[spec.memory] = MemoryPort(att.ref)
            return port
        if not open_files:
            return OfflinePort(att.ref)  # neither reads nor writes (dva trace)
        if spec.kind == "pcap":
            r = self.app.resolve(spec.pcap.read) if spec.pcap.read else None
            w = self.app.resolve(spec.pcap.write) if spec.pcap.write else None
            return PcapPort(att.ref, r, w)
        raise _needs_live(att)

    def close(self) -> None:
        for p in self.ports:
            p.close()
        if getattr(self, "persist", None) is not None:
            self.persist.close()

    def __enter__(self) -> OfflineRunner:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def run(self) -> RunResult:
        """Run until every input is consumed (then save persisted state, if asked)."""
        while self.step():
            pass
        if self.persist is not None and self.last_time is not None:
            self.persist.maybe_save(self.engine, self.last_time, 0.0, force=True)
        return self.result()

    def step(self) -> bool:
        """Run one batch; False when no input is left."""
        best, t0 = -1, None
        for i, p in enumerate(self.ports):
            t = p.peek()
            if t is not None and (t0 is None or t < t0):
                best, t0 = i, t
        if best < 0:
            return False
        others = [p.peek() for j, p in enumerate(self.ports) if j != best]
        limit = min([t for t in others if t is not None], default=None)
        port = self.ports[best]
        b = self.batch
        b.clear()
        while b.n < self.batch_size:
            t = port.peek()
            if t is None or t > t0 + self.window or (limit is not None and t > limit):
                break
            _, frame = port.take()
            if len(frame) > self.pool.max_frame:
                self.ingress_drops[best, 0] += 1
            elif self.pool.available == 0:
                self.ingress_drops[best, 1] += 1
            else:
                b.add_frame(frame, origin=best)
        self.batches += 1
        self.last_time = t0
        if b.n:
            self.deliver(self.engine.process(best, b, t0), t0)
        return True

    def deliver(self, outputs: list[PacketBatch], now: float) -> None:
        for port, out in zip(self.ports, outputs):
            if out.n:
                port.send(now, out.frames())
                out.release_all()

    def result(self) -> RunResult:
        c = self.engine.counter_table()
        for a, att in enumerate(self.plan.attachments):
            for r, name in enumerate(INGRESS_DROPS):
                c[f"attach {att.ref} drop/{name}"] = int(self.ingress_drops[a, r])
        errs = self.engine.accounting_errors()
        if self.pool.available != self.pool.nslots - self.held_slots():
            errs.append(f"packet pool: {self.pool.nslots - self.pool.available} slots in "
                        f"use, {self.held_slots()} held by devices")
        return RunResult(c, errs, self.batches)

    def held_slots(self) -> int:
        """Slots devices keep right now (not HOLD verdicts ever given: held packets
        leave again)."""
        return sum(st.held_slots() for st in self.engine.states)
