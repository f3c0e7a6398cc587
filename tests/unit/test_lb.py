"""The lb device: Maglev tables (shares, weights, disruption), backend choice per
flow, DNAT and full-NAT rewrites with replies translated back, connections kept on
their backend across backend and health changes, per-backend counters, ICMP errors,
pass-through, config errors, state export/import. Checksums are checked by
recomputing them with scapy; buckets by parsing the frames with dva's parser.
"""

from __future__ import annotations

import random

import numpy as np
import pytest
from reference import assert_matches_reference
from rig import Rig
from scapy.layers.inet import ICMP as SICMP
from scapy.layers.inet import IP as SIP
from scapy.layers.inet import TCP as STCP
from scapy.layers.inet import UDP as SUDP
from scapy.layers.l2 import Ether
from test_nat import bucket_of, checksums_ok

from dva.graph.appliance import ApplianceError, parse_appliance
from dva.graph.plan import compile_plan
from dva.nf.maglev import build_table, shares
from dva.packet.build import ICMP, TCP, UDP, Eth, IPv4, Raw

C_MAC, R_MAC = "02:00:00:00:00:05", "02:00:00:00:00:01"
VIP = "203.0.113.10"
BACKENDS = ["10.0.1.11", "10.0.1.12", "10.0.1.13"]


def appliance(backends=None, extra: str = "", mode: str = "dnat", size: int = 4093) -> str:
    bs = backends if backends is not None else [f"{{addr: {b}, port: 8000}}" for b in BACKENDS]
    return f"""
appliance: t
devices:
  lb:
    type: lb
    ports: [front, back]
    mode: {mode}
    table_size: {size}
{extra}
    vips:
      web:
        addr: {VIP}
        proto: tcp
        port: 80
        backends: [{", ".join(bs)}]
      dns: {{addr: {VIP}, proto: udp, port: 53, backends: [{{addr: 10.0.1.21}}]}}
attach:
  lb.front: {{memory: front}}
  lb.back: {{memory: back}}
"""


def frame(src, dst, l4, front=True) -> bytes:
    smac, dmac = (C_MAC, R_MAC) if front else (R_MAC, C_MAC)
    return bytes(Eth(src=smac, dst=dmac) / IPv4(src=src, dst=dst) / l4)


def syn(sport, src="192.0.2.7", dport=80, seq=1000):
    return frame(src, VIP, TCP(sport=sport, dport=dport, seq=seq, flags="S"))


def test_dnat_connection_to_the_vip_goes_to_one_backend_and_back():
    rig = Rig(appliance())
    s = syn(40000)
    (out,) = rig.send("front", [s], 1.0)["back"]
    o = Ether(out)
    be = o[SIP].dst
    assert be in BACKENDS and o[STCP].dport == 8000
    assert o[SIP].src == "192.0.2.7" and o[STCP].sport == 40000 and checksums_ok(out)
    synack = frame(be, "192.0.2.7", TCP(sport=8000, dport=40000, seq=5000, ack=1001,
                                        flags="SA"), front=False)
    (back,) = rig.send("back", [synack], 1.1)["front"]
    b = Ether(back)
    assert (b[SIP].src, b[STCP].sport, b[SIP].dst, b[STCP].dport) == \
        (VIP, 80, "192.0.2.7", 40000)
    assert checksums_ok(back)
    ack = frame("192.0.2.7", VIP, TCP(sport=40000, dport=80, seq=1001, ack=5001,
                                      flags="A") / Raw(b"GET /"))
    (o2,) = rig.send("front", [ack], 1.2)["back"]
    assert Ether(o2)[SIP].dst == be and checksums_ok(o2)
    c = rig.counters()
    assert c["lb balanced_flows"] == 1 and c["lb flows_created"] == 1
    assert c[f"lb web/{be}:8000 flows"] == 1
    assert c[f"lb web/{be}:8000 packets"] == 3


def test_new_flows_spread_as_the_maglev_table_says():
    rig = Rig(appliance(), slots=4096)
    rnd = random.Random(3)
    frames = [syn(rnd.randrange(1024, 65536), src=f"198.18.{rnd.randrange(256)}."
                  f"{rnd.randrange(1, 255)}") for _ in range(3000)]
    outs = rig.send("front", frames, 1.0)["back"]
    assert len(outs) == 3000
    got = {b: 0 for b in BACKENDS}
    for o in outs:
        got[Ether(o)[SIP].dst] += 1
    expect = shares(rig.state.maglev[0], 3)
    for k, b in enumerate(BACKENDS):
        # binomial: 4.5 standard deviations at most
        sd = (3000 * expect[k] * (1 - expect[k])) ** 0.5
        assert abs(got[b] - 3000 * expect[k]) < 4.5 * sd, (got, expect)
    c = rig.counters()
    assert sum(c[f"lb web/{b}:8000 flows"] for b in BACKENDS) == 3000


def test_the_backend_is_a_function_of_the_flow_not_of_the_worker():
    frames = [syn(p) for p in range(20000, 20200)]
    picks = []
    for _ in range(2):
        rig = Rig(appliance(), slots=1024)
        picks.append([Ether(o)[SIP].dst for o in rig.send("front", frames, 1.0)["back"]])
    assert picks[0] == picks[1]


def test_weights_set_the_shares():
    t = build_table([f"b{i}" for i in range(4)], [1, 2, 3, 4], [True] * 4, 65537)
    assert np.allclose(shares(t, 4), [0.1, 0.2, 0.3, 0.4], atol=0.002)


def test_removing_a_backend_moves_only_about_its_own_flows():
    names = [f"10.0.1.{i}:80" for i in range(1, 11)]
    before = build_table(names, [1] * 10, [True] * 10, 65537)
    up = [True] * 10
    up[3] = False
    after = build_table(names, [1] * 10, up, 65537)
    rnd = np.random.default_rng(1)
    flows = rnd.integers(0, 2**32, 100_000) % 65537  # synthetic flow hashes
    moved = before[flows] != after[flows]
    was_on_removed = before[flows] == 3
    assert moved[was_on_removed].all()  # all of its flows find another backend
    # flows of the others that move anyway: Maglev's small disruption (< 1%)
    assert moved[~was_on_removed].mean() < 0.01
    assert (after >= 0).all() and not (after == 3).any()


def test_adding_a_backend_moves_flows_mostly_to_it():
    names = [f"10.0.1.{i}:80" for i in range(1, 11)]
    before = build_table(names, [1] * 10, [True] * 10, 65537)
    after = build_table(names + ["10.0.1.11:80"], [1] * 11, [True] * 11, 65537)
    moved = before != after
    assert 0.08 < moved.mean() < 0.11  # about 1/11
    assert (after[moved] == 10).mean() > 0.9


def test_live_connections_keep_their_backend_when_it_goes_down_and_new_ones_avoid_it():
    rig = Rig(appliance(), slots=2048)
    frames = [syn(p) for p in range(30000, 30300)]
    outs = rig.send("front", frames, 1.0)["back"]
    first = {p: Ether(o)[SIP].dst for p, o in zip(range(30000, 30300), outs)}
    victim = BACKENDS[0]
    dev = rig.plan.devices[0]
    dev.set_health(rig.state, "web", f"{victim}:8000", False, 2.0)
    # established-looking traffic of the old connections: same backend as before
    acks = [frame("192.0.2.7", VIP, TCP(sport=p, dport=80, seq=1001, ack=0, flags="S"))
            for p in range(30000, 30300)]
    again = rig.send("front", acks, 2.1)["back"]  # retransmitted SYNs of live connections
    assert [Ether(o)[SIP].dst for o in again] == [first[p] for p in range(30000, 30300)]
    new = rig.send("front", [syn(p) for p in range(31000, 31300)], 2.2)["back"]
    assert victim not in {Ether(o)[SIP].dst for o in new}
    dev.set_health(rig.state, "web", f"{victim}:8000", True, 3.0)
    back_up = rig.send("front", [syn(p) for p in range(32000, 32300)], 3.1)["back"]
    assert victim in {Ether(o)[SIP].dst for o in back_up}


def test_no_backend_up_is_a_counted_drop():
    rig = Rig(appliance([f"{{addr: {b}, up: false}}" for b in BACKENDS]))
    assert rig.send("front", [syn(1234)], 1.0) == {"front": [], "back": []}
    assert rig.counters()["lb drop/no_backend"] == 1


def test_udp_vip_and_untracked_traffic():
    rig = Rig(appliance())
    q = frame("192.0.2.7", VIP, UDP(sport=5353, dport=53) / Raw(b"q"))
    (o,) = rig.send("front", [q], 1.0)["back"]
    assert Ether(o)[SIP].dst == "10.0.1.21" and Ether(o)[SUDP].dport == 53
    assert checksums_ok(o)
    r = frame("10.0.1.21", "192.0.2.7", UDP(sport=53, dport=5353) / Raw(b"a"), front=False)
    (b,) = rig.send("back", [r], 1.1)["front"]
    assert Ether(b)[SIP].src == VIP and checksums_ok(b)
    # not a VIP port, a ping of the VIP address, traffic between others: untouched
    other = [frame("192.0.2.7", VIP, TCP(sport=1, dport=22, flags="S")),
             frame("192.0.2.7", VIP, ICMP(type=8, id=1, seq=1)),
             frame("192.0.2.7", "192.0.2.8", UDP(sport=1, dport=2))]
    assert rig.send("front", other, 1.2)["back"] == other
    own = frame("10.0.1.11", "192.0.2.99", TCP(sport=5555, dport=443, flags="S"), front=False)
    assert rig.send("back", [own], 1.3)["front"] == [own]
    assert rig.counters()["lb untracked_passed"] == 4


def test_segment_to_a_vip_without_a_connection_is_invalid():
    rig = Rig(appliance())
    stray = frame("192.0.2.7", VIP, TCP(sport=40000, dport=80, seq=5, ack=5, flags="A"))
    assert rig.send("front", [stray], 1.0)["back"] == []
    c = rig.counters()
    assert c["lb drop/invalid"] == 1 and c.get("lb balanced_flows", 0) == 0


def test_fullnat_rewrites_both_ends_keeps_the_bucket_and_returns():
    rig = Rig(appliance(mode="fullnat", extra="    snat: 10.0.9.1"), slots=4096)
    rnd = random.Random(11)
    frames = [syn(rnd.randrange(1024, 65536), src=f"198.18.0.{rnd.randrange(1, 255)}")
              for _ in range(500)]
    outs = rig.send("front", frames, 1.0)["back"]
    assert len(outs) == 500
    seen = set()
    for f, o in zip(frames, outs):
        e = Ether(o)
        assert e[SIP].src == "10.0.9.1" and e[SIP].dst in BACKENDS
        assert 1024 <= e[STCP].sport <= 65535 and checksums_ok(o)
        assert bucket_of(o) == bucket_of(f)
        seen.add((e[SIP].dst, e[STCP].sport))
    assert len(seen) == 500  # every translated tuple distinct
    f0, o0 = Ether(frames[0]), Ether(outs[0])
    reply = frame(o0[SIP].dst, "10.0.9.1", TCP(sport=8000, dport=o0[STCP].sport, seq=9,
                                                ack=f0[STCP].seq + 1, flags="SA"),
                  front=False)
    assert bucket_of(reply) == bucket_of(frames[0])
    (b,) = rig.send("back", [reply], 1.1)["front"]
    b = Ether(b)
    assert (b[SIP].src, b[STCP].sport, b[SIP].dst, b[STCP].dport) == \
        (VIP, 80, f0[SIP].src, f0[STCP].sport)


def test_fullnat_port_exhaustion_is_counted():
    # one port in the range: at most one connection per bucket class
    rig = Rig(appliance(mode="fullnat", extra="    snat: 10.0.9.1\n    snat_ports: 5000"))
    outs = rig.send("front", [syn(p) for p in range(40000, 40040)], 1.0)["back"]
    c = rig.counters()
    assert len(outs) == c.get("lb balanced_flows", 0) <= 1
    assert c["lb drop/ports_exhausted"] == 40 - len(outs)


def test_icmp_error_from_a_backend_path_is_translated_for_the_client():
    rig = Rig(appliance())
    (out,) = rig.send("front", [syn(40000)], 1.0)["back"]
    be = Ether(out)[SIP].dst
    # a router behind the LB says the backend is unreachable, quoting the DNATed SYN
    err = frame("10.0.1.1", "192.0.2.7", ICMP(type=3, code=1) / Raw(bytes(Ether(out)[SIP])[:28]),
                front=False)
    (e,) = rig.send("back", [err], 1.1)["front"]
    q = Ether(e)[SICMP].payload
    assert Ether(e)[SIP].dst == "192.0.2.7"
    assert bytes(q)[16:20] == bytes(int(x) for x in VIP.split("."))  # quoted dst: VIP
    assert rig.counters()["lb icmp_errors_translated"] == 1 and be in BACKENDS


def test_dnat_connections_hold_one_entry_and_the_table_max_flows_of_them():
    rig = Rig(appliance(extra="    max_flows: 20"), slots=1024)
    outs = rig.send("front", [syn(p) for p in range(41000, 41030)], 1.0)["back"]
    t = rig.state.ct.table
    assert len(outs) == 30 and len(t) == 20 == t.max_entries  # SYNs only: early drops
    c = rig.counters()
    assert c["lb flows_created"] == 30 and c["lb early_drops"] == 10
    # the replies of the 20 kept return from the VIP; the others name no connection
    # and pass as they are (the lb's other traffic)
    replies = [frame(Ether(o)[SIP].dst, "192.0.2.7", TCP(
        sport=8000, dport=Ether(o)[STCP].sport, seq=9, ack=1001, flags="SA"), front=False)
        for o in outs]
    back = rig.send("back", replies, 1.1)["front"]
    mine = [Ether(b) for b in back if Ether(b)[SIP].src == VIP]
    assert len(back) == 30 and len(mine) == 20 and all(checksums_ok(bytes(b)) for b in mine)
    assert rig.counters()["lb untracked_passed"] == 10


def test_a_backend_endpoint_listed_in_two_vips():
    """DNAT names a reply's connection through the VIPs that list its backend
    endpoint: with two, a client endpoint cannot have a connection to each on it
    (``tuple_in_use``), and each reply returns from its own VIP."""
    vip2 = "203.0.113.20"
    text = appliance(backends=["{addr: 10.0.1.11, port: 8000}"]).replace(
        "      dns:", f"      web2: {{addr: {vip2}, proto: tcp, port: 80, backends: "
        f"[{{addr: 10.0.1.11, port: 8000}}, {{addr: 10.0.1.12, port: 8000}}]}}\n      dns:")
    rig = Rig(text)
    opened = {}
    for p in range(42000, 42200):
        (o,) = rig.send("front", [frame("192.0.2.7", vip2, TCP(sport=p, dport=80,
                                                                flags="S"))], 1.0)["back"]
        opened[p] = Ether(o)[SIP].dst
    assert set(opened.values()) == {"10.0.1.11", "10.0.1.12"}
    on11 = [p for p, be in opened.items() if be == "10.0.1.11"]
    on12 = [p for p, be in opened.items() if be == "10.0.1.12"]
    # web has 10.0.1.11 alone: from a port web2 has there, the tuple is taken
    assert rig.send("front", [syn(on11[0])], 1.1)["back"] == []
    assert rig.counters()["lb drop/tuple_in_use"] == 1
    (o,) = rig.send("front", [syn(on12[0])], 1.1)["back"]
    assert Ether(o)[SIP].dst == "10.0.1.11"
    assert len(rig.state.ct.table) == 201  # no E2s

    def reply(be, port):
        return frame(be, "192.0.2.7", TCP(sport=8000, dport=port, seq=9, ack=1,
                                          flags="SA"), front=False)
    (b,) = rig.send("back", [reply("10.0.1.11", on12[0])], 1.2)["front"]
    assert Ether(b)[SIP].src == VIP and checksums_ok(b)
    backs = rig.send("back", [reply(be, p) for p, be in opened.items()], 1.3)["front"]
    assert len(backs) == 200
    assert all(Ether(b)[SIP].src == vip2 and checksums_ok(b) for b in backs)
    # a backend's packet to a client endpoint it has no connection with passes
    stray = reply("10.0.1.12", on11[0])
    assert rig.send("back", [stray], 1.4)["front"] == [stray]


def test_connections_survive_a_reload_that_adds_a_backend():
    from dva.packet.pool import PacketPool
    from dva.worker.engine import Engine
    from dva.worker.reload import carry_state
    rig = Rig(appliance(), slots=1024)
    outs = rig.send("front", [syn(p) for p in range(50000, 50100)], 1.0)["back"]
    first = [Ether(o)[SIP].dst for o in outs]
    more = [f"{{addr: {b}, port: 8000}}" for b in BACKENDS + ["10.0.1.14"]]
    new = Engine(compile_plan(parse_appliance(appliance(more))), rig.pool)
    carry_state(rig.engine, new, 2.0)
    rig.engine = new
    acks = [frame("192.0.2.7", VIP, TCP(sport=p, dport=80, seq=1000, flags="S"))
            for p in range(50000, 50100)]
    again = rig.send("front", acks, 2.1)["back"]
    assert [Ether(o)[SIP].dst for o in again] == first
    fresh = rig.send("front", [syn(p) for p in range(51000, 51400)], 2.2)["back"]
    assert "10.0.1.14" in {Ether(o)[SIP].dst for o in fresh}
    c = rig.counters()  # the carried connections count on their (renumbered) backends
    assert sum(c.get(f"lb web/{b}:8000 packets", 0) for b in BACKENDS) == 100 + 400 - \
        c.get("lb web/10.0.1.14:8000 packets", 0)
    assert isinstance(rig.pool, PacketPool)


def test_flow_state_round_trips_through_export_and_import():
    rig = Rig(appliance(), slots=1024)
    rig.send("front", [syn(p) for p in range(60000, 60050)], 1.0)
    st = rig.state
    data = st.export_flows(None, 1.5)
    other = rig.plan.devices[0].new_state()
    assert other.import_flows(data, 1.5) == 50  # dnat: one entry (E1) per connection
    assert sorted(other.ct.table.entries(1.5)) == sorted(st.ct.table.entries(1.5))
    # health carries as shared state and rebuilds the tables
    rig.plan.devices[0].set_health(st, "web", f"{BACKENDS[1]}:8000", False, 1.6)
    fresh = rig.plan.devices[0].new_state()
    fresh.import_shared(st.export_shared(1.7), 1.7)
    assert (fresh.maglev == st.maglev).all() and not (fresh.maglev[0] == 1).any()


@pytest.mark.parametrize("body, msg", [
    ("mode: fullnat", "needs snat"),
    ("snat: 10.0.9.1", "snat is for mode fullnat"),
    ("table_size: 65536", "not prime"),
    ("table_size: 251", "at least 100x"),
])
def test_config_errors(body, msg):
    text = appliance(size=65537).replace("    mode: dnat\n", "").replace(
        "    table_size: 65537\n", "")
    text = text.replace("    ports: [front, back]\n", f"    ports: [front, back]\n    {body}\n")
    with pytest.raises(ApplianceError, match=msg):
        parse_appliance(text)


def test_config_errors_in_vips():
    dup = appliance([f"{{addr: {BACKENDS[0]}, port: 8000}}"] * 2)
    with pytest.raises(ApplianceError, match="listed twice"):
        parse_appliance(dup)
    on_vip = appliance([f"{{addr: {VIP}}}"])
    with pytest.raises(ApplianceError, match="VIP address"):
        parse_appliance(on_vip)
    twice = appliance().replace("proto: udp, port: 53", "proto: tcp, port: 80")
    with pytest.raises(ApplianceError, match="also VIP web"):
        parse_appliance(twice)


# -- compiled against reference ----------------------------------------------------------

def r_frame(r: random.Random, replies: list[bytes]) -> bytes:
    """A random frame from the front: a SYN or a UDP query to a VIP, a backend's reply
    sent the wrong way, or a stray TCP segment."""
    k = r.random()
    if k < 0.4:
        return syn(r.randrange(1024, 1100), src=f"192.0.2.{r.randrange(1, 4)}")
    if k < 0.6:
        return frame("192.0.2.7", VIP, UDP(sport=r.randrange(5000, 5010), dport=53)
                     / Raw(b"q" * r.randrange(20)))
    if k < 0.8 and replies:
        return r.choice(replies)
    return frame("192.0.2.7", VIP, TCP(sport=r.randrange(1024, 1100), dport=80, seq=5,
                                       ack=7, flags=r.choice(["A", "FA", "R"])))


def mangled(r: random.Random, f: bytes) -> bytes:
    """``f`` with one byte after the Ethernet header changed, 15% of the time."""
    b = bytearray(f)
    if r.random() < 0.15:
        b[r.randrange(14, len(b))] = r.randrange(256)
    return bytes(b)


def differential_run(mode: str = "dnat") -> dict[str, np.ndarray]:
    """A deterministic lb workload (connections, replies, errors, mangled frames);
    everything observable, as arrays."""
    extra = "    snat: 10.0.9.1" if mode == "fullnat" else ""
    rig = Rig(appliance(mode=mode, extra=extra, size=1021), slots=1024)
    r = random.Random(7)
    sent = {"front": [], "back": []}
    replies: list[bytes] = []
    t = 0.0
    for _ in range(60):
        t += r.choice([0.0, 0.1, 1.0])
        side = "front" if r.random() < 0.6 else "back"
        if side == "back":  # the backends answer the latest connections
            batch = replies[-8:]
        else:
            batch = [mangled(r, r_frame(r, replies)) for _ in range(r.randrange(0, 10))]
        out = rig.send(side, batch, t)
        for o in out["back"]:
            e = Ether(o)
            if e.haslayer(STCP):
                replies.append(frame(e[SIP].dst, e[SIP].src, TCP(
                    sport=e[STCP].dport, dport=e[STCP].sport, seq=9,
                    ack=(e[STCP].seq + 1) & 0xFFFFFFFF, flags="SA"), front=False))
        for k in sent:
            sent[k] += out[k]
    res = {"counters": np.array(sorted(rig.counters().items()), dtype=object).astype(str)}
    for k, fr in sent.items():
        res[f"sent_{k}"] = np.frombuffer(b"".join(fr), np.uint8)
        res[f"lens_{k}"] = np.array([len(f) for f in fr], np.int64)
    return res


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["dnat", "fullnat"])
def test_compiled_lb_equals_reference(mode):
    jit = assert_matches_reference("test_lb", "differential_run", mode)
    c = dict(jit["counters"].tolist())
    for name in ("lb balanced_flows", "lb drop/invalid", "lb untracked_passed"):
        assert int(c.get(name, 0)) > 0, name
