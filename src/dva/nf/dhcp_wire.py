"""BOOTP/DHCP on the wire for the ``dhcp`` device (:mod:`dva.nf.dhcp`; RFC 2131, 2132).

:func:`parse_request` checks a BOOTP message (length, op, hardware type, chaddr, magic
cookie) and reads the options a server needs into ``msg`` (``F_*`` in
:mod:`dva.nf.dhcp_defs`): message type (53), requested address (50), lease time (51),
server identifier (54), client identifier (61, where it is) and option overload (52:
the ``file`` and ``sname`` fields then hold options too). Every option is length
checked against its area; a known option of the wrong length is ``bad_option``. Pad
options are skipped; an area ends at the END option or at its end.

:func:`client_key` makes the key a client is known by: its client identifier when it
sent one (kept whole up to ``CID_EXACT`` bytes, hashed beyond), else its hardware
address (RFC 2131 section 4.2).

:func:`write_reply` turns the request's frame into the reply in place (the slot is
the packet's own; a reply is at most a few hundred bytes): BOOTP header fields per RFC
2131 table 3 (``xid``, ``flags``, ``chaddr`` kept; ``sname``/``file`` zeroed), options
in the order 53, 54, 51, 58, 59, 1, 28, 3, 6, 15, 61 (the subnet mask before the
router, RFC 2132 section 3.3; the client identifier echoed, RFC 6842), padded to 300
bytes of BOOTP; then UDP 67 -> 68 and IPv4 with their checksums, and Ethernet.
"""

from __future__ import annotations

from dva._jit import i64, kernel
from dva.nf.dhcp_defs import (
    B_CHADDR,
    B_CIADDR,
    B_COOKIE,
    B_FILE,
    B_GIADDR,
    B_HOPS,
    B_OPTIONS,
    B_SECS,
    B_SIADDR,
    B_SNAME,
    B_YIADDR,
    BOOTP_MIN,
    BOOTREPLY,
    BOOTREQUEST,
    CID_EXACT,
    CLIENT_PORT,
    D_BAD_COOKIE,
    D_BAD_HW,
    D_BAD_OPTION,
    D_NO_TYPE,
    D_NOT_REQUEST,
    D_TRUNCATED,
    F_BOOTP,
    F_CID_LEN,
    F_CID_OFF,
    F_LEASE,
    F_OVERLOAD,
    F_REQ_IP,
    F_SERVER,
    F_TYPE,
    G_BCAST,
    G_IP,
    G_MAC,
    G_MASK,
    G_ROUTER,
    K_CID,
    K_CID_HASHED,
    K_MAC,
    KEY_WORDS,
    MAGIC_COOKIE,
    NAK,
    NMSG,
    O_BCAST,
    O_CLIENT_ID,
    O_DNS,
    O_DOMAIN,
    O_END,
    O_LEASE,
    O_MASK,
    O_OVERLOAD,
    O_PAD,
    O_REQ_IP,
    O_ROUTER,
    O_SERVER,
    O_T1,
    O_T2,
    O_TYPE,
    SERVER_PORT,
)
from dva.packet import layout as L
from dva.packet.checksum import (
    ipv4_header_checksum,
    l4_checksum,
    rd16,
    rd32,
    rd48,
    wr16,
    wr32,
    wr48,
)

M56 = (1 << 56) - 1
HASH_MUL = 0x100000001B3  # FNV-1a's 64-bit prime; products are taken modulo 2**56


@kernel
def _options(pkt, lo, hi, msg, main):
    """Read the options in ``pkt[lo:hi]`` into ``msg``; a drop reason, or -1 when fine.

    ``main``: this is the options field proper (the only place option 52 may be)."""
    p = lo
    while p < hi:
        code = i64(pkt[p])
        if code == O_PAD:
            p += 1
            continue
        if code == O_END:
            return -1
        if p + 2 > hi:
            return D_BAD_OPTION
        ln = i64(pkt[p + 1])
        d = p + 2
        if d + ln > hi:
            return D_BAD_OPTION
        if code == O_TYPE:
            if ln != 1:
                return D_BAD_OPTION
            msg[F_TYPE] = i64(pkt[d])
        elif code == O_REQ_IP:
            if ln != 4:
                return D_BAD_OPTION
            msg[F_REQ_IP] = rd32(pkt, d)
        elif code == O_LEASE:
            if ln != 4:
                return D_BAD_OPTION
            msg[F_LEASE] = rd32(pkt, d)
        elif code == O_SERVER:
            if ln != 4:
                return D_BAD_OPTION
            msg[F_SERVER] = rd32(pkt, d)
        elif code == O_CLIENT_ID:
            if ln < 2:  # RFC 2132 section 9.14: type and at least one byte
                return D_BAD_OPTION
            msg[F_CID_OFF] = d
            msg[F_CID_LEN] = ln
        elif code == O_OVERLOAD and main:
            if ln != 1 or i64(pkt[d]) < 1 or i64(pkt[d]) > 3:
                return D_BAD_OPTION
            msg[F_OVERLOAD] = i64(pkt[d])
        p = d + ln
    return -1


@kernel
def parse_request(pkt, l4, end, msg):
    """Check the BOOTP request in the UDP payload ``pkt[l4 + 8:end]`` and read its
    options into ``msg``; returns a drop reason, or -1 for a usable request."""
    for k in range(NMSG):
        msg[k] = -1
    b = l4 + 8
    msg[F_BOOTP] = b
    if end - b < B_OPTIONS:
        return D_TRUNCATED
    if i64(pkt[b]) != BOOTREQUEST:
        return D_NOT_REQUEST
    if i64(pkt[b + 1]) != 1 or i64(pkt[b + 2]) != 6:
        return D_BAD_HW
    mac = rd48(pkt, b + B_CHADDR)
    if (mac >> 40) & 1 or mac == 0:
        return D_BAD_HW
    if rd32(pkt, b + B_COOKIE) != MAGIC_COOKIE:
        return D_BAD_COOKIE
    r = _options(pkt, b + B_OPTIONS, end, msg, True)
    if r >= 0:
        return r
    ov = msg[F_OVERLOAD]
    if ov > 0 and (ov & 1):
        r = _options(pkt, b + B_FILE, b + B_COOKIE, msg, False)
        if r >= 0:
            return r
    if ov > 0 and (ov & 2):
        r = _options(pkt, b + B_SNAME, b + B_FILE, msg, False)
        if r >= 0:
            return r
    if msg[F_TYPE] < 0:
        return D_NO_TYPE
    return -1


@kernel
def client_key(pkt, msg, key):
    """The key of the requesting client: client identifier, else hardware address."""
    for w in range(KEY_WORDS):
        key[w] = 0
    n = msg[F_CID_LEN]
    if n < 0:
        key[0] = (K_MAC << 16) | 6
        key[1] = rd48(pkt, msg[F_BOOTP] + B_CHADDR)
        return
    off = msg[F_CID_OFF]
    if n <= CID_EXACT:
        key[0] = (K_CID << 16) | n
        for j in range(n):
            w = 1 + j // 7
            key[w] = (key[w] << 8) | i64(pkt[off + j])
        return
    key[0] = (K_CID_HASHED << 16) | n
    for w in range(1, KEY_WORDS):
        h = (0xCBF29CE484222325 >> 8) ^ w
        for j in range(n):
            h = ((h ^ i64(pkt[off + j])) * HASH_MUL) & M56
        key[w] = h


@kernel
def _opt32(pkt, p, code, value):
    pkt[p] = code
    pkt[p + 1] = 4
    wr32(pkt, p + 2, value)
    return p + 6


@kernel
def reply_length(mtype, lease, cfg, ndns, ndomain, cid_len):
    """Bytes of the reply frame (Ethernet to the end of the BOOTP padding)."""
    n = B_OPTIONS + 3 + 6 + 1  # type, server identifier, END
    if mtype != NAK:
        if lease > 0:
            n += 18
        n += 12  # mask, broadcast address
        if cfg[G_ROUTER] != 0:
            n += 6
        if ndns > 0:
            n += 2 + 4 * ndns
        if ndomain > 0:
            n += 2 + ndomain
    if cid_len > 0:
        n += 2 + cid_len
    if n < BOOTP_MIN:
        n = BOOTP_MIN
    return 14 + 20 + 8 + n


@kernel
def write_reply(pkt, qb, mtype, ciaddr, yiaddr, lease, t1, t2, dst_ip, dst_mac, cfg, dns,
                domain, cid, cid_len, ip_id):
    """Write the reply frame over ``pkt`` (a view of ``reply_length`` bytes from the
    frame's start); ``qb`` is where the request's BOOTP message starts (at or after
    byte 42, where the reply's starts: the header moves down, never over itself).
    ``lease`` 0: no lease options (an INFORM answer). Returns the frame length."""
    flen = pkt.shape[0]
    rb = 42
    for k in range(B_SNAME):  # op .. chaddr; xid, flags and chaddr stay
        pkt[rb + k] = pkt[qb + k]
    pkt[rb] = BOOTREPLY
    pkt[rb + B_HOPS] = 0
    wr16(pkt, rb + B_SECS, 0)
    wr32(pkt, rb + B_CIADDR, ciaddr)
    wr32(pkt, rb + B_YIADDR, yiaddr)
    wr32(pkt, rb + B_SIADDR, 0)
    wr32(pkt, rb + B_GIADDR, 0)
    for k in range(rb + B_SNAME, rb + B_COOKIE):
        pkt[k] = 0
    wr32(pkt, rb + B_COOKIE, MAGIC_COOKIE)
    p = rb + B_OPTIONS
    pkt[p] = O_TYPE
    pkt[p + 1] = 1
    pkt[p + 2] = mtype
    p = _opt32(pkt, p + 3, O_SERVER, cfg[G_IP])
    if mtype != NAK:
        if lease > 0:
            p = _opt32(pkt, p, O_LEASE, lease)
            p = _opt32(pkt, p, O_T1, t1)
            p = _opt32(pkt, p, O_T2, t2)
        p = _opt32(pkt, p, O_MASK, cfg[G_MASK])
        p = _opt32(pkt, p, O_BCAST, cfg[G_BCAST])
        if cfg[G_ROUTER] != 0:
            p = _opt32(pkt, p, O_ROUTER, cfg[G_ROUTER])
        nd = dns.shape[0]
        if nd > 0:
            pkt[p] = O_DNS
            pkt[p + 1] = 4 * nd
            for j in range(nd):
                wr32(pkt, p + 2 + 4 * j, dns[j])
            p += 2 + 4 * nd
        nm = domain.shape[0]
        if nm > 0:
            pkt[p] = O_DOMAIN
            pkt[p + 1] = nm
            for j in range(nm):
                pkt[p + 2 + j] = domain[j]
            p += 2 + nm
    if cid_len > 0:
        pkt[p] = O_CLIENT_ID
        pkt[p + 1] = cid_len
        for j in range(cid_len):
            pkt[p + 2 + j] = cid[j]
        p += 2 + cid_len
    pkt[p] = O_END
    for k in range(p + 1, flen):
        pkt[k] = 0
    # UDP, then IPv4 (the UDP checksum covers the pseudo-header: addresses first)
    ulen = flen - 34
    wr48(pkt, 0, dst_mac)
    wr48(pkt, 6, cfg[G_MAC])
    wr16(pkt, 12, L.ETH_IPV4)
    pkt[14] = 0x45
    pkt[15] = 0
    wr16(pkt, 16, flen - 14)
    wr16(pkt, 18, ip_id & 0xFFFF)
    wr16(pkt, 20, 0)
    pkt[22] = 64
    pkt[23] = L.PROTO_UDP
    wr16(pkt, 24, 0)
    wr32(pkt, 26, cfg[G_IP])
    wr32(pkt, 30, dst_ip)
    wr16(pkt, 24, ipv4_header_checksum(pkt, 14))
    wr16(pkt, 34, SERVER_PORT)
    wr16(pkt, 36, CLIENT_PORT)
    wr16(pkt, 38, ulen)
    wr16(pkt, 40, 0)
    wr16(pkt, 40, l4_checksum(pkt, 14, 34, ulen, L.PROTO_UDP, False, 6))
    return flen


@kernel
def udp_checksum_ok(pkt, l3, l4, ulen):
    """A UDP checksum of 0 means none was computed (RFC 768)."""
    c = rd16(pkt, l4 + 6)
    return c == 0 or c == l4_checksum(pkt, l3, l4, ulen, L.PROTO_UDP, False, 6)


