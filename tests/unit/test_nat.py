"""The nat device: source NAT with endpoint-independent mapping and bucket-keeping
ports, replies, ICMP echo, filtering, port forwards, static NAT, hairpinning, ICMP
error translation, port exhaustion, state export/import. Checksums are checked by
recomputing them with scapy; buckets by parsing the frames with dva's parser.
"""

from __future__ import annotations

import random

import pytest
from rig import Rig
from scapy.layers.inet import ICMP as SICMP
from scapy.layers.inet import IP as SIP
from scapy.layers.inet import TCP as STCP
from scapy.layers.inet import UDP as SUDP
from scapy.layers.inet import IPerror, UDPerror
from scapy.layers.l2 import Ether

from dva.graph.appliance import ApplianceError, parse_appliance
from dva.packet import layout as L
from dva.packet.batch import PacketBatch, PacketPool
from dva.packet.build import ICMP, TCP, UDP, Eth, IPv4, Raw
from dva.packet.parse import addr_hash, bucket_port, parse

IN_MAC, OUT_MAC = "02:00:00:00:00:05", "02:00:00:00:00:01"
NAT_IP = "198.51.100.2"
_POOL = PacketPool(64)


def appliance(nat: str = f"snat: {{to: {NAT_IP}}}") -> str:
    body = "\n".join("    " + line for line in nat.strip().splitlines())
    return f"""
appliance: t
devices:
  nat:
    type: nat
    ports: [inside, outside]
{body}
attach:
  nat.inside: {{memory: in}}
  nat.outside: {{memory: out}}
"""


def ip_int(a: str) -> int:
    return int.from_bytes(bytes(int(x) for x in a.split(".")), "big")


def frame(src, dst, l4, inside=True) -> bytes:
    smac, dmac = (IN_MAC, OUT_MAC) if inside else (OUT_MAC, IN_MAC)
    return bytes(Eth(src=smac, dst=dmac) / IPv4(src=src, dst=dst) / l4)


def bucket_of(f: bytes) -> int:
    b = PacketBatch(_POOL, 1)
    b.add_frame(f)
    parse(b, 4096)
    v = int(b.meta[0, L.BUCKET])
    b.release_all()
    return v


def checksums_ok(f: bytes) -> bool:
    """Every checksum in the frame is what scapy computes afresh."""
    e = Ether(f)
    ip = e[SIP]
    fresh = Ether(f)
    del fresh[SIP].chksum
    for layer in (STCP, SUDP, SICMP):
        if fresh.haslayer(layer) and not isinstance(fresh[layer].underlayer, IPerror):
            if layer is not SUDP or fresh[SUDP].chksum != 0:
                del fresh[layer].chksum
    fresh = Ether(bytes(fresh))
    return bytes(fresh) == f and ip.chksum == fresh[SIP].chksum


def test_snat_tcp_keeps_the_bucket_and_translates_replies_back():
    rig = Rig(appliance())
    syn = frame("10.0.0.5", "192.0.2.9", TCP(sport=40000, dport=80, seq=1000, flags="S"))
    (out,) = rig.send("inside", [syn], 1.0)["outside"]
    o = Ether(out)
    np_ = o[STCP].sport
    assert o[SIP].src == NAT_IP and o[SIP].dst == "192.0.2.9" and o[STCP].dport == 80
    assert 1024 <= np_ <= 65535 and checksums_ok(out)
    assert bucket_of(out) == bucket_of(syn)
    assert np_ % 4096 == bucket_port(int(addr_hash(ip_int("10.0.0.5"), 0, 0, 0)), 40000,
                                     int(addr_hash(ip_int(NAT_IP), 0, 0, 0)), 4095)
    synack = frame("192.0.2.9", NAT_IP, TCP(sport=80, dport=np_, seq=5000, ack=1001,
                                             flags="SA"), inside=False)
    (back,) = rig.send("outside", [synack], 1.1)["inside"]
    b = Ether(back)
    assert (b[SIP].src, b[SIP].dst, b[STCP].sport, b[STCP].dport) == \
        ("192.0.2.9", "10.0.0.5", 80, 40000)
    assert checksums_ok(back) and bucket_of(back) == bucket_of(syn)
    ack = frame("10.0.0.5", "192.0.2.9", TCP(sport=40000, dport=80, seq=1001, ack=5001,
                                             flags="A") / Raw(b"hello"))
    (out2,) = rig.send("inside", [ack], 1.2)["outside"]
    assert Ether(out2)[STCP].sport == np_ and checksums_ok(out2)
    c = rig.counters()
    assert c["nat snat_flows"] == 1 and c["nat mappings_created"] == 1
    assert c["nat flows_created"] == 1


def test_every_translated_flow_stays_in_its_bucket():
    rig = Rig(appliance(f"snat: {{to: [{NAT_IP}, 198.51.100.3-198.51.100.6]}}"), slots=4096)
    rnd = random.Random(5)
    frames = []
    for _ in range(1000):
        src = f"10.0.{rnd.randrange(256)}.{rnd.randrange(1, 255)}"
        dst = f"203.0.113.{rnd.randrange(1, 255)}"
        l4 = UDP(sport=rnd.randrange(1024, 65536), dport=rnd.choice([53, 123, 443])) \
            if rnd.random() < 0.5 else TCP(sport=rnd.randrange(1024, 65536), dport=443,
                                           flags="S")
        frames.append(frame(src, dst, l4))
    out = rig.send("inside", frames, 1.0)["outside"]
    assert len(out) == 1000
    for f, o in zip(frames, out):
        assert bucket_of(o) == bucket_of(f)
        assert Ether(o)[SIP].src in {NAT_IP} | {f"198.51.100.{k}" for k in range(3, 7)}
        assert checksums_ok(o)


def test_endpoint_independent_mapping_and_paired_pooling():
    rig = Rig(appliance("snat: {to: 198.51.100.10-198.51.100.20}"))
    u = [frame("10.0.0.5", f"192.0.2.{k}", UDP(sport=5000, dport=53)) for k in (1, 2, 3)]
    outs = rig.send("inside", u, 1.0)["outside"]
    assert len({(Ether(o)[SIP].src, Ether(o)[SUDP].sport) for o in outs}) == 1
    other_port = frame("10.0.0.5", "192.0.2.1", UDP(sport=5001, dport=53))
    (o2,) = rig.send("inside", [other_port], 1.0)["outside"]
    assert Ether(o2)[SIP].src == Ether(outs[0])[SIP].src  # paired: same pool address
    assert Ether(o2)[SUDP].sport != Ether(outs[0])[SUDP].sport
    assert rig.counters()["nat mappings_created"] == 2


def test_icmp_echo_identifier_is_translated_both_ways():
    rig = Rig(appliance())
    ping = frame("10.0.0.5", "192.0.2.9", ICMP(type=8, id=77, seq=1) / Raw(b"abc"))
    (o,) = rig.send("inside", [ping], 1.0)["outside"]
    oid = Ether(o)[SICMP].id
    assert Ether(o)[SIP].src == NAT_IP and checksums_ok(o) and bucket_of(o) == bucket_of(ping)
    pong = frame("192.0.2.9", NAT_IP, ICMP(type=0, id=oid, seq=1) / Raw(b"abc"), False)
    (b,) = rig.send("outside", [pong], 1.1)["inside"]
    assert Ether(b)[SICMP].id == 77 and Ether(b)[SIP].dst == "10.0.0.5" and checksums_ok(b)


@pytest.mark.parametrize("filtering, translated", [("address-port-dependent", False),
                                                   ("endpoint-independent", True)])
def test_filtering_of_unsolicited_packets_to_a_mapping(filtering, translated):
    rig = Rig(appliance(f"snat: {{to: {NAT_IP}, filtering: {filtering}}}"))
    (o,) = rig.send("inside", [frame("10.0.0.5", "192.0.2.9", UDP(sport=5000, dport=53))],
                    1.0)["outside"]
    np_ = Ether(o)[SUDP].sport
    stranger = frame("203.0.113.7", NAT_IP, UDP(sport=9999, dport=np_), inside=False)
    (b,) = rig.send("outside", [stranger], 1.1)["inside"]
    if translated:
        assert (Ether(b)[SIP].dst, Ether(b)[SUDP].dport) == ("10.0.0.5", 5000)
        assert checksums_ok(b)
    else:
        assert b == stranger  # untranslated (to the NAT's own address): not a reply


def test_port_forward_and_static_nat():
    rig = Rig(appliance(f"""
snat: {{to: {NAT_IP}}}
dnat: [{{proto: tcp, dport: 8080, to: "10.0.0.50:80"}}]
static: [{{inside: 10.0.0.60, outside: 198.51.100.60}}]"""))
    syn = frame("203.0.113.7", NAT_IP, TCP(sport=5555, dport=8080, flags="S"), inside=False)
    (i,) = rig.send("outside", [syn], 1.0)["inside"]
    assert (Ether(i)[SIP].dst, Ether(i)[STCP].dport, Ether(i)[SIP].src) == \
        ("10.0.0.50", 80, "203.0.113.7") and checksums_ok(i)
    synack = frame("10.0.0.50", "203.0.113.7", TCP(sport=80, dport=5555, flags="SA",
                                                    ack=1))
    (o,) = rig.send("inside", [synack], 1.1)["outside"]
    assert (Ether(o)[SIP].src, Ether(o)[STCP].sport) == (NAT_IP, 8080) and checksums_ok(o)
    # static: both ways, ports kept
    (o,) = rig.send("inside", [frame("10.0.0.60", "192.0.2.9", UDP(sport=7, dport=9))],
                    1.2)["outside"]
    assert (Ether(o)[SIP].src, Ether(o)[SUDP].sport) == ("198.51.100.60", 7)
    inb = frame("192.0.2.44", "198.51.100.60", UDP(sport=1, dport=2), inside=False)
    (i,) = rig.send("outside", [inb], 1.3)["inside"]
    assert Ether(i)[SIP].dst == "10.0.0.60" and checksums_ok(i)
    c = rig.counters()
    assert c["nat dnat_flows"] == 2 and c["nat snat_flows"] == 1


def test_hairpinning_through_a_port_forward():
    rig = Rig(appliance(f"""
snat: {{to: {NAT_IP}}}
dnat: [{{proto: tcp, dport: 8080, to: "10.0.0.50:80"}}]"""))
    syn = frame("10.0.0.5", NAT_IP, TCP(sport=40000, dport=8080, flags="S"))
    res = rig.send("inside", [syn], 1.0)
    assert res["outside"] == []
    (h,) = res["inside"]
    hp = Ether(h)
    assert (hp[SIP].src, hp[SIP].dst, hp[STCP].dport) == (NAT_IP, "10.0.0.50", 80)
    assert checksums_ok(h)
    reply = frame("10.0.0.50", NAT_IP, TCP(sport=80, dport=hp[STCP].sport, flags="SA",
                                           ack=1))
    (r,) = rig.send("inside", [reply], 1.1)["inside"]
    rp = Ether(r)
    assert (rp[SIP].src, rp[STCP].sport, rp[SIP].dst, rp[STCP].dport) == \
        (NAT_IP, 8080, "10.0.0.5", 40000) and checksums_ok(r)
    assert rig.counters()["nat hairpin_flows"] == 1


def test_icmp_error_about_a_translated_flow_is_translated_back():
    rig = Rig(appliance())
    q = frame("10.0.0.5", "192.0.2.9", UDP(sport=33000, dport=33434) / Raw(b"x" * 12))
    (o,) = rig.send("inside", [q], 1.0)["outside"]
    sent_ip = bytes(Ether(o)[SIP])
    err = bytes(Eth(src=OUT_MAC, dst=IN_MAC) / IPv4(src="203.0.113.1", dst=NAT_IP)
                / ICMP(type=11, code=0) / Raw(sent_ip))
    (b,) = rig.send("outside", [err], 1.1)["inside"]
    e = Ether(b)
    assert e[SIP].dst == "10.0.0.5" and e[SIP].src == "203.0.113.1"
    assert e[IPerror].src == "10.0.0.5" and e[UDPerror].sport == 33000
    assert bytes(e[IPerror])[:20] == bytes(Ether(q)[SIP])[:20]  # the original header
    assert bytes(e[IPerror]) == bytes(Ether(q)[SIP])  # all of it, checksums included
    fresh = Ether(b)
    del fresh[SIP].chksum
    del fresh[SICMP].chksum
    assert bytes(Ether(bytes(fresh))) == b
    assert rig.counters()["nat icmp_errors_translated"] == 1
    # an error about nothing tracked
    stray = bytes(Eth(src=OUT_MAC, dst=IN_MAC) / IPv4(src="203.0.113.1", dst=NAT_IP)
                  / ICMP(type=3, code=3) / IPv4(src=NAT_IP, dst="192.0.2.9")
                  / UDP(sport=1, dport=2))
    assert rig.send("outside", [stray], 1.2) == {"inside": [], "outside": []}
    assert rig.counters()["nat drop/invalid"] == 1


def test_port_exhaustion_is_counted():
    # 4096 ports: one per bucket class; two inside endpoints of one class collide
    rig = Rig(appliance(f"snat: {{to: {NAT_IP}, ports: 10000-14095}}"))
    hn = int(addr_hash(ip_int(NAT_IP), 0, 0, 0))
    seen = {}
    for p in range(20000, 30000):
        for host in ("10.0.0.5", "10.0.0.6"):
            cls = bucket_port(int(addr_hash(ip_int(host), 0, 0, 0)), p, hn, 4095)
            if cls in seen and seen[cls] != (host, p):
                a, b = seen[cls], (host, p)
                break
            seen[cls] = (host, p)
        else:
            continue
        break
    fa = frame(a[0], "192.0.2.9", UDP(sport=a[1], dport=53))
    fb = frame(b[0], "192.0.2.9", UDP(sport=b[1], dport=53))
    assert len(rig.send("inside", [fa], 1.0)["outside"]) == 1
    assert rig.send("inside", [fb], 1.0)["outside"] == []
    assert rig.counters()["nat drop/ports_exhausted"] == 1


def test_state_moves_between_workers_and_translation_goes_on():
    rig = Rig(appliance())
    flows = [frame("10.0.0.5", "192.0.2.9", UDP(sport=6000 + k, dport=53))
             for k in range(50)]
    outs = rig.send("inside", flows, 1.0)["outside"]
    st = rig.state
    blob, shared = st.export_flows(None, 2.0), st.export_shared(2.0)
    other = Rig(appliance())
    other.state.import_flows(blob, 2.0)
    other.state.import_shared(shared, 2.0)
    assert sorted(other.state.ct.table.entries(2.0)) == sorted(st.ct.table.entries(2.0))
    for f, o in zip(flows, outs):
        r = frame("192.0.2.9", NAT_IP, UDP(sport=53, dport=Ether(o)[SUDP].sport), False)
        (b,) = other.send("outside", [r], 2.5)["inside"]
        assert Ether(b)[SUDP].dport == Ether(f)[SUDP].sport
        (again,) = other.send("inside", [f], 2.6)["outside"]
        assert again == o  # same mapping on the new worker


@pytest.mark.parametrize("nat, message", [
    ("snat: {to: 10.0.0.1/24}", "bad address"),
    ("snat: {to: 198.51.100.2, ports: 0-100}", "port 0"),
    ("dnat: [{proto: tcp, dport: 80-90, to: '10.0.0.5:80'}]", "a port range forwards"),
    ("dnat: [{proto: tcp, dport: 80, to: 10.0.0.5}, {proto: tcp, dport: 80, to: 10.0.0.6}]",
     "overlaps"),
    ("static: [{inside: 10.0.0.5, outside: 1.2.3.4}, {inside: 10.0.0.5, outside: 1.2.3.5}]",
     "mapped twice"),
    ("max_flows: 0", "max_flows"),
])
def test_invalid_nat_configs(nat, message):
    with pytest.raises(ApplianceError) as ei:
        parse_appliance(appliance(nat))
    assert message in str(ei.value) and "devices.nat" in str(ei.value)
