"""A multi-flow trace through switch -> router -> firewall -> NAT, for runtime tests.

The appliance is the demo's edge (a LAN switch, a router, a stateful firewall, a NAT
that masquerades and forwards port 8080 to a LAN server) on memory ports. The trace
is made by driving an inline engine: replies from the outside must be addressed to
the port the NAT chose, so each reply is written after seeing the translated packet.
What comes out is a list of ``(time, port, frame)``: the input of a run.

Phases: warm-up (ARP: the hosts and the upstream gateway resolve the router and are
learned by the switch and the router), then after a pause (a replication round in a
multi-worker run) TCP connections out through the NAT (handshake, data, FIN), UDP
exchanges, pings, and port-forwarded TCP connections in from outside.
"""

from __future__ import annotations

import random

from dva.graph.appliance import parse_appliance
from dva.packet.build import ARP, ICMP, TCP, UDP, Eth, IPv4, Raw
from tests.rig import Rig

APPLIANCE = """\
appliance: edge
tenant: lab
devices:
  lan:
    type: switch
    ports: [h1, h2, srv, gw]
  r1:
    type: router
    ports:
      lan: {ip: 10.0.0.1/24, mac: "02:00:00:00:01:01"}
      wan: {ip: 198.51.100.2/24, mac: "02:00:00:00:01:02"}
    routes: [{prefix: 0.0.0.0/0, via: 198.51.100.1}]
  fw:
    type: firewall
    ports: [inside, outside]
    default: deny
    rules:
      - {action: allow, from: inside}
      - {action: allow, from: outside, proto: tcp, dst: 10.0.0.50, dport: 80}
  nat:
    type: nat
    ports: [inside, outside]
    snat: {to: 198.51.100.2}
    dnat:
      - {proto: tcp, dport: 8080, to: "10.0.0.50:80"}
links:
  - [lan.gw, r1.lan]
  - [r1.wan, fw.inside]
  - [fw.outside, nat.inside]
attach:
  lan.h1: {memory: h1}
  lan.h2: {memory: h2}
  lan.srv: {memory: srv}
  nat.outside: {memory: wan}
"""

# A stateful firewall and a source NAT on memory ports (lan, wan): the flows of the
# bucket-move tests (tests/unit/test_migration.py, tests/property/test_move_props.py).
FW_NAT = """\
appliance: edge
devices:
  fw:
    type: firewall
    ports: [inside, outside]
    default: deny
    rules: [{action: allow, from: inside}]
  nat:
    type: nat
    ports: [inside, outside]
    snat: {to: 198.51.100.2}
links:
  - [fw.outside, nat.inside]
attach:
  fw.inside: {memory: lan}
  nat.outside: {memory: wan}
"""

R_LAN, R_WAN = "02:00:00:00:01:01", "02:00:00:00:01:02"
GW_MAC, GW_IP, PUB = "02:00:00:00:00:fe", "198.51.100.1", "198.51.100.2"
HOSTS = {"h1": ("02:00:00:00:00:11", "10.0.0.11"), "h2": ("02:00:00:00:00:12", "10.0.0.12"),
         "srv": ("02:00:00:00:00:50", "10.0.0.50")}
PORTS = {"h1": "lan.h1", "h2": "lan.h2", "srv": "lan.srv", "wan": "nat.outside"}


def app():
    return parse_appliance(APPLIANCE)


def _ip_of(frame: bytes):
    """(src ip, dst ip, proto, sport, dport) of an Ethernet/IPv4 frame."""
    ihl = (frame[14] & 15) * 4
    proto = frame[23]
    src = ".".join(str(b) for b in frame[26:30])
    dst = ".".join(str(b) for b in frame[30:34])
    l4 = 14 + ihl
    sp = int.from_bytes(frame[l4:l4 + 2], "big")
    dp = int.from_bytes(frame[l4 + 2:l4 + 4], "big")
    return src, dst, proto, sp, dp


def flow_key(frame: bytes):
    """A direction-free flow key of a frame (for per-flow order checks)."""
    if len(frame) < 34 or frame[12:14] != b"\x08\x00":
        return ("l2", frame[:12])
    s, d, p, sp, dp = _ip_of(frame)
    if p == 1:  # echo: the identifier
        sp = dp = int.from_bytes(frame[14 + (frame[14] & 15) * 4 + 4:][:2], "big")
    return (p,) + tuple(sorted([(s, sp), (d, dp)]))


class TraceBuilder:
    def __init__(self) -> None:
        self.rig = Rig(APPLIANCE, slots=4096)
        self.refs = [a.ref for a in self.rig.plan.attachments]
        self.t = 0.0
        self.trace: list[tuple[float, str, bytes]] = []

    def send(self, port: str, frame: bytes, dt: float = 1e-4) -> dict[str, list[bytes]]:
        self.t += dt
        ref = PORTS[port]
        self.trace.append((self.t, ref, frame))
        out = self.rig.send(self.rig.names[self.refs.index(ref)], [frame], self.t)
        return {ref: out[name] for ref, name in zip(self.refs, self.rig.names)}

    def wan_out(self, out) -> list[bytes]:
        return out["nat.outside"]


def build(seed: int = 1, tcp_flows: int = 60, udp_flows: int = 40, pings: int = 10,
          dnat_flows: int = 20) -> list[tuple[float, str, bytes]]:
    r = random.Random(seed)
    tb = TraceBuilder()
    # warm-up: every host ARPs the router, the gateway ARPs the router's WAN address
    for h, (mac, ip) in HOSTS.items():
        tb.send(h, bytes(Eth(src=mac, dst="ff:ff:ff:ff:ff:ff")
                         / ARP(op=1, hwsrc=mac, psrc=ip, pdst="10.0.0.1")))
    tb.send("wan", bytes(Eth(src=GW_MAC, dst="ff:ff:ff:ff:ff:ff")
                         / ARP(op=1, hwsrc=GW_MAC, psrc=GW_IP, pdst=PUB)))
    tb.t = 0.25  # a replication boundary passes before the traffic
    inside = [h for h in HOSTS if h != "srv"]

    def lan(h, dst_ip, l4):
        mac, ip = HOSTS[h]
        return bytes(Eth(src=mac, dst=R_LAN) / IPv4(src=ip, dst=dst_ip) / l4)

    def wan(src_ip, dst_ip, l4):
        return bytes(Eth(src=GW_MAC, dst=R_WAN) / IPv4(src=src_ip, dst=dst_ip) / l4)

    jobs = []
    for i in range(tcp_flows):
        jobs.append(("tcp", r.choice(inside), f"203.0.113.{r.randrange(1, 200)}",
                     20000 + i, r.choice([80, 443])))
    for i in range(udp_flows):
        jobs.append(("udp", r.choice(inside), f"203.0.113.{r.randrange(1, 200)}",
                     30000 + i, 53))
    for i in range(pings):
        jobs.append(("ping", r.choice(inside), f"203.0.113.{r.randrange(1, 200)}", 100 + i, 0))
    for i in range(dnat_flows):
        jobs.append(("dnat", "srv", f"192.0.2.{r.randrange(1, 200)}", 40000 + i, 8080))
    r.shuffle(jobs)
    for kind, h, remote, sport, dport in jobs:
        if kind == "tcp":
            out = tb.wan_out(tb.send(h, lan(h, remote, TCP(sport=sport, dport=dport,
                                                             flags="S", seq=1000))))
            assert len(out) == 1, out
            _, _, _, xs, _ = _ip_of(out[0])
            tb.send("wan", wan(remote, PUB, TCP(sport=dport, dport=xs, flags="SA", seq=5000,
                                                 ack=1001)))
            tb.send(h, lan(h, remote, TCP(sport=sport, dport=dport, flags="A", seq=1001,
                                          ack=5001)))
            for k in range(r.randrange(1, 4)):
                tb.send(h, lan(h, remote, TCP(sport=sport, dport=dport, flags="PA",
                                              seq=1001 + 10 * k, ack=5001)
                               / Raw(bytes(10))))
            tb.send("wan", wan(remote, PUB, TCP(sport=dport, dport=xs, flags="FA", seq=5001,
                                                 ack=1001 + 10 * (k + 1))))
        elif kind == "udp":
            out = tb.wan_out(tb.send(h, lan(h, remote, UDP(sport=sport, dport=dport)
                                            / Raw(b"q" * 20))))
            assert len(out) == 1, out
            _, _, _, xs, _ = _ip_of(out[0])
            tb.send("wan", wan(remote, PUB, UDP(sport=dport, dport=xs) / Raw(b"a" * 40)))
        elif kind == "ping":
            out = tb.wan_out(tb.send(h, lan(h, remote, ICMP(type=8, id=sport, seq=1)
                                            / Raw(b"p" * 16))))
            assert len(out) == 1, out
            xid = int.from_bytes(out[0][38:40], "big")
            tb.send("wan", wan(remote, PUB, ICMP(type=0, id=xid, seq=1) / Raw(b"p" * 16)))
        else:  # a port-forwarded connection in from outside, answered by srv
            out = tb.send("wan", wan(remote, PUB, TCP(sport=sport, dport=8080, flags="S",
                                                      seq=7000)))
            assert len(out["lan.srv"]) == 1, out
            mac, ip = HOSTS["srv"]
            tb.send("srv", lan("srv", remote, TCP(sport=80, dport=sport, flags="SA",
                                                  seq=9000, ack=7001)))
            tb.send("wan", wan(remote, PUB, TCP(sport=sport, dport=8080, flags="A",
                                                seq=7001, ack=9001)))
            tb.send("srv", lan("srv", remote, TCP(sport=80, dport=sport, flags="PA",
                                                  seq=9001, ack=7001) / Raw(b"x" * 30)))
    return tb.trace


def expected_connections(trace) -> int:
    """Connections the trace opens (what the NAT must count as new, no more)."""
    return sum(1 for _, port, f in trace if port != "nat.outside" and _is_opener(f)) + \
        sum(1 for _, port, f in trace if port == "nat.outside" and _is_syn(f))


def _is_opener(f: bytes) -> bool:
    if len(f) < 34 or f[12:14] != b"\x08\x00":
        return False
    s, d, p, sp, dp = _ip_of(f)
    if p == 6:
        return _is_syn(f)
    return p in (1, 17) and not s.startswith("10.0.0.50")


def _is_syn(f: bytes) -> bool:
    if len(f) < 34 or f[12:14] != b"\x08\x00" or f[23] != 6:
        return False
    flags = f[14 + (f[14] & 15) * 4 + 13]
    return flags & 0x12 == 0x02
