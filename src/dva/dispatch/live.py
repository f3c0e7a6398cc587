"""Live runs: an appliance on real interfaces (af_packet, tap) until told to stop.

One process, the graph inline (``--workers 0`` of the later runtime): poll every
port; from each readable port take up to ``batch_size`` frames, run them through the
engine and transmit what comes out; every ``TICK`` seconds let devices act on time
alone (ARP retries, held packets). ``now`` is the monotonic clock.

Stops when ``stop()`` is called (the CLI calls it on SIGINT/SIGTERM) or after
``duration`` seconds; counters stay readable afterwards. Losses at the ports are
counted per attachment and reason (``attach X drop/REASON``).

Reload (``request_reload()``; the CLI calls it on SIGHUP): a background thread
reads the appliance file again, validates it whole and builds the new generation
(:func:`dva.worker.reload.prepare`, which also compiles kernels a new device type
needs), while the loop goes on forwarding with the running one. Invalid, or
attachments that differ from the running ones: rejected with one line per problem,
the running generation stays. Valid: the old engine keeps forwarding until no device
holds a packet or ``HOLD_DRAIN`` (1 s) passed, then :func:`dva.worker.reload.swap`
moves flow state, shared state and counters over between two batches, and the new
engine takes the next batch. ``generation`` starts at 1 and counts successful
reloads; a SIGHUP during a reload starts another one after it.

Persisted state (``state_dir``; :mod:`dva.worker.persist`): devices that keep state
across restarts (DHCP leases) are loaded from ``state_dir/<tenant>/<appliance>/`` when
the runner starts, saved on ticks after their state changed (at most every
``SAVE_INTERVAL``) and when ``run`` ends. The files store wall-clock expiry (the
offset between ``time.time()`` and the monotonic ``now``), so a restart, even after a
reboot, keeps each lease's remaining time.
"""

from __future__ import annotations

import select
import threading
import time
from collections.abc import Callable

from dva.graph.appliance import Appliance, ApplianceError, load_appliance
from dva.graph.plan import compile_plan
from dva.packet.batch import PacketBatch
from dva.packet.pool import PacketPool
from dva.ports.offline import PortError
from dva.worker.engine import DEFAULT_HOP_LIMIT, Engine
from dva.worker.persist import Persistence, live_offset
from dva.worker.reload import (
    HOLD_DRAIN,
    ReloadRejected,
    attachment_order,
    held_packets,
    prepare,
    swap,
)

TICK = 0.1
LIVE_KINDS = ("af_packet", "tap")
PUMP_ROUNDS = 512  # receive calls per port per wake-up at most (fairness bound)
IDLE_ROUNDS = 200  # empty rounds (1 ms polls) before polling at TICK/2
# A ring block is handed over when full or after 1 ms (low latency); at low rates a
# block then holds a millisecond of traffic, so the block count is what buffers a
# stall of the process: 512 blocks of 64 KiB (32 MiB) ride out about half a second.
AF_PACKET_RING = {"frame_timeout_ms": 1, "block_size": 1 << 16, "block_count": 512}


def check_live_attachments(app: Appliance) -> None:
    """A live run attaches only interfaces: PortError naming the others."""
    others = [a.ref for a in app.attachments if a.spec.kind not in LIVE_KINDS]
    if others:
        raise PortError(f"a live run attaches only interfaces (af_packet, tap); "
                        f"{', '.join(others)} {'is' if len(others) == 1 else 'are'} not")


class LiveRunner:
    def __init__(self, app: Appliance, *, batch_size: int = 256,
                 hop_limit: int = DEFAULT_HOP_LIMIT, nbuckets: int = 4096,
                 pool_slots: int = 32768, say: Callable[[str], None] | None = None,
                 state_dir: str | None = None) -> None:
        from dva.ports.live import open_live

        check_live_attachments(app)
        self.app = app
        self.plan = compile_plan(app)
        self.pool = PacketPool(pool_slots)
        self.engine = Engine(self.plan, self.pool, nbuckets=nbuckets, hop_limit=hop_limit)
        self.batch_size = batch_size
        self.batch = PacketBatch(self.pool, batch_size)
        self.ports = []
        self.say = say  # reload and state messages, one line each (also in ``messages``)
        self.messages: list[str] = []
        self.persist: Persistence | None = None
        try:
            for att in self.plan.attachments:
                kw = AF_PACKET_RING if att.spec.kind == "af_packet" else {}
                self.ports.append(open_live(att.ref, att.spec.kind, att.spec.target, **kw))
            self._warm()
            if state_dir is not None and Persistence.wanted(self.plan):
                self.persist = Persistence(state_dir, app.tenant, app.name, say=self._tell)
                self.persist.load(self.engine, time.monotonic(), live_offset())
        except BaseException:
            self.close()
            raise
        self._stop = False
        self.started = time.monotonic()
        self.generation = 1
        self.reloads_rejected = 0
        self._reload_requested = False
        self._job: threading.Thread | None = None  # building the next generation
        self._built: tuple[Appliance, Engine] | ReloadRejected | None = None  # the job's
        self._pending: tuple[Appliance, Engine, float] | None = None  # (app, engine, deadline)

    def _warm(self) -> None:
        """Compile every kernel traffic will use before any frame arrives: the ports'
        rings, and the graph's kernels through a throwaway engine on the same plan (its
        own pool and state, so the real appliance learns nothing from it)."""
        for p in self.ports:
            p.warm(self.batch)
        Engine(self.plan, PacketPool(256), hop_limit=self.engine.hop_limit).warm()

    def stop(self) -> None:
        self._stop = True

    def request_reload(self) -> None:
        """Re-read the appliance file at the next wake-up (safe in a signal handler)."""
        self._reload_requested = True

    def close(self) -> None:
        for p in self.ports:
            p.close()
        if self.persist is not None:
            self.persist.close()

    def __enter__(self) -> LiveRunner:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def run(self, duration: float | None = None,
            every_second: Callable[[LiveRunner], None] | None = None) -> None:
        try:
            self._run(duration, every_second)
        finally:
            self.save_state(force=True)

    def save_state(self, force: bool = False) -> None:
        """Save persisted device state that changed (rate-limited unless ``force``)."""
        if self.persist is not None:
            self.persist.maybe_save(self.engine, time.monotonic(), live_offset(), force)

    def _run(self, duration: float | None,
             every_second: Callable[[LiveRunner], None] | None) -> None:
        poller = select.poll()
        for p in self.ports:
            poller.register(p.fileno(), select.POLLIN)
        end = None if duration is None else time.monotonic() + duration
        next_tick = time.monotonic()
        next_second = next_tick + 1.0
        idle = 0
        while not self._stop:
            now = time.monotonic()
            if end is not None and now >= end:
                break
            # poll() on a TPACKET_V3 ring reports only some retired blocks (measured:
            # 4 wake-ups in a second at 150k frames/s, the ring overflowing between
            # them), so every port is tried after every wake-up or timeout; the
            # timeout is short while traffic flows (or a reload waits for held
            # packets) and backs off when idle.
            poller.poll(1 if idle < IDLE_ROUNDS or self._pending else int(TICK * 500))
            moved = 0
            for a in range(len(self.ports)):
                moved += self._pump(a)
            idle = 0 if moved else idle + 1
            now = time.monotonic()
            if now >= next_tick:
                self._deliver(self.engine.tick(now))
                next_tick = now + TICK
                self.save_state()
            if self._reload_requested and self._job is None and self._pending is None:
                self._reload_requested = False
                self._job = threading.Thread(target=self._build, args=(self.app.source,),
                                             name="dva-reload", daemon=True)
                self._job.start()
            if self._job is not None and not self._job.is_alive():
                self._job = None
                self._built_done()
            if self._pending is not None and (held_packets(self.engine) == 0
                                              or time.monotonic() >= self._pending[2]):
                self._finish_reload(time.monotonic())
            if now >= next_second:
                self.read_kernel_drops()
                if every_second is not None:
                    every_second(self)
                next_second = now + 1.0
        if self._pending is not None or self._job is not None:
            self._pending = self._job = None
            self._tell(f"reload of {self.app.source} abandoned: stopped before the swap; "
                       f"generation {self.generation} ran to the end")
        self.read_kernel_drops()

    # -- reload ----------------------------------------------------------------------
    def _tell(self, line: str) -> None:
        self.messages.append(line)
        if self.say is not None:
            self.say(line)

    def _build(self, src: str) -> None:
        """(The reload thread.) Load, validate and build the new generation; it only
        reads the running engine (pool, plan, settings), never changes it."""
        try:
            app = load_appliance(src)
            self._built = (app, prepare(app, self.engine))
        except ApplianceError as e:
            n = len(e.issues)
            self._built = ReloadRejected(f"invalid appliance ({n} problem"
                                         f"{'s' if n != 1 else ''})",
                                         e.render().splitlines()[1:])
        except ReloadRejected as e:
            self._built = ReloadRejected(e.reason, [f"  {p}" for p in e.problems])
        except Exception as e:  # a config the checks missed must not stop the appliance
            self._built = ReloadRejected(f"{type(e).__name__}: {e}")

    def _built_done(self) -> None:
        built, self._built = self._built, None
        if isinstance(built, ReloadRejected):
            self.reloads_rejected += 1
            self._tell(f"reload of {self.app.source} rejected: {built.reason}; generation "
                       f"{self.generation} keeps running")
            for p in built.problems:
                self._tell(p)
        elif built is not None:
            self._pending = (*built, time.monotonic() + HOLD_DRAIN)

    def _finish_reload(self, now: float) -> None:
        """Swap engines between two batches (state, held packets, counters)."""
        app, engine, _ = self._pending
        self._pending = None
        old = self.engine
        try:
            report = swap(old, engine, now)
        except Exception as e:  # a bug in a device's export/import: keep running
            self._deliver(old.outputs)  # whatever a release of held packets sent
            self.reloads_rejected += 1
            self._tell(f"reload of {app.source} rejected: the swap failed ({type(e).__name__}: "
                       f"{e}); generation {self.generation} keeps running")
            return
        self._deliver(report.outputs)  # the old generation's last frames, old port order
        self.ports = [self.ports[i] for i in attachment_order(old.plan, engine.plan)]
        self.engine, self.plan, self.app = engine, engine.plan, app
        self.generation += 1
        for p in report.problems:
            self._tell(f"reload of {app.source}: {p}")
        summary = report.summary()
        self._tell(f"reloaded {app.source}: generation {self.generation}"
                   + (f" ({summary})" if summary else ""))

    def read_kernel_drops(self) -> None:
        """Fold what the kernel dropped before our rings (ring full) into the ports'
        ``kernel_drops`` counters: nothing is lost uncounted."""
        for p in self.ports:
            try:
                p.kernel_stats()
            except PortError:
                pass  # a port that is gone reports that from recv/send

    def _pump(self, a: int) -> int:
        """Move frames from port ``a`` through the graph until it has no more
        (bounded by PUMP_ROUNDS, so one busy port cannot starve the others)."""
        port = self.ports[a]
        b = self.batch
        moved = 0
        # A receive call ends at a ring block; at low rates a block (retired every
        # ms) holds a few frames only, so drain the whole ring, not a few calls' worth.
        for _ in range(PUMP_ROUNDS):
            b.clear()
            n = port.recv(b, self.batch_size)
            if n == 0:
                break
            moved += n
            self._deliver(self.engine.process(a, b, time.monotonic()))
        return moved

    def _deliver(self, outputs: list[PacketBatch]) -> None:
        for port, out in zip(self.ports, outputs):
            if out.n:
                port.send(out)
                out.release_all()

    def counters(self) -> dict[str, int]:
        c = self.engine.counter_table()
        for att, p in zip(self.plan.attachments, self.ports):
            c[f"port {att.ref} rx"] = p.rx
            c[f"port {att.ref} tx"] = p.tx
            for name, v in p.drops.items():
                c[f"attach {att.ref} drop/{name}"] = v
        c["config generation"] = self.generation
        c["config reloads_rejected"] = self.reloads_rejected
        return c
