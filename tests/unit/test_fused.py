"""A firewall linked straight to a NAT's inside runs fused with it (dva.worker.fused):
one connection table, the firewall's rules judged in the NAT's pass. The same
traces run through the pair fused and as two devices must leave every attachment
with the same bytes, and every counter the same but those the module says differ.
"""

from __future__ import annotations

import random

import pytest
from rig import Rig
from scapy.layers.inet import IP as SIP
from scapy.layers.inet import TCP as STCP
from scapy.layers.inet import UDP as SUDP
from scapy.layers.l2 import Ether
from test_nat import IN_MAC, NAT_IP, OUT_MAC, checksums_ok, frame
from test_reload import reload

from dva.nf.conntrack import CT_EVENTS
from dva.packet.batch import PacketBatch
from dva.packet.build import ICMP, TCP, UDP, Eth, IPv4, Raw

RULES = """
    default: deny
    rules:
      - {action: reject, proto: udp, dport: 5000-5100}
      - {action: deny, from: inside, proto: icmp, icmp_type: 13}
      - {action: allow, from: inside}
      - {action: allow, from: outside, proto: tcp, dst: 10.0.0.50, dport: 80}
      - {action: reject, from: outside, proto: tcp, dst: 10.0.0.51, dport: 22}
      - {action: allow, from: outside, proto: icmp, icmp_type: 13}
"""


def edge(rules: str = RULES, fw_extra: str = "", nat_extra: str = "") -> str:
    return f"""
appliance: edge
devices:
  fw:
    type: firewall
    ports: [inside, outside]
{rules}{fw_extra}
  nat:
    type: nat
    ports: [inside, outside]
    snat: {{to: {NAT_IP}}}
    dnat:
      - {{proto: tcp, dport: 8080, to: "10.0.0.50:80"}}
      - {{proto: tcp, dport: 2222, to: "10.0.0.51:22"}}
      - {{proto: udp, dport: 5353, to: "10.0.0.52:53"}}
{nat_extra}
links:
  - [fw.outside, nat.inside]
attach:
  fw.inside: {{memory: in}}
  nat.outside: {{memory: out}}
"""


# fused, the firewall's table holds nothing to expire (the NAT's counts its
# connections' expiry), and the NAT's invalid count also the packets the firewall
# found invalid; the NAT's entries of connections the firewall refuses (inbound,
# hairpinned) are not made, and packets about them are not related to anything
FW_CT = {"fw flows_expired"}
NAT_MADE = {"nat dnat_flows", "nat hairpin_flows", "nat untranslated_flows"} | {
    f"nat {e}" for e in CT_EVENTS} | {"fw reopened"}  # (a refused hairpin's way out)


class Pair:
    """The same appliance run fused and as two devices, fed the same frames."""

    def __init__(self, text: str) -> None:
        self.fused = Rig(text)
        self.apart = Rig(text, fuse=False)
        assert len(self.fused.engine.fused) == 1 and not self.apart.engine.fused

    def send(self, port: str, frames: list[bytes], now: float) -> dict[str, list[bytes]]:
        a = self.apart.send(port, frames, now)
        f = self.fused.send(port, frames, now)
        assert f == a
        return a

    def tick(self, now: float) -> None:
        assert self.fused.tick(now) == self.apart.tick(now)

    def counters(self, skip=frozenset()) -> tuple[dict, dict]:
        f, a = self.fused.counters(), self.apart.counters()
        return ({k: v for k, v in f.items() if k not in skip},
                {k: v for k, v in a.items() if k not in skip})


def outside(src, dst, l4) -> bytes:
    return frame(src, dst, l4, inside=False)


class Trace:
    """Random connections of every kind through the pair, each step checked."""

    def __init__(self, pair: Pair, seed: int) -> None:
        self.p = pair
        self.rng = random.Random(seed)
        self.now = 1.0
        self.udp: list[tuple[str, int, str, int]] = []  # inside flows seen outside
        self.tcp: list[dict] = []

    def send(self, port, frames):
        self.now += self.rng.choice([0.01, 0.5, 3.0])
        return self.p.send(port, frames, self.now)

    def host(self) -> str:
        return f"10.0.0.{self.rng.randrange(2, 9)}"

    def step(self) -> None:
        r = self.rng
        k = r.randrange(12)
        if k == 0:  # UDP out (some to rejected ports), replies to what went out
            dport = r.choice([53, 123, 5001])
            q = frame(self.host(), "192.0.2.9", UDP(sport=r.randrange(1024, 1100),
                                                    dport=dport) / Raw(b"q" * 8))
            out = self.send("inside", [q])["outside"]
            for o in out:
                e = Ether(o)
                assert checksums_ok(o)
                self.udp.append((e[SIP].src, e[SUDP].sport, e[SIP].dst, e[SUDP].dport))
        elif k == 1 and self.udp:
            a, ap, b, bp = r.choice(self.udp)
            self.send("outside", [outside(b, a, UDP(sport=bp, dport=ap) / Raw(b"r"))])
        elif k == 2:  # a TCP connection from inside, step by step
            c = {"h": self.host(), "sp": r.randrange(40000, 40100), "seq": 1000,
                 "st": 0, "dport": r.choice([80, 443])}
            syn = frame(c["h"], "192.0.2.9", TCP(sport=c["sp"], dport=c["dport"],
                                                 seq=c["seq"], flags="S"))
            out = self.send("inside", [syn])["outside"]
            if out:
                c["np"] = Ether(out[0])[STCP].sport
                self.tcp.append(c)
        elif k == 3 and self.tcp:
            self._tcp_step(r.choice(self.tcp))
        elif k == 4:  # inbound to the forwards: allowed, rejected; and unforwarded
            dport = r.choice([8080, 2222, 8080, 9999])
            syn = outside(f"203.0.113.{r.randrange(1, 9)}", NAT_IP,
                          TCP(sport=r.randrange(5000, 5050), dport=dport, seq=7, flags="S"))
            for i in self.send("outside", [syn])["inside"]:
                e = Ether(i)
                if e[SIP].dst == "10.0.0.50":
                    self.send("inside", [frame("10.0.0.50", e[SIP].src, TCP(
                        sport=80, dport=e[STCP].sport, seq=9000, ack=8, flags="SA"))])
        elif k == 5:  # hairpin: to the forward allowed back in, and the rejected one
            dport = r.choice([8080, 2222])
            syn = frame(self.host(), NAT_IP, TCP(sport=r.randrange(41000, 41050),
                                                 dport=dport, seq=50, flags="S"))
            for i in self.send("inside", [syn])["inside"]:
                e = Ether(i)
                if e.haslayer(STCP) and e[STCP].flags == "S":
                    self.send("inside", [frame(e[SIP].dst, e[SIP].src, TCP(
                        sport=e[STCP].dport, dport=e[STCP].sport, seq=3000, ack=51,
                        flags="SA"))])
        elif k == 6:  # ICMP: echo out and its reply, timestamps both ways
            h, ident = self.host(), r.randrange(1, 50)
            out = self.send("inside", [frame(h, "192.0.2.9", ICMP(type=8, id=ident,
                                                                  seq=1))])["outside"]
            for o in out:
                e = Ether(o)
                self.send("outside", [outside("192.0.2.9", e[SIP].src, ICMP(
                    type=0, id=bytes(e[SIP].payload)[4] << 8 | bytes(e[SIP].payload)[5],
                    seq=1))])
            self.send("inside", [frame(h, "192.0.2.9", ICMP(type=13))])
            self.send("outside", [outside("192.0.2.9", NAT_IP, ICMP(type=13))])
        elif k == 7 and self.udp:  # an ICMP error about a flow, from outside
            a, ap, b, bp = r.choice(self.udp)
            quote = bytes(IPv4(src=a, dst=b) / UDP(sport=ap, dport=bp))
            self.send("outside", [outside("203.0.113.1", a, ICMP(type=3, code=3)
                                          / Raw(quote))])
        elif k == 8:  # junk from both sides
            good = frame(self.host(), "192.0.2.9", UDP(sport=1, dport=53))
            bad_csum = bytearray(good)
            bad_csum[24] ^= 0xFF
            frag = bytearray(good)
            frag[20] = 0x00
            frag[21] = 0x10  # a later fragment
            frag[24:26] = b"\0\0"
            junk = [good[:30], bytes(bad_csum), bytes(frag),
                    bytes(Eth(src=IN_MAC, dst=OUT_MAC, type=0x86DD)) + b"\0" * 40]
            port = r.choice(["inside", "outside"])
            self.send(port, junk)
        elif k == 9:  # TCP without a connection, both sides
            self.send("inside", [frame(self.host(), "192.0.2.9",
                                       TCP(sport=1234, dport=80, flags="A"))])
            self.send("outside", [outside("192.0.2.9", NAT_IP,
                                          TCP(sport=80, dport=1234, flags="A"))])
        elif k == 10:  # time passes: expiry
            self.now += r.choice([10.0, 40.0, 200.0])
            self.p.tick(self.now)
        else:  # a whole batch of mixed UDP both ways
            frames = [frame(self.host(), "192.0.2.9", UDP(sport=2000 + j, dport=53))
                      for j in range(r.randrange(1, 40))]
            self.send("inside", frames)

    def _tcp_step(self, c: dict) -> None:
        h, sp, np_, d = c["h"], c["sp"], c["np"], c["dport"]
        if c["st"] == 0:
            self.send("outside", [outside("192.0.2.9", NAT_IP, TCP(
                sport=d, dport=np_, seq=5000, ack=c["seq"] + 1, flags="SA"))])
            c["seq"] += 1
        elif c["st"] == 1:
            self.send("inside", [frame(h, "192.0.2.9", TCP(
                sport=sp, dport=d, seq=c["seq"], ack=5001, flags="A") / Raw(b"data"))])
            c["seq"] += 4
        elif c["st"] == 2:
            self.send("inside", [frame(h, "192.0.2.9", TCP(
                sport=sp, dport=d, seq=c["seq"], ack=5001, flags="FA"))])
        elif c["st"] == 3:
            self.send("outside", [outside("192.0.2.9", NAT_IP, TCP(
                sport=d, dport=np_, seq=5001, ack=c["seq"] + 1, flags="FA"))])
        else:  # out of window, then a RST
            self.send("outside", [outside("192.0.2.9", NAT_IP, TCP(
                sport=d, dport=np_, seq=999999, ack=c["seq"] + 1, flags="A"))])
            self.send("inside", [frame(h, "192.0.2.9", TCP(
                sport=sp, dport=d, seq=c["seq"] + 1, flags="R"))])
        c["st"] += 1


@pytest.mark.parametrize("seed", range(4))
def test_fused_pair_sends_what_two_devices_send_and_counts_the_same(seed):
    pair = Pair(edge())
    t = Trace(pair, seed)
    for _ in range(250):
        t.step()
    # an ICMP error about such a connection: as two devices the NAT relates it and
    # the firewall finds it invalid; fused, the NAT finds it invalid
    about = {"nat icmp_errors_translated", "fw drop/invalid", "nat drop/invalid",
             "fw.outside rx", "nat.inside tx", "fw invalid"}
    f, a = pair.counters(FW_CT | NAT_MADE | about)
    assert f == a
    f_all, a_all = pair.counters()
    g = {k: f_all.get(k, 0) for k in about}
    h = {k: a_all.get(k, 0) for k in about}
    moved = h["fw drop/invalid"] - g["fw drop/invalid"]
    assert g["nat drop/invalid"] - h["nat drop/invalid"] == moved >= 0
    assert h["nat icmp_errors_translated"] - g["nat icmp_errors_translated"] == moved
    assert h["fw.outside rx"] - g["fw.outside rx"] == moved
    assert h["nat.inside tx"] - g["nat.inside tx"] == moved
    assert h["fw invalid"] - g["fw invalid"] == moved
    # what differs, differs only as the module says: entries not made, not counted
    assert all(f_all.get(k, 0) <= a_all.get(k, 0) for k in NAT_MADE - {"nat invalid"})
    assert f_all["fw flows_created"] > f_all["nat flows_created"]  # hairpins: two each
    assert "fw flows_expired" not in f_all
    f = f_all
    assert f["fw drop/denied"] > 0 and f["fw drop/rejected"] > 0
    assert f["fw rst_sent"] > 0 and f["fw icmp_sent"] > 0
    assert f["nat snat_flows"] > 0 and f["nat drop/invalid"] > 0
    assert f["fw drop/malformed"] + f["nat drop/malformed"] > 0
    assert f["fw.outside tx"] == f["nat.inside rx"] > 0
    assert f["nat.inside tx"] == f["fw.outside rx"] > 0
    # one table: the firewall's stays empty, the NAT's holds every connection
    assert len(pair.fused.engine.states[0].ct.table.live(t.now)) == 0
    assert len(pair.fused.engine.states[1].ct.table.live(t.now)) > 0


def test_where_nothing_is_refused_every_nat_counter_is_the_same():
    pair = Pair(edge("    default: allow\n"))
    t = Trace(pair, 11)
    for _ in range(200):
        t.step()
    # (the sweep reclaims expired entries a few slots a batch: fused, the NAT's runs
    # also on batches the firewall dropped whole, and reclaims sooner)
    f, a = pair.counters(FW_CT | {"nat invalid", "nat flows_expired"})
    assert f == a
    assert f["fw flows_created"] > f["nat flows_created"] > 0  # hairpins: two a piece
    assert f["nat hairpin_flows"] > 0 and f["nat dnat_flows"] > 0
    f, a = pair.counters()
    assert f["nat invalid"] == a["nat invalid"] + a["fw invalid"] > a["fw invalid"] > 0


@pytest.mark.parametrize("fw_extra, nat_extra, why", [
    ("    fragments: allow\n", "", "passes fragments"),
    ("    invalid: allow\n", "", "passes invalid"),
    ("    timeouts: {udp: 10}\n", "", "timeouts differ"),
    ("    max_flows: 100000\n", "    max_flows: 65536\n", "twice the NAT's"),
    ("", "    filter: {default: allow}\n", "filter of its own"),
])
def test_a_pair_that_would_not_behave_the_same_is_not_fused(fw_extra, nat_extra, why):
    rig = Rig(edge(fw_extra=fw_extra, nat_extra=nat_extra))
    assert rig.engine.fused == []
    (reason,) = rig.engine.unfused
    assert reason.startswith("fw -> nat: ") and why in reason
    # and the two devices still work, each with its own table
    q = frame("10.0.0.5", "192.0.2.9", UDP(sport=1111, dport=53))
    assert len(rig.send("inside", [q], 1.0)["outside"]) == 1
    assert len(rig.engine.states[0].ct.table.live(1.0)) == 1


def open_tcp(rig: Rig) -> int:
    """A TCP connection from 10.0.0.5:40000 to 192.0.2.9:80, SYN and SYN/ACK (its
    ACK, seq 1001, comes next); returns its external port."""
    syn = frame("10.0.0.5", "192.0.2.9", TCP(sport=40000, dport=80, seq=1000, flags="S"))
    (o,) = rig.send("inside", [syn], 1.0)["outside"]
    np_ = Ether(o)[STCP].sport
    rig.send("outside", [outside("192.0.2.9", NAT_IP, TCP(sport=80, dport=np_, seq=5000,
                                                          ack=1001, flags="SA"))], 1.1)
    return np_


def test_a_reload_that_ends_the_fusion_keeps_open_connections():
    rig = Rig(edge())
    np_ = open_tcp(rig)
    # the firewall now passes fragments: the pair runs as two devices
    report = reload(rig, edge(fw_extra="    fragments: allow\n"), 2.0)
    assert "fw" in report.state_kept and "nat" in report.state_kept
    assert len(rig.engine.states[0].ct.table.live(2.0)) == 1  # the connection, E1
    assert rig.engine.fused == []
    ack = frame("10.0.0.5", "192.0.2.9", TCP(sport=40000, dport=80, seq=1001, ack=5001,
                                             flags="A") / Raw(b"hi"))
    (o,) = rig.send("inside", [ack], 2.1)["outside"]
    assert Ether(o)[STCP].sport == np_
    back = outside("192.0.2.9", NAT_IP, TCP(sport=80, dport=np_, seq=5001, ack=1003,
                                            flags="A"))
    assert len(rig.send("outside", [back], 2.2)["inside"]) == 1
    assert rig.counters().get("fw drop/invalid", 0) == 0


def test_a_firewall_flush_drops_the_connections_it_shares_with_the_nat():
    rig = Rig(edge())
    np_ = open_tcp(rig)
    report = reload(rig, edge(fw_extra="    flush: true\n"), 2.0)
    assert len(rig.engine.fused) == 1 and "nat" in report.fresh
    assert len(rig.engine.states[1].maps.live(2.0)) == 2  # the mapping stays
    ack = frame("10.0.0.5", "192.0.2.9", TCP(sport=40000, dport=80, seq=1001, ack=5001,
                                             flags="A"))
    assert rig.send("inside", [ack], 2.1)["outside"] == []  # as two devices: invalid
    assert rig.counters()["fw drop/invalid"] == 1
    # a new connection from the same endpoint gets the same external port
    syn = frame("10.0.0.5", "192.0.2.9", TCP(sport=40000, dport=80, seq=7000, flags="S"))
    (o,) = rig.send("inside", [syn], 2.2)["outside"]
    assert Ether(o)[STCP].sport == np_


def test_time_alone_expires_the_pairs_connections_and_inside_ports_take_no_packets():
    rig = Rig(edge())
    q = frame("10.0.0.5", "192.0.2.9", UDP(sport=1111, dport=53))
    assert len(rig.send("inside", [q], 1.0)["outside"]) == 1
    eng = rig.engine
    fw = eng.plan.device_index("fw")
    # the firewall's tick is the pair's: it sweeps the one table (the NAT's)
    for k in range(40):
        eng.tick(100.0 + k, devices=[fw])
    assert rig.counters()["nat flows_expired"] == 2  # E1 and E2
    b = PacketBatch(rig.pool, 1)
    b.add_frames([q])
    with pytest.raises(ValueError, match="fw.outside is inside a firewall and NAT"):
        eng.inject(fw, 1, b, 200.0)
    b.release_all()
    rig.check()


def test_dva_validate_says_how_a_firewall_in_front_of_a_nat_runs(tmp_path):
    import subprocess
    import sys
    for name, text, note in [
            ("fused.yaml", edge(), "note: fw and nat run fused: one connection table"),
            ("apart.yaml", edge(fw_extra="    invalid: allow\n"),
             "note: not fused: fw -> nat: the firewall passes invalid packets")]:
        (tmp_path / name).write_text(text)
        p = subprocess.run([sys.executable, "-m", "dva.cli", "validate", name],
                           cwd=tmp_path, capture_output=True, text=True, timeout=120)
        assert p.returncode == 0, p.stderr
        assert p.stdout.splitlines()[-1] == f"{name}: {note}"


def test_a_nat_flush_that_ends_the_fusion_leaves_the_firewall_its_connections():
    rig = Rig(edge())
    q = frame("10.0.0.5", "192.0.2.9", UDP(sport=1111, dport=53))
    rig.send("inside", [q], 1.0)
    reload(rig, edge(fw_extra="    invalid: allow\n", nat_extra="    flush: true\n"), 2.0)
    assert rig.engine.fused == []
    assert len(rig.engine.states[0].ct.table.live(2.0)) == 1  # as two devices
    assert len(rig.engine.states[1].ct.table.live(2.0)) == 0  # flushed
