"""Compute scenarios: whole appliances on in-memory batches, one core, vs Python baselines.

    python benchmarks/compute.py [--runs 5] [--packets 1000000] [--cpu 0]
                                 [--scenarios switch,router,...] [--flows 1,1000000]
                                 [--batches 32,256,2048] [--no-ref] [--out FILE]
    python benchmarks/compute.py --profile --scenarios edge --flows 1 --batches 256

Each scenario is an appliance run by the inline engine (``dva.worker.engine``: what
``dva run --workers 0`` and every worker runs): the engine stamps and parses each
batch, runs the device chain, routes by verdict and fills per-port output batches.
64-byte UDP/IPv4 frames (60 bytes + FCS) arrive on one attachment, all of them
forwarded (checked after every pass: a drop fails the run, with the engine's drop
counters).

* ``switch``: a 4-port switch, 8 hosts learned, frames from port p0's hosts to the others;
* ``router``: a router with 100,000 random routes via a resolved gateway, frames to
  random addresses those routes cover;
* ``firewall``: a stateful firewall with 1,000 rules (999 that these frames do not
  match, then allow from inside) and its connection tracking;
* ``nat``: source NAT over a pool of 63 addresses;
* ``lb``: a Maglev load balancer, one UDP VIP with 10 backends (DNAT);
* ``vxlan``: encapsulation from the overlay to 64 MACs learned behind 4 remote VTEPs;
* ``edge``: the full edge chain switch -> router -> firewall -> NAT (the demo's).

Flows: ``1`` (every frame the same 5-tuple) or ``1000000`` distinct 5-tuples in random
order (laid out in that order, so that a pass reads its frames sequentially, as from a
receive ring). Stateful devices have seen every flow once before the measurement (a warm
pass over all flows), so the figure is that of tracked flows; their tables are sized
for the flow count. Each pass first writes the next frames (64 bytes) and their
metadata into the batch's slots (the ``fill`` row: its cost is included in every
figure, since devices rewrite frames in place).

Python baselines, measured in the same run on a sample of the same frames:

* ``jit-off``: the same code with numba's JIT switched off (``NUMBA_DISABLE_JIT=1``,
  in a subprocess, 1 flow, batch 256, a few thousand packets; the router with 1,000
  routes there, since building 100,000 routes uncompiled takes minutes);
* ``scapy``: a straightforward scapy implementation of the same scenario
  (``benchmarks/scapy_ref.py``: parse with scapy, dicts for tables, rebuild bytes).

Runs are interleaved round-robin over batch sizes; medians with min-max are printed
and written to ``--out`` (JSON).
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
from dataclasses import dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))
sys.path.insert(0, str(HERE))

SCENARIOS = ("switch", "router", "firewall", "nat", "lb", "vxlan", "edge")
BATCHES = (32, 256, 2048)
FLOWS = (1, 1_000_000)
ROUTES = 100_000
RULES = 1_000
FRAME = 64  # bytes kept per frame in the frame table (60 used)
HOST_MAC = "02:00:00:00:01:{:02x}"


# -- frames --------------------------------------------------------------------------------

def _ip(a: int) -> str:
    return f"{a >> 24}.{(a >> 16) & 255}.{(a >> 8) & 255}.{a & 255}"


def _ip_int(s: str) -> int:
    a, b, c, d = (int(x) for x in s.split("."))
    return a << 24 | b << 16 | c << 8 | d


def udp_frames(src_mac: str, dst_mac: str, src: np.ndarray, dst: np.ndarray,
               sport: np.ndarray, dport: np.ndarray) -> np.ndarray:
    """One 60-byte UDP/IPv4 frame per element (in a FRAME-wide row), header checksums
    computed, UDP checksum 0 (none, as IPv4 allows)."""
    from dva.packet.build import UDP, Eth, IPv4, Raw

    n = len(src)
    tmpl = bytes(Eth(src=src_mac, dst=dst_mac) / IPv4(src="0.0.0.0", dst="0.0.0.0")
                 / UDP(sport=1, dport=1, chksum=0) / Raw(bytes(18)))
    f = np.zeros((n, FRAME), np.uint8)
    f[:, :len(tmpl)] = np.frombuffer(tmpl, np.uint8)

    def put(off: int, v: np.ndarray, width: int) -> None:
        f[:, off:off + width] = np.ascontiguousarray(
            v.astype(">u4" if width == 4 else ">u2")).view(np.uint8).reshape(n, width)

    put(26, src, 4)
    put(30, dst, 4)
    put(34, sport, 2)
    put(36, dport, 2)
    f[:, 24:26] = 0
    words = f[:, 14:34].copy().view(">u2").astype(np.uint32).sum(axis=1)
    words = (words & 0xFFFF) + (words >> 16)
    words = (words & 0xFFFF) + (words >> 16)
    put(24, (~words) & 0xFFFF, 2)
    return f


def flow_fields(flows: int, seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """(host index, source port) of ``flows`` distinct flows: 200 hosts x 5000 ports."""
    i = np.arange(flows, dtype=np.int64)
    return i % 200, 1024 + (i // 200) % 60000


# -- appliances ----------------------------------------------------------------------------

def build_app(devices: dict, links: list, attach: dict):
    """An Appliance from its parts, without the YAML layer (100k routes parse slowly
    there); each device's config goes through its own model, as from a file."""
    from dva.graph.appliance import Appliance, Attachment, AttachSpec
    from dva.nf.registry import get

    devs = {}
    for name, body in devices.items():
        cls = get(body["type"])
        devs[name] = cls(name, cls.config_model.model_validate(body))
    lk = [(tuple(a.split(".")), tuple(b.split("."))) for a, b in links]
    att = [Attachment(*ref.split("."), AttachSpec(memory=m)) for ref, m in attach.items()]
    return Appliance("bench", "bench", devs, lk, att)


@dataclass
class Setup:
    app: object
    entry: str                     # the attachment the frames arrive on
    exit: str                      # the attachment they all leave by
    frames: np.ndarray             # (flows, FRAME) uint8
    warm: list = field(default_factory=list)  # (attachment, [frame bytes]) sent first
    stateful: bool = False         # run every flow once before measuring


def arp_reply(src_mac: str, src_ip: str, dst_mac: str, dst_ip: str) -> bytes:
    from dva.packet.build import ARP, Eth

    return bytes(Eth(src=src_mac, dst=dst_mac) / ARP(op=2, hwsrc=src_mac, psrc=src_ip,
                                                     hwdst=dst_mac, pdst=dst_ip))


def s_switch(flows: int, **_) -> Setup:
    app = build_app({"lan": {"type": "switch", "ports": ["p0", "p1", "p2", "p3"]}}, [],
                    {f"lan.p{p}": f"p{p}" for p in range(4)})
    warm = [(f"lan.p{h % 4}", [bytes.fromhex("ffffffffffff" + HOST_MAC.format(h)
                                             .replace(":", "") + "88b5") + bytes(46)])
            for h in range(8)]
    h, sport = flow_fields(flows)
    src_host = (h % 2) * 4  # hosts 0 and 4 are on p0
    dst_host = np.array([1, 2, 3, 5, 6, 7])[h % 6]
    fr = np.zeros((flows, FRAME), np.uint8)
    for s in (0, 4):
        for d in (1, 2, 3, 5, 6, 7):
            m = (src_host == s) & (dst_host == d)
            if m.any():
                k = int(m.sum())
                fr[m] = udp_frames(HOST_MAC.format(s), HOST_MAC.format(d),
                                   np.full(k, 0x0A000000 + s + 1), np.full(k, 0x0A000000 + d + 1),
                                   sport[m], np.full(k, 5000))
    # the exit is whichever port the destination is on: checked as "all forwarded"
    return Setup(app, "lan.p0", "*", fr, warm)


def _routes(n: int, seed: int = 7) -> tuple[list[dict], np.ndarray]:
    import random

    r = random.Random(seed)
    routes, dests, seen = [], [], set()
    while len(routes) < n:
        plen = r.choice((16, 20, 22, 24, 24, 24, 26, 28))
        a = r.randrange(0x0B000000, 0xDF000000) & (0xFFFFFFFF << (32 - plen))
        if (a, plen) in seen or (a >> 24) == 127 or (a >> 16) == 0xA9FE:
            continue  # duplicates; loopback and link-local are martians, dropped
        seen.add((a, plen))
        routes.append({"prefix": f"{_ip(a)}/{plen}", "via": "10.2.0.254"})
        dests.append(a | r.randrange(1, 1 << (32 - plen)))
    return routes, np.array(dests, np.int64)


def s_router(flows: int, routes: int = ROUTES, **_) -> Setup:
    rt, dests = _routes(routes)
    app = build_app({"r1": {"type": "router", "routes": rt, "max_routes": routes + 10,
                            "ports": {"a": {"ip": "10.1.0.1/24"}, "b": {"ip": "10.2.0.1/24"}}}},
                    [], {"r1.a": "a", "r1.b": "b"})
    r1 = app.devices["r1"]
    gw = "02:00:00:00:02:fe"
    warm = [("r1.b", [arp_reply(gw, "10.2.0.254", r1.port_mac_str("b"), "10.2.0.1")])]
    i = np.arange(flows, dtype=np.int64)
    rng = np.random.default_rng(3)
    dst = dests[rng.integers(0, len(dests), flows)] if flows > 1 else dests[:1]
    fr = udp_frames(HOST_MAC.format(2), r1.port_mac_str("a"), np.full(flows, 0x0A010002),
                    dst, 1024 + i % 60000, np.full(flows, 9))
    return Setup(app, "r1.a", "r1.b", fr, warm)


def _client_frames(flows: int, dst: int, dport: int, dst_mac: str = "02:00:00:00:00:01"):
    h, sport = flow_fields(flows)
    return udp_frames("02:00:00:00:00:05", dst_mac, 0x0A000002 + h, np.full(flows, dst),
                      sport, np.full(flows, dport))


def _fw_rules(n: int) -> list[dict]:
    deny = [{"action": "deny", "from": "inside", "proto": "tcp",
             "dst": f"172.16.{i // 250}.{i % 250 + 1}", "dport": 1000 + i} for i in range(n - 1)]
    return deny + [{"action": "allow", "from": "inside"}]


def s_firewall(flows: int, **_) -> Setup:
    app = build_app({"fw": {"type": "firewall", "ports": ["inside", "outside"],
                            "rules": _fw_rules(RULES), "max_flows": flows + 1024}},
                    [], {"fw.inside": "in", "fw.outside": "out"})
    return Setup(app, "fw.inside", "fw.outside", _client_frames(flows, 0xC0000209, 53),
                 stateful=True)


def s_nat(flows: int, **_) -> Setup:
    app = build_app({"nat": {"type": "nat", "ports": ["inside", "outside"],
                             "snat": {"to": "198.51.100.2-198.51.100.64"},
                             "max_flows": flows + 1024}},
                    [], {"nat.inside": "in", "nat.outside": "out"})
    return Setup(app, "nat.inside", "nat.outside", _client_frames(flows, 0xC0000209, 53),
                 stateful=True)


def s_lb(flows: int, **_) -> Setup:
    app = build_app({"lb": {"type": "lb", "ports": ["front", "back"], "max_flows": flows + 1024,
                            "vips": {"dns": {"addr": "203.0.113.10", "proto": "udp", "port": 53,
                                             "backends": [{"addr": f"10.0.1.{i}"}
                                                          for i in range(1, 11)]}}}},
                    [], {"lb.front": "front", "lb.back": "back"})
    return Setup(app, "lb.front", "lb.back", _client_frames(flows, 0xCB00710A, 53),
                 stateful=True)


from services import VX_LOCAL, VX_MAC, VX_REMOTES, _encapsulated, _vtep_mac  # noqa: E402


def s_vxlan(flows: int, **_) -> Setup:
    from dva.packet.build import UDP, Eth, IPv4, Raw

    app = build_app({"vx": {"type": "vxlan", "vni": 100, "local": f"{VX_LOCAL}/24",
                            "mac": VX_MAC, "remotes": VX_REMOTES}},
                    [], {"vx.overlay": "ov", "vx.underlay": "un"})
    arps = [arp_reply(_vtep_mac(r), ip, VX_MAC, VX_LOCAL) for r, ip in enumerate(VX_REMOTES)]
    learn = []  # frames from the remote side teach where the 02:00:00:02:.. MACs are
    for h in range(64):
        back = bytes(Eth(src=f"02:00:00:02:00:{h:02x}", dst=f"02:00:00:01:00:{h:02x}")
                     / IPv4(src=f"10.0.1.{h + 1}", dst=f"10.0.0.{h + 1}")
                     / UDP(sport=5000, dport=1024 + h, chksum=0) / Raw(bytes(18)))
        learn.append(_encapsulated(h % 4, back, h))
    h, sport = flow_fields(flows)
    fr = np.zeros((flows, FRAME), np.uint8)
    m64 = h % 64
    for k in range(64):
        m = m64 == k
        if m.any():
            c = int(m.sum())
            fr[m] = udp_frames(f"02:00:00:01:00:{k:02x}", f"02:00:00:02:00:{k:02x}",
                               np.full(c, 0x0A000001 + k) + (h[m] // 64 << 8),
                               np.full(c, 0x0A000101 + k), sport[m], np.full(c, 5000))
    return Setup(app, "vx.overlay", "vx.underlay", fr, [("vx.underlay", arps),
                                                        ("vx.underlay", learn)])


def s_edge(flows: int, **_) -> Setup:
    from dva.packet.build import ARP, Eth

    app = build_app({
        "lan": {"type": "switch", "ports": ["h1", "gw"]},
        "r1": {"type": "router", "ports": {"lan": {"ip": "10.0.0.1/24"},
                                           "wan": {"ip": "198.51.100.1/24"}},
               "routes": [{"prefix": "0.0.0.0/0", "via": "198.51.100.254"}]},
        "fw": {"type": "firewall", "ports": ["inside", "outside"], "rules": _fw_rules(RULES),
               "max_flows": flows + 1024},
        "nat": {"type": "nat", "ports": ["inside", "outside"],
                "snat": {"to": "198.51.100.2-198.51.100.64"}, "max_flows": flows + 1024}},
        [("lan.gw", "r1.lan"), ("r1.wan", "fw.inside"), ("fw.outside", "nat.inside")],
        {"lan.h1": "h1", "nat.outside": "wan"})
    r1 = app.devices["r1"]
    lan_mac, wan_mac = r1.port_mac_str("lan"), r1.port_mac_str("wan")
    host = HOST_MAC.format(2)
    up = "02:00:00:00:02:fe"
    ask = bytes(Eth(src=host, dst="ff:ff:ff:ff:ff:ff") / ARP(
        op=1, hwsrc=host, psrc="10.0.0.2", pdst="10.0.0.1"))  # the switch learns the router
    warm = [("lan.h1", [ask]),
            ("nat.outside", [arp_reply(up, "198.51.100.254", wan_mac, "198.51.100.1")])]
    h, sport = flow_fields(flows)
    fr = udp_frames(host, lan_mac, 0x0A000002 + h, np.full(flows, 0xC0000209), sport,
                    np.full(flows, 53))
    return Setup(app, "lan.h1", "nat.outside", fr, warm, stateful=True)


MAKERS = {"switch": s_switch, "router": s_router, "firewall": s_firewall, "nat": s_nat,
          "lb": s_lb, "vxlan": s_vxlan, "edge": s_edge}


# -- the harness ---------------------------------------------------------------------------

def load_kernel():
    """``load(data, meta, saved, frames, order, k0, n)``: rows 0..n-1 of ``meta`` become
    ``saved``'s (slot, start, length, port...) and their slots get the frames of flows
    ``order[k0 ...]`` (FRAME bytes each, as 32-bit words)."""
    from dva._jit import kernel
    from dva.packet import layout as L
    from dva.packet.checksum import rd32, wr32

    SLOT, START, NF = L.SLOT, L.START, L.NFIELDS

    @kernel
    def load(data, meta, saved, frames, order, k0, n):
        m = order.shape[0]
        for i in range(n):
            for j in range(NF):
                meta[i, j] = saved[i, j]
            f = order[(k0 + i) % m]
            buf, src, s = data[saved[i, SLOT]], frames[f], saved[i, START]
            for w in range(FRAME // 4):
                wr32(buf, s + 4 * w, rd32(src, 4 * w))
    return load


class Harness:
    """One scenario's appliance on an inline engine, fed from its frame table."""

    def __init__(self, name: str, flows: int, batches: tuple[int, ...], **kw) -> None:
        from dva.graph.plan import compile_plan
        from dva.packet.batch import PacketBatch
        from dva.packet.pool import PacketPool
        from dva.worker.engine import Engine

        self.name, self.flows = name, flows
        st = MAKERS[name](flows, **kw)
        self.setup = st
        plan = compile_plan(st.app)
        refs = [a.ref for a in plan.attachments]
        self.entry = refs.index(st.entry)
        self.exit = None if st.exit == "*" else refs.index(st.exit)
        total = sum(batches)
        self.pool = PacketPool(total + 8192)
        self.engine = Engine(plan, self.pool)
        self.now = 1.0
        for ref, frames in st.warm:
            b = PacketBatch(self.pool, len(frames))
            for f in frames:
                b.add_frame(f)
            for o in self.engine.process(refs.index(ref), b, self.now):
                o.release_all()
        self.load = load_kernel()
        self.batches = {}
        for n in batches:
            b = PacketBatch(self.pool, n)
            for _ in range(n):
                b.add_frame(bytes(FRAME - 4))
            saved = b.meta[:n].copy()
            self.batches[n] = (b, saved)
        # Random flow order, laid out in that order once: a pass reads its frames
        # sequentially, as a NIC's receive ring hands them over (reading them from
        # random rows of a 64 MB table would add a cache miss per packet to the figure).
        perm = np.random.default_rng(11).permutation(flows)
        st.frames = np.ascontiguousarray(st.frames[perm])
        self.order = np.arange(flows, dtype=np.int64)
        self.k = 0
        if st.stateful and flows > 1:  # every flow seen once: measure tracked flows
            self.run(max(batches), flows, order=self.order.copy())
        self.run(min(batches), 4 * min(batches))  # compile / warm every path

    def run(self, n: int, packets: int, order: np.ndarray | None = None) -> float:
        """Pass ``packets`` frames through in batches of ``n``; Mpps."""
        b, saved = self.batches[n]
        order = self.order if order is None else order
        eng, load, frames, data = self.engine, self.load, self.setup.frames, self.pool.data
        want, ex = n, self.exit
        done = 0
        k = 0 if order is not self.order else self.k
        t0 = time.perf_counter()
        while done < packets:
            b.ensure_capacity(n)
            load(data, b.meta, saved, frames, order, k, n)
            b.n = n
            self.now += 1e-5
            outs = eng.process(self.entry, b, self.now)
            got = outs[ex].n if ex is not None else sum(o.n for o in outs)
            if got != want:
                raise RuntimeError(f"{self.name}: {want - got} of {want} frames not "
                                   f"forwarded: " + ", ".join(
                                       f"{k} {v}" for k, v in eng.counter_table().items()
                                       if "drop" in k and v))
            for o in outs:
                o.n = 0  # "sent": the slots are filled again by the next pass
            k += n
            done += n
        dt = time.perf_counter() - t0
        if order is self.order:
            self.k = k % len(order)
        return done / dt / 1e6

    def fill_only(self, n: int, packets: int) -> float:
        b, saved = self.batches[n]
        done, t0 = 0, time.perf_counter()
        while done < packets:
            self.load(self.pool.data, b.meta, saved, self.setup.frames, self.order, done, n)
            done += n
        return done / (time.perf_counter() - t0) / 1e6


def frames_sample(name: str, n: int) -> tuple[Setup, list[bytes]]:
    """The first ``n`` frames (distinct flows) of a scenario, as bytes, with its setup."""
    st = MAKERS[name](n, routes=1000) if name == "router" else MAKERS[name](n)
    return st, [bytes(st.frames[i, :60]) for i in range(n)]


def reference(names: list[str], packets: int) -> dict[str, float]:
    """The JIT-off figures: this module in a subprocess with NUMBA_DISABLE_JIT=1."""
    env = dict(os.environ, NUMBA_DISABLE_JIT="1")
    out = subprocess.run([sys.executable, __file__, "--reference-child", ",".join(names),
                          "--packets", str(packets)], env=env, capture_output=True, text=True,
                         timeout=3600)
    if out.returncode:
        raise RuntimeError(f"JIT-off reference failed: {out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _reference_child(names: list[str], packets: int) -> None:
    res = {}
    for name in names:
        h = Harness(name, 1, (256,), **({"routes": 1000} if name == "router" else {}))
        res[name] = statistics.median(h.run(256, packets) for _ in range(3))
    print(json.dumps(res))


def scapy_figures(names: list[str], packets: int) -> dict[str, float]:
    import scapy_ref

    res = {}
    for name in names:
        st, frames = frames_sample(name, 1)
        res[name] = scapy_ref.measure(name, st, frames, packets)
    return res


def profile(name: str, flows: int, batch: int, packets: int, say=print) -> list[tuple]:
    """Where a scenario's time goes: cProfile over one run (numba reports each compiled
    call to the profiler, argument unboxing included), per call site, in ns per
    packet, after the same run unprofiled (the profiler adds its own cost to every
    Python-level call)."""
    import cProfile
    import pstats

    h = Harness(name, flows, (batch,))
    h.run(batch, packets // 4)
    mpps = statistics.median(h.run(batch, packets) for _ in range(3))
    pr = cProfile.Profile()
    pr.enable()
    h.run(batch, packets)
    pr.disable()
    st = pstats.Stats(pr)
    rows = sorted(((tt, f"{Path(f).name}:{ln}({fn})", nc) for (f, ln, fn), (_, nc, tt, _, _)
                   in st.stats.items()), reverse=True)
    say(f"{name}, {flows:,} flow(s), batch {batch}: {mpps:.2f} Mpps = {1e3 / mpps:.0f} ns "
        f"per packet unprofiled, {1e9 * st.total_tt / packets:.0f} profiled")
    per_batch = packets // batch
    for tt, where, nc in rows[:16]:
        say(f"  {1e9 * tt / packets:6.0f} ns/packet  {nc / per_batch:4.1f} calls/batch  {where}")
    return rows


def pin(cpu: int | None) -> None:
    if cpu is not None and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {cpu})


def run_compute(names: list[str], flows: list[int], batches: list[int], runs: int,
                packets: int, ref: bool = True, say=print) -> dict:
    """Every (scenario, flows, batch): ``runs`` figures interleaved over the batch sizes,
    plus the fill cost and (``ref``) the JIT-off and scapy baselines. JSON-able."""
    cells = []
    for name in names:
        for f in flows:
            t0 = time.perf_counter()
            h = Harness(name, f, tuple(batches))
            setup_s = time.perf_counter() - t0
            figs = {n: [] for n in batches}
            fill = {n: [] for n in batches}
            for _ in range(runs):
                for n in batches:
                    figs[n].append(h.run(n, packets))
                    fill[n].append(h.fill_only(n, packets))
            for n in batches:
                v = figs[n]
                cells.append({"scenario": name, "flows": f, "batch": n,
                              "mpps": statistics.median(v), "min": min(v), "max": max(v),
                              "runs": v, "fill_mpps": statistics.median(fill[n]),
                              "setup_s": setup_s})
                say(f"  {name:9} flows {f:>9,} batch {n:>5}: {statistics.median(v):6.2f} Mpps "
                    f"({min(v):.2f} - {max(v):.2f})")
            del h
    res = {"cells": cells}
    if ref:
        say("  JIT-off reference (subprocess) ...")
        res["jit_off"] = reference(names, 2048)
        say("  scapy baseline ...")
        res["scapy"] = scapy_figures(names, 2000)
        for c in cells:
            c["x_jit_off"] = c["mpps"] / res["jit_off"][c["scenario"]]
            c["x_scapy"] = c["mpps"] / res["scapy"][c["scenario"]]
    return res


def table(res: dict) -> str:
    lines = [f"{'scenario':9} {'flows':>9} {'batch':>5} {'Mpps':>7} {'min-max':>13} "
             f"{'fill':>6} {'x jit-off':>10} {'x scapy':>9}"]
    for c in res["cells"]:
        lines.append(f"{c['scenario']:9} {c['flows']:>9,} {c['batch']:>5} {c['mpps']:7.2f} "
                     f"{c['min']:6.2f}-{c['max']:<6.2f} {c['fill_mpps']:6.1f} "
                     f"{c.get('x_jit_off', 0):9.0f}x {c.get('x_scapy', 0):8.0f}x")
    if "jit_off" in res:
        lines.append("baselines (Mpps, 1 flow): " + ", ".join(
            f"{k} jit-off {res['jit_off'][k]:.4f} / scapy {res['scapy'][k]:.4f}"
            for k in res["jit_off"]))
    return "\n".join(lines)


def meta(argv: list[str]) -> dict:
    import numba

    return {"command": " ".join(["python", f"benchmarks/{Path(sys.argv[0]).name}", *argv]),
            "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "machine": f"{platform.machine()} {os.cpu_count()} cpus",
            "python": platform.python_version(), "numba": numba.__version__}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--packets", type=int, default=1_000_000)
    ap.add_argument("--cpu", type=int, default=0)
    ap.add_argument("--scenarios", default=",".join(SCENARIOS))
    ap.add_argument("--flows", default=",".join(map(str, FLOWS)))
    ap.add_argument("--batches", default=",".join(map(str, BATCHES)))
    ap.add_argument("--no-ref", action="store_true", help="skip the JIT-off and scapy baselines")
    ap.add_argument("--profile", action="store_true",
                    help="instead: where the time goes (cProfile, per call site) of each "
                         "scenario at the first flow count and batch size given")
    ap.add_argument("--reference-child", help=argparse.SUPPRESS)
    ap.add_argument("--out", default=str(HERE / "results" / "compute.json"))
    a = ap.parse_args()
    if a.reference_child:
        _reference_child(a.reference_child.split(","), a.packets)
        return
    names = a.scenarios.split(",")
    bad = [n for n in names if n not in MAKERS]
    if bad:
        sys.exit(f"compute: unknown scenario(s) {', '.join(bad)}; known: {', '.join(SCENARIOS)}")
    pin(a.cpu)
    if a.profile:
        for n in names:
            profile(n, int(a.flows.split(",")[0]), int(a.batches.split(",")[0]), a.packets)
        return
    res = run_compute(names, [int(x) for x in a.flows.split(",")],
                      [int(x) for x in a.batches.split(",")], a.runs, a.packets, not a.no_ref)
    res["meta"] = meta(sys.argv[1:])
    print(table(res))
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(res, indent=2) + "\n")
    print(f"written to {a.out}")


if __name__ == "__main__":
    main()
