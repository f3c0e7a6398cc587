"""ICMP errors of the ``router`` device (:mod:`dva.nf.router`; RFC 792, RFC 1812 4.3.2).

:func:`_icmp_error` is called with a row as it arrived (before the TTL is decremented
or anything rewritten), and appends a new frame in a fresh pool slot: Ethernet from
the port the route back to the source leaves by (destination MAC filled in by
``_send`` once the next hop is known: the error is routed, and held, like any packet),
IPv4 with TOS ``ICMP_TOS``, TTL 64, the router's ``misc[M_IP_ID]`` counter as id, the
address of that port as source, and the ICMP header followed by the original IP
header and as much of its datagram as fits in 576 bytes (``QUOTE_MAX``) and in the
slot. Checked in this order, each a reason not to send: a non-first fragment, an ICMP
error about an ICMP error (types 3, 4, 5, 11, 12), no route back to the source
(``icmp_no_route``; a local or broadcast source counts as none), the token bucket
(:func:`_take_token`: ``icmp_rate`` per second, burst ``icmp_rate``;
``icmp_rate_limited``), no row left in the batch (``emit_deferred``), no free slot
(``pool_exhausted``). The caller sets the original row's own drop verdict.
"""

from __future__ import annotations

from dva._jit import i64, kernel
from dva.nf.lpm import lpm_lookup
from dva.nf.router_arp import _send
from dva.nf.router_defs import (
    C_DEFERRED,
    C_ICMP,
    C_ICMP_NO_ROUTE,
    C_ICMP_RATE,
    C_POOL,
    M_IP_ID,
    N_ICMP,
    NH_FWD,
)
from dva.packet import layout as L
from dva.packet.batch import NO_ROW, new_row, take_slot
from dva.packet.checksum import (
    csum_add,
    csum_fold,
    ipv4_header_checksum,
    rd16,
    rd32,
    wr16,
    wr32,
    wr48,
)

QUOTE_MAX = 576 - 20 - 8  # RFC 1812 4.3.2.3: the error fits in 576 bytes
ICMP_TOS = 0xC0  # precedence 6, internetwork control


@kernel
def _take_token(tokens, rate, now):
    """Token bucket (burst = rate): True if an ICMP error may be sent now."""
    if rate <= 0.0:
        return False
    el = now - tokens[1]
    if el > 0.0:
        t = tokens[0] + el * rate
        tokens[0] = t if t < rate else rate
    tokens[1] = now
    if tokens[0] >= 1.0:
        tokens[0] -= 1.0
        return True
    return False


@kernel
def _icmp_error(data, free, top, meta, i, n, total, headroom, itype, icode, port_ip,
                port_mac, tbl24, tbl8, nh_port, nh_gw, nh_kind, rate, st, events, key, now):
    """Append an ICMP error about row ``i`` (unchanged since it arrived), routed back to
    its source, unless the rules or the rate limit forbid it."""
    (akeys, avals, astate, abucket, aexp, ainfo, pkeys, pvals, pstate, pbucket, pexp, pinfo,
     hq_meta, hq_key, hq_time, misc, tokens) = st
    row = meta[i]
    if row[L.PFLAGS] & L.F_LATER_FRAG:
        return total
    s = row[L.START]
    pkt = data[row[L.SLOT], s:s + row[L.LEN]]
    l3 = row[L.L3_OFF]
    if row[L.PROTO] == L.PROTO_ICMP:
        l4 = row[L.L4_OFF]
        if l4 < 0:
            return total
        t = i64(pkt[l4])
        if t == 3 or t == 4 or t == 5 or t == 11 or t == 12:
            return total  # never an error about an error
    src = rd32(pkt, l3 + 12)
    nh = lpm_lookup(tbl24, tbl8, src)
    if nh_kind[nh] != NH_FWD:
        events[C_ICMP_NO_ROUTE] += 1
        return total
    if not _take_token(tokens, rate, now):
        events[C_ICMP_RATE] += 1
        return total
    c = take_slot(free, top, meta, total)
    if c < 0:
        events[C_DEFERRED if c == NO_ROW else C_POOL] += 1
        return total
    p = nh_port[nh]
    q = rd16(pkt, l3 + 2)
    if q > QUOTE_MAX:
        q = QUOTE_MAX
    room = data.shape[1] - headroom - 42
    if q > room:
        q = room
    buf = data[c]
    h = headroom
    wr48(buf, h, 0)  # set when the source's MAC is known
    wr48(buf, h + 6, port_mac[p])
    wr16(buf, h + 12, L.ETH_IPV4)
    ip = h + 14
    buf[ip] = 0x45
    buf[ip + 1] = ICMP_TOS
    wr16(buf, ip + 2, 28 + q)
    wr16(buf, ip + 4, misc[M_IP_ID] & 0xFFFF)
    misc[M_IP_ID] += 1
    wr16(buf, ip + 6, 0)
    buf[ip + 8] = 64
    buf[ip + 9] = L.PROTO_ICMP
    wr16(buf, ip + 10, 0)
    wr32(buf, ip + 12, port_ip[p])
    wr32(buf, ip + 16, src)
    wr16(buf, ip + 10, ipv4_header_checksum(buf, ip))
    ic = ip + 20
    buf[ic] = itype
    buf[ic + 1] = icode
    wr16(buf, ic + 2, 0)
    wr32(buf, ic + 4, 0)
    for b in range(q):
        buf[ic + 8 + b] = pkt[l3 + b]
    wr16(buf, ic + 2, csum_fold(csum_add(buf, ic, 8 + q, 0)))
    new_row(meta, total, c, h, 42 + q, -1, row[L.HOPS], N_ICMP)
    events[C_ICMP] += 1
    r = total
    gw = nh_gw[nh]
    return _send(data, free, top, meta, r, n, total + 1, headroom, p,
                 gw if gw != 0 else src, N_ICMP, port_ip, port_mac, st, events, key, now)
