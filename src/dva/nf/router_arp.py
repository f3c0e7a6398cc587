"""Next-hop resolution for the ``router`` device (:mod:`dva.nf.router`): ARP in and out,
the hold queue and the release of held packets.

A row leaves through :func:`_send`: if its next hop (key ``port << 32 | address``) is
in the ARP cache its MACs are set and its verdict is the egress port; if not it is
held (:func:`_hold`).

Hold queue (``RouterState.hq_meta``, ``hq_key``, ``hq_time``; ``misc[M_HQN]`` rows
used): a held packet's whole metadata row is copied into it with its next-hop key and
the time it was held, in arrival order, at most ``arp_queue`` rows; the packet's own
row gets the verdict ``HOLD`` (the router keeps its slot). Full: the packet is dropped
``arp_queue_full``. Rows leave the queue by being appended to the batch again, as
rows after the input rows: released with the next hop's MAC, or dropped
``arp_timeout`` after ``arp_hold`` seconds (:func:`_scan`). A queue that is compacted
in place keeps the order of the rows that stay.

Pending table (``RouterState.pending``, key as above -> (held packets, time of the
last ARP request in microseconds)): an entry per next hop with packets in the queue,
which never expires (``FOREVER``) and is deleted when its last packet leaves
(:func:`_pending_done`); the first packet held for a next hop sends the ARP request
(``NEVER_US`` as its time if no request could be made, so that the next scan asks at
once). A next hop that finds the queue full gets an entry with no packets that
expires after ``ARP_RETRY``: it is still ARPed for, at most that often, so one dead
gateway filling the queue cannot keep other next hops from resolving. The table holds
2 x ``arp_queue`` entries: one per held packet plus those.

ARP in (:func:`_arp_in`): validated, a request for the ingress port's address is
answered by rewriting the frame into the reply; the sender is learned (created only by
an ARP for the router, else only refreshed) by :func:`_learn`, which releases the
packets held for it.

Ordering guarantees. Held packets leave in the order they arrived, and before any
later packet to the same next hop, although they leave as appended rows (after every
input row of the batch). When a next hop with held packets is resolved while input
rows remain (:func:`_learn` on ARP, or :func:`_send` finding the entry in the cache,
e.g. one that replication brought), :func:`_release` appends them and marks the ARP
entry (``vals[e, 1]``) and ``misc[M_REL_EPOCH]`` with the batch number
``misc[M_EPOCH]``; an input row later in the same batch to a next hop released in
this batch is then itself appended, after them (its input row gets ``HOLD``, its copy
the egress port). Rows appended already (an ICMP error) need no such care, nor does
:func:`_scan`, which runs after the input rows. ``router_kernel`` takes its inline
fast path only when no packet is held and nothing was released in this batch. A
release or an ARP request that finds no row left in the batch waits for a later batch
or tick: the held rows stay in the queue, in order.
"""

from __future__ import annotations

from dva._jit import i64, kernel
from dva.nf.base import HOLD, drop_code
from dva.nf.router_defs import (
    ARP_RETRY,
    C_ARP_FULL,
    C_ARP_LEARNED,
    C_ARP_REPLY,
    C_ARP_REQ,
    C_ARP_UPDATED,
    C_DEFERRED,
    C_POOL,
    C_RELEASED,
    D_ARP_CONSUMED,
    D_ARP_OTHER,
    D_ARP_TIMEOUT,
    D_MALFORMED,
    D_QUEUE_FULL,
    D_UNSUPPORTED,
    M32,
    M_EPOCH,
    M_HQN,
    M_REL_EPOCH,
    N_ARP_ME,
    N_ARP_OTHER,
    N_ARP_REPLY,
    N_ARP_REQUEST,
    N_HELD,
    N_RELEASED,
    N_TIMEOUT,
)
from dva.nf.table import tbl_delete, tbl_insert, tbl_lookup
from dva.packet import layout as L
from dva.packet.batch import NO_ROW, new_row, row_copy, take_slot
from dva.packet.checksum import rd16, rd32, rd48, wr16, wr32, wr48

ARP_RETRY_US = int(ARP_RETRY * 1e6)
NEVER_US = -(1 << 60)
FOREVER = 1e18  # pending entries are deleted explicitly, never expire


@kernel
def write_arp_request(buf, h, mac, ip, target):
    """A broadcast ARP request from (``mac``, ``ip``) for ``target``, written at ``h``;
    returns its length (60: padded to the Ethernet minimum)."""
    wr48(buf, h, L.BCAST_MAC)
    wr48(buf, h + 6, mac)
    wr16(buf, h + 12, L.ETH_ARP)
    wr16(buf, h + 14, 1)
    wr16(buf, h + 16, L.ETH_IPV4)
    buf[h + 18] = 6
    buf[h + 19] = 4
    wr16(buf, h + 20, 1)
    wr48(buf, h + 22, mac)
    wr32(buf, h + 28, ip)
    wr48(buf, h + 32, 0)
    wr32(buf, h + 38, target)
    for k in range(42, 60):
        buf[h + k] = 0
    return 60


@kernel
def answer_arp(buf, s, a, mine, my_ip):
    """Rewrite the ARP request in ``buf`` (frame at ``s``, ARP header at frame offset
    ``a``) into the reply from (``mine``, ``my_ip``), addressed to the requester;
    returns the new frame length (padded to the 60-byte minimum)."""
    sha = rd48(buf, s + a + 8)
    spa = rd32(buf, s + a + 14)
    wr48(buf, s, sha)
    wr48(buf, s + 6, mine)
    wr16(buf, s + a + 6, 2)
    wr48(buf, s + a + 8, mine)
    wr32(buf, s + a + 14, my_ip)
    wr48(buf, s + a + 18, sha)
    wr32(buf, s + a + 24, spa)
    for k in range(a + 28, 60):
        buf[s + k] = 0
    return 60 if a + 28 <= 60 else a + 28


@kernel
def _set_macs(data, slot, start, dst, src):
    buf = data[slot]
    wr48(buf, start, dst)
    wr48(buf, start + 6, src)


@kernel
def _arp_request(data, free, top, meta, total, headroom, p, target, port_ip, port_mac,
                 hops, events):
    """Append a broadcast ARP request for ``target`` out port ``p``; returns the row count
    (unchanged when no row or slot was free)."""
    c = take_slot(free, top, meta, total)
    if c < 0:
        events[C_DEFERRED if c == NO_ROW else C_POOL] += 1
        return total
    n = write_arp_request(data[c], headroom, port_mac[p], port_ip[p], target)
    new_row(meta, total, c, headroom, n, p, hops, N_ARP_REQUEST)
    events[C_ARP_REQ] += 1
    return total + 1


@kernel
def _pending_done(pkeys, pvals, pstate, pexp, pinfo, key, k, now):
    """One packet held for next hop ``k`` left the queue."""
    key[0] = k
    e = tbl_lookup(pkeys, pstate, pexp, pinfo, key, now)
    if e >= 0:
        pvals[e, 0] -= 1
        if pvals[e, 0] <= 0:
            tbl_delete(pstate, pinfo, e)


@kernel
def _emit_held(data, meta, total, hq_meta, j, verdict, note, dst, src):
    row_copy(meta, total, hq_meta, j)
    meta[total, L.VERDICT] = verdict
    meta[total, L.NOTE] = note
    if verdict >= 0:
        _set_macs(data, hq_meta[j, L.SLOT], hq_meta[j, L.START], dst, src)


@kernel
def _release(data, meta, total, k, mac, port_mac, st, events, key, now):
    """Send every packet held for next hop ``k`` (now at ``mac``), in order."""
    (akeys, avals, astate, abucket, aexp, ainfo, pkeys, pvals, pstate, pbucket, pexp, pinfo,
     hq_meta, hq_key, hq_time, misc, tokens) = st
    p = k >> 32
    hn = misc[M_HQN]
    w = 0
    for j in range(hn):
        if hq_key[j] == k and total < meta.shape[0]:
            _emit_held(data, meta, total, hq_meta, j, p, N_RELEASED, mac, port_mac[p])
            total += 1
            events[C_RELEASED] += 1
            _pending_done(pkeys, pvals, pstate, pexp, pinfo, key, k, now)
            continue
        if w != j:
            row_copy(hq_meta, w, hq_meta, j)
            hq_key[w] = hq_key[j]
            hq_time[w] = hq_time[j]
        w += 1
    misc[M_HQN] = w
    return total


@kernel
def _hold(data, free, top, meta, i, total, headroom, p, target, port_ip, port_mac, st,
          events, key, now):
    """Keep row ``i`` until ``target`` on port ``p`` is resolved; ARP for it if it is
    the first packet waiting for it."""
    (akeys, avals, astate, abucket, aexp, ainfo, pkeys, pvals, pstate, pbucket, pexp, pinfo,
     hq_meta, hq_key, hq_time, misc, tokens) = st
    row = meta[i]
    j = misc[M_HQN]
    k = (p << 32) | target
    key[0] = k
    pe = tbl_lookup(pkeys, pstate, pexp, pinfo, key, now)
    if j >= hq_key.shape[0]:
        row[L.VERDICT] = drop_code(D_QUEUE_FULL)
        if pe < 0:
            # Still ask (at most every ARP_RETRY: the entry, with no packet, expires
            # then), so that a next hop can resolve while others fill the queue.
            pe = tbl_insert(pkeys, pstate, pbucket, pexp, pinfo, key, -1, now + ARP_RETRY,
                            now)
            if pe >= 0:
                pvals[pe, 0] = 0
                pvals[pe, 1] = i64(now * 1e6)
                total = _arp_request(data, free, top, meta, total, headroom, p, target,
                                     port_ip, port_mac, row[L.HOPS], events)
        return total
    first = pe < 0
    if first:
        pe = tbl_insert(pkeys, pstate, pbucket, pexp, pinfo, key, -1, FOREVER, now)
        if pe < 0:  # cannot happen: the table has room for a next hop per held packet
            row[L.VERDICT] = drop_code(D_QUEUE_FULL)
            return total
        pvals[pe, 0] = 0
        pvals[pe, 1] = NEVER_US
    pexp[pe] = FOREVER  # kept while packets wait (deleted when the last one leaves)
    pvals[pe, 0] += 1
    row_copy(hq_meta, j, meta, i)
    hq_key[j] = k
    hq_time[j] = now
    misc[M_HQN] = j + 1
    row[L.VERDICT] = HOLD
    row[L.NOTE] = N_HELD
    if first:
        t = _arp_request(data, free, top, meta, total, headroom, p, target, port_ip,
                         port_mac, row[L.HOPS], events)
        if t > total:
            pvals[pe, 1] = i64(now * 1e6)
        total = t
    return total


@kernel
def _send(data, free, top, meta, i, n, total, headroom, p, target, note, port_ip, port_mac,
          st, events, key, now):
    """Row ``i`` goes out port ``p`` to next hop ``target``: set its MACs, or hold it."""
    (akeys, avals, astate, abucket, aexp, ainfo, pkeys, pvals, pstate, pbucket, pexp, pinfo,
     hq_meta, hq_key, hq_time, misc, tokens) = st
    row = meta[i]
    row[L.NOTE] = note
    k = (p << 32) | target
    key[0] = k
    e = tbl_lookup(akeys, astate, aexp, ainfo, key, now)
    if e < 0:
        return _hold(data, free, top, meta, i, total, headroom, p, target, port_ip, port_mac,
                     st, events, key, now)
    mac = avals[e, 0]
    epoch = misc[M_EPOCH]
    if i < n and (misc[M_HQN] > 0 or misc[M_REL_EPOCH] == epoch):
        # Packets held for this next hop (or released in this batch, so appended at
        # the end) must leave first: this one goes after them, as an appended row.
        key[0] = k
        if tbl_lookup(pkeys, pstate, pexp, pinfo, key, now) >= 0:
            total = _release(data, meta, total, k, mac, port_mac, st, events, key, now)
            avals[e, 1] = epoch
            misc[M_REL_EPOCH] = epoch
        if avals[e, 1] == epoch:
            if total < meta.shape[0]:
                _set_macs(data, row[L.SLOT], row[L.START], mac, port_mac[p])
                row_copy(meta, total, meta, i)
                meta[total, L.VERDICT] = p
                row[L.VERDICT] = HOLD
                return total + 1
            events[C_DEFERRED] += 1
    _set_macs(data, row[L.SLOT], row[L.START], mac, port_mac[p])
    row[L.VERDICT] = p
    return total


@kernel
def _learn(data, meta, total, p, ip, mac, create, port_mac, arp_timeout, st, events, key,
           now):
    """Learn (or, unless ``create``, only refresh) ``ip`` at ``mac`` on port ``p``, and
    release what waits for it. Returns the row count."""
    (akeys, avals, astate, abucket, aexp, ainfo, pkeys, pvals, pstate, pbucket, pexp, pinfo,
     hq_meta, hq_key, hq_time, misc, tokens) = st
    k = (p << 32) | ip
    key[0] = k
    e = tbl_lookup(akeys, astate, aexp, ainfo, key, now)
    if e >= 0:
        if avals[e, 0] != mac:
            avals[e, 0] = mac
            events[C_ARP_UPDATED] += 1
        aexp[e] = now + arp_timeout
    elif create:
        e = tbl_insert(akeys, astate, abucket, aexp, ainfo, key, -1, now + arp_timeout, now)
        if e < 0:
            events[C_ARP_FULL] += 1
            return total
        avals[e, 0] = mac
        avals[e, 1] = 0
        events[C_ARP_LEARNED] += 1
    else:
        return total
    if misc[M_HQN] > 0:
        key[0] = k
        if tbl_lookup(pkeys, pstate, pexp, pinfo, key, now) >= 0:
            total = _release(data, meta, total, k, mac, port_mac, st, events, key, now)
            avals[e, 1] = misc[M_EPOCH]
            misc[M_REL_EPOCH] = misc[M_EPOCH]
    return total


@kernel
def _arp_in(data, meta, i, total, port_ip, port_mask, port_bcast, port_mac, arp_timeout,
            st, events, key, now):
    row = meta[i]
    inp = row[L.IN_PORT]
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
        return total
    if op != 1 and op != 2:
        row[L.VERDICT] = drop_code(D_UNSUPPORTED)
        return total
    me = port_ip[inp]
    valid = spa != 0 and spa != me and spa != port_bcast[inp] \
        and (spa & port_mask[inp]) == (me & port_mask[inp])
    for_me = tpa == me
    if valid:
        total = _learn(data, meta, total, inp, spa, sha, for_me, port_mac, arp_timeout, st,
                       events, key, now)
    if not for_me:
        row[L.VERDICT] = drop_code(D_ARP_OTHER)
        row[L.NOTE] = N_ARP_OTHER
        return total
    if op == 2:
        row[L.VERDICT] = drop_code(D_ARP_CONSUMED if valid else D_ARP_OTHER)
        row[L.NOTE] = N_ARP_REPLY if valid else N_ARP_OTHER
        return total
    # A request for this port's address: the frame becomes the reply.
    row[L.LEN] = answer_arp(data[slot], s, a, port_mac[inp], me)
    row[L.VERDICT] = inp
    row[L.NOTE] = N_ARP_ME
    events[C_ARP_REPLY] += 1
    return total


@kernel
def _scan(data, free, top, meta, total, headroom, port_ip, port_mac, hold, st, events, key,
          now):
    """Held packets: drop those held too long, release those whose next hop is now known
    (e.g. from a replicated ARP entry), ARP again for the others when due."""
    (akeys, avals, astate, abucket, aexp, ainfo, pkeys, pvals, pstate, pbucket, pexp, pinfo,
     hq_meta, hq_key, hq_time, misc, tokens) = st
    hn = misc[M_HQN]
    now_us = i64(now * 1e6)
    w = 0
    for j in range(hn):
        k = hq_key[j]
        if total < meta.shape[0]:
            if now >= hq_time[j] + hold:
                _emit_held(data, meta, total, hq_meta, j, drop_code(D_ARP_TIMEOUT), N_TIMEOUT,
                           0, 0)
                total += 1
                _pending_done(pkeys, pvals, pstate, pexp, pinfo, key, k, now)
                continue
            key[0] = k
            e = tbl_lookup(akeys, astate, aexp, ainfo, key, now)
            if e >= 0:
                p = k >> 32
                _emit_held(data, meta, total, hq_meta, j, p, N_RELEASED, avals[e, 0],
                           port_mac[p])
                total += 1
                events[C_RELEASED] += 1
                _pending_done(pkeys, pvals, pstate, pexp, pinfo, key, k, now)
                continue
        else:
            events[C_DEFERRED] += 1
        if w != j:
            row_copy(hq_meta, w, hq_meta, j)
            hq_key[w] = k
            hq_time[w] = hq_time[j]
        w += 1
        key[0] = k
        pe = tbl_lookup(pkeys, pstate, pexp, pinfo, key, now)
        if pe >= 0 and now_us - pvals[pe, 1] >= ARP_RETRY_US:
            t = _arp_request(data, free, top, meta, total, headroom, k >> 32, k & M32,
                             port_ip, port_mac, hq_meta[w - 1, L.HOPS], events)
            if t > total:
                pvals[pe, 1] = now_us
            total = t
    misc[M_HQN] = w
    return total
