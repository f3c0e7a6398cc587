"""Config reload (dva.worker.reload): a new generation takes over a running engine.

Flow state survives a rule change (an open connection keeps passing, a new one meets
the new rules), a device of another type under the same name starts fresh, state that
does not fit the new tables is reported and dropped, other attachments are refused,
held packets leave under a named reason, and the counters keep adding up
(``accounting_errors() == []`` and no leaked slot after every step, via the rig).
"""

from __future__ import annotations

import pytest
from rig import Rig

from dva.graph.appliance import parse_appliance
from dva.packet.build import ARP, TCP, UDP, Eth, IPv4, Raw
from dva.worker.reload import (
    ReloadRejected,
    SwapReport,
    held_packets,
    prepare,
    swap,
)

IN_MAC, OUT_MAC = "02:00:00:00:00:05", "02:00:00:00:00:01"


def firewall(rules: str = "[{action: allow, from: inside}]", extra: str = "",
             outside: str = "out") -> str:
    return f"""
appliance: t
devices:
  fw:
    type: firewall
    ports: [inside, outside]
    rules: {rules}
{extra}
attach:
  fw.inside: {{memory: in}}
  fw.outside: {{memory: {outside}}}
"""


def seg(src, sport, dst, dport, flags, seq=0, ack=0, payload=b"") -> bytes:
    smac, dmac = (IN_MAC, OUT_MAC) if src.startswith("10.") else (OUT_MAC, IN_MAC)
    return bytes(Eth(src=smac, dst=dmac) / IPv4(src=src, dst=dst)
                 / TCP(sport=sport, dport=dport, seq=seq, ack=ack, flags=flags,
                       window=65535) / Raw(payload))


class Conn:
    """A TCP connection from ``a``:sport (inside) to ``b``:dport (outside) or the other
    way round; ``seq``/``rseq``: the next sequence numbers of opener and answerer."""

    def __init__(self, rig: Rig, sport=40000, dport=80, a="10.0.0.5", b="192.0.2.9",
                 side="inside"):
        self.rig, self.sport, self.dport, self.a, self.b = rig, sport, dport, a, b
        self.side, self.other = side, ("outside" if side == "inside" else "inside")
        self.seq, self.rseq = 1000, 5000

    def out(self, flags, payload=b"", now=1.0):
        f = seg(self.a, self.sport, self.b, self.dport, flags, self.seq, self.rseq, payload)
        self.seq += len(payload) + ("S" in flags) + ("F" in flags)
        return self.rig.send(self.side, [f], now)[self.other]

    def back(self, flags, payload=b"", now=1.0):
        f = seg(self.b, self.dport, self.a, self.sport, flags, self.rseq, self.seq, payload)
        self.rseq += len(payload) + ("S" in flags) + ("F" in flags)
        return self.rig.send(self.other, [f], now)[self.side]

    def open(self, now=1.0) -> bool:
        if not self.out("S", now=now):
            return False
        assert self.back("SA", now=now)
        assert self.out("A", now=now)
        return True


def reload(rig: Rig, text: str, now: float) -> SwapReport:
    """What dva run does on SIGHUP, on a rig: prepare, swap, send the old generation's
    last frames (none here), then go on with the new engine."""
    old = rig.engine
    new = prepare(parse_appliance(text), old)
    report = swap(old, new, now)
    for o in report.outputs:
        o.release_all()
    rig.engine, rig.plan = new, new.plan
    rig.names = [a.port for a in new.plan.attachments]
    rig.check()
    return report


def test_an_open_connection_survives_a_rule_change_and_new_ones_meet_the_new_rules():
    rig = Rig(firewall())
    c = Conn(rig)
    assert c.open()
    assert c.out("PA", b"hello") and c.back("PA", b"world")
    before = rig.counters()
    rep = reload(rig, firewall("[{action: allow, from: outside, proto: tcp, dport: 22}]"),
                 2.0)
    assert rep.state_kept == ["fw"] and rep.fresh == {} and rep.problems == []
    assert rep.counters_kept == ["fw"] and rep.counters_restarted == []
    # the open connection passes both ways, and closes normally
    assert c.out("PA", b"more", now=2.1) and c.back("PA", b"data", now=2.1)
    assert c.out("FA", now=2.2) and c.back("FA", now=2.2) and c.out("A", now=2.2)
    # a new connection from inside: no rule allows it any more
    assert not Conn(rig, sport=40001).open(now=2.3)
    # a new one from outside to port 22: the new rule allows it
    assert Conn(rig, sport=50000, dport=22, a="192.0.2.9", b="10.0.0.5",
                side="outside").open(now=2.4)
    after = rig.counters()
    assert after["fw drop/denied"] == 1 and after["fw default_hits"] == 1
    # counters went on from where they were
    assert after["fw.inside rx"] == before["fw.inside rx"] + 5
    assert after["fw.outside rx"] == before["fw.outside rx"] + 4
    assert after["attach fw.inside rx"] == after["fw.inside rx"]
    assert after["fw flows_created"] == 2  # one before the reload, one after
    # rule1 is another rule now: its count starts over
    assert before["fw rule1_hits"] == 1 and after["fw rule1_hits"] == 1


def test_a_flush_drops_open_connections_and_they_meet_the_new_rules():
    rig = Rig(firewall())
    c = Conn(rig)
    assert c.open()
    rep = reload(rig, firewall(extra="    flush: true"), 2.0)
    assert rep.fresh == {"fw": "its config asks for a flush"}
    assert rig.state.ct.connections(2.0) == []
    # the open connection's next segment opens nothing: invalid
    assert not c.out("PA", b"more", now=2.1)
    assert rig.counters()["fw drop/invalid"] == 1


def test_the_same_file_again_keeps_every_counter():
    rig = Rig(firewall())
    assert Conn(rig).open()
    before = rig.counters()
    rep = reload(rig, firewall(), 2.0)
    assert rig.counters() == before
    assert rep.summary() == "state kept: fw"


def test_another_type_under_the_same_name_starts_fresh():
    rig = Rig(firewall())
    c = Conn(rig)
    assert c.open()
    rep = reload(rig, """
appliance: t
devices:
  fw: {type: switch, ports: [inside, outside]}
attach:
  fw.inside: {memory: in}
  fw.outside: {memory: out}
""", 2.0)
    assert rep.fresh == {"fw": "was a firewall"} and rep.state_kept == []
    assert rep.counters_restarted == ["fw"]
    assert rig.counters().get("fw.inside rx", 0) == 0
    assert rig.engine.retired_rx == 3 and rig.engine.retired_tx == 3
    # a switch lets anything through (flooding: it has learned nothing)
    assert c.out("PA", b"x", now=2.1)
    assert rig.counters()["fw flooded"] == 1
    # back to a firewall: fresh again, so the old connection is unknown (invalid)
    rep = reload(rig, firewall(), 3.0)
    assert rep.fresh == {"fw": "was a switch"}
    assert c.out("PA", b"y", now=3.1) == []
    c_ = rig.counters()
    assert c_["fw drop/invalid"] == 1 and c_["fw.inside rx"] == 1
    assert c_["attach fw.inside rx"] == 4  # attachments count the whole run


def test_state_that_does_not_fit_is_reported_and_the_device_starts_fresh():
    rig = Rig(firewall())
    conns = [Conn(rig, sport=41000 + i) for i in range(3)]
    for c in conns:
        assert c.open()
    rep = reload(rig, firewall(extra="    max_flows: 2"), 2.0)
    assert rep.fresh == {"fw": "its state did not fit"}
    (problem,) = rep.problems
    assert problem.startswith("fw: state not carried over") and "limit 2" in problem
    assert rep.counters_kept == ["fw"]  # name, type and ports did not change
    assert len(rig.state.ct.connections(2.0)) == 0
    assert conns[0].out("PA", b"z", now=2.1) == []
    assert rig.counters()["fw drop/invalid"] == 1
    # and it works with its new limit
    assert Conn(rig, sport=42000).open(now=2.2)


def test_other_attachments_are_refused_and_the_running_engine_is_untouched():
    rig = Rig(firewall())
    c = Conn(rig)
    assert c.open()
    with pytest.raises(ReloadRejected) as e:
        prepare(parse_appliance(firewall(outside="elsewhere")), rig.engine)
    assert "attachments cannot change" in e.value.reason
    assert e.value.problems == ["attachment fw.outside: {memory: elsewhere} is new",
                                "attachment fw.outside: {memory: out} is gone"]
    assert c.out("PA", b"still", now=2.0)
    rig.check()


def test_attachments_listed_in_another_order_keep_their_counters():
    rig = Rig(firewall())
    assert Conn(rig).open()
    before = rig.counters()
    reload(rig, """
appliance: t
devices:
  fw: {type: firewall, ports: [inside, outside], rules: [{action: allow, from: inside}]}
attach:
  fw.outside: {memory: out}
  fw.inside: {memory: in}
""", 2.0)
    assert rig.names == ["outside", "inside"]
    after = rig.counters()
    assert after["attach fw.inside rx"] == before["attach fw.inside rx"] == 2
    assert after["attach fw.outside tx"] == before["attach fw.outside tx"]


CHAIN = """
appliance: t
devices:
  sw: {{type: switch, ports: [{sw_ports}]}}
  fw: {{type: firewall, ports: [inside, outside], rules: [{{action: allow, from: inside}}]}}
links:
  - [sw.up, fw.inside]
attach:
  sw.h1: {{memory: in}}
  fw.outside: {{memory: out}}
"""


def test_a_changed_device_in_a_chain_keeps_the_balance_exact():
    rig = Rig(CHAIN.format(sw_ports="h1, up"))
    c = Conn(rig, side="h1")
    c.other = "outside"
    assert c.open()
    assert rig.counters()["sw learned"] == 2
    # the switch gets a port: its MAC table (port numbers) and counters start over,
    # the firewall keeps its connections and counters
    rep = reload(rig, CHAIN.format(sw_ports="h1, spare, up"), 2.0)
    assert rep.state_kept == ["sw", "fw"]
    assert rep.problems == ["sw: ports changed: its shared tables (macs) start empty"]
    assert rep.counters_restarted == ["sw"] and rep.counters_kept == ["fw"]
    assert c.out("PA", b"x", now=2.1) and c.back("PA", b"y", now=2.1)
    after = rig.counters()
    assert after["sw.h1 rx"] == 1 and after["fw.inside rx"] == 3
    assert rig.engine.accounting_errors() == []


# -- held packets ------------------------------------------------------------------------

R_LAN, R_WAN, H5, GW = ("02:00:00:00:01:01", "02:00:00:00:01:02", "02:00:00:00:00:05",
                        "02:00:00:00:00:fe")


def router(routes: str = "[{prefix: 0.0.0.0/0, via: 198.51.100.1}]") -> str:
    return f"""
appliance: t
devices:
  r1:
    type: router
    ports:
      lan: {{ip: 10.0.0.1/24, mac: '{R_LAN}'}}
      wan: {{ip: 198.51.100.2/24, mac: '{R_WAN}'}}
    routes: {routes}
attach:
  r1.lan: {{memory: lan}}
  r1.wan: {{memory: wan}}
"""


def udp(dst="8.8.8.8", ident=1) -> bytes:
    return bytes(Eth(src=H5, dst=R_LAN) / IPv4(src="10.0.0.5", dst=dst, id=ident)
                 / UDP(sport=5000, dport=53) / Raw(b"q"))


def gw_is_at(ip="198.51.100.1") -> bytes:
    return bytes(Eth(src=GW, dst=R_WAN) / ARP(op=2, hwsrc=GW, psrc=ip, hwdst=R_WAN,
                                              pdst="198.51.100.2"))


def test_packets_still_held_are_dropped_under_the_devices_reason_and_counted():
    rig = Rig(router())
    out = rig.send("lan", [udp(ident=1), udp(ident=2)], 1.0)  # held: gateway unknown
    assert len(out["wan"]) == 1  # the ARP request
    assert held_packets(rig.engine) == 2
    rep = reload(rig, router("[{prefix: 0.0.0.0/0, via: 198.51.100.1}, "
                             "{prefix: 192.0.2.0/24, via: 198.51.100.1}]"), 1.1)
    assert rep.held_dropped == 2 and rep.problems == []
    assert "2 held packets dropped" in rep.summary()
    c = rig.counters()
    assert c["r1 drop/arp_timeout"] == 2 and c["r1 held"] == 2
    assert held_packets(rig.engine) == 0  # rig.check: every slot is back in the pool


def test_the_arp_cache_survives_a_reload():
    rig = Rig(router())
    rig.send("lan", [udp(ident=1)], 1.0)
    out = rig.send("wan", [gw_is_at()], 1.1)  # resolves and releases
    assert len(out["wan"]) == 1 and held_packets(rig.engine) == 0
    reload(rig, router("[{prefix: 0.0.0.0/0, via: 198.51.100.1}, "
                       "{prefix: 192.0.2.0/24, via: 198.51.100.1}]"), 1.2)
    out = rig.send("lan", [udp(dst="192.0.2.7", ident=2)], 1.3)
    assert len(out["wan"]) == 1 and bytes.fromhex(GW.replace(":", "")) == out["wan"][0][:6]
    assert held_packets(rig.engine) == 0
