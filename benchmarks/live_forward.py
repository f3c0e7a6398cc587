"""Frames forwarded per second between two veths: dva's router vs the Linux kernel.

    python benchmarks/live_forward.py [--runs 3] [--frames 300000] [--workers 0,1]
                                      [--out FILE]

Lab: host h1 (10.1.0.2/24) and host h2 (10.2.0.2/24), each a network namespace whose
veth peer is the router's port. Two routers take turns on the same layout:

* ``dva wN``: ``dva run --workers N`` with a router device, af_packet on both veth
  ends; ``w0``: one process, graph inline (it gets one of the 2 cores, the sender
  the other); ``w1``: a dispatcher and one worker process over the shared-memory
  bus (``dva run``'s default on 2 cores), sharing the cores with the sender;
* ``kernel``: the same veth ends moved into a namespace with the addresses and
  ``net.ipv4.ip_forward=1`` (Linux's own forwarding, in softirq).

Sender: ``trafgen`` (netsniff-ng; a TX_RING packet generator, one CPU) in h1 sends
``--frames`` 64-byte UDP frames to h2 through the router, as fast as it can. Forwarded
rate = frames counted on h2's eth0 / time trafgen took to send them. Runs alternate
dva/kernel; medians are reported, with the ratio. Needs root.
"""

from __future__ import annotations

import os

for _v in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_v, "1")

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import shutil  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))

from dva.tools.demo import start_appliance, stop_appliance  # noqa: E402
from dva.tools.lab import Lab, run  # noqa: E402

ROUTER = """\
appliance: fwd
devices:
  r1:
    type: router
    ports:
      a: {{ip: 10.1.0.1/24}}
      b: {{ip: 10.2.0.1/24}}
attach:
  r1.a: {{af_packet: {a}}}
  r1.b: {{af_packet: {b}}}
"""


def rx_packets(lab: Lab, h) -> int:
    return int(lab.exec(h, ["cat", "/sys/class/net/eth0/statistics/rx_packets"]).stdout)


def gateway_mac(lab: Lab, h, gw: str) -> str:
    lab.exec(h, ["ping", "-c", "2", "-i", "0.2", "-W", "2", gw], check=False)
    out = lab.exec(h, ["ip", "neigh", "show", gw]).stdout.split()
    return out[out.index("lladdr") + 1]


def softnet_dropped() -> int:
    """Frames the kernel dropped from full per-CPU input backlogs (before any packet
    socket sees them): column 2 of /proc/net/softnet_stat, summed over CPUs."""
    return sum(int(ln.split()[1], 16) for ln in Path("/proc/net/softnet_stat").read_text()
               .splitlines())


RATE = None  # frames/s offered by trafgen, None = as fast as it can


def blast(lab: Lab, h1, h2, dst_mac: str, frames: int) -> tuple[float, int, float]:
    """(seconds trafgen took, frames h2 received, frames/s offered)."""
    cfg = (f"{{ eth(da={dst_mac}, sa={h1.mac}), ipv4(sa=10.1.0.2, da=10.2.0.2, ttl=64), "
           f"udp(sp=4000, dp=9), fill(0x00, 18) }}\n")
    with tempfile.NamedTemporaryFile("w", suffix=".cfg", delete=False) as f:
        f.write(cfg)
    before = rx_packets(lab, h2)
    t0 = time.monotonic()
    rate = ["-b", f"{RATE}pps"] if RATE else []
    lab.exec(h1, ["trafgen", "-o", "eth0", "-i", f.name, "-n", str(frames), "-P", "1", "-q",
                  *rate], timeout=120)
    dt = time.monotonic() - t0
    time.sleep(0.5)  # let the router drain
    os.unlink(f.name)
    return dt, rx_packets(lab, h2) - before, frames / dt


def run_dva(frames: int, workers: int) -> dict:
    with Lab() as lab, tempfile.TemporaryDirectory() as tmp:
        h1 = lab.host("h1", "10.1.0.2/24", "10.1.0.1")
        h2 = lab.host("h2", "10.2.0.2/24", "10.2.0.1")
        app = Path(tmp) / "fwd.yaml"
        app.write_text(ROUTER.format(a=h1.outside, b=h2.outside))
        proc, _ = start_appliance(app, Path(tmp), ["--workers", str(workers)])
        try:
            gateway_mac(lab, h2, "10.2.0.1")  # the router learns h2
            mac = gateway_mac(lab, h1, "10.1.0.1")
            sn = softnet_dropped()
            dt, got, offered = blast(lab, h1, h2, mac, frames)
            sn = softnet_dropped() - sn
        finally:
            code, counters, err = stop_appliance(proc)
        if code != 0:
            raise RuntimeError(f"dva run failed: {err}")
    return {"seconds": dt, "received": got, "offered_fps": offered,
            "forwarded_fps": got / dt, "delivered": got / frames, "softnet_dropped": sn,
            "drops": {k: v for k, v in counters.items() if "drop/" in k and v}}


def run_kernel(frames: int) -> dict:
    with Lab() as lab:
        h1 = lab.host("h1", "10.1.0.2/24", "10.1.0.1")
        h2 = lab.host("h2", "10.2.0.2/24", "10.2.0.1")
        kr = f"{lab.prefix}-kr"
        run(["ip", "netns", "add", kr])
        try:
            for h, ip in ((h1, "10.1.0.1/24"), (h2, "10.2.0.1/24")):
                run(["ip", "link", "set", h.outside, "netns", kr])
                run(["ip", "netns", "exec", kr, "ip", "addr", "add", ip, "dev", h.outside])
                run(["ip", "netns", "exec", kr, "ip", "link", "set", h.outside, "up"])
            run(["ip", "netns", "exec", kr, "sysctl", "-qw", "net.ipv4.ip_forward=1"])
            gateway_mac(lab, h2, "10.2.0.1")
            mac = gateway_mac(lab, h1, "10.1.0.1")
            sn = softnet_dropped()
            dt, got, offered = blast(lab, h1, h2, mac, frames)
            sn = softnet_dropped() - sn
        finally:
            run(["ip", "netns", "del", kr], check=False)
            lab.links.clear()  # they went with the namespace
    return {"seconds": dt, "received": got, "offered_fps": offered, "forwarded_fps": got / dt,
            "delivered": got / frames, "softnet_dropped": sn}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--frames", type=int, default=300_000)
    ap.add_argument("--rate", type=int, default=None,
                    help="frames/s offered (trafgen -b); default: as fast as it can")
    ap.add_argument("--workers", default="0,1",
                    help="dva configurations to run, comma-separated worker counts")
    ap.add_argument("--out", default=str(HERE / "results" / "live_forward.json"))
    a = ap.parse_args()
    counts = [int(x) for x in a.workers.split(",")]
    global RATE
    RATE = a.rate
    why = Lab.check_environment() or (None if shutil.which("trafgen") else
                                      "needs trafgen (apt-get install netsniff-ng)")
    if why:
        sys.exit(f"live_forward: {why}")
    res = {**{f"dva w{n}": [] for n in counts}, "kernel": []}
    for _ in range(a.runs):
        for n in counts:
            res[f"dva w{n}"].append(run_dva(a.frames, n))
        res["kernel"].append(run_kernel(a.frames))
    med = {k: statistics.median(r["forwarded_fps"] for r in v) for k, v in res.items()}
    print(f"{'router':8} {'forwarded fps (median)':>24} {'runs':>40}")
    for k, v in res.items():
        print(f"{k:8} {med[k]:24,.0f}   " + ", ".join(
            f"{r['forwarded_fps']:,.0f} ({r['delivered']:.0%} of {r['offered_fps']:,.0f} "
            f"offered; backlog drops {r['softnet_dropped']:,})" for r in v))
        for r in v:
            if r.get("drops"):
                print(f"{'':8} drops: {r['drops']}")
    for n in counts:
        print(f"dva w{n} / kernel: {med[f'dva w{n}'] / med['kernel']:.2f}")
    meta = {"command": "python benchmarks/live_forward.py " + " ".join(sys.argv[1:]),
            "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "machine": f"{platform.machine()} {os.cpu_count()} cpus",
            "sender": "trafgen -P 1 (netsniff-ng), 64-byte UDP frames, one flow",
            "offered_rate": a.rate or "max",
            "frames_per_run": a.frames}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps({"meta": meta, "median_fps": med, "runs": res},
                                      indent=2) + "\n")
    print(f"written to {a.out}")


if __name__ == "__main__":
    main()
