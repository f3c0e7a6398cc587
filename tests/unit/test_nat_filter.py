"""The nat device's filter: rules for new connections, judged from the inside (after
destination translation, before source translation), sharing the NAT's one connection
entry; replies of allowed connections pass; reject answers; hit counters; bad
configs. Frames are checked by re-parsing them with scapy.
"""

from __future__ import annotations

import pytest
from rig import Rig
from scapy.layers.inet import ICMP as SICMP
from scapy.layers.inet import IP as SIP
from scapy.layers.inet import TCP as STCP
from scapy.layers.inet import IPerror, UDPerror
from scapy.layers.l2 import Ether
from test_nat import NAT_IP, appliance, checksums_ok, frame
from test_reload import reload

from dva.graph.appliance import ApplianceError, parse_appliance
from dva.packet.build import ICMP, TCP, UDP, Raw

FORWARDS = f"""
snat: {{to: {NAT_IP}}}
dnat:
  - {{proto: tcp, dport: 8080, to: "10.0.0.50:80"}}
  - {{proto: tcp, dport: 2222, to: "10.0.0.51:22"}}
"""


def nat(filter_: str, body: str = FORWARDS) -> Rig:
    return Rig(appliance(body + f"filter: {filter_}"))


def outside_syn(dport: int, sport: int = 5555) -> bytes:
    return frame("203.0.113.7", NAT_IP, TCP(sport=sport, dport=dport, seq=100, flags="S"),
                 inside=False)


def test_default_deny_lets_inside_out_and_replies_back_but_nothing_else_in():
    rig = nat("{default: deny, rules: [{action: allow, from: inside}]}")
    syn = frame("10.0.0.5", "192.0.2.9", TCP(sport=40000, dport=80, seq=1000, flags="S"))
    (out,) = rig.send("inside", [syn], 1.0)["outside"]
    np_ = Ether(out)[STCP].sport
    assert Ether(out)[SIP].src == NAT_IP and checksums_ok(out)
    synack = frame("192.0.2.9", NAT_IP, TCP(sport=80, dport=np_, seq=5000, ack=1001,
                                             flags="SA"), inside=False)
    (back,) = rig.send("outside", [synack], 1.1)["inside"]
    assert (Ether(back)[SIP].dst, Ether(back)[STCP].dport) == ("10.0.0.5", 40000)
    ack = frame("10.0.0.5", "192.0.2.9", TCP(sport=40000, dport=80, seq=1001, ack=5001,
                                             flags="A") / Raw(b"hi"))
    assert len(rig.send("inside", [ack], 1.2)["outside"]) == 1
    # unsolicited from outside: to the NAT's address, to a port forward, a SYN to the
    # mapping from another host
    probes = [outside_syn(22), outside_syn(8080),
              frame("198.51.100.77", NAT_IP, TCP(sport=80, dport=np_, flags="S"),
                    inside=False)]
    res = rig.send("outside", probes, 1.3)
    assert res["inside"] == [] and res["outside"] == []
    c = rig.counters()
    assert c["nat drop/denied"] == 3 and c["nat default_hits"] == 3
    assert c["nat rule1_hits"] == 1  # once per connection, not per packet
    assert c["nat snat_flows"] == 1 and "nat dnat_flows" not in c
    assert c["nat flows_created"] == 1


def test_a_rule_sees_the_port_forwards_inside_target():
    rig = nat("""
  default: deny
  rules:
    - {action: allow, from: outside, proto: tcp, dst: 10.0.0.50, dport: 80}""")
    (i,) = rig.send("outside", [outside_syn(8080)], 1.0)["inside"]
    assert (Ether(i)[SIP].dst, Ether(i)[STCP].dport) == ("10.0.0.50", 80)
    assert checksums_ok(i)
    # the other forward (to 10.0.0.51:22) is not allowed; nor is the public port
    # matched as such: a rule on dport 8080 would never see it
    res = rig.send("outside", [outside_syn(2222, sport=6666)], 1.1)
    assert res["inside"] == []
    reply = frame("10.0.0.50", "203.0.113.7", TCP(sport=80, dport=5555, flags="SA", ack=101))
    (o,) = rig.send("inside", [reply], 1.2)["outside"]
    assert (Ether(o)[SIP].src, Ether(o)[STCP].sport) == (NAT_IP, 8080)
    c = rig.counters()
    assert c["nat rule1_hits"] == 1 and c["nat default_hits"] == 1
    assert c["nat drop/denied"] == 1 and c["nat dnat_flows"] == 1


def test_first_match_wins_and_outbound_rules_see_the_original_source():
    rig = nat("""
  default: deny
  rules:
    - {action: deny, from: inside, proto: tcp, dport: 25}
    - {action: allow, from: inside, src: 10.0.0.0/28}
    - {action: allow, from: inside, proto: icmp, icmp_type: 8}""")
    frames = [
        frame("10.0.0.5", "192.0.2.9", TCP(sport=40001, dport=25, flags="S")),  # rule 1
        frame("10.0.0.5", "192.0.2.9", TCP(sport=40002, dport=443, flags="S")),  # rule 2
        frame("10.0.0.99", "192.0.2.9", TCP(sport=40003, dport=443, flags="S")),  # default
        frame("10.0.0.99", "192.0.2.9", ICMP(type=8, id=9, seq=1)),  # rule 3
    ]
    out = rig.send("inside", frames, 1.0)["outside"]
    assert [Ether(o).haslayer(SICMP) or Ether(o)[STCP].dport for o in out] == [443, True]
    assert all(Ether(o)[SIP].src == NAT_IP for o in out)
    c = rig.counters()
    assert (c["nat rule1_hits"], c["nat rule2_hits"], c["nat rule3_hits"],
            c["nat default_hits"]) == (1, 1, 1, 1)
    assert c["nat drop/denied"] == 2


def test_hairpinned_connections_are_judged_by_their_inside_target():
    rig = nat("""
  default: allow
  rules:
    - {action: deny, from: inside, dst: 10.0.0.51}""")
    res = rig.send("inside", [frame("10.0.0.5", NAT_IP, TCP(sport=40000, dport=8080,
                                                             flags="S"))], 1.0)
    (h,) = res["inside"]
    assert (Ether(h)[SIP].dst, Ether(h)[STCP].dport) == ("10.0.0.50", 80)
    res = rig.send("inside", [frame("10.0.0.5", NAT_IP, TCP(sport=40001, dport=2222,
                                                             flags="S"))], 1.1)
    assert res["inside"] == [] and res["outside"] == []
    c = rig.counters()
    assert c["nat hairpin_flows"] == 1 and c["nat drop/denied"] == 1
    assert c["nat rule1_hits"] == 1 and c["nat default_hits"] == 1
    assert c["nat mappings_created"] == 1  # none for the denied one


def test_reject_answers_tcp_with_a_reset_and_udp_with_port_unreachable():
    rig = nat("{default: reject, rules: [{action: allow, from: inside}]}")
    syn = outside_syn(22)
    udp = frame("203.0.113.7", NAT_IP, UDP(sport=4000, dport=53) / Raw(b"q" * 20),
                inside=False)
    res = rig.send("outside", [syn, udp], 1.0)
    assert res["inside"] == []
    rst, unreach = (Ether(f) for f in res["outside"])
    assert (rst[SIP].src, rst[SIP].dst) == (NAT_IP, "203.0.113.7")
    assert (rst[STCP].sport, rst[STCP].dport, rst[STCP].flags) == (22, 5555, "RA")
    assert rst[STCP].ack == 101 and rst[STCP].seq == 0
    assert (unreach[SIP].src, unreach[SICMP].type, unreach[SICMP].code) == (NAT_IP, 3, 3)
    assert unreach[IPerror].dst == NAT_IP and unreach[UDPerror].dport == 53
    assert all(checksums_ok(f) for f in res["outside"])
    # a reset is never answered
    res = rig.send("outside", [frame("203.0.113.7", NAT_IP, TCP(sport=1, dport=2,
                                                                 flags="R"),
                                     inside=False)], 1.1)
    assert res["outside"] == [] and res["inside"] == []
    c = rig.counters()
    assert c["nat rst_sent"] == 1 and c["nat icmp_sent"] == 1
    assert c["nat drop/rejected"] == 2 and c["nat emitted"] == 2
    assert c["nat drop/invalid"] == 1  # a RST with no connection


def test_untracked_icmp_is_judged_statelessly():
    rig = nat("""
  default: deny
  rules:
    - {action: allow, from: outside, proto: icmp, icmp_type: 13}""")
    ts = frame("203.0.113.7", NAT_IP, ICMP(type=13, code=0) / Raw(b"\0" * 12), inside=False)
    info = frame("203.0.113.7", NAT_IP, ICMP(type=15, code=0), inside=False)
    res = rig.send("outside", [ts, info], 1.0)
    (i,) = res["inside"]
    assert Ether(i)[SICMP].type == 13 and Ether(i)[SIP].dst == NAT_IP  # untranslated
    c = rig.counters()
    assert c["nat rule1_hits"] == 1 and c["nat drop/denied"] == 1
    assert "nat flows_created" not in c


def test_without_a_filter_nothing_is_filtered_and_no_filter_counters_exist():
    rig = Rig(appliance(FORWARDS))
    (i,) = rig.send("outside", [outside_syn(22)], 1.0)["inside"]  # to the NAT itself
    assert Ether(i)[STCP].dport == 22
    names = rig.engine.counter_table()
    assert "nat default_hits" not in names and "nat drop/denied" in names


def test_adding_a_filter_keeps_open_connections_and_judges_new_ones():
    rig = Rig(appliance(FORWARDS))
    syn = frame("10.0.0.5", "192.0.2.9", TCP(sport=40000, dport=80, seq=1000, flags="S"))
    (out,) = rig.send("inside", [syn], 1.0)["outside"]
    np_ = Ether(out)[STCP].sport
    rep = reload(rig, appliance(FORWARDS + """filter:
  default: deny
  rules: [{action: allow, from: outside, proto: tcp, dst: 10.0.0.51, dport: 22}]"""), 2.0)
    assert rep.state_kept == ["nat"] and rep.problems == []
    synack = frame("192.0.2.9", NAT_IP, TCP(sport=80, dport=np_, seq=5000, ack=1001,
                                             flags="SA"), inside=False)
    (back,) = rig.send("outside", [synack], 2.1)["inside"]
    assert (Ether(back)[SIP].dst, Ether(back)[STCP].dport) == ("10.0.0.5", 40000)
    ack = frame("10.0.0.5", "192.0.2.9", TCP(sport=40000, dport=80, seq=1001, ack=5001,
                                             flags="A"))
    assert len(rig.send("inside", [ack], 2.2)["outside"]) == 1
    new = frame("10.0.0.5", "192.0.2.9", TCP(sport=40001, dport=80, flags="S"))
    assert rig.send("inside", [new], 2.3)["outside"] == []
    (i,) = rig.send("outside", [outside_syn(2222)], 2.4)["inside"]
    assert (Ether(i)[SIP].dst, Ether(i)[STCP].dport) == ("10.0.0.51", 22)
    c = rig.counters()
    assert c["nat drop/denied"] == 1 and c["nat rule1_hits"] == 1
    assert c["nat snat_flows"] == 1 and c["nat dnat_flows"] == 1


@pytest.mark.parametrize("filter_, message", [
    ("{rules: [{action: allow, from: lan}]}", "filter.rules[0]: from 'lan' is not a port"),
    ("{rules: [{action: allow, proto: udp, icmp_type: 3}]}", "icmp_type needs proto icmp"),
    ("{default: maybe}", "default"),
    ("{rules: [], policy: deny}", "policy"),
])
def test_invalid_filters_are_rejected_with_their_path(filter_, message):
    with pytest.raises(ApplianceError) as ei:
        parse_appliance(appliance(FORWARDS + f"filter: {filter_}"))
    assert message in str(ei.value) and "devices.nat" in str(ei.value)
