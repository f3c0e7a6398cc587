"""Per-packet metadata layout of a :class:`~dva.packet.batch.PacketBatch`.

A batch keeps its metadata as one ``int64[capacity, NFIELDS]`` matrix, one row per
packet. One array (rather than a dozen) keeps numba call overhead low and makes
gathering a sub-batch a single fancy-index copy. The column numbers below are the
contract between the parser, the devices and the engine.

Offsets (``L3_OFF``, ``L4_OFF``) are relative to the first byte of the frame, which
is ``pool.data[SLOT, START]``. ``-1`` means "absent".
"""

from __future__ import annotations

# --- columns --------------------------------------------------------------------
SLOT = 0  # slot id in the packet pool
START = 1  # first byte of the frame inside the slot (headroom before it)
LEN = 2  # frame length in bytes
IN_PORT = 3  # port index of the device currently processing the packet
TENANT = 4  # numeric tenant id (assigned by the runtime, never from the wire)
HASH = 5  # symmetric flow hash (32 bit, uniform)
BUCKET = 6  # flow bucket: the bucket hash masked (parse.py: linear in the ports)
ETYPE = 7  # ethertype after VLAN tags, -1 if the frame is a runt
VLAN = 8  # VID of the outermost 802.1Q tag, -1 if untagged
TAGS = 9  # number of VLAN tags (0..2)
L3_OFF = 10  # start of the L2 payload (the L3 header when ETYPE is IPv4/IPv6/ARP)
L4_OFF = 11  # start of the L4 header, -1 if none (non-IP, later fragment, bad L3)
PROTO = 12  # IP protocol / IPv6 next header after extension headers, -1 if none
PFLAGS = 13  # F_* bits below
PERR = 14  # parse error code (E_* below), 0 when the frame parsed cleanly
VERDICT = 15  # device decision: port >= 0, MULTI, HOLD or a drop code (nf.base)
MASK = 16  # output port bit mask when VERDICT == MULTI
HOPS = 17  # devices traversed so far (hop limit)
NOTE = 18  # device-specific "why" code for tracing (index into Device.notes)
ORIGIN = 19  # ingress attachment index, -1 for packets generated inside the graph
NFIELDS = 20
TENANT_LIMIT = 1 << 23  # tenant ids are 0 .. TENANT_LIMIT - 1 (connection keys hold 23 bits)

FIELD_NAMES = (
    "slot", "start", "len", "in_port", "tenant", "hash", "bucket", "etype", "vlan",
    "tags", "l3_off", "l4_off", "proto", "pflags", "perr", "verdict", "mask", "hops",
    "note", "origin",
)
assert len(FIELD_NAMES) == NFIELDS

# --- PFLAGS bits ------------------------------------------------------------------
F_L3_OK = 1  # ARP/IPv4/IPv6 header complete and consistent
F_L4_OK = 2  # TCP/UDP/ICMP/ICMPv6 header complete and consistent
F_IPV4 = 4
F_IPV6 = 8
F_ARP = 16
F_IP_OPTIONS = 32  # IPv4 header longer than 20 bytes
F_IP_CSUM_BAD = 64  # IPv4 header checksum does not verify
F_FRAG = 128  # a fragment (first or later)
F_LATER_FRAG = 256  # a non-first fragment: no L4 header
F_ICMP_ERROR = 512  # ICMP/ICMPv6 error; HASH is that of the quoted flow
F_IPV6_EXT = 1024  # IPv6 extension headers were skipped

# --- Ethernet ----------------------------------------------------------------------
BCAST_MAC = 0xFFFFFFFFFFFF  # ff:ff:ff:ff:ff:ff as the 48-bit value rd48 reads

# --- ethertypes -------------------------------------------------------------------
ETH_IPV4 = 0x0800
ETH_ARP = 0x0806
ETH_IPV6 = 0x86DD
ETH_VLAN = 0x8100
ETH_QINQ = 0x88A8
ETH_VLAN_OLD = 0x9100

PROTO_ICMP = 1
PROTO_TCP = 6
PROTO_UDP = 17
PROTO_ICMPV6 = 58

# --- parse errors: the named reasons a frame may be malformed ----------------------
PARSE_ERRORS = (
    "ok",
    "runt",  # shorter than an Ethernet header
    "vlan_truncated",
    "vlan_too_many",  # more than two stacked tags
    "arp_truncated",
    "arp_unsupported",  # not Ethernet/IPv4 ARP
    "ipv4_truncated",
    "ipv4_bad_version",
    "ipv4_bad_ihl",
    "ipv4_bad_total_len",
    "ipv6_truncated",
    "ipv6_bad_version",
    "ipv6_ext_truncated",
    "ipv6_ext_too_many",
    "tcp_truncated",
    "tcp_bad_offset",
    "udp_truncated",
    "udp_bad_length",
    "icmp_truncated",
    "icmpv6_truncated",
)
(E_OK, E_RUNT, E_VLAN_TRUNC, E_VLAN_MANY, E_ARP_TRUNC, E_ARP_UNSUP, E_IPV4_TRUNC,
 E_IPV4_VERSION, E_IPV4_IHL, E_IPV4_TOTLEN, E_IPV6_TRUNC, E_IPV6_VERSION,
 E_IPV6_EXT_TRUNC, E_IPV6_EXT_MANY, E_TCP_TRUNC, E_TCP_OFFSET, E_UDP_TRUNC, E_UDP_LEN,
 E_ICMP_TRUNC, E_ICMPV6_TRUNC) = range(len(PARSE_ERRORS))

MAX_VLAN_TAGS = 2
MAX_IPV6_EXT = 8
