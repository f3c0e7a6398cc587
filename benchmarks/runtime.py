"""The multi-process runtime in memory: the bus alone, and a router chain end to end.

    python benchmarks/runtime.py [--runs 5] [--packets 2000000] [--cpu -1]
                                 [--out benchmarks/results/runtime.json]

Measured, each the median of ``--runs`` runs interleaved round-robin:

* ``bus`` -- slot ids per second dispatcher -> worker -> dispatcher over the shared
  rings alone: this process pushes descriptors in batches of 256 on a worker's rx
  ring, a forked echo process pops each batch and pushes it back on its tx ring, this
  process pops them again. No engine, no payload: the rings' own cost.
* ``inline`` -- the router chain in one process (``--workers 0``): fill a batch of
  256 frames in pool slots, the engine (parse, router: LPM, TTL, checksum, MACs),
  release what comes out. The peer of the two below.
* ``workers1`` / ``workers2`` -- the same frames through :class:`Runtime` with 1 or 2
  worker processes: the dispatcher fills, parses and buckets each batch
  (``steer_kernel``), pushes descriptors, workers run the router, the dispatcher
  collects what they send back and releases it (a sink port: no real I/O).

Each chain runs with 64-byte and 1514-byte frames. Only the first 64 bytes of a frame
are written per packet (the headers; the rest of the slot is left as it is), so a
bus that copied payload would show as a rate falling with the frame size. The bus
carries 64-byte descriptors (slot, start, length, appliance, attachment, bucket,
time, kind) and never a frame byte; the run also checks that every frame leaves in
the slot it was filled in (forwarded in place, never copied). Figures print as a
table and go to ``--out`` as JSON. On a 2-core machine the dispatcher and the
workers share the two cores (``--cpu`` pins this process, the dispatcher).
"""

from __future__ import annotations

import os

for _v in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_v, "1")

import argparse  # noqa: E402
import functools  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

HERE = Path(__file__).resolve().parent
BATCH = 256
SIZES = (64, 1514)

APPLIANCE = """
appliance: chain
devices:
  r1:
    type: router
    ports: {a: {ip: 10.1.0.1/24}, b: {ip: 10.2.0.1/24}}
    routes: [{prefix: 0.0.0.0/0, via: 10.2.0.254}]
attach:
  r1.a: {memory: a}
  r1.b: {memory: b}
"""
GW_MAC = "02:00:00:00:02:fe"


@functools.cache
def kernels():
    from dva._jit import kernel
    from dva.packet import layout as L
    from dva.packet.batch import new_row
    from dva.packet.checksum import ipv4_header_checksum, rd32, wr16, wr32
    from dva.packet.pool import pool_alloc
    from dva.packet.ring import ring_pop, ring_push

    @kernel
    def fill(data, free, top, meta, n, head, length, headroom, k0, seq_of):
        """Take ``n`` slots, write the 64-byte ``head`` into each (source port and
        destination varied per packet: many flows, many buckets; the packet's number
        in its payload, and in ``seq_of[slot]``), one row each. Returns the rows
        filled (fewer when the pool ran dry)."""
        for i in range(n):
            s = pool_alloc(free, top)
            if s < 0:
                return i
            buf = data[s]
            for k in range(16):
                wr32(buf, headroom + 4 * k, rd32(head, 4 * k))
            f = k0 + i
            wr16(buf, headroom + 16, length - 14)  # IPv4 total length
            wr16(buf, headroom + 38, length - 34)  # UDP length
            wr16(buf, headroom + 40, 0)  # no UDP checksum
            wr32(buf, headroom + 30, 0xC6336400 | (f & 255))  # 198.51.100.x
            wr16(buf, headroom + 34, 1024 + ((f >> 8) & 4095))
            wr16(buf, headroom + 24, 0)
            wr16(buf, headroom + 24, ipv4_header_checksum(buf[headroom:], 14))
            wr32(buf, headroom + 42, f)
            seq_of[s] = f
            new_row(meta, i, s, headroom, length, 0, 0, 0)
        return n

    @kernel
    def echo(rx, tx, desc):
        """The bus echo worker's loop body: pop a batch, push it back whole."""
        k = ring_pop(rx, desc, desc.shape[0])
        i = 0
        while i < k:
            i += ring_push(tx, desc, i, k - i)
        return k

    @kernel
    def moved(data, meta, n, seq_of):
        """Rows whose frame is not the one last filled into its slot (a copy)."""
        bad = 0
        for i in range(n):
            s = meta[i, L.SLOT]
            if rd32(data[s], meta[i, L.START] + 42) != (seq_of[s] & 0xFFFFFFFF):
                bad += 1
        return bad

    return fill, echo, moved


def head_bytes(app) -> bytes:
    from dva.packet.build import UDP, Eth, IPv4, Raw

    mac_a = app.devices["r1"].port_mac_str("a")
    f = bytes(Eth(src="02:00:00:00:01:02", dst=mac_a)
              / IPv4(src="10.1.0.2", dst="198.51.100.1", ttl=64)
              / UDP(sport=1024, dport=9) / Raw(bytes(64)))
    return f[:64]


def arp_from_gateway() -> bytes:
    """The gateway asks for the router's address: the router learns the gateway."""
    from dva.packet.build import ARP, Eth

    return bytes(Eth(src=GW_MAC, dst="ff:ff:ff:ff:ff:ff")
                 / ARP(op=1, hwsrc=GW_MAC, psrc="10.2.0.254", pdst="10.2.0.1"))


class Sink:
    """A port that counts what it is given and checks that each frame left in the
    slot it was filled in (in place: not copied on the way)."""

    def __init__(self, pool, seq_of) -> None:
        self.pool = pool
        self.seq_of = seq_of
        self.rx = self.tx = 0
        self.drops: dict[str, int] = {}
        self.moved = 0

    def send(self, b) -> None:
        self.tx += b.n
        self.moved += kernels()[2](self.pool.data, b.meta, b.n, self.seq_of)

    def close(self) -> None:
        pass


def bus_run(packets: int) -> float:
    """Descriptors per second through one rx and one tx ring and back."""
    import multiprocessing as mp

    import numpy as np

    from dva.packet.ring import DESC_WORDS, ring_pop, ring_push
    from dva.worker.bus import Bus

    _, echo, _ = kernels()
    bus = Bus(max_workers=1, dispatcher_slots=BATCH * 16, worker_slots=16)
    rx, tx = bus.rx[0], bus.tx[0]
    d = np.zeros((BATCH, DESC_WORDS), np.int64)
    d[:, 1] = np.arange(BATCH)
    back = np.zeros((BATCH, DESC_WORDS), np.int64)
    echo(rx, tx, back)  # compiled before the fork
    stop = bus.load[0]

    def child():
        desc = np.zeros((BATCH, DESC_WORDS), np.int64)
        while stop[0] == 0:  # spins: the rings' cost, not a scheduler's
            echo(rx, tx, desc)
        os._exit(0)

    p = mp.get_context("fork").Process(target=child, daemon=True)
    p.start()
    got = sent = 0
    t0 = time.perf_counter()
    while got < packets:
        if sent - got <= 8 * BATCH:
            sent += ring_push(rx, d, 0, BATCH)
        got += ring_pop(tx, back, BATCH)
    dt = time.perf_counter() - t0
    assert (back[:, 1] < BATCH).all()
    stop[0] = 1
    p.join(5)
    return got / dt


class Chain:
    """The router chain inline (``workers == 0``) or through a runtime."""

    def __init__(self, workers: int, size: int) -> None:
        import numpy as np

        from dva.dispatch.runtime import Runtime
        from dva.graph.appliance import parse_appliance
        from dva.graph.plan import compile_plan
        from dva.packet.batch import PacketBatch
        from dva.packet.pool import PacketPool
        from dva.ports.offline import MemoryPort
        from dva.worker.engine import Engine

        self.fill = kernels()[0]
        self.workers = workers
        self.size = size
        app = parse_appliance(APPLIANCE)
        self.head = np.frombuffer(head_bytes(app), np.uint8).copy()
        arp = arp_from_gateway()
        self.rt = None
        if workers == 0:
            self.pool = PacketPool(8 * BATCH)
            self.seq_of = np.zeros(self.pool.nslots, np.int64)
            self.engine = Engine(compile_plan(app), self.pool)
            self.engine.warm()
            b = PacketBatch(self.pool, 1)
            b.add_frame(arp)
            for o in self.engine.process(1, b, 0.0):
                o.release_all()
        else:
            mem = {"a": MemoryPort("r1.a"), "b": MemoryPort("r1.b", [(0.0, arp)])}
            self.rt = rt = Runtime([app], workers=workers, live=False, memory=mem,
                                   dispatcher_slots=64 * BATCH)
            b = PacketBatch(rt.pool, 1)
            b.add_frame(arp)
            rt._steer(0, 1, b, 0, wait=True)  # the gateway asks: the router learns it
            rt.sync()
            rt.replicate(0.0, wait=True)  # every worker's ARP cache has it
            rt.sync()
            self.pool = rt.pool
            self.seq_of = np.zeros(rt.bus.nslots, np.int64)
            self.sinks = [Sink(self.pool, self.seq_of), Sink(self.pool, self.seq_of)]
            rt.ports = self.sinks
            rt.live = True  # outputs go to the sinks as batches
        self.batch = PacketBatch(self.pool, BATCH)
        self.k = 0

    def run(self, packets: int) -> float:
        b, pool, rt = self.batch, self.pool, self.rt
        done = 0
        t0 = time.perf_counter()
        if rt is None:
            out = 0
            while done < packets:
                b.n = self.fill(pool.data, pool.free, pool.top, b.meta, BATCH, self.head,
                                self.size, pool.headroom, self.k, self.seq_of)
                self.k += b.n
                done += b.n
                for o in self.engine.process(0, b, 0.0):
                    out += o.n
                    o.release_all()
            assert out == done, (out, done)
            return done / (time.perf_counter() - t0)
        before = self.sinks[1].tx
        while done < packets:
            n = self.fill(pool.data, pool.free, pool.top, b.meta, BATCH, self.head,
                          self.size, pool.headroom, self.k, self.seq_of)
            if n < BATCH:  # the pool is out on the rings: take back what came home
                b.n = n
                b.release_all()
                rt._collect_all()
                continue
            b.n = n
            self.k += n
            done += n
            rt._steer(0, 0, b, 0, wait=True)
            rt._collect_all()
        rt.sync()
        dt = time.perf_counter() - t0
        out = self.sinks[1].tx - before
        assert out == done, (out, done, rt.counters())
        assert self.sinks[1].moved == 0, "a frame left in a slot it was not filled in"
        return done / dt

    def close(self) -> dict | None:
        if self.rt is None:
            return None
        c = self.rt.stop()
        self.rt.close()
        return c


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--packets", type=int, default=2_000_000, help="packets per run")
    ap.add_argument("--out", default=str(HERE / "results" / "runtime.json"))
    ap.add_argument("--cpu", type=int, default=-1,
                    help="pin the dispatcher to this CPU (-1: do not pin)")
    a = ap.parse_args()
    sys.path.insert(0, str(HERE.parent / "src"))
    if a.cpu >= 0:
        os.sched_setaffinity(0, {a.cpu})

    chains = {f"{name}/{size}": Chain(w, size)
              for name, w in (("inline", 0), ("workers1", 1), ("workers2", 2))
              for size in SIZES}
    runs: dict[str, list[float]] = {"bus": [], **{k: [] for k in chains}}
    try:
        for c in chains.values():  # warm-up pass, not counted
            c.run(20 * BATCH)
        bus_run(100_000)
        for r in range(a.runs):
            runs["bus"].append(bus_run(a.packets * 5))
            for k, c in chains.items():
                runs[k].append(c.run(a.packets))
            print(f"run {r + 1}/{a.runs}: " + ", ".join(
                f"{k} {v[-1] / 1e6:.2f}" for k, v in runs.items()), flush=True)
    finally:
        finals = {k: c.close() for k, c in chains.items()}
    for k, f in finals.items():
        if f is not None:
            bad = {n: v for n, v in f.items() if "drop/" in n and v}
            assert not bad, (k, bad)
    med = {k: statistics.median(v) for k, v in runs.items()}
    print(f"\n{'path':16} {'Mpps (median)':>14} {'min-max':>14} {'vs inline':>10}")
    rows = {}
    for k, v in runs.items():
        size = k.split("/")[-1]
        peer = med.get(f"inline/{size}") if k != "bus" else None
        ratio = med[k] / peer if peer else None
        print(f"{k:16} {med[k] / 1e6:14.2f} {min(v) / 1e6:6.2f}-{max(v) / 1e6:<6.2f} "
              f"{'' if ratio is None else f'{ratio:9.2f}x':>10}")
        rows[k] = {"median_mpps": med[k] / 1e6, "runs_mpps": [x / 1e6 for x in v],
                   "vs_inline": ratio}
    for name in ("workers1", "workers2"):
        big, small = med[f"{name}/1514"], med[f"{name}/64"]
        print(f"{name}: 1514-byte frames at {big / small:.2f}x the 64-byte rate "
              "(the bus moves descriptors, never payload)")
    meta = {"command": "python benchmarks/runtime.py " + " ".join(sys.argv[1:]),
            "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "machine": f"{platform.machine()} {os.cpu_count()} cpus, "
                       f"{platform.python_version()}",
            "runs": a.runs, "packets_per_run": a.packets, "bus_packets_per_run":
            a.packets * 5, "descriptor_bytes": 64, "payload_copied_by_bus": False}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps({"meta": meta, "results": rows}, indent=2) + "\n")
    print(f"written to {a.out}")


if __name__ == "__main__":
    main()
