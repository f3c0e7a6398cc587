"""Bucket moves between workers: how long a move holds its buckets, with N flows.

    python benchmarks/migration.py [--flows 1000,100000,1000000] [--runs 3]
                                   [--rate 200000] [--out benchmarks/results/migration.json]

For each flow count: a runtime with 2 workers runs a firewall + NAT (source NAT over
63 addresses); the flows (UDP, 64-byte frames) are opened through it, half on each
worker. Then, while a generator keeps offering ``--rate`` packets per second of those
flows through the dispatcher (so packets of moving buckets arrive and are held),
each run measures

* ``one`` -- moving one bucket (about flows / 4096 flows) from worker 0 to worker 1;
* ``half`` -- moving every bucket of worker 0 to worker 1 (half the flows);
* ``all`` -- moving all 4096 buckets (every flow) from worker 1 back to worker 0;

as the hold time (from the buckets being held to the table flipping: drain, export,
import, release of the held packets), the flow entries moved (firewall and NAT
conntrack entries) and the packets held. Medians of ``--runs`` runs; the per-run
figures go to ``--out`` (JSON). Every packet offered must come out (checked at the
end: nothing lost in the moves).
"""

from __future__ import annotations

import os

for _v in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_v, "1")

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))
BATCH = 256


def appliance(flows: int) -> str:
    return f"""
appliance: bench
devices:
  fw:
    type: firewall
    ports: [inside, outside]
    rules: [{{action: allow, from: inside}}]
    max_flows: {flows + 1024}
    timeouts: {{udp: 3600}}
  nat:
    type: nat
    ports: [inside, outside]
    snat: {{to: 198.51.100.2-198.51.100.64}}
    max_flows: {flows + 1024}
    timeouts: {{udp: 3600}}
links: [[fw.outside, nat.inside]]
attach:
  fw.inside: {{memory: in}}
  nat.outside: {{memory: out}}
"""


def fill_kernel():
    from dva._jit import kernel
    from dva.packet.batch import new_row
    from dva.packet.checksum import ipv4_header_checksum, rd32, wr16, wr32
    from dva.packet.pool import pool_alloc

    @kernel
    def fill(data, free, top, meta, n, head, headroom, ids, k0):
        """``n`` frames of flows ``ids[k0 ...]`` (source 10.a.b.c port 1024 + low bits,
        to 192.0.2.9:53) in fresh slots; returns how many (fewer: pool empty)."""
        for i in range(n):
            s = pool_alloc(free, top)
            if s < 0:
                return i
            buf = data[s]
            for k in range(16):
                wr32(buf, headroom + 4 * k, rd32(head, 4 * k))
            f = ids[(k0 + i) % ids.shape[0]]
            wr32(buf, headroom + 26, 0x0A000000 | (f >> 4))
            wr16(buf, headroom + 34, 1024 + (f & 15))
            wr16(buf, headroom + 24, 0)
            wr16(buf, headroom + 24, ipv4_header_checksum(buf[headroom:], 14))
            new_row(meta, i, s, headroom, 60, 0, 0, 0)
        return n
    return fill


class Generator:
    """The inside port: offers packets of random known flows at ``rate`` per second
    whenever the dispatcher reads it (during moves too)."""

    def __init__(self, pool, head, flows: int, rate: float) -> None:
        import numpy as np

        self.pool, self.head, self.rate = pool, head, rate
        self.ids = np.random.default_rng(5).permutation(flows).astype(np.int64)
        self.fill = fill_kernel()
        self.t0 = time.monotonic()
        self.offered = 0
        self.rx = self.tx = 0
        self.drops: dict[str, int] = {}
        self.on = False

    def recv(self, b, n: int) -> int:
        if not self.on:
            return 0
        due = int((time.monotonic() - self.t0) * self.rate) - self.offered
        k = min(n, max(due, 0))
        if k == 0:
            return 0
        got = self.fill(self.pool.data, self.pool.free, self.pool.top, b.meta, k, self.head,
                        self.pool.headroom, self.ids, self.offered)
        b.n = got
        self.offered += got
        self.rx += got
        return got

    def send(self, b) -> None:
        self.tx += b.n

    def backlog(self) -> int:
        """Packets due that the dispatcher has not read yet."""
        return int((time.monotonic() - self.t0) * self.rate) - self.offered

    def start(self) -> None:
        self.t0 = time.monotonic()
        self.offered = 0
        self.on = True


class Sink:
    def __init__(self) -> None:
        self.rx = self.tx = 0
        self.drops: dict[str, int] = {}

    def send(self, b) -> None:
        self.tx += b.n

    def recv(self, b, n: int) -> int:
        return 0


def measure(flows: int, runs: int, rate: float) -> dict:
    import numpy as np

    from dva.dispatch.runtime import Runtime
    from dva.graph.appliance import parse_appliance
    from dva.packet.batch import PacketBatch
    from dva.packet.build import UDP, Eth, IPv4
    from dva.ports.offline import MemoryPort

    app = parse_appliance(appliance(flows))
    mem = {"in": MemoryPort("fw.inside"), "out": MemoryPort("nat.outside")}
    rt = Runtime([app], workers=2, live=False, memory=mem)
    try:
        head = np.frombuffer(bytes(Eth(src="02:00:00:00:00:05", dst="02:00:00:00:00:01")
                                   / IPv4(src="10.0.0.1", dst="192.0.2.9")
                                   / UDP(sport=1, dport=53, chksum=0) / bytes(18))[:64],
                             np.uint8).copy()
        gen, sink = Generator(rt.pool, head, flows, rate), Sink()
        rt.ports = [gen, sink]
        rt.live = True  # outputs go to the sink as batches; moves pump the generator
        fill = fill_kernel()
        ids = np.arange(flows, dtype=np.int64)
        b = PacketBatch(rt.pool, BATCH)
        t0 = time.perf_counter()
        k = 0
        while k < flows:  # open every flow once
            n = fill(rt.pool.data, rt.pool.free, rt.pool.top, b.meta, min(BATCH, flows - k),
                     head, rt.pool.headroom, ids, k)
            if n == 0:
                rt._collect_all()
                continue
            b.n = n
            k += n
            rt._steer(0, 0, b, time.monotonic_ns(), wait=True)
            rt._collect_all()
        rt.sync()
        opened = time.perf_counter() - t0
        c = rt.counters()
        assert c["fw flows_created"] == flows and c["nat flows_created"] == flows, c
        for _ in range(2):  # warm-up: the export/import code's first use
            rt.move(np.flatnonzero(rt.table == 0)[:8], 1)
            rt.move(np.flatnonzero(rt.table == 1)[:8], 0)
        def settle() -> None:
            """Between moves the dispatcher reads its ports as a live one does, until
            it has caught up with the generator: each move starts in the steady state
            (not with seconds of offered packets waiting, all of which it would hold)."""
            while gen.backlog() > BATCH:
                rt._pump(0)
                rt._collect_all()

        gen.start()
        res = {"one": [], "half": [], "all": []}
        for _ in range(runs):
            b0 = int(np.flatnonzero(rt.table == 0)[0])
            settle()
            res["one"].append(rt.move([b0], 1))
            settle()
            res["half"].append(rt.move(np.flatnonzero(rt.table == 0), 1))
            settle()
            res["all"].append(rt.move(np.arange(rt.nbuckets), 0))
            settle()
            rt.move(np.arange(rt.nbuckets)[1::2], 1)  # back to half and half
        gen.on = False
        rt.sync()
        c = rt.counters()
        out = sink.tx
        lost = gen.offered + flows - out
        assert lost == 0, (gen.offered, flows, out, {k: v for k, v in c.items() if "drop/" in k and v})
        assert c["fw flows_created"] == flows  # the moved flows were found, not re-made
    finally:
        rt.stop()
        rt.close()
    summary = {}
    for kind, rs in res.items():
        summary[kind] = {"median_ms": statistics.median(r["ms"] for r in rs),
                         "max_ms": max(r["ms"] for r in rs),
                         "flows": statistics.median(r["flows"] for r in rs),
                         "held_median": statistics.median(r["held"] for r in rs),
                         "out_ms": statistics.median(r["out_ms"] for r in rs),
                         "in_ms": statistics.median(r["in_ms"] for r in rs),
                         "release_ms": statistics.median(r["release_ms"] for r in rs),
                         "runs": rs}
    return {"flows": flows, "open_seconds": opened, "offered_during_moves": gen.offered,
            "moves": summary}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--flows", default="1000,100000,1000000")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--rate", type=float, default=200_000,
                    help="packets per second offered during the moves")
    ap.add_argument("--out", default=str(HERE / "results" / "migration.json"))
    a = ap.parse_args()
    rows = []
    for n in (int(x) for x in a.flows.split(",")):
        r = measure(n, a.runs, a.rate)
        rows.append(r)
        for kind, m in r["moves"].items():
            print(f"{n:>9} flows  {kind:4}  {m['median_ms']:9.1f} ms (max {m['max_ms']:.1f})"
                  f"  {m['flows']:>9,.0f} entries  {m['held_median']:>7,.0f} held"
                  f"  (out {m['out_ms']:.1f}, in {m['in_ms']:.1f}, release "
                  f"{m['release_ms']:.1f} ms)",
                  flush=True)
    meta = {"command": "python benchmarks/migration.py " + " ".join(sys.argv[1:]),
            "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "machine": f"{platform.machine()} {os.cpu_count()} cpus, "
                       f"{platform.python_version()}",
            "runs": a.runs, "offered_pps_during_moves": a.rate}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps({"meta": meta, "results": rows}, indent=2) + "\n")
    print(f"written to {a.out}")


if __name__ == "__main__":
    main()
