"""Names shared by the ``router`` device's modules (see :mod:`dva.nf.router`).

Drop reasons, counters and trace notes (with their indexes), next-hop kinds, the
layout of the ``params`` and ``misc`` arrays, and the ARP retry interval: in a module
of their own so that :mod:`dva.nf.router`, :mod:`dva.nf.router_arp` and
:mod:`dva.nf.router_icmp` all import them without importing each other in a circle.
"""

from __future__ import annotations

DROPS = (
    "not_for_me",  # unicast frame to another MAC
    "unsupported",  # not IPv4 or ARP (IPv6, VLAN-tagged, ...), or an ARP op not 1 or 2
    "malformed",  # any parse error, or an ARP sender MAC that is not unicast
    "bad_checksum",  # IPv4 header checksum (or ICMP checksum of an echo request to us)
    "broadcast",  # L2 broadcast IPv4, limited/directed broadcast or multicast destination
    "martian_src",  # source 0/8, 127/8, 224/3 (or link-local, when forwarding)
    "martian_dst",  # destination 0/8, 127/8, 240/4 (or link-local, when forwarding)
    "not_served",  # to the router, not an echo request
    "ttl_exceeded",  # TTL <= 1 (ICMP time exceeded sent)
    "no_route",  # no matching route (ICMP net unreachable sent)
    "arp_queue_full",  # next hop unresolved and the hold queue is full
    "arp_timeout",  # held longer than arp_hold without an ARP reply
    "arp_not_for_me",  # ARP for another address (an existing entry is refreshed)
    "arp_consumed",  # an ARP reply to the router: learned, nothing to forward
)
(D_NOT_FOR_ME, D_UNSUPPORTED, D_MALFORMED, D_BAD_CSUM, D_BROADCAST, D_MARTIAN_SRC,
 D_MARTIAN_DST, D_NOT_SERVED, D_TTL, D_NO_ROUTE, D_QUEUE_FULL, D_ARP_TIMEOUT,
 D_ARP_OTHER, D_ARP_CONSUMED) = range(len(DROPS))

EVENTS = (
    "arp_requests_sent",
    "arp_replies_sent",
    "arp_learned",  # new ARP entries
    "arp_updated",  # a known address with a new MAC
    "arp_expired",  # entries removed because they expired
    "arp_table_full",  # an address not learned because the cache is full
    "echo_replies",
    "icmp_sent",  # ICMP errors generated
    "icmp_rate_limited",  # ICMP errors not sent: over icmp_rate
    "icmp_no_route",  # ICMP errors not sent: no route back to the source
    "held_released",  # held packets sent after their next hop was resolved
    "pool_exhausted",  # a packet not generated: no free slot
    "emit_deferred",  # no row left in the batch: generation postponed or skipped
)
(C_ARP_REQ, C_ARP_REPLY, C_ARP_LEARNED, C_ARP_UPDATED, C_ARP_EXPIRED, C_ARP_FULL,
 C_ECHO, C_ICMP, C_ICMP_RATE, C_ICMP_NO_ROUTE, C_RELEASED, C_POOL,
 C_DEFERRED) = range(len(EVENTS))

NOTES = ("", "forward via gateway", "forward to a connected host", "to me: echo reply",
         "to me: not served", "ARP request for me: reply", "ARP reply for me: learned",
         "ARP not for me", "next hop unresolved: held", "next hop resolved: released",
         "held too long: dropped", "ARP request", "ICMP error", "TTL exceeded", "no route",
         "not addressed to this port's MAC")
(N_VIA, N_DIRECT, N_ECHO, N_NOT_SERVED, N_ARP_ME, N_ARP_REPLY, N_ARP_OTHER, N_HELD,
 N_RELEASED, N_TIMEOUT, N_ARP_REQUEST, N_ICMP, N_TTL, N_NO_ROUTE,
 N_NOT_FOR_ME) = range(1, len(NOTES))

# next-hop kinds (the LPM gives a next-hop number; these arrays say what it means)
NH_NONE, NH_FWD, NH_LOCAL, NH_BCAST = 0, 1, 2, 3
# params[] (float64)
P_ARP_TIMEOUT, P_ARP_HOLD, P_ICMP_RATE = 0, 1, 2
# misc[] (int64)
M_HQN, M_EPOCH, M_REL_EPOCH, M_IP_ID, M_REBUILD = 0, 1, 2, 3, 4

M32 = 0xFFFFFFFF
ARP_RETRY = 0.09  # seconds between ARP requests for one next hop (engine ticks: 0.1 s)
