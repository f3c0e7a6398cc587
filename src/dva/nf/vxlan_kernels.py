"""The per-batch kernel of the ``vxlan`` device (:mod:`dva.nf.vxlan`) and its names.

Drop reasons, counters and trace notes (with their indexes), the layout of the
``dv`` / ``fparams`` / ``misc`` arrays, and the kernels: encapsulation (in place,
into the slot's headroom; flood copies in new slots), decapsulation (the outer
headers skipped by moving ``START``), the underlay's ARP (answer, learn next hops,
ask for them) and ICMP echo. The device module holds the config, the state and
the docstring that describes the behaviour.

Rewritten rows are re-described here, not by the engine (it parses only the rows a
device appends): an encapsulated row gets the metadata the parser gives its outer
IPv4/UDP frame (set field by field: every value is known), a decapsulated row is
parsed afresh (:func:`dva.packet.parse.parse_frame`) so the next device sees the
inner frame's offsets, flow hash and bucket.
"""

from __future__ import annotations

from dva._jit import i64, inline_copy, inline_kernel, kernel
from dva.nf.base import drop_code
from dva.nf.router_arp import answer_arp, write_arp_request
from dva.nf.table import (
    I_EXPIRED,
    sorted_find,
    tbl_insert,
    tbl_lookup,
    tbl_lookup_inline,
    tbl_needs_rebuild,
    tbl_sweep,
)
from dva.packet import layout as L
from dva.packet.batch import NO_ROW, new_row, row_copy, take_slot
from dva.packet.checksum import (
    csum_add,
    csum_fold,
    csum_update16,
    ipv4_header_checksum,
    l4_checksum,
    rd16,
    rd32,
    rd48,
    wr16,
    wr32,
    wr48,
)
from dva.packet.parse import K2, hash_final, mulhi32, parse_frame
from dva.packet.pool import pool_copy

DROPS = (
    "runt",  # shorter than an Ethernet header (from the overlay, or inside a VXLAN packet)
    "inner_vlan",  # a VLAN-tagged inner frame (RFC 7348 6.1), unless inner_vlan: true
    "invalid_src_mac",  # inner source MAC multicast, broadcast or zero
    "too_big",  # the encapsulated packet would exceed the underlay mtu
    "no_headroom",  # fewer than 50 bytes before the frame in its slot
    "no_remote",  # to be flooded, but the flood list (remotes) is empty
    "unresolved",  # no next-hop MAC for the remote VTEP yet (an ARP request went out)
    "malformed",  # underlay: a parse error, a UDP datagram too short for VXLAN, bad ARP
    "not_for_me",  # underlay: not to the VTEP's MAC (or broadcast) and IPv4 address
    "unsupported",  # underlay: VLAN-tagged, not IPv4 or ARP, an ARP op not 1 or 2
    "bad_checksum",  # underlay: IPv4 header, a non-zero UDP checksum, an echo request
    "fragment",  # underlay: an IPv4 fragment to the VTEP (RFC 7348 4.3: not reassembled)
    "bad_vxlan",  # a VXLAN header without the I flag
    "unknown_vni",  # a VNI other than the configured one
    "unknown_vtep",  # from a source address that is neither a remote nor a static VTEP
    "not_served",  # IPv4 to the VTEP address that is neither VXLAN nor an echo request
    "arp_not_for_me",  # ARP for another address (an existing neighbour is refreshed)
    "arp_consumed",  # an ARP reply to the VTEP: learned, nothing to forward
)
(D_RUNT, D_INNER_VLAN, D_BAD_SRC, D_TOO_BIG, D_NO_HEADROOM, D_NO_REMOTE, D_UNRESOLVED,
 D_MALFORMED, D_NOT_FOR_ME, D_UNSUPPORTED, D_BAD_CSUM, D_FRAGMENT, D_BAD_VXLAN,
 D_UNKNOWN_VNI, D_UNKNOWN_VTEP, D_NOT_SERVED, D_ARP_OTHER, D_ARP_CONSUMED) = range(len(DROPS))

EVENTS = (
    "learned",  # new inner MAC -> VTEP entries
    "moved",  # a known inner MAC seen behind another VTEP
    "mac_table_full",  # an inner MAC not learned: the table is full (frames to it flood)
    "aged",  # MAC entries removed because they expired
    "flooded",  # frames head-end replicated (broadcast, multicast, unknown unicast)
    "flood_unresolved",  # replicas not sent: that VTEP's next hop is unresolved
    "arp_requests_sent",
    "arp_replies_sent",
    "neighbors_learned",  # next-hop MACs learned by ARP
    "neighbors_updated",  # a next hop answering with another MAC
    "echo_replies",
    "pool_exhausted",  # a replica or ARP request not made: no free slot
    "emit_deferred",  # a replica or ARP request not made: no row left in the batch
)
(C_LEARNED, C_MOVED, C_MAC_FULL, C_AGED, C_FLOODED, C_FLOOD_UNRESOLVED, C_ARP_REQ,
 C_ARP_REPLY, C_NEIGH_LEARNED, C_NEIGH_UPDATED, C_ECHO, C_POOL,
 C_DEFERRED) = range(len(EVENTS))

NOTES = ("", "encapsulated: known unicast", "encapsulated: flooded", "decapsulated",
         "ARP request for me: reply", "ARP reply for me: learned", "ARP not for me",
         "echo reply", "ARP request", "next hop unresolved")
(N_UNICAST, N_FLOOD, N_DECAP, N_ARP_ME, N_ARP_REPLY, N_ARP_OTHER, N_ECHO, N_ARP_REQUEST,
 N_UNRESOLVED) = range(1, len(NOTES))

OVERLAY, UNDERLAY = 0, 1
ENCAP_LEN = 50  # outer Ethernet 14 + IPv4 20 + UDP 8 + VXLAN 8
OUTER_IP_OVERHEAD = 36  # what the mtu (an IP packet size) adds to the inner frame
VXLAN_I = 0x08  # the "VNI valid" flag (RFC 7348 5)
SPORT_BASE = 0xC000  # source ports 49152-65535 (RFC 7348 5, RFC 6335)
ARP_RETRY = 1.0  # seconds between ARP requests for one next hop
M32 = 0xFFFFFFFF

# dv[] (int64): NCFG config words, then the arrays vtep_ip[NV] (sorted), vtep_nh[NV]
# (next-hop index), vtep_csum[NV] (unfolded sum of the outer IPv4 header's constant
# words), vtep_term[NV] (the bucket-hash term of (VTEP address, port): parse.py's
# E(x, p)), flood[NF] (VTEP indexes of the remotes), nh_ip[NN] (sorted),
# static_mac[NS] (sorted), static_vtep[NS], vtep_slots[NVH] (VTEP index + 1 by
# :func:`vtep_slot` of its address, linear probing; 0 empty). One array: each array
# argument of a kernel costs the dispatcher tens of nanoseconds per call.
(G_VNI, G_PORT, G_LOCAL, G_BCAST, G_MAC, G_MTU, G_LEARN, G_VLAN_OK, G_NV, G_NF, G_NN,
 G_NS, G_NVH, G_AH, G_M, G_MINV) = range(16)
NCFG = 16  # G_AH, G_M, G_MINV: the local address's hash A, multiplier M and 1/M mod 2**32
# fparams[] (float64)
F_AGING, F_ARP_TIMEOUT, F_REFRESH = range(3)
# misc[] (int64)
M_IP_ID, M_EPOCH, M_REBUILD = range(3)
# nhc[k] (int64): the per-batch cache of next hop k's MAC
NH_MAC, NH_EPOCH = range(2)


# The MAC table lookup (every packet, both ways: ``tbl_lookup_inline``) and the parse
# of a decapsulated frame, inlined here: as calls, each passed its arrays field by
# field and cost about a tenth of the packet's time.
parse_inner = inline_copy(parse_frame)


@inline_kernel
def vtep_slot(ip, nslots):
    """Home slot of VTEP address ``ip`` in ``vtep_slots`` (``nslots`` a power of 2)."""
    return (((ip * 0x9E3779B1) & M32) >> 12) & (nslots - 1)


@inline_kernel
def vtep_find(vtep_slots, vtep_ip, ip):
    """Index of the VTEP with address ``ip``, or -1: a hash lookup, where a binary
    search's data-dependent branches mispredict on every packet of mixed traffic."""
    n = vtep_slots.shape[0]
    s = vtep_slot(ip, n)
    for _ in range(n):
        j = vtep_slots[s] - 1
        if j < 0:
            return -1
        if vtep_ip[j] == ip:
            return j
        s = (s + 1) & (n - 1)
    return -1


@inline_kernel
def _fold(acc):
    """csum_fold for sums below 2**32, without its loop."""
    acc = (acc & 0xFFFF) + (acc >> 16)
    acc = (acc & 0xFFFF) + (acc >> 16)
    return (~acc) & 0xFFFF


@kernel
def _arp_request(data, free, top, meta, total, headroom, target, cfg, hops, events):
    """Append a broadcast ARP request for ``target`` out the underlay; returns the row
    count (unchanged when no row or slot was free)."""
    c = take_slot(free, top, meta, total)
    if c < 0:
        events[C_DEFERRED if c == NO_ROW else C_POOL] += 1
        return total
    n = write_arp_request(data[c], headroom, cfg[G_MAC], cfg[G_LOCAL], target)
    new_row(meta, total, c, headroom, n, UNDERLAY, hops, N_ARP_REQUEST)
    events[C_ARP_REQ] += 1
    return total + 1


@kernel
def _ask(data, free, top, meta, total, headroom, k, nh_ip, asked, cfg, hops, events, now):
    """ARP for next hop ``k`` unless it was asked for less than ARP_RETRY ago."""
    if now - asked[k] < ARP_RETRY:
        return total
    t = _arp_request(data, free, top, meta, total, headroom, nh_ip[k], cfg, hops, events)
    if t > total:
        asked[k] = now
    return t


@inline_kernel
def _nh_mac(k, nkeys, nvals, nstate, nexp, ninfo, nh_ip, nhc, epoch, key, now):
    """The MAC of next hop ``k`` (0: unresolved), looked up once per batch."""
    if nhc[k, NH_EPOCH] != epoch:
        key[0] = nh_ip[k]
        e = tbl_lookup(nkeys, nstate, nexp, ninfo, key, now)
        nhc[k, NH_MAC] = nvals[e, 0] if e >= 0 else 0
        nhc[k, NH_EPOCH] = epoch
    return nhc[k, NH_MAC]


@inline_kernel
def _stamp_outer(row, lin, bucket_mask):
    """The metadata the parser gives an encapsulated frame (checked against
    parse_batch by the tests): untagged IPv4 without options, DF, UDP; ``lin`` is its
    bucket hash."""
    row[L.ETYPE] = L.ETH_IPV4
    row[L.VLAN] = -1
    row[L.TAGS] = 0
    row[L.L3_OFF] = 14
    row[L.L4_OFF] = 34
    row[L.PROTO] = L.PROTO_UDP
    row[L.PFLAGS] = L.F_IPV4 | L.F_L3_OK | L.F_L4_OK
    row[L.PERR] = L.E_OK
    row[L.HASH] = hash_final(lin)
    row[L.BUCKET] = lin & bucket_mask


@inline_kernel
def _source_port(ihash, ibucket, tenant, v, cfg, vtep_term, bucket_mask):
    """(UDP source port, bucket hash of the outer packet) for an inner frame of flow
    hash ``ihash`` and bucket ``ibucket`` to VTEP ``v``.

    The port is chosen so that the outer packet falls into the inner frame's flow
    bucket (parse.py: the bucket hash is linear in the ports): a receiver that
    dispatches by the outer headers (same tenant id, at most 16384 buckets) hands the
    decapsulated flow to the worker owning its state. Its low bits (up to 14) are
    thereby a function of the inner bucket, the others of the inner flow hash; 0xC000
    is a multiple of any bucket count up to 16384, so the range 49152-65535 keeps it.
    """
    low = bucket_mask & 0x3FFF
    t = mulhi32((tenant & M32) | (((L.PROTO_UDP << 8) | 4) << 32), K2)
    rest = (vtep_term[v] + t) & M32
    want = (ibucket - rest - cfg[G_AH]) & M32
    sport = SPORT_BASE | (ihash & 0x3FFF & ~low) | (((want * cfg[G_MINV]) & M32) & low)
    return sport, (cfg[G_AH] + sport * cfg[G_M] + rest) & M32


@inline_kernel
def _encap(data, row, v, dmac, cfg, vtep_ip, vtep_csum, vtep_term, misc, bucket_mask):
    """Prepend outer Ethernet/IPv4/UDP/VXLAN headers to row's frame, into the slot's
    headroom, for VTEP ``v`` reached at MAC ``dmac``; the row then describes the
    outer frame."""
    slot = row[L.SLOT]
    s = row[L.START]
    length = row[L.LEN]
    buf = data[slot]
    h = s - ENCAP_LEN
    wr48(buf, h, dmac)
    wr48(buf, h + 6, cfg[G_MAC])
    wr16(buf, h + 12, L.ETH_IPV4)
    ip = h + 14
    total = length + OUTER_IP_OVERHEAD
    ident = misc[M_IP_ID] & 0xFFFF
    misc[M_IP_ID] += 1
    wr32(buf, ip, 0x45000000 | total)
    wr32(buf, ip + 4, (ident << 16) | 0x4000)  # DF, no fragment offset
    wr16(buf, ip + 8, 0x4011)  # TTL 64, UDP
    wr16(buf, ip + 10, _fold(vtep_csum[v] + total + ident))
    wr32(buf, ip + 12, cfg[G_LOCAL])
    wr32(buf, ip + 16, vtep_ip[v])
    u = ip + 20
    sport, lin = _source_port(row[L.HASH], row[L.BUCKET], i64(row[L.TENANT]), v, cfg,
                              vtep_term, bucket_mask)
    wr32(buf, u, (sport << 16) | cfg[G_PORT])
    wr32(buf, u + 4, (length + 16) << 16)  # length; checksum 0 (RFC 7348 5)
    wr32(buf, u + 8, VXLAN_I << 24)
    wr32(buf, u + 12, cfg[G_VNI] << 8)
    row[L.START] = h
    row[L.LEN] = length + ENCAP_LEN
    _stamp_outer(row, lin, bucket_mask)


@kernel
def _replica(data, free, top, meta, i, total, v, dmac, ihash, ibucket, cfg, vtep_ip,
             vtep_csum, vtep_term, misc, events, bucket_mask):
    """Append a copy of the encapsulated row ``i`` for VTEP ``v`` (outer destination,
    IP id and checksum, UDP source port rewritten; the inner frame had flow hash
    ``ihash`` and bucket ``ibucket``); returns the row count."""
    if total >= meta.shape[0]:
        events[C_DEFERRED] += 1
        return total
    row = meta[i]
    h = row[L.START]
    c = pool_copy(data, free, top, row[L.SLOT], h, row[L.LEN])
    if c < 0:
        events[C_POOL] += 1
        return total
    buf = data[c]
    ident = misc[M_IP_ID] & 0xFFFF
    misc[M_IP_ID] += 1
    wr48(buf, h, dmac)
    ip = h + 14
    wr16(buf, ip + 4, ident)
    wr32(buf, ip + 16, vtep_ip[v])
    wr16(buf, ip + 10, _fold(vtep_csum[v] + rd16(buf, ip + 2) + ident))
    sport, lin = _source_port(ihash, ibucket, i64(row[L.TENANT]), v, cfg, vtep_term,
                              bucket_mask)
    wr16(buf, ip + 20, sport)
    row_copy(meta, total, meta, i)
    meta[total, L.SLOT] = c
    meta[total, L.VERDICT] = UNDERLAY
    meta[total, L.NOTE] = N_FLOOD
    return total + 1


@inline_kernel
def _learn(mkeys, mvals, mstate, mbucket, mexp, minfo, key, mac, ip, aging, events, now):
    """Inner source ``mac`` is behind VTEP ``ip``."""
    key[0] = mac
    e = tbl_lookup_inline(mkeys, mstate, mexp, minfo, key, now)
    if e >= 0:
        if mvals[e, 0] != ip:
            mvals[e, 0] = ip
            events[C_MOVED] += 1
        mexp[e] = now + aging
        return
    e = tbl_insert(mkeys, mstate, mbucket, mexp, minfo, key, -1, now + aging, now)
    if e < 0:
        events[C_MAC_FULL] += 1
        return
    mvals[e, 0] = ip
    events[C_LEARNED] += 1


@kernel
def _arp_in(data, row, cfg, nh_ip, nhc, epoch, nkeys, nvals, nstate, nbucket, nexp, ninfo,
            arp_timeout, key, events, now):
    """An ARP packet on the underlay: answer requests for the VTEP address, learn
    next hops that ask for it or answer it, refresh ones that already exist."""
    s = row[L.START]
    slot = row[L.SLOT]
    pkt = data[slot, s:s + row[L.LEN]]
    a = row[L.L3_OFF]
    op = rd16(pkt, a + 6)
    sha = rd48(pkt, a + 8)
    spa = rd32(pkt, a + 14)
    tpa = rd32(pkt, a + 24)
    if (sha >> 40) & 1 or sha == 0:
        row[L.VERDICT] = drop_code(D_MALFORMED)
        return
    if op != 1 and op != 2:
        row[L.VERDICT] = drop_code(D_UNSUPPORTED)
        return
    me = cfg[G_LOCAL]
    for_me = tpa == me
    k = sorted_find(nh_ip, spa)  # only next hops are kept
    if k >= 0:
        key[0] = spa
        e = tbl_lookup(nkeys, nstate, nexp, ninfo, key, now)
        if e >= 0:
            if nvals[e, 0] != sha:
                nvals[e, 0] = sha
                events[C_NEIGH_UPDATED] += 1
            nexp[e] = now + arp_timeout
        elif for_me:  # unsolicited ARP for others does not fill the table (RFC 826 merge)
            e = tbl_insert(nkeys, nstate, nbucket, nexp, ninfo, key, -1, now + arp_timeout,
                           now)
            if e >= 0:
                nvals[e, 0] = sha
                events[C_NEIGH_LEARNED] += 1
        if e >= 0:
            nhc[k, NH_MAC] = sha
            nhc[k, NH_EPOCH] = epoch
    if not for_me:
        row[L.VERDICT] = drop_code(D_ARP_OTHER)
        row[L.NOTE] = N_ARP_OTHER
        return
    if op == 2:
        row[L.VERDICT] = drop_code(D_ARP_CONSUMED)
        row[L.NOTE] = N_ARP_REPLY
        return
    row[L.LEN] = answer_arp(data[slot], s, a, cfg[G_MAC], me)
    row[L.VERDICT] = UNDERLAY
    row[L.NOTE] = N_ARP_ME
    events[C_ARP_REPLY] += 1


@kernel
def _echo(data, row, cfg, events):
    """An IPv4 packet to the VTEP that is not VXLAN: answer an echo request (in
    place), drop the rest."""
    s = row[L.START]
    pkt = data[row[L.SLOT], s:s + row[L.LEN]]
    l3 = row[L.L3_OFF]
    l4 = row[L.L4_OFF]
    src = rd32(pkt, l3 + 12)
    if row[L.PROTO] != L.PROTO_ICMP or (row[L.PFLAGS] & L.F_L4_OK) == 0 \
            or i64(pkt[l4]) != 8 or i64(pkt[l4 + 1]) != 0:
        row[L.VERDICT] = drop_code(D_NOT_SERVED)
        return
    if (src >> 24) == 0 or (src >> 29) == 7 or src == cfg[G_BCAST] or (src >> 24) == 127:
        row[L.VERDICT] = drop_code(D_NOT_SERVED)  # nothing answers such a source
        return
    ilen = l3 + rd16(pkt, l3 + 2) - l4
    if csum_fold(csum_add(pkt, l4, ilen, 0)) != 0:
        row[L.VERDICT] = drop_code(D_BAD_CSUM)
        return
    wr48(pkt, 0, rd48(pkt, 6))
    wr48(pkt, 6, cfg[G_MAC])
    wr32(pkt, l3 + 16, src)
    wr32(pkt, l3 + 12, cfg[G_LOCAL])
    pkt[l3 + 8] = 64
    wr16(pkt, l3 + 10, ipv4_header_checksum(pkt, l3))
    old = rd16(pkt, l4)
    pkt[l4] = 0
    wr16(pkt, l4 + 2, csum_update16(rd16(pkt, l4 + 2), old, rd16(pkt, l4)))
    row[L.VERDICT] = UNDERLAY
    row[L.NOTE] = N_ECHO
    events[C_ECHO] += 1


@kernel
def _is_tag(etype):
    return etype == L.ETH_VLAN or etype == L.ETH_QINQ or etype == L.ETH_VLAN_OLD


@inline_kernel
def _decap(data, row, cfg, vtep_ip, vtep_slots, static_mac, mkeys, mvals, mstate, mbucket,
           mexp, minfo, aging, key, events, now, bucket_mask):
    """A UDP datagram to the VTEP's port: check it, learn, strip the outer headers.
    Returns the verdict."""
    s = row[L.START]
    slot = row[L.SLOT]
    pkt = data[slot, s:s + row[L.LEN]]
    l3 = row[L.L3_OFF]
    l4 = row[L.L4_OFF]
    ulen = rd16(pkt, l4 + 4)
    if ulen < 16:
        return drop_code(D_MALFORMED)
    if rd16(pkt, l4 + 6) != 0 and l4_checksum(pkt, l3, l4, ulen, L.PROTO_UDP, False, 6) \
            != rd16(pkt, l4 + 6):
        return drop_code(D_BAD_CSUM)
    if (i64(pkt[l4 + 8]) & VXLAN_I) == 0:
        return drop_code(D_BAD_VXLAN)  # reserved bits are ignored (RFC 7348 5)
    if (rd32(pkt, l4 + 12) >> 8) != cfg[G_VNI]:
        return drop_code(D_UNKNOWN_VNI)
    src = rd32(pkt, l3 + 12)
    if vtep_find(vtep_slots, vtep_ip, src) < 0:
        return drop_code(D_UNKNOWN_VTEP)
    inner = l4 + 16
    ilen = ulen - 16
    if ilen < 14:
        return drop_code(D_RUNT)
    smac = rd48(pkt, inner + 6)
    if (smac >> 40) & 1 or smac == 0:
        return drop_code(D_BAD_SRC)
    if _is_tag(rd16(pkt, inner + 12)) and cfg[G_VLAN_OK] == 0:
        return drop_code(D_INNER_VLAN)
    if cfg[G_LEARN] != 0 and (static_mac.shape[0] == 0 or sorted_find(static_mac, smac) < 0):
        _learn(mkeys, mvals, mstate, mbucket, mexp, minfo, key, smac, src, aging, events,
               now)
    ns = s + inner
    row[L.START] = ns
    row[L.LEN] = ilen
    h = parse_inner(data[slot, ns:ns + ilen], ilen, row, i64(row[L.TENANT]))
    row[L.HASH] = hash_final(h)
    row[L.BUCKET] = h & bucket_mask
    row[L.NOTE] = N_DECAP
    return OVERLAY


@kernel
def vxlan_kernel(data, free, top, meta, n, headroom, dv, fparams, mrec, mfrec, mstate, minfo,
                 nrec, nfrec, nstate, ninfo, asked, nhc, misc, key, events, now,
                 bucket_mask):
    """Decide rows [0, n); append flood replicas and ARP requests. Returns the new row
    count. ``n == 0`` is a tick: ARP for next hops unknown or about to expire.

    ``mrec``/``mfrec`` (``nrec``/``nfrec``) are the MAC (neighbour) table's records
    as int64 and as float64 (:class:`~dva.nf.table.HashTable`: expiry, one key
    word, one value word, bucket), ``mstate``/``nstate`` their control bytes:
    contiguous arrays cost the dispatcher far less than the column views the
    ``tbl_*`` kernels take, which are taken here.
    """
    cfg = dv[:NCFG]
    nv = dv[G_NV]
    nflood = dv[G_NF]
    nnh = dv[G_NN]
    nstatic = dv[G_NS]
    o = NCFG
    vtep_ip = dv[o:o + nv]
    vtep_nh = dv[o + nv:o + 2 * nv]
    vtep_csum = dv[o + 2 * nv:o + 3 * nv]
    vtep_term = dv[o + 3 * nv:o + 4 * nv]
    o += 4 * nv
    flood = dv[o:o + nflood]
    o += nflood
    nh_ip = dv[o:o + nnh]
    o += nnh
    static_mac = dv[o:o + nstatic]
    static_vtep = dv[o + nstatic:o + 2 * nstatic]
    o += 2 * nstatic
    vtep_slots = dv[o:o + dv[G_NVH]]
    mexp = mfrec[:, 0]
    mkeys = mrec[:, 1:2]
    mbucket = mrec[:, 2]
    mvals = mrec[:, 3:4]
    nexp = nfrec[:, 0]
    nkeys = nrec[:, 1:2]
    nbucket = nrec[:, 2]
    nvals = nrec[:, 3:4]

    misc[M_EPOCH] += 1
    epoch = misc[M_EPOCH]
    aging = fparams[F_AGING]
    arp_timeout = fparams[F_ARP_TIMEOUT]
    mtu = cfg[G_MTU]
    aged_before = minfo[I_EXPIRED]
    total = n
    for i in range(n):
        row = meta[i]
        row[L.NOTE] = 0
        perr = row[L.PERR]
        if perr == L.E_RUNT:
            row[L.VERDICT] = drop_code(D_RUNT if row[L.IN_PORT] == OVERLAY else D_MALFORMED)
            continue
        s = row[L.START]
        slot = row[L.SLOT]
        buf = data[slot]
        tagged = row[L.TAGS] > 0 or perr == L.E_VLAN_TRUNC or perr == L.E_VLAN_MANY
        if row[L.IN_PORT] == OVERLAY:
            if tagged and cfg[G_VLAN_OK] == 0:
                row[L.VERDICT] = drop_code(D_INNER_VLAN)
                continue
            smac = rd48(buf, s + 6)
            if (smac >> 40) & 1 or smac == 0:
                row[L.VERDICT] = drop_code(D_BAD_SRC)
                continue
            if row[L.LEN] + OUTER_IP_OVERHEAD > mtu:
                row[L.VERDICT] = drop_code(D_TOO_BIG)
                continue
            if s < ENCAP_LEN:
                row[L.VERDICT] = drop_code(D_NO_HEADROOM)
                continue
            dmac = rd48(buf, s)
            v = -1
            if (dmac >> 40) & 1 == 0:
                if nstatic > 0:
                    j = sorted_find(static_mac, dmac)
                    if j >= 0:
                        v = static_vtep[j]
                if v < 0:
                    key[0] = dmac
                    e = tbl_lookup_inline(mkeys, mstate, mexp, minfo, key, now)
                    if e >= 0:
                        # -1: a VTEP no longer known (a config reload dropped it)
                        v = vtep_find(vtep_slots, vtep_ip, mvals[e, 0])
            if v >= 0:
                k = vtep_nh[v]
                mac = _nh_mac(k, nkeys, nvals, nstate, nexp, ninfo, nh_ip, nhc, epoch, key,
                              now)
                if mac == 0:
                    row[L.VERDICT] = drop_code(D_UNRESOLVED)
                    row[L.NOTE] = N_UNRESOLVED
                    total = _ask(data, free, top, meta, total, headroom, k, nh_ip, asked, cfg,
                                 row[L.HOPS], events, now)
                    continue
                _encap(data, row, v, mac, cfg, vtep_ip, vtep_csum, vtep_term, misc,
                       bucket_mask)
                row[L.VERDICT] = UNDERLAY
                row[L.NOTE] = N_UNICAST
                continue
            # Head-end replication to every remote: the frame itself goes to the first
            # one resolved, copies of it (encapsulated) to the others.
            if nflood == 0:
                row[L.VERDICT] = drop_code(D_NO_REMOTE)
                continue
            sent = False
            missed = 0
            ihash = row[L.HASH]
            ibucket = row[L.BUCKET]
            for j in range(nflood):
                v = flood[j]
                k = vtep_nh[v]
                mac = _nh_mac(k, nkeys, nvals, nstate, nexp, ninfo, nh_ip, nhc, epoch, key,
                              now)
                if mac == 0:
                    missed += 1
                    total = _ask(data, free, top, meta, total, headroom, k, nh_ip, asked, cfg,
                                 row[L.HOPS], events, now)
                elif not sent:
                    _encap(data, row, v, mac, cfg, vtep_ip, vtep_csum, vtep_term, misc,
                           bucket_mask)
                    sent = True
                else:
                    total = _replica(data, free, top, meta, i, total, v, mac, ihash, ibucket,
                                     cfg, vtep_ip, vtep_csum, vtep_term, misc, events,
                                     bucket_mask)
            if sent:
                events[C_FLOODED] += 1
                events[C_FLOOD_UNRESOLVED] += missed
                row[L.VERDICT] = UNDERLAY
                row[L.NOTE] = N_FLOOD
            else:
                # nflood replicas were due: the frame itself is the one drop counted,
                # the others are flood_unresolved
                events[C_FLOOD_UNRESOLVED] += missed - 1
                row[L.VERDICT] = drop_code(D_UNRESOLVED)
                row[L.NOTE] = N_UNRESOLVED
            continue

        # -- underlay ------------------------------------------------------------------
        dmac = rd48(buf, s)
        if dmac != cfg[G_MAC] and dmac != L.BCAST_MAC:
            row[L.VERDICT] = drop_code(D_NOT_FOR_ME)
            continue
        etype = row[L.ETYPE]
        if tagged or (etype != L.ETH_IPV4 and etype != L.ETH_ARP):
            row[L.VERDICT] = drop_code(D_UNSUPPORTED)
            continue
        if perr != L.E_OK:
            row[L.VERDICT] = drop_code(D_MALFORMED)
            continue
        if etype == L.ETH_ARP:
            _arp_in(data, row, cfg, nh_ip, nhc, epoch, nkeys, nvals, nstate, nbucket, nexp,
                    ninfo, arp_timeout, key, events, now)
            continue
        if row[L.PFLAGS] & L.F_IP_CSUM_BAD:
            row[L.VERDICT] = drop_code(D_BAD_CSUM)
            continue
        if dmac == L.BCAST_MAC or rd32(buf, s + row[L.L3_OFF] + 16) != cfg[G_LOCAL]:
            row[L.VERDICT] = drop_code(D_NOT_FOR_ME)
            continue
        if row[L.PFLAGS] & L.F_FRAG:
            row[L.VERDICT] = drop_code(D_FRAGMENT)
            continue
        if row[L.PROTO] == L.PROTO_UDP and (row[L.PFLAGS] & L.F_L4_OK) \
                and rd16(buf, s + row[L.L4_OFF] + 2) == cfg[G_PORT]:
            row[L.VERDICT] = _decap(data, row, cfg, vtep_ip, vtep_slots, static_mac, mkeys,
                                    mvals, mstate, mbucket, mexp, minfo, aging, key, events,
                                    now, bucket_mask)
            continue
        _echo(data, row, cfg, events)
    if n == 0:
        # A tick: ask for next hops not known, or known but about to expire, so that
        # traffic finds them resolved.
        for k in range(nnh):
            key[0] = nh_ip[k]
            e = tbl_lookup(nkeys, nstate, nexp, ninfo, key, now)
            if e < 0 or nexp[e] - now < fparams[F_REFRESH]:
                total = _ask(data, free, top, meta, total, headroom, k, nh_ip, asked, cfg, 0,
                             events, now)
    tbl_sweep(mstate, mexp, minfo, now, 64)
    events[C_AGED] += minfo[I_EXPIRED] - aged_before
    # tables whose tombstones pile up: process() rebuilds them (tested here: two
    # Python calls per batch cost about 2 us)
    misc[M_REBUILD] = tbl_needs_rebuild(mstate, minfo) or tbl_needs_rebuild(nstate, ninfo)
    return total
