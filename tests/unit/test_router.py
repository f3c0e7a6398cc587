"""The router: config validation, MAC derivation, held packets and ticks, ICMP rate
limits, checksums (checked with scapy), order of released packets, robustness, and
compiled kernels against the JIT-off reference.

Engine-level tests drive an :class:`~dva.worker.engine.Engine` directly (as
``benchmarks/packet_path.py`` does), so that ``Engine.tick`` can move time, and check
``engine.accounting_errors() == []`` and that no packet slot leaks after every step.
"""

from __future__ import annotations

import hashlib
import random

import numpy as np
import pytest
from reference import assert_matches_reference
from rig import Rig
from scapy.layers.inet import ICMP as SICMP
from scapy.layers.inet import IP as SIP
from scapy.layers.l2 import Ether

from dva.graph.appliance import ApplianceError, format_path, parse_appliance
from dva.nf.router import DROPS, EVENTS, QUOTE_MAX, Router, RouterConfig, derive_mac
from dva.packet.batch import PacketBatch
from dva.packet.build import ARP, ICMP, TCP, UDP, Dot1Q, Eth, IPv4, IPv6, Raw

R_LAN, R_WAN = "02:00:00:00:01:01", "02:00:00:00:01:02"
H5, GW = "02:00:00:00:00:05", "02:00:00:00:00:fe"


def appliance(extra: str = "", routes: str = "[{prefix: 0.0.0.0/0, via: 198.51.100.1}]",
              lan_mac: str = f", mac: '{R_LAN}'") -> str:
    return f"""
appliance: t
devices:
  r1:
    type: router
    ports:
      lan: {{ip: 10.0.0.1/24{lan_mac}}}
      wan: {{ip: 198.51.100.2/24, mac: '{R_WAN}'}}
    routes: {routes}
{extra}
attach:
  r1.lan: {{memory: lan}}
  r1.wan: {{memory: wan}}
"""


def udp(dst="8.8.8.8", ttl=64, ident=1, src="10.0.0.5", smac=H5, dmac=R_LAN, payload=b""):
    return bytes(Eth(src=smac, dst=dmac) / IPv4(src=src, dst=dst, ttl=ttl, id=ident)
                 / UDP(sport=5000, dport=53) / Raw(payload))


def gw_is_at(mac=GW):
    return bytes(Eth(src=mac, dst=R_WAN) / ARP(op=2, hwsrc=mac, psrc="198.51.100.1",
                                               hwdst=R_WAN, pdst="198.51.100.2"))


def h5_who_has_r1():
    return bytes(Eth(src=H5, dst="ff:ff:ff:ff:ff:ff")
                 / ARP(op=1, hwsrc=H5, psrc="10.0.0.5", pdst="10.0.0.1"))


def is_arp_request_for(frame: bytes, ip: str) -> bool:
    e = Ether(frame)
    return e.type == 0x0806 and e["ARP"].op == 1 and e["ARP"].pdst == ip \
        and e.dst == "ff:ff:ff:ff:ff:ff"


def ip_id(frame: bytes) -> int:
    return Ether(frame)[SIP].id


# -- config ------------------------------------------------------------------------

def issues(text: str) -> dict[str, str]:
    with pytest.raises(ApplianceError) as ei:
        parse_appliance(text)
    for i in ei.value.issues:
        assert i.line is not None
    return {format_path(i.path): i.message for i in ei.value.issues}


def router_doc(ports: str, routes: str = "[]", extra: str = "") -> str:
    return f"appliance: a\ndevices:\n  r1:\n    type: router\n    ports: {ports}\n" \
           f"    routes: {routes}\n{extra}"


@pytest.mark.parametrize("ip, words", [
    ("10.0.0.300/24", ["bad port address"]),
    ("10.0.0.1", ["ADDRESS/LENGTH"]),
    ("10.0.0.0/24", ["network address"]),
    ("10.0.0.255/24", ["broadcast address"]),
    ("127.0.0.1/8", ["loopback"]),
    ("224.0.0.1/24", ["multicast"]),
    ("10.0.0.1/33", ["bad port address"]),
    ("10.0.0.1/0", ["prefix length"]),
])
def test_bad_port_address_names_its_path(ip, words):
    got = issues(router_doc(f"{{lan: {{ip: '{ip}'}}}}"))
    assert list(got) == ["devices.r1.ports.lan.ip"]
    for w in words:
        assert w in got["devices.r1.ports.lan.ip"]


@pytest.mark.parametrize("mac", ["01:00:5e:00:00:01", "00:00:00:00:00:00", "02:00:00:00:01",
                                 "zz:00:00:00:00:01"])
def test_bad_port_mac(mac):
    got = issues(router_doc(f"{{lan: {{ip: 10.0.0.1/24, mac: '{mac}'}}}}"))
    assert list(got) == ["devices.r1.ports.lan.mac"]


def test_port_and_route_problems_are_all_reported_at_their_paths():
    text = router_doc(
        "{lan: {ip: 10.0.0.1/24}, wan: {ip: 10.0.0.129/25}, dmz: {ip: 10.1.0.1/24}}",
        "[{prefix: 0.0.0.0/0, via: 192.0.2.1},"
        " {prefix: 10.8.0.0/16, port: nope},"
        " {prefix: 10.1.0.0/24, port: dmz},"
        " {prefix: 10.2.0.0/16, via: 10.1.0.1},"
        " {prefix: 10.3.0.0/16, via: 10.0.0.5, port: dmz},"
        " {prefix: 10.3.0.0/16, port: dmz},"
        " {prefix: 10.1.0.255/32, port: dmz},"
        " {prefix: 10.0.0.1/32, port: lan},"
        " {prefix: 10.4.0.0/16, via: 10.1.0.255}]")
    got = issues(text)
    assert "overlaps 10.0.0.0/24 of port lan" in got["devices.r1.ports.wan.ip"]
    assert "not in a connected subnet" in got["devices.r1.routes[0].via"]
    assert "no port 'nope'" in got["devices.r1.routes[1].port"]
    assert "connected subnet of port dmz" in got["devices.r1.routes[2].prefix"]
    assert "address of port dmz" in got["devices.r1.routes[3].via"]
    assert "not in port dmz's subnet" in got["devices.r1.routes[4].via"]
    assert "duplicate route" in got["devices.r1.routes[5].prefix"]
    assert "broadcast address" in got["devices.r1.routes[6].prefix"]
    assert "address of port lan" in got["devices.r1.routes[7].prefix"]
    assert "broadcast address" in got["devices.r1.routes[8].via"]
    assert len(got) == 10


@pytest.mark.parametrize("route, path, words", [
    ("{prefix: 10.9.0.1/16, port: lan}", "devices.r1.routes[0].prefix", ["host bits"]),
    ("{prefix: 10.9.0.0/33, port: lan}", "devices.r1.routes[0].prefix", ["bad prefix"]),
    ("{prefix: 10.9.0.0/16}", "devices.r1.routes[0]", ["via", "port"]),
    ("{prefix: 10.9.0.0/16, via: 10.0.0.x}", "devices.r1.routes[0].via", ["bad next hop"]),
    ("{prefix: 10.9.0.0/16, via: 10.0.0.9, metric: 1}", "devices.r1.routes[0].metric",
     ["unknown key"]),
])
def test_bad_route(route, path, words):
    got = issues(router_doc("{lan: {ip: 10.0.0.1/24}}", f"[{route}]"))
    assert list(got) == [path]
    for w in words:
        assert w in got[path]


def test_max_routes_and_other_limits():
    routes = "[" + ", ".join(f"{{prefix: 10.{i}.0.0/16, via: 192.168.0.9}}"
                             for i in range(1, 5)) + "]"
    got = issues(router_doc("{lan: {ip: 192.168.0.1/24}}", routes, "    max_routes: 4\n"))
    assert "exceed max_routes (4)" in got["devices.r1.routes"]
    got = issues(router_doc("{}", "[]", "    arp_queue: 0\n    color: red\n"))
    assert set(got) == {"devices.r1.ports", "devices.r1.arp_queue", "devices.r1.color"}
    parse_appliance(router_doc("{lan: {ip: 192.168.0.1/24}}", routes, "    max_routes: 5\n"))


def test_duplicate_port_names_are_rejected():
    text = router_doc("\n      lan: {ip: 10.0.0.1/24}\n      lan: {ip: 10.0.1.1/24}")
    got = issues(text)
    assert "duplicate key 'lan'" in got["devices.r1.ports.lan"]


def test_valid_config_compiles():
    app = parse_appliance(appliance(routes="[{prefix: 0.0.0.0/0, via: 198.51.100.1},"
                                    " {prefix: 10.9.0.0/16, port: lan},"
                                    " {prefix: 10.8.0.0/16, via: 10.0.0.7, port: lan}]"))
    r = app.devices["r1"]
    assert isinstance(r, Router) and r.ports == ("lan", "wan")
    assert r.ticks and r.emit_reserve >= 3 * 64
    assert "lan 10.0.0.1/24" in r.describe()
    assert r.port_mac_str("lan") == R_LAN
    cfg = RouterConfig.model_validate({"type": "router", "ports": {"lan": {"ip": "10.0.0.1/24"}},
                                       "routes": [{"prefix": "1.2.3.4", "via": "10.0.0.9"},
                                                  {"prefix": "10.8.0.0/255.255.0.0",
                                                   "port": "lan"}]})
    assert [r.prefix for r in cfg.routes] == ["1.2.3.4/32", "10.8.0.0/16"]
    assert cfg.route_table() == [(0x01020304, 32, 0x0A000009, None),
                                 (0x0A080000, 16, 0, "lan")]


# -- MAC derivation ------------------------------------------------------------------

def test_mac_derivation_is_deterministic_and_local():
    cfg = RouterConfig.model_validate({"type": "router", "ports": {
        "lan": {"ip": "10.0.0.1/24"}, "wan": {"ip": "10.0.1.1/24", "mac": "02:AA:00:00:00:01"}}})
    a, b = Router("r1", cfg), Router("r1", cfg)
    assert a.port_mac_str("lan") == b.port_mac_str("lan")
    want = "02:" + ":".join(f"{x:02x}" for x in hashlib.sha1(b"r1.lan").digest()[:5])
    assert a.port_mac_str("lan") == want
    assert a.port_mac_str("wan") == "02:aa:00:00:00:01"
    m = derive_mac("r1", "lan")
    assert m >> 40 == 0x02  # locally administered, unicast
    assert len({derive_mac("r1", "lan"), derive_mac("r1", "wan"), derive_mac("r2", "lan")}) == 3
    assert Router("r2", cfg).port_mac_str("lan") != want


def test_derived_mac_answers_arp_and_is_the_only_mac_accepted():
    rig = Rig(appliance(lan_mac=""))
    mac = rig.plan.devices[0].port_mac_str("lan")
    out = rig.send("lan", [h5_who_has_r1()], 0)
    reply = Ether(out["lan"][0])
    assert reply.src == mac and reply["ARP"].hwsrc == mac and reply["ARP"].op == 2
    out = rig.send("lan", [udp(dmac=R_LAN)], 1)  # the configured-looking MAC is not ours
    assert out == {"lan": [], "wan": []}
    assert rig.counters()["r1 drop/not_for_me"] == 1


# -- held packets, ticks, release order ------------------------------------------------

def test_held_packet_times_out_on_tick_and_arp_is_retried_each_tick():
    rig = Rig(appliance(extra="    arp_hold: 1.0"))
    out = rig.send("lan", [udp(ident=1), udp(ident=2)], 10.0)
    assert len(out["wan"]) == 1 and is_arp_request_for(out["wan"][0], "198.51.100.1")
    assert rig.state.held_slots() == 2
    assert rig.tick(10.05)["wan"] == []  # too soon after the request
    for t in (10.1, 10.2, 10.3):
        out = rig.tick(t)
        assert len(out["wan"]) == 1 and is_arp_request_for(out["wan"][0], "198.51.100.1")
        assert rig.tick(t)["wan"] == []  # once per tick at most
    assert rig.state.held_slots() == 2
    out = rig.tick(11.0)  # held arp_hold seconds: dropped
    assert out == {"lan": [], "wan": []}
    assert rig.state.held_slots() == 0
    c = rig.counters()
    assert c["r1 drop/arp_timeout"] == 2
    assert c["r1 arp_requests_sent"] == 4
    assert c["r1 held"] == 2
    assert rig.pool.available == rig.pool.nslots
    # A later packet starts over: held again, a new request at once.
    out = rig.send("lan", [udp(ident=3)], 12.0)
    assert len(out["wan"]) == 1 and rig.state.held_slots() == 1


def test_held_packets_time_out_on_a_batch_too():
    rig = Rig(appliance(extra="    arp_hold: 0.5"))
    rig.send("lan", [udp(ident=1)], 0.0)
    out = rig.send("lan", [h5_who_has_r1()], 0.6)  # any batch checks the queue
    assert len(out["lan"]) == 1
    assert rig.counters()["r1 drop/arp_timeout"] == 1 and rig.state.held_slots() == 0


def test_reply_releases_held_packets_before_later_ones_of_the_same_batch():
    rig = Rig(appliance())
    rig.send("lan", [udp(ident=1), udp(ident=2)], 1.0)
    # One batch on wan: the ARP reply, then a packet to 8.8.8.8 (back out wan via the
    # gateway): it must leave after the two held ones.
    hairpin = udp(ident=3, src="203.0.113.7", smac=GW, dmac=R_WAN)
    out = rig.send("wan", [gw_is_at(), hairpin, udp(ident=4, src="203.0.113.7", smac=GW,
                                                     dmac=R_WAN)], 1.2)
    assert [ip_id(f) for f in out["wan"]] == [1, 2, 3, 4]
    for f in out["wan"]:
        e = Ether(f)
        assert (e.src, e.dst, e[SIP].ttl) == (R_WAN, GW, 63)
    c = rig.counters()
    assert c["r1 held_released"] == 2 and c["r1 drop/arp_consumed"] == 1
    assert rig.state.held_slots() == 0
    out = rig.send("lan", [udp(ident=5)], 1.3)
    assert [ip_id(f) for f in out["wan"]] == [5]


def test_packets_held_before_the_reply_in_the_same_batch_keep_their_order():
    rig = Rig(appliance())
    hp = [udp(ident=i, src="203.0.113.7", smac=GW, dmac=R_WAN) for i in range(1, 4)]
    out = rig.send("wan", [hp[0], hp[1], gw_is_at(), hp[2]], 1.0)
    frames = out["wan"]
    assert is_arp_request_for(frames[0], "198.51.100.1")
    assert [ip_id(f) for f in frames[1:]] == [1, 2, 3]


def test_release_from_a_replicated_arp_entry_on_tick():
    rig = Rig(appliance())
    rig.send("lan", [udp(ident=1)], 1.0)
    other = Rig(appliance())  # another worker learned the gateway
    other.send("wan", [gw_is_at()], 1.0)
    rig.state.import_shared(other.state.export_shared(1.1), 1.1)
    out = rig.tick(1.1)
    assert [ip_id(f) for f in out["wan"]] == [1]
    assert Ether(out["wan"][0]).dst == GW
    assert rig.counters()["r1 held_released"] == 1


def test_queue_full_and_icmp_errors_held_for_the_source():
    rig = Rig(appliance(extra="    arp_queue: 3"))
    # 10.0.0.5 unknown: the time exceeded is held waiting for its MAC.
    out = rig.send("lan", [udp(ttl=1, ident=9)], 1.0)
    assert len(out["lan"]) == 1 and is_arp_request_for(out["lan"][0], "10.0.0.5")
    out = rig.send("lan", [udp(ident=i) for i in range(3)], 1.01)  # two fit
    assert len(out["wan"]) == 1
    assert rig.counters()["r1 drop/arp_queue_full"] == 1
    # The host answers: its time exceeded goes out.
    ans = bytes(Eth(src=H5, dst=R_LAN) / ARP(op=2, hwsrc=H5, psrc="10.0.0.5", hwdst=R_LAN,
                                             pdst="10.0.0.1"))
    out = rig.send("lan", [ans], 1.02)
    e = Ether(out["lan"][0])
    assert e.dst == H5 and e[SICMP].type == 11 and e[SIP].src == "10.0.0.1"
    assert rig.state.held_slots() == 2


def test_a_full_queue_does_not_keep_other_next_hops_from_resolving():
    rig = Rig(appliance(extra="    arp_queue: 2"))
    rig.send("lan", [udp(ident=1), udp(ident=2)], 1.0)  # the gateway never answers
    out = rig.send("wan", [udp(dst="10.0.0.77", src="203.0.113.7", smac=GW, dmac=R_WAN,
                               ident=3)], 1.01)
    assert is_arp_request_for(out["lan"][0], "10.0.0.77")  # dropped, but asked for
    out = rig.send("wan", [udp(dst="10.0.0.77", src="203.0.113.7", smac=GW, dmac=R_WAN,
                               ident=4)], 1.02)
    assert out["lan"] == []  # not again within ARP_RETRY
    ans = bytes(Eth(src="02:00:00:00:00:77", dst=R_LAN)
                / ARP(op=2, hwsrc="02:00:00:00:00:77", psrc="10.0.0.77", hwdst=R_LAN,
                      pdst="10.0.0.1"))
    rig.send("lan", [ans], 1.03)
    out = rig.send("wan", [udp(dst="10.0.0.77", src="203.0.113.7", smac=GW, dmac=R_WAN,
                               ident=5)], 1.04)
    assert [ip_id(f) for f in out["lan"]] == [5]
    out = rig.send("wan", [udp(dst="10.0.0.78", src="203.0.113.7", smac=GW, dmac=R_WAN,
                               ident=6)], 1.2)
    assert is_arp_request_for(out["lan"][0], "10.0.0.78")
    assert rig.counters()["r1 drop/arp_queue_full"] == 3


def test_no_echo_reply_to_a_broadcast_source():
    rig = Rig(appliance())
    ping = bytes(Eth(src=H5, dst=R_LAN) / IPv4(src="10.0.0.255", dst="10.0.0.1")
                 / ICMP(type=8, id=1, seq=1))
    assert rig.send("lan", [ping], 0.0) == {"lan": [], "wan": []}
    assert rig.counters()["r1 drop/martian_src"] == 1


def test_arp_entries_expire():
    rig = Rig(appliance(extra="    arp_timeout: 5"))
    rig.send("wan", [gw_is_at()], 0.0)
    assert len(rig.send("lan", [udp()], 4.0)["wan"]) == 1
    out = rig.send("lan", [udp()], 6.0)  # expired: held, ARP again
    assert is_arp_request_for(out["wan"][0], "198.51.100.1")
    assert rig.counters()["r1 arp_expired"] == 1


# -- ICMP ----------------------------------------------------------------------------

def test_icmp_errors_are_rate_limited_but_the_packets_still_dropped():
    rig = Rig(appliance(extra="    icmp_rate: 2"))
    rig.send("lan", [h5_who_has_r1()], 10.0)
    out = rig.send("lan", [udp(ttl=1, ident=i) for i in range(5)], 10.0)
    assert len(out["lan"]) == 2  # burst = rate
    c = rig.counters()
    assert c["r1 drop/ttl_exceeded"] == 5
    assert c["r1 icmp_sent"] == 2 and c["r1 icmp_rate_limited"] == 3
    out = rig.send("lan", [udp(ttl=1, ident=i) for i in range(3)], 10.5)  # +1 token
    assert len(out["lan"]) == 1
    out = rig.send("lan", [udp(dst="10.0.0.1", ident=i) for i in range(4)], 100.0)
    assert len(out["lan"]) == 2  # port unreachable shares the bucket, refilled to 2
    # Echo replies are not errors: never limited.
    pings = [bytes(Eth(src=H5, dst=R_LAN) / IPv4(src="10.0.0.5", dst="10.0.0.1")
                   / ICMP(type=8, id=1, seq=i)) for i in range(6)]
    assert len(rig.send("lan", pings, 100.0)["lan"]) == 6
    c = rig.counters()
    assert c["r1 icmp_rate_limited"] == 3 + 2 + 2
    assert c["r1 echo_replies"] == 6


def test_icmp_rate_zero_sends_no_errors():
    rig = Rig(appliance(extra="    icmp_rate: 0"))
    rig.send("lan", [h5_who_has_r1()], 0.0)
    out = rig.send("lan", [udp(ttl=1), udp(dst="192.0.2.9", ttl=0)], 1.0)
    assert out["lan"] == []
    assert rig.counters()["r1 icmp_rate_limited"] == 2


def test_icmp_error_fits_576_bytes_and_quotes_the_packet_as_received():
    rig = Rig(appliance())
    rig.send("lan", [h5_who_has_r1()], 0.0)
    big = udp(ttl=1, ident=77, payload=bytes(range(256)) * 5)
    out = rig.send("lan", [big], 1.0)
    e = Ether(out["lan"][0])
    assert e[SIP].len == 576 and len(out["lan"][0]) == 14 + 576
    assert out["lan"][0][14 + 28:] == big[14:14 + QUOTE_MAX]
    assert e[SIP].tos == 0xC0 and e[SIP].ttl == 64 and e[SIP].src == "10.0.0.1"


def test_pool_exhausted_means_no_generated_packet():
    rig = Rig(appliance(), slots=8)
    rig.send("lan", [h5_who_has_r1()], 0.0)
    b = PacketBatch(rig.pool, 4)
    b.add_frames([udp(ttl=1, ident=i) for i in range(2)])
    taken = [rig.pool.alloc() for _ in range(rig.pool.available)]
    outputs = rig.engine.process(0, b, 1.0)
    assert outputs[0].n == 0
    for s in taken:
        rig.pool.release(s)
    rig.check()
    c = rig.counters()
    assert c["r1 pool_exhausted"] == 2 and c["r1 drop/ttl_exceeded"] == 2


# -- checksums, checked by scapy --------------------------------------------------------

def scapy_checksums_ok(frame: bytes) -> None:
    e = Ether(frame)
    ip = e[SIP]
    fresh = SIP(bytes(ip))
    del fresh.chksum
    assert SIP(bytes(fresh)).chksum == ip.chksum, "IP header checksum"
    if ip.proto == 1 and ip.frag == 0 and not ip.flags.MF:
        ic = ip[SICMP]
        raw = bytes(ic)[: ip.len - ip.ihl * 4]
        again = SICMP(raw)
        del again.chksum
        assert SICMP(bytes(again)).chksum == ic.chksum, "ICMP checksum"


def test_forwarded_and_generated_packets_have_correct_checksums():
    rig = Rig(appliance())
    rig.send("wan", [gw_is_at()], 0.0)
    rig.send("lan", [h5_who_has_r1()], 0.0)
    r = random.Random(5)
    frames = []
    for i in range(300):
        opts = r.choice([b"", b"\x01\x01\x01\x00", b"\x94\x04\x00\x00",
                         b"\x07\x0b\x04" + bytes(8) + b"\x01"])
        ip = IPv4(src="10.0.0.5", dst=f"{r.randrange(1, 224)}.{r.randrange(256)}.0.9",
                  ttl=r.randrange(0, 256), id=r.randrange(65536), tos=r.randrange(256),
                  flags=r.choice([0, 1, 2]), frag=r.choice([0, 0, 0, 7]), options=opts)
        l4 = r.choice([UDP(sport=i, dport=53), TCP(sport=i, dport=80, flags="S"),
                       ICMP(type=8, id=i, seq=1)])
        frames.append(bytes(Eth(src=H5, dst=R_LAN) / ip / l4 / Raw(r.randbytes(r.randrange(60)))))
    frames += [bytes(Eth(src=H5, dst=R_LAN) / IPv4(src="10.0.0.5", dst="10.0.0.1", ttl=t,
                                                    options=b"\x01" * (4 * (t % 3)))
                     / ICMP(type=8, id=t, seq=t) / Raw(r.randbytes(t))) for t in range(1, 40)]
    out = rig.send("lan", frames, 1.0)
    assert len(out["wan"]) > 250 and len(out["lan"]) > 39  # echo replies + time exceeded
    for f in out["wan"] + out["lan"]:
        scapy_checksums_ok(f)
    fwd = {Ether(f)[SIP].id: Ether(f)[SIP].ttl for f in out["wan"]}
    for f in frames[:300]:
        ip = Ether(f)[SIP]
        if ip.id in fwd and ip.ttl > 1:
            assert fwd[ip.id] == ip.ttl - 1
    c = rig.counters()
    assert c["r1 echo_replies"] == 39
    assert c.get("r1 drop/bad_checksum", 0) == 0


# -- robustness ------------------------------------------------------------------------

def test_random_and_mutated_frames_never_break_it():
    from workload import frames as workload_frames

    rig = Rig(appliance(extra="    arp_queue: 8\n    icmp_rate: 50"), slots=2048)
    r = random.Random(1)
    router_frames = [h5_who_has_r1(), gw_is_at(), udp(), udp(ttl=1), udp(dst="10.0.0.77"),
                     udp(dst="10.0.0.1"), bytes(Eth(src=H5, dst=R_LAN) / Dot1Q(vid=3)
                                                / IPv4(src="10.0.0.5", dst="8.8.8.8")),
                     bytes(Eth(src=H5, dst=R_LAN) / IPv6(src="::1", dst="::2"))]
    pool = workload_frames(3, 600)
    t = 0.0
    for step in range(120):
        batch = []
        for _ in range(r.randrange(0, 12)):
            f = r.choice(router_frames) if r.random() < 0.4 else r.choice(pool)
            if r.random() < 0.5 and len(f) >= 14:  # address most of them to the router
                f = (R_LAN if r.random() < 0.5 else R_WAN).replace(":", "")
                f = bytes.fromhex(f) + r.choice(router_frames + pool)[6:]
            batch.append(f)
        t += r.choice([0.0, 0.01, 0.1, 0.7])
        rig.send(r.choice(["lan", "wan"]), batch, t)
        if step % 7 == 0:
            rig.tick(t)
    c = rig.counters()
    assert c["r1 emitted"] > 0
    assert sum(v for k, v in c.items() if k.startswith("r1 drop/")) > 100
    rig.tick(t + 10)
    assert rig.state.held_slots() == 0 and rig.pool.available == rig.pool.nslots


def test_every_drop_reason_and_counter_is_named():
    assert len(set(DROPS)) == len(DROPS) and len(set(EVENTS)) == len(EVENTS)
    for name in ("not_for_me", "malformed", "bad_checksum", "ttl_exceeded", "no_route",
                 "arp_timeout", "arp_queue_full", "unsupported", "not_served"):
        assert name in DROPS
    for name in ("arp_requests_sent", "arp_replies_sent", "arp_learned", "icmp_sent",
                 "icmp_rate_limited", "held_released", "pool_exhausted"):
        assert name in EVENTS


# -- compiled against reference ----------------------------------------------------------

def differential_run() -> dict[str, np.ndarray]:
    """A deterministic router workload; everything observable, as arrays."""
    rig = Rig(appliance(extra="    arp_queue: 6\n    icmp_rate: 20\n    arp_hold: 0.3"),
              slots=1024)
    r = random.Random(11)
    base = [h5_who_has_r1(), gw_is_at(), gw_is_at("02:00:00:00:00:fc"), udp(), udp(ttl=1),
            udp(dst="10.0.0.77"), udp(dst="10.0.0.1"), udp(dst="10.0.0.9", ttl=2),
            bytes(Eth(src=H5, dst=R_LAN) / IPv4(src="10.0.0.5", dst="10.0.0.1")
                  / ICMP(type=8, id=3, seq=1) / Raw(b"x" * 30)),
            bytes(Eth(src=H5, dst=R_LAN) / IPv4(src="10.0.0.5", dst="8.8.8.8", flags=1,
                                                frag=3, options=b"\x01" * 4) / Raw(b"y" * 20))]
    sent = {"lan": [], "wan": []}
    t = 0.0
    for step in range(80):
        batch = []
        for _ in range(r.randrange(0, 8)):
            f = bytearray(r.choice(base))
            if r.random() < 0.3:
                f[r.randrange(14, len(f))] = r.randrange(256)
            if r.random() < 0.1:
                f = f[: r.randrange(len(f) + 1)]
            batch.append(bytes(f))
        t += r.choice([0.0, 0.05, 0.2])
        out = rig.send(r.choice(["lan", "wan"]), batch, t)
        if step % 5 == 0:
            for k, v in rig.tick(t).items():
                out[k] += v
        for k in sent:
            sent[k] += out[k]
    res = {"counters": np.array(sorted(rig.counters().items()), dtype=object).astype(str)}
    for k, fr in sent.items():
        res[f"sent_{k}"] = np.frombuffer(b"".join(fr), np.uint8)
        res[f"lens_{k}"] = np.array([len(f) for f in fr], np.int64)
    return res


@pytest.mark.slow
def test_compiled_router_equals_reference():
    jit = assert_matches_reference("test_router", "differential_run")
    c = dict(jit["counters"].tolist())
    for name in ("r1 emitted", "r1 held", "r1 held_released", "r1 icmp_sent",
                 "r1 echo_replies", "r1 drop/arp_timeout"):
        assert int(c.get(name, 0)) > 0, name
