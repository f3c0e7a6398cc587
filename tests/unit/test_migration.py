"""Bucket moves and scaling in the multi-process runtime, with stateful flows.

10,000 TCP and UDP flows through a stateful firewall and a NAT (memory ports, two
worker processes): connections are opened and answered first (the replies addressed
to the ports the NAT chose), then every flow exchanges numbered packets both ways
while the buckets move. Nothing may be lost, reordered within a flow or re-created,
and no NAT mapping may change.
"""

from __future__ import annotations

import os
import random
from collections import defaultdict

import numpy as np
import pytest

from dva.dispatch.runtime import MoveFailed, Runtime
from dva.graph.appliance import parse_appliance
from dva.packet.build import TCP, UDP, Eth, IPv4, Raw
from dva.packet.steer import flow_buckets, plan_aliases
from dva.ports.offline import MemoryPort
from dva.worker import stage
from tests.runtime_trace import FW_NAT as APPLIANCE

PUB = "198.51.100.2"
IN_MAC, OUT_MAC = "02:00:00:00:00:11", "02:00:00:00:00:fe"
DT = 2e-5  # capture time between two packets


def ports_of(frame: bytes) -> tuple[str, str, int, int, int]:
    ihl = (frame[14] & 15) * 4
    src = ".".join(str(b) for b in frame[26:30])
    dst = ".".join(str(b) for b in frame[30:34])
    l4 = 14 + ihl
    return (src, dst, frame[23], int.from_bytes(frame[l4:l4 + 2], "big"),
            int.from_bytes(frame[l4 + 2:l4 + 4], "big"))


def payload_tag(frame: bytes) -> tuple[int, int]:
    """(flow, round) carried in the last 8 bytes of a data packet."""
    return int.from_bytes(frame[-8:-4], "big"), int.from_bytes(frame[-4:], "big")


class Flows:
    """The flows: ``n`` of them, half TCP, half UDP, from many inside hosts."""

    def __init__(self, n: int, seed: int = 3) -> None:
        r = random.Random(seed)
        self.flows = []
        for i in range(n):
            host = f"10.{1 + i // 60000}.{(i // 250) % 240}.{1 + i % 250}"
            remote = f"203.0.113.{r.randrange(1, 250)}"
            self.flows.append(("tcp" if i % 2 else "udp", host, 1024 + r.randrange(60000),
                               remote, r.choice([53, 80, 443, 8443])))
        self.nat: dict[int, int] = {}  # flow -> the source port the NAT chose

    def lan(self, i: int, l4) -> bytes:
        _, host, _, remote, _ = self.flows[i]
        return bytes(Eth(src=IN_MAC, dst=OUT_MAC) / IPv4(src=host, dst=remote, id=i)
                     / l4)

    def wan(self, i: int, l4) -> bytes:
        remote = self.flows[i][3]
        return bytes(Eth(src=OUT_MAC, dst=IN_MAC) / IPv4(src=remote, dst=PUB) / l4)

    def opening(self, i: int) -> bytes:
        kind, _, sport, _, dport = self.flows[i]
        if kind == "tcp":
            return self.lan(i, TCP(sport=sport, dport=dport, flags="S", seq=1000))
        return self.lan(i, UDP(sport=sport, dport=dport) / Raw(b"q" * 12))

    def answer(self, i: int) -> bytes:
        kind, _, _, _, dport = self.flows[i]
        xs = self.nat[i]
        if kind == "tcp":
            return self.wan(i, TCP(sport=dport, dport=xs, flags="SA", seq=5000, ack=1001))
        return self.wan(i, UDP(sport=dport, dport=xs) / Raw(b"a" * 12))

    def data(self, i: int, k: int, out: bool) -> bytes:
        """Round ``k`` (1..) of flow ``i``, inside -> outside (``out``) or back."""
        kind, _, sport, _, dport = self.flows[i]
        tag = i.to_bytes(4, "big") + k.to_bytes(4, "big")
        if kind == "udp":
            if out:
                return self.lan(i, UDP(sport=sport, dport=dport) / Raw(tag))
            return self.wan(i, UDP(sport=dport, dport=self.nat[i]) / Raw(tag))
        if out:
            return self.lan(i, TCP(sport=sport, dport=dport, flags="PA",
                                   seq=1001 + 8 * (k - 1), ack=5001 + 8 * (k - 1)) / Raw(tag))
        return self.wan(i, TCP(sport=dport, dport=self.nat[i], flags="PA",
                               seq=5001 + 8 * (k - 1), ack=1001 + 8 * k) / Raw(tag))


def opened_runtime(fl: Flows, workers: int = 2, **kw):
    """A runtime whose NAT and firewall track every flow of ``fl`` (opened, answered)."""
    mem = {"lan": MemoryPort("fw.inside"), "wan": MemoryPort("nat.outside")}
    rt = Runtime([parse_appliance(APPLIANCE)], workers=workers, live=False, memory=mem,
                 **kw)
    t = 1.0
    for i in range(len(fl.flows)):
        mem["lan"].inbox.append((t, fl.opening(i)))
        t += DT
    rt.run_inputs()
    assert len(mem["wan"].sent) == len(fl.flows)
    for _, f in mem["wan"].sent:  # which flow is which: the IP id says (kept by NAT)
        s, d, _, sp, dp = ports_of(f)
        i = int.from_bytes(f[18:20], "big")
        assert s == PUB and (d, dp) == (fl.flows[i][3], fl.flows[i][4])
        fl.nat[i] = sp
    assert len(fl.nat) == len(fl.flows)
    mem["wan"].sent.clear()
    t += 0.3
    for i in range(len(fl.flows)):
        mem["wan"].inbox.append((t, fl.answer(i)))
        t += DT
    rt.run_inputs()
    assert len(mem["lan"].sent) == len(fl.flows)
    mem["lan"].sent.clear()
    return rt, mem, t + 0.3


def run_rounds(fl: Flows, rt, mem, t0: float, rounds: int, between=None):
    """Every flow sends ``rounds`` numbered packets each way, interleaved."""
    t = t0
    for k in range(1, rounds + 1):
        for i in range(len(fl.flows)):
            mem["lan"].inbox.append((t, fl.data(i, k, True)))
            mem["wan"].inbox.append((t + DT / 2, fl.data(i, k, False)))
            t += DT
    rt.run_inputs(between)
    return t


def check_delivery(fl: Flows, mem, rounds: int) -> None:
    """Every numbered packet arrived, once, in order per flow and direction, and the
    outside saw each flow from the NAT port it had from the start."""
    out_rounds = defaultdict(list)
    for _, f in mem["wan"].sent:
        s, _, _, sp, _ = ports_of(f)
        i, k = payload_tag(f)
        assert s == PUB and sp == fl.nat[i], (i, sp, fl.nat[i])  # mapping unchanged
        out_rounds[i].append(k)
    back_rounds = defaultdict(list)
    for _, f in mem["lan"].sent:
        _, d, _, _, dp = ports_of(f)
        i, k = payload_tag(f)
        assert (d, dp) == (fl.flows[i][1], fl.flows[i][2])  # translated back
        back_rounds[i].append(k)
    want = list(range(1, rounds + 1))
    lost_or_reordered = [i for i in range(len(fl.flows))
                         if out_rounds[i] != want or back_rounds[i] != want]
    assert lost_or_reordered == [], [(i, out_rounds[i], back_rounds[i])
                                     for i in lost_or_reordered[:5]]


def test_moving_every_bucket_of_a_worker_under_traffic_loses_and_recreates_nothing():
    n, rounds = 10_000, 3
    fl = Flows(n)
    rt, mem, t = opened_runtime(fl)
    try:
        app = rt.apps[0]
        from dva.graph.plan import compile_plan
        b = flow_buckets([fl.opening(i) for i in range(n)], nbuckets=rt.nbuckets,
                         alias=plan_aliases(compile_plan(app)))
        on0 = int((rt.table[b] == 0).sum())
        assert 0.4 * n < on0 < 0.6 * n
        moved = {}
        mid = t + rounds * n * DT / 2

        def between(rt, now):
            if not moved and now >= mid:
                moved.update(rt.move(np.flatnonzero(rt.table == 0), 1))
        run_rounds(fl, rt, mem, t, rounds, between)
        assert moved["buckets"] == 2048 and moved["to"] == 1 and moved["from"] == [0]
        assert (rt.table == 1).all()
        c = rt.stop()
    finally:
        rt.close()
    check_delivery(fl, mem, rounds)
    assert c["fw flows_created"] == n and c["nat flows_created"] == n  # none re-created
    assert c["nat mappings_created"] == n
    drops = {k: v for k, v in c.items() if "drop/" in k and v}
    assert drops == {}, drops
    assert c["migration moves"] == 1 and c["migration buckets_moved"] == 2048
    # both conntrack tables (firewall and NAT) of every flow on worker 0 moved
    assert c["migration flows_moved"] >= 2 * on0
    assert c["migration packets_held"] == 0  # offline: nothing arrives during a move
    assert rt.final_errors == []
    # the flow state went through a staged file in /dev/shm, removed after the move
    assert list(stage.stage_dir().glob(f"{stage.PREFIX}{os.getpid()}-*")) == []


def test_scaling_out_and_in_moves_a_fair_share_and_keeps_every_flow():
    n, rounds = 2_000, 4
    fl = Flows(n, seed=5)
    rt, mem, t = opened_runtime(fl, workers=1, nbuckets=1024)
    try:
        steps = {}
        span = rounds * n * DT

        def between(rt, now):
            if "out" not in steps and now >= t + span / 3:
                steps["out"] = rt.scale(2)
            if "in" not in steps and now >= t + 2 * span / 3:
                steps["in"] = rt.scale(1)
        run_rounds(fl, rt, mem, t, rounds, between)
        st = rt.status()
        c = rt.stop()
    finally:
        rt.close()
    assert sum(m["buckets"] for m in steps["out"]) == 512  # half, no more
    assert sum(m["buckets"] for m in steps["in"]) == 512
    assert st["workers"] == 1 and (rt.table == 0).all()
    assert any("scaled 1 -> 2" in d for d in st["decisions"])
    check_delivery(fl, mem, rounds)
    assert c["fw flows_created"] == n and c["nat flows_created"] == n
    assert {k: v for k, v in c.items() if "drop/" in k and v} == {}
    assert c["runtime workers"] == 1 and c["migration moves"] == 2
    # the stopped worker's counters stay in the totals
    assert c["fw.inside rx"] == n * (rounds + 1)


def test_a_failed_import_rolls_the_move_back_and_nothing_is_lost():
    n, rounds = 400, 2
    fl = Flows(n, seed=9)
    rt, mem, t = opened_runtime(fl)
    try:
        before = rt.table.copy()
        failed = []

        def between(rt, now):
            if not failed and now >= t + rounds * n * DT / 2:
                orig = rt.call

                def bad_call(w, msg, timeout=30.0):  # the flow state arrives damaged
                    if msg[0] == "move_in":
                        head, places, area = msg[2]
                        msg = (*msg[:2], (head, [(a, o, n + 8) for a, o, n in places],
                                          area), *msg[3:])
                    return orig(w, msg, timeout)
                rt.call = bad_call
                try:
                    with pytest.raises(MoveFailed):
                        rt.move(np.flatnonzero(rt.table == 0), 1)
                finally:
                    rt.call = orig
                failed.append(True)
        run_rounds(fl, rt, mem, t, rounds, between)
        assert failed and (rt.table == before).all()  # rolled back
        c = rt.stop()
    finally:
        rt.close()
    check_delivery(fl, mem, rounds)
    assert c["migration rollbacks"] == 1 and c["migration moves"] == 0
    assert list(stage.stage_dir().glob(f"{stage.PREFIX}{os.getpid()}-*")) == []
    assert c["fw flows_created"] == n
