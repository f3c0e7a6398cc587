"""Live runs: an appliance on real interfaces (af_packet, tap) until told to stop.

One process, the graph inline (``--workers 0`` of the later runtime): poll every
port; from each readable port take up to ``batch_size`` frames, run them through the
engine and transmit what comes out; every ``TICK`` seconds let devices act on time
alone (ARP retries, held packets). ``now`` is the monotonic clock.

Stops when ``stop()`` is called (the CLI calls it on SIGINT/SIGTERM) or after
``duration`` seconds; counters stay readable afterwards. Losses at the ports are
counted per attachment and reason (``attach X drop/REASON``).
"""

from __future__ import annotations

import select
import time
from collections.abc import Callable

from dva.graph.appliance import Appliance
from dva.graph.plan import compile_plan
from dva.packet.batch import PacketBatch
from dva.packet.pool import PacketPool
from dva.ports.offline import PortError
from dva.worker.engine import DEFAULT_HOP_LIMIT, Engine

TICK = 0.1
LIVE_KINDS = ("af_packet", "tap")
PUMP_ROUNDS = 512  # receive calls per port per wake-up at most (fairness bound)
IDLE_ROUNDS = 200  # empty rounds (1 ms polls) before polling at TICK/2
# A ring block is handed over when full or after 1 ms (low latency); at low rates a
# block then holds a millisecond of traffic, so the block count is what buffers a
# stall of the process: 512 blocks of 64 KiB (32 MiB) ride out about half a second.
AF_PACKET_RING = {"frame_timeout_ms": 1, "block_size": 1 << 16, "block_count": 512}


class LiveRunner:
    def __init__(self, app: Appliance, *, batch_size: int = 256,
                 hop_limit: int = DEFAULT_HOP_LIMIT, nbuckets: int = 4096,
                 pool_slots: int = 32768) -> None:
        from dva.ports.live import open_live

        others = [a.ref for a in app.attachments if a.spec.kind not in LIVE_KINDS]
        if others:
            raise PortError(f"a live run attaches only interfaces (af_packet, tap); "
                            f"{', '.join(others)} {'is' if len(others) == 1 else 'are'} "
                            f"not")
        self.app = app
        self.plan = compile_plan(app)
        self.pool = PacketPool(pool_slots)
        self.engine = Engine(self.plan, self.pool, nbuckets=nbuckets, hop_limit=hop_limit)
        self.batch_size = batch_size
        self.batch = PacketBatch(self.pool, batch_size)
        self.ports = []
        try:
            for att in self.plan.attachments:
                kw = AF_PACKET_RING if att.spec.kind == "af_packet" else {}
                self.ports.append(open_live(att.ref, att.spec.kind, att.spec.target, **kw))
            self._warm()
        except BaseException:
            self.close()
            raise
        self._stop = False
        self.started = time.monotonic()

    def _warm(self) -> None:
        """Compile every kernel traffic will use before any frame arrives: the ports'
        rings, and the graph's kernels through a throwaway engine on the same plan (its
        own pool and state, so the real appliance learns nothing from it)."""
        for p in self.ports:
            p.warm(self.batch)
        Engine(self.plan, PacketPool(256), hop_limit=self.engine.hop_limit).warm()

    def stop(self) -> None:
        self._stop = True

    def close(self) -> None:
        for p in self.ports:
            p.close()

    def __enter__(self) -> LiveRunner:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def run(self, duration: float | None = None,
            every_second: Callable[[LiveRunner], None] | None = None) -> None:
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
            # timeout is short while traffic flows and backs off when idle.
            poller.poll(1 if idle < IDLE_ROUNDS else int(TICK * 500))
            moved = 0
            for a in range(len(self.ports)):
                moved += self._pump(a)
            idle = 0 if moved else idle + 1
            now = time.monotonic()
            if now >= next_tick:
                self._deliver(self.engine.tick(now))
                next_tick = now + TICK
            if now >= next_second:
                self.read_kernel_drops()
                if every_second is not None:
                    every_second(self)
                next_second = now + 1.0
        self.read_kernel_drops()

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
        return c
