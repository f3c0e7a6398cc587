"""Tests for dva.packet.parse: offsets, flags and named parse errors for every header kind.

Each well-formed frame is checked field by field (and against scapy's dissection), then
cut at every length from 0 to len-1; every cut must give one specific named error.
Frames whose *IP length* is short (rather than the frame) reach the L4 checks.
"""

from __future__ import annotations

import struct

import pytest

from dva.packet import layout as L
from dva.packet.batch import PacketBatch, PacketPool
from dva.packet.build import (
    ARP,
    ICMP,
    TCP,
    UDP,
    Dot1Q,
    Eth,
    ICMPv6,
    IPv4,
    IPv6,
    IPv6Ext,
    Raw,
)
from dva.packet.parse import parse, parse_error_name

# --------------------------------------------------------------------------------------
# helpers

_POOL = PacketPool(2048)
_CHUNK = 512


def parse_rows(frames, tenant=0, nbuckets=4096):
    """Parse ``frames``; one dict per frame (FIELD_NAMES keys plus ``err``, the name)."""
    frames = list(frames)
    out = []
    for start in range(0, len(frames), _CHUNK):
        b = PacketBatch(_POOL, _CHUNK)
        try:
            for f in frames[start:start + _CHUNK]:
                b.add_frame(bytes(f), tenant=tenant)
            parse(b, nbuckets)
            for i in range(b.n):
                row = {name: int(b.meta[i, k]) for k, name in enumerate(L.FIELD_NAMES)}
                row["err"] = L.PARSE_ERRORS[row["perr"]]
                out.append(row)
        finally:
            b.release_all()
    return out


def parse_one(frame, **kw):
    return parse_rows([frame], **kw)[0]


def flag_names(flags):
    names = [n for n in dir(L) if n.startswith("F_")]
    return sorted(n for n in names if flags & getattr(L, n))


MAC_A = "02:00:00:00:00:0a"
MAC_B = "02:00:00:00:00:0b"
E = Eth(dst=MAC_B, src=MAC_A)
V4A, V4B = "10.0.0.1", "192.168.7.20"
V6A, V6B = "2001:db8::1", "2001:db8:ffff::2"

IPV4_L3L4 = L.F_IPV4 | L.F_L3_OK | L.F_L4_OK
IPV6_L3L4 = L.F_IPV6 | L.F_L3_OK | L.F_L4_OK

TCP_OPTS = bytes.fromhex("020405b4" "0103030a" "0101080a0000000100000000")  # MSS,NOP,WS,NOP,NOP,TS
RR_OPT = bytes((7, 7, 4)) + bytes(4)  # IPv4 record route with room for one address
ROUTING0 = bytes((0, 0, 0, 0, 0, 0)) + bytes(16)  # type 0, segments left 0, one address
HOP_DATA = bytes((5, 2, 0, 0))  # router alert option


def ah_header(nh, icv_len=12):
    """IPv6 authentication header (RFC 4302): length in 4-octet units minus 2."""
    total = 12 + icv_len
    return bytes((nh, total // 4 - 2, 0, 0)) + struct.pack("!II", 0x1234, 1) + bytes(icv_len)


# --------------------------------------------------------------------------------------
# well-formed frames, one per header kind
#
# expected: etype, vlan, tags, l3_off, l4_off, proto, pflags
# trunc: [(end, name), ...]: a cut at length k gives the name of the first entry with
# k < end (end None = up to the full length)

CASES = {
    "eth_other": dict(
        frame=Eth(dst=MAC_B, src=MAC_A, type=0x88B5) / Raw(bytes(range(46))),
        expected=dict(etype=0x88B5, vlan=-1, tags=0, l3_off=14, l4_off=-1, proto=-1, pflags=0),
        trunc=[(14, "runt"), (None, "ok")],
    ),
    "dot1q": dict(
        frame=E / Dot1Q(vid=100, pcp=5, dei=1) / IPv4(src=V4A, dst=V4B)
        / UDP(sport=1000, dport=53) / Raw(b"query"),
        expected=dict(etype=L.ETH_IPV4, vlan=100, tags=1, l3_off=18, l4_off=38, proto=17,
                      pflags=IPV4_L3L4),
        trunc=[(14, "runt"), (18, "vlan_truncated"), (None, "ipv4_truncated")],
    ),
    "qinq": dict(
        frame=E / Dot1Q(vid=2000, tpid=0x88A8) / Dot1Q(vid=4094) / IPv4(src=V4A, dst=V4B)
        / TCP(sport=40000, dport=443),
        expected=dict(etype=L.ETH_IPV4, vlan=2000, tags=2, l3_off=22, l4_off=42, proto=6,
                      pflags=IPV4_L3L4),
        trunc=[(14, "runt"), (22, "vlan_truncated"), (None, "ipv4_truncated")],
    ),
    "qinq_arp": dict(
        frame=E / Dot1Q(vid=7, tpid=0x88A8) / Dot1Q(vid=8)
        / ARP(op=1, hwsrc=MAC_A, psrc=V4A, pdst=V4B),
        expected=dict(etype=L.ETH_ARP, vlan=7, tags=2, l3_off=22, l4_off=-1, proto=-1,
                      pflags=L.F_ARP | L.F_L3_OK),
        trunc=[(14, "runt"), (22, "vlan_truncated"), (None, "arp_truncated")],
    ),
    "arp": dict(
        frame=E / ARP(op=2, hwsrc=MAC_A, psrc=V4A, hwdst=MAC_B, pdst=V4B),
        expected=dict(etype=L.ETH_ARP, vlan=-1, tags=0, l3_off=14, l4_off=-1, proto=-1,
                      pflags=L.F_ARP | L.F_L3_OK),
        trunc=[(14, "runt"), (None, "arp_truncated")],
    ),
    "ipv4_udp": dict(
        frame=E / IPv4(src=V4A, dst=V4B) / UDP(sport=5353, dport=5353) / Raw(b"x" * 11),
        expected=dict(etype=L.ETH_IPV4, vlan=-1, tags=0, l3_off=14, l4_off=34, proto=17,
                      pflags=IPV4_L3L4),
        trunc=[(14, "runt"), (None, "ipv4_truncated")],
    ),
    "ipv4_options_tcp": dict(
        frame=E / IPv4(src=V4A, dst=V4B, options=RR_OPT) / TCP(sport=1, dport=2),
        expected=dict(etype=L.ETH_IPV4, vlan=-1, tags=0, l3_off=14, l4_off=42, proto=6,
                      pflags=IPV4_L3L4 | L.F_IP_OPTIONS),
        trunc=[(14, "runt"), (None, "ipv4_truncated")],
    ),
    "ipv4_max_options": dict(
        frame=E / IPv4(src=V4A, dst=V4B, options=bytes([1] * 39 + [0])) / UDP(sport=1, dport=2),
        expected=dict(etype=L.ETH_IPV4, vlan=-1, tags=0, l3_off=14, l4_off=74, proto=17,
                      pflags=IPV4_L3L4 | L.F_IP_OPTIONS),
        trunc=[(14, "runt"), (None, "ipv4_truncated")],
    ),
    "tcp_options": dict(
        frame=E / IPv4(src=V4A, dst=V4B) / TCP(sport=40000, dport=80, flags="SA",
                                               options=TCP_OPTS) / Raw(b"GET /"),
        expected=dict(etype=L.ETH_IPV4, vlan=-1, tags=0, l3_off=14, l4_off=34, proto=6,
                      pflags=IPV4_L3L4),
        trunc=[(14, "runt"), (None, "ipv4_truncated")],
    ),
    "ipv4_first_fragment": dict(
        frame=E / IPv4(src=V4A, dst=V4B, id=77, flags="MF") / TCP(sport=9, dport=10)
        / Raw(bytes(64)),
        expected=dict(etype=L.ETH_IPV4, vlan=-1, tags=0, l3_off=14, l4_off=34, proto=6,
                      pflags=IPV4_L3L4 | L.F_FRAG),
        trunc=[(14, "runt"), (None, "ipv4_truncated")],
    ),
    "ipv4_later_fragment": dict(
        frame=E / IPv4(src=V4A, dst=V4B, id=77, frag=9, proto=17) / Raw(bytes(40)),
        expected=dict(etype=L.ETH_IPV4, vlan=-1, tags=0, l3_off=14, l4_off=-1, proto=17,
                      pflags=L.F_IPV4 | L.F_L3_OK | L.F_FRAG | L.F_LATER_FRAG),
        trunc=[(14, "runt"), (None, "ipv4_truncated")],
    ),
    "ipv4_last_fragment": dict(  # MF clear, offset set: still a (later) fragment
        frame=E / IPv4(src=V4A, dst=V4B, id=77, frag=1, flags="DF", proto=6) / Raw(bytes(8)),
        expected=dict(etype=L.ETH_IPV4, vlan=-1, tags=0, l3_off=14, l4_off=-1, proto=6,
                      pflags=L.F_IPV4 | L.F_L3_OK | L.F_FRAG | L.F_LATER_FRAG),
        trunc=[(14, "runt"), (None, "ipv4_truncated")],
    ),
    "ipv4_df_not_fragment": dict(
        frame=E / IPv4(src=V4A, dst=V4B, flags="DF") / UDP(sport=9, dport=10),
        expected=dict(etype=L.ETH_IPV4, vlan=-1, tags=0, l3_off=14, l4_off=34, proto=17,
                      pflags=IPV4_L3L4),
        trunc=[(14, "runt"), (None, "ipv4_truncated")],
    ),
    "ipv4_icmp": dict(
        frame=E / IPv4(src=V4A, dst=V4B) / ICMP(type=8, id=0x1234, seq=1) / Raw(b"ping" * 8),
        expected=dict(etype=L.ETH_IPV4, vlan=-1, tags=0, l3_off=14, l4_off=34, proto=1,
                      pflags=IPV4_L3L4),
        trunc=[(14, "runt"), (None, "ipv4_truncated")],
    ),
    "ipv4_other_proto": dict(  # GRE: offset known, header not checked
        frame=E / IPv4(src=V4A, dst=V4B, proto=47) / Raw(bytes(4)),
        expected=dict(etype=L.ETH_IPV4, vlan=-1, tags=0, l3_off=14, l4_off=34, proto=47,
                      pflags=L.F_IPV4 | L.F_L3_OK),
        trunc=[(14, "runt"), (None, "ipv4_truncated")],
    ),
    "ipv6_udp": dict(
        frame=E / IPv6(src=V6A, dst=V6B) / UDP(sport=546, dport=547) / Raw(b"dhcp"),
        expected=dict(etype=L.ETH_IPV6, vlan=-1, tags=0, l3_off=14, l4_off=54, proto=17,
                      pflags=IPV6_L3L4),
        trunc=[(14, "runt"), (None, "ipv6_truncated")],
    ),
    "ipv6_tcp_vlan": dict(
        frame=E / Dot1Q(vid=1) / IPv6(src=V6A, dst=V6B) / TCP(sport=1, dport=22,
                                                           options=TCP_OPTS),
        expected=dict(etype=L.ETH_IPV6, vlan=1, tags=1, l3_off=18, l4_off=58, proto=6,
                      pflags=IPV6_L3L4),
        trunc=[(14, "runt"), (18, "vlan_truncated"), (None, "ipv6_truncated")],
    ),
    "ipv6_icmpv6": dict(
        frame=E / IPv6(src=V6A, dst=V6B) / ICMPv6(type=128, id=5, seq=6) / Raw(bytes(56)),
        expected=dict(etype=L.ETH_IPV6, vlan=-1, tags=0, l3_off=14, l4_off=54, proto=58,
                      pflags=IPV6_L3L4),
        trunc=[(14, "runt"), (None, "ipv6_truncated")],
    ),
    "ipv6_ext_chain": dict(
        frame=E / IPv6(src=V6A, dst=V6B) / IPv6Ext("hop", data=HOP_DATA)
        / IPv6Ext("routing", data=ROUTING0) / IPv6Ext("dst", data=bytes(10))
        / TCP(sport=1234, dport=80),
        expected=dict(etype=L.ETH_IPV6, vlan=-1, tags=0, l3_off=14, l4_off=54 + 8 + 24 + 16,
                      proto=6, pflags=IPV6_L3L4 | L.F_IPV6_EXT),
        trunc=[(14, "runt"), (None, "ipv6_truncated")],
    ),
    "ipv6_hop_udp": dict(
        frame=E / IPv6(src=V6A, dst=V6B) / IPv6Ext("hop") / UDP(sport=1, dport=2),
        expected=dict(etype=L.ETH_IPV6, vlan=-1, tags=0, l3_off=14, l4_off=62, proto=17,
                      pflags=IPV6_L3L4 | L.F_IPV6_EXT),
        trunc=[(14, "runt"), (None, "ipv6_truncated")],
    ),
    "ipv6_first_fragment": dict(
        frame=E / IPv6(src=V6A, dst=V6B) / IPv6Ext("frag", offset=0, m=1, ident=99)
        / TCP(sport=7, dport=8) / Raw(bytes(32)),
        expected=dict(etype=L.ETH_IPV6, vlan=-1, tags=0, l3_off=14, l4_off=62, proto=6,
                      pflags=IPV6_L3L4 | L.F_IPV6_EXT | L.F_FRAG),
        trunc=[(14, "runt"), (None, "ipv6_truncated")],
    ),
    "ipv6_later_fragment": dict(
        frame=E / IPv6(src=V6A, dst=V6B) / IPv6Ext("dst")
        / IPv6Ext("frag", nh=17, offset=5, m=1, ident=99) / Raw(bytes(40)),
        expected=dict(etype=L.ETH_IPV6, vlan=-1, tags=0, l3_off=14, l4_off=-1, proto=17,
                      pflags=L.F_IPV6 | L.F_L3_OK | L.F_IPV6_EXT | L.F_FRAG
                      | L.F_LATER_FRAG),
        trunc=[(14, "runt"), (None, "ipv6_truncated")],
    ),
    "ipv6_ah": dict(  # AH length is in 4-octet units (+2), unlike the others
        frame=E / IPv6(src=V6A, dst=V6B, nh=51) / Raw(ah_header(17)) / UDP(sport=1, dport=2),
        expected=dict(etype=L.ETH_IPV6, vlan=-1, tags=0, l3_off=14, l4_off=54 + 24, proto=17,
                      pflags=IPV6_L3L4 | L.F_IPV6_EXT),
        trunc=[(14, "runt"), (None, "ipv6_truncated")],
    ),
    "ipv6_no_next_header": dict(
        frame=E / IPv6(src=V6A, dst=V6B) / IPv6Ext("dst"),
        expected=dict(etype=L.ETH_IPV6, vlan=-1, tags=0, l3_off=14, l4_off=-1, proto=59,
                      pflags=L.F_IPV6 | L.F_L3_OK | L.F_IPV6_EXT),
        trunc=[(14, "runt"), (None, "ipv6_truncated")],
    ),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_well_formed_frame(name):
    case = CASES[name]
    frame = bytes(case["frame"])
    row = parse_one(frame)
    assert row["err"] == "ok", name
    assert row["perr"] == L.E_OK
    got = {k: row[k] for k in case["expected"]}
    assert got == case["expected"], (flag_names(row["pflags"]),
                                     flag_names(case["expected"]["pflags"]))
    assert row["len"] == len(frame)
    assert 0 <= row["hash"] < 2**32
    assert 0 <= row["bucket"] < 4096


def _expected_cut(trunc, k):
    for end, name in trunc:
        if end is None or k < end:
            return name
    raise AssertionError("unreachable")


@pytest.mark.parametrize("name", sorted(CASES))
def test_every_truncation_has_its_named_error(name):
    case = CASES[name]
    frame = bytes(case["frame"])
    cuts = [frame[:k] for k in range(len(frame))]
    rows = parse_rows(cuts)
    exp = case["expected"]
    for k, row in enumerate(rows):
        want = _expected_cut(case["trunc"], k)
        assert row["err"] == want, f"{name} cut at {k}: {row['err']} != {want}"
        assert row["len"] == k
        if want == "ok":
            continue
        # nothing of a header that did not fit is reported
        assert row["l4_off"] == -1, k
        assert row["pflags"] & (L.F_L4_OK | L.F_L3_OK) == 0, k
        if want == "runt":
            assert (row["etype"], row["vlan"], row["tags"], row["l3_off"]) == (-1, -1, 0, -1)
        elif want == "vlan_truncated":
            assert row["tags"] == (k - 14) // 4  # tags that fitted before the cut one
            assert row["vlan"] == (exp["vlan"] if k >= 18 else -1)
        else:  # an L3 error: the L2 part was fine
            assert (row["etype"], row["vlan"], row["tags"], row["l3_off"]) == (
                exp["etype"], exp["vlan"], exp["tags"], exp["l3_off"]), k
            assert row["proto"] == -1


@pytest.mark.parametrize("name", sorted(CASES))
def test_ethernet_trailer_after_l3_is_ignored(name):
    """Bytes after the L3 packet (Ethernet padding, FCS) do not change the parse."""
    frame = bytes(CASES[name]["frame"])
    rows = parse_rows([frame, frame + bytes(20), frame + b"\xa5" * 4])
    keys = ("etype", "vlan", "tags", "l3_off", "l4_off", "proto", "pflags", "perr")
    base = {k: rows[0][k] for k in keys}
    for r in rows[1:]:
        assert {k: r[k] for k in keys} == base
    assert rows[1]["hash"] == rows[0]["hash"] == rows[2]["hash"]


# --------------------------------------------------------------------------------------
# comparison with scapy's dissection

SCAPY_L3 = ("IP", "IPv6", "ARP")
SCAPY_L4 = ("TCP", "UDP", "ICMP")


def _scapy_offsets(frame):
    import scapy.layers.inet  # noqa: F401  (binds IP/TCP/UDP/ICMP to Ether)
    import scapy.layers.inet6  # noqa: F401
    from scapy.layers.l2 import Ether

    pkt = Ether(frame)
    l3 = l4 = -1
    proto = -1
    layer = pkt
    etype = pkt.type
    while layer is not None and layer.__class__.__name__ not in ("NoPayload", "Padding",
                                                                   "Raw"):
        cname = layer.__class__.__name__
        off = len(frame) - len(bytes(layer))
        if cname in ("Dot1Q", "Dot1AD"):
            etype = layer.type
        if cname in SCAPY_L3 and l3 < 0:
            l3 = off
            if cname == "IP":
                proto = layer.proto
            elif cname == "IPv6":
                proto = layer.nh
        elif cname.startswith("IPv6ExtHdr"):
            proto = layer.nh
        elif (cname in SCAPY_L4 or cname.startswith("ICMPv6")) and l4 < 0:
            l4 = off
        layer = layer.payload if hasattr(layer, "payload") else None
        if layer is not None and layer.__class__.__name__ == "NoPayload":
            break
    return etype, l3, l4, proto


SCAPY_CASES = sorted(set(CASES) - {"ipv6_ah", "eth_other", "ipv4_other_proto",
                                   "ipv4_later_fragment", "ipv4_last_fragment",
                                   "ipv6_later_fragment", "ipv6_no_next_header"})


@pytest.mark.parametrize("name", SCAPY_CASES)
def test_offsets_agree_with_scapy(name):
    frame = bytes(CASES[name]["frame"])
    row = parse_one(frame)
    etype, l3, l4, proto = _scapy_offsets(frame)
    assert row["etype"] == etype
    assert row["l3_off"] == l3
    assert row["l4_off"] == l4
    if name not in ("arp", "qinq_arp"):
        assert row["proto"] == proto


def test_scapy_agrees_on_later_fragments_having_no_l4():
    import scapy.layers.inet6  # noqa: F401
    from scapy.layers.inet import IP
    from scapy.layers.l2 import Ether

    frame = bytes(CASES["ipv4_later_fragment"]["frame"])
    pkt = Ether(frame)
    assert pkt[IP].frag == 9 and pkt[IP].payload.__class__.__name__ == "Raw"
    row = parse_one(frame)
    assert row["l4_off"] == -1 and row["proto"] == pkt[IP].proto


# --------------------------------------------------------------------------------------
# L4 errors: the IP length itself is short, or the L4 fields are bad


def _v4(l4, length=None, **kw):
    return bytes(E / IPv4(src=V4A, dst=V4B, len=length, **kw) / l4)


def _v6(l4, plen=None):
    return bytes(E / IPv6(src=V6A, dst=V6B, plen=plen) / l4)


def test_ipv4_tcp_total_length_sweep():
    """IPv4 total length from 0 to the whole packet over a full frame."""
    seg = TCP(sport=1, dport=2, options=TCP_OPTS) / Raw(b"abc")
    hlen = 20 + len(TCP_OPTS)  # 40-byte header
    frames = [_v4(seg, length=n) for n in range(0, 20 + hlen + 3 + 1)]
    rows = parse_rows(frames)
    for n, row in enumerate(rows):
        if n < 20:
            want = "ipv4_bad_total_len"
        elif n - 20 < hlen:
            want = "tcp_truncated"
        else:
            want = "ok"
        assert row["err"] == want, n
        if n >= 20:
            assert row["pflags"] & (L.F_L3_OK | L.F_IPV4) == L.F_L3_OK | L.F_IPV4
            assert row["l4_off"] == 34 and row["proto"] == 6
            assert bool(row["pflags"] & L.F_L4_OK) == (want == "ok")
        else:
            assert row["pflags"] == 0 and row["l4_off"] == -1


def test_ipv4_udp_total_length_sweep():
    seg = UDP(sport=1, dport=2) / Raw(b"0123456789")  # UDP length 18
    rows = parse_rows([_v4(seg, length=n) for n in range(20, 20 + 18 + 1)])
    for n, row in zip(range(20, 39), rows):
        l4len = n - 20
        want = "udp_truncated" if l4len < 8 else "udp_bad_length" if l4len < 18 else "ok"
        assert row["err"] == want, n
        assert row["l4_off"] == 34


def test_ipv4_icmp_total_length_sweep():
    seg = ICMP(type=8, id=1, seq=2) / Raw(b"zz")
    rows = parse_rows([_v4(seg, length=n) for n in range(20, 31)])
    for n, row in zip(range(20, 31), rows):
        assert row["err"] == ("icmp_truncated" if n - 20 < 8 else "ok"), n


def test_ipv6_l4_payload_length_sweeps():
    cases = [
        (TCP(sport=1, dport=2, options=TCP_OPTS), lambda p: "tcp_truncated" if p < 40
         else "ok", 40),
        (UDP(sport=1, dport=2) / Raw(b"xyzw"), lambda p: "udp_truncated" if p < 8
         else "udp_bad_length" if p < 12 else "ok", 12),
        (ICMPv6(type=129, id=3) / Raw(b"q"), lambda p: "icmpv6_truncated" if p < 8
         else "ok", 9),
    ]
    for seg, want, full in cases:
        rows = parse_rows([_v6(seg, plen=p) for p in range(full + 1)])
        for p, row in enumerate(rows):
            assert row["err"] == want(p), (seg, p)
            assert row["l4_off"] == 54 and row["pflags"] & L.F_L3_OK


def test_ipv6_ext_payload_length_sweep():
    """A payload length that ends inside an extension header -> ipv6_ext_truncated."""
    chain = (IPv6Ext("hop", data=HOP_DATA) / IPv6Ext("routing", data=ROUTING0)
             / UDP(sport=1, dport=2))
    rows = parse_rows([_v6(chain, plen=p) for p in range(8 + 24 + 8 + 1)])
    for p, row in enumerate(rows):
        if p < 8 + 24:
            want = "ipv6_ext_truncated"
        elif p < 8 + 24 + 8:
            want = "udp_truncated"
        else:
            want = "ok"
        assert row["err"] == want, p


@pytest.mark.parametrize("doff", [0, 1, 2, 3, 4])
def test_tcp_bad_data_offset(doff):
    for frame in (_v4(TCP(sport=1, dport=2, dataofs=doff)),
                  _v6(TCP(sport=1, dport=2, dataofs=doff))):
        row = parse_one(frame)
        assert row["err"] == "tcp_bad_offset"
        assert not row["pflags"] & L.F_L4_OK
        assert row["pflags"] & L.F_L3_OK


def test_tcp_data_offset_beyond_segment():
    row = parse_one(_v4(TCP(sport=1, dport=2, dataofs=15) / Raw(bytes(39))))
    assert row["err"] == "tcp_truncated"  # needs 60 bytes, the segment has 59
    row = parse_one(_v4(TCP(sport=1, dport=2, dataofs=15) / Raw(bytes(40))))
    assert row["err"] == "ok"


@pytest.mark.parametrize("ulen,want", [(0, "udp_bad_length"), (7, "udp_bad_length"),
                                       (8, "ok"), (12, "ok"), (13, "ok"),
                                       (14, "udp_bad_length"), (0xFFFF, "udp_bad_length")])
def test_udp_length_field(ulen, want):
    """UDP length must lie in [8, IP payload]; shorter than the payload is allowed."""
    for frame in (_v4(UDP(sport=1, dport=2, len=ulen) / Raw(bytes(5))),
                  _v6(UDP(sport=1, dport=2, len=ulen) / Raw(bytes(5)))):
        row = parse_one(frame)
        assert row["err"] == want, ulen
        assert bool(row["pflags"] & L.F_L4_OK) == (want == "ok")


# --------------------------------------------------------------------------------------
# garbage at L2 / L3


def test_runt_lengths():
    rows = parse_rows([bytes(range(k)) for k in range(14)])
    for k, row in enumerate(rows):
        assert row["err"] == "runt" and row["len"] == k
        assert row["etype"] == -1 and row["l3_off"] == -1 and row["pflags"] == 0


def test_three_vlan_tags_are_too_many():
    frame = bytes(E / Dot1Q(vid=10, tpid=0x88A8) / Dot1Q(vid=20) / Dot1Q(vid=30)
                  / IPv4(src=V4A, dst=V4B) / UDP(sport=1, dport=2))
    row = parse_one(frame)
    assert row["err"] == "vlan_too_many"
    assert row["tags"] == 2 and row["vlan"] == 10
    assert row["l4_off"] == -1 and row["pflags"] == 0
    rows = parse_rows([frame[:k] for k in range(len(frame))])
    for k, r in enumerate(rows):
        want = "runt" if k < 14 else "vlan_truncated" if k < 22 else "vlan_too_many"
        assert r["err"] == want, k


def test_old_qinq_tpid_0x9100_is_a_tag():
    frame = bytes(Eth(dst=MAC_B, src=MAC_A, type=0x9100) / Dot1Q(vid=33) / IPv4(src=V4A, dst=V4B)
                  / UDP(sport=1, dport=2))
    row = parse_one(frame)
    assert row["err"] == "ok"
    assert (row["tags"], row["vlan"], row["l3_off"], row["l4_off"]) == (1, 33, 18, 38)


def test_vlan_id_masks_pcp_and_dei():
    row = parse_one(bytes(E / Dot1Q(vid=0xABC, pcp=7, dei=1) / IPv4(src=V4A, dst=V4B)))
    assert row["vlan"] == 0xABC and row["err"] == "ok"


def _patch(frame, off, value):
    b = bytearray(frame)
    b[off] = value
    return bytes(b)


def test_arp_unsupported_variants():
    good = bytes(E / ARP(op=1, hwsrc=MAC_A, psrc=V4A, pdst=V4B))
    assert parse_one(good)["err"] == "ok"
    bad = [
        _patch(good, 15, 6),  # htype 6 (IEEE 802)
        _patch(good, 16, 0x86),  # ptype 0x8600
        _patch(good, 18, 8),  # hlen 8
        _patch(good, 19, 16),  # plen 16
        _patch(good, 14, 1),  # htype 0x0101
    ]
    for i, row in enumerate(parse_rows(bad)):
        assert row["err"] == "arp_unsupported", i
        assert row["pflags"] == 0 and row["l3_off"] == 14 and row["etype"] == L.ETH_ARP
    # a short ARP is truncated before it is judged
    assert parse_one(_patch(good, 18, 8)[:41])["err"] == "arp_truncated"


def test_arp_with_ethernet_padding():
    frame = bytes(Eth(dst=MAC_B, src=MAC_A, pad=True) / ARP(op=1, hwsrc=MAC_A, psrc=V4A,
                                                            pdst=V4B))
    assert len(frame) == 60
    row = parse_one(frame)
    assert row["err"] == "ok" and row["pflags"] == L.F_ARP | L.F_L3_OK


@pytest.mark.parametrize("version", [0, 1, 5, 6, 15])
def test_ipv4_bad_version(version):
    frame = bytes(E / IPv4(src=V4A, dst=V4B) / UDP(sport=1, dport=2))
    row = parse_one(_patch(frame, 14, version << 4 | 5))
    assert row["err"] == "ipv4_bad_version"
    assert row["pflags"] == 0 and row["proto"] == -1 and row["l3_off"] == 14


@pytest.mark.parametrize("ihl", [0, 1, 4])
def test_ipv4_bad_ihl(ihl):
    row = parse_one(_v4(UDP(sport=1, dport=2), ihl=ihl))
    assert row["err"] == "ipv4_bad_ihl"


def test_ipv4_ihl_beyond_frame():
    # IHL 15 (60 bytes) in a 20-byte header + 8-byte UDP: the header does not fit
    row = parse_one(_v4(UDP(sport=1, dport=2), ihl=15))
    assert row["err"] == "ipv4_truncated"


@pytest.mark.parametrize("total", [0, 1, 19])
def test_ipv4_total_length_below_ihl(total):
    assert parse_one(_v4(UDP(sport=1, dport=2), length=total))["err"] == "ipv4_bad_total_len"
    # with options (IHL 6) a total of 20 is too small too
    row = parse_one(_v4(UDP(sport=1, dport=2), length=20 + 3, options=b"\x01\x01\x01\x00"))
    assert row["err"] == "ipv4_bad_total_len"


def test_ipv4_total_length_beyond_frame():
    frame = _v4(UDP(sport=1, dport=2) / Raw(bytes(10)))
    row = parse_one(_v4(UDP(sport=1, dport=2) / Raw(bytes(10)), length=len(frame) - 14 + 1))
    assert row["err"] == "ipv4_truncated"


def test_ipv4_bad_header_checksum_is_a_flag_not_an_error():
    good = bytes(E / IPv4(src=V4A, dst=V4B) / TCP(sport=1, dport=2))
    row = parse_one(good)
    assert not row["pflags"] & L.F_IP_CSUM_BAD
    bad = bytes(E / IPv4(src=V4A, dst=V4B, chksum=0x1234) / TCP(sport=1, dport=2))
    row_bad = parse_one(bad)
    assert row_bad["err"] == "ok"
    assert row_bad["pflags"] == IPV4_L3L4 | L.F_IP_CSUM_BAD
    assert row_bad["l4_off"] == 34 and row_bad["proto"] == 6
    # and a TTL rewrite without a checksum update is noticed too
    row_ttl = parse_one(_patch(good, 14 + 8, 63))
    assert row_ttl["pflags"] & L.F_IP_CSUM_BAD and row_ttl["err"] == "ok"


def test_ipv4_checksum_with_options_covers_options():
    frame = bytes(E / IPv4(src=V4A, dst=V4B, options=RR_OPT) / UDP(sport=1, dport=2))
    assert not parse_one(frame)["pflags"] & L.F_IP_CSUM_BAD
    flipped = _patch(frame, 14 + 21, frame[14 + 21] ^ 0x40)  # inside the options
    assert parse_one(flipped)["pflags"] & L.F_IP_CSUM_BAD


def test_ethernet_padding_after_short_ipv4_packet():
    frame = bytes(Eth(dst=MAC_B, src=MAC_A, pad=True) / IPv4(src=V4A, dst=V4B)
                  / UDP(sport=1, dport=2) / Raw(b"hi"))
    assert len(frame) == 60
    row = parse_one(frame)
    assert row["err"] == "ok"
    assert row["pflags"] == IPV4_L3L4 and row["l4_off"] == 34
    # garbage padding is just as fine
    row2 = parse_one(frame[:44] + b"\xff" * 16)
    assert row2["err"] == "ok" and row2["hash"] == row["hash"]


def test_ethernet_padding_after_short_ipv6_packet():
    frame = bytes(E / IPv6(src=V6A, dst=V6B) / UDP(sport=1, dport=2)) + bytes(30)
    row = parse_one(frame)
    assert row["err"] == "ok" and row["l4_off"] == 54 and row["pflags"] == IPV6_L3L4


@pytest.mark.parametrize("first", [0x45, 0x55, 0x00, 0x7F])
def test_ipv6_bad_version(first):
    frame = _v6(UDP(sport=1, dport=2))
    row = parse_one(_patch(frame, 14, first))
    assert row["err"] == "ipv6_bad_version"
    assert row["pflags"] == 0 and row["l3_off"] == 14


def test_ipv6_payload_length_beyond_frame():
    frame = _v6(UDP(sport=1, dport=2) / Raw(bytes(4)))
    assert parse_one(frame)["err"] == "ok"
    row = parse_one(_v6(UDP(sport=1, dport=2) / Raw(bytes(4)), plen=13))
    assert row["err"] == "ipv6_truncated"
    assert row["pflags"] == 0
    row = parse_one(_v6(UDP(sport=1, dport=2) / Raw(bytes(4)), plen=0xFFFF))
    assert row["err"] == "ipv6_truncated"


@pytest.mark.parametrize("count,want", [(1, "ok"), (7, "ok"), (8, "ok"),
                                        (9, "ipv6_ext_too_many"), (12, "ipv6_ext_too_many")])
def test_ipv6_extension_header_limit(count, want):
    chain = IPv6Ext("dst")
    for _ in range(count - 1):
        chain = chain / IPv6Ext("dst")
    row = parse_one(_v6(chain / UDP(sport=1, dport=2)))
    assert row["err"] == want
    if want == "ok":
        assert row["l4_off"] == 54 + 8 * count and row["proto"] == 17
        assert row["pflags"] == IPV6_L3L4 | L.F_IPV6_EXT
    else:
        assert row["l4_off"] == -1


def test_ipv6_ext_header_length_beyond_payload():
    # a hop-by-hop header claiming 16 bytes (len field 1) with only 8 in the payload
    frame = _v6(Raw(bytes((17, 1)) + bytes(6)))
    frame = _patch(frame, 14 + 6, 0)  # next header = hop-by-hop
    row = parse_one(frame)
    assert row["err"] == "ipv6_ext_truncated"
    # ... and an AH whose length runs past the payload
    row = parse_one(bytes(E / IPv6(src=V6A, dst=V6B, nh=51) / Raw(ah_header(17)[:20])))
    assert row["err"] == "ipv6_ext_truncated"


def test_ipv6_ext_header_cut_before_its_first_8_bytes():
    row = parse_one(bytes(E / IPv6(src=V6A, dst=V6B, nh=0) / Raw(bytes(6))))
    assert row["err"] == "ipv6_ext_truncated"
    row = parse_one(bytes(E / IPv6(src=V6A, dst=V6B, nh=44) / Raw(bytes(7))))
    assert row["err"] == "ipv6_ext_truncated"


def test_ipv6_ext_error_sets_no_l4():
    row = parse_one(bytes(E / IPv6(src=V6A, dst=V6B, nh=60) / Raw(bytes(3))))
    assert row["err"] == "ipv6_ext_truncated"
    assert row["l4_off"] == -1 and row["proto"] == -1
    assert not row["pflags"] & L.F_L4_OK


def test_every_error_name_is_reachable():
    """Each named reason in PARSE_ERRORS is produced by some frame above."""
    frames = [
        bytes(CASES["ipv4_udp"]["frame"]),  # ok
        b"\x00" * 13,  # runt
        bytes(CASES["dot1q"]["frame"])[:16],  # vlan_truncated
        bytes(E / Dot1Q(vid=1) / Dot1Q(vid=2) / Dot1Q(vid=3)),  # vlan_too_many
        bytes(CASES["arp"]["frame"])[:30],  # arp_truncated
        _patch(bytes(CASES["arp"]["frame"]), 19, 16),  # arp_unsupported
        bytes(CASES["ipv4_udp"]["frame"])[:30],  # ipv4_truncated
        _patch(bytes(CASES["ipv4_udp"]["frame"]), 14, 0x65),  # ipv4_bad_version
        _v4(UDP(sport=1, dport=2), ihl=3),  # ipv4_bad_ihl
        _v4(UDP(sport=1, dport=2), length=3),  # ipv4_bad_total_len
        bytes(CASES["ipv6_udp"]["frame"])[:40],  # ipv6_truncated
        _patch(bytes(CASES["ipv6_udp"]["frame"]), 14, 0x45),  # ipv6_bad_version
        bytes(E / IPv6(src=V6A, dst=V6B, nh=0) / Raw(bytes(4))),  # ipv6_ext_truncated
        _v6(IPv6Ext("dst") / IPv6Ext("dst") / IPv6Ext("dst") / IPv6Ext("dst") / IPv6Ext("dst")
            / IPv6Ext("dst") / IPv6Ext("dst") / IPv6Ext("dst") / IPv6Ext("dst")),  # ext_too_many
        _v4(TCP(sport=1, dport=2), length=30),  # tcp_truncated
        _v4(TCP(sport=1, dport=2, dataofs=2)),  # tcp_bad_offset
        _v4(UDP(sport=1, dport=2), length=25),  # udp_truncated
        _v4(UDP(sport=1, dport=2, len=4)),  # udp_bad_length
        _v4(ICMP(), length=24),  # icmp_truncated
        _v6(ICMPv6(), plen=4),  # icmpv6_truncated
    ]
    rows = parse_rows(frames)
    assert [r["err"] for r in rows] == list(L.PARSE_ERRORS)
    assert [parse_error_name(r["perr"]) for r in rows] == list(L.PARSE_ERRORS)


def test_icmp_family_mismatch_is_not_checked():
    """ICMPv6 over IPv4 and ICMP over IPv6 are 'other protocols': no L4 check."""
    row = parse_one(_v4(Raw(bytes(3)), proto=58))
    assert row["err"] == "ok" and row["proto"] == 58 and row["l4_off"] == 34
    assert not row["pflags"] & L.F_L4_OK
    row = parse_one(bytes(E / IPv6(src=V6A, dst=V6B, nh=1) / Raw(bytes(3))))
    assert row["err"] == "ok" and row["proto"] == 1 and row["l4_off"] == 54
    assert not row["pflags"] & L.F_L4_OK


def test_parse_starts_at_start_row_and_checks_bucket_count():
    pool = PacketPool(8)
    b = PacketBatch(pool, 4)
    try:
        b.add_frame(bytes(CASES["ipv4_udp"]["frame"]))
        b.add_frame(bytes(CASES["ipv6_udp"]["frame"]))
        b.meta[0, L.PERR] = 99
        b.meta[0, L.ETYPE] = 12345
        parse(b, 64, start_row=1)
        assert b.meta[0, L.PERR] == 99 and b.meta[0, L.ETYPE] == 12345  # untouched
        assert b.meta[1, L.PERR] == 0 and b.meta[1, L.ETYPE] == L.ETH_IPV6
        assert 0 <= b.meta[1, L.BUCKET] < 64
        for bad in (0, -4, 3, 100):
            with pytest.raises(ValueError):
                parse(b, bad)
    finally:
        b.release_all()


def test_reparse_overwrites_stale_metadata():
    """Parsing a row resets every parse column, whatever it held before."""
    pool = PacketPool(8)
    b = PacketBatch(pool, 4)
    try:
        b.add_frame(bytes(CASES["arp"]["frame"]))
        cols = (L.ETYPE, L.VLAN, L.TAGS, L.L3_OFF, L.L4_OFF, L.PROTO, L.PFLAGS, L.PERR)
        b.meta[0, list(cols)] = 777
        parse(b)
        fresh = parse_one(bytes(CASES["arp"]["frame"]))
        for c in cols:
            assert b.meta[0, c] == fresh[L.FIELD_NAMES[c]]
    finally:
        b.release_all()


# --------------------------------------------------------------------------------------
# first fragments of UDP datagrams (the UDP length covers the whole datagram)


def _scapy_first_fragments():
    from scapy.layers.inet import IP, fragment
    from scapy.layers.inet import UDP as SUDP
    from scapy.layers.inet6 import IPv6 as SIPv6
    from scapy.layers.inet6 import IPv6ExtHdrFragment, fragment6
    from scapy.layers.l2 import Ether

    big = bytes(range(256)) * 8  # 2048-byte payload
    v4 = fragment(Ether(dst=MAC_B, src=MAC_A) / IP(src=V4A, dst=V4B, id=4242)
                  / SUDP(sport=53, dport=33333) / big, fragsize=1000)
    v6 = fragment6(Ether(dst=MAC_B, src=MAC_A) / SIPv6(src=V6A, dst=V6B)
                   / IPv6ExtHdrFragment(id=4242) / SUDP(sport=53, dport=33333) / big, 1280)
    return bytes(v4[0]), bytes(v6[0])


def test_udp_first_fragment_offsets_and_flags():
    """What does not depend on the UDP length check: offsets, protocol, F_FRAG."""
    f4, f6 = _scapy_first_fragments()
    r4, r6 = parse_rows([f4, f6])
    assert (r4["l4_off"], r4["proto"]) == (34, 17)
    assert r4["pflags"] & (L.F_FRAG | L.F_LATER_FRAG) == L.F_FRAG
    assert (r6["l4_off"], r6["proto"]) == (62, 17)
    assert r6["pflags"] & (L.F_FRAG | L.F_LATER_FRAG | L.F_IPV6_EXT) == L.F_FRAG | L.F_IPV6_EXT


def test_udp_first_fragment_is_not_malformed():
    f4, f6 = _scapy_first_fragments()
    r4, r6 = parse_rows([f4, f6])
    assert r4["err"] == "ok" and r4["pflags"] & L.F_L4_OK
    assert r6["err"] == "ok" and r6["pflags"] & L.F_L4_OK
