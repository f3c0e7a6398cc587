"""The dhcp device: DORA and reply addressing, every REQUEST state of RFC 2131 4.3.2,
RELEASE, DECLINE, INFORM, reservations, offer holds, exhaustion, expiry, client
identifiers, malformed input, config errors; persistence of leases (atomic files,
wall-clock expiry, corrupt and torn files); the compiled kernels against the JIT-off
reference. Frames are built and read back with scapy, which also recomputes every
checksum.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from reference import assert_matches_reference
from rig import Rig
from scapy.layers.dhcp import BOOTP, DHCP
from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.layers.inet6 import IPv6
from scapy.layers.l2 import ARP, Dot1Q, Ether
from scapy.utils import mac2str

from dva.graph.appliance import ApplianceError, parse_appliance
from dva.nf.dhcp_defs import DROPS, EVENTS
from dva.worker import persist
from dva.worker.persist import Persistence, StateFileError, decode, encode, write_atomic

SRV, SRV_MAC = "10.0.0.2", "02:00:00:00:00:02"
BC = "ff:ff:ff:ff:ff:ff"
A, B, C = "02:00:00:00:00:0a", "02:00:00:00:00:0b", "02:00:00:00:00:0c"
BASE_POOL = ("{start: 10.0.0.100, end: 10.0.0.199, router: 10.0.0.1, "
             "dns: [10.0.0.53, 192.0.2.53], domain: lab.example, lease: 3600}")


def appliance(pool: str = BASE_POOL, extra: str = "", name: str = "t",
              tenant: str = "default") -> str:
    return f"""
appliance: {name}
tenant: {tenant}
devices:
  dhcp:
    type: dhcp
    ports: {{lan: {{ip: 10.0.0.2/24, mac: {SRV_MAC}}}}}
    pool: {pool}
{extra}
attach:
  dhcp.lan: {{memory: lan}}
"""


def msg(mtype: str, mac: str = A, *, xid: int = 7, ciaddr: str = "0.0.0.0",
        flags: int = 0, opts: tuple = (), src: str = "0.0.0.0",
        dst: str = "255.255.255.255", dmac: str = BC, cid: bytes | None = None,
        giaddr: str = "0.0.0.0", chaddr: str | None = None) -> bytes:
    options = [("message-type", mtype), *opts]
    if cid is not None:
        options.append(("client_id", cid))
    return bytes(Ether(src=mac, dst=dmac) / IP(src=src, dst=dst) / UDP(sport=68, dport=67)
                 / BOOTP(chaddr=mac2str(chaddr or mac), xid=xid, ciaddr=ciaddr, flags=flags,
                         giaddr=giaddr)
                 / DHCP(options=[*options, "end"]))


def options(p) -> dict:
    out = {}
    for o in p[DHCP].options:
        if isinstance(o, tuple):
            out[o[0]] = o[1] if len(o) == 2 else list(o[1:])
    return out


def check_checksums(frame: bytes) -> None:
    p = Ether(frame)
    if IP not in p:
        return
    ip_sum, udp_sum = p[IP].chksum, p[UDP].chksum
    del p[IP].chksum, p[UDP].chksum
    q = Ether(bytes(p))
    assert (ip_sum, udp_sum) == (q[IP].chksum, q[UDP].chksum)


class Server:
    """A rig around one dhcp device; ``ask`` sends one frame and returns the reply
    (scapy) or None, checking that nothing else came out."""

    def __init__(self, pool: str = BASE_POOL, extra: str = "") -> None:
        self.rig = Rig(appliance(pool, extra))

    def ask(self, frame: bytes, now: float):
        out = self.rig.send("lan", [frame], now)["lan"]
        assert len(out) <= 1
        if not out:
            return None
        check_checksums(out[0])
        return Ether(out[0])

    def lease(self, mac=A, now=1.0, **kw) -> str:
        """DISCOVER + REQUEST (selecting): the bound address."""
        offer = self.ask(msg("discover", mac, **kw), now)
        ip = offer[BOOTP].yiaddr
        ack = self.ask(msg("request", mac, opts=(("server_id", SRV), ("requested_addr", ip)),
                           **kw), now)
        assert options(ack)["message-type"] == 5 and ack[BOOTP].yiaddr == ip
        return ip

    def counters(self) -> dict[str, int]:
        return {k[5:]: v for k, v in self.rig.counters().items()
                if k.startswith(("dhcp ", "dhcp.")) and v}

    def table(self, now: float) -> list[tuple[str, str]]:
        return [(ip, st) for ip, st, _ in self.rig.state.lease_list(now)]


# -- DORA and reply contents ----------------------------------------------------------

def test_discover_request_gives_an_address_with_every_option():
    s = Server()
    offer = s.ask(msg("discover", xid=0x1234abcd), 1.0)
    ip = offer[BOOTP].yiaddr
    assert ip.startswith("10.0.0.") and 100 <= int(ip.split(".")[-1]) <= 199
    assert options(offer) == {
        "message-type": 2, "server_id": SRV, "lease_time": 3600, "renewal_time": 1800,
        "rebinding_time": 3150, "subnet_mask": "255.255.255.0",
        "broadcast_address": "10.0.0.255", "router": "10.0.0.1",
        "name_server": ["10.0.0.53", "192.0.2.53"], "domain": b"lab.example"}
    b = offer[BOOTP]
    assert (b.op, b.xid, b.ciaddr, b.siaddr, b.giaddr, b.hops, b.secs) == \
        (2, 0x1234abcd, "0.0.0.0", "0.0.0.0", "0.0.0.0", 0, 0)
    assert b.chaddr[:6] == mac2str(A) and b.sname == b"\0" * 64 and b.file == b"\0" * 128
    assert len(offer[UDP].payload) >= 300  # padded to the classic BOOTP size
    # No broadcast flag: unicast to yiaddr at chaddr, from the server's port
    assert (offer.src, offer.dst, offer[IP].src, offer[IP].dst) == (SRV_MAC, A, SRV, ip)
    assert (offer[UDP].sport, offer[UDP].dport, offer[IP].ttl) == (67, 68, 64)
    assert s.table(1.5) == [(ip, "offered")]
    ack = s.ask(msg("request", opts=(("server_id", SRV), ("requested_addr", ip))), 2.0)
    assert options(ack)["message-type"] == 5 and ack[BOOTP].yiaddr == ip
    assert options(ack)["lease_time"] == 3600 and ack[IP].dst == ip
    assert s.table(3.0) == [(ip, "bound")]
    assert s.counters() == {"lan rx": 2, "lan tx": 2, "discovers": 1, "requests": 1,
                            "offers": 1, "acks": 1, "leases_bound": 1}


def test_broadcast_flag_gets_a_broadcast_reply():
    s = Server()
    offer = s.ask(msg("discover", flags=0x8000), 1.0)
    assert (offer.dst, offer[IP].dst, offer[BOOTP].flags) == (BC, "255.255.255.255", 0x8000)


def test_the_client_identifier_is_echoed_and_names_the_client():
    s = Server()
    cid = b"\x01" + mac2str(A)
    offer = s.ask(msg("discover", cid=cid), 1.0)
    assert options(offer)["client_id"] == cid
    # another hardware address with the same client identifier is the same client
    again = s.ask(msg("discover", B, cid=cid), 2.0)
    assert again[BOOTP].yiaddr == offer[BOOTP].yiaddr and again.dst == B
    # the same hardware address with another identifier is another client
    other = s.ask(msg("discover", A, cid=b"\x00host-a-second-interface"), 3.0)
    assert other[BOOTP].yiaddr != offer[BOOTP].yiaddr
    long_id = s.ask(msg("discover", A, cid=b"\xff" + bytes(range(40))), 4.0)
    assert options(long_id)["client_id"] == b"\xff" + bytes(range(40))
    assert len({offer[BOOTP].yiaddr, other[BOOTP].yiaddr, long_id[BOOTP].yiaddr}) == 3


def test_a_client_gets_its_address_again_and_the_one_it_asks_for():
    s = Server()
    ip = s.lease(A)
    assert s.ask(msg("discover", A), 5.0)[BOOTP].yiaddr == ip  # bound: same address
    assert s.table(5.0) == [(ip, "bound")]  # an offer does not unbind
    want = "10.0.0.150" if ip != "10.0.0.150" else "10.0.0.151"
    assert s.ask(msg("discover", B, opts=(("requested_addr", want),)), 6.0)[BOOTP].yiaddr \
        == want
    # a taken address is not given to another client, who gets another one
    other = s.ask(msg("discover", C, opts=(("requested_addr", ip),)), 7.0)[BOOTP].yiaddr
    assert other not in (ip, want)


def test_released_or_expired_addresses_come_back_to_the_same_client():
    s = Server()
    ip = s.lease(A)
    s.ask(msg("release", ciaddr=ip, src=ip, dst=SRV, dmac=SRV_MAC,
              opts=(("server_id", SRV),)), 10.0)
    assert s.table(10.0) == []
    assert s.ask(msg("discover", A), 11.0)[BOOTP].yiaddr == ip  # the hashed start


def test_lease_time_asked_for_is_clamped_and_t1_t2_scale():
    s = Server("{start: 10.0.0.100, end: 10.0.0.199, lease: 3600, max_lease: 7200, "
               "renew: 1000, rebind: 3000}")
    for asked, granted in ((600, 600), (10, 60), (99999, 7200)):
        o = options(s.ask(msg("discover", opts=(("lease_time", asked),)), 1.0))
        assert (o["lease_time"], o["renewal_time"], o["rebinding_time"]) == \
            (granted, 1000 * granted // 3600, 3000 * granted // 3600)
    o = options(s.ask(msg("discover"), 1.0))
    assert (o["lease_time"], o["renewal_time"], o["rebinding_time"]) == (3600, 1000, 3000)
    assert "router" not in o and "name_server" not in o and "domain" not in o


# -- REQUEST states (RFC 2131 4.3.2) ----------------------------------------------------

def test_selecting_another_server_withdraws_our_offer_silently():
    s = Server("{start: 10.0.0.100, end: 10.0.0.100}")
    ip = s.ask(msg("discover", A), 1.0)[BOOTP].yiaddr
    assert s.ask(msg("discover", B), 1.5) is None  # held for A
    assert s.ask(msg("request", A, opts=(("server_id", "10.0.0.3"), ("requested_addr", ip))),
                 2.0) is None
    assert s.table(2.0) == []
    assert s.ask(msg("discover", B), 3.0)[BOOTP].yiaddr == ip
    c = s.counters()
    assert c["drop/other_server"] == 1 and c["offers_withdrawn"] == 1
    assert c["drop/pool_exhausted"] == 1


def test_selecting_a_wrong_or_taken_address_is_naked_by_broadcast():
    s = Server()
    ip = s.ask(msg("discover", A), 1.0)[BOOTP].yiaddr
    wrong = "10.0.0.180" if ip != "10.0.0.180" else "10.0.0.181"
    nak = s.ask(msg("request", A, opts=(("server_id", SRV), ("requested_addr", wrong))), 2.0)
    assert options(nak) == {"message-type": 6, "server_id": SRV}
    assert (nak.dst, nak[IP].dst, nak[BOOTP].yiaddr, nak[BOOTP].ciaddr) == \
        (BC, "255.255.255.255", "0.0.0.0", "0.0.0.0")
    # the offer expired (offer_hold 60 s) and B took the address: A is refused
    assert s.ask(msg("discover", B, opts=(("requested_addr", ip),)), 70.0)[BOOTP].yiaddr == ip
    s.ask(msg("request", B, opts=(("server_id", SRV), ("requested_addr", ip))), 70.5)
    assert s.table(70.5) == [(ip, "bound")]
    nak = s.ask(msg("request", A, opts=(("server_id", SRV), ("requested_addr", ip))), 71.0)
    assert options(nak)["message-type"] == 6
    # an expired offer whose address is still free is acknowledged
    s2 = Server()
    ip2 = s2.ask(msg("discover", A), 1.0)[BOOTP].yiaddr
    ack = s2.ask(msg("request", A, opts=(("server_id", SRV), ("requested_addr", ip2))), 500.0)
    assert options(ack)["message-type"] == 5


def test_init_reboot():
    s = Server()
    ip = s.lease(A)
    ack = s.ask(msg("request", A, opts=(("requested_addr", ip),)), 100.0)
    assert options(ack)["message-type"] == 5 and ack[BOOTP].yiaddr == ip
    assert s.rig.state.events[EVENTS.index("leases_renewed")] == 1
    nak = s.ask(msg("request", A, opts=(("requested_addr", "10.0.0.199"
                                         if ip != "10.0.0.199" else "10.0.0.198"),)), 101.0)
    assert options(nak)["message-type"] == 6
    off_net = s.ask(msg("request", B, opts=(("requested_addr", "192.168.1.5"),)), 102.0)
    assert options(off_net)["message-type"] == 6  # another subnet: NAK even if unknown
    # a client without a lease here: silence (another server may know it)
    assert s.ask(msg("request", B, opts=(("requested_addr", "10.0.0.170"),)), 103.0) is None
    assert s.counters()["drop/unknown_client"] == 1


def test_renewing_is_unicast_to_ciaddr_and_extends_the_lease():
    s = Server()
    ip = s.lease(A)
    exp0 = s.rig.state.lease_list(1.0)[0][2]
    ack = s.ask(msg("request", A, ciaddr=ip, src=ip, dst=SRV, dmac=SRV_MAC, flags=0x8000),
                1800.0)
    assert options(ack)["message-type"] == 5
    # ciaddr set: unicast to ciaddr at the frame's source, broadcast flag or not
    assert (ack.dst, ack[IP].dst, ack[BOOTP].ciaddr, ack[BOOTP].yiaddr) == (A, ip, ip, ip)
    assert s.rig.state.lease_list(1800.0)[0][2] == pytest.approx(exp0 + 1799.0)
    # rebinding (broadcast) is acknowledged too, and the lease lives on past the first
    ack = s.ask(msg("request", A, ciaddr=ip, src=ip), 3500.0)
    assert options(ack)["message-type"] == 5 and ack[IP].dst == ip
    assert s.table(5000.0) == [(ip, "bound")]
    assert s.counters()["leases_renewed"] == 2


def test_renewing_or_rebinding_without_a_lease_here():
    s = Server()
    # renewing (unicast to us) an address that may be the client's and is free: the
    # server takes the binding back (it lost its state)
    ack = s.ask(msg("request", A, ciaddr="10.0.0.120", src="10.0.0.120", dst=SRV,
                    dmac=SRV_MAC), 1.0)
    assert options(ack)["message-type"] == 5 and s.table(1.0) == [("10.0.0.120", "bound")]
    # renewing another client's address, or one not in the pool: NAK
    for ip in ("10.0.0.120", "10.0.0.50"):
        nak = s.ask(msg("request", B, ciaddr=ip, src=ip, dst=SRV, dmac=SRV_MAC), 2.0)
        assert options(nak)["message-type"] == 6
    # rebinding (broadcast) another client's address: NAK; a free one: silence
    nak = s.ask(msg("request", B, ciaddr="10.0.0.120", src="10.0.0.120"), 3.0)
    assert options(nak)["message-type"] == 6
    assert s.ask(msg("request", B, ciaddr="10.0.0.130", src="10.0.0.130"), 4.0) is None
    off = s.ask(msg("request", B, ciaddr="172.16.0.5", src="172.16.0.5"), 5.0)
    assert options(off)["message-type"] == 6


def test_requests_missing_what_they_need():
    s = Server()
    assert s.ask(msg("request", A, opts=(("server_id", SRV),)), 1.0) is None
    assert s.ask(msg("inform", A), 2.0) is None
    assert s.ask(msg("decline", A, opts=(("server_id", SRV),)), 3.0) is None
    assert s.counters()["drop/bad_request"] == 3


# -- RELEASE, DECLINE, INFORM -----------------------------------------------------------

def test_release_frees_the_address_for_another_client():
    s = Server("{start: 10.0.0.100, end: 10.0.0.100}")
    ip = s.lease(A)
    assert s.ask(msg("discover", B), 2.0) is None
    # a release naming another server, or another address, changes nothing
    s.ask(msg("release", A, ciaddr=ip, src=ip, dst=SRV, dmac=SRV_MAC,
              opts=(("server_id", "10.0.0.9"),)), 3.0)
    s.ask(msg("release", B, ciaddr=ip, src=ip, dst=SRV, dmac=SRV_MAC), 3.0)
    assert s.table(3.0) == [(ip, "bound")]
    assert s.ask(msg("release", A, ciaddr=ip, src=ip, dst=SRV, dmac=SRV_MAC,
                     opts=(("server_id", SRV),)), 4.0) is None
    assert s.table(4.0) == []
    assert s.lease(B, now=5.0) == ip
    c = s.counters()
    assert c["leases_released"] == 1 and c["drop/consumed"] == 2
    assert c["drop/other_server"] == 1 and c["drop/pool_exhausted"] == 1


def test_decline_keeps_the_address_out_for_decline_hold():
    s = Server("{start: 10.0.0.100, end: 10.0.0.101}", "    decline_hold: 100")
    ip = s.lease(A)
    assert s.ask(msg("decline", A, opts=(("server_id", SRV), ("requested_addr", ip))),
                 2.0) is None
    assert s.table(2.0) == [(ip, "declined")]
    other = s.ask(msg("discover", A), 3.0)[BOOTP].yiaddr  # A is offered the other one
    assert other != ip
    assert s.ask(msg("discover", B, opts=(("requested_addr", ip),)), 4.0) is None
    assert s.counters()["drop/pool_exhausted"] == 1
    assert s.ask(msg("discover", B, opts=(("requested_addr", ip),)), 200.0)[BOOTP].yiaddr == ip
    assert s.counters()["addresses_declined"] == 1


def test_inform_gets_the_configuration_without_an_address():
    s = Server()
    ack = s.ask(msg("inform", A, ciaddr="10.0.0.77", src="10.0.0.77", dst=SRV, dmac=SRV_MAC,
                    flags=0x8000), 1.0)
    o = options(ack)
    assert o["message-type"] == 5 and "lease_time" not in o and "renewal_time" not in o
    assert o["router"] == "10.0.0.1" and o["subnet_mask"] == "255.255.255.0"
    assert (ack[BOOTP].yiaddr, ack[BOOTP].ciaddr, ack[IP].dst, ack.dst) == \
        ("0.0.0.0", "10.0.0.77", "10.0.0.77", A)
    assert s.table(1.0) == []


# -- reservations, exhaustion, expiry ---------------------------------------------------

RESERVED = """    reservations:
      - {mac: "02:00:00:00:00:0a", ip: 10.0.0.20}
      - {mac: "02:00:00:00:00:0b", ip: 10.0.0.101}"""


def test_reservations():
    s = Server("{start: 10.0.0.100, end: 10.0.0.102}", RESERVED)
    assert s.lease(A) == "10.0.0.20"  # outside the range
    assert s.lease(B) == "10.0.0.101"  # inside it
    # nobody else gets a reserved address, even asking for it
    got = s.ask(msg("discover", C, opts=(("requested_addr", "10.0.0.101"),)), 2.0)
    assert got[BOOTP].yiaddr in ("10.0.0.100", "10.0.0.102")
    # C holds an offer of another address: its init-reboot for A's address is refused
    nak = s.ask(msg("request", C, opts=(("requested_addr", "10.0.0.20"),)), 3.0)
    assert options(nak)["message-type"] == 6
    # a reserved client asking for another address is refused
    nak = s.ask(msg("request", A, opts=(("requested_addr", "10.0.0.100"),)), 4.0)
    assert options(nak)["message-type"] == 6


def test_exhaustion_is_silence_and_counted():
    s = Server("{start: 10.0.0.100, end: 10.0.0.101}")
    got = {s.lease(A), s.lease(B)}
    assert got == {"10.0.0.100", "10.0.0.101"}
    for t in (2.0, 3.0):
        assert s.ask(msg("discover", C), t) is None
    assert s.counters()["drop/pool_exhausted"] == 2


def test_leases_expire_with_now():
    s = Server("{start: 10.0.0.100, end: 10.0.0.100, lease: 100}")
    ip = s.lease(A, now=1.0)
    assert s.ask(msg("discover", B), 100.0) is None
    assert s.lease(B, now=102.0) == ip  # A's lease ended at 101
    assert s.counters()["lease_entries_expired"] >= 1
    # A renewing its old address now gets a NAK: it is B's
    nak = s.ask(msg("request", A, ciaddr=ip, src=ip, dst=SRV, dmac=SRV_MAC), 103.0)
    assert options(nak)["message-type"] == 6


def test_offers_expire_after_offer_hold():
    s = Server("{start: 10.0.0.100, end: 10.0.0.100}", "    offer_hold: 5")
    s.ask(msg("discover", A), 1.0)
    assert s.ask(msg("discover", B), 5.5) is None
    assert s.ask(msg("discover", B), 6.5)[BOOTP].yiaddr == "10.0.0.100"


def test_a_changed_config_moves_leases_that_no_longer_fit():
    """Leases carried into a smaller pool (a reload) are refused, not kept."""
    s = Server()
    ip = s.lease(A)
    data = s.rig.state.export_shared(1.0)
    t = Server("{start: 10.0.0.10, end: 10.0.0.20}")
    t.rig.state.import_shared(data, 1.0)
    nak = t.ask(msg("request", A, ciaddr=ip, src=ip, dst=SRV, dmac=SRV_MAC), 2.0)
    assert options(nak)["message-type"] == 6
    offer = t.ask(msg("discover", A), 3.0)
    assert offer[BOOTP].yiaddr.startswith("10.0.0.") and \
        10 <= int(offer[BOOTP].yiaddr.split(".")[-1]) <= 20


# -- everything else ----------------------------------------------------------------------

def _bootp_raw(frame: bytes, patch: dict[int, bytes], cut: int | None = None) -> bytes:
    """Patch bytes of the BOOTP message (offsets from its start), fix UDP/IP lengths."""
    p = Ether(frame)
    raw = bytearray(bytes(p[UDP].payload))
    for off, b in patch.items():
        raw[off:off + len(b)] = b
    if cut is not None:
        raw = raw[:cut]
    return bytes(Ether(src=p.src, dst=p.dst) / IP(src=p[IP].src, dst=p[IP].dst)
                 / UDP(sport=68, dport=67) / bytes(raw))


def _malformed_cases() -> list[tuple[str, bytes]]:
    d = msg("discover")
    opts = 240
    bad_udp = bytearray(d)
    bad_udp[40:42] = b"\x12\x34"
    bad_ip = bytearray(d)
    bad_ip[24:26] = b"\x00\x01"
    frag = bytes(Ether(src=A, dst=BC) / IP(src="0.0.0.0", dst="255.255.255.255", flags="MF")
                 / UDP(sport=68, dport=67) / BOOTP(chaddr=mac2str(A)) / DHCP(options=["end"]))
    return [
        ("malformed", d[:30]),
        ("malformed", bytes(Ether(src=A, dst=BC) / ARP(pdst=SRV))[:30]),
        ("malformed", frag),
        ("malformed", b"\x02" * 10),
        ("unsupported", bytes(Ether(src=A, dst=BC) / Dot1Q(vlan=5) / IP() / UDP(dport=67))),
        ("unsupported", bytes(Ether(src=A, dst=BC) / IPv6() / UDP(dport=547))),
        ("not_for_me", msg("discover", dmac="02:00:00:00:00:99")),
        ("not_for_me", msg("discover", dst="10.0.0.3", dmac=SRV_MAC)),
        ("not_dhcp", bytes(Ether(src=A, dst=SRV_MAC) / IP(src="10.0.0.5", dst=SRV) / ICMP())),
        ("not_dhcp", bytes(Ether(src=A, dst=SRV_MAC) / IP(src="10.0.0.5", dst=SRV)
                           / TCP(dport=67))),
        ("not_dhcp", bytes(Ether(src=A, dst=BC) / IP(dst="255.255.255.255")
                           / UDP(sport=67, dport=68) / BOOTP(op=2))),
        ("bad_checksum", bytes(bad_udp)),
        ("bad_checksum", bytes(bad_ip)),
        ("bootp_truncated", _bootp_raw(d, {}, cut=239)),
        ("bad_cookie", _bootp_raw(d, {236: b"\x63\x82\x53\x00"})),
        ("bad_option", _bootp_raw(d, {opts: b"\x35\x02"})),  # type of length 2
        ("bad_option", _bootp_raw(d, {opts: b"\x32\x09"}, cut=opts + 5)),  # past the end
        ("bad_option", _bootp_raw(d, {opts: b"\x3d\x01\x01"})),  # client id too short
        ("bad_option", _bootp_raw(d, {opts: b"\x34\x01\x07"})),  # overload 7
        ("no_message_type", _bootp_raw(d, {opts: b"\xff"})),
        ("not_request", _bootp_raw(d, {0: b"\x02"})),
        ("bad_hardware", _bootp_raw(d, {1: b"\x06"})),
        ("bad_hardware", _bootp_raw(d, {28: bytes.fromhex("010203040506")})),
        ("relayed", msg("discover", giaddr="10.9.0.1")),
        ("unsupported_message", msg("offer")),
        ("unsupported_message", msg("ack")),
        ("arp_not_for_me", bytes(Ether(src=A, dst=BC) / ARP(hwsrc=A, psrc="10.0.0.5",
                                                           pdst="10.0.0.1"))),
        ("arp_not_for_me", bytes(Ether(src=A, dst=SRV_MAC) / ARP(op=2, hwsrc=A,
                                                                psrc="10.0.0.5", pdst=SRV))),
    ]


def test_malformed_and_foreign_frames_are_dropped_by_name():
    s = Server()
    cases = _malformed_cases()
    out = s.rig.send("lan", [f for _, f in cases], 1.0)
    assert out["lan"] == []
    want: dict[str, int] = {}
    for reason, _ in cases:
        want[f"drop/{reason}"] = want.get(f"drop/{reason}", 0) + 1
    got = {k: v for k, v in s.counters().items() if k.startswith("drop/")}
    assert got == want
    assert set(r for r, _ in cases) | {"other_server", "unknown_client", "pool_exhausted",
                                       "consumed", "bad_request", "no_room"} == set(DROPS)


def test_options_in_the_file_field_are_read_when_overloaded():
    """Option 52 = 1: the file field holds options too (the message type here)."""
    d = msg("discover", opts=(("requested_addr", "10.0.0.150"),))
    p = Ether(d)
    raw = bytearray(bytes(p[UDP].payload))
    typ = raw.index(b"\x35\x01\x01", 240)
    raw[typ:typ + 3] = b"\x34\x01\x01"  # message type -> overload: file
    raw[108:112] = b"\x35\x01\x01\xff"
    f = bytes(Ether(src=A, dst=BC) / IP(src="0.0.0.0", dst="255.255.255.255")
              / UDP(sport=68, dport=67) / bytes(raw))
    offer = Server().ask(f, 1.0)
    assert options(offer)["message-type"] == 2 and offer[BOOTP].yiaddr == "10.0.0.150"
    assert offer[BOOTP].file == b"\0" * 128


def test_arp_for_the_server_is_answered():
    s = Server()
    r = s.ask(bytes(Ether(src=A, dst=BC) / ARP(hwsrc=A, psrc="10.0.0.150", pdst=SRV)), 1.0)
    assert len(bytes(r)) == 60
    assert (r.dst, r.src, r[ARP].op, r[ARP].hwsrc, r[ARP].psrc, r[ARP].hwdst, r[ARP].pdst) \
        == (A, SRV_MAC, 2, SRV_MAC, SRV, A, "10.0.0.150")


def test_the_port_mac_is_derived_when_not_given():
    from dva.nf.router import derive_mac, mac_str
    text = appliance().replace(f", mac: {SRV_MAC}", "")
    r = Rig(text)
    out = r.send("lan", [msg("discover")], 1.0)["lan"]
    assert Ether(out[0]).src == mac_str(derive_mac("dhcp", "lan"))


# -- config errors ---------------------------------------------------------------------------

@pytest.mark.parametrize("pool, extra, path, words", [
    ("{start: 10.0.1.100, end: 10.0.0.199}", "", "pool.start", "outside the subnet"),
    ("{start: 10.0.0.100, end: 10.0.0.255}", "", "pool.end", "broadcast address"),
    ("{start: 10.0.0.150, end: 10.0.0.100}", "", "pool.end", "ends"),
    ("{start: 10.0.0.1, end: 10.0.0.9}", "", "pool.start", "server's own address"),
    ("{start: 10.0.0.100, end: 10.0.0.199, router: 10.0.0.150}", "", "pool.router",
     "in the range"),
    ("{start: 10.0.0.100, end: 10.0.0.199, router: 10.0.9.1}", "", "pool.router",
     "outside the subnet"),
    ("{start: 10.0.0.100, end: 10.0.0.199, dns: [10.0.0.120]}", "", "pool.dns[0]",
     "in the range"),
    ("{start: 10.0.0.100, end: 10.0.0.199, dns: [8.8.8.8, 10.0.0.2]}", "", "pool.dns[1]",
     "answers DHCP, not DNS"),
    ("{start: 10.0.0.100, end: 10.0.0.199, lease: 100, renew: 90, rebind: 80}", "", "pool",
     "renew (90) < rebind (80)"),
    ("{start: 10.0.0.100, end: 10.0.0.199, lease: 100, max_lease: 50}", "",
     "pool.max_lease", "below"),
    ("{start: 10.0.0.100, end: 10.0.0.199, domain: 'bad domain'}", "", "pool.domain",
     "bad domain"),
    ("{start: 10.0.0.100, end: 10.0.0.199, color: red}", "", "pool.color", "unknown key"),
    (BASE_POOL, "    reservations: [{mac: '02:00:00:00:00:01', ip: 10.0.0.2}]",
     "reservations[0].ip", "server's own address"),
    (BASE_POOL, "    reservations: [{mac: '01:00:5e:00:00:01', ip: 10.0.0.20}]",
     "reservations[0].mac", "unicast"),
    (BASE_POOL, "    reservations: [{mac: '02:00:00:00:00:01', ip: 10.0.0.20},\n"
                "                   {mac: '02:00:00:00:00:01', ip: 10.0.0.21}]",
     "reservations[1].mac", "reserved twice"),
    (BASE_POOL, "    reservations: [{mac: '02:00:00:00:00:01', ip: 10.0.0.1}]",
     "reservations[0].ip", "the router"),
    (BASE_POOL, "    offer_hold: 0", "offer_hold", "greater than or equal to 1"),
])
def test_config_errors_are_reported_at_their_path(pool, extra, path, words):
    with pytest.raises(ApplianceError) as e:
        parse_appliance(appliance(pool, extra))
    text = e.value.render()
    assert f"devices.dhcp.{path}" in text and words in text, text


def test_a_dhcp_server_has_one_port_of_a_subnet_with_room():
    two = appliance().replace(f"lan: {{ip: 10.0.0.2/24, mac: {SRV_MAC}}}",
                              "lan: {ip: 10.0.0.2/24}, wan: {ip: 10.1.0.2/24}")
    with pytest.raises(ApplianceError, match="exactly one port"):
        parse_appliance(two)
    small = appliance("{start: 10.0.0.3, end: 10.0.0.3}").replace("10.0.0.2/24",
                                                                   "10.0.0.2/31")
    with pytest.raises(ApplianceError, match="too small"):
        parse_appliance(small)


# -- shared state: replication and reload ----------------------------------------------

def test_leases_replicate_through_export_and_import():
    s = Server()
    ip = s.lease(A)
    t = Server()
    t.rig.state.import_shared(s.rig.state.export_shared(2.0), 2.0)
    assert t.table(2.0) == [(ip, "bound")]
    ack = t.ask(msg("request", A, opts=(("requested_addr", ip),)), 3.0)  # init-reboot
    assert options(ack)["message-type"] == 5


def test_leases_survive_a_config_reload():
    from dva.worker.reload import swap

    s = Server()
    ip = s.lease(A)
    new = Rig(appliance(BASE_POOL.replace("lease: 3600", "lease: 1200")))
    new.engine = type(new.engine)(new.plan, s.rig.pool)
    report = swap(s.rig.engine, new.engine, 5.0)
    assert report.state_kept == ["dhcp"]
    assert [(a, st) for a, st, _ in new.engine.states[0].lease_list(5.0)] == [(ip, "bound")]


# -- persistence ---------------------------------------------------------------------------

def _engine_with_lease(tmp_path: Path, now: float = 1.0):
    s = Server()
    return s, s.lease(A, now=now)


def test_state_files_round_trip_with_wall_clock_expiry(tmp_path):
    s, ip = _engine_with_lease(tmp_path, now=1000.0)  # bound until 4600 on this clock
    p = Persistence(tmp_path, "default", "t")
    assert p.maybe_save(s.rig.engine, 1000.0, offset=5000.0) == 1
    assert p.maybe_save(s.rig.engine, 1010.0, offset=5000.0) == 0  # nothing changed
    p.close()
    f = tmp_path / "default" / "t" / "dhcp.state"
    assert f.exists() and decode(f.read_bytes()).header["type"] == "dhcp"
    # A new process whose clock is 7000 behind the wall (it was 5000 before) starts
    # 100 s of wall time later: the lease keeps its wall-clock expiry (9600).
    t = Server()
    q = Persistence(tmp_path, "default", "t")
    q.load(t.rig.engine, now=3100.0 - 2000.0, offset=7000.0)
    (addr, state, exp), = t.rig.engine.states[0].lease_list(1100.0)
    assert (addr, state) == (ip, "bound") and exp + 7000.0 == pytest.approx(4600.0 + 5000.0)
    assert "state of dhcp loaded" in q.messages[0] and "leases 1, addrs 1" in q.messages[0]
    ack = t.ask(msg("request", A, opts=(("requested_addr", ip),)), 1101.0)
    assert options(ack)["message-type"] == 5
    q.close()


def test_leases_that_expired_while_stopped_are_dropped_on_load(tmp_path):
    s, ip = _engine_with_lease(tmp_path, now=10.0)
    p = Persistence(tmp_path, "default", "t")
    p.maybe_save(s.rig.engine, 10.0, offset=0.0)
    p.close()
    t = Server()
    q = Persistence(tmp_path, "default", "t")
    q.load(t.rig.engine, now=10.0, offset=3700.0)  # an hour and more passed
    assert t.table(10.0) == [] and "2 expired while stopped" in q.messages[0]
    q.close()


def test_a_corrupt_file_is_set_aside_and_the_device_starts_fresh(tmp_path):
    s, _ = _engine_with_lease(tmp_path)
    p = Persistence(tmp_path, "default", "t")
    p.maybe_save(s.rig.engine, 1.0, 0.0)
    p.close()
    f = tmp_path / "default" / "t" / "dhcp.state"
    good = f.read_bytes()
    for bad, why in ((good[:-7], "cut short"), (good[:-3] + b"xyz", "checksum"),
                     (b"garbage", "not a dva state file"),
                     (good.replace(b'"type": "dhcp"', b'"type": "nat"'), "saved by a nat")):
        f.write_bytes(bad)
        t = Server()
        q = Persistence(tmp_path, "default", "t")
        q.load(t.rig.engine, 2.0, 0.0)
        q.close()
        assert t.table(2.0) == [] and not f.exists()
        assert why in q.messages[0] and "starts with fresh state" in q.messages[0]
        aside = sorted((tmp_path / "default" / "t").glob("dhcp.state.bad-*"))
        assert aside and aside[-1].read_bytes() == bad
        for a in aside:
            a.unlink()


def test_a_torn_write_never_replaces_the_good_file(tmp_path, monkeypatch):
    s, ip = _engine_with_lease(tmp_path)
    p = Persistence(tmp_path, "default", "t")
    p.maybe_save(s.rig.engine, 1.0, 0.0)
    f = tmp_path / "default" / "t" / "dhcp.state"
    good = f.read_bytes()
    s.lease(B, now=2.0)  # a change to save

    real_write = os.write

    def crash(fd, data):  # half the bytes reach the temporary file, then the "crash"
        real_write(fd, bytes(data[:len(data) // 2]))
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(persist.os, "write", crash)
    assert p.maybe_save(s.rig.engine, 3.0, 0.0, force=True) == 0
    assert "No space left on device" in p.messages[-1] and p.failures == 1
    monkeypatch.undo()
    assert f.read_bytes() == good
    assert list((tmp_path / "default" / "t").glob(".*tmp*")) == []
    # A crash (kill -9) between the write and the rename leaves a torn temporary file:
    # it is never loaded, and the next start removes it.
    torn = f.with_name(f".{f.name}.tmp-99999")
    torn.write_bytes(good[:40])
    p.close()
    t = Server()
    q = Persistence(tmp_path, "default", "t")
    q.load(t.rig.engine, 3.0, 0.0)
    assert t.table(3.0) == [(ip, "bound")] and not torn.exists()
    # and the change is saved once writing works again
    assert q.maybe_save(s.rig.engine, 4.0, 0.0, force=True) == 1
    q.close()


def test_write_atomic_replaces_whole_files(tmp_path):
    f = tmp_path / "x.state"
    write_atomic(f, b"one")
    write_atomic(f, b"two" * 1000)
    assert f.read_bytes() == b"two" * 1000 and [p.name for p in tmp_path.iterdir()] == ["x.state"]


def test_saves_are_rate_limited_and_follow_changes(tmp_path):
    s, _ = _engine_with_lease(tmp_path)
    p = Persistence(tmp_path, "default", "t")
    assert p.maybe_save(s.rig.engine, 1.0, 0.0) == 1
    s.lease(B, now=1.1)
    assert p.maybe_save(s.rig.engine, 1.2, 0.0) == 0  # within SAVE_INTERVAL
    assert p.maybe_save(s.rig.engine, 1.6, 0.0) == 1
    assert p.maybe_save(s.rig.engine, 2.5, 0.0) == 0  # no change since
    assert p.saves == 2
    p.close()


def test_one_appliance_state_directory_is_used_by_one_run_at_a_time(tmp_path):
    p = Persistence(tmp_path, "acme", "edge")
    q = Persistence(tmp_path, "acme", "edge")
    other = Persistence(tmp_path, "other", "edge")
    assert p.enabled and other.enabled and not q.enabled
    assert "in use by another dva run" in q.messages[0]
    p.close()
    other.close()
    r = Persistence(tmp_path, "acme", "edge")
    assert r.enabled
    r.close()


def test_an_unwritable_state_directory_is_reported_not_fatal(tmp_path):
    (tmp_path / "file").write_text("")
    p = Persistence(tmp_path / "file", "a", "b")
    assert not p.enabled and "not loaded or saved" in p.messages[0]
    assert p.maybe_save(None, 1.0, 0.0, force=True) == 0


def test_encode_decode():
    data = encode("dhcp", "dhcp", b"payload", 5.0, 100.0)
    saved = decode(data)
    assert saved.payload == b"payload" and saved.header["wall"] == 105.0
    with pytest.raises(StateFileError, match="bad header"):
        decode(b"DVA-STATE 1\n{not json}\n")


def test_offline_runs_keep_state_only_with_a_state_dir(tmp_path):
    """``dva run`` over pcap files: leases saved with --state-dir, loaded by the next run
    (the INIT-REBOOT is acknowledged), none written without it."""
    from dva.ports.pcapfile import read_frames, write_frames

    text = appliance().replace("dhcp.lan: {memory: lan}",
                               "dhcp.lan: {pcap: {read: in.pcap, write: out.pcap}}")
    (tmp_path / "a.yaml").write_text(text)
    cli = [sys.executable, "-m", "dva.cli", "run", str(tmp_path / "a.yaml"), "--json"]
    s = Server()
    ip = s.ask(msg("discover"), 1.0)[BOOTP].yiaddr
    write_frames(tmp_path / "in.pcap", [
        (1.0, msg("discover")),
        (1.5, msg("request", opts=(("server_id", SRV), ("requested_addr", ip))))])
    env = dict(os.environ, DVA_STATE_DIR=str(tmp_path / "env-state"))
    subprocess.run(cli, check=True, capture_output=True, env=env, timeout=600)
    assert not (tmp_path / "env-state").exists()  # offline ignores the environment
    r = subprocess.run(cli + ["--state-dir", str(tmp_path / "st")], check=True,
                       capture_output=True, text=True, timeout=600)
    assert (tmp_path / "st" / "default" / "t" / "dhcp.state").exists()
    write_frames(tmp_path / "in.pcap", [(60.0, msg("request",
                                                   opts=(("requested_addr", ip),)))])
    r = subprocess.run(cli + ["--state-dir", str(tmp_path / "st")], check=True,
                       capture_output=True, text=True, timeout=600)
    assert "state of dhcp loaded" in r.stderr
    (_, f), = read_frames(tmp_path / "out.pcap")
    assert options(Ether(f))["message-type"] == 5 and Ether(f)[BOOTP].yiaddr == ip
    assert json.loads(r.stdout)["dhcp leases_renewed"] == 1


# -- compiled == reference ------------------------------------------------------------------

def dhcp_workload() -> dict[str, np.ndarray]:
    """Every message kind from a dozen clients over a small pool, with bad frames mixed
    in; returns every frame out and every counter."""
    import random

    rng = random.Random(5)
    s = Server("{start: 10.0.0.100, end: 10.0.0.107, router: 10.0.0.1, dns: [10.0.0.53], "
               "lease: 300}", "    offer_hold: 20\n    decline_hold: 50\n" + RESERVED)
    macs = [f"02:00:00:00:01:{i:02x}" for i in range(12)] + [A, B]
    bad = [f for _, f in _malformed_cases()]
    frames_out: list[bytes] = []
    known: dict[str, str] = {}  # client MAC -> address last acknowledged
    now = 1.0
    for _ in range(600):
        now += rng.random() * 3
        mac = rng.choice(macs)
        ip = f"10.0.0.{rng.choice([20, 101, *range(100, 108), 150])}"
        if mac in known and rng.random() < 0.6:
            ip = known[mac]  # the client's own address, mostly
        k = rng.randrange(10)
        sid = rng.choice([SRV, SRV, "10.0.0.3"])
        if k == 0:
            f = msg("discover", mac, opts=(("requested_addr", ip),) if rng.random() < .3
                    else (), flags=rng.choice([0, 0x8000]))
        elif k == 1:
            f = msg("request", mac, opts=(("server_id", sid), ("requested_addr", ip)))
        elif k == 2:
            f = msg("request", mac, opts=(("requested_addr", ip),))
        elif k == 3:
            f = msg("request", mac, ciaddr=ip, src=ip, dst=rng.choice([SRV, "255.255.255.255"]),
                    dmac=SRV_MAC)
        elif k == 4:
            f = msg("release", mac, ciaddr=ip, src=ip, dst=SRV, dmac=SRV_MAC,
                    opts=(("server_id", sid),))
        elif k == 5:
            f = msg("decline", mac, opts=(("server_id", sid), ("requested_addr", ip)))
        elif k == 6:
            f = msg("inform", mac, ciaddr=ip, src=ip, dst=SRV, dmac=SRV_MAC)
        elif k == 7:
            f = msg("discover", mac, cid=bytes(rng.randrange(256) for _ in range(
                rng.choice([2, 7, 40]))))
        elif k == 8:
            f = rng.choice(bad)
        else:  # a valid message with bytes changed and maybe cut short, in valid UDP
            m = msg(rng.choice(["discover", "request", "inform", "release"]), mac,
                    opts=(("server_id", sid), ("requested_addr", ip), ("lease_time", 100)),
                    cid=b"\x01abcdef")
            patch = {rng.randrange(0, 280): bytes([rng.randrange(256)])
                     for _ in range(rng.randrange(1, 4))}
            f = _bootp_raw(m, patch, cut=rng.randrange(200, 300) if rng.random() < .3
                           else None)
        out = s.rig.send("lan", [f], now)["lan"]
        for r in out:
            p = Ether(r)
            if DHCP in p and options(p).get("message-type") == 5 and p[BOOTP].yiaddr != \
                    "0.0.0.0":
                known[p.dst] = p[BOOTP].yiaddr
        frames_out += out
    counters = s.rig.engine.counter_table()
    return {"frames": np.frombuffer(b"".join(frames_out), np.uint8),
            "lens": np.array([len(f) for f in frames_out], np.int64),
            "counters": np.array(list(counters.values()), np.int64)}




@pytest.mark.slow
def test_compiled_equals_reference():
    jit = assert_matches_reference("test_dhcp", "dhcp_workload")
    c = dict(zip(Rig(appliance()).engine.counter_table(), jit["counters"]))
    for name in ("dhcp offers", "dhcp acks", "dhcp naks", "dhcp leases_released",
                 "dhcp addresses_declined", "dhcp drop/pool_exhausted",
                 "dhcp drop/unknown_client", "dhcp lease_entries_expired"):
        assert c[name] > 0, name  # the workload reaches every part of the machine
