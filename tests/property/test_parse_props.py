"""Property tests for dva.packet.parse: arbitrary and mutated frames, hash symmetry."""

from __future__ import annotations

import ipaddress

import numpy as np
from hypothesis import HealthCheck, given, settings
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
from dva.packet.parse import parse

PROPS = settings(max_examples=300, deadline=None,
                 suppress_health_check=[HealthCheck.too_slow])

_POOL = PacketPool(1024)
NBUCKETS = 4096
PARSE_COLS = (L.HASH, L.BUCKET, L.ETYPE, L.VLAN, L.TAGS, L.L3_OFF, L.L4_OFF, L.PROTO,
              L.PFLAGS, L.PERR)


def unfmix32(h: int) -> int:
    """The inverse of murmur3's fmix32 (HASH = fmix32(bucket hash))."""
    h ^= h >> 16
    h = (h * pow(0xC2B2AE35, -1, 2**32)) & 0xFFFFFFFF
    h ^= (h >> 13) ^ (h >> 26)
    h = (h * pow(0x85EBCA6B, -1, 2**32)) & 0xFFFFFFFF
    return h ^ (h >> 16)


def parse_meta(frames, tenants=None, junk_after=None):
    """Parse ``frames`` in one batch; returns the metadata rows (a copy).

    With ``junk_after``, every frame is stored followed by those bytes and its row's
    length is then set back to the frame's: a parser that reads past a frame would
    see them.
    """
    b = PacketBatch(_POOL, max(1, len(frames)))
    try:
        for i, f in enumerate(frames):
            t = 0 if tenants is None else tenants[i]
            if junk_after is None:
                b.add_frame(f, tenant=t)
            else:
                r = b.add_frame(f + junk_after, tenant=t)
                b.meta[r, L.LEN] = len(f)
        parse(b, NBUCKETS)
        return b.meta[: b.n].copy()
    finally:
        b.release_all()


ERR = {name: code for code, name in enumerate(L.PARSE_ERRORS)}
V4_ERRORS = {"ipv4_truncated", "ipv4_bad_version", "ipv4_bad_ihl", "ipv4_bad_total_len",
             "icmp_truncated"}
V6_ERRORS = {"ipv6_truncated", "ipv6_bad_version", "ipv6_ext_truncated", "ipv6_ext_too_many",
             "icmpv6_truncated"}
L4_ERRORS = {"tcp_truncated", "tcp_bad_offset", "udp_truncated", "udp_bad_length"}


def check_row(row, frame):
    """Invariants every parsed row must satisfy, whatever the frame."""
    n = len(frame)
    perr = int(row[L.PERR])
    assert 0 <= perr < len(L.PARSE_ERRORS)
    name = L.PARSE_ERRORS[perr]
    h = int(row[L.HASH])
    assert 0 <= h < 2**32
    assert row[L.BUCKET] == unfmix32(h) & (NBUCKETS - 1)  # HASH = fmix32(bucket hash)
    assert row[L.LEN] == n
    flags = int(row[L.PFLAGS])
    etype, l3, l4, proto = (int(row[c]) for c in (L.ETYPE, L.L3_OFF, L.L4_OFF, L.PROTO))
    tags, vlan = int(row[L.TAGS]), int(row[L.VLAN])
    known = (L.F_L3_OK | L.F_L4_OK | L.F_IPV4 | L.F_IPV6 | L.F_ARP | L.F_IP_OPTIONS
             | L.F_IP_CSUM_BAD | L.F_FRAG | L.F_LATER_FRAG | L.F_ICMP_ERROR | L.F_IPV6_EXT)
    assert flags & ~known == 0
    assert 0 <= tags <= L.MAX_VLAN_TAGS
    assert (vlan == -1) == (tags == 0) and -1 <= vlan <= 0xFFF
    assert (name == "runt") == (n < 14)
    # at most one L3 kind; L4_OK needs L3_OK; a later fragment has no L4 header
    assert bin(flags & (L.F_IPV4 | L.F_IPV6 | L.F_ARP)).count("1") <= 1
    if flags & L.F_L4_OK:
        assert flags & L.F_L3_OK
    if flags & L.F_LATER_FRAG:
        assert flags & L.F_FRAG and l4 == -1
    if flags & (L.F_IP_OPTIONS | L.F_IP_CSUM_BAD):
        assert flags & L.F_IPV4
    if flags & L.F_IPV6_EXT:
        assert flags & L.F_IPV6
    if flags & L.F_ICMP_ERROR:
        assert proto in (L.PROTO_ICMP, L.PROTO_ICMPV6) and flags & L.F_L4_OK
    if l4 != -1:
        assert proto >= 0 and l3 >= 14
    # the error names the layer it is about
    if name in ("vlan_truncated", "vlan_too_many"):
        assert l3 == -1 and flags == 0
    if name.startswith("arp_"):
        assert etype == L.ETH_ARP and flags == 0
    if name in V4_ERRORS:
        assert etype == L.ETH_IPV4
    if name in V6_ERRORS:
        assert etype == L.ETH_IPV6
    if name in L4_ERRORS:
        assert etype in (L.ETH_IPV4, L.ETH_IPV6) and flags & L.F_L3_OK
        assert l4 != -1 and not flags & L.F_L4_OK
        assert proto == (6 if name.startswith("tcp") else 17)
    if perr != 0:
        assert not flags & L.F_L4_OK
        return
    # a clean parse: every offset lies within the frame, headers fit
    assert 14 <= l3 <= n and l3 == 14 + 4 * tags
    assert etype == int.from_bytes(frame[l3 - 2:l3], "big")
    if etype == L.ETH_IPV4:
        assert flags & (L.F_IPV4 | L.F_L3_OK) == L.F_IPV4 | L.F_L3_OK
        ihl = (frame[l3] & 0xF) * 4
        total = int.from_bytes(frame[l3 + 2:l3 + 4], "big")
        assert 20 <= ihl <= total and l3 + total <= n
        assert proto == frame[l3 + 9]
        if l4 != -1:
            assert l4 == l3 + ihl
    elif etype == L.ETH_IPV6:
        assert flags & (L.F_IPV6 | L.F_L3_OK) == L.F_IPV6 | L.F_L3_OK
        end = l3 + 40 + int.from_bytes(frame[l3 + 4:l3 + 6], "big")
        assert end <= n
        if l4 != -1:
            assert l3 + 40 <= l4 <= end
    elif etype == L.ETH_ARP:
        assert flags == L.F_ARP | L.F_L3_OK and l3 + 28 <= n
    else:
        assert flags == 0 and l4 == -1 and proto == -1
    if l4 != -1:
        assert l4 <= n
    if flags & L.F_L4_OK:
        assert proto in (L.PROTO_TCP, L.PROTO_UDP, L.PROTO_ICMP, L.PROTO_ICMPV6)
        assert l4 + 8 <= n
        if proto == L.PROTO_TCP:
            doff = (frame[l4 + 12] >> 4) * 4
            assert 20 <= doff and l4 + doff <= n
        if proto == L.PROTO_UDP:
            ulen = int.from_bytes(frame[l4 + 4:l4 + 6], "big")
            # a first fragment's UDP length covers the whole datagram
            assert 8 <= ulen and (ulen <= n - l4 or flags & L.F_FRAG)


# --------------------------------------------------------------------------------------
# arbitrary bytes

frames_st = st.lists(st.binary(min_size=0, max_size=300), min_size=1, max_size=24)


@given(frames=frames_st, tenant=st.integers(0, 2**32 - 1))
@PROPS
def test_arbitrary_bytes_never_raise_and_keep_invariants(frames, tenant):
    meta = parse_meta(frames, tenants=[tenant] * len(frames))
    assert meta.shape[0] == len(frames)
    for row, f in zip(meta, frames):
        check_row(row, f)


# plausible Ethernet headers in front of arbitrary bytes reach the L3/L4 checks
_ETYPES = [0x0800, 0x86DD, 0x0806, 0x8100, 0x88A8, 0x9100, 0x88B5]
l2_prefixed = st.builds(
    lambda macs, et, body: macs + et.to_bytes(2, "big") + body,
    st.binary(min_size=12, max_size=12), st.sampled_from(_ETYPES),
    st.binary(min_size=0, max_size=200))


@given(frames=st.lists(l2_prefixed, min_size=1, max_size=24))
@PROPS
def test_ethernet_prefixed_garbage_keeps_invariants(frames):
    for row, f in zip(parse_meta(frames), frames):
        check_row(row, f)


# --------------------------------------------------------------------------------------
# mutated valid frames

MAC_A, MAC_B = "02:00:00:00:00:0a", "02:00:00:00:00:0b"
E = Eth(dst=MAC_B, src=MAC_A)
A4, B4 = "10.0.0.1", "10.0.0.2"
A6, B6 = "2001:db8::1", "2001:db8::2"
QUOTE4 = bytes(IPv4(src=A4, dst=B4) / UDP(sport=1, dport=2))[:28]
QUOTE6 = bytes(IPv6(src=A6, dst=B6) / TCP(sport=1, dport=2))[:48]

BASE_FRAMES = [bytes(s) for s in (
    E / IPv4(src=A4, dst=B4) / UDP(sport=1000, dport=53) / Raw(b"hello"),
    E / IPv4(src=A4, dst=B4, options=b"\x07\x07\x04\x00\x00\x00\x00") / TCP(
        sport=1, dport=2, options=b"\x02\x04\x05\xb4"),
    E / IPv4(src=A4, dst=B4, flags="MF", id=3) / TCP(sport=5, dport=6) / Raw(bytes(16)),
    E / IPv4(src=A4, dst=B4, frag=4, proto=17) / Raw(bytes(16)),
    E / IPv4(src=A4, dst=B4) / ICMP(type=8, id=7) / Raw(b"ping"),
    E / IPv4(src="192.0.2.1", dst=A4) / ICMP(type=3, code=3, rest=bytes(4)) / Raw(QUOTE4),
    E / Dot1Q(vid=5) / IPv4(src=A4, dst=B4) / UDP(sport=3, dport=4),
    E / Dot1Q(vid=5, tpid=0x88A8) / Dot1Q(vid=6) / IPv6(src=A6, dst=B6) / UDP(sport=3, dport=4),
    E / IPv6(src=A6, dst=B6) / TCP(sport=443, dport=50000, flags="SA"),
    E / IPv6(src=A6, dst=B6) / IPv6Ext("hop") / IPv6Ext("routing", data=bytes(22))
    / IPv6Ext("dst") / UDP(sport=1, dport=2) / Raw(b"x" * 9),
    E / IPv6(src=A6, dst=B6) / IPv6Ext("frag", offset=0, m=1, ident=9) / TCP(sport=1, dport=2),
    E / IPv6(src=A6, dst=B6) / IPv6Ext("frag", nh=17, offset=3, ident=9) / Raw(bytes(24)),
    E / IPv6(src=A6, dst=B6) / ICMPv6(type=128, id=1) / Raw(bytes(8)),
    E / IPv6(src="2001:db8::fe", dst=A6) / ICMPv6(type=1, rest=bytes(4)) / Raw(QUOTE6),
    E / ARP(op=1, hwsrc=MAC_A, psrc=A4, pdst=B4),
    Eth(dst=MAC_B, src=MAC_A, pad=True) / IPv4(src=A4, dst=B4) / UDP(sport=1, dport=2),
    Eth(dst=MAC_B, src=MAC_A, type=0x88B5) / Raw(bytes(30)),
)]


@st.composite
def mutated_frames(draw):
    base = bytearray(draw(st.sampled_from(BASE_FRAMES)))
    for pos, x in draw(st.lists(st.tuples(st.integers(0, 120), st.integers(1, 255)),
                                max_size=6)):
        base[pos % len(base)] ^= x
    # overwrite a header word with an extreme value now and then
    for pos, v in draw(st.lists(st.tuples(st.integers(12, 100),
                                          st.sampled_from([0, 1, 4, 5, 8, 0xFF, 0x8100,
                                                           0xFFFF])), max_size=2)):
        if pos + 2 <= len(base):
            base[pos:pos + 2] = v.to_bytes(2, "big")
    how = draw(st.sampled_from(["keep", "cut", "extend"]))
    if how == "cut":
        base = base[:draw(st.integers(0, len(base)))]
    elif how == "extend":
        base += draw(st.binary(min_size=1, max_size=60))
    return bytes(base)


@given(frames=st.lists(mutated_frames(), min_size=1, max_size=24))
@PROPS
def test_mutated_frames_never_raise_and_keep_invariants(frames):
    for row, f in zip(parse_meta(frames), frames):
        check_row(row, f)


def test_unmutated_base_frames_parse_cleanly():
    meta = parse_meta(BASE_FRAMES)
    for row, f in zip(meta, BASE_FRAMES):
        assert row[L.PERR] == 0, L.PARSE_ERRORS[row[L.PERR]]
        check_row(row, f)


@given(frames=st.lists(st.one_of(mutated_frames(), st.binary(max_size=120)), min_size=1,
                       max_size=24),
       junk=st.binary(min_size=64, max_size=64).filter(any))
@PROPS
def test_parse_never_reads_past_the_frame(frames, junk):
    """The same frames with other bytes after them in the slot parse identically."""
    clean = parse_meta(frames)
    dirty = parse_meta(frames, junk_after=junk)
    assert np.array_equal(clean[:, PARSE_COLS], dirty[:, PARSE_COLS])


@given(frames=st.lists(mutated_frames(), min_size=1, max_size=24),
       tenant=st.integers(0, 2**40))
@PROPS
def test_parse_is_deterministic_and_independent_of_batch_neighbours(frames, tenant):
    together = parse_meta(frames, tenants=[tenant] * len(frames))
    for i, f in enumerate(frames[:4]):
        alone = parse_meta([f], tenants=[tenant])
        assert np.array_equal(alone[0, list(PARSE_COLS)], together[i, list(PARSE_COLS)])


@given(frames=st.lists(mutated_frames(), min_size=1, max_size=24),
       trailer=st.binary(min_size=1, max_size=40))
@PROPS
def test_trailer_after_a_clean_ip_packet_changes_nothing(frames, trailer):
    """Ethernet padding/trailers after an IP packet are not part of it (ICMP aside)."""
    before = parse_meta(frames)
    keep = [i for i, r in enumerate(before)
            if r[L.PERR] == 0 and r[L.ETYPE] in (L.ETH_IPV4, L.ETH_IPV6)
            and r[L.PROTO] not in (L.PROTO_ICMP, L.PROTO_ICMPV6)]
    if not keep:
        return
    after = parse_meta([frames[i] + trailer for i in keep])
    assert np.array_equal(before[keep][:, PARSE_COLS], after[:, PARSE_COLS])


# --------------------------------------------------------------------------------------
# symmetric hash over random 5-tuples

v4_addr = st.integers(0, 2**32 - 1).map(lambda v: str(ipaddress.IPv4Address(v)))
v6_addr = st.integers(0, 2**128 - 1).map(lambda v: str(ipaddress.IPv6Address(v)))
port = st.integers(0, 0xFFFF)


@st.composite
def flow_pairs(draw):
    v6 = draw(st.booleans())
    a = draw(v6_addr if v6 else v4_addr)
    b = draw(st.one_of(st.just(a), v6_addr if v6 else v4_addr))  # sometimes a == b
    sp, dp = draw(port), draw(port)
    l4 = draw(st.sampled_from(["tcp", "udp"]))
    vlan = draw(st.one_of(st.none(), st.integers(0, 4095)))
    body = draw(st.binary(max_size=20))

    def frame(src, dst, s, d, fwd):
        e = Eth(dst=MAC_B, src=MAC_A) if fwd else Eth(dst=MAC_A, src=MAC_B)
        seg = (TCP(sport=s, dport=d) if l4 == "tcp" else UDP(sport=s, dport=d)) / Raw(body)
        ip = IPv6(src=src, dst=dst) if v6 else IPv4(src=src, dst=dst)
        return bytes((e / Dot1Q(vid=vlan) if vlan is not None else e) / ip / seg)

    return frame(a, b, sp, dp, True), frame(b, a, dp, sp, False)


@given(pairs=st.lists(flow_pairs(), min_size=1, max_size=16),
       tenant=st.integers(0, 2**32 - 1))
@PROPS
def test_flow_hash_is_symmetric_for_random_5_tuples(pairs, tenant):
    frames = [f for p in pairs for f in p]
    meta = parse_meta(frames, tenants=[tenant] * len(frames))
    for i in range(0, len(frames), 2):
        fwd, rev = meta[i], meta[i + 1]
        assert fwd[L.PERR] == rev[L.PERR] == 0
        assert fwd[L.PFLAGS] & L.F_L4_OK
        assert fwd[L.HASH] == rev[L.HASH]
        assert fwd[L.BUCKET] == rev[L.BUCKET]


@given(pair=flow_pairs(), t1=st.integers(0, 2**32 - 1), t2=st.integers(0, 2**32 - 1))
@settings(max_examples=300, deadline=None)
def test_flow_hash_depends_on_tenant(pair, t1, t2):
    if t1 == t2:
        return
    meta = parse_meta([pair[0], pair[0]], tenants=[t1, t2])
    # a 32-bit collision between two given tenants: ~2**-32 per example
    assert meta[0, L.HASH] != meta[1, L.HASH]
