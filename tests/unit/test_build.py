"""Tests for dva.packet.build: byte-exact against scapy, RFC checksums, strictness."""

from __future__ import annotations

import dataclasses
import ipaddress
import struct
from typing import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scapy.layers.inet import (
    ICMP as SICMP,
)
from scapy.layers.inet import (
    IP as SIP,
)
from scapy.layers.inet import (
    TCP as STCP,
)
from scapy.layers.inet import (
    UDP as SUDP,
)
from scapy.layers.inet import (
    IPOption_LSRR,
    IPOption_Router_Alert,
    IPOption_RR,
    IPOption_SSRR,
)
from scapy.layers.inet6 import (
    ICMPv6DestUnreach,
    ICMPv6EchoReply,
    ICMPv6EchoRequest,
    ICMPv6PacketTooBig,
    IPv6ExtHdrDestOpt,
    IPv6ExtHdrFragment,
    IPv6ExtHdrHopByHop,
    IPv6ExtHdrRouting,
    RouterAlert,
)
from scapy.layers.inet6 import (
    IPv6 as SIPv6,
)
from scapy.layers.l2 import ARP as SARP
from scapy.layers.l2 import Dot1Q as SDot1Q
from scapy.layers.l2 import Ether as SEther
from scapy.packet import Packet
from scapy.packet import Raw as SRaw

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
    Stack,
    checksum16,
    int_to_mac,
    mac_to_int,
)

DST, SRC = "00:11:22:33:44:55", "02:00:00:00:00:01"
A4, B4 = "10.0.0.1", "192.168.1.20"
A6, B6 = "2001:db8::1", "fe80::abcd:1"
HOPS = ["10.9.9.9", "10.8.8.8"]
PAYLOAD = bytes(range(37))
TCP_OPTS = [("MSS", 1460), ("SAckOK", b""), ("Timestamp", (1, 0)), ("NOP", None), ("WScale", 7)]
TCP_OPTS_BYTES = bytes.fromhex("020405b4" "0402" "080a0000000100000000" "01" "030307")


def e() -> Eth:
    return Eth(dst=DST, src=SRC)


def se() -> SEther:
    return SEther(dst=DST, src=SRC)


def stcp(**kw: object) -> STCP:
    # scapy's default window is 8192, ours 65535
    kw.setdefault("window", 65535)
    return STCP(**kw)


def lsrr_bytes(hops: list[str], kind: int = 0x83) -> bytes:
    addrs = b"".join(ipaddress.IPv4Address(h).packed for h in hops)
    return bytes((kind, 3 + len(addrs), 4)) + addrs


def rh0_bytes(addrs: list[str]) -> bytes:
    # routing type 0, segments left = all, 4 reserved bytes, addresses
    return bytes((0, len(addrs), 0, 0, 0, 0)) + b"".join(
        ipaddress.IPv6Address(a).packed for a in addrs
    )


# (id, our stack, scapy packet factory); scapy packets are built lazily so
# collection stays cheap and scapy's own defaults (e.g. IP id=1) are explicit.
CASES: list[tuple[str, Callable[[], Stack], Callable[[], Packet]]] = [
    ("arp-request",
     lambda: e() / ARP(hwsrc=SRC, psrc=A4, pdst=B4),
     lambda: se() / SARP(op=1, hwsrc=SRC, psrc=A4, hwdst="00:00:00:00:00:00", pdst=B4)),
    ("arp-reply",
     lambda: e() / ARP(op=2, hwsrc=SRC, psrc=A4, hwdst=DST, pdst=B4),
     lambda: se() / SARP(op=2, hwsrc=SRC, psrc=A4, hwdst=DST, pdst=B4)),
    ("raw-ethertype-9000",
     lambda: e() / Raw(b"hello"),
     lambda: se() / SRaw(b"hello")),
    ("ipv4-udp",
     lambda: e() / IPv4(A4, B4) / UDP(1000, 53) / Raw(PAYLOAD),
     lambda: se() / SIP(src=A4, dst=B4, id=0) / SUDP(sport=1000, dport=53) / PAYLOAD),
    ("ipv4-udp-empty",
     lambda: e() / IPv4(A4, B4, ttl=1, tos=0xb8, id=0xbeef, flags=2) / UDP(68, 67),
     lambda: se() / SIP(src=A4, dst=B4, ttl=1, tos=0xB8, id=0xBEEF, flags="DF")
     / SUDP(sport=68, dport=67)),
    ("ipv4-nothing-proto-0",
     lambda: e() / IPv4(A4, B4),
     lambda: se() / SIP(src=A4, dst=B4, id=0)),
    ("ipv4-tcp-syn-options",
     lambda: e() / IPv4(A4, B4, id=7, flags="DF")
     / TCP(40000, 443, seq=123456789, window=29200, options=TCP_OPTS_BYTES),
     lambda: se() / SIP(src=A4, dst=B4, id=7, flags="DF")
     / stcp(sport=40000, dport=443, seq=123456789, window=29200, flags="S", options=TCP_OPTS)),
    ("ipv4-tcp-options-padded",
     lambda: e() / IPv4(A4, B4, id=1) / TCP(1, 2, options=bytes.fromhex("020405b401")),
     lambda: se() / SIP(src=A4, dst=B4) / stcp(sport=1, dport=2, options=[("MSS", 1460), ("NOP", None)])),
    ("ipv4-tcp-data",
     lambda: e() / IPv4(A4, B4, id=2) / TCP(80, 5555, seq=1, ack=2, flags="PA", window=512, urgptr=0)
     / Raw(b"GET / HTTP/1.0\r\n\r\n"),
     lambda: se() / SIP(src=A4, dst=B4, id=2) / stcp(sport=80, dport=5555, seq=1, ack=2, flags="PA",
                                                    window=512) / b"GET / HTTP/1.0\r\n\r\n"),
    ("ipv4-tcp-all-flags-reserved",
     lambda: e() / IPv4(A4, B4, id=1) / TCP(1, 2, flags=0x1FF, reserved=5, urgptr=9),
     lambda: se() / SIP(src=A4, dst=B4) / stcp(sport=1, dport=2, flags="FSRPAUECN", reserved=5, urgptr=9)),
    ("ipv4-options-rr",
     lambda: e() / IPv4(A4, B4, id=1, options=bytes.fromhex("070304")) / UDP(1, 2) / Raw(b"x"),
     lambda: se() / SIP(src=A4, dst=B4, options=[IPOption_RR()]) / SUDP(sport=1, dport=2) / b"x"),
    ("ipv4-options-router-alert",
     lambda: e() / IPv4(A4, B4, id=1, ttl=1, proto=2, options=bytes.fromhex("94040000"))
     / Raw(bytes(8)),
     lambda: se() / SIP(src=A4, dst=B4, ttl=1, proto=2, options=[IPOption_Router_Alert()])
     / SRaw(bytes(8))),
    ("ipv4-lsrr-udp-final-dst",
     lambda: e() / IPv4(A4, B4, id=1, options=lsrr_bytes(HOPS)) / UDP(7, 9) / Raw(PAYLOAD),
     lambda: se() / SIP(src=A4, dst=B4, options=[IPOption_LSRR(routers=HOPS)]) / SUDP(sport=7, dport=9)
     / PAYLOAD),
    ("ipv4-ssrr-tcp-final-dst",
     lambda: e() / IPv4(A4, B4, id=1, options=lsrr_bytes(HOPS, 0x89)) / TCP(7, 9),
     lambda: se() / SIP(src=A4, dst=B4, options=[IPOption_SSRR(routers=HOPS)]) / stcp(sport=7, dport=9)),
    ("ipv4-first-fragment",
     lambda: e() / IPv4(A4, B4, id=99, flags=1) / UDP(5, 6) / Raw(bytes(16)),
     lambda: se() / SIP(src=A4, dst=B4, id=99, flags="MF") / SUDP(sport=5, dport=6) / bytes(16)),
    ("ipv4-later-fragment",
     lambda: e() / IPv4(A4, B4, id=99, frag=3, proto=17) / Raw(PAYLOAD),
     lambda: se() / SIP(src=A4, dst=B4, id=99, frag=3, proto=17) / SRaw(PAYLOAD)),
    ("icmp-echo-request",
     lambda: e() / IPv4(A4, B4, id=1) / ICMP(id=0x1234, seq=7) / Raw(PAYLOAD),
     lambda: se() / SIP(src=A4, dst=B4) / SICMP(type=8, id=0x1234, seq=7) / PAYLOAD),
    ("icmp-echo-reply-odd-length",
     lambda: e() / IPv4(A4, B4, id=1) / ICMP(type=0, id=1, seq=2) / Raw(b"abc"),
     lambda: se() / SIP(src=A4, dst=B4) / SICMP(type=0, id=1, seq=2) / b"abc"),
    ("icmp-frag-needed-rest",
     lambda: e() / IPv4(A4, B4, id=1) / ICMP(type=3, code=4, rest=struct.pack("!HH", 0, 1500))
     / Raw(PAYLOAD[:28]),
     lambda: se() / SIP(src=A4, dst=B4) / SICMP(type=3, code=4, nexthopmtu=1500) / SRaw(PAYLOAD[:28])),
    ("vlan-ipv4-udp",
     lambda: e() / Dot1Q(10, pcp=5, dei=1) / IPv4(A4, B4, id=1) / UDP(1, 2) / Raw(b"v"),
     lambda: se() / SDot1Q(vlan=10, prio=5, dei=1) / SIP(src=A4, dst=B4) / SUDP(sport=1, dport=2) / b"v"),
    ("vlan-arp",
     lambda: e() / Dot1Q(4095) / ARP(hwsrc=SRC, psrc=A4, pdst=B4),
     lambda: se() / SDot1Q(vlan=4095) / SARP(hwsrc=SRC, psrc=A4, pdst=B4, hwdst="00:00:00:00:00:00")),
    ("qinq-88a8-tcp",
     lambda: e() / Dot1Q(100, tpid=0x88A8) / Dot1Q(200, pcp=3) / IPv4(A4, B4, id=1) / TCP(1, 2, flags="SA"),
     lambda: SEther(dst=DST, src=SRC, type=0x88A8) / SDot1Q(vlan=100) / SDot1Q(vlan=200, prio=3)
     / SIP(src=A4, dst=B4) / stcp(sport=1, dport=2, flags="SA")),
    ("qinq-8100-8100-ipv6",
     lambda: e() / Dot1Q(1) / Dot1Q(2) / IPv6(A6, B6) / UDP(1, 2),
     lambda: se() / SDot1Q(vlan=1) / SDot1Q(vlan=2) / SIPv6(src=A6, dst=B6) / SUDP(sport=1, dport=2)),
    ("ipv6-udp",
     lambda: e() / IPv6(A6, B6, hlim=7, tc=0x2E, fl=0xABCDE) / UDP(546, 547) / Raw(PAYLOAD),
     lambda: se() / SIPv6(src=A6, dst=B6, hlim=7, tc=0x2E, fl=0xABCDE) / SUDP(sport=546, dport=547)
     / PAYLOAD),
    ("ipv6-tcp-options",
     lambda: e() / IPv6(A6, B6) / TCP(1, 2, flags="S", options=TCP_OPTS_BYTES),
     lambda: se() / SIPv6(src=A6, dst=B6) / stcp(sport=1, dport=2, options=TCP_OPTS)),
    ("ipv6-nothing-nh-59",
     lambda: e() / IPv6(A6, B6),
     lambda: se() / SIPv6(src=A6, dst=B6)),
    ("icmpv6-echo-request",
     lambda: e() / IPv6(A6, B6) / ICMPv6(id=3, seq=4) / Raw(PAYLOAD),
     lambda: se() / SIPv6(src=A6, dst=B6) / ICMPv6EchoRequest(id=3, seq=4, data=PAYLOAD)),
    ("icmpv6-echo-reply",
     lambda: e() / IPv6(A6, B6) / ICMPv6(type=129, id=3, seq=4) / Raw(b"xyz"),
     lambda: se() / SIPv6(src=A6, dst=B6) / ICMPv6EchoReply(id=3, seq=4, data=b"xyz")),
    ("icmpv6-dest-unreach",
     lambda: e() / IPv6(A6, B6) / ICMPv6(type=1, code=4) / Raw(PAYLOAD),
     lambda: se() / SIPv6(src=A6, dst=B6) / ICMPv6DestUnreach(code=4) / SRaw(PAYLOAD)),
    ("icmpv6-packet-too-big-rest",
     lambda: e() / IPv6(A6, B6) / ICMPv6(type=2, rest=struct.pack("!I", 1280)) / Raw(PAYLOAD),
     lambda: se() / SIPv6(src=A6, dst=B6) / ICMPv6PacketTooBig(mtu=1280) / SRaw(PAYLOAD)),
    ("ipv6-hop-router-alert-udp",
     lambda: e() / IPv6(A6, B6) / IPv6Ext("hop", data=bytes.fromhex("05020000")) / UDP(1, 2) / Raw(b"a"),
     lambda: se() / SIPv6(src=A6, dst=B6) / IPv6ExtHdrHopByHop(options=[RouterAlert()])
     / SUDP(sport=1, dport=2) / b"a"),
    ("ipv6-hop-empty-padn",
     lambda: e() / IPv6(A6, B6) / IPv6Ext("hop") / ICMPv6(),
     lambda: se() / SIPv6(src=A6, dst=B6) / IPv6ExtHdrHopByHop() / ICMPv6EchoRequest()),
    ("ipv6-destopt-tcp",
     lambda: e() / IPv6(A6, B6) / IPv6Ext("dst") / TCP(1, 2),
     lambda: se() / SIPv6(src=A6, dst=B6) / IPv6ExtHdrDestOpt() / stcp(sport=1, dport=2)),
    ("ipv6-frag-first-udp",
     lambda: e() / IPv6(A6, B6) / IPv6Ext("frag", m=1, ident=0x12345678) / UDP(1, 2) / Raw(bytes(16)),
     lambda: se() / SIPv6(src=A6, dst=B6) / IPv6ExtHdrFragment(m=1, id=0x12345678)
     / SUDP(sport=1, dport=2) / bytes(16)),
    ("ipv6-frag-later",
     lambda: e() / IPv6(A6, B6) / IPv6Ext("frag", nh=17, offset=3, ident=5) / Raw(PAYLOAD),
     lambda: se() / SIPv6(src=A6, dst=B6) / IPv6ExtHdrFragment(nh=17, offset=3, id=5) / SRaw(PAYLOAD)),
    ("ipv6-hop-frag-tcp-chain",
     lambda: e() / IPv6(A6, B6) / IPv6Ext("hop", data=bytes.fromhex("05020000"))
     / IPv6Ext("frag", ident=1) / TCP(1, 2),
     lambda: se() / SIPv6(src=A6, dst=B6) / IPv6ExtHdrHopByHop(options=[RouterAlert()])
     / IPv6ExtHdrFragment(id=1) / stcp(sport=1, dport=2)),
    ("ipv6-routing-udp-final-dst",
     lambda: e() / IPv6(A6, B6) / IPv6Ext("routing", data=rh0_bytes(["2001:db8::7", "2001:db8::8"]))
     / UDP(1, 2) / Raw(PAYLOAD),
     lambda: se() / SIPv6(src=A6, dst=B6) / IPv6ExtHdrRouting(addresses=["2001:db8::7", "2001:db8::8"])
     / SUDP(sport=1, dport=2) / PAYLOAD),
    ("ipv4-in-ipv4",
     lambda: e() / IPv4(A4, B4, id=1) / IPv4("1.1.1.1", "2.2.2.2", id=1) / UDP(1, 2),
     lambda: se() / SIP(src=A4, dst=B4) / SIP(src="1.1.1.1", dst="2.2.2.2") / SUDP(sport=1, dport=2)),
    ("ipv6-in-ipv4",
     lambda: e() / IPv4(A4, B4, id=1) / IPv6(A6, B6) / ICMPv6(),
     lambda: se() / SIP(src=A4, dst=B4) / SIPv6(src=A6, dst=B6) / ICMPv6EchoRequest()),
    ("ipv4-in-ipv6",
     lambda: e() / IPv6(A6, B6) / IPv4(A4, B4, id=1) / TCP(1, 2),
     lambda: se() / SIPv6(src=A6, dst=B6) / SIP(src=A4, dst=B4) / stcp(sport=1, dport=2)),
]


@pytest.mark.parametrize("ours,theirs", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_matches_scapy(ours: Callable[[], Stack], theirs: Callable[[], Packet]) -> None:
    assert bytes(ours()).hex() == bytes(theirs()).hex()


# Fields scapy recomputes when deleted; "*error" layers quote an inner packet
# inside ICMP errors and must be left alone.
_AUTO_FIELDS = ("chksum", "cksum", "len", "plen", "ihl", "dataofs")


def scapy_recomputed(frame: bytes) -> bytes:
    pkt = SEther(frame)
    layer = pkt.payload
    while isinstance(layer, Packet) and layer.name and not type(layer).__name__.endswith("error"):
        if type(layer).__name__ in ("Raw", "Padding", "NoPayload"):
            break
        names = {f.name for f in layer.fields_desc}
        for name in _AUTO_FIELDS:
            if name in names and not (type(layer).__name__ == "Dot1Q"):
                setattr(layer, name, None)
        layer = layer.payload
    return bytes(pkt)


@pytest.mark.parametrize("ours", [c[1] for c in CASES], ids=[c[0] for c in CASES])
def test_scapy_sees_valid_checksums_and_lengths(ours: Callable[[], Stack]) -> None:
    frame = bytes(ours())
    assert scapy_recomputed(frame).hex() == frame.hex()


@settings(max_examples=100, deadline=None)
@given(
    sport=st.integers(0, 0xFFFF),
    dport=st.integers(0, 0xFFFF),
    payload=st.binary(max_size=64),
    v6=st.booleans(),
    use_tcp=st.booleans(),
    vid=st.none() | st.integers(0, 4095),
)
def test_matches_scapy_random(sport: int, dport: int, payload: bytes, v6: bool, use_tcp: bool,
                              vid: int | None) -> None:
    ours = e()
    theirs = se()
    if vid is not None:
        ours, theirs = ours / Dot1Q(vid), theirs / SDot1Q(vlan=vid)
    if v6:
        ours, theirs = ours / IPv6(A6, B6), theirs / SIPv6(src=A6, dst=B6)
    else:
        ours, theirs = ours / IPv4(A4, B4), theirs / SIP(src=A4, dst=B4, id=0)
    if use_tcp:
        ours, theirs = ours / TCP(sport, dport), theirs / stcp(sport=sport, dport=dport)
    else:
        ours, theirs = ours / UDP(sport, dport), theirs / SUDP(sport=sport, dport=dport)
    assert bytes(ours / Raw(payload)) == bytes(theirs / SRaw(payload))


# -------------------------------------------------------------- checksums


def naive_checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\x00"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def test_checksum16_rfc1071_example() -> None:
    # RFC 1071 section 3: the one's complement sum of these words is 0xddf2.
    assert checksum16(bytes.fromhex("0001f203f4f5f6f7")) == ~0xDDF2 & 0xFFFF


def test_checksum16_edge_cases() -> None:
    assert checksum16(b"") == 0xFFFF
    assert checksum16(b"\x00\x00") == 0xFFFF
    assert checksum16(b"\xff\xff") == 0x0000
    assert checksum16(b"\xff\xff\xff\xff") == 0x0000
    assert checksum16(b"\x01") == ~0x0100 & 0xFFFF


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_checksum16_matches_naive(data: bytes) -> None:
    assert checksum16(data) == naive_checksum(data)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=100))
def test_checksum16_verifies_to_zero(data: bytes) -> None:
    padded = data + b"\x00" * (len(data) % 2)
    assert checksum16(padded + struct.pack("!H", checksum16(padded))) == 0


def test_udp_zero_checksum_is_sent_as_ffff() -> None:
    base = e() / IPv4(A4, B4) / UDP(1, 2)
    # Pick the payload word that makes the one's complement sum 0xffff,
    # i.e. the computed checksum 0.
    probe = bytes(base / Raw(b"\x00\x00"))
    word = struct.unpack("!H", probe[40:42])[0]
    frame = bytes(base / Raw(struct.pack("!H", word)))
    assert frame[40:42] == b"\xff\xff"
    assert scapy_recomputed(frame) == frame
    # The same holds over IPv6.
    base6 = e() / IPv6(A6, B6) / UDP(1, 2)
    word6 = struct.unpack("!H", bytes(base6 / Raw(b"\x00\x00"))[60:62])[0]
    assert bytes(base6 / Raw(struct.pack("!H", word6)))[60:62] == b"\xff\xff"


def test_l4_without_ip_has_zero_checksum() -> None:
    assert bytes(e() / UDP(1, 2))[20:22] == b"\x00\x00"
    assert bytes(e() / TCP(1, 2))[30:32] == b"\x00\x00"
    assert bytes(ICMPv6())[2:4] == b"\x00\x00"
    # ICMPv4 has no pseudo-header, so it is always computed.
    assert checksum16(bytes(ICMP(id=1))) == 0


# -------------------------------------------------------- explicit values


def test_explicit_bad_values_are_kept() -> None:
    frame = bytes(
        e()
        / IPv4(A4, B4, ihl=6, len=999, chksum=0x1234, proto=99)
        / UDP(1, 2, len=3, chksum=0)
        / Raw(b"abcd")
    )
    assert frame[14] == 0x46
    assert frame[16:18] == struct.pack("!H", 999)
    assert frame[23] == 99
    assert frame[24:26] == b"\x12\x34"
    assert frame[38:40] == b"\x00\x03"
    assert frame[40:42] == b"\x00\x00"  # explicit 0 is not turned into 0xffff
    assert frame[42:] == b"abcd"

    tcp = bytes(e() / IPv6(A6, B6, plen=3, nh=200) / TCP(1, 2, dataofs=15, chksum=0xDEAD))
    assert tcp[18:20] == b"\x00\x03" and tcp[20] == 200
    assert tcp[54 + 12] >> 4 == 15 and tcp[54 + 16 : 54 + 18] == b"\xde\xad"
    assert len(tcp) == 54 + 20  # dataofs does not invent option bytes

    icmp = bytes(ICMP(chksum=0xBAD0)) + bytes(ICMPv6(chksum=0))
    assert icmp[2:4] == b"\xba\xd0" and icmp[10:12] == b"\x00\x00"

    assert bytes(Eth(type=0x1234) / IPv4(A4, B4))[12:14] == b"\x12\x34"
    assert bytes(Eth() / Dot1Q(5, type=0x0806) / IPv4(A4, B4))[16:18] == b"\x08\x06"
    assert bytes(IPv6Ext("hop", nh=17))[0] == 17


def test_auto_fields() -> None:
    frame = bytes(Eth() / Dot1Q(3) / IPv6(A6, B6) / IPv6Ext("routing", data=rh0_bytes([B6]))
                  / IPv6Ext("dst") / IPv6Ext("frag") / ICMPv6())
    assert frame[12:14] == b"\x81\x00" and frame[16:18] == b"\x86\xdd"
    assert frame[18 + 6] == 43  # IPv6 nh -> routing
    assert frame[58] == 60 and frame[58 + 24] == 44 and frame[58 + 24 + 8] == 58
    assert struct.unpack("!H", frame[22:24])[0] == len(frame) - 58
    # Raw after IPv6 is "no next header"; after Eth scapy's 0x9000.
    assert bytes(IPv6(A6, B6) / Raw(b"x"))[6] == 59
    assert bytes(Eth() / Raw(b"x"))[12:14] == b"\x90\x00"
    assert bytes(Eth() / Dot1Q(1))[16:18] == b"\x00\x00"


def test_pad_to_60_bytes() -> None:
    arp = ARP(hwsrc=SRC, psrc=A4, pdst=B4)
    frame = bytes(Eth(pad=True) / arp)
    assert len(frame) == 60
    assert frame == bytes(Eth() / arp) + bytes(18)
    big = bytes(Eth(pad=True) / Raw(bytes(100)))
    assert len(big) == 114
    assert len(bytes(Eth() / arp)) == 42


def test_scapy_padding_matches() -> None:
    ours = bytes(Eth(dst=DST, src=SRC, pad=True) / IPv4(A4, B4) / UDP(1, 2) / Raw(b"hi"))
    theirs = bytes(se() / SIP(src=A4, dst=B4, id=0) / SUDP(sport=1, dport=2) / b"hi")
    assert ours == theirs + bytes(60 - len(theirs))
    assert scapy_recomputed(ours) == ours


# ------------------------------------------------------------- API shape


def test_stack_semantics() -> None:
    ip = IPv4(A4, B4)
    s1 = Eth() / ip
    s2 = s1 / UDP(1, 2)
    assert isinstance(s1, Stack) and isinstance(s2, Stack)
    assert len(s1.layers) == 2 and len(s2.layers) == 3  # s1 unchanged
    assert len(s2) == len(bytes(s2)) == 42
    assert len(ip) == 20
    assert s2[1] is ip
    assert list(s2)[2] == UDP(1, 2)
    assert bytes(s1 / b"xy")[-2:] == b"xy"
    assert bytes(Eth() / (IPv4(A4, B4) / UDP(1, 2))) == bytes(s2)
    assert s2 == Eth() / IPv4(A4, B4) / UDP(1, 2)
    with pytest.raises(dataclasses.FrozenInstanceError):
        ip.ttl = 3  # type: ignore[misc]


def test_values_normalised() -> None:
    assert Eth(dst=b"\xaa\xbb\xcc\xdd\xee\xff", src="AA-BB-CC-DD-EE-0F").src == "aa:bb:cc:dd:ee:0f"
    assert IPv4(ipaddress.IPv4Address(A4), B4).src == ipaddress.IPv4Address(A4)
    assert TCP(1, 2, flags="SA").flags == 0x12
    assert IPv4(A4, B4, flags="DF+MF").flags == 3


def test_mac_helpers() -> None:
    assert mac_to_int("02:00:00:00:00:01") == 0x020000000001
    assert int_to_mac(0x020000000001) == "02:00:00:00:00:01"
    assert int_to_mac(mac_to_int("AB:cd:EF:01:23:45")) == "ab:cd:ef:01:23:45"
    for bad in ("02:00:00:00:00", "02:00:00:00:00:0g", "0200.0000.0001", "2:0:0:0:0:1", ""):
        with pytest.raises(ValueError, match="bad MAC address"):
            mac_to_int(bad)
    for bad_int in (-1, 1 << 48):
        with pytest.raises(ValueError):
            int_to_mac(bad_int)


@pytest.mark.parametrize(
    "make,match",
    [
        (lambda: Eth(dst="ff:ff"), "bad MAC address"),
        (lambda: Eth(pad=1), "pad"),
        (lambda: ARP(hwsrc=SRC, psrc="10.0.0.300", pdst=B4), "bad IPv4 address"),
        (lambda: IPv4(A6, B4), "bad IPv4 address"),
        (lambda: IPv6(A4, B6), "bad IPv6 address"),
        (lambda: Dot1Q(4096), r"vid=4096 out of range"),
        (lambda: Dot1Q(1, pcp=8), "pcp"),
        (lambda: Dot1Q(1, tpid=0x9100), "tpid"),
        (lambda: IPv4(A4, B4, ttl=256), "ttl"),
        (lambda: IPv4(A4, B4, ttl="64"), "must be an int"),
        (lambda: IPv4(A4, B4, flags="XF"), "bad IPv4 flag"),
        (lambda: IPv4(A4, B4, frag=1 << 13), "frag"),
        (lambda: IPv4(A4, B4, options=bytes(41)), "options"),
        (lambda: IPv4(A4, B4, options="abc"), "must be bytes"),
        (lambda: TCP(1, 2, flags="SX"), "bad TCP flag 'X'"),
        (lambda: TCP(1, 2, flags=0x200), "flags"),
        (lambda: TCP(1, 2, options=bytes(44)), "options"),
        (lambda: TCP(-1, 2), "sport"),
        (lambda: UDP(1, 70000), "dport"),
        (lambda: ICMP(rest=b"abc"), "exactly 4 bytes"),
        (lambda: ICMPv6(type=300), "type"),
        (lambda: IPv6Ext("nope"), "bad IPv6Ext kind"),
        (lambda: IPv6Ext("routing", data=b"\x00"), "multiple of 8"),
        (lambda: IPv6Ext("frag", data=b"\x00"), "frag"),
        (lambda: IPv6Ext("hop", m=1), "frag-only"),
        (lambda: IPv6Ext("hop", data=bytes(3000)), "too long"),
        (lambda: Stack((b"x",)), "not a layer"),  # type: ignore[arg-type]
    ],
)
def test_bad_values_raise_value_error(make: Callable[[], object], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        make()


def test_build_time_length_errors() -> None:
    with pytest.raises(ValueError, match="exceeds 65535"):
        bytes(IPv4(A4, B4) / Raw(bytes(65516)))
    with pytest.raises(ValueError, match="exceeds 65535"):
        bytes(UDP(1, 2) / Raw(bytes(65528)))
    with pytest.raises(ValueError, match="exceeds 65535"):
        bytes(IPv6(A6, B6) / Raw(bytes(65536)))
    # Explicit lengths bypass the auto-length limit but not the pseudo-header one.
    with pytest.raises(ValueError, match="pseudo-header"):
        bytes(IPv4(A4, B4, len=20) / TCP(1, 2) / Raw(bytes(65536)))


def test_scapy_helper_catches_bad_fields() -> None:
    # Guard for the checker itself: it must notice wrong checksums and lengths.
    good = e() / IPv4(A4, B4) / TCP(1, 2)
    for bad in (
        e() / IPv4(A4, B4, chksum=1) / TCP(1, 2),
        e() / IPv4(A4, B4) / TCP(1, 2, chksum=1),
        e() / IPv4(A4, B4) / UDP(1, 2, len=9),
        e() / IPv6(A6, B6) / ICMPv6(chksum=1),
    ):
        assert scapy_recomputed(bytes(bad)) != bytes(bad)
    assert scapy_recomputed(bytes(good)) == bytes(good)
