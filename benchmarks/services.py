"""Service devices on one core, in memory: VXLAN encapsulation and decapsulation, and
the load balancer.

    python benchmarks/services.py [--runs 7] [--packets 2000000] [--cpu 0] [--ref]
                                  [--only vxlan_encap,...] [--out benchmarks/results/services.json]

Each scenario is one device (or chain) run the way a worker runs it, at batch 256:
the batch's rows are put back as they arrived (``START``/``LEN``/``IN_PORT``: the
devices move ``START``), parsed (``parse_batch``: headers, flow hash, bucket) and
processed; parsing is counted in the figure, as in ``packet_path.py``. Every run
checks that every packet got the expected verdict. Runs are interleaved round-robin
over the scenarios (``--runs`` of ``--packets`` packets each) and the median is
reported. ``--ref`` also runs the JIT-off reference (``NUMBA_DISABLE_JIT=1``, in a
subprocess, on ``--ref-packets`` packets) and reports the ratio. Figures print as a
table and go to ``--out`` as JSON.

Scenarios (``SCENARIOS``: name -> builder; add new ones there):

* ``parse`` -- ``parse_batch`` alone on the 64-byte frames of ``vxlan_encap``: the
  machine's pace during the same run (these VMs' speed drifts by up to 2x).

* ``vxlan_encap`` -- 64-byte UDP/IPv4 frames from the overlay to 64 learned inner
  MACs behind 4 remote VTEPs (all next hops resolved): MAC lookup, 50 bytes of outer
  headers written into the headroom, the outer frame's metadata set.
* ``vxlan_decap`` -- the same frames VXLAN-encapsulated (114 bytes) from those 4
  VTEPs: checks, VNI and VTEP, learning (a refresh per packet), the inner frame
  parsed afresh.
* ``lb_select`` -- UDP/IPv4 frames to a VIP with 10 backends (DNAT), each opening a
  new flow: Maglev table lookup, a conntrack entry (DNAT keeps one per connection),
  the rewrite. A fresh state every 262144 flows (its first touch of a 96 MB table is
  counted, as in ``stateful.py``'s ``fw_new``).
* ``lb_select_resident`` -- the same on a table whose pages exist (as in an LB
  that has run a while), emptied in place every 262144 flows (timed too).
* ``lb_est`` -- frames of random established flows among 100,000 (DNAT): conntrack
  lookup, state update, the rewrite, per-backend counters.
* ``lb_reply`` -- those flows' replies from their backends (back port): the
  connection's entry (E1), found by the client's tuple to the VIP that lists the
  backend, the rewrite back, the state update.

The lb scenarios write each batch's addresses afresh (the lb rewrites them) and
its rows' in-port, in kernels, timed with the rest.
"""

from __future__ import annotations

import os

for _v in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_v, "1")

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))
sys.path.insert(0, str(HERE))
BATCH = 256


@dataclass
class Scenario:
    """A built scenario: ``step()`` runs one batch, ``check()`` raises if the last
    batch did not do the measured work."""

    step: Callable[[], None]
    packets: int  # per step
    check: Callable[[], None]
    unit: str = "Mpps"


# -- helpers shared by scenarios ---------------------------------------------------------

def _restore_kernel():
    """``restore(meta, saved)``: rows' START, LEN and IN_PORT back as saved (the other
    columns are the parser's and the devices')."""
    from dva._jit import kernel
    from dva.packet import layout as L

    @kernel
    def restore(meta, saved):
        for i in range(saved.shape[0]):
            meta[i, L.START] = saved[i, 0]
            meta[i, L.LEN] = saved[i, 1]
            meta[i, L.IN_PORT] = saved[i, 2]
    return restore


def _device_step(dev, state, batch, verdict: int) -> Scenario:
    """One device over ``batch`` (rows as they arrive), re-run from the same bytes."""
    import numpy as np

    from dva.packet import layout as L
    from dva.packet.parse import parse_batch

    n = batch.n
    meta, data = batch.meta, batch.pool.data
    saved = np.ascontiguousarray(meta[:n, [L.START, L.LEN, L.IN_PORT]])
    restore = _restore_kernel()
    state.bucket_mask = 4095

    def step():
        restore(meta, saved)
        batch.n = n
        parse_batch(data, meta, 0, n, 4095)
        dev.process(batch, state, 1.0)

    def check():
        got = set(meta[:n, L.VERDICT].tolist())
        assert got == {verdict} and batch.n == n, f"{dev.name}: verdicts {got}, rows {batch.n}"

    return Scenario(step, n, check)


# -- VXLAN -------------------------------------------------------------------------------

VX_LOCAL, VX_MAC = "192.0.2.1", "02:00:00:00:0a:01"
VX_REMOTES = ["192.0.2.2", "192.0.2.3", "192.0.2.4", "192.0.2.5"]


def _vtep_mac(r: int) -> str:
    return f"02:00:00:00:0b:{r:02x}"


def _vxlan_device():
    """A vxlan with 4 remotes, every next hop resolved and 64 inner MACs learned
    (16 behind each remote); returns (device, state, inner frames)."""
    from dva.nf.registry import get
    from dva.packet.batch import PacketBatch
    from dva.packet.build import ARP, UDP, Eth, IPv4, Raw
    from dva.packet.parse import parse_batch
    from dva.packet.pool import PacketPool

    cls = get("vxlan")
    cfg = cls.config_model.model_validate({
        "type": "vxlan", "vni": 100, "local": f"{VX_LOCAL}/24", "mac": VX_MAC,
        "remotes": VX_REMOTES})
    dev = cls("vx", cfg)
    st = dev.new_state()
    pool = PacketPool(64)
    b = PacketBatch(pool, 64)
    for r, ip in enumerate(VX_REMOTES):  # ARP replies: next hops resolved
        b.add_frame(bytes(Eth(src=_vtep_mac(r), dst=VX_MAC) / ARP(
            op=2, hwsrc=_vtep_mac(r), psrc=ip, hwdst=VX_MAC, pdst=VX_LOCAL)), in_port=1)
    parse_batch(pool.data, b.meta, 0, b.n, 4095)
    dev.process(b, st, 0.5)
    b.release_all()
    inner = []
    for h in range(64):
        inner.append(bytes(Eth(src=f"02:00:00:01:00:{h:02x}", dst=f"02:00:00:02:00:{h:02x}")
                           / IPv4(src=f"10.0.0.{h + 1}", dst=f"10.0.1.{h + 1}")
                           / UDP(sport=1024 + h, dport=5000, chksum=0) / Raw(bytes(18))))
    learn = []  # frames from the remote side teach where the 02:00:00:02:.. MACs are
    for h in range(64):
        r = h % 4
        back = bytes(Eth(src=f"02:00:00:02:00:{h:02x}", dst=f"02:00:00:01:00:{h:02x}")
                     / IPv4(src=f"10.0.1.{h + 1}", dst=f"10.0.0.{h + 1}")
                     / UDP(sport=5000, dport=1024 + h, chksum=0) / Raw(bytes(18)))
        learn.append(_encapsulated(r, back, h))
    for f in learn:
        b.add_frame(f, in_port=1)
    parse_batch(pool.data, b.meta, 0, b.n, 4095)
    dev.process(b, st, 0.6)
    b.release_all()
    assert st.events[0] == 64, "64 MACs learned"
    return dev, st, inner, learn


def _encapsulated(r: int, inner: bytes, i: int) -> bytes:
    from dva.packet.build import UDP, Eth, IPv4, Raw

    return bytes(Eth(src=_vtep_mac(r), dst=VX_MAC) / IPv4(src=VX_REMOTES[r], dst=VX_LOCAL,
                                                          flags="DF", id=i)
                 / UDP(sport=49152 + i, dport=4789, chksum=0)
                 / Raw(bytes.fromhex("0800000000006400")) / Raw(inner))


def vxlan_encap() -> Scenario:
    from dva.packet.batch import PacketBatch
    from dva.packet.pool import PacketPool

    dev, st, inner, _ = _vxlan_device()
    b = PacketBatch(PacketPool(2 * BATCH), BATCH)
    for i in range(BATCH):
        b.add_frame(inner[i % len(inner)], in_port=0)
    return _device_step(dev, st, b, 1)


def vxlan_decap() -> Scenario:
    from dva.packet.batch import PacketBatch
    from dva.packet.pool import PacketPool

    dev, st, _, learn = _vxlan_device()
    b = PacketBatch(PacketPool(2 * BATCH), BATCH)
    for i in range(BATCH):
        b.add_frame(learn[i % len(learn)], in_port=1)
    return _device_step(dev, st, b, 0)


def parse_only() -> Scenario:
    """parse_batch alone on vxlan_encap's input: the machine's pace in the same run
    (compare with docs/benchmarks.md's packet path figures)."""
    import numpy as np

    from dva.packet import layout as L
    from dva.packet.batch import PacketBatch
    from dva.packet.parse import parse_batch
    from dva.packet.pool import PacketPool

    _, _, inner, _ = _vxlan_device()
    b = PacketBatch(PacketPool(2 * BATCH), BATCH)
    for i in range(BATCH):
        b.add_frame(inner[i % len(inner)])
    data, meta, n = b.pool.data, b.meta, b.n

    def check():
        assert np.all(meta[:n, L.PERR] == 0)

    return Scenario(lambda: parse_batch(data, meta, 0, n, 4095), n, check)


# -- load balancer -----------------------------------------------------------------------

LB_VIP = 0xCB00710A  # 203.0.113.10
LB_FLOWS = 100_000  # established flows of lb_est


def _lb_device(max_flows: int):
    from dva.nf.registry import get

    cls = get("lb")
    cfg = cls.config_model.model_validate({
        "type": "lb", "ports": ["front", "back"], "max_flows": max_flows,
        "vips": {"dns": {"addr": "203.0.113.10", "proto": "udp", "port": 53,
                         "backends": [{"addr": f"10.0.1.{i}"} for i in range(1, 11)]}}})
    return cls("lb", cfg)


def _reply_fill():
    """``fill(data, slots, starts, ids, k0, ends)``: the batch's frames become
    flow ``ids[k]``'s reply, from ``ends[f, 0]`` port ``ends[f, 1]`` to ``ends[f, 2]``
    port ``ends[f, 3]``, header checksum recomputed."""
    from stateful import udp_writer

    from dva._jit import kernel
    put = udp_writer()

    @kernel
    def fill(data, slots, starts, ids, k0, ends):
        j = k0 % ids.shape[0]  # a division a batch (stateful.udp_flow_fill)
        for i in range(slots.shape[0]):
            f = ids[j]
            j = j + 1 if j + 1 < ids.shape[0] else 0
            put(data[slots[i]], starts[i], ends[f, 0], ends[f, 1], ends[f, 2], ends[f, 3])
    return fill


def _lb_scenario(new_flows: bool, resident: bool = False, reply: bool = False) -> Scenario:
    import numpy as np
    from stateful import e1_tuples, udp_flow_fill

    from dva._jit import kernel
    from dva.packet import layout as L
    from dva.packet.batch import PacketBatch
    from dva.packet.build import UDP, Eth, IPv4
    from dva.packet.parse import parse_batch
    from dva.packet.pool import PacketPool

    per_run = 262_144  # lb_select: new flows per timed run (a fresh state each)
    dev = _lb_device(per_run if new_flows else LB_FLOWS)
    pool = PacketPool(2 * BATCH)
    b = PacketBatch(pool, BATCH)
    tmpl = bytes(Eth(src="02:00:00:00:00:05", dst="02:00:00:00:00:01")
                 / IPv4(src="10.0.0.1", dst="203.0.113.10") / UDP(sport=1, dport=53, chksum=0)
                 / bytes(18))
    for _ in range(BATCH):
        b.add_frame(tmpl)
    data, meta = pool.data, b.meta
    slots, starts = meta[:BATCH, L.SLOT].copy(), meta[:BATCH, L.START].copy()
    fill = udp_flow_fill()  # the lb rewrites the destination: written before each batch

    @kernel
    def in_port(meta, n, port):  # a numpy slice assignment costs 0.9 us a batch
        for i in range(n):
            meta[i, L.IN_PORT] = port
    rng = np.random.default_rng(2)
    cur = {"state": dev.new_state(), "k": 0}
    ids = (np.arange(per_run, dtype=np.int64) if new_flows
           else rng.permutation(LB_FLOWS).astype(np.int64))

    rfill = _reply_fill() if reply else None
    ends = None  # lb_reply: each flow's (backend addr, port, client addr, port)

    def batch(k0):
        if ends is None:
            fill(data, slots, starts, ids, k0, LB_VIP)
        else:
            rfill(data, slots, starts, ids, k0, ends)
        b.n = BATCH
        in_port(meta, BATCH, 0 if ends is None else 1)
        parse_batch(data, meta, 0, BATCH, 4095)
        dev.process(b, cur["state"], 1.0)

    if not new_flows:  # open every flow once
        for k in range(0, LB_FLOWS, BATCH):
            batch(k)
        assert len(cur["state"].ct.table) == LB_FLOWS  # dnat: an entry per connection
        if reply:  # from E1: the translated destination, the original source
            ends = np.ascontiguousarray(
                e1_tuples(cur["state"].ct.table, LB_FLOWS, LB_VIP)[:, [6, 7, 0, 1]])

    if resident:  # the table's pages exist, as in an LB that has run a while
        cur["state"].ct.table.records.fill(0)

    def step():
        if new_flows and cur["k"] >= per_run:  # every flow of this state is open
            if resident:
                # empty the table in place (its pages stay): a slot-state write per
                # slot, timed with the rest (about 20 ns per flow opened)
                t = cur["state"].ct.table
                t.state[:] = 0
                t.info[:2] = 0  # live entries, tombstones
            else:
                cur["state"] = dev.new_state()
            cur["k"] = 0
        batch(cur["k"])
        cur["k"] += BATCH

    def check():
        got = set(meta[:BATCH, L.VERDICT].tolist())
        assert got == {0 if reply else 1}, f"lb verdicts {got}"
        c = dict(zip(dev.counters, cur["state"].events.tolist()))
        assert c["balanced_flows"] > 0

    return Scenario(step, BATCH, check)


def lb_select() -> Scenario:
    return _lb_scenario(True)


def lb_select_resident() -> Scenario:
    return _lb_scenario(True, resident=True)


def lb_est() -> Scenario:
    return _lb_scenario(False)


def lb_reply() -> Scenario:
    return _lb_scenario(False, reply=True)


SCENARIOS: dict[str, Callable[[], Scenario]] = {
    "parse": parse_only,
    "vxlan_encap": vxlan_encap,
    "vxlan_decap": vxlan_decap,
    "lb_select": lb_select,
    "lb_select_resident": lb_select_resident,
    "lb_est": lb_est,
    "lb_reply": lb_reply,
}


# -- measuring ---------------------------------------------------------------------------

def timed(s: Scenario, packets: int) -> float:
    """One run of scenario ``s`` (about ``packets`` packets), checked: its Mpps."""
    iters = max(1, packets // s.packets)
    t0 = time.perf_counter()
    for _ in range(iters):
        s.step()
    rate = iters * s.packets / (time.perf_counter() - t0) / 1e6
    s.check()
    return rate


def measure(names: list[str], packets: int, runs: int) -> dict[str, dict]:
    """Median rate per scenario; runs interleaved round-robin so that the machine's
    slow and fast moments hit every scenario alike."""
    built = {k: SCENARIOS[k]() for k in names}
    for s in built.values():  # compile and warm
        s.step()
        s.step()
        s.check()
    rates: dict[str, list[float]] = {k: [] for k in built}
    for _ in range(runs):
        for k, s in built.items():
            rates[k].append(timed(s, packets))
    return {k: {"median": statistics.median(v), "runs": v, "unit": built[k].unit}
            for k, v in rates.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--packets", type=int, default=2_000_000, help="packets per run")
    ap.add_argument("--only", default="", help="comma-separated scenario names")
    ap.add_argument("--ref", action="store_true", help="also run the JIT-off reference")
    ap.add_argument("--ref-packets", type=int, default=4096)
    ap.add_argument("--cpu", type=int, default=0, help="pin to this CPU (-1: do not)")
    ap.add_argument("--out", default=str(HERE / "results" / "services.json"))
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args()
    names = [n for n in a.only.split(",") if n] or list(SCENARIOS)
    unknown = set(names) - set(SCENARIOS)
    if unknown:
        ap.error(f"unknown scenarios {sorted(unknown)}; known: {', '.join(SCENARIOS)}")
    if a.cpu >= 0:
        os.sched_setaffinity(0, {a.cpu})
    if a.child:  # the JIT-off reference, inside a subprocess
        print(json.dumps(measure(names, a.ref_packets, 3)))
        return

    res = measure(names, a.packets, a.runs)
    ref = {}
    if a.ref:
        env = dict(os.environ, NUMBA_DISABLE_JIT="1")
        out = subprocess.run([sys.executable, __file__, "--child", "--only", ",".join(names),
                              "--ref-packets", str(a.ref_packets), "--cpu", str(a.cpu)],
                             env=env, check=True, capture_output=True, text=True).stdout
        ref = json.loads(out.strip().splitlines()[-1])
    print(f"{'scenario':14} {'median':>8} {'min':>8} {'max':>8}  unit   ns/pkt"
          + ("   ref     JIT/ref" if ref else ""))
    rows = {}
    for k, v in res.items():
        m = v["median"]
        line = (f"{k:14} {m:8.2f} {min(v['runs']):8.2f} {max(v['runs']):8.2f}  "
                f"{v['unit']:5} {1e3 / m:7.1f}")
        rows[k] = {"median": m, "runs": v["runs"], "unit": v["unit"], "batch": BATCH}
        if k in ref:
            r = ref[k]["median"]
            line += f" {r:7.4f} {m / r:9.0f}"
            rows[k].update(ref_median=r, ratio=m / r)
        print(line)
    meta = {"command": "python benchmarks/services.py " + " ".join(sys.argv[1:]),
            "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "machine": f"{platform.machine()} {os.cpu_count()} cpus, "
                       f"{platform.python_version()}",
            "batch": BATCH, "runs": a.runs, "packets_per_run": a.packets}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps({"meta": meta, "results": rows}, indent=2) + "\n")
    print(f"written to {a.out}")


if __name__ == "__main__":
    main()
