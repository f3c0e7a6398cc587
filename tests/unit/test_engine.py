"""The inline engine: wiring, hop limit, graph drops and exact accounting."""

from __future__ import annotations

from typing import Literal

import numpy as np
import pytest

from dva.dispatch.offline import OfflineRunner
from dva.graph.appliance import parse_appliance
from dva.nf import registry
from dva.nf.base import MULTI, Device, DeviceConfig, DeviceState
from dva.packet import layout as L
from dva.packet.build import UDP, Eth, IPv4
from dva.ports.offline import MemoryPort

BCAST = bytes(Eth(src="02:00:00:00:00:01", dst="ff:ff:ff:ff:ff:ff")
              / IPv4(src="10.0.0.1", dst="10.0.0.255") / UDP(sport=1, dport=2))


def run(text: str, inputs: dict[str, list[bytes]], **kw):
    ports = {n: MemoryPort(n) for n in inputs}
    for n, frames in inputs.items():
        ports[n].inject(frames)
    app = parse_appliance(text)
    with OfflineRunner(app, memory=ports, **kw) as r:
        res = r.run()
        avail = r.pool.available
        nslots = r.pool.nslots
    return res, ports, avail == nslots


LOOP = """
appliance: loop
devices:
  s1: {type: switch, ports: [h1, l1, l2]}
  s2: {type: switch, ports: [l1, l2, h2]}
links:
  - [s1.l1, s2.l1]
  - [s1.l2, s2.l2]
attach:
  s1.h1: {memory: h1}
  s2.h2: {memory: h2}
"""


def test_wiring_loop_is_cut_by_the_hop_limit():
    # Two switches joined twice: a broadcast circulates until the hop limit. Each
    # switch visit k (1..16) of the two copies sends one copy to its host.
    res, ports, no_leak = run(LOOP, {"h1": [BCAST], "h2": []}, hop_limit=16)
    assert res.accounting_errors == []
    assert no_leak
    c = res.counters
    assert c["graph drop/hop_limit"] == 2
    assert len(ports["h2"].sent) == 16  # visits 2, 4, ..., 16 reach s2
    assert len(ports["h1"].sent) == 14  # visits 3, 5, ..., 15 reach s1
    res8, ports8, _ = run(LOOP, {"h1": [BCAST], "h2": []}, hop_limit=8)
    assert res8.counters["graph drop/hop_limit"] == 2
    assert len(ports8["h2"].sent) == 8


def test_unconnected_port_is_a_counted_graph_drop():
    text = """
appliance: u
devices:
  lan: {type: switch, ports: [h1, h2, dangling]}
attach:
  lan.h1: {memory: h1}
  lan.h2: {memory: h2}
"""
    app = parse_appliance(text)
    assert any("lan.dangling" in w for w in app.warnings)
    res, ports, no_leak = run(text, {"h1": [BCAST], "h2": []})
    assert res.accounting_errors == [] and no_leak
    assert res.counters["graph drop/unconnected"] == 1
    assert res.counters["lan.dangling tx"] == 1
    assert [f for _, f in ports["h2"].sent] == [BCAST]


# A user device type that misbehaves on purpose: the engine must count, not crash.
class OddConfig(DeviceConfig):
    type: Literal["odd"]
    ports: list[str]

    def port_names(self) -> list[str]:
        return list(self.ports)


class Odd(Device):
    """Port 0 in; by the first payload byte: 0 -> out port 1, 1 -> port 9 (no such
    port), 2 -> drop reason 5 (undeclared), 3 -> MULTI with an empty mask, 4 -> no
    verdict at all, 5 -> MULTI to ports 1 and 2."""

    type_name = "odd"
    config_model = OddConfig
    drop_reasons = ("one",)

    def new_state(self) -> DeviceState:
        return DeviceState(0)

    def process(self, batch, state, now) -> None:
        for i in range(batch.n):
            kind = batch.frame(i)[14]
            row = batch.meta[i]
            if kind == 0:
                row[L.VERDICT] = 1
            elif kind == 1:
                row[L.VERDICT] = 9
            elif kind == 2:
                row[L.VERDICT] = -3 - 5
            elif kind == 3:
                row[L.VERDICT] = MULTI
                row[L.MASK] = 0
            elif kind == 5:
                row[L.VERDICT] = MULTI
                row[L.MASK] = 0b110


@pytest.fixture(scope="module", autouse=True)
def _odd_registered():
    registry.register(Odd)


def test_invalid_verdicts_are_counted_per_device():
    text = """
appliance: odd
devices:
  o: {type: odd, ports: [a, b, c]}
attach:
  o.a: {memory: a}
  o.b: {memory: b}
  o.c: {memory: c}
"""
    frames = [bytes(Eth(src="02:00:00:00:00:01", dst="02:00:00:00:00:02", type=0x88B5))
              + bytes([k]) + bytes(45) for k in range(6)]
    res, ports, no_leak = run(text, {"a": frames, "b": [], "c": []})
    assert res.accounting_errors == [] and no_leak
    c = res.counters
    assert c["graph drop/bad_verdict"] == 3  # port 9, reason 5, no verdict
    assert c["graph drop/empty_flood"] == 1
    assert c["o invalid_verdict"] == 4
    assert c["o replicas"] == 1
    assert [f for _, f in ports["b"].sent] == [frames[0], frames[5]]
    assert [f for _, f in ports["c"].sent] == [frames[5]]


def test_pool_exhaustion_is_counted_not_lost():
    text = """
appliance: p
devices:
  lan: {type: switch, ports: [h1, h2, h3, h4, h5, h6, h7, h8]}
attach:
""" + "".join(f"  lan.h{i}: {{memory: h{i}}}\n" for i in range(1, 9))
    frames = [bytes(Eth(src=f"02:00:00:00:00:{i:02x}", dst="ff:ff:ff:ff:ff:ff")
                    / IPv4(src="10.0.0.1", dst="10.0.0.255") / UDP(sport=i, dport=2))
              for i in range(1, 40)]
    res, ports, no_leak = run(text, {"h1": frames, **{f"h{i}": [] for i in range(2, 9)}},
                              pool_slots=64, batch_size=39)
    assert res.accounting_errors == [] and no_leak
    c = res.counters
    delivered = sum(len(p.sent) for p in ports.values())
    assert c["graph drop/pool_exhausted"] > 0
    assert delivered + c["graph drop/pool_exhausted"] == 39 * 7


def test_order_is_kept_per_port_across_flood_and_unicast():
    # A flood (copied) followed by unicast to the same port must not overtake it.
    text = """
appliance: o
devices:
  lan: {type: switch, ports: [h1, h2, h3]}
attach:
  lan.h1: {memory: h1}
  lan.h2: {memory: h2}
  lan.h3: {memory: h3}
"""
    learn = bytes(Eth(src="02:00:00:00:00:02", dst="ff:ff:ff:ff:ff:ff") / IPv4(
        src="10.0.0.2", dst="10.0.0.255") / UDP(sport=9, dport=9))
    seq = []
    for k in range(50):
        dst = "02:00:00:00:00:02" if k % 2 else "02:00:00:00:00:77"
        seq.append(bytes(Eth(src="02:00:00:00:00:01", dst=dst) / IPv4(
            src="10.0.0.1", dst="10.0.0.2") / UDP(sport=1000, dport=k)))
    ports = {n: MemoryPort(n) for n in ("h1", "h2", "h3")}
    ports["h2"].inbox.append((0.0, learn))
    for f in seq:
        ports["h1"].inbox.append((1.0, f))
    with OfflineRunner(parse_appliance(text), memory=ports) as r:
        res = r.run()
    assert res.accounting_errors == []
    assert [f for _, f in ports["h2"].sent] == seq
    assert [f for _, f in ports["h3"].sent][1:] == seq[0::2]


def test_engine_rejects_bad_parameters():
    app = parse_appliance(LOOP)
    with pytest.raises(ValueError):
        OfflineRunner(app, nbuckets=1000, memory={"h1": MemoryPort("h1"), "h2": MemoryPort("h2")})
    with pytest.raises(ValueError):
        OfflineRunner(app, batch_size=0)


def test_oversized_frame_is_an_ingress_drop():
    text = """
appliance: big
devices:
  lan: {type: switch, ports: [h1, h2]}
attach:
  lan.h1: {memory: h1}
  lan.h2: {memory: h2}
"""
    res, ports, no_leak = run(text, {"h1": [BCAST, BCAST + bytes(4000)], "h2": []})
    assert res.accounting_errors == [] and no_leak
    assert res.counters["attach lan.h1 drop/too_long"] == 1
    assert res.counters["attach lan.h1 rx"] == 1
    assert len(ports["h2"].sent) == 1
    assert np.int64(res.counters["lan.h2 tx"]) == 1
