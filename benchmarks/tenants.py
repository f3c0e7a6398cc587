"""Per-tenant overhead: memory and start time for 1, 100 and 1,000 small appliances.

    python benchmarks/tenants.py [--counts 1,100,1000] [--out FILE]

Each tenant runs its own small appliance (a 2-port switch wired to a router with a
LAN and a WAN port, the router's firewall-free edge: what a tenant's first appliance
looks like), with memory attachments, all in one instance. For every count, in a fresh
process each (so figures do not mix):

* ``inline``: the appliance files parsed and validated, their plans compiled and one
  engine per appliance built in one process (``dva run --workers 0``'s set-up);
  then every tenant's router is sent an ARP request for its LAN address and must
  answer (checked: the appliances are live, not just allocated);
* ``runtime``: the same appliances in a multi-process runtime with one worker
  (dispatcher + worker process, what ``dva run`` starts), until the worker runs its
  loop with every engine built.

Start time is wall time from the first file parsed to ready; memory is the
proportional set size (PSS, so shared pages are not counted twice) of the processes,
minus that of the same process with no appliance (numba's kernels loaded and
compiled from the cache). Per-tenant figures are the slopes between counts.
Kernels come from numba's on-disk cache: a first-ever run compiles them first, and
that is not part of any tenant's start (a warm-up process runs before the counts).
"""

from __future__ import annotations

import os

for _v in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_v, "1")

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))

APPLIANCE = """\
appliance: edge
tenant: t{i}
devices:
  lan: {{type: switch, ports: [h1, gw]}}
  r1:
    type: router
    ports:
      lan: {{ip: 10.0.0.1/24}}
      wan: {{ip: 198.51.100.1/24}}
    routes: [{{prefix: 0.0.0.0/0, via: 198.51.100.254}}]
links: [[lan.gw, r1.lan]]
attach:
  lan.h1: {{memory: t{i}-h1}}
  r1.wan: {{memory: t{i}-wan}}
"""


def pss_kb(pid: int) -> int:
    for ln in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if ln.startswith("Pss:"):
            return int(ln.split()[1])
    return 0


def _warm_kernels() -> None:
    """Load (or compile) every kernel an appliance of this shape reaches."""
    from dva.graph.appliance import parse_appliance
    from dva.graph.plan import compile_plan
    from dva.packet.pool import PacketPool
    from dva.worker.engine import Engine

    Engine(compile_plan(parse_appliance(APPLIANCE.format(i=0))), PacketPool(64)).warm()


def arp_ask(i: int) -> bytes:
    from dva.packet.build import ARP, Eth

    mac = f"02:00:00:00:{i >> 8 & 255:02x}:{i & 255:02x}"
    return bytes(Eth(src=mac, dst="ff:ff:ff:ff:ff:ff") / ARP(op=1, hwsrc=mac, psrc="10.0.0.2",
                                                           pdst="10.0.0.1"))


def child(mode: str, count: int) -> dict:
    """In a fresh process: the set-up of ``count`` tenants; figures as a dict."""
    import gc

    from dva.graph.appliance import parse_appliance
    from dva.graph.plan import compile_plan

    _warm_kernels()
    gc.collect()
    base = pss_kb(os.getpid())
    t0 = time.perf_counter()
    apps = [parse_appliance(APPLIANCE.format(i=i), f"t{i}.yaml") for i in range(count)]
    t_parse = time.perf_counter() - t0
    res = {"mode": mode, "count": count, "parse_s": t_parse}
    if mode == "inline":
        from dva.packet.batch import PacketBatch
        from dva.packet.pool import PacketPool
        from dva.worker.engine import Engine

        pool = PacketPool(max(4096, 4 * count))
        engines = [Engine(compile_plan(a), pool, tenant_id=i) for i, a in enumerate(apps)]
        res["start_s"] = time.perf_counter() - t0
        res["pss_kb"] = pss_kb(os.getpid()) - base
        answered = 0
        for i, e in enumerate(engines):
            b = PacketBatch(pool, 1)
            b.add_frame(arp_ask(i))
            for o in e.process(0, b, 1.0):
                answered += o.n
                o.release_all()
        if answered != count:
            raise RuntimeError(f"{count - answered} of {count} tenants did not answer ARP")
        res["answered"] = answered
    else:
        from dva.dispatch.runtime import Runtime
        from dva.ports.offline import MemoryPort

        mem = {}
        for a in apps:
            for att in a.attachments:
                mem[att.spec.memory] = MemoryPort(att.ref)
        rt = Runtime(apps, workers=1, live=False, memory=mem)
        try:
            rt.wait_ready(timeout=600)
            res["start_s"] = time.perf_counter() - t0
            pids = [os.getpid()] + [h.proc.pid for h in rt.workers if h.proc is not None]
            res["pss_kb"] = sum(pss_kb(p) for p in pids) - base
            res["worker_pss_kb"] = sum(pss_kb(p) for p in pids[1:])
        finally:
            rt.stop()
            rt.close()
    return res


def run_counts(counts: list[int], modes=("inline", "runtime"), say=print) -> dict:
    subprocess.run([sys.executable, __file__, "--child", "inline:1"], check=True,
                   capture_output=True)  # kernels compiled into numba's cache
    rows = []
    for mode in modes:
        for n in counts:
            out = subprocess.run([sys.executable, __file__, "--child", f"{mode}:{n}"],
                                 capture_output=True, text=True, timeout=1800)
            if out.returncode:
                raise RuntimeError(f"tenants {mode}:{n} failed: {out.stderr[-2000:]}")
            r = json.loads(out.stdout.strip().splitlines()[-1])
            rows.append(r)
            say(f"  {mode:8} {n:>5} tenants: start {r['start_s']:7.2f} s, "
                f"memory {r['pss_kb'] / 1024:8.1f} MiB")
    per = {}
    for mode in modes:
        rs = sorted((r for r in rows if r["mode"] == mode), key=lambda r: r["count"])
        if len(rs) >= 2:
            lo, hi = rs[0], rs[-1]
            d = hi["count"] - lo["count"]
            per[mode] = {"start_ms_per_tenant": 1000 * (hi["start_s"] - lo["start_s"]) / d,
                         "kib_per_tenant": (hi["pss_kb"] - lo["pss_kb"]) / d}
    return {"rows": rows, "per_tenant": per}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--counts", default="1,100,1000")
    ap.add_argument("--modes", default="inline,runtime")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--out", default=str(HERE / "results" / "tenants.json"))
    a = ap.parse_args()
    if a.child:
        mode, n = a.child.split(":")
        print(json.dumps(child(mode, int(n))))
        return
    res = run_counts([int(x) for x in a.counts.split(",")], a.modes.split(","))
    for mode, p in res["per_tenant"].items():
        print(f"{mode}: {p['start_ms_per_tenant']:.2f} ms and {p['kib_per_tenant']:.0f} KiB "
              f"per tenant")
    res["meta"] = {"command": "python benchmarks/tenants.py " + " ".join(sys.argv[1:]),
                   "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                   "machine": f"{platform.machine()} {os.cpu_count()} cpus"}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(res, indent=2) + "\n")
    print(f"written to {a.out}")


if __name__ == "__main__":
    main()
