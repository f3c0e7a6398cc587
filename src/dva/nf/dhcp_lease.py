"""Leases and the server's state machine for the ``dhcp`` device (:mod:`dva.nf.dhcp`).

Two shared tables, always changed together (same expiry, so they expire together):

* ``leases``: client key (:func:`dva.nf.dhcp_wire.client_key`) -> (address, state),
  state ``OFFERED`` (expires ``offer_hold`` after the offer) or ``BOUND`` (expires
  with the lease);
* ``addrs``: address -> (state, client key): who holds an address, and addresses a
  client declined (``DECLINED``, no client, expiring ``decline_hold`` later).

An address may be given to a client (:func:`allowed`) when it is reserved for the
client's hardware address, or, for a client without a reservation, when it is in the
pool range and reserved for nobody; and it must not be held by another client or
declined (:func:`addr_status`). A new client's address is searched from a point of the
pool chosen by a hash of its key (:func:`allocate`), so a client whose lease expired
or was released gets the same address again while nobody else took it, also from
another server instance with the same pool.

Handlers (RFC 2131 sections 4.3.1 - 4.3.5) return ``(reply type or 0, address,
lease seconds, drop reason, trace note)``; the caller writes the reply or drops the
request with the reason. Lease times: the configured ``lease``, or what the client asks
(option 51) clamped to ``[min(MIN_LEASE, lease), max_lease]``; T1 and T2 scale with it.
"""

from __future__ import annotations

from dva._jit import kernel
from dva.nf.dhcp_defs import (
    A_KEY,
    A_STATE,
    ACK,
    BOUND,
    C_BOUND,
    C_DECLINED,
    C_RELEASED,
    C_RENEWED,
    C_WITHDRAWN,
    D_BAD_REQUEST,
    D_CONSUMED,
    D_EXHAUSTED,
    D_OTHER_SERVER,
    D_UNKNOWN_CLIENT,
    DECLINED,
    F_LEASE,
    F_REQ_IP,
    F_SERVER,
    FREE,
    G_DECLINE_HOLD,
    G_END,
    G_IP,
    G_LEASE,
    G_MASK,
    G_MAX_LEASE,
    G_OFFER_HOLD,
    G_START,
    KEY_WORDS,
    M_CHANGES,
    MIN_LEASE,
    MINE,
    N_ACK_REBIND,
    N_ACK_REBOOT,
    N_ACK_RENEW,
    N_ACK_SELECT,
    N_DECLINE,
    N_NAK,
    N_OFFER,
    N_RELEASE,
    N_SILENT,
    NAK,
    OFFER,
    OFFERED,
    TAKEN,
    V_IP,
    V_STATE,
)
from dva.nf.table import sorted_find, tbl_delete, tbl_hash, tbl_insert, tbl_lookup, tbl_sweep


@kernel
def reserved_for(res, mac):
    """The address reserved for hardware address ``mac``, or -1.

    ``res``: (MACs sorted, their addresses, addresses sorted, their MACs)."""
    r = sorted_find(res[0], mac)
    return res[1][r] if r >= 0 else -1


@kernel
def allowed(cfg, res, ip, mac):
    """May the client with hardware address ``mac`` have address ``ip`` (config only)?"""
    mine = reserved_for(res, mac)
    if mine >= 0:
        return ip == mine
    if sorted_find(res[2], ip) >= 0:
        return False
    return cfg[G_START] <= ip and ip <= cfg[G_END]


@kernel
def lease_time(cfg, asked):
    lease = cfg[G_LEASE]
    if asked > 0:
        top = cfg[G_MAX_LEASE]
        lease = asked if asked < top else top
        low = MIN_LEASE if MIN_LEASE < cfg[G_LEASE] else cfg[G_LEASE]
        if lease < low:
            lease = low
    return lease


@kernel
def _insert(keys, state, bucket, expires, info, key, exp, now):
    """Insert (the caller checked ``key`` is absent); when the table counts expired
    entries not reclaimed yet as full, sweep it whole once and try again."""
    s = tbl_insert(keys, state, bucket, expires, info, key, -1, exp, now)
    if s < 0:
        tbl_sweep(state, expires, info, now, state.shape[0])
        s = tbl_insert(keys, state, bucket, expires, info, key, -1, exp, now)
    return s


@kernel
def find_lease(st, key, now):
    (lkeys, lvals, lstate, lbucket, lexp, linfo, akeys, avals, astate, abucket, aexp, ainfo,
     misc, akey) = st
    return tbl_lookup(lkeys, lstate, lexp, linfo, key, now)


@kernel
def _find_addr(st, ip, now):
    (lkeys, lvals, lstate, lbucket, lexp, linfo, akeys, avals, astate, abucket, aexp, ainfo,
     misc, akey) = st
    akey[0] = ip
    return tbl_lookup(akeys, astate, aexp, ainfo, akey, now)


@kernel
def _owned(avals, a, key):
    if avals[a, A_STATE] == DECLINED:
        return False
    for w in range(KEY_WORDS):
        if avals[a, A_KEY + w] != key[w]:
            return False
    return True


@kernel
def addr_status(st, ip, key, now):
    """``FREE``, ``MINE`` (held by ``key``) or ``TAKEN`` (another client's, declined)."""
    a = _find_addr(st, ip, now)
    if a < 0:
        return FREE
    return MINE if _owned(st[7], a, key) else TAKEN


@kernel
def allocate(st, cfg, res, key, now):
    """A free pool address for a new client (search from a hashed start), or -1."""
    start = cfg[G_START]
    n = cfg[G_END] - start + 1
    h = tbl_hash(key) % n
    for j in range(n):
        ip = start + (h + j) % n
        if sorted_find(res[2], ip) >= 0:
            continue
        if addr_status(st, ip, key, now) != TAKEN:
            return ip
    return -1


@kernel
def _free_addr(st, ip, key, now):
    a = _find_addr(st, ip, now)
    if a >= 0 and _owned(st[7], a, key):
        tbl_delete(st[8], st[11], a)


@kernel
def set_lease(st, key, ip, state, exp, now):
    """The client ``key`` holds ``ip`` in ``state`` until ``exp`` (its other address,
    if any, is freed). False when a table has no room."""
    (lkeys, lvals, lstate, lbucket, lexp, linfo, akeys, avals, astate, abucket, aexp, ainfo,
     misc, akey) = st
    e = tbl_lookup(lkeys, lstate, lexp, linfo, key, now)
    if e >= 0:
        if lvals[e, V_IP] != ip:
            _free_addr(st, lvals[e, V_IP], key, now)
    a = _find_addr(st, ip, now)
    if a < 0:
        a = _insert(akeys, astate, abucket, aexp, ainfo, akey, exp, now)
        if a < 0:
            return False
    if e < 0:
        e = _insert(lkeys, lstate, lbucket, lexp, linfo, key, exp, now)
        if e < 0:
            tbl_delete(astate, ainfo, a)
            return False
    lvals[e, V_IP] = ip
    lvals[e, V_STATE] = state
    lexp[e] = exp
    avals[a, A_STATE] = state
    for w in range(KEY_WORDS):
        avals[a, A_KEY + w] = key[w]
    aexp[a] = exp
    misc[M_CHANGES] += 1
    return True


@kernel
def drop_lease(st, e, key, now):
    """Forget the lease in slot ``e`` of the client ``key``; its address is free."""
    _free_addr(st, st[1][e, V_IP], key, now)
    tbl_delete(st[2], st[5], e)
    st[12][M_CHANGES] += 1


@kernel
def on_discover(st, cfg, res, key, mac, msg, now):
    """DHCPDISCOVER (RFC 2131 4.3.1): offer the client's address, its reserved one,
    the one it asks for, or a free one; none: silence."""
    e = find_lease(st, key, now)
    ip = -1
    if e >= 0:
        ip = st[1][e, V_IP]
        if not allowed(cfg, res, ip, mac):  # the config changed under the lease
            drop_lease(st, e, key, now)
            e = -1
            ip = -1
    if ip < 0:
        r = reserved_for(res, mac)
        want = msg[F_REQ_IP]
        if r >= 0:
            if addr_status(st, r, key, now) != TAKEN:
                ip = r
        elif want >= 0 and allowed(cfg, res, want, mac) \
                and addr_status(st, want, key, now) != TAKEN:
            ip = want
        else:
            ip = allocate(st, cfg, res, key, now)
    if ip < 0:
        return 0, 0, 0, D_EXHAUSTED, N_SILENT
    lease = lease_time(cfg, msg[F_LEASE])
    if e < 0 or st[1][e, V_STATE] != BOUND:
        if not set_lease(st, key, ip, OFFERED, now + cfg[G_OFFER_HOLD], now):
            return 0, 0, 0, D_EXHAUSTED, N_SILENT
    return OFFER, ip, lease, -1, N_OFFER


@kernel
def _bind(st, cfg, key, e, ip, msg, events, now):
    """ACK: the client holds ``ip`` bound for the lease time it gets."""
    lease = lease_time(cfg, msg[F_LEASE])
    renewed = e >= 0 and st[1][e, V_STATE] == BOUND and st[1][e, V_IP] == ip
    if not set_lease(st, key, ip, BOUND, now + lease, now):
        return 0
    if renewed:
        events[C_RENEWED] += 1
    else:
        events[C_BOUND] += 1
    return lease


@kernel
def on_request(st, cfg, res, key, mac, msg, ciaddr, unicast, events, now):
    """DHCPREQUEST (RFC 2131 4.3.2) in each client state:

    * SELECTING (server identifier given): another server's -> our offer is withdrawn,
      silence; ours -> ACK the offered (or a still free, allowed) address, else NAK;
    * INIT-REBOOT (requested address, no ciaddr): off our subnet -> NAK; no lease
      here -> silence; another address than the client's lease -> NAK; else ACK;
    * RENEWING (ciaddr, unicast to us) / REBINDING (ciaddr, broadcast): ACK the
      client's lease; another address -> NAK; no lease: renewing -> ACK if the
      address may be the client's and is free (a server that lost its state takes
      the binding back) else NAK; rebinding -> NAK if the address is another
      client's, else silence (it may be another server's).
    """
    sid = msg[F_SERVER]
    ours = cfg[G_IP]
    mask = cfg[G_MASK]
    e = find_lease(st, key, now)
    if sid >= 0 and sid != ours:
        if e >= 0 and st[1][e, V_STATE] == OFFERED:
            drop_lease(st, e, key, now)
            events[C_WITHDRAWN] += 1
        return 0, 0, 0, D_OTHER_SERVER, N_SILENT
    if ciaddr == 0:
        ip = msg[F_REQ_IP]
        if ip < 0:
            return 0, 0, 0, D_BAD_REQUEST, N_SILENT
        note = N_ACK_SELECT if sid >= 0 else N_ACK_REBOOT
        if (ip & mask) != (ours & mask):
            return NAK, 0, 0, -1, N_NAK
        if e < 0:
            if sid < 0:
                return 0, 0, 0, D_UNKNOWN_CLIENT, N_SILENT
            if not allowed(cfg, res, ip, mac) or addr_status(st, ip, key, now) == TAKEN:
                return NAK, 0, 0, -1, N_NAK
        elif st[1][e, V_IP] != ip or not allowed(cfg, res, ip, mac):
            return NAK, 0, 0, -1, N_NAK
        lease = _bind(st, cfg, key, e, ip, msg, events, now)
        if lease == 0:
            return 0, 0, 0, D_EXHAUSTED, N_SILENT
        return ACK, ip, lease, -1, note
    ip = ciaddr
    note = N_ACK_RENEW if unicast else N_ACK_REBIND
    if (ip & mask) != (ours & mask):
        return NAK, 0, 0, -1, N_NAK
    if e < 0:
        status = addr_status(st, ip, key, now)
        if not unicast:
            if status == TAKEN:
                return NAK, 0, 0, -1, N_NAK
            return 0, 0, 0, D_UNKNOWN_CLIENT, N_SILENT
        if not allowed(cfg, res, ip, mac) or status == TAKEN:
            return NAK, 0, 0, -1, N_NAK
    elif st[1][e, V_IP] != ip or not allowed(cfg, res, ip, mac):
        return NAK, 0, 0, -1, N_NAK
    lease = _bind(st, cfg, key, e, ip, msg, events, now)
    if lease == 0:
        return 0, 0, 0, D_EXHAUSTED, N_SILENT
    return ACK, ip, lease, -1, note


@kernel
def on_decline(st, cfg, key, msg, events, now):
    """DHCPDECLINE (RFC 2131 4.3.3): the client found its address in use; the address
    is marked unusable for ``decline_hold`` seconds. No reply."""
    sid = msg[F_SERVER]
    if sid >= 0 and sid != cfg[G_IP]:
        return 0, 0, 0, D_OTHER_SERVER, N_SILENT
    ip = msg[F_REQ_IP]
    if ip < 0:
        return 0, 0, 0, D_BAD_REQUEST, N_SILENT
    e = find_lease(st, key, now)
    if e >= 0 and st[1][e, V_IP] == ip:
        drop_lease(st, e, key, now)
        (lkeys, lvals, lstate, lbucket, lexp, linfo, akeys, avals, astate, abucket, aexp,
         ainfo, misc, akey) = st
        akey[0] = ip
        a = _insert(akeys, astate, abucket, aexp, ainfo, akey, now + cfg[G_DECLINE_HOLD], now)
        if a >= 0:
            avals[a, A_STATE] = DECLINED
            for w in range(KEY_WORDS):
                avals[a, A_KEY + w] = 0
        events[C_DECLINED] += 1
    return 0, 0, 0, D_CONSUMED, N_DECLINE


@kernel
def on_release(st, cfg, key, msg, ciaddr, events, now):
    """DHCPRELEASE (RFC 2131 4.3.4): the client's lease on ``ciaddr`` ends; the
    address is free. No reply."""
    sid = msg[F_SERVER]
    if sid >= 0 and sid != cfg[G_IP]:
        return 0, 0, 0, D_OTHER_SERVER, N_SILENT
    e = find_lease(st, key, now)
    if e >= 0 and st[1][e, V_IP] == ciaddr:
        drop_lease(st, e, key, now)
        events[C_RELEASED] += 1
    return 0, 0, 0, D_CONSUMED, N_RELEASE


__all__ = ["FREE", "allocate", "allowed", "on_decline", "on_discover", "on_release",
           "on_request", "reserved_for"]
