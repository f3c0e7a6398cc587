"""Tests for dva.packet.checksum: RFC 1071 checksums against scapy, RFC 1624 updates."""

from __future__ import annotations

import ipaddress
import struct

import numpy as np
import pytest
import scapy.layers.inet  # noqa: F401  (layer bindings)
import scapy.layers.inet6  # noqa: F401
from hypothesis import assume, example, given, settings
from hypothesis import strategies as st
from scapy.layers.inet import ICMP as SICMP
from scapy.layers.inet import IP as SIP
from scapy.layers.inet import TCP as STCP
from scapy.layers.inet import UDP as SUDP
from scapy.layers.inet6 import ICMPv6EchoReply, ICMPv6EchoRequest, IPv6ExtHdrHopByHop
from scapy.layers.inet6 import IPv6 as SIPv6
from scapy.layers.l2 import Ether
from scapy.packet import Raw as SRaw
from scapy.utils import checksum as scapy_checksum

from dva.packet import layout as L
from dva.packet.build import TCP, UDP, Eth, IPv4, Raw
from dva.packet.checksum import (
    csum_add,
    csum_apply,
    csum_delta16,
    csum_delta32,
    csum_fold,
    csum_update16,
    csum_update32,
    ipv4_header_checksum,
    ipv4_header_ok,
    l4_checksum,
    rd16,
    rd32,
    wr16,
    wr32,
)

SETTINGS = settings(max_examples=200, deadline=None)


def SEth():
    """A scapy Ethernet header with both MACs given (else scapy resolves them on the net)."""
    return Ether(dst="02:00:00:00:00:02", src="02:00:00:00:00:01")


def arr(frame: bytes) -> np.ndarray:
    return np.frombuffer(bytes(frame), dtype=np.uint8).copy()


def field16(frame: bytes, off: int) -> int:
    return struct.unpack_from("!H", frame, off)[0]


ipv4_addr = st.integers(0, 2**32 - 1).map(
    lambda v: ".".join(str(b) for b in v.to_bytes(4, "big")))
ipv6_addr = st.binary(min_size=16, max_size=16).map(
    lambda b: str(ipaddress.IPv6Address(b)))
port = st.integers(0, 0xFFFF)
payload = st.binary(min_size=0, max_size=80)  # odd lengths exercise the zero-pad rule


def _l4_offsets(frame, layer_cls):
    """(l3, l4, l4len) of the scapy layer ``layer_cls`` inside ``frame``."""
    pkt = Ether(frame)
    l3 = 14
    seg = bytes(pkt[layer_cls])
    return pkt, l3, len(frame) - len(seg), len(seg)


# --------------------------------------------------------------------------------------
# primitives


def test_read_write_helpers_are_big_endian():
    a = np.zeros(8, np.uint8)
    wr16(a, 1, 0xBEEF)
    wr32(a, 3, 0x01020304)
    assert bytes(a) == b"\x00\xbe\xef\x01\x02\x03\x04\x00"
    assert rd16(a, 1) == 0xBEEF and rd32(a, 3) == 0x01020304
    wr16(a, 0, 0x1FFFF)  # only 16 bits are written
    assert rd16(a, 0) == 0xFFFF and a[2] == 0xEF


@given(data=st.binary(min_size=0, max_size=200))
@SETTINGS
def test_csum_add_fold_equals_scapy_checksum(data):
    assert csum_fold(csum_add(arr(data + b"\x00"), 0, len(data), 0)) == scapy_checksum(data)


def test_csum_fold_known_values():
    assert csum_fold(0) == 0xFFFF
    assert csum_fold(0xFFFF) == 0x0000
    assert csum_fold(0x1FFFE) == 0x0000  # 0xfffe + 1 end-around carry
    assert csum_fold(0x12345678) == (~(0x1234 + 0x5678)) & 0xFFFF
    # the RFC 1071 example: 0001 f203 f4f5 f6f7 -> sum ddf2, checksum 220d
    a = arr(bytes.fromhex("0001f203f4f5f6f7"))
    assert csum_fold(csum_add(a, 0, 8, 0)) == 0x220D


def test_csum_add_odd_tail_is_padded_with_zero():
    a = arr(b"\x12\x34\x56\xff")  # the 0xff after the 3 bytes must not be read
    assert csum_add(a, 0, 3, 0) == 0x1234 + 0x5600


# --------------------------------------------------------------------------------------
# IPv4 header checksum


@given(src=ipv4_addr, dst=ipv4_addr, ttl=st.integers(0, 255), ident=port,
       tos=st.integers(0, 255), flags=st.integers(0, 7), frag=st.integers(0, 0x1FFF),
       proto=st.integers(0, 255), nopts=st.integers(0, 10), plen=st.integers(0, 40))
@SETTINGS
def test_ipv4_header_checksum_equals_scapy(src, dst, ttl, ident, tos, flags, frag, proto,
                                           nopts, plen):
    from scapy.layers.inet import IPOption_NOP

    ip = SIP(src=src, dst=dst, ttl=ttl, id=ident, tos=tos, flags=flags, frag=frag,
             proto=proto, options=[IPOption_NOP()] * (4 * nopts))
    frame = bytes(SEth() / ip / SRaw(bytes(plen)))
    pkt = Ether(frame)
    assert pkt[SIP].ihl == 5 + nopts
    want = pkt[SIP].chksum  # computed by scapy at build time
    a = arr(frame)
    assert ipv4_header_checksum(a, 14) == want
    assert ipv4_header_ok(a, 14)
    a[14 + 10:14 + 12] = 0xAA  # the function skips its own field
    assert ipv4_header_checksum(a, 14) == want
    assert not ipv4_header_ok(a, 14) or want == 0xAAAA


@given(hdr=st.binary(min_size=60, max_size=60), ihl=st.integers(5, 15))
@SETTINGS
def test_ipv4_header_checksum_random_headers(hdr, ihl):
    hdr = bytes([0x40 | ihl]) + hdr[1:10] + b"\x00\x00" + hdr[12:4 * ihl]
    a = arr(b"\xee" * 6 + hdr + b"\x77" * 10)  # at an offset, between foreign bytes
    c = ipv4_header_checksum(a, 6)
    assert c == scapy_checksum(hdr)
    wr16(a, 16, c)
    assert ipv4_header_ok(a, 6)
    a[6 + 4 * ihl - 1] ^= 0x01  # last header byte
    assert not ipv4_header_ok(a, 6)


# --------------------------------------------------------------------------------------
# L4 checksums against scapy


def _check_l4(frame, layer_cls, proto, is_v6, csum_off):
    pkt, l3, l4, l4len = _l4_offsets(frame, layer_cls)
    want = field16(frame, l4 + csum_off)
    a = arr(frame)
    got = l4_checksum(a, l3, l4, l4len, proto, is_v6, csum_off)
    assert got == want
    # independent of what the checksum field holds now
    wr16(a, l4 + csum_off, (want ^ 0x5A5A) & 0xFFFF)
    assert l4_checksum(a, l3, l4, l4len, proto, is_v6, csum_off) == want
    return want


@given(src=ipv4_addr, dst=ipv4_addr, sport=port, dport=port, data=payload,
       seq=st.integers(0, 2**32 - 1), mss=st.booleans())
@SETTINGS
def test_tcp_over_ipv4_checksum_equals_scapy(src, dst, sport, dport, data, seq, mss):
    opts = [("MSS", 1460), ("NOP", None), ("WScale", 7)] if mss else []
    frame = bytes(SEth() / SIP(src=src, dst=dst) / STCP(sport=sport, dport=dport, seq=seq,
                                                          flags="PA", options=opts) / data)
    _check_l4(frame, STCP, L.PROTO_TCP, False, 16)


@given(src=ipv4_addr, dst=ipv4_addr, sport=port, dport=port, data=payload,
       nopts=st.integers(0, 3))
@SETTINGS
def test_udp_over_ipv4_checksum_equals_scapy(src, dst, sport, dport, data, nopts):
    from scapy.layers.inet import IPOption_NOP

    frame = bytes(SEth() / SIP(src=src, dst=dst, options=[IPOption_NOP()] * (4 * nopts))
                  / SUDP(sport=sport, dport=dport) / data)
    _check_l4(frame, SUDP, L.PROTO_UDP, False, 6)


@given(src=ipv6_addr, dst=ipv6_addr, sport=port, dport=port, data=payload,
       hop=st.booleans())
@SETTINGS
def test_tcp_and_udp_over_ipv6_checksum_equals_scapy(src, dst, sport, dport, data, hop):
    ext = IPv6ExtHdrHopByHop() if hop else SRaw(b"")
    base = SEth() / SIPv6(src=src, dst=dst)
    if hop:
        base = base / ext
    _check_l4(bytes(base / STCP(sport=sport, dport=dport) / data), STCP, L.PROTO_TCP, True, 16)
    _check_l4(bytes(base / SUDP(sport=sport, dport=dport) / data), SUDP, L.PROTO_UDP, True, 6)


@given(itype=st.sampled_from([0, 8, 3, 11, 13]), ident=port, seq=port, data=payload,
       src=ipv4_addr, dst=ipv4_addr)
@SETTINGS
def test_icmp_checksum_equals_scapy(itype, ident, seq, data, src, dst):
    frame = bytes(SEth() / SIP(src=src, dst=dst) / SICMP(type=itype, id=ident, seq=seq) / data)
    _check_l4(frame, SICMP, L.PROTO_ICMP, False, 2)
    # no pseudo-header: the addresses do not matter
    other = bytes(SEth() / SIP(src="1.2.3.4", dst="5.6.7.8")
                  / SICMP(type=itype, id=ident, seq=seq) / data)
    assert field16(other, 36) == field16(frame, 36)


@given(src=ipv6_addr, dst=ipv6_addr, ident=port, seq=port, data=payload, reply=st.booleans())
@SETTINGS
def test_icmpv6_checksum_equals_scapy(src, dst, ident, seq, data, reply):
    cls = ICMPv6EchoReply if reply else ICMPv6EchoRequest
    frame = bytes(SEth() / SIPv6(src=src, dst=dst) / cls(id=ident, seq=seq, data=data))
    _check_l4(frame, cls, L.PROTO_ICMPV6, True, 2)


def _udp_frame_with_zero_sum(v6: bool):
    """A UDP frame whose one's complement sum is 0xffff: the checksum computes to 0."""
    ip = SIPv6(src="2001:db8::5", dst="2001:db8::6") if v6 else SIP(src="10.1.2.3",
                                                                    dst="10.3.2.1")
    base = bytes(SEth() / ip / SUDP(sport=1111, dport=2222) / b"\x00\x00")
    c0 = field16(base, len(base) - 2 - 2)  # checksum with a zero payload word
    assert c0 not in (0, 0xFFFF)
    # the payload word that brings the sum to 0xffff is the old checksum itself
    frame = bytes(SEth() / ip / SUDP(sport=1111, dport=2222) / struct.pack("!H", c0))
    return frame


@pytest.mark.parametrize("v6", [False, True])
def test_udp_zero_checksum_is_sent_as_ffff(v6):
    frame = _udp_frame_with_zero_sum(v6)
    pkt, l3, l4, l4len = _l4_offsets(frame, SUDP)
    a = arr(frame)
    # the raw one's complement result is 0 ...
    acc = csum_add(a, l4, l4len, 0)
    acc += csum_add(a, l3 + (8 if v6 else 12), 32 if v6 else 8, 0) + 17 + l4len
    acc -= field16(frame, l4 + 6)  # without the stored checksum
    assert csum_fold(acc) == 0
    # ... which UDP sends as 0xffff (RFC 768), like scapy
    assert field16(frame, l4 + 6) == 0xFFFF
    assert l4_checksum(a, l3, l4, l4len, L.PROTO_UDP, v6, 6) == 0xFFFF


def test_tcp_and_icmp_zero_checksum_stays_zero():
    """The 0 -> 0xffff rule is UDP's alone."""
    base = bytes(Eth() / IPv4(src="10.0.0.1", dst="10.0.0.2") / TCP(sport=1, dport=2)
                 / Raw(b"\x00\x00"))
    a = arr(base)
    c0 = l4_checksum(a, 14, 34, len(base) - 34, L.PROTO_TCP, False, 16)
    frame = bytes(Eth() / IPv4(src="10.0.0.1", dst="10.0.0.2") / TCP(sport=1, dport=2)
                  / Raw(struct.pack("!H", c0)))
    assert l4_checksum(arr(frame), 14, 34, len(frame) - 34, L.PROTO_TCP, False, 16) == 0
    p = Ether(frame)
    del p[STCP].chksum
    assert Ether(bytes(p))[STCP].chksum == 0  # scapy computes 0 as well
    # ICMP: the 4 bytes after the checksum are the data here
    msg = bytes(SICMP(type=8, id=0, seq=0))
    c = field16(msg, 2)
    frame = bytes(SEth() / SIP(src="1.1.1.1", dst="2.2.2.2") / SICMP(type=8, id=c, seq=0))
    assert field16(frame, 36) == 0
    assert l4_checksum(arr(frame), 14, 34, 8, L.PROTO_ICMP, False, 2) == 0


# --------------------------------------------------------------------------------------
# RFC 1624 incremental updates


def test_rfc1624_section4_example():
    """m = 0x5555 -> 0x3285 with HC = 0xdd2f: eqn. 3 gives 0x0000 (eqn. 2 gave 0xffff)."""
    assert csum_update16(0xDD2F, 0x5555, 0x3285) == 0x0000
    assert csum_update16(0x0000, 0x3285, 0x5555) == 0xDD2F
    # the same through a real buffer: other words sum to 0xcd7a
    buf = struct.pack("!HHH", 0xCD7A, 0x5555, 0)
    a = arr(buf)
    hc = csum_fold(csum_add(a, 0, 6, 0))
    assert hc == 0xDD2F
    wr16(a, 2, 0x3285)
    assert csum_fold(csum_add(a, 0, 6, 0)) == 0x0000


def test_csum_update_identity_and_inverse():
    for c in (0x0000, 0x0001, 0x7FFF, 0xFFFE):
        for old, new in ((0, 0), (0x1234, 0x1234), (0xFFFF, 0xFFFF)):
            assert csum_update16(c, old, new) == c
        assert csum_update16(csum_update16(c, 0x1111, 0xEEEE), 0xEEEE, 0x1111) == c


def _words(buf: bytes):
    return [field16(buf, i) for i in range(0, len(buf), 2)]


def _ocsum(words):
    s = sum(words)
    while s > 0xFFFF:
        s = (s & 0xFFFF) + (s >> 16)
    return s


@given(raw=st.binary(min_size=60, max_size=60), ihl=st.integers(5, 15),
       data=st.data(), target_zero=st.booleans())
@settings(max_examples=400, deadline=None)
def test_csum_update16_equals_recomputation_on_ipv4_headers(raw, ihl, data, target_zero):
    hdr = bytearray(bytes([0x40 | ihl]) + raw[1:4 * ihl])
    a = arr(bytes(hdr))
    wr16(a, 10, ipv4_header_checksum(a, 0))
    assert ipv4_header_ok(a, 0)
    words = [i for i in range(1, 2 * ihl) if i != 5]  # not word 0 (IHL), not the checksum
    i = data.draw(st.sampled_from(words), label="word")
    old = rd16(a, 2 * i)
    if target_zero:
        # the new value that makes the data sum 0xffff: the new checksum is 0x0000
        rest = _ocsum([w for j, w in enumerate(_words(bytes(a))) if j not in (i, 5)])
        new = (~rest) & 0xFFFF
    else:
        new = data.draw(st.integers(0, 0xFFFF))
    upd = csum_update16(rd16(a, 10), old, new)
    wr16(a, 2 * i, new)
    full = ipv4_header_checksum(a, 0)
    assert upd == full
    if target_zero:
        assert full == 0x0000
    wr16(a, 10, upd)
    assert ipv4_header_ok(a, 0)


@given(src=ipv4_addr, dst=ipv4_addr, new=st.integers(0, 2**32 - 1), which=st.sampled_from(
    ["src", "dst"]), opts=st.booleans(), ttl=st.integers(1, 255))
@settings(max_examples=400, deadline=None)
def test_csum_update32_ipv4_address_rewrite(src, dst, new, which, opts, ttl):
    frame = bytes(Eth() / IPv4(src=src, dst=dst, ttl=ttl,
                               options=b"\x01\x01\x01\x00" if opts else b"")
                  / TCP(sport=1, dport=2) / Raw(b"data!"))
    a = arr(frame)
    off = 14 + (12 if which == "src" else 16)
    old = rd32(a, off)
    l4 = 14 + (24 if opts else 20)
    l4len = len(frame) - l4
    ip_upd = csum_update32(rd16(a, 24), old, new)
    tcp_upd = csum_update32(rd16(a, l4 + 16), old, new)
    wr32(a, off, new)
    assert ip_upd == ipv4_header_checksum(a, 14)
    assert tcp_upd == l4_checksum(a, 14, l4, l4len, L.PROTO_TCP, False, 16)


@given(addr=ipv4_addr, word=port, target_zero=st.booleans())
@settings(max_examples=300, deadline=None)
def test_csum_update32_ipv4_header_zero_result(addr, word, target_zero):
    """Choose the new address so the new header checksum is exactly 0x0000."""
    frame = bytes(Eth() / IPv4(src=addr, dst="10.0.0.1", id=word) / UDP(sport=1, dport=2))
    a = arr(frame)
    old = rd32(a, 26)
    rest = _ocsum([w for j, w in enumerate(_words(frame[14:34])) if j not in (5, 6, 7)])
    hi = word
    if target_zero:
        lo = (~_ocsum([rest, hi])) & 0xFFFF  # rest + hi + lo == 0xffff
    else:
        lo = (word * 7919) & 0xFFFF
    new = hi << 16 | lo
    upd = csum_update32(rd16(a, 24), old, new)
    wr32(a, 26, new)
    full = ipv4_header_checksum(a, 14)
    assert upd == full
    if target_zero:
        assert full == 0x0000


@given(src=ipv4_addr, dst=ipv4_addr, new=st.integers(0, 2**32 - 1), sport=port, dport=port,
       data=payload)
@settings(max_examples=300, deadline=None)
def test_csum_update_udp_over_ipv4_rewrite(src, dst, new, sport, dport, data):
    """NAT-style rewrite of an address and a port in a UDP datagram.

    The incremental result equals the recomputation, except that a sum of zero comes
    out as 0x0000 from eqn. 3 where UDP must send 0xffff (the caller's job).
    """
    frame = bytes(Eth() / IPv4(src=src, dst=dst) / UDP(sport=sport, dport=dport) / data)
    a = arr(frame)
    l4len = len(frame) - 34
    c = rd16(a, 40)
    c = csum_update32(c, rd32(a, 26), new)
    c = csum_update16(c, rd16(a, 34), (sport + 1) & 0xFFFF)
    wr32(a, 26, new)
    wr16(a, 34, (sport + 1) & 0xFFFF)
    full = l4_checksum(a, 14, 34, l4len, L.PROTO_UDP, False, 6)
    assert full != 0
    assert c == full or (c == 0 and full == 0xFFFF)


@given(csum=port, words=st.lists(st.tuples(port, port), max_size=14))
@example(csum=0, words=[(0, 0xFFFF), (0xFFFF, 2)])  # the first fold carries again
@SETTINGS
def test_csum_apply_folds_any_sum(csum, words):
    """Any number of words' deltas at once: the one's-complement sum folded until
    it fits (written out here as a loop)."""
    acc = ((~csum) & 0xFFFF) + sum(((~o) & 0xFFFF) + n for o, n in words)
    while acc > 0xFFFF:
        acc = (acc & 0xFFFF) + (acc >> 16)
    delta = sum(csum_delta16(o, n) for o, n in words)
    assert csum_apply(csum, delta) == (~acc) & 0xFFFF


@given(tcp=st.booleans(), src=ipv4_addr, dst=ipv4_addr, sport=port, dport=port,
       new=st.tuples(st.integers(0, 2**32 - 1), port, st.integers(0, 2**32 - 1), port),
       keep=st.tuples(st.booleans(), st.booleans(), st.booleans(), st.booleans()),
       data=payload)
@settings(max_examples=300, deadline=None)
def test_csum_apply_whole_tuple_rewrite(tcp, src, dst, sport, dport, new, keep, data):
    """Both addresses and both ports rewritten (any of them kept), each checksum
    updated once by the sum of the fields' deltas: the recomputed checksums (UDP:
    but for a zero sum, as above)."""
    l4h = TCP(sport=sport, dport=dport) if tcp else UDP(sport=sport, dport=dport)
    frame = bytes(Eth() / IPv4(src=src, dst=dst) / l4h / data)
    a = arr(frame)
    l4len = len(frame) - 34
    coff = 34 + (16 if tcp else 6)
    old = (rd32(a, 26), rd16(a, 34), rd32(a, 30), rd16(a, 36))
    to = tuple(o if k else n for o, n, k in zip(old, new, keep))
    ip = csum_delta32(old[0], to[0]) + csum_delta32(old[2], to[2])
    l4 = ip + csum_delta16(old[1], to[1]) + csum_delta16(old[3], to[3])
    ip_c = csum_apply(rd16(a, 24), ip)
    l4_c = csum_apply(rd16(a, coff), l4)
    wr32(a, 26, to[0])
    wr16(a, 34, to[1])
    wr32(a, 30, to[2])
    wr16(a, 36, to[3])
    assert ip_c == ipv4_header_checksum(a, 14)
    full = l4_checksum(a, 14, 34, l4len, L.PROTO_TCP if tcp else L.PROTO_UDP, False,
                       coff - 34)
    assert l4_c == full or (not tcp and l4_c == 0 and full == 0xFFFF)


def test_csum_update_udp_reaching_zero_needs_the_udp_rule():
    """The case the UDP rule is about, pinned down: eqn. 3 yields 0, UDP needs 0xffff."""
    frame = _udp_frame_with_zero_sum(False)
    pkt, l3, l4, l4len = _l4_offsets(frame, SUDP)
    a = arr(frame)
    word = rd16(a, l4 + 8)  # the payload word that made the sum 0xffff
    # start from payload 0 and move to ``word`` incrementally
    a0 = a.copy()
    wr16(a0, l4 + 8, 0)
    c0 = l4_checksum(a0, l3, l4, l4len, L.PROTO_UDP, False, 6)
    assert c0 != 0xFFFF
    assert csum_update16(c0, 0, word) == 0x0000
    assert l4_checksum(a, l3, l4, l4len, L.PROTO_UDP, False, 6) == 0xFFFF


@given(src=ipv6_addr, dst=ipv6_addr, newport=port, data=payload)
@settings(max_examples=200, deadline=None)
def test_csum_update16_tcp_over_ipv6_port_rewrite(src, dst, newport, data):
    frame = bytes(SEth() / SIPv6(src=src, dst=dst) / STCP(sport=1000, dport=80) / data)
    a = arr(frame)
    l4len = len(frame) - 54
    c = csum_update16(rd16(a, 54 + 16), rd16(a, 56), newport)
    wr16(a, 56, newport)
    assert c == l4_checksum(a, 14, 54, l4len, L.PROTO_TCP, True, 16)
    # and scapy agrees on the rewritten segment
    b = Ether(bytes(a))
    del b[STCP].chksum
    assert Ether(bytes(b))[STCP].chksum == c


@given(buf=st.binary(min_size=4, max_size=64).filter(lambda b: len(b) % 2 == 0),
       data=st.data())
@settings(max_examples=400, deadline=None)
def test_csum_update16_generic_buffer(buf, data):
    """Any buffer with a checksum word: update == recompute unless the data becomes all 0."""
    n = len(buf) // 2
    ci = data.draw(st.integers(0, n - 1), label="checksum word")
    wi = data.draw(st.integers(0, n - 1).filter(lambda j: j != ci), label="changed word")
    new = data.draw(st.one_of(st.integers(0, 0xFFFF), st.sampled_from([0, 0xFFFF])),
                    label="new")
    a = arr(buf)
    wr16(a, 2 * ci, 0)
    c = csum_fold(csum_add(a, 0, len(buf), 0))
    old = rd16(a, 2 * wi)
    wr16(a, 2 * wi, new)
    assume(any(a))  # all-zero data: recomputation gives 0xffff, eqn. 3 the other zero
    full = csum_fold(csum_add(a, 0, len(buf), 0))
    assert csum_update16(c, old, new) == full


def test_csum_update16_to_all_zero_data_gives_the_other_zero():
    """Documented corner: when the data becomes all zero, eqn. 3 says 0x0000, a
    recomputation 0xffff; both are one's complement zero, and neither occurs in IP
    (the version nibble / protocol number are never zero)."""
    a = arr(b"\x12\x34\x00\x00")
    c = csum_fold(csum_add(a, 0, 4, 0))
    assert c == (~0x1234) & 0xFFFF
    assert csum_update16(c, 0x1234, 0) == 0x0000
    assert csum_fold(csum_add(arr(bytes(4)), 0, 4, 0)) == 0xFFFF
