"""Packet-path throughput on one core, in memory: parse+hash, the switch, the engine.

    python benchmarks/packet_path.py [--runs 7] [--cpu 0] [--out benchmarks/results/packet_path.json]

For batch sizes 32, 256 and 2048 it measures, as the median of ``--runs`` runs:

* ``parse``  -- parse_batch (headers, symmetric flow hash, bucket) per packet;
* ``switch`` -- parse + the switch device's process() (MAC learning and lookup,
  verdicts) on a warm 4-port switch: the compiled switch path;
* ``router`` -- parse + the router device with 100,000 routes (DIR-24-8 lookup, TTL
  and checksum update, MAC rewrite) to a resolved gateway; the router rewrites the
  frames, so each pass first writes their first 64 bytes back (included in the
  figure), and every verdict is checked to be "forwarded" after each run;
* ``engine`` -- the whole inline engine: a batch arriving on one port (rotating
  over the four), stamped and parsed, the switch, routing by verdict, and the
  per-port output batches.

Traffic: 64-byte UDP/IPv4 frames between 8 hosts (1024 flows) spread over the 4
ports, all destinations learned. The same code with numba's JIT switched off (the
readable reference) runs in a subprocess on fewer packets, and the ratio is
reported. Figures print as a table and go to ``--out`` as JSON.
"""

from __future__ import annotations

import os

# Before numpy loads: no spinning BLAS threads on the cores being measured.
for _v in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_v, "1")

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

HERE = Path(__file__).resolve().parent
BATCHES = (32, 256, 2048)
APPLIANCE = """
appliance: bench
devices:
  lan: {type: switch, ports: [p0, p1, p2, p3]}
attach:
  lan.p0: {memory: p0}
  lan.p1: {memory: p1}
  lan.p2: {memory: p2}
  lan.p3: {memory: p3}
"""


def host_mac(h: int) -> str:
    return f"02:00:00:00:01:{h:02x}"


def make_frames(n: int) -> tuple[list[bytes], list[int]]:
    """n frames and the port each arrives on (its source host's port)."""
    from dva.packet.build import UDP, Eth, IPv4, Raw

    frames, ports = [], []
    for i in range(n):
        s = i % 8
        d = (s + (1, 2, 3, 5, 6, 7)[(i // 8) % 6]) % 8  # never a host on s's own port
        f = Eth(src=host_mac(s), dst=host_mac(d)) / IPv4(src=f"10.0.0.{s + 1}",
                                                          dst=f"10.0.0.{d + 1}") \
            / UDP(sport=1024 + i % 128, dport=5000 + d) / Raw(bytes(18))
        frames.append(bytes(f))
        ports.append(s % 4)
    return frames, ports


def setup(batch: int):
    from dva.graph.appliance import parse_appliance
    from dva.graph.plan import compile_plan
    from dva.packet import layout as L
    from dva.packet.batch import PacketBatch
    from dva.packet.pool import PacketPool
    from dva.worker.engine import Engine

    plan = compile_plan(parse_appliance(APPLIANCE))
    pool = PacketPool(max(8 * batch, 4096))
    eng = Engine(plan, pool)
    frames, ports = make_frames(batch)
    b = PacketBatch(pool, batch)
    b.add_frames(frames)
    b.meta[: b.n, L.IN_PORT] = ports
    # Warm the MAC table: every host sends once from its port.
    for h in range(8):
        w = PacketBatch(pool, 1)
        w.add_frame(bytes.fromhex("ffffffffffff") + bytes.fromhex(host_mac(h).replace(":", ""))
                    + bytes.fromhex("88b5") + bytes(46))
        for o in eng.process(h % 4, w, 0.0):
            o.release_all()
    return eng, b


def port_batches(eng, batch: int):
    """For the engine: one batch of ``batch`` frames per ingress port, from that
    port's hosts to hosts on the other ports (as a dispatcher would deliver them)."""
    from dva.packet.batch import PacketBatch

    frames, ports = make_frames(batch * 8)
    out = []
    for p in range(4):
        b = PacketBatch(eng.pool, batch)
        b.add_frames([f for f, q in zip(frames, ports) if q == p][:batch])
        out.append((b, b.meta[: b.n].copy()))
    assert all(b.n == batch for b, _ in out)
    return out


ROUTES = 100_000


def router_setup(batch: int):
    """A router with ROUTES random routes via a resolved gateway; ``batch`` frames
    from the LAN side to addresses those routes cover (the LAN subnet excepted)."""
    import random

    from compute import _routes

    from dva.graph.appliance import Appliance, Attachment, AttachSpec
    from dva.graph.plan import compile_plan
    from dva.nf.registry import get
    from dva.packet import layout as L
    from dva.packet.batch import PacketBatch
    from dva.packet.build import ARP, UDP, Eth, IPv4, Raw
    from dva.packet.pool import PacketPool
    from dva.worker.engine import Engine

    routes, dests = _routes(ROUTES)  # seed 7, as before; destinations picked with 8
    dests = dests.tolist()
    r = random.Random(8)
    cls = get("router")
    cfg = cls.config_model.model_validate({
        "type": "router", "routes": routes, "max_routes": ROUTES + 10,
        "ports": {"a": {"ip": "10.1.0.1/24"}, "b": {"ip": "10.2.0.1/24"}}})
    dev = cls("r1", cfg)
    app = Appliance("bench", "default", {"r1": dev}, [],
                    [Attachment("r1", "a", AttachSpec(memory="a")),
                     Attachment("r1", "b", AttachSpec(memory="b"))])
    pool = PacketPool(max(8 * batch, 4096))
    eng = Engine(compile_plan(app), pool)
    gw = "02:00:00:00:02:fe"
    w = PacketBatch(pool, 1)
    w.add_frame(bytes(Eth(src=gw, dst=dev.port_mac_str("b")) / ARP(
        op=2, hwsrc=gw, psrc="10.2.0.254", hwdst=dev.port_mac_str("b"), pdst="10.2.0.1")))
    for o in eng.process(1, w, 0.0):
        o.release_all()
    b = PacketBatch(pool, batch)
    mac_a = dev.port_mac_str("a")
    for i in range(batch):
        d = dests[r.randrange(len(dests))]
        b.add_frame(bytes(Eth(src="02:00:00:00:01:02", dst=mac_a) / IPv4(
            src="10.1.0.2", dst=f"{d >> 24}.{(d >> 16) & 255}.{(d >> 8) & 255}.{d & 255}")
            / UDP(sport=1024 + i % 512, dport=9) / Raw(bytes(18))))
    b.meta[: b.n, L.IN_PORT] = 0
    return eng, b


def restore_kernel():
    """A kernel writing saved 64-byte frame heads back: ``f(data, slots, starts, saved)``."""
    from dva._jit import kernel
    from dva.packet.checksum import rd32, wr32

    @kernel
    def restore(data, slots, starts, saved):
        for i in range(slots.shape[0]):
            frame, head, s = data[slots[i]], saved[i], starts[i]
            for k in range(16):
                wr32(frame, s + 4 * k, rd32(head, 4 * k))
    return restore


def make_step(kind: str, batch: int):
    """A closure running one batch of ``kind`` on a fresh appliance; returns
    (step, packets per step)."""
    import numpy as np

    from dva.packet import layout as L
    from dva.packet.parse import parse_batch

    eng, b = router_setup(batch) if kind == "router" else setup(batch)
    dev, state = eng.plan.devices[0], eng.states[0]
    data, meta, n = b.pool.data, b.meta, b.n
    per_port = port_batches(eng, batch) if kind == "engine" else []
    turn = [0]
    restore_frames = restore_kernel()
    slots, starts = meta[:n, L.SLOT].copy(), meta[:n, L.START].copy()
    pristine = np.zeros((n, 64), np.uint8)
    for i in range(n):
        pristine[i] = data[slots[i], starts[i]:starts[i] + 64]

    def step():
        if kind == "parse":
            parse_batch(data, meta, 0, n, 4095)
        elif kind == "router":
            # The router rewrites TTL, checksum and MACs in place: put the first 64
            # bytes of every frame back (a few ns per packet, counted in the figure),
            # else the next pass would drop them all as not addressed to the router.
            restore_frames(data, slots, starts, pristine)
            b.n = n
            parse_batch(data, meta, 0, n, 4095)
            dev.process(b, state, 1.0)
        elif kind == "switch":
            parse_batch(data, meta, 0, n, 4095)
            dev.process(b, state, 1.0)
        else:
            p = turn[0] = (turn[0] + 1) & 3
            pb, saved = per_port[p]
            pb.meta[:n] = saved  # the same slots again: frames are unchanged
            pb.n = n
            for o in eng.process(p, pb, 1.0):
                o.n = 0  # "sent"; the slots are re-used by the next round

    def check():
        """The measured work is forwarding, not dropping."""
        if kind == "router":
            verdicts = set(meta[:n, L.VERDICT].tolist())
            assert verdicts == {1}, f"router verdicts {verdicts}, expected all out port b"
            assert b.n == n, "the router generated packets"

    step()  # compile / warm
    step()
    check()
    return step, n, check


def measure(packets: int, runs: int) -> dict:
    """Median Mpps per (kind, batch). Runs are interleaved round-robin over all
    configurations, so that the machine's slow and fast moments hit all alike."""
    steps = {f"{k}/{b}": make_step(k, b) for k in ("parse", "switch", "router", "engine")
             for b in BATCHES}
    mpps: dict[str, list[float]] = {k: [] for k in steps}
    for _ in range(runs):
        for key, (step, n, check) in steps.items():
            iters = max(1, packets // n)
            t0 = time.perf_counter()
            for _ in range(iters):
                step()
            mpps[key].append(iters * n / (time.perf_counter() - t0) / 1e6)
            check()
    return {k: {"median_mpps": statistics.median(v), "runs": v} for k, v in mpps.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--packets", type=int, default=2_000_000,
                    help="packets per run (compiled)")
    ap.add_argument("--ref-packets", type=int, default=8192,
                    help="packets per run for the JIT-off reference")
    ap.add_argument("--out", default=str(HERE / "results" / "packet_path.json"))
    ap.add_argument("--cpu", type=int, default=0,
                    help="pin to this CPU (-1: do not pin); a VM's vCPUs differ in speed")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args()
    sys.path.insert(0, str(HERE.parent / "src"))
    if a.cpu >= 0:
        os.sched_setaffinity(0, {a.cpu})

    if a.child:  # the JIT-off reference, inside a subprocess
        print(json.dumps(measure(a.ref_packets, 3)))
        return

    jit = measure(a.packets, a.runs)
    env = dict(os.environ, NUMBA_DISABLE_JIT="1")
    ref_out = subprocess.run([sys.executable, __file__, "--child", "--ref-packets",
                              str(a.ref_packets)], env=env, check=True,
                             capture_output=True, text=True).stdout
    ref = json.loads(ref_out.strip().splitlines()[-1])

    print(f"{'path':8} {'batch':>6} {'JIT Mpps':>10} {'ref Mpps':>10} {'JIT/ref':>9}")
    rows = {}
    for key, v in jit.items():
        kind, batch = key.split("/")
        r = ref[key]["median_mpps"]
        ratio = v["median_mpps"] / r if r else float("inf")
        print(f"{kind:8} {batch:>6} {v['median_mpps']:10.2f} {r:10.4f} {ratio:9.0f}")
        rows[key] = {"jit_median_mpps": v["median_mpps"], "jit_runs": v["runs"],
                     "ref_median_mpps": r, "ratio": ratio}
    meta = {"command": "python benchmarks/packet_path.py " + " ".join(sys.argv[1:]),
            "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "machine": f"{platform.machine()} {os.cpu_count()} cpus, {platform.python_version()}",
            "runs": a.runs, "packets_per_run": a.packets, "ref_packets_per_run": a.ref_packets}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps({"meta": meta, "results": rows}, indent=2) + "\n")
    print(f"written to {a.out}")


if __name__ == "__main__":
    main()
