"""Address translation shared by the devices that rewrite connections (nat, lb).

A translated connection has two conntrack entries (:mod:`dva.nf.conntrack`): **E1**
keyed by the original tuple O (as its first packet arrived) and **E2** keyed by the
translated tuple T (src addr, src port, dst addr, dst port in the original
direction; an ICMP echo's identifier in both ports). An entry's key gives its own
tuple (its endpoints, ordered by the entry's ``F_ORIG_A``: :func:`key_tuple`), so
an entry keeps only the other one (user words ``U_X``: E1 holds T, E2 holds O,
each endpoint packed as ``addr << 16 | port``: :func:`x_tuple`), and one word
``U_META``: the entry's kind, the device ports (ingress of the first packet |
egress << 8, and a device's flags above) and, in E1, until when E2 (and a device's
own side tables) were last made to live. These are conntrack's three device words
(:data:`dva.nf.conntrack.DEVICE_WORDS`), in the record's first cache line with the
key: with tables far larger than the caches a packet costs a miss per line it
touches, and a packet of an established UDP flow translated here reads that line
alone (a record is two lines; both tuples whole took a third). (The lb in DNAT mode
keeps E1 alone: a reply's tuple names its connection through the VIP that lists
the backend, see :mod:`dva.nf.lb`.)

The kernels here rewrite a packet from one space to the other with incremental
checksum updates (RFC 1624), translate ICMP errors about a connection (RFC 5508:
outer address, quoted header, checksums), and keep E2 alive as long as E1. What
runs on every packet of a connection (the rewrite, the refresh check) is inlined
into the devices' kernels: as calls, which pass every array argument field by
field, they cost about 40 ns per packet each.
"""

from __future__ import annotations

from dva._jit import i64, inline_kernel, kernel
from dva.nf.conntrack import F_ORIG_A, V_FLAGS, V_USER, ct_first_line, ct_make_key
from dva.nf.table import AHEAD, is_used, tbl_hash, tbl_lookup, tbl_prefetch, tbl_prefetch_hot
from dva.packet import layout as L
from dva.packet.checksum import (
    csum_add,
    csum_apply,
    csum_delta16,
    csum_delta32,
    csum_fold,
    rd16,
    rd32,
    wr16,
    wr32,
)

U_X = V_USER  # 2 words: the tuple the key does not give (E1: T, E2: O), packed
U_META = V_USER + 2  # kind (bit 0), ports (bits 1 ..), refresh time (ms, bits 18 ..)
NUSER = 3  # user words of a translated connection (a device may add its own after)
KIND_ORIG, KIND_XLAT = 0, 1
PORTS_BITS = 17  # a device's ports word: ingress | egress << 8 | its flags (bit 16)
REFRESH_SHIFT = 1 + PORTS_BITS
SLACK = 2.0  # seconds E2 outlives its connection, beyond the refresh margin
AHEAD_E1 = AHEAD // 2  # rows a decision loop's E1 prefetches run ahead of it


@inline_kernel
def entry_kind(vals, e):
    """KIND_ORIG (E1) or KIND_XLAT (E2)."""
    return vals[e, U_META] & 1


@inline_kernel
def entry_ports(vals, e):
    """The device ports word of entry ``e`` (ingress | egress << 8 | flags)."""
    return (vals[e, U_META] >> 1) & ((1 << PORTS_BITS) - 1)


@inline_kernel
def set_meta(vals, e, kind, ports):
    """Entry ``e``'s kind and ports; its refresh time 0 (due)."""
    vals[e, U_META] = kind | (ports << 1)


@inline_kernel
def set_x(vals, e, sa, sp, da, dp):
    """Entry ``e``'s other tuple (E1: T, E2: O)."""
    vals[e, U_X] = (sa << 16) | sp
    vals[e, U_X + 1] = (da << 16) | dp


@inline_kernel
def x_tuple(vals, e):
    """(src, sport, dst, dport) of the tuple entry ``e`` keeps (E1: T, E2: O)."""
    xs = vals[e, U_X]
    xd = vals[e, U_X + 1]
    return xs >> 16, xs & 0xFFFF, xd >> 16, xd & 0xFFFF


@inline_kernel
def key_tuple(keys, vals, e):
    """(src, sport, dst, dport) of entry ``e``'s own key (E1: O, E2: T), the
    endpoint its ``F_ORIG_A`` names first (:func:`dva.nf.conntrack.ct_make_key`)."""
    k0 = keys[e, 0]
    k1 = keys[e, 1]
    aa = (k0 >> 32) & 0xFFFFFFFF
    ba = k0 & 0xFFFFFFFF
    ap = (k1 >> 16) & 0xFFFF
    bp = k1 & 0xFFFF
    if (vals[e, V_FLAGS] & F_ORIG_A) != 0:
        return aa, ap, ba, bp
    return ba, bp, aa, ap


@inline_kernel
def conn_tuples(keys, vals, e):
    """O then T of the connection of entry ``e`` (E1 or E2): eight values, (src,
    sport, dst, dport) of each."""
    ks, ksp, kd, kdp = key_tuple(keys, vals, e)
    xs, xsp, xd, xdp = x_tuple(vals, e)
    if entry_kind(vals, e) == KIND_XLAT:
        return xs, xsp, xd, xdp, ks, ksp, kd, kdp
    return ks, ksp, kd, kdp, xs, xsp, xd, xdp


@inline_kernel
def l4_csum_off(proto):
    if proto == L.PROTO_TCP:
        return 16
    if proto == L.PROTO_UDP:
        return 6
    return 2  # ICMP


@inline_kernel
def put_tuple(pkt, l3, l4, end, proto, sa, sp, da, dp):
    """Give the header at ``l3`` (transport at ``l4``, bytes up to ``end``) the tuple
    (``sa``, ``sp``, ``da``, ``dp``), with every checksum it covers: each updated
    once for all the fields that changed (RFC 1624 eqn. 3 over their words; a
    one's-complement sum does not care in which order the words change), where a
    field at a time made a chain of dependent updates of each checksum (3 ns of a
    new lb connection's 11 for its rewrite, docs/benchmarks.md). An ICMP
    message has one identifier for both ends: it becomes ``dp``. A protocol other
    than TCP, UDP and ICMP: the addresses alone."""
    ip = 0
    ip_moved = False
    old = rd32(pkt, l3 + 12)
    if old != sa:
        wr32(pkt, l3 + 12, sa)
        ip += csum_delta32(old, sa)
        ip_moved = True
    old = rd32(pkt, l3 + 16)
    if old != da:
        wr32(pkt, l3 + 16, da)
        ip += csum_delta32(old, da)
        ip_moved = True
    if ip_moved:
        wr16(pkt, l3 + 10, csum_apply(rd16(pkt, l3 + 10), ip))
    if proto == L.PROTO_TCP or proto == L.PROTO_UDP:
        d = ip  # the pseudo-header's addresses
        l4_moved = ip_moved
        if l4 + 2 <= end:
            old = rd16(pkt, l4)
            if old != sp:
                wr16(pkt, l4, sp)
                d += csum_delta16(old, sp)
                l4_moved = True
        if l4 + 4 <= end:
            old = rd16(pkt, l4 + 2)
            if old != dp:
                wr16(pkt, l4 + 2, dp)
                d += csum_delta16(old, dp)
                l4_moved = True
    elif proto == L.PROTO_ICMP:
        d = 0  # no pseudo-header
        l4_moved = False
        if l4 + 6 <= end:
            old = rd16(pkt, l4 + 4)
            if old != dp:
                wr16(pkt, l4 + 4, dp)
                d = csum_delta16(old, dp)
                l4_moved = True
    else:
        return
    c = l4 + l4_csum_off(proto)
    if not l4_moved or c + 2 > end:
        return
    cs = rd16(pkt, c)
    if proto == L.PROTO_UDP and cs == 0:
        return  # sent without a checksum
    cs = csum_apply(cs, d)
    wr16(pkt, c, 0xFFFF if (proto == L.PROTO_UDP and cs == 0) else cs)


@inline_kernel
def packet_tuple(pkt, l3, l4, end, proto):
    """(src, sport, dst, dport) of the packet; ICMP echo: the identifier both ways;
    fields beyond ``end`` read as 0."""
    sp = 0
    dp = 0
    if (proto == L.PROTO_TCP or proto == L.PROTO_UDP) and l4 + 4 <= end:
        sp = rd16(pkt, l4)
        dp = rd16(pkt, l4 + 2)
    elif proto == L.PROTO_ICMP and l4 + 6 <= end:
        sp = rd16(pkt, l4 + 4)
        dp = sp
    return rd32(pkt, l3 + 12), sp, rd32(pkt, l3 + 16), dp


@inline_kernel
def _map_endpoint(a, p, fs, fsp, fd, fdp, gs, gsp, gd, gdp):
    """Endpoint (a, p) of tuple F in tuple G: (addr, port)."""
    if a == fs and p == fsp:
        return gs, gsp
    if a == fd and p == fdp:
        return gd, gdp
    return a, p


@inline_kernel
def spaces(keys, vals, e, to_t):
    """The connection's tuples as (from, to) of a rewrite: (O, T) with ``to_t``, else
    (T, O); eight values."""
    os_, osp, od, odp, ts, tsp, td, tdp = conn_tuples(keys, vals, e)
    if to_t:
        return os_, osp, od, odp, ts, tsp, td, tdp
    return ts, tsp, td, tdp, os_, osp, od, odp


@inline_kernel
def translate(pkt, l3, l4, end, proto, keys, vals, e, to_t):
    """Rewrite the packet's tuple from connection ``e``'s O to its T (``to_t``), or
    from T to O."""
    fs, fsp, fd, fdp, gs, gsp, gd, gdp = spaces(keys, vals, e, to_t)
    a, p, b, q = packet_tuple(pkt, l3, l4, end, proto)
    sa, sp = _map_endpoint(a, p, fs, fsp, fd, fdp, gs, gsp, gd, gdp)
    da, dp = _map_endpoint(b, q, fs, fsp, fd, fdp, gs, gsp, gd, gdp)
    put_tuple(pkt, l3, l4, end, proto, sa, sp, da, dp)


@inline_kernel
def translate_first(pkt, l3, l4, end, proto, o_sa, o_sp, o_da, o_dp, sa, sp, da, dp):
    """:func:`translate` of a new connection's first packet, whose tuple is O = (o_sa,
    o_sp, o_da, o_dp), into T = (sa, sp, da, dp), both known to the caller: the same
    rewrite without reading the entry just made back (2 ns of a new lb connection,
    docs/benchmarks.md). An endpoint sending to itself maps both ends to T's source,
    as :func:`translate`'s endpoint matching does."""
    xd = da
    xdp = dp
    if o_da == o_sa and o_dp == o_sp:
        xd = sa
        xdp = sp
    put_tuple(pkt, l3, l4, end, proto, sa, sp, xd, xdp)


@kernel
def icmp_error_xlat(data, row, keys, vals, e):
    """Translate an ICMP error whose quoted packet belongs to connection entry ``e``
    (found by the quoted tuple): the quoted header into the other space of the
    connection, the outer destination (the quoted packet's source) and source (if it
    is the quoted destination) alike, the ICMP checksum recomputed. Returns the port
    toward the quoted packet's source."""
    return icmp_error_xlat_from(data, row, keys, vals, e,
                                entry_kind(vals, e) == KIND_XLAT)


@kernel
def icmp_error_xlat_from(data, row, keys, vals, e, quoted_t):
    """:func:`icmp_error_xlat` with the quoted packet in connection ``e``'s T
    (``quoted_t``) or O, whatever the entry: an error about a translated packet of
    a connection that has no E2 (the lb's DNAT), found through its E1."""
    s = row[L.START]
    pkt = data[row[L.SLOT], s:s + row[L.LEN]]
    l3 = row[L.L3_OFF]
    l4 = row[L.L4_OFF]
    end = l3 + rd16(pkt, l3 + 2)
    q = l4 + 8
    il4 = q + (i64(pkt[q]) & 0xF) * 4
    iproto = i64(pkt[q + 9])
    fs, fsp, fd, fdp, gs, gsp, gd, gdp = spaces(keys, vals, e, not quoted_t)
    qa, qp, ra, rp = packet_tuple(pkt, q, il4, end, iproto)
    from_orig_src = qa == fs and qp == fsp
    nqa, nqp = _map_endpoint(qa, qp, fs, fsp, fd, fdp, gs, gsp, gd, gdp)
    nra, nrp = _map_endpoint(ra, rp, fs, fsp, fd, fdp, gs, gsp, gd, gdp)
    put_tuple(pkt, q, il4, end, iproto, nqa, nqp, nra, nrp)
    # the outer header (its protocol 255 here: addresses alone, no transport
    # checksum; the ICMP checksum is computed afresh below)
    osrc = rd32(pkt, l3 + 12)
    put_tuple(pkt, l3, l4, end, 255, nra if osrc == ra else osrc, 0, nqa, 0)
    wr16(pkt, l4 + 2, 0)
    wr16(pkt, l4 + 2, csum_fold(csum_add(pkt, l4, end - l4, 0)))
    ports = entry_ports(vals, e)
    return (ports & 0xFF) if from_orig_src else ((ports >> 8) & 0xFF)


@inline_kernel
def _prefetch_e1_row(meta, j, state, vals, expires, key2, in_port, cands):
    row = meta[j]
    if in_port >= 0 and row[L.IN_PORT] != in_port:
        return  # before the record: it may not have arrived yet (it was asked for
        # AHEAD - AHEAD_E1 rows ago), and reading it would wait
    c = cands[j]
    if c < 0 or not is_used(state[c]) or entry_kind(vals, c) != KIND_XLAT:
        return
    sa, sp, da, dp = x_tuple(vals, c)  # an E2 keeps O
    ct_make_key(key2, row[L.TENANT], row[L.PROTO], sa, sp, da, dp)
    s = tbl_hash(key2) & (state.shape[0] - 1)
    if ct_first_line(row):
        tbl_prefetch_hot(state, expires, s)
    else:
        tbl_prefetch(state, expires, s)


@inline_kernel
def prefetch_e1_ahead(meta, i, n, state, vals, expires, key2, in_port, cands):
    """Called in row ``i``'s iteration of a decision loop, after
    :func:`dva.nf.table.tbl_prefetch_found_ahead`: for row ``i + AHEAD_E1`` (at row 0
    also for rows ``0 .. AHEAD_E1 - 1``) from port ``in_port`` (or any when -1), if
    its candidate slot ``cands[j]`` holds a translated tuple's entry (E2: a reply, or
    a packet sent to a mapping), prefetch the connection's own entry (E1), which the
    decision loop looks up after translating the packet back. Otherwise that second
    lookup waits for its miss alone. The candidate's record was fetched ``AHEAD -
    AHEAD_E1`` rows ago; E1 then has ``AHEAD_E1`` rows to arrive.

    A hint, not a lookup: a candidate that holds another key with the same control
    byte (one in 64) costs a useless prefetch. The rows' keys are not built and
    compared here: the decision loop's lookups start from the same candidates
    (:func:`dva.nf.conntrack.ct_classify_at`). For a row of
    :func:`dva.nf.conntrack.ct_first_line` only E1's first line is fetched
    (:func:`dva.nf.table.tbl_prefetch_hot`)."""
    if i == 0:
        for j in range(min(AHEAD_E1, n)):
            _prefetch_e1_row(meta, j, state, vals, expires, key2, in_port, cands)
    j = i + AHEAD_E1
    if j < n:
        _prefetch_e1_row(meta, j, state, vals, expires, key2, in_port, cands)


@inline_kernel
def refresh_due(vals, expires, e1, now):
    """E2 (and a device's side entries) outlive connection ``e1`` by a margin of an
    eighth of its current timeout (1 s to 60 s). Returns the new expiry when it is
    time to extend them -- the margin is used up, or it grew past twice that (the
    timeout shrank, e.g. at FIN) -- and records it in E1; else -1.0. A flow thus
    pays the extra lookups about once per margin, not per packet."""
    left = expires[e1] - now
    margin = left / 8.0
    if margin < 1.0:
        margin = 1.0
    elif margin > 60.0:
        margin = 60.0
    meta = vals[e1, U_META]
    until = (meta >> REFRESH_SHIFT) / 1e3
    if until >= expires[e1] + SLACK and until <= expires[e1] + 2.0 * margin + SLACK:
        return -1.0
    exp = expires[e1] + margin + SLACK
    # in whole ms, rounded down: still past expires + SLACK, as margin >= 1 s
    vals[e1, U_META] = (meta & ((1 << REFRESH_SHIFT) - 1)) | (i64(exp * 1e3) << REFRESH_SHIFT)
    return exp


@kernel
def touch_e2(keys, state, expires, info, vals, key2, e1, zone, proto, exp, now):
    """Make E2 of connection ``e1`` live until ``exp``."""
    sa, sp, da, dp = x_tuple(vals, e1)  # E1 keeps T
    ct_make_key(key2, zone, proto, sa, sp, da, dp)
    e2 = tbl_lookup(keys, state, expires, info, key2, now)
    if e2 >= 0 and e2 != e1:
        expires[e2] = exp
