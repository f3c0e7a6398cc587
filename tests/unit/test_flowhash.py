"""Tests for the symmetric flow hash computed by dva.packet.parse (HASH and BUCKET)."""

from __future__ import annotations

import ipaddress
import random
from collections import Counter

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

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
from dva.packet.parse import flow_hash, parse

# --------------------------------------------------------------------------------------
# helpers

_POOL = PacketPool(2048)
_CHUNK = 1024


def parse_rows(frames, tenant=0, nbuckets=4096, tenants=None):
    frames = [bytes(f) for f in frames]
    out = []
    for start in range(0, len(frames), _CHUNK):
        b = PacketBatch(_POOL, _CHUNK)
        try:
            for j, f in enumerate(frames[start:start + _CHUNK]):
                t = tenant if tenants is None else tenants[start + j]
                b.add_frame(f, tenant=t)
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


def hashes(frames, **kw):
    return [r["hash"] for r in parse_rows(frames, **kw)]


# the expected hash of a flow, from the exported ``flow_hash`` kernel over a buffer that
# holds just the two addresses: checks that the parser picks the right protocol,
# addresses, ports / identifiers and tenant, without pinning the mixing function


def ref_flow_hash(tenant, proto, src, dst, sport, dport):
    a = src.packed if hasattr(src, "packed") else bytes(src)
    b = dst.packed if hasattr(dst, "packed") else bytes(dst)
    buf = np.frombuffer(b"\xee" * 3 + a + b + b"\xee" * 3, dtype=np.uint8).copy()
    return int(flow_hash(buf, tenant, proto, 3, 3 + len(a), len(a), sport, dport))


def ref_echo_hash(tenant, proto, src, dst, ident):
    """ICMP echo: the identifier is added to the bucket hash of the address pair."""
    from dva.packet.parse import flow_lin, hash_final
    a = src.packed if hasattr(src, "packed") else bytes(src)
    b = dst.packed if hasattr(dst, "packed") else bytes(dst)
    buf = np.frombuffer(b"\xee" * 3 + a + b + b"\xee" * 3, dtype=np.uint8).copy()
    lin = int(flow_lin(buf, tenant, proto, 3, 3 + len(a), len(a), 0, 0))
    return int(hash_final((lin + ident) & 0xFFFFFFFF))


ip4 = ipaddress.IPv4Address
ip6 = ipaddress.IPv6Address

MAC_A = "02:00:00:00:00:0a"
MAC_B = "02:00:00:00:00:0b"
A4, B4, R4 = "10.0.0.1", "172.16.5.9", "192.0.2.254"
A6, B6, R6 = "2001:db8::1", "2001:db8:1::99", "2001:db8:ff::fe"


def eth(fwd=True):
    return Eth(dst=MAC_B, src=MAC_A) if fwd else Eth(dst=MAC_A, src=MAC_B)


def v4(src, dst, l4, fwd=True, **kw):
    return bytes(eth(fwd) / IPv4(src=src, dst=dst, **kw) / l4)


def v6(src, dst, l4, fwd=True, **kw):
    return bytes(eth(fwd) / IPv6(src=src, dst=dst, **kw) / l4)


# --------------------------------------------------------------------------------------
# exact values against the model


def test_hash_values_match_reference_model():
    tenant = 0x1234_5678_9  # wider than 32 bits: only the low 32 count
    cases = [
        (v4(A4, B4, TCP(sport=40000, dport=443)),
         ref_flow_hash(tenant, 6, ip4(A4), ip4(B4), 40000, 443)),
        (v4(B4, A4, UDP(sport=53, dport=5353) / Raw(b"x")),
         ref_flow_hash(tenant, 17, ip4(B4), ip4(A4), 53, 5353)),
        (v6(A6, B6, TCP(sport=1, dport=65535)),
         ref_flow_hash(tenant, 6, ip6(A6), ip6(B6), 1, 65535)),
        (v6(A6, B6, UDP(sport=65535, dport=0)),
         ref_flow_hash(tenant, 17, ip6(A6), ip6(B6), 65535, 0)),
        (v4(A4, B4, ICMP(type=8, id=0xBEEF, seq=3)),
         ref_echo_hash(tenant, 1, ip4(A4), ip4(B4), 0xBEEF)),
        (v6(A6, B6, ICMPv6(type=129, id=77)),
         ref_echo_hash(tenant, 58, ip6(A6), ip6(B6), 77)),
        (v4(A4, B4, ICMP(type=9, rest=b"\x01\x02\x03\x04")),  # router advert: no ports
         ref_flow_hash(tenant, 1, ip4(A4), ip4(B4), 0, 0)),
        (v4(A4, B4, Raw(bytes(8)), proto=47),  # GRE: no ports
         ref_flow_hash(tenant, 47, ip4(A4), ip4(B4), 0, 0)),
        (v4(A4, B4, UDP(sport=7, dport=9), flags="MF", id=5),  # fragment: ports 0
         ref_flow_hash(tenant, 17, ip4(A4), ip4(B4), 0, 0)),
        (bytes(eth() / ARP(op=1, hwsrc=MAC_A, psrc=A4, pdst=B4)),
         ref_flow_hash(tenant, 0, ip4(A4), ip4(B4), 0, 0)),
        (v6(A6, B6, IPv6Ext("dst")),  # no next header: protocol 59, no ports
         ref_flow_hash(tenant, 59, ip6(A6), ip6(B6), 0, 0)),
    ]
    rows = parse_rows([f for f, _ in cases], tenant=tenant)
    for i, ((_frame, want), row) in enumerate(zip(cases, rows)):
        assert row["err"] == "ok", i
        assert row["hash"] == want, i


def test_l2_hash_of_non_ip_and_malformed_frames():
    """Non-IP and malformed frames hash their MAC pair (either order) and ethertype."""
    def l2(dst, src, etype, body):
        return bytes(Eth(dst=dst, src=src, type=etype) / Raw(body))

    base = l2(MAC_B, MAC_A, 0x88B5, bytes(46))
    h = hashes([
        base,
        l2(MAC_A, MAC_B, 0x88B5, b"\x11" * 46),  # reverse direction, other payload
        l2(MAC_B, MAC_A, 0x88B6, bytes(46)),  # other ethertype
        l2(MAC_B, "02:00:00:00:00:0c", 0x88B5, bytes(46)),  # other MAC
    ], tenant=3)
    assert h[0] == h[1]
    assert len({h[0], h[2], h[3]}) == 3
    # an IPv4 header that cannot be parsed: its addresses do not matter, the MACs do
    bad = bytearray(v4(A4, B4, UDP(sport=1, dport=2)))
    bad[14] = 0x35  # version 3
    bad2 = bytearray(v4(R4, B4, UDP(sport=9, dport=2)))
    bad2[14] = 0x35
    rows = parse_rows([bytes(bad), bytes(bad2), v4(A4, B4, UDP(sport=1, dport=2))])
    assert rows[0]["err"] == rows[1]["err"] == "ipv4_bad_version"
    assert rows[0]["hash"] == rows[1]["hash"] != rows[2]["hash"]


@given(a=st.binary(min_size=16, max_size=16), b=st.binary(min_size=16, max_size=16),
       sport=st.integers(0, 0xFFFF), dport=st.integers(0, 0xFFFF),
       tenant=st.integers(0, 2**32 - 1), proto=st.integers(0, 255), v6=st.booleans())
@settings(max_examples=300, deadline=None)
def test_flow_hash_kernel_is_symmetric_and_32_bit(a, b, sport, dport, tenant, proto, v6):
    if not v6:
        a, b = a[:4], b[:4]
    fwd = ref_flow_hash(tenant, proto, a, b, sport, dport)
    assert fwd == ref_flow_hash(tenant, proto, b, a, dport, sport)
    assert 0 <= fwd < 2**32
    # only the low 32 bits of the tenant count
    assert fwd == ref_flow_hash(tenant + 2**32, proto, a, b, sport, dport)


@pytest.mark.parametrize("proto_layer", ["tcp", "udp"])
def test_vlan_tags_do_not_change_the_flow_hash(proto_layer):
    l4 = TCP(sport=1, dport=2) if proto_layer == "tcp" else UDP(sport=1, dport=2)
    plain = bytes(eth() / IPv4(src=A4, dst=B4) / l4)
    tagged = bytes(eth() / Dot1Q(vid=10) / IPv4(src=A4, dst=B4) / l4)
    qinq = bytes(eth() / Dot1Q(vid=10, tpid=0x88A8) / Dot1Q(vid=20) / IPv4(src=A4, dst=B4) / l4)
    h = hashes([plain, tagged, qinq])
    assert h[0] == h[1] == h[2]


# --------------------------------------------------------------------------------------
# symmetry


def _flows():
    rnd = random.Random(1234)
    out = []
    for _ in range(50):
        a4 = str(ip4(rnd.getrandbits(32)))
        b4 = str(ip4(rnd.getrandbits(32)))
        a6 = str(ip6(rnd.getrandbits(128)))
        b6 = str(ip6(rnd.getrandbits(128)))
        sp, dp = rnd.randrange(65536), rnd.randrange(65536)
        out += [
            (v4(a4, b4, TCP(sport=sp, dport=dp)), v4(b4, a4, TCP(sport=dp, dport=sp), False)),
            (v4(a4, b4, UDP(sport=sp, dport=dp)), v4(b4, a4, UDP(sport=dp, dport=sp), False)),
            (v6(a6, b6, TCP(sport=sp, dport=dp)), v6(b6, a6, TCP(sport=dp, dport=sp), False)),
            (v6(a6, b6, UDP(sport=sp, dport=dp)), v6(b6, a6, UDP(sport=dp, dport=sp), False)),
        ]
    # same address both ways, only the ports tell the directions apart
    out.append((v4(A4, A4, UDP(sport=1, dport=2)), v4(A4, A4, UDP(sport=2, dport=1))))
    out.append((v6(A6, A6, TCP(sport=9, dport=8)), v6(A6, A6, TCP(sport=8, dport=9))))
    # addresses that differ only in the last byte / first byte
    out.append((v6("::1", "::2", TCP(sport=5, dport=5)), v6("::2", "::1", TCP(sport=5, dport=5))))
    out.append((v4("1.0.0.0", "2.0.0.0", UDP(sport=5, dport=6)),
                v4("2.0.0.0", "1.0.0.0", UDP(sport=6, dport=5))))
    return out


def test_tcp_udp_hash_is_symmetric():
    pairs = _flows()
    rows = parse_rows([f for p in pairs for f in p])
    for i in range(0, len(rows), 2):
        fwd, rev = rows[i], rows[i + 1]
        assert fwd["err"] == rev["err"] == "ok"
        assert fwd["hash"] == rev["hash"], i // 2
    # ... but not degenerate: the flows themselves differ
    assert len({rows[i]["hash"] for i in range(0, len(rows), 2)}) == len(rows) // 2


def test_swapping_only_ports_or_only_addresses_changes_the_hash():
    """Symmetric means the endpoint *pairs* are unordered, not addresses and ports apart."""
    base = v4(A4, B4, UDP(sport=1000, dport=2000))
    ports_swapped = v4(A4, B4, UDP(sport=2000, dport=1000))
    addrs_swapped = v4(B4, A4, UDP(sport=1000, dport=2000))  # the reverse of ports_swapped
    other_proto = v4(A4, B4, TCP(sport=1000, dport=2000))
    h = hashes([base, ports_swapped, addrs_swapped, other_proto])
    assert h[1] == h[2]
    assert len({h[0], h[1], h[3]}) == 3


def test_icmp_echo_request_and_reply_share_a_hash():
    frames = [
        v4(A4, B4, ICMP(type=8, id=0x4242, seq=1) / Raw(b"ping")),
        v4(B4, A4, ICMP(type=0, id=0x4242, seq=1) / Raw(b"ping"), False),
        v4(A4, B4, ICMP(type=13, id=0x4242)),  # timestamp request / reply: same rule
        v4(B4, A4, ICMP(type=14, id=0x4242), False),
        v6(A6, B6, ICMPv6(type=128, id=7, seq=1)),
        v6(B6, A6, ICMPv6(type=129, id=7, seq=1), False),
        v4(A4, B4, ICMP(type=8, id=0x4243, seq=1) / Raw(b"ping")),  # other id
        v6(A6, B6, ICMPv6(type=128, id=8, seq=1)),
    ]
    h = hashes(frames)
    assert h[0] == h[1] == h[2] == h[3]
    assert h[4] == h[5]
    assert h[6] != h[0] and h[7] != h[4]
    # the sequence number is not part of the flow
    assert hashes([v4(A4, B4, ICMP(type=8, id=0x4242, seq=999))])[0] == h[0]


def test_arp_request_and_reply_share_a_hash():
    req = bytes(eth() / ARP(op=1, hwsrc=MAC_A, psrc=A4, pdst=B4))
    rep = bytes(Eth(dst=MAC_A, src=MAC_B) / ARP(op=2, hwsrc=MAC_B, psrc=B4, hwdst=MAC_A,
                                                pdst=A4))
    other = bytes(eth() / ARP(op=1, hwsrc=MAC_A, psrc=A4, pdst=R4))
    h = hashes([req, rep, other])
    assert h[0] == h[1] != h[2]


def test_non_ip_frames_hash_symmetrically_over_macs():
    f = bytes(Eth(dst=MAC_B, src=MAC_A, type=0x88CC) / Raw(bytes(46)))
    r = bytes(Eth(dst=MAC_A, src=MAC_B, type=0x88CC) / Raw(b"\xff" * 46))
    o = bytes(Eth(dst=MAC_B, src=MAC_A, type=0x88CD) / Raw(bytes(46)))
    h = hashes([f, r, o])
    assert h[0] == h[1] != h[2]


# --------------------------------------------------------------------------------------
# tenants


def test_tenant_is_part_of_the_hash():
    frame = v4(A4, B4, TCP(sport=1, dport=2))
    rev = v4(B4, A4, TCP(sport=2, dport=1), False)
    tenants = list(range(200)) + [2**32 - 1, 2**31, 1 << 20]
    rows = parse_rows([frame] * len(tenants), tenants=tenants)
    rrows = parse_rows([rev] * len(tenants), tenants=tenants)
    hs = [r["hash"] for r in rows]
    assert len(set(hs)) == len(hs)  # (almost surely) all different
    assert hs == [r["hash"] for r in rrows]  # and symmetric within each tenant
    for t, r in zip(tenants, rows):
        assert r["tenant"] == t
        assert r["hash"] == ref_flow_hash(t, 6, ip4(A4), ip4(B4), 1, 2)


@pytest.mark.parametrize("make", ["arp", "l2", "runt", "v6", "icmp_error"])
def test_tenant_changes_every_kind_of_hash(make):
    frames = {
        "arp": bytes(eth() / ARP(op=1, hwsrc=MAC_A, psrc=A4, pdst=B4)),
        "l2": bytes(Eth(dst=MAC_B, src=MAC_A, type=0x88B5)),
        "runt": b"\x01\x02\x03",
        "v6": v6(A6, B6, UDP(sport=1, dport=2)),
        "icmp_error": icmp4_error(3, bytes(IPv4(src=A4, dst=B4) / UDP(sport=1, dport=2))),
    }
    f = frames[make]
    h = [r["hash"] for r in parse_rows([f] * 3, tenants=[0, 1, 99])]
    assert len(set(h)) == 3


def test_runt_hash_covers_its_bytes():
    h = hashes([b"", b"\x00", b"\x01", b"\x00\x00", bytes(13), bytes(12) + b"\x01"])
    assert len(set(h)) == len(h)


# --------------------------------------------------------------------------------------
# ICMP errors hash as the flow they quote


def icmp4_error(itype, quoted, code=0, fwd=True, rest=bytes(4), quote_len=None):
    q = quoted if quote_len is None else quoted[:quote_len]
    return v4(R4, A4, ICMP(type=itype, code=code, rest=rest) / Raw(q), fwd)


def icmp6_error(itype, quoted, code=0, rest=bytes(4), quote_len=None):
    q = quoted if quote_len is None else quoted[:quote_len]
    return v6(R6, A6, ICMPv6(type=itype, code=code, rest=rest) / Raw(q))


@pytest.mark.parametrize("itype,code", [(3, 3), (3, 4), (11, 0), (4, 0), (5, 1), (12, 0)])
@pytest.mark.parametrize("l4", ["udp", "tcp"])
def test_icmpv4_error_hashes_as_quoted_flow(itype, code, l4):
    seg = UDP(sport=33434, dport=53) / Raw(b"payload!") if l4 == "udp" else \
        TCP(sport=40000, dport=80, seq=123456)
    flow = v4(A4, B4, seg)
    reply = v4(B4, A4, UDP(sport=53, dport=33434) if l4 == "udp" else
               TCP(sport=80, dport=40000, flags="SA"), False)
    quoted = bytes(IPv4(src=A4, dst=B4, ttl=1) / seg)
    full_quote = icmp4_error(itype, quoted, code)
    rfc792_quote = icmp4_error(itype, quoted, code, quote_len=28)  # IP header + 8 bytes
    rows = parse_rows([flow, reply, full_quote, rfc792_quote])
    assert rows[0]["hash"] == rows[1]["hash"]
    for r in rows[2:]:
        assert r["err"] == "ok"
        assert r["pflags"] & L.F_ICMP_ERROR
        assert r["proto"] == 1 and r["l4_off"] == 34
        assert r["hash"] == rows[0]["hash"]
    assert not rows[0]["pflags"] & L.F_ICMP_ERROR


@pytest.mark.parametrize("itype,code,rest", [(1, 4, bytes(4)), (2, 0, b"\x00\x00\x05\x00"),
                                             (3, 0, bytes(4)), (4, 1, b"\x00\x00\x00\x28")])
@pytest.mark.parametrize("l4", ["udp", "tcp"])
def test_icmpv6_error_hashes_as_quoted_flow(itype, code, rest, l4):
    seg = UDP(sport=5000, dport=6000) / Raw(bytes(100)) if l4 == "udp" else \
        TCP(sport=5000, dport=6000)
    flow = v6(A6, B6, seg)
    quoted = bytes(IPv6(src=A6, dst=B6, hlim=1) / seg)
    err = icmp6_error(itype, quoted, code, rest=rest)
    short = icmp6_error(itype, quoted, code, rest=rest, quote_len=44)  # ports only
    rows = parse_rows([flow, err, short])
    for r in rows[1:]:
        assert r["err"] == "ok"
        assert r["pflags"] & L.F_ICMP_ERROR
        assert r["hash"] == rows[0]["hash"]


def test_icmp_error_quoting_an_echo_or_a_fragment():
    echo = v4(A4, B4, ICMP(type=8, id=99, seq=1) / Raw(bytes(16)))
    echo_err = icmp4_error(11, bytes(IPv4(src=A4, dst=B4, ttl=1) / ICMP(type=8, id=99, seq=1)
                                     / Raw(bytes(16))), quote_len=28)
    frag = v4(A4, B4, Raw(bytes(32)), proto=17, frag=100, id=4)
    frag_err = icmp4_error(11, bytes(IPv4(src=A4, dst=B4, proto=17, frag=100, id=4)
                                     / Raw(bytes(32))), code=1, quote_len=28)
    echo6 = v6(A6, B6, ICMPv6(type=128, id=5))
    echo6_err = icmp6_error(3, bytes(IPv6(src=A6, dst=B6) / ICMPv6(type=128, id=5)))
    rows = parse_rows([echo, echo_err, frag, frag_err, echo6, echo6_err])
    assert rows[1]["hash"] == rows[0]["hash"] and rows[1]["pflags"] & L.F_ICMP_ERROR
    assert rows[3]["hash"] == rows[2]["hash"] and rows[3]["pflags"] & L.F_ICMP_ERROR
    assert rows[5]["hash"] == rows[4]["hash"] and rows[5]["pflags"] & L.F_ICMP_ERROR


def test_icmp_error_with_a_useless_quote_hashes_as_itself():
    quoted = bytes(IPv4(src=A4, dst=B4) / UDP(sport=1, dport=2))
    bad_version = bytearray(quoted)
    bad_version[0] = 0x65
    cases = [
        icmp4_error(3, quoted, quote_len=0),  # nothing quoted
        icmp4_error(3, quoted, quote_len=19),  # IP header cut
        icmp4_error(3, quoted, quote_len=23),  # ports cut
        icmp4_error(3, bytes(bad_version)),
        icmp6_error(1, bytes(IPv6(src=A6, dst=B6) / UDP(sport=1, dport=2)), quote_len=43),
        icmp6_error(1, quoted),  # an IPv4 quote in ICMPv6
    ]
    rows = parse_rows(cases)
    for i, (_frame, r) in enumerate(zip(cases, rows)):
        assert r["err"] == "ok", i
        assert not r["pflags"] & L.F_ICMP_ERROR, i
        if i < 4:
            want = ref_flow_hash(0, 1, ip4(R4), ip4(A4), 0, 0)
        else:
            want = ref_flow_hash(0, 58, ip6(R6), ip6(A6), 0, 0)
        assert r["hash"] == want, i


def test_icmp_informational_messages_are_not_errors():
    frames = [v4(A4, B4, ICMP(type=t, id=1)) for t in (0, 8, 9, 10, 13, 14, 17)]
    frames += [v6(A6, B6, ICMPv6(type=t, id=1)) for t in (128, 129, 133, 134, 135, 136)]
    for r in parse_rows(frames):
        assert r["err"] == "ok" and not r["pflags"] & L.F_ICMP_ERROR


def test_icmp_error_quote_ignores_bytes_after_the_ip_packet():
    quoted = bytes(IPv4(src=A4, dst=B4) / UDP(sport=1000, dport=53))
    err = icmp4_error(3, quoted, quote_len=20)  # IP header only: ports not quoted
    with_trailer = err + quoted[20:24]  # the ports, but outside the IPv4 total length
    rows = parse_rows([err, with_trailer])
    keys = ("hash", "pflags", "perr", "l4_off", "proto")
    assert {k: rows[1][k] for k in keys} == {k: rows[0][k] for k in keys}


# --------------------------------------------------------------------------------------
# fragments


def test_ipv4_fragments_of_one_datagram_share_a_hash():
    first = v4(A4, B4, UDP(sport=1111, dport=2222, len=3008) / Raw(bytes(1472)),
               id=0xABCD, flags="MF")
    middle = v4(A4, B4, Raw(bytes(1480)), proto=17, id=0xABCD, flags="MF", frag=185)
    last = v4(A4, B4, Raw(bytes(48)), proto=17, id=0xABCD, frag=370)
    other_dgram_other_flow = v4(A4, R4, Raw(bytes(48)), proto=17, id=0xABCD, frag=370)
    tcp_first = v4(A4, B4, TCP(sport=1111, dport=2222) / Raw(bytes(100)), flags="MF", id=9)
    tcp_later = v4(A4, B4, Raw(bytes(100)), proto=6, frag=15, id=9)
    rows = parse_rows([first, middle, last, other_dgram_other_flow, tcp_first, tcp_later])
    assert all(r["pflags"] & L.F_FRAG for r in rows)
    assert [bool(r["pflags"] & L.F_LATER_FRAG) for r in rows] == [False, True, True, True,
                                                                   False, True]
    assert rows[0]["hash"] == rows[1]["hash"] == rows[2]["hash"]
    assert rows[3]["hash"] != rows[0]["hash"]
    assert rows[4]["hash"] == rows[5]["hash"] != rows[0]["hash"]  # protocol differs
    # a reverse-direction fragment of the same pair/protocol shares the hash too
    rev = v4(B4, A4, Raw(bytes(8)), proto=17, frag=1, id=1, fwd=False)
    assert parse_one(rev)["hash"] == rows[0]["hash"]


def test_ipv6_fragments_of_one_datagram_share_a_hash():
    first = v6(A6, B6, IPv6Ext("frag", offset=0, m=1, ident=7) / TCP(sport=3, dport=4)
               / Raw(bytes(64)))
    later = v6(A6, B6, IPv6Ext("frag", nh=6, offset=11, m=1, ident=7) / Raw(bytes(64)))
    last = v6(A6, B6, IPv6Ext("hop") / IPv6Ext("frag", nh=6, offset=22, ident=7)
              / Raw(bytes(8)))
    rows = parse_rows([first, later, last])
    assert [r["err"] for r in rows] == ["ok"] * 3
    assert rows[0]["hash"] == rows[1]["hash"] == rows[2]["hash"]
    assert rows[0]["hash"] == ref_flow_hash(0, 6, ip6(A6), ip6(B6), 0, 0)


# --------------------------------------------------------------------------------------
# buckets and spread


@pytest.mark.parametrize("nbuckets", [4096, 64, 1])
def test_bucket_is_the_masked_hash(nbuckets):
    rnd = random.Random(nbuckets)
    frames = [v4(str(ip4(rnd.getrandbits(32))), B4, UDP(sport=rnd.randrange(65536), dport=53))
              for _ in range(300)]
    frames += [b"\x00" * 5, bytes(eth() / ARP(op=1, hwsrc=MAC_A, psrc=A4, pdst=B4))]
    rows = parse_rows(frames, nbuckets=nbuckets)
    ref = parse_rows(frames, nbuckets=4096)
    for r, q in zip(rows, ref):
        assert r["hash"] == q["hash"]  # the bucket count does not change the hash
        assert r["bucket"] == q["bucket"] & (nbuckets - 1)  # the same bucket hash, masked
        assert 0 <= r["hash"] < 2**32


def test_bucket_hash_is_linear_in_the_ports():
    """What a NAT relies on: rewriting an endpoint from (a, p) to (b, bucket_port(..))
    (plus any multiple of the bucket count) keeps the flow's bucket, whatever the
    remote endpoint is."""
    from dva.packet.parse import addr_hash, bucket_port
    rnd = random.Random(3)
    for nbuckets in (4096, 64):
        for _ in range(200):
            a, b = ip4(rnd.getrandbits(32)), ip4(rnd.getrandbits(32))
            remote, rport = ip4(rnd.getrandbits(32)), rnd.randrange(65536)
            port = rnd.randrange(65536)
            ha, hb = int(addr_hash(int(a), 0, 0, 0)), int(addr_hash(int(b), 0, 0, 0))
            new_port = int(bucket_port(ha, port, hb, nbuckets - 1)) \
                + nbuckets * rnd.randrange(0, 65536 // nbuckets)
            inside = parse_one(v4(str(a), str(remote), UDP(sport=port, dport=rport)),
                               nbuckets=nbuckets)
            outside = parse_one(v4(str(remote), str(b), UDP(sport=rport, dport=new_port)),
                                nbuckets=nbuckets)
            assert inside["bucket"] == outside["bucket"]


def _random_udp_flows(n, seed):
    rnd = random.Random(seed)
    return [v4(str(ip4(rnd.getrandbits(32))), str(ip4(rnd.getrandbits(32))),
               UDP(sport=rnd.randrange(65536), dport=rnd.randrange(65536)))
            for _ in range(n)]


def _check_spread(rows, nbuckets=4096):
    counts = Counter(r["bucket"] for r in rows)
    n = len(rows)
    assert max(counts.values()) <= 15, counts.most_common(3)
    assert len(counts) >= 3500
    # chi-square over the buckets: mean n/k, dof 4095, sd ~ 90; allow ~6 sd
    exp = n / nbuckets
    chi2 = sum((counts.get(b, 0) - exp) ** 2 / exp for b in range(nbuckets))
    assert chi2 < nbuckets + 6 * (2 * nbuckets) ** 0.5, chi2
    # every hash bit is set about half the time
    for bit in range(32):
        ones = sum((r["hash"] >> bit) & 1 for r in rows)
        assert 0.45 * n < ones < 0.55 * n, bit


def test_spread_of_random_udp_flows_over_4096_buckets():
    rows = parse_rows(_random_udp_flows(10000, seed=42))
    assert len({r["hash"] for r in rows}) >= 9985  # 32-bit: ~0.01 expected collisions
    _check_spread(rows)


def test_spread_of_sequential_flows_over_4096_buckets():
    """Flows that differ in one low-entropy field (the source port) spread too."""
    frames = [v4(A4, B4, UDP(sport=1024 + i, dport=53)) for i in range(10000)]
    _check_spread(parse_rows(frames))


def test_spread_of_sequential_addresses_over_4096_buckets():
    frames = [v4(str(ip4(0x0A000000 + i)), B4, TCP(sport=40000, dport=443))
              for i in range(10000)]
    _check_spread(parse_rows(frames))
