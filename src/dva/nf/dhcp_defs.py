"""Names shared by the ``dhcp`` device's modules (see :mod:`dva.nf.dhcp`).

Drop reasons, counters and trace notes with their indexes, the BOOTP/DHCP wire
constants (RFC 2131, RFC 2132), the layout of the ``cfg``, ``msg`` and ``misc``
arrays and the lease states: in a module of their own so that :mod:`dva.nf.dhcp`,
:mod:`dva.nf.dhcp_wire` and :mod:`dva.nf.dhcp_lease` import them without a circle.
"""

from __future__ import annotations

DROPS = (
    "malformed",  # a parse error (runt, bad IPv4/UDP/ARP header), or an IPv4 fragment
    "unsupported",  # VLAN-tagged, or neither IPv4 nor ARP (IPv6 included)
    "not_for_me",  # unicast to another MAC, or IPv4 to another address
    "not_dhcp",  # IPv4 that is not UDP to port 67 (a ping to the server included)
    "bad_checksum",  # IPv4 header or UDP checksum
    "bootp_truncated",  # UDP payload shorter than a BOOTP header + the magic cookie
    "bad_cookie",  # no DHCP magic cookie (plain BOOTP is not served)
    "bad_option",  # an option running past its area, or a known one of a wrong length
    "no_message_type",  # no option 53
    "not_request",  # op is not BOOTREQUEST (another server's reply, flooded to us)
    "bad_hardware",  # htype/hlen not Ethernet (1/6), or chaddr not a unicast MAC
    "relayed",  # giaddr set: requests through relay agents are not served
    "unsupported_message",  # a message type a server does not take (OFFER, ACK, ...)
    "bad_request",  # a message without what its type needs (REQUEST without address)
    "other_server",  # REQUEST/DECLINE/RELEASE naming another server: silence
    "unknown_client",  # INIT-REBOOT/REBINDING of a client without a lease here: silence
    "pool_exhausted",  # no address free for the client: silence
    "consumed",  # RELEASE or DECLINE, handled: the protocol has no reply
    "arp_not_for_me",  # ARP other than a request for the server's address
    "no_room",  # the reply does not fit in the packet slot
)
(D_MALFORMED, D_UNSUPPORTED, D_NOT_FOR_ME, D_NOT_DHCP, D_BAD_CSUM, D_TRUNCATED,
 D_BAD_COOKIE, D_BAD_OPTION, D_NO_TYPE, D_NOT_REQUEST, D_BAD_HW, D_RELAYED,
 D_UNSUP_MSG, D_BAD_REQUEST, D_OTHER_SERVER, D_UNKNOWN_CLIENT, D_EXHAUSTED, D_CONSUMED,
 D_ARP_OTHER, D_NO_ROOM) = range(len(DROPS))

EVENTS = (
    "discovers",  # DHCPDISCOVER received (valid)
    "requests",  # DHCPREQUEST received (valid)
    "informs",  # DHCPINFORM received (valid)
    "offers",  # DHCPOFFER sent
    "acks",  # DHCPACK sent (INFORM answers included)
    "naks",  # DHCPNAK sent
    "leases_bound",  # an ACK that bound an address the client did not hold bound
    "leases_renewed",  # an ACK that extended a bound lease
    "leases_released",  # a RELEASE freed a lease
    "addresses_declined",  # a DECLINE marked an address unusable
    "offers_withdrawn",  # the client chose another server: our offer freed
    "lease_entries_expired",  # lease table entries (offers, bindings) that expired
    "arp_replies",  # ARP replies for the server's address
)
(C_DISCOVERS, C_REQUESTS, C_INFORMS, C_OFFERS, C_ACKS, C_NAKS, C_BOUND, C_RENEWED,
 C_RELEASED, C_DECLINED, C_WITHDRAWN, C_EXPIRED, C_ARP_REPLY) = range(len(EVENTS))

NOTES = ("", "DISCOVER: offer", "REQUEST (selecting): ack", "REQUEST (init-reboot): ack",
         "REQUEST (renewing): ack", "REQUEST (rebinding): ack", "REQUEST: nak",
         "INFORM: ack", "RELEASE", "DECLINE", "ARP request for me: reply",
         "silence (see the drop reason)")
(N_OFFER, N_ACK_SELECT, N_ACK_REBOOT, N_ACK_RENEW, N_ACK_REBIND, N_NAK, N_INFORM,
 N_RELEASE, N_DECLINE, N_ARP, N_SILENT) = range(1, len(NOTES))

# -- wire (RFC 2131 section 2, RFC 2132) ------------------------------------------------
BOOTREQUEST, BOOTREPLY = 1, 2
SERVER_PORT, CLIENT_PORT = 67, 68
MAGIC_COOKIE = 0x63825363
BROADCAST_FLAG = 0x8000
# BOOTP field offsets from the start of the message
B_OP, B_HTYPE, B_HLEN, B_HOPS, B_XID, B_SECS, B_FLAGS = 0, 1, 2, 3, 4, 8, 10
B_CIADDR, B_YIADDR, B_SIADDR, B_GIADDR, B_CHADDR = 12, 16, 20, 24, 28
B_SNAME, B_FILE, B_COOKIE, B_OPTIONS = 44, 108, 236, 240
BOOTP_MIN = 300  # replies are padded to the classic BOOTP size (RFC 1542 section 3.3)
# message types (option 53)
DISCOVER, OFFER, REQUEST, DECLINE, ACK, NAK, RELEASE, INFORM = range(1, 9)
# option codes
O_PAD, O_MASK, O_ROUTER, O_DNS, O_DOMAIN, O_BCAST = 0, 1, 3, 6, 15, 28
O_REQ_IP, O_LEASE, O_OVERLOAD, O_TYPE, O_SERVER, O_T1, O_T2, O_CLIENT_ID = \
    50, 51, 52, 53, 54, 58, 59, 61
O_END = 255

# -- msg[]: what the parser found in a request ------------------------------------------
F_TYPE, F_REQ_IP, F_LEASE, F_SERVER, F_CID_OFF, F_CID_LEN, F_OVERLOAD, F_BOOTP = range(8)
NMSG = 8

# -- cfg[] (int64): the device's compiled config ----------------------------------------
(G_IP, G_MAC, G_MASK, G_BCAST, G_ROUTER, G_START, G_END, G_LEASE, G_MAX_LEASE, G_RENEW,
 G_REBIND, G_OFFER_HOLD, G_DECLINE_HOLD) = range(13)
NCFG = 13

# -- lease states ---------------------------------------------------------------------------
OFFERED, BOUND, DECLINED = 1, 2, 3
# addr_status() results
FREE, MINE, TAKEN = 0, 1, 2
# leases table: key = client key (KEY_WORDS), value (address, state)
# addrs table: key = address, value (state, client key words)
KEY_WORDS = 5
V_IP, V_STATE = 0, 1
A_STATE, A_KEY = 0, 1
# client key word 0: kind << 16 | length
K_MAC, K_CID, K_CID_HASHED = 1, 2, 3
CID_EXACT = 28  # client identifiers up to this long are kept whole (7 bytes per word)

# -- misc[] -------------------------------------------------------------------------------
M_CHANGES, M_IP_ID = 0, 1
NMISC = 2

M32 = 0xFFFFFFFF
MIN_LEASE = 60  # a client may ask for a shorter lease than configured, not below this
