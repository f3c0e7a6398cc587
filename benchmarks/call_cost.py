"""What calling a device costs per batch, apart from its packets' work.

    python benchmarks/call_cost.py [--runs 7] [--cpu 0]
                                   [--out benchmarks/results/call_cost.json]

A device's ``process`` calls one kernel with 20 to 30 arguments, most of them
arrays. numba's dispatcher types each argument of every call to choose the compiled
code, then converts it; :class:`dva._jit.KernelCall` types them once per device and
state. Here each of the firewall, the NAT and the load balancer gets a batch of one
ARP frame (each passes it on: the kernel's run-ahead loops and its sweep of 64 slots
run, little else), ``process`` called 20,000 times in a row, two ways, alternating:

* ``typed``: the kernel called through numba's dispatcher, as before KernelCall;
* ``once``: through the state's KernelCall (what ``process`` does).

Both pass the arguments that stay the same as the tuple the state keeps
(:meth:`dva.nf.base.DeviceState.bound`, since 2026-12-05: about 0.2 to 0.9 us a call
less than looking them up at every call).

Figures are ns per call (per batch); the medians of ``--runs`` runs. A call's saving
divided by the batch size (256) is what it saves per packet.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
CALLS = 20_000

DEVICES = {
    "firewall": {"type": "firewall", "ports": ["inside", "outside"],
                 "rules": [{"action": "allow", "from": "inside"}], "max_flows": 1000},
    "nat": {"type": "nat", "ports": ["inside", "outside"],
            "snat": {"to": "198.51.100.2-198.51.100.64"}, "max_flows": 1000},
    "lb": {"type": "lb", "ports": ["front", "back"], "max_flows": 1000,
           "vips": {"dns": {"addr": "203.0.113.10", "proto": "udp", "port": 53,
                            "backends": [{"addr": f"10.0.1.{i}"} for i in range(1, 11)]}}},
}


def _run(dev, st, b, once: bool) -> float:
    """ns per ``dev.process`` call of ``b`` (one ARP frame) on ``st``; ``once``: the
    state's KernelCalls, else each call through the dispatcher."""
    from types import SimpleNamespace

    from dva.packet import layout as L

    st._bound.clear()  # the calls kept with the arguments are the variant's
    if not once:  # the same calls, each through the dispatcher (the kernel itself)
        st._call_of = lambda device, fn: SimpleNamespace(target=fn)
    try:
        t0 = time.perf_counter()
        for _ in range(CALLS):
            b.n = 1
            b.meta[0, L.VERDICT] = 0
            dev.process(b, st, 1.0)
        return (time.perf_counter() - t0) / CALLS * 1e9
    finally:
        st.__dict__.pop("_call_of", None)
        st._bound.clear()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--cpu", type=int, default=0, help="pin to this CPU (-1: do not)")
    ap.add_argument("--out", default=str(HERE / "results" / "call_cost.json"))
    a = ap.parse_args()
    sys.path.insert(0, str(HERE.parent / "src"))
    if a.cpu >= 0:
        os.sched_setaffinity(0, {a.cpu})
    from dva.nf.registry import get
    from dva.packet import layout as L
    from dva.packet.batch import PacketBatch
    from dva.packet.build import ARP, Eth
    from dva.packet.parse import parse_batch
    from dva.packet.pool import PacketPool

    arp = bytes(Eth(src="02:00:00:00:00:05", dst="ff:ff:ff:ff:ff:ff", type=0x0806)
                / ARP(psrc="10.0.0.1", pdst="10.0.0.2", hwsrc="02:00:00:00:00:05"))
    ns: dict[str, list[float]] = {}
    for name, conf in DEVICES.items():
        cls = get(conf["type"])
        dev = cls(name, cls.config_model.model_validate(conf))
        st = dev.new_state()
        b = PacketBatch(PacketPool(16), 4)
        b.add_frame(arp, in_port=0)
        data, meta = b.pool.data, b.meta

        parse_batch(data, meta, 0, 1, 4095)
        for once in (False, True):  # compile, warm
            _run(dev, st, b, once)
        for r in range(a.runs):
            for once in ((False, True) if r % 2 == 0 else (True, False)):
                ns.setdefault(f"{name}_{'once' if once else 'typed'}", []).append(_run(dev, st, b, once))
        assert b.n == 1 and meta[0, L.VERDICT] == 1, "the ARP frame was not passed on"
    res = {k: {"median": statistics.median(v), "runs": v, "unit": "ns/call"}
           for k, v in ns.items()}
    print(f"{'what':20s} {'median':>8s} {'min':>8s} {'max':>8s}  unit")
    for k, v in res.items():
        print(f"{k:20s} {v['median']:8.0f} {min(v['runs']):8.0f} {max(v['runs']):8.0f}"
              f"  {v['unit']}")
    for name in DEVICES:
        saved = res[f"{name}_typed"]["median"] - res[f"{name}_once"]["median"]
        print(f"{name}: {saved:.0f} ns saved per call, {saved / 256:.1f} ns per packet "
              f"at batch 256")
    meta_ = {"command": "python benchmarks/call_cost.py " + " ".join(sys.argv[1:]),
             "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
             "machine": f"{platform.machine()} {os.cpu_count()} cpus, "
                        f"{platform.python_version()}",
             "calls": CALLS, "runs": a.runs}
    Path(a.out).write_text(json.dumps({"meta": meta_, "results": res}, indent=1) + "\n")
    print(f"written to {a.out}")


if __name__ == "__main__":
    main()
