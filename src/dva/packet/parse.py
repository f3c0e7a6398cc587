"""Length-checked header parsing and the symmetric flow hash, over whole batches.

``parse_batch`` fills the metadata columns of every row (offsets, ethertype, VLAN,
protocol, flags, parse error, flow hash and bucket) from the frame bytes. It never
reads past a frame's length: every header is checked against what is left, and a
frame that does not fit gets a named parse error (``layout.PARSE_ERRORS``) instead.
Parsing never drops; devices decide what a malformed frame means to them (a switch
forwards an IPv4 packet with a bad header, a router does not).

Flow hash: symmetric over tenant + (protocol, address/port pairs), so both directions
of a flow land in one bucket. ICMP errors hash as the flow they quote; echo
request/reply add their identifier to the hash of the address pair (ports 0);
fragments use ports 0 (later fragments carry none); ARP hashes its sender/target
addresses; other frames their MAC pair and ethertype.

Two values per frame: the *bucket hash* ``lin = E(src, sport) + E(dst, dport) +
T(tenant, protocol)`` (mod 2**32) with the endpoint term ``E(x, p) = A(x) + p * M(x)``
(``A`` a hash of the address, ``M(x)`` an odd multiplier derived from it), and
``HASH = fmix32(lin)``; ``BUCKET = lin & (buckets - 1)``. The bucket hash is linear in
each port on purpose: a NAT that rewrites an endpoint from ``(a, p)`` to ``(b, p')``
keeps the flow in its bucket when ``E(b, p') = E(a, p)`` modulo the bucket count,
i.e. ``p' = (E(a, p) - A(b)) / M(b)`` (:func:`bucket_port`), whatever the remote
endpoint is (endpoint-independent mapping): both directions of a translated flow
still reach the worker that owns its state. ``HASH`` mixes every bit for uses that
want a uniform 32-bit value.
"""

from __future__ import annotations

import numpy as np

from dva._jit import i64, inline_copy, inline_kernel, kernel
from dva.packet import layout as L
from dva.packet.checksum import ipv4_header_ok, rd16, rd32

M32 = 0xFFFFFFFF
HASH_SEED = 0x9E3779B9


@kernel
def hash_mix(h, k):
    """One murmur3 round: mix 32-bit word ``k`` into state ``h``."""
    k = (k * 0xCC9E2D51) & M32
    k = ((k << 15) | (k >> 17)) & M32
    k = (k * 0x1B873593) & M32
    h ^= k
    h = ((h << 13) | (h >> 19)) & M32
    return (h * 5 + 0xE6546B64) & M32


@inline_kernel
def hash_final(h):
    h ^= h >> 16
    h = (h * 0x85EBCA6B) & M32
    h ^= h >> 13
    h = (h * 0xC2B2AE35) & M32
    return h ^ (h >> 16)


K1 = 0x5851F42D4C957F2D  # odd 64-bit multipliers below 2**63 (numba types them int64)
K2 = 0x14057B7EF767814F


@inline_kernel
def mulhi32(x, k):
    """Bits 32..63 of x * k: a multiply-shift hash of x. Those bits depend only on the
    product modulo 2**64, so wrapping int64 (compiled) and exact ints (reference)
    agree."""
    return ((x * k) >> 32) & M32


@inline_kernel
def l4_ports(pkt, l4, proto):
    """(source, destination) port of the TCP or UDP header at ``l4``; (0, 0) for any
    other protocol (the flow hash's convention)."""
    if proto == L.PROTO_TCP or proto == L.PROTO_UDP:
        return rd16(pkt, l4), rd16(pkt, l4 + 2)
    return 0, 0


@inline_kernel
def addr_hash(a0, a1, a2, a3):
    """Hash of one address given as four 32-bit words (IPv4: ``a1 = a2 = a3 = 0``).

    Straight-line code on purpose (loops over a variable address length compiled
    several times slower).
    """
    x = mulhi32(a0 | (a1 << 32), K1) ^ a0
    if (a2 | a3) != 0:
        x = mulhi32(x | (a2 << 32), K2) ^ a3
        x = mulhi32(x | (a3 << 32), K1) ^ a2
    return hash_final(x)


@inline_kernel
def endpoint_term(ah, port):
    """``E(x, p) = A(x) + p * M(x)`` from ``ah = A(x)``: ``M`` is odd (invertible
    modulo any power of two), so each port moves the bucket on a full cycle."""
    return (ah + port * ((ah >> 15) | 1)) & M32


@kernel
def term_port(term, ah_new, mask):
    """The port ``p`` (modulo ``mask + 1``) whose endpoint term with address hash
    ``ah_new`` is ``term`` modulo ``mask + 1``."""
    m = (ah_new >> 15) | 1
    inv = m  # Newton's iteration for 1/m modulo 2**32: each step doubles the bits
    for _ in range(5):
        inv = (inv * (2 - m * inv)) & M32
    return (((term - ah_new) & M32) * inv) & mask


@kernel
def bucket_port(ah_old, port, ah_new, mask):
    """The port ``p'`` (modulo ``mask + 1``) that gives the endpoint with address hash
    ``ah_new`` the bucket-hash term of ``(ah_old, port)``: a NAT adds multiples of
    ``mask + 1`` to bring it into its port range."""
    return term_port(endpoint_term(ah_old, port), ah_new, mask)


@kernel
def echo_id(ah_old, ident, ah_new, mask):
    """The ICMP echo identifier (modulo ``mask + 1``) that keeps the bucket when an
    endpoint's address hash changes from ``ah_old`` to ``ah_new`` (the identifier is
    added to the bucket hash once, not as a port)."""
    return (ident + ah_old - ah_new) & mask


@inline_kernel
def hash_words(tenant, proto, alen, a0, a1, a2, a3, b0, b1, b2, b3, sport, dport):
    """The bucket hash (``lin``, module docstring) of tenant + proto +
    {(address a, sport), (address b, dport)}: symmetric because addition does not care
    which endpoint is the source."""
    t = mulhi32((tenant & M32) | (((proto << 8) | alen) << 32), K2)
    return (endpoint_term(addr_hash(a0, a1, a2, a3), sport)
            + endpoint_term(addr_hash(b0, b1, b2, b3), dport) + t) & M32


@kernel
def flow_lin(pkt, tenant, proto, src, dst, alen, sport, dport):
    """Bucket hash of tenant + proto + {(src, sport), (dst, dport)}.

    ``src``/``dst`` are offsets of ``alen``-byte (4 or 16) addresses inside ``pkt``.
    """
    if alen == 16:
        return hash_words(tenant, proto, 16, rd32(pkt, src), rd32(pkt, src + 4),
                          rd32(pkt, src + 8), rd32(pkt, src + 12), rd32(pkt, dst),
                          rd32(pkt, dst + 4), rd32(pkt, dst + 8), rd32(pkt, dst + 12),
                          sport, dport)
    return hash_words(tenant, proto, 4, rd32(pkt, src), 0, 0, 0, rd32(pkt, dst), 0, 0, 0,
                      sport, dport)


# every parsed packet's hash: inlined into the parser (as a call per packet, which
# passes the frame's array field by field, it cost 1.5 of a frame's 20 ns)
_flow_lin_inline = inline_copy(flow_lin)


@kernel
def flow_hash(pkt, tenant, proto, src, dst, alen, sport, dport):
    """``HASH`` of a flow: fmix32 of its bucket hash (see :func:`flow_lin`)."""
    return hash_final(flow_lin(pkt, tenant, proto, src, dst, alen, sport, dport))


@kernel
def _icmp_is_error(proto, itype):
    if proto == L.PROTO_ICMP:
        return itype == 3 or itype == 4 or itype == 5 or itype == 11 or itype == 12
    return itype >= 1 and itype <= 4  # ICMPv6 errors (RFC 4443)


@kernel
def _icmp_is_echo(proto, itype):
    if proto == L.PROTO_ICMP:
        return itype == 0 or itype == 8 or itype == 13 or itype == 14
    return itype == 128 or itype == 129


@kernel
def _quoted_hash(pkt, n, tenant, q, is_v6):
    """Hash of the flow quoted by an ICMP error whose inner IP header is at ``q``
    (``n``: end of the outer IP packet).

    Returns -1 when the quote is too short to name the flow.
    """
    if is_v6:
        if q + 40 > n or (i64(pkt[q]) >> 4) != 6:
            return -1
        proto = i64(pkt[q + 6])
        l4 = q + 40
        src = q + 8
        dst = q + 24
        alen = 16
    else:
        if q + 20 > n or (i64(pkt[q]) >> 4) != 4:
            return -1
        ihl = (i64(pkt[q]) & 0xF) * 4
        if ihl < 20:
            return -1
        proto = i64(pkt[q + 9])
        l4 = q + ihl
        src = q + 12
        dst = q + 16
        alen = 4
        if (rd16(pkt, q + 6) & 0x3FFF) != 0:
            return flow_lin(pkt, tenant, proto, src, dst, alen, 0, 0)
    sport = 0
    dport = 0
    if proto == L.PROTO_TCP or proto == L.PROTO_UDP:
        if l4 + 4 > n:
            return -1
        sport = rd16(pkt, l4)
        dport = rd16(pkt, l4 + 2)
    elif proto == L.PROTO_ICMP or proto == L.PROTO_ICMPV6:
        if l4 + 8 > n:
            return -1
        if _icmp_is_echo(proto, i64(pkt[l4])):
            return (flow_lin(pkt, tenant, proto, src, dst, alen, 0, 0)
                    + rd16(pkt, l4 + 4)) & M32
    return flow_lin(pkt, tenant, proto, src, dst, alen, sport, dport)


@inline_kernel
def _parse_l4(pkt, row, proto, l4, l4len, is_v6):
    """Check the transport header at ``l4`` (``l4len`` bytes of IP payload)."""
    row[L.L4_OFF] = l4
    if proto == L.PROTO_TCP:
        if l4len < 20:
            row[L.PERR] = L.E_TCP_TRUNC
            return
        doff = (i64(pkt[l4 + 12]) >> 4) * 4
        if doff < 20:
            row[L.PERR] = L.E_TCP_OFFSET
            return
        if doff > l4len:
            row[L.PERR] = L.E_TCP_TRUNC
            return
    elif proto == L.PROTO_UDP:
        if l4len < 8:
            row[L.PERR] = L.E_UDP_TRUNC
            return
        ulen = rd16(pkt, l4 + 4)
        # In a first fragment the UDP length covers the whole datagram, not this part.
        if ulen < 8 or (ulen > l4len and (row[L.PFLAGS] & L.F_FRAG) == 0):
            row[L.PERR] = L.E_UDP_LEN
            return
    elif proto == L.PROTO_ICMP and not is_v6:
        if l4len < 8:
            row[L.PERR] = L.E_ICMP_TRUNC
            return
    elif proto == L.PROTO_ICMPV6 and is_v6:
        if l4len < 8:
            row[L.PERR] = L.E_ICMPV6_TRUNC
            return
    else:
        return  # another protocol: offset known, header not ours to check
    row[L.PFLAGS] |= L.F_L4_OK


@inline_kernel
def _ip_hash(pkt, end, row, tenant, src, dst, alen, is_v6):
    """Flow hash of a parsed IPv4/IPv6 packet ending at ``end`` (offsets and flags set).

    Bytes after ``end`` (Ethernet padding, trailers) are never read as a quote.
    """
    proto = row[L.PROTO]
    l4 = row[L.L4_OFF]
    sport = 0
    dport = 0
    if (row[L.PFLAGS] & L.F_L4_OK) != 0 and (row[L.PFLAGS] & L.F_FRAG) == 0:
        if proto == L.PROTO_TCP or proto == L.PROTO_UDP:
            sport = rd16(pkt, l4)
            dport = rd16(pkt, l4 + 2)
        elif proto == L.PROTO_ICMP or proto == L.PROTO_ICMPV6:
            itype = i64(pkt[l4])
            if _icmp_is_error(proto, itype):
                h = _quoted_hash(pkt, end, tenant, l4 + 8, is_v6)
                if h >= 0:
                    row[L.PFLAGS] |= L.F_ICMP_ERROR
                    return h
            elif _icmp_is_echo(proto, itype):
                # the identifier is the same both ways: added once, at no endpoint
                return (flow_lin(pkt, tenant, proto, src, dst, alen, 0, 0)
                        + rd16(pkt, l4 + 4)) & M32
    if proto < 0:
        proto = 0
    return _flow_lin_inline(pkt, tenant, proto, src, dst, alen, sport, dport)


@inline_kernel
def _parse_ipv4(pkt, n, row, off, tenant):
    avail = n - off
    if avail < 20:
        row[L.PERR] = L.E_IPV4_TRUNC
        return -1
    b0 = i64(pkt[off])
    if (b0 >> 4) != 4:
        row[L.PERR] = L.E_IPV4_VERSION
        return -1
    ihl = (b0 & 0xF) * 4
    if ihl < 20:
        row[L.PERR] = L.E_IPV4_IHL
        return -1
    if ihl > avail:
        row[L.PERR] = L.E_IPV4_TRUNC
        return -1
    total = rd16(pkt, off + 2)
    if total < ihl:
        row[L.PERR] = L.E_IPV4_TOTLEN
        return -1
    if total > avail:
        row[L.PERR] = L.E_IPV4_TRUNC
        return -1
    flags = L.F_IPV4 | L.F_L3_OK
    if ihl > 20:
        flags |= L.F_IP_OPTIONS
    if not ipv4_header_ok(pkt, off):
        flags |= L.F_IP_CSUM_BAD
    frag = rd16(pkt, off + 6)
    proto = i64(pkt[off + 9])
    row[L.PROTO] = proto
    if (frag & 0x3FFF) != 0:
        flags |= L.F_FRAG
    row[L.PFLAGS] = flags
    if (frag & 0x1FFF) != 0:
        row[L.PFLAGS] |= L.F_LATER_FRAG
    else:
        _parse_l4(pkt, row, proto, off + ihl, total - ihl, False)
    return _ip_hash(pkt, off + total, row, tenant, off + 12, off + 16, 4, False)


@kernel
def _ipv6_ext(nh):
    return nh == 0 or nh == 43 or nh == 44 or nh == 51 or nh == 60 or nh == 135 \
        or nh == 139 or nh == 140


@kernel
def _parse_ipv6(pkt, n, row, off, tenant):
    avail = n - off
    if avail < 40:
        row[L.PERR] = L.E_IPV6_TRUNC
        return -1
    if (i64(pkt[off]) >> 4) != 6:
        row[L.PERR] = L.E_IPV6_VERSION
        return -1
    end = off + 40 + rd16(pkt, off + 4)
    if end > n:
        row[L.PERR] = L.E_IPV6_TRUNC
        return -1
    row[L.PFLAGS] = L.F_IPV6 | L.F_L3_OK
    nh = i64(pkt[off + 6])
    p = off + 40
    count = 0
    later = False
    while _ipv6_ext(nh):
        count += 1
        if count > L.MAX_IPV6_EXT:
            row[L.PERR] = L.E_IPV6_EXT_MANY
            return -1
        if p + 8 > end:
            row[L.PERR] = L.E_IPV6_EXT_TRUNC
            return -1
        if nh == 44:
            hlen = 8
            row[L.PFLAGS] |= L.F_FRAG
            if (rd16(pkt, p + 2) & 0xFFF8) != 0:
                later = True
        elif nh == 51:
            hlen = (i64(pkt[p + 1]) + 2) * 4
        else:
            hlen = (i64(pkt[p + 1]) + 1) * 8
        if p + hlen > end:
            row[L.PERR] = L.E_IPV6_EXT_TRUNC
            return -1
        row[L.PFLAGS] |= L.F_IPV6_EXT
        nh = i64(pkt[p])
        p += hlen
        if later:
            break
    row[L.PROTO] = nh
    if later:
        row[L.PFLAGS] |= L.F_LATER_FRAG
    elif nh != 59:  # 59: no next header
        _parse_l4(pkt, row, nh, p, end - p, True)
    return _ip_hash(pkt, end, row, tenant, off + 8, off + 24, 16, True)


@kernel
def _l2_hash(pkt, tenant, etype):
    """Symmetric hash of the MAC pair (as two endpoints with 16-bit "ports")."""
    return hash_words(tenant, etype & 0xFFFF, 6, rd32(pkt, 0), 0, 0, 0, rd32(pkt, 6), 0,
                      0, 0, rd16(pkt, 4), rd16(pkt, 10))


@kernel
def parse_frame(pkt, n, row, tenant):
    """Parse one frame of ``n`` bytes into metadata ``row``; returns its bucket hash
    (``lin``; ``HASH`` is ``hash_final(lin)``)."""
    row[L.ETYPE] = -1
    row[L.VLAN] = -1
    row[L.TAGS] = 0
    row[L.L3_OFF] = -1
    row[L.L4_OFF] = -1
    row[L.PROTO] = -1
    row[L.PFLAGS] = 0
    row[L.PERR] = L.E_OK
    if n < 14:
        row[L.PERR] = L.E_RUNT
        h = hash_mix(HASH_SEED, tenant & M32)
        for i in range(n):
            h = hash_mix(h, i64(pkt[i]))
        return hash_final(h)
    etype = rd16(pkt, 12)
    off = 14
    tags = 0
    while etype == L.ETH_VLAN or etype == L.ETH_QINQ or etype == L.ETH_VLAN_OLD:
        if tags == L.MAX_VLAN_TAGS:
            row[L.PERR] = L.E_VLAN_MANY
            break
        if off + 4 > n:
            row[L.PERR] = L.E_VLAN_TRUNC
            break
        if tags == 0:
            row[L.VLAN] = rd16(pkt, off) & 0xFFF
        tags += 1
        etype = rd16(pkt, off + 2)
        off += 4
    row[L.TAGS] = tags
    if row[L.PERR] != L.E_OK:
        return _l2_hash(pkt, tenant, 0)
    row[L.ETYPE] = etype
    row[L.L3_OFF] = off
    h = -1
    if etype == L.ETH_IPV4:
        h = _parse_ipv4(pkt, n, row, off, tenant)
    elif etype == L.ETH_IPV6:
        h = _parse_ipv6(pkt, n, row, off, tenant)
    elif etype == L.ETH_ARP:
        if n - off < 28:
            row[L.PERR] = L.E_ARP_TRUNC
        elif rd16(pkt, off) != 1 or rd16(pkt, off + 2) != L.ETH_IPV4 \
                or i64(pkt[off + 4]) != 6 or i64(pkt[off + 5]) != 4:
            row[L.PERR] = L.E_ARP_UNSUP
        else:
            row[L.PFLAGS] = L.F_ARP | L.F_L3_OK
            h = flow_lin(pkt, tenant, 0, off + 14, off + 24, 4, 0, 0)
    if h < 0:
        h = _l2_hash(pkt, tenant, etype)
    return h


# the same, inlined into the batch loop: as a call per frame it costs about 1.7 ns of
# the parser's 17 per frame (docs/benchmarks.md)
_parse_frame_inline = inline_copy(parse_frame)


@kernel
def parse_batch(data, meta, start_row, end_row, bucket_mask):
    """Parse rows ``[start_row, end_row)`` of ``meta`` in place."""
    for i in range(start_row, end_row):
        row = meta[i]
        s = row[L.START]
        n = row[L.LEN]
        pkt = data[row[L.SLOT], s:s + n]
        h = _parse_frame_inline(pkt, n, row, i64(row[L.TENANT]))
        row[L.HASH] = hash_final(h)
        row[L.BUCKET] = h & bucket_mask


def parse(batch, nbuckets: int = 4096, start_row: int = 0) -> None:
    """Parse the rows of ``batch`` from ``start_row`` on (``nbuckets`` a power of 2)."""
    if nbuckets <= 0 or nbuckets & (nbuckets - 1):
        raise ValueError(f"bucket count must be a power of two, not {nbuckets}")
    parse_batch(batch.pool.data, batch.meta, start_row, batch.n, nbuckets - 1)


def parse_error_name(code: int) -> str:
    return L.PARSE_ERRORS[code]


__all__ = ["parse", "parse_batch", "parse_frame", "flow_hash", "flow_lin", "addr_hash",
           "bucket_port", "echo_id", "endpoint_term",
           "parse_error_name", "np"]
