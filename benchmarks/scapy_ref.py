"""The scapy baselines of ``benchmarks/compute.py``: each scenario written the way a
Python programmer would without dva -- scapy parses every frame, dicts and lists hold
the tables, scapy rebuilds the bytes (checksums recomputed by deleting them).

They do what the compiled scenarios do for the frames measured (the same appliances'
addresses, rules and routes; forwarding, TTL, NAT and LB rewrites, VXLAN headers)
and nothing they do not (no ARP, ICMP errors, expiry or counters beyond a hit count).
``measure(name, setup, frames, packets)`` returns Mpps over ``packets`` frames cycled
from ``frames``, after one warm pass (tables learned, connections tracked).
"""

from __future__ import annotations

import ipaddress
import time
import zlib

from scapy.layers.inet import IP, UDP
from scapy.layers.l2 import Ether
from scapy.layers.vxlan import VXLAN


def _key(ip, l4) -> tuple:
    return (ip.src, ip.dst, ip.proto, l4.sport, l4.dport)


def _rev(k: tuple) -> tuple:
    return (k[1], k[0], k[2], k[4], k[3])


class Switch:
    def __init__(self, ports: list[str]) -> None:
        self.ports, self.macs = ports, {}

    def __call__(self, p, port: str):
        self.macs[p.src] = port
        out = self.macs.get(p.dst)
        return [(p, out)] if out is not None else [(p, q) for q in self.ports if q != port]


class Router:
    """Longest prefix match over a dict per prefix length; TTL, MACs rewritten."""

    def __init__(self, dev) -> None:
        cfg = dev.config
        self.mac = {n: dev.port_mac_str(n) for n in cfg.ports}
        self.nets = {n: ipaddress.ip_interface(p.ip).network for n, p in cfg.ports.items()}
        self.by_len: dict[int, dict[int, str]] = {}
        for r in cfg.routes:
            net = ipaddress.ip_network(r.prefix)
            self.by_len.setdefault(net.prefixlen, {})[int(net.network_address)] = str(r.via)
        self.lens = sorted(self.by_len, reverse=True)
        self.arp: dict[str, str] = {}

    def lookup(self, dst: str) -> str | None:
        a = int(ipaddress.IPv4Address(dst))
        for net in self.nets.values():
            if ipaddress.IPv4Address(dst) in net:
                return dst
        for plen in self.lens:
            via = self.by_len[plen].get(a & (0xFFFFFFFF << (32 - plen)) & 0xFFFFFFFF)
            if via is not None:
                return via
        return None

    def __call__(self, p, port: str):
        if p.dst != self.mac[port]:
            return []
        ip = p[IP]
        nh = self.lookup(ip.dst)
        if nh is None or ip.ttl <= 1:
            return []
        out = next(n for n, net in self.nets.items() if ipaddress.IPv4Address(nh) in net)
        ip.ttl -= 1
        del ip.chksum
        p.src, p.dst = self.mac[out], self.arp[nh]
        return [(p, out)]


class Firewall:
    """Rules in order (first match), connections in a dict (both directions)."""

    def __init__(self, dev) -> None:
        cfg = dev.config
        self.ports = list(cfg.ports)
        self.rules = []
        for r in cfg.rules:
            dst = None if r.dst == "any" else ipaddress.ip_network(r.dst)
            self.rules.append((r.action, None if r.from_ == "any" else r.from_,
                               None if r.proto == "any" else r.proto, dst, r.dport))
        self.default = cfg.default
        self.conns: dict[tuple, str] = {}

    def __call__(self, p, port: str):
        ip = p[IP]
        l4 = ip.payload
        k = _key(ip, l4)
        other = self.ports[1] if port == self.ports[0] else self.ports[0]
        if k in self.conns:
            return [(p, other)]
        action = self.default
        for act, frm, proto, dst, dport in self.rules:
            if frm is not None and frm != port:
                continue
            if proto is not None and {"tcp": 6, "udp": 17, "icmp": 1}[proto] != ip.proto:
                continue
            if dst is not None and ipaddress.IPv4Address(ip.dst) not in dst:
                continue
            if dport is not None and str(l4.dport) != str(dport).split("-")[0]:
                continue
            action = act
            break
        if action != "allow":
            return []
        self.conns[k] = self.conns[_rev(k)] = "new"
        return [(p, other)]


class Nat:
    """Source NAT over an address pool: a mapping per (source, port), kept both ways."""

    def __init__(self, dev) -> None:
        from dva.nf.nat import pool_addresses

        self.pool = [str(ipaddress.IPv4Address(a)) for a in pool_addresses(dev.config.snat.to)]
        self.ports = list(dev.config.ports)
        self.map: dict[tuple, tuple] = {}
        self.next = 0

    def __call__(self, p, port: str):
        ip = p[IP]
        l4 = ip.payload
        src = (ip.src, l4.sport)
        m = self.map.get(src)
        if m is None:
            m = (self.pool[self.next % len(self.pool)], 1024 + (self.next // len(self.pool))
                 % 64000)
            self.next += 1
            self.map[src] = m
            self.map[("rev",) + m] = src
        ip.src, l4.sport = m
        del ip.chksum
        del l4.chksum
        return [(p, self.ports[1])]


class Lb:
    """The same Maglev table as the lb device (built by dva.nf.maglev), a dict of
    connections; the destination rewritten to the backend."""

    def __init__(self, dev, state) -> None:
        self.table = [int(x) for x in state.maglev[0]]
        v = next(iter(dev.config.vips.values()))
        self.backends = [str(b.addr) for b in v.backends]
        self.conns: dict[tuple, str] = {}

    def __call__(self, p, port: str):
        ip = p[IP]
        l4 = ip.payload
        k = _key(ip, l4)
        be = self.conns.get(k)
        if be is None:
            h = zlib.crc32(repr(k).encode())
            be = self.conns[k] = self.backends[self.table[h % len(self.table)]]
        ip.dst = be
        del ip.chksum
        del l4.chksum
        return [(p, "back")]


class Vxlan:
    def __init__(self, dev, remotes: dict[str, str], remote_macs: dict[str, str]) -> None:
        cfg = dev.config
        self.local, self.mac, self.vni = cfg.local.split("/")[0], cfg.mac, cfg.vni
        self.where = remotes  # inner MAC -> remote VTEP
        self.next_hop = remote_macs  # VTEP -> its MAC

    def __call__(self, p, port: str):
        r = self.where[p.dst]
        sport = 49152 + zlib.crc32(bytes(p)[:34]) % 16384
        out = (Ether(src=self.mac, dst=self.next_hop[r]) / IP(src=self.local, dst=r, flags="DF")
               / UDP(sport=sport, dport=4789) / VXLAN(vni=self.vni) / p)
        return [(out, "underlay")]


def chain(name: str, setup) -> tuple[list, str]:
    """(devices in order as (callable, in-port) steps, the entry port name)."""
    from compute import HOST_MAC, VX_REMOTES, _vtep_mac

    d = setup.app.devices
    if name == "switch":
        sw = Switch(["p0", "p1", "p2", "p3"])
        for h in range(8):
            sw.macs[HOST_MAC.format(h)] = f"p{h % 4}"
        return [sw], "p0"
    if name == "router":
        r = Router(d["r1"])
        r.arp["10.2.0.254"] = "02:00:00:00:02:fe"
        return [r], "a"
    if name == "firewall":
        return [Firewall(d["fw"])], "inside"
    if name == "nat":
        return [Nat(d["nat"])], "inside"
    if name == "lb":
        return [Lb(d["lb"], d["lb"].new_state())], "front"
    if name == "vxlan":
        where = {f"02:00:00:02:00:{h:02x}": VX_REMOTES[h % 4] for h in range(64)}
        macs = {ip: _vtep_mac(r) for r, ip in enumerate(VX_REMOTES)}
        return [Vxlan(d["vx"], where, macs)], "overlay"
    if name == "edge":
        sw = Switch(["h1", "gw"])
        sw.macs[d["r1"].port_mac_str("lan")] = "gw"
        r = Router(d["r1"])
        r.arp["198.51.100.254"] = "02:00:00:00:02:fe"
        return [sw, r, Firewall(d["fw"]), Nat(d["nat"])], "h1"
    raise ValueError(name)


# the port a device's output enters the next device by, in the edge chain
NEXT_PORT = {"gw": "lan", "wan": "inside", "outside": "inside"}


def measure(name: str, setup, frames: list[bytes], packets: int) -> float:
    steps, entry = chain(name, setup)

    def one(raw: bytes) -> int:
        todo = [(Ether(raw), entry)]
        for dev in steps:
            nxt = []
            for p, port in todo:
                nxt += dev(p, port)
            todo = [(p, NEXT_PORT.get(o, o)) for p, o in nxt]
        out = 0
        for p, _ in todo:
            out += len(bytes(p)) > 0
        return out

    for f in frames:  # warm: connections tracked, as in the compiled scenario
        assert one(f) == 1, f"scapy {name}: a frame was not forwarded"
    t0 = time.perf_counter()
    done = 0
    while done < packets:
        for f in frames:
            one(f)
            done += 1
    return done / (time.perf_counter() - t0) / 1e6
