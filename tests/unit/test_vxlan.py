"""The vxlan device: config validation, encapsulation (headers re-parsed with scapy,
source ports from the flow hash, head-end replication, MTU, headroom), decapsulation
(every check, learning, aging, static entries), underlay ARP and ticks, ICMP echo,
two tunnel endpoints joining two segments, robustness, the metadata of rewritten rows
against the parser, and compiled kernels against the JIT-off reference.

Engine-level tests use :class:`rig.Rig`, which checks the accounting and that no
packet slot leaked after every step.
"""

from __future__ import annotations

import random

import numpy as np
import pytest
from reference import assert_matches_reference
from rig import Rig
from scapy.layers.inet import ICMP as SICMP
from scapy.layers.inet import IP as SIP
from scapy.layers.inet import UDP as SUDP
from scapy.layers.l2 import Ether
from scapy.layers.vxlan import VXLAN

from dva.graph.appliance import ApplianceError, format_path, parse_appliance
from dva.nf.base import drop_code
from dva.nf.router import derive_mac
from dva.nf.vxlan import DROPS, EVENTS, Vxlan, VxlanConfig
from dva.packet import layout as L
from dva.packet.batch import PacketBatch
from dva.packet.build import ARP, ICMP, UDP, Dot1Q, Eth, IPv4, IPv6, Raw
from dva.packet.parse import parse
from dva.packet.pool import PacketPool

LOCAL, VMAC = "192.0.2.1", "02:00:00:00:0a:01"
R2, R3, R9, GW = "192.0.2.2", "192.0.2.3", "198.51.100.9", "192.0.2.254"
M2, M3, MGW = "02:00:00:00:0b:02", "02:00:00:00:0b:03", "02:00:00:00:0b:fe"
A, B, C = "02:00:00:00:00:0a", "02:00:00:00:00:0b", "02:00:00:00:00:0c"  # inner hosts
BCAST = "ff:ff:ff:ff:ff:ff"


def appliance(extra: str = "", remotes: str = f"[{R2}, {R3}]", vni: int = 100) -> str:
    return f"""
appliance: t
devices:
  vx:
    type: vxlan
    vni: {vni}
    local: {LOCAL}/24
    mac: '{VMAC}'
    remotes: {remotes}
{extra}
attach:
  vx.overlay: {{memory: ov}}
  vx.underlay: {{memory: ul}}
"""


def is_at(ip: str, mac: str) -> bytes:
    return bytes(Eth(src=mac, dst=VMAC) / ARP(op=2, hwsrc=mac, psrc=ip, hwdst=VMAC,
                                              pdst=LOCAL))


def inner(src=A, dst=B, sip="10.0.0.1", dip="10.0.0.2", sport=1000, dport=2000,
          payload=b"") -> bytes:
    return bytes(Eth(src=src, dst=dst) / IPv4(src=sip, dst=dip)
                 / UDP(sport=sport, dport=dport) / Raw(payload))


def vx(frame: bytes, src=R2, smac=M2, vni=100, flags=0x08, dport=4789, dst=LOCAL,
       dmac=VMAC, csum=0, rsv=b"\x00\x00\x00", **ip) -> bytes:
    """``frame`` VXLAN-encapsulated as a remote VTEP would send it to us."""
    hdr = bytes([flags]) + rsv + vni.to_bytes(3, "big") + b"\x00"
    return bytes(Eth(src=smac, dst=dmac) / IPv4(src=src, dst=dst, **ip)
                 / UDP(sport=50000, dport=dport, chksum=csum) / Raw(hdr + frame))


def resolved(rig: Rig, *pairs: tuple[str, str], now: float = 0.0) -> None:
    out = rig.send("underlay", [is_at(ip, mac) for ip, mac in pairs], now)
    assert out == {"overlay": [], "underlay": []}


def hash_bucket(frame: bytes) -> tuple[int, int]:
    """(HASH, BUCKET) as the parser gives them (4096 buckets, tenant 0)."""
    b = PacketBatch(PacketPool(4), 1)
    b.add_frame(frame)
    parse(b, 4096)
    return int(b.meta[0, L.HASH]), int(b.meta[0, L.BUCKET])


def check_outer(f: bytes, dst_ip: str, dst_mac: str, inner_frame: bytes,
                vni: int = 100, dport: int = 4789) -> Ether:
    """Every field of an encapsulated packet, as scapy reads it."""
    e = Ether(f)
    assert (e.src, e.dst, e.type) == (VMAC, dst_mac, 0x0800)
    ip = e[SIP]
    assert (ip.src, ip.dst, ip.ttl, ip.proto, ip.ihl, ip.tos) == (LOCAL, dst_ip, 64, 17, 5, 0)
    assert ip.flags == "DF" and ip.frag == 0 and ip.len == len(f) - 14
    fresh = SIP(bytes(ip))
    del fresh.chksum
    assert SIP(bytes(fresh)).chksum == ip.chksum, "IPv4 header checksum"
    u = e[SUDP]
    assert u.dport == dport and u.len == len(f) - 34 and u.chksum == 0
    # the source port: from the inner flow's hash, and such that the outer packet has
    # the inner frame's bucket (a receiver dispatching on it reaches the flow's owner)
    ihash, ibucket = hash_bucket(inner_frame)
    assert 49152 <= u.sport <= 65535 and u.sport & 0x3000 == ihash & 0x3000
    assert hash_bucket(f)[1] == ibucket
    v = VXLAN(bytes(u.payload))
    assert v.flags == 0x08 and v.vni == vni and v.reserved1 == 0 and v.reserved2 == 0
    assert bytes(v.payload) == inner_frame
    return e


# -- config ------------------------------------------------------------------------------

def issues(text: str) -> dict[str, str]:
    with pytest.raises(ApplianceError) as ei:
        parse_appliance(text)
    return {format_path(i.path): i.message for i in ei.value.issues}


def vx_doc(body: str) -> str:
    return "appliance: a\ndevices:\n  vx:\n    type: vxlan\n" + "".join(
        f"    {line}\n" for line in body.strip().splitlines())


@pytest.mark.parametrize("body, path, words", [
    ("vni: 16777216\nlocal: 192.0.2.1/24\nremotes: [192.0.2.2]", "vni", ["16777215"]),
    ("local: 192.0.2.1/24\nremotes: [192.0.2.2]", "vni", ["missing"]),
    ("vni: 1\nlocal: 192.0.2.1\nremotes: [192.0.2.2]", "local", ["ADDRESS/LENGTH"]),
    ("vni: 1\nlocal: 192.0.2.0/24\nremotes: [192.0.2.2]", "local", ["network"]),
    ("vni: 1\nlocal: 224.0.0.1/24\nremotes: [192.0.2.2]", "local", ["unicast"]),
    ("vni: 1\nlocal: 192.0.2.1/24\nremotes: [198.51.100.2]", "remotes[0]",
     ["outside the local subnet", "no gateway"]),
    ("vni: 1\nlocal: 192.0.2.1/24\nremotes: [192.0.2.2, 192.0.2.1]", "remotes[1]",
     ["local VTEP address"]),
    ("vni: 1\nlocal: 192.0.2.1/24\nremotes: [192.0.2.2, 192.0.2.2]", "remotes[1]",
     ["listed twice"]),
    ("vni: 1\nlocal: 192.0.2.1/24\nremotes: [192.0.2.255]", "remotes[0]", ["broadcast"]),
    ("vni: 1\nlocal: 192.0.2.1/24\nremotes: [10.0.0.300]", "remotes[0]", ["bad address"]),
    ("vni: 1\nlocal: 192.0.2.1/24\nremotes: [192.0.2.2]\ngateway: 10.9.9.9", "gateway",
     ["not in the local subnet"]),
    ("vni: 1\nlocal: 192.0.2.1/24\nremotes: [192.0.2.2]\ngateway: 192.0.2.1", "gateway",
     ["local"]),
    ("vni: 1\nlocal: 192.0.2.1/24\nremotes: []", "remotes", ["at least one remote"]),
    ("vni: 1\nlocal: 192.0.2.1/24\nstatic: {'01:00:5e:00:00:01': 192.0.2.2}",
     "static.01:00:5e:00:00:01", ["unicast"]),
    ("vni: 1\nlocal: 192.0.2.1/24\nstatic: {'02:00:00:00:00:01': 203.0.113.1}",
     "static.02:00:00:00:00:01", ["no gateway"]),
    ("vni: 1\nlocal: 192.0.2.1/24\nremotes: [192.0.2.2]\nmtu: 20", "mtu", ["68"]),
    ("vni: 1\nlocal: 192.0.2.1/24\nremotes: [192.0.2.2]\nport: 0", "port", ["1"]),
    ("vni: 1\nlocal: 192.0.2.1/24\nremotes: [192.0.2.2]\nports: [a, b]", "ports",
     ["unknown key"]),
    ("vni: 1\nlocal: 192.0.2.1/24\nremotes: [192.0.2.2]\nmac: '01:00:00:00:00:01'", "mac",
     ["unicast"]),
])
def test_config_problems_are_reported_at_their_paths(body, path, words):
    got = issues(vx_doc(body))
    assert f"devices.vx.{path}" in got, got
    for w in words:
        assert w in got[f"devices.vx.{path}"], got


def test_too_many_remotes():
    remotes = ", ".join(f"10.0.{i // 200}.{i % 200 + 2}" for i in range(65))
    got = issues(vx_doc(f"vni: 1\nlocal: 10.0.0.1/16\nremotes: [{remotes}]"))
    assert "at most 64" in got["devices.vx.remotes"]


def test_valid_config_compiles_with_fixed_ports_and_a_derived_mac():
    cfg = VxlanConfig.model_validate({"type": "vxlan", "vni": 7, "local": "192.0.2.1/24",
                                      "gateway": GW, "remotes": [R9, R2],
                                      "static": {"02:AA:00:00:00:01": R3}})
    d = Vxlan("vx1", cfg)
    assert d.ports == ("overlay", "underlay")
    assert d.mac == derive_mac("vx1", "underlay") and d.mac >> 40 == 0x02
    assert d.max_emit == 1 and d.emit_reserve == len(d.nexthops) + 2
    ip = lambda a: int.from_bytes(bytes(int(x) for x in a.split(".")), "big")  # noqa: E731
    assert d.vteps == sorted([ip(R2), ip(R3), ip(R9)])
    assert d.nexthops == sorted([ip(R2), ip(R3), ip(GW)])  # R9 is reached via the gateway
    assert cfg.static == {"02:aa:00:00:00:01": R3}


# -- encapsulation ---------------------------------------------------------------------

def test_known_unicast_is_encapsulated_with_correct_headers():
    rig = Rig(appliance())
    resolved(rig, (R2, M2), (R3, M3))
    back = inner(src=B, dst=A, sip="10.0.0.2", dip="10.0.0.1")
    out = rig.send("underlay", [vx(back, src=R3, smac=M3)], 1.0)
    assert out["overlay"] == [back]
    f = inner(payload=b"hello")
    out = rig.send("overlay", [f], 2.0)
    assert len(out["underlay"]) == 1 and out["overlay"] == []
    check_outer(out["underlay"][0], R3, M3, f)
    c = rig.counters()
    assert c["vx learned"] == 1 and "vx flooded" not in c
    assert c["vx.overlay tx"] == 1 and c["vx.underlay tx"] == 1


def test_source_port_follows_the_inner_flow_and_spreads_flows():
    rig = Rig(appliance(remotes=f"[{R2}]"))
    resolved(rig, (R2, M2))
    frames = [inner(sport=1000 + i, dst=BCAST) for i in range(200)]
    out = rig.send("overlay", frames + frames[:3], 1.0)["underlay"]
    ports = [Ether(f)[SUDP].sport for f in out]
    assert all(49152 <= p <= 65535 for p in ports)
    assert ports[200:] == ports[:3]  # the same flow, the same port
    assert len(set(ports[:200])) > 190
    # the hash is symmetric: both directions of a flow take the same underlay port
    a = inner(sport=5, dport=6, dst=BCAST)
    b = inner(src=B, dst=BCAST, sip="10.0.0.2", dip="10.0.0.1", sport=6, dport=5)
    pa, pb = (Ether(f)[SUDP].sport for f in rig.send("overlay", [a, b], 2.0)["underlay"])
    assert pa == pb


def test_flood_is_replicated_to_every_remote_in_new_slots():
    rig = Rig(appliance(remotes=f"[{R2}, {R3}, {R9}]", extra=f"    gateway: {GW}"))
    resolved(rig, (R2, M2), (R3, M3), (GW, MGW))
    f = bytes(Eth(src=A, dst=BCAST) / ARP(op=1, hwsrc=A, psrc="10.0.0.1", pdst="10.0.0.2"))
    out = rig.send("overlay", [f], 1.0)["underlay"]
    assert len(out) == 3
    got = {(Ether(p)[SIP].dst, Ether(p).dst) for p in out}
    assert got == {(R2, M2), (R3, M3), (R9, MGW)}  # R9 is off-subnet: via the gateway
    for p in out:
        e = Ether(p)
        check_outer(p, e[SIP].dst, e.dst, f)
    assert len({Ether(p)[SIP].id for p in out}) == 3
    c = rig.counters()
    assert c["vx flooded"] == 1 and c["vx emitted"] == 2 and c["vx.underlay tx"] == 3


def test_flood_skips_unresolved_remotes_and_asks_for_them():
    rig = Rig(appliance(remotes=f"[{R2}, {R3}, {R9}]", extra=f"    gateway: {GW}"))
    resolved(rig, (R3, M3))
    f = inner(dst=BCAST)
    out = rig.send("overlay", [f], 1.0)["underlay"]
    data = [p for p in out if Ether(p).type == 0x0800]
    arps = sorted(Ether(p)["ARP"].pdst for p in out if Ether(p).type == 0x0806)
    assert len(data) == 1 and Ether(data[0])[SIP].dst == R3
    assert arps == sorted([R2, GW]) and all(Ether(p).dst == BCAST for p in out if p not in data)
    assert rig.counters()["vx flood_unresolved"] == 2
    # nothing resolved at all: the frame is dropped, the other replicas are counted
    rig2 = Rig(appliance(remotes=f"[{R2}, {R3}]"))
    out = rig2.send("overlay", [f, f], 1.0)["underlay"]
    assert sorted(Ether(p)["ARP"].pdst for p in out) == [R2, R3]  # once per next hop
    c = rig2.counters()
    assert c["vx drop/unresolved"] == 2 and c["vx flood_unresolved"] == 2


def test_unresolved_unicast_is_dropped_and_arp_is_rate_limited():
    rig = Rig(appliance(extra="    static: {'02:00:00:00:00:0b': 192.0.2.3}"))
    f = inner()
    for t in (1.0, 1.5, 2.0):
        out = rig.send("overlay", [f], t)["underlay"]
        assert [Ether(p)["ARP"].pdst for p in out] == ([R3] if t != 1.5 else [])
    c = rig.counters()
    assert c["vx drop/unresolved"] == 3 and c["vx arp_requests_sent"] == 2
    e = Ether(rig.send("overlay", [f], 3.0)["underlay"][0])
    assert (e.src, e.dst, e["ARP"].op, e["ARP"].hwsrc, e["ARP"].psrc) == \
        (VMAC, BCAST, 1, VMAC, LOCAL)
    resolved(rig, (R3, M3), now=3.1)
    out = rig.send("overlay", [f], 3.2)["underlay"]
    check_outer(out[0], R3, M3, f)


def test_static_entries_win_over_learning_and_unknown_unicast_floods():
    rig = Rig(appliance(extra="    static: {'02:00:00:00:00:0b': 192.0.2.3}"))
    resolved(rig, (R2, M2), (R3, M3))
    # B claims to be behind R2: not learned over the static entry
    rig.send("underlay", [vx(inner(src=B, dst=A), src=R2, smac=M2)], 1.0)
    out = rig.send("overlay", [inner(dst=B)], 1.1)["underlay"]
    assert [Ether(p)[SIP].dst for p in out] == [R3]
    out = rig.send("overlay", [inner(dst=C)], 1.2)["underlay"]  # unknown: flooded
    assert sorted(Ether(p)[SIP].dst for p in out) == [R2, R3]
    c = rig.counters()
    assert "vx learned" not in c and c["vx flooded"] == 1


def test_learned_macs_move_and_age():
    rig = Rig(appliance(extra="    aging: 10"))
    resolved(rig, (R2, M2), (R3, M3))
    rig.send("underlay", [vx(inner(src=B, dst=A), src=R2, smac=M2)], 1.0)
    assert [Ether(p)[SIP].dst for p in rig.send("overlay", [inner()], 2)["underlay"]] == [R2]
    rig.send("underlay", [vx(inner(src=B, dst=A), src=R3, smac=M3)], 3.0)
    assert [Ether(p)[SIP].dst for p in rig.send("overlay", [inner()], 4)["underlay"]] == [R3]
    out = rig.send("overlay", [inner()], 14.0)["underlay"]  # aged out after 10 s: flooded
    assert sorted(Ether(p)[SIP].dst for p in out) == [R2, R3]
    c = rig.counters()
    assert (c["vx learned"], c["vx moved"], c["vx flooded"], c["vx aged"]) == (1, 1, 1, 1)


def test_learning_can_be_switched_off():
    rig = Rig(appliance(extra="    learn: false"))
    resolved(rig, (R2, M2), (R3, M3))
    rig.send("underlay", [vx(inner(src=B, dst=A))], 1.0)
    assert len(rig.send("overlay", [inner()], 2.0)["underlay"]) == 2


def test_mtu_counts_oversize_frames_and_never_truncates():
    rig = Rig(appliance(remotes=f"[{R2}]", extra="    mtu: 1400"))
    resolved(rig, (R2, M2))
    fits = inner(dst=BCAST, payload=bytes(1400 - 36 - 42))  # 1364-byte frame: 1400 outer
    over = inner(dst=BCAST, payload=bytes(1400 - 36 - 42 + 1))
    assert len(fits) + 36 == 1400
    out = rig.send("overlay", [fits, over], 1.0)["underlay"]
    assert len(out) == 1 and len(out[0]) == 1414 and Ether(out[0])[SIP].len == 1400
    assert rig.counters()["vx drop/too_big"] == 1


def test_no_headroom_is_a_counted_drop():
    dev = Vxlan("vx", VxlanConfig.model_validate({"type": "vxlan", "vni": 1, "mac": VMAC,
                                                  "local": "192.0.2.1/24",
                                                  "remotes": [R2]}))
    st = dev.new_state()
    pool = PacketPool(8)
    b = PacketBatch(pool, 4)
    f = inner(dst=BCAST)  # a frame 10 bytes into its slot (a device could leave it so)
    slot = pool.alloc()
    pool.data[slot, 10:10 + len(f)] = np.frombuffer(f, np.uint8)
    b.meta[0, :] = 0
    b.meta[0, [L.SLOT, L.START, L.LEN, L.VLAN]] = (slot, 10, len(f), -1)
    b.n = 1
    parse(b)
    dev.process(b, st, 1.0)
    assert b.meta[0, L.VERDICT] == drop_code(DROPS.index("no_headroom"))


def test_inner_vlan_tags_are_dropped_unless_allowed():
    tagged = bytes(Eth(src=A, dst=BCAST) / Dot1Q(vid=5) / IPv4(src="10.0.0.1", dst="10.0.0.2"))
    for allowed in (False, True):
        rig = Rig(appliance(remotes=f"[{R2}]", extra=f"    inner_vlan: {str(allowed).lower()}"))
        resolved(rig, (R2, M2))
        out = rig.send("overlay", [tagged], 1.0)["underlay"]
        back = rig.send("underlay", [vx(tagged)], 1.1)["overlay"]
        if allowed:
            check_outer(out[0], R2, M2, tagged)
            assert back == [tagged]
        else:
            assert out == [] and back == []
            assert rig.counters()["vx drop/inner_vlan"] == 2


def test_bad_inner_source_and_runts():
    rig = Rig(appliance(remotes=f"[{R2}]"))
    resolved(rig, (R2, M2))
    bad = [inner(src="01:00:5e:00:00:01"), inner(src="00:00:00:00:00:00"), b"\x01" * 10]
    rig.send("overlay", bad, 1.0)
    rig.send("underlay", [vx(b) for b in bad[:2]] + [vx(bytes(13))], 1.1)
    c = rig.counters()
    assert c["vx drop/invalid_src_mac"] == 4 and c["vx drop/runt"] == 2


def test_many_vteps_are_all_found():
    """VTEPs are looked up by a hash of their address: every one of 500 (collisions
    included) is found, an address that is none is not."""
    ips = [f"10.0.{i // 250}.{i % 250 + 2}" for i in range(500)]
    static = ", ".join(f"'02:00:00:01:{i >> 8:02x}:{i & 255:02x}': {a}" for i, a in enumerate(ips))
    rig = Rig(appliance(remotes="[]", extra=f"    static: {{{static}}}")
              .replace(f"{LOCAL}/24", "10.0.9.1/16"), slots=2048)
    frames = [vx(inner(src=f"02:00:00:02:{i >> 8:02x}:{i & 255:02x}"), src=a, dst="10.0.9.1")
              for i, a in enumerate(ips)]
    out = rig.send("underlay", frames + [vx(inner(), src="10.0.3.3", dst="10.0.9.1")], 1.0)
    assert len(out["overlay"]) == 500
    c = rig.counters()
    assert c["vx learned"] == 500 and c["vx drop/unknown_vtep"] == 1


# -- decapsulation ---------------------------------------------------------------------

def test_decapsulation_strips_the_outer_headers():
    rig = Rig(appliance())
    f = inner(src=B, dst=A, payload=b"x" * 100)
    out = rig.send("underlay", [vx(f), vx(f, src=R3, smac=M3, flags=0xFF,
                                          rsv=b"\xff\xff\xff")], 1.0)
    assert out["overlay"] == [f, f]  # reserved bits and flags other than I are ignored
    c = rig.counters()
    assert c["vx.overlay tx"] == 2 and c["vx learned"] == 1 and c["vx moved"] == 1


BAD_UNDERLAY = [
    (vx(inner(), vni=101), "unknown_vni"),
    (vx(inner(), flags=0x00), "bad_vxlan"),
    (vx(inner(), flags=0xF7), "bad_vxlan"),
    (vx(inner(), src="192.0.2.7"), "unknown_vtep"),
    (vx(inner(), dst="192.0.2.9"), "not_for_me"),
    (vx(inner(), dmac="02:00:00:00:0a:99"), "not_for_me"),
    (vx(inner(), dmac=BCAST), "not_for_me"),
    (vx(inner(), dport=4790), "not_served"),
    (vx(inner(), csum=0x1234), "bad_checksum"),
    (vx(inner(), chksum=0x1234), "bad_checksum"),
    (bytes(Eth(src=M2, dst=VMAC) / IPv4(src=R2, dst=LOCAL, flags="MF") / UDP(
        sport=1, dport=4789) / Raw(bytes(30))), "fragment"),
    (bytes(Eth(src=M2, dst=VMAC) / IPv4(src=R2, dst=LOCAL) / UDP(sport=1, dport=4789, chksum=0)
           / Raw(bytes(4))), "malformed"),
    (bytes(Eth(src=M2, dst=VMAC) / IPv4(src=R2, dst=LOCAL) / UDP(sport=1, dport=4789)
           / Raw(bytes(4)))[:-8], "malformed"),
    (bytes(Eth(src=M2, dst=VMAC) / Dot1Q(vid=2) / IPv4(src=R2, dst=LOCAL)), "unsupported"),
    (bytes(Eth(src=M2, dst=VMAC) / IPv6(src="::1", dst="::2")), "unsupported"),
    (bytes(Eth(src=M2, dst=VMAC) / IPv4(src=R2, dst=LOCAL) / UDP(sport=1, dport=53)),
     "not_served"),
    (bytes(Eth(src=M2, dst=VMAC) / IPv4(src=R2, dst=LOCAL) / ICMP(type=0)), "not_served"),
    (bytes(Eth(src=M2, dst=VMAC) / IPv4(src=R2, dst=LOCAL) / ICMP(type=8, chksum=1)),
     "bad_checksum"),
    (b"\x02\x00\x00\x00\x0a\x01" + bytes(5), "malformed"),
]


@pytest.mark.parametrize("frame, reason", BAD_UNDERLAY,
                         ids=[f"{i}-{r}" for i, (_, r) in enumerate(BAD_UNDERLAY)])
def test_underlay_checks(frame, reason):
    rig = Rig(appliance())
    out = rig.send("underlay", [frame], 1.0)
    assert out == {"overlay": [], "underlay": []}
    c = rig.counters()
    assert c[f"vx drop/{reason}"] == 1
    assert not any(k.startswith("vx drop/") and k != f"vx drop/{reason}" for k in c)


def test_a_correct_nonzero_udp_checksum_is_accepted():
    f = inner(src=B, dst=A)
    pkt = vx(f, csum=None)
    assert Ether(pkt)[SUDP].chksum != 0
    assert Rig(appliance()).send("underlay", [pkt], 1.0)["overlay"] == [f]


def test_echo_requests_to_the_vtep_are_answered():
    rig = Rig(appliance())
    req = bytes(Eth(src=M2, dst=VMAC) / IPv4(src=R2, dst=LOCAL, ttl=3, id=9)
                / ICMP(type=8, id=77, seq=5) / Raw(b"ping"))
    out = rig.send("underlay", [req], 1.0)["underlay"]
    e = Ether(out[0])
    assert (e.src, e.dst, e[SIP].src, e[SIP].dst, e[SIP].ttl) == (VMAC, M2, LOCAL, R2, 64)
    assert (e[SICMP].type, e[SICMP].id, e[SICMP].seq, bytes(e[SICMP].payload)) == \
        (0, 77, 5, b"ping")
    fresh = Ether(out[0])
    del fresh[SIP].chksum
    del fresh[SICMP].chksum
    assert bytes(Ether(bytes(fresh))) == out[0]
    assert rig.counters()["vx echo_replies"] == 1


# -- underlay ARP and ticks -------------------------------------------------------------

def who_has(target: str, sip: str, smac: str, dst: str = BCAST) -> bytes:
    return bytes(Eth(src=smac, dst=dst) / ARP(op=1, hwsrc=smac, psrc=sip, pdst=target))


def test_arp_requests_for_the_vtep_are_answered_and_next_hops_learned():
    rig = Rig(appliance())
    out = rig.send("underlay", [who_has(LOCAL, R2, M2), who_has(LOCAL, "192.0.2.50",
                                                                "02:00:00:00:00:50")], 1.0)
    replies = [Ether(f) for f in out["underlay"]]
    assert [(r.dst, r["ARP"].op, r["ARP"].hwsrc, r["ARP"].psrc, r["ARP"].pdst, len(f))
            for r, f in zip(replies, out["underlay"])] == \
        [(M2, 2, VMAC, LOCAL, R2, 60), ("02:00:00:00:00:50", 2, VMAC, LOCAL, "192.0.2.50", 60)]
    c = rig.counters()
    assert c["vx arp_replies_sent"] == 2 and c["vx neighbors_learned"] == 1  # R2 only
    # R2 resolved by asking: a flood reaches it without an ARP request of ours
    out = rig.send("overlay", [inner(dst=BCAST)], 1.1)["underlay"]
    assert [Ether(p)[SIP].dst for p in out if Ether(p).type == 0x0800] == [R2]


def test_arp_not_for_the_vtep_only_refreshes():
    rig = Rig(appliance(extra="    arp_timeout: 10"))
    out = rig.send("underlay", [who_has("192.0.2.3", R2, M2), is_at(R3, M3)], 1.0)
    assert out["underlay"] == []
    c = rig.counters()
    assert c["vx drop/arp_not_for_me"] == 1 and c["vx drop/arp_consumed"] == 1
    assert c["vx neighbors_learned"] == 1  # R3 answered us; R2's ARP for another: not kept
    rig.send("underlay", [who_has("192.0.2.9", R3, "02:00:00:00:0b:33")], 8.0)  # refresh
    out = rig.send("overlay", [inner(dst=BCAST)], 15.0)["underlay"]  # 7 s later: still known
    assert [Ether(p).dst for p in out if Ether(p).type == 0x0800] == ["02:00:00:00:0b:33"]
    assert rig.counters()["vx neighbors_updated"] == 1


def test_ticks_ask_for_next_hops_until_resolved_and_refresh_before_expiry():
    rig = Rig(appliance(remotes=f"[{R2}, {R9}]", extra=f"    gateway: {GW}\n"
                                                     f"    arp_timeout: 100"))
    asked = lambda out: sorted(Ether(f)["ARP"].pdst for f in out["underlay"])  # noqa: E731
    assert asked(rig.tick(0.0)) == sorted([R2, GW])
    assert asked(rig.tick(0.5)) == []  # at most once a second
    assert asked(rig.tick(1.0)) == sorted([R2, GW])
    resolved(rig, (R2, M2), (GW, MGW), now=1.1)
    assert asked(rig.tick(2.0)) == []
    assert asked(rig.tick(75.0)) == []  # 26 s left of 100: refresh margin is 25 s
    assert asked(rig.tick(77.0)) == sorted([R2, GW])
    resolved(rig, (R2, M2), now=77.1)
    assert asked(rig.tick(78.5)) == [GW]
    out = rig.send("overlay", [inner(dst=BCAST)], 120.0)["underlay"]  # GW expired at 101.1
    assert [Ether(p)[SIP].dst for p in out if Ether(p).type == 0x0800] == [R2]
    c = rig.counters()
    assert c["vx arp_requests_sent"] == 8 and c["vx flood_unresolved"] == 1


# -- two endpoints --------------------------------------------------------------------------

TWO = """
appliance: two
devices:
  lan1: {type: switch, ports: [h1, vx]}
  vx1:
    type: vxlan
    vni: 42
    local: 192.0.2.1/24
    remotes: [192.0.2.2]
  vx2:
    type: vxlan
    vni: 42
    local: 192.0.2.2/24
    remotes: [192.0.2.1]
  lan2: {type: switch, ports: [vx, h2]}
links:
  - [lan1.vx, vx1.overlay]
  - [vx1.underlay, vx2.underlay]
  - [vx2.overlay, lan2.vx]
attach:
  lan1.h1: {memory: h1}
  lan2.h2: {memory: h2}
"""


def test_two_tunnel_endpoints_join_two_segments():
    rig = Rig(TWO)
    h1, h2 = "02:00:00:00:01:01", "02:00:00:00:02:02"
    arp = bytes(Eth(src=h1, dst=BCAST) / ARP(op=1, hwsrc=h1, psrc="10.1.0.1", pdst="10.1.0.2"))
    # The first frame finds the peer VTEP unresolved: dropped, and the ARP exchange
    # between the endpoints (inside the appliance) resolves it.
    assert rig.send("h1", [arp], 1.0) == {"h1": [], "h2": []}
    assert rig.send("h1", [arp], 1.1) == {"h1": [], "h2": [arp]}
    reply = bytes(Eth(src=h2, dst=h1) / ARP(op=2, hwsrc=h2, psrc="10.1.0.2", hwdst=h1,
                                            pdst="10.1.0.1"))
    assert rig.send("h2", [reply], 1.2) == {"h1": [reply], "h2": []}
    ping = bytes(Eth(src=h1, dst=h2) / IPv4(src="10.1.0.1", dst="10.1.0.2")
                 / ICMP(type=8, id=1, seq=1))
    pong = bytes(Eth(src=h2, dst=h1) / IPv4(src="10.1.0.2", dst="10.1.0.1")
                 / ICMP(type=0, id=1, seq=1))
    assert rig.send("h1", [ping], 1.3) == {"h1": [], "h2": [ping]}
    assert rig.send("h2", [pong], 1.4) == {"h1": [pong], "h2": []}
    c = rig.counters()
    assert c["vx1 drop/unresolved"] == 1 and c["vx1 learned"] == 1 and c["vx2 learned"] == 1
    # vx2 learned h1 from the decapsulated ARP request: the reply went as known unicast
    assert c["vx1 flooded"] == 1 and "vx2 flooded" not in c
    assert c["vx2 arp_replies_sent"] == 1 and c["vx1 neighbors_learned"] == 1


# -- state, metadata, robustness -----------------------------------------------------------

def test_shared_tables_move_to_another_worker():
    rig = Rig(appliance())
    resolved(rig, (R2, M2), (R3, M3))
    rig.send("underlay", [vx(inner(src=B, dst=A), src=R3, smac=M3)], 1.0)
    other = Rig(appliance())
    other.engine.states[0].import_shared(rig.state.export_shared(2.0), 2.0)
    out = other.send("overlay", [inner()], 2.0)["underlay"]
    check_outer(out[0], R3, M3, inner())


@pytest.mark.parametrize("nbuckets", [4096, 65536])
def test_rewritten_rows_carry_the_metadata_the_parser_gives(nbuckets):
    """The next device reads offsets, flags, hash and bucket: after encapsulation and
    decapsulation they must be what parsing the new frame gives. An encapsulated packet
    keeps the inner frame's bucket (all of it up to 16384 buckets, 14 bits beyond)."""
    rig = Rig(appliance())
    resolved(rig, (R2, M2), (R3, M3))
    dev, st = rig.plan.devices[0], rig.state
    st.bucket_mask = nbuckets - 1
    r = random.Random(3)
    frames = [inner(src=f"02:00:00:00:{i:02x}:01", dst=r.choice([BCAST, A, B]),
                    sip=f"10.{i}.0.1", sport=r.randrange(65536), payload=r.randbytes(i))
              for i in range(60)]
    pool = PacketPool(512)
    b = PacketBatch(pool, 256)
    for f in frames:
        b.add_frame(f, in_port=0, tenant=7)
    for f in frames[:30]:
        b.add_frame(vx(f, src=r.choice([R2, R3])), in_port=1, tenant=7)
    parse(b, nbuckets)
    inner_buckets = b.meta[:60, L.BUCKET].copy()
    b.ensure_capacity(b.n * 2 + 8)
    n = b.n
    dev.process(b, st, 5.0)
    assert b.n > n  # flood replicas were appended
    got = b.meta[:b.n].copy()
    assert set(got[:n, L.VERDICT].tolist()) == {0, 1}
    parse(b, nbuckets)
    cols = [L.START, L.LEN, L.HASH, L.BUCKET, L.ETYPE, L.VLAN, L.TAGS, L.L3_OFF, L.L4_OFF,
            L.PROTO, L.PFLAGS, L.PERR]
    assert np.array_equal(got[:n, cols], b.meta[:n, cols])
    low = min(nbuckets, 16384) - 1
    assert np.array_equal(got[:60, L.BUCKET] & low, inner_buckets & low)
    # the flood replicas too (parsed here, as the engine parses generated rows)
    bucket_of = {f: int(x) for f, x in zip(frames, inner_buckets)}
    for r in range(n, b.n):
        assert b.frame(r)[50:] in bucket_of
        assert b.meta[r, L.BUCKET] & low == bucket_of[b.frame(r)[50:]] & low
    b.release_all()


def test_random_and_mutated_frames_never_break_it():
    from workload import frames as workload_frames

    rig = Rig(appliance(remotes=f"[{R2}, {R3}, {R9}]", extra=f"    gateway: {GW}\n"
                                                             f"    mac_table_size: 8\n"
                                                             f"    aging: 3"), slots=2048)
    r = random.Random(2)
    base = [is_at(R2, M2), is_at(GW, MGW), who_has(LOCAL, R3, M3), inner(), inner(dst=BCAST),
            vx(inner(src=B)), vx(inner(src=C), src=R3, smac=M3), vx(inner(), vni=5),
            bytes(Eth(src=M2, dst=VMAC) / IPv4(src=R2, dst=LOCAL) / ICMP(type=8))]
    pool = workload_frames(5, 400)
    t = 0.0
    for step in range(150):
        batch = []
        for _ in range(r.randrange(0, 12)):
            f = bytearray(r.choice(base) if r.random() < 0.5 else r.choice(pool))
            if r.random() < 0.4 and len(f) > 14:
                f[r.randrange(len(f))] = r.randrange(256)
            if r.random() < 0.1:
                f = f[: r.randrange(len(f) + 1)]
            if r.random() < 0.3 and len(f) > 14:
                f[16:20] = bytes([r.randrange(256) for _ in range(4)])
            if r.random() < 0.4 and len(f) >= 14:
                f[0:6] = bytes.fromhex(VMAC.replace(":", ""))
            batch.append(bytes(f))
        t += r.choice([0.0, 0.01, 0.3, 1.5])
        rig.send(r.choice(["overlay", "underlay"]), batch, t)
        if step % 9 == 0:
            rig.tick(t)
    c = rig.counters()
    assert c["vx.underlay tx"] > 0 and c["vx.overlay tx"] > 0
    assert sum(v for k, v in c.items() if k.startswith("vx drop/")) > 100
    assert c.get("vx invalid_verdict", 0) == 0


def test_pool_exhaustion_means_no_replica():
    rig = Rig(appliance(remotes=f"[{R2}, {R3}]"), slots=4)
    resolved(rig, (R2, M2), (R3, M3))
    out = rig.send("overlay", [inner(dst=BCAST)] * 3, 1.0)["underlay"]
    c = rig.counters()
    assert len(out) == 3 + 1 and c["vx pool_exhausted"] == 2  # one slot was left


def test_every_drop_reason_and_counter_is_named():
    for name in ("too_big", "unknown_vni", "unresolved", "bad_vxlan", "unknown_vtep",
                 "no_headroom", "malformed", "not_for_me"):
        assert name in DROPS
    for name in ("learned", "flooded", "arp_requests_sent", "flood_unresolved"):
        assert name in EVENTS


# -- compiled against reference ------------------------------------------------------------

def differential_run() -> dict[str, np.ndarray]:
    """A deterministic workload over two endpoints and a lone one; all observable."""
    rig = Rig(appliance(remotes=f"[{R2}, {R3}, {R9}]", extra=f"    gateway: {GW}\n"
                                                             f"    aging: 2"), slots=1024)
    r = random.Random(11)
    base = [is_at(R2, M2), is_at(GW, MGW), who_has(LOCAL, R3, M3), inner(), inner(dst=BCAST),
            inner(src=C, dst=B, sport=9), vx(inner(src=B)), vx(inner(src=C), src=R3, smac=M3),
            vx(inner(), vni=5), vx(inner(), csum=None),
            bytes(Eth(src=M2, dst=VMAC) / IPv4(src=R2, dst=LOCAL) / ICMP(type=8, id=3))]
    sent: dict[str, list[bytes]] = {"overlay": [], "underlay": []}
    t = 0.0
    for step in range(80):
        batch = []
        for _ in range(r.randrange(0, 8)):
            f = bytearray(r.choice(base))
            if r.random() < 0.3:
                f[r.randrange(len(f))] = r.randrange(256)
            if r.random() < 0.1:
                f = f[: r.randrange(len(f) + 1)]
            batch.append(bytes(f))
        t += r.choice([0.0, 0.05, 0.7])
        out = rig.send(r.choice(["overlay", "underlay"]), batch, t)
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
def test_compiled_vxlan_equals_reference():
    jit = assert_matches_reference("test_vxlan", "differential_run")
    c = dict(jit["counters"].tolist())
    for name in ("vx emitted", "vx learned", "vx flooded", "vx arp_replies_sent",
                 "vx echo_replies", "vx drop/unknown_vni", "vx.overlay tx"):
        assert int(c.get(name, 0)) > 0, name
