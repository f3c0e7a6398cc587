"""The policer device: exact token arithmetic (streams at known rates over synthetic
time against an independent model and the rate * T + burst bound), bytes and packets
modes, no drift over long runs, DSCP marking (IPv4 checksum kept valid, ECN kept,
IPv6 traffic class), per-flow isolation and per-direction buckets, policed
directions, the bounded flow table (overflow bucket, expiry only once a bucket is
full again), moving flow state by bucket, config parsing and errors, and the
compiled kernels against the JIT-off reference.
"""

from __future__ import annotations

import json
import random
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
from reference import assert_matches_reference
from rig import Rig
from scapy.layers.inet import IP as SIP
from scapy.layers.inet6 import IPv6 as SIPv6
from scapy.layers.l2 import Ether

from dva.graph.appliance import ApplianceError, parse_appliance
from dva.nf.policer import (
    MILLI,
    SCALE,
    PolicerConfig,
    ns,
    parse_burst,
    parse_rate,
    take,
)
from dva.packet.build import ARP, TCP, UDP, Dot1Q, Eth, IPv4, IPv6, Raw
from dva.worker.reload import prepare, swap

TESTS = Path(__file__).resolve().parents[1]
A_MAC, B_MAC = "02:00:00:00:00:01", "02:00:00:00:00:02"


def appliance(body: str) -> str:
    cfg = "\n".join("    " + line for line in body.strip().splitlines())
    return f"""
appliance: t
devices:
  pol:
    type: policer
    ports: [inside, outside]
{cfg}
attach:
  pol.inside: {{memory: in}}
  pol.outside: {{memory: out}}
"""


def udp(src="10.0.0.1", dst="10.0.0.2", sport=1000, dport=2000, size=100, tos=0,
        inside=True) -> bytes:
    """An Ethernet/IPv4/UDP frame of ``size`` bytes in all (at least 42)."""
    smac, dmac = (A_MAC, B_MAC) if inside else (B_MAC, A_MAC)
    return bytes(Eth(src=smac, dst=dmac) / IPv4(src=src, dst=dst, tos=tos)
                 / UDP(sport=sport, dport=dport) / Raw(b"x" * (size - 42)))


def model(events, rate: Fraction, depth: Fraction) -> list[bool]:
    """An independent token bucket in exact fractions of base units: ``events`` are
    (time, cost); time counted in whole nanoseconds, as the device does."""
    tok, last, out = depth, None, []
    for t, cost in events:
        tn = round(t * 1e9)
        if last is None:
            last = tn
        elif tn > last:
            tok = min(depth, tok + Fraction(tn - last, 10**9) * rate)
            last = tn
        ok = tok >= cost
        if ok:
            tok -= cost
        out.append(ok)
    return out


def stream(rig: Rig, frames_at, port="inside"):
    """Send each (time, frame) alone; returns which came out the other side."""
    other = "outside" if port == "inside" else "inside"
    return [len(rig.send(port, [f], t)[other]) == 1 for t, f in frames_at]


# -- token arithmetic ------------------------------------------------------------------

def test_packets_mode_passes_rate_times_t_plus_burst():
    rig = Rig(appliance("rate: 100pps\nburst: 10"))
    f = udp()
    at = [(5.0 + k / 300, f) for k in range(1500)]  # 300 pps offered for 5 s
    got = stream(rig, at)
    span = at[-1][0] - at[0][0]
    assert got == model([(t, 1) for t, _ in at], Fraction(100), Fraction(10))
    assert sum(got) == 10 + int(100 * span)  # 509: the burst, then exactly the rate
    c = rig.counters()
    assert c["pol conform_packets"] == sum(got)
    assert c["pol exceed_packets"] == c["pol drop/exceed"] == 1500 - sum(got)
    assert c["pol exceed_bytes"] == 100 * (1500 - sum(got))


def test_bytes_mode_counts_frame_bytes():
    # 1 Mbit/s = 125000 bytes/s; frames of 64..1514 bytes offered at about 2x
    rig = Rig(appliance("rate: 1mbit\nburst: 3000"))
    rnd = random.Random(4)
    t, at = 2.0, []
    while t < 4.0:
        size = rnd.randrange(64, 1515)
        at.append((t, udp(size=size)))
        t += size / 250000
    got = stream(rig, at)
    want = model([(t, len(f)) for t, f in at], Fraction(125000), Fraction(3000))
    assert got == want
    passed = sum(len(f) for (t, f), ok in zip(at, got) if ok)
    bound = 125000 * (at[-1][0] - at[0][0]) + 3000
    assert bound - 1514 <= passed <= bound
    c = rig.counters()
    assert c["pol conform_bytes"] == passed
    assert c["pol exceed_bytes"] == sum(len(f) for _, f in at) - passed


def test_a_byte_rate_and_a_bit_rate_are_the_same_limit():
    assert parse_rate("1.25MB/s") == parse_rate("10mbit") == ("bytes", 10_000_000)
    assert parse_rate("10Mbit/s") == parse_rate("10000kbit")
    assert parse_rate("20000pps") == ("packets", 20_000_000)
    assert parse_rate("1.5kpps") == ("packets", 1_500_000)
    assert parse_rate("0.5pps") == ("packets", 500)
    mode, rate = parse_rate("10mbit")
    assert parse_burst("64kB", mode, rate) == 64000 * 8
    assert parse_burst("64KiB", mode, rate) == 65536 * 8
    assert parse_burst("64kb", mode, rate) == 64000 * 8  # sizes are bytes; k = 1000
    assert parse_burst("512kbit", mode, rate) == 512000
    assert parse_burst(2000, mode, rate) == 16000
    assert parse_burst("50ms", mode, rate) == 500_000  # 50 ms of 10 Mbit/s
    assert parse_burst(None, mode, rate) == 1_000_000  # default: 100 ms of the rate
    assert parse_burst(None, "bytes", 8000) == 1518 * 8  # but at least one full frame
    assert parse_burst("32 packets", "packets", 1_500_000) == 32 * MILLI
    assert parse_burst("20ms", "packets", 1_500_000) == 30 * MILLI


def test_no_drift_over_a_long_run_at_a_monotonic_clock_offset():
    """333 pps, a batch of 12 every 20 ms for 100 s, far from time 0 (like a monotonic
    clock after days of uptime): each batch earns 6.66 packets, never a whole number,
    and the total is the exact credit of the whole span, not a sum of roundings."""
    rig = Rig(appliance("rate: 333pps\nburst: 10"), slots=64)
    f = udp()
    base = 987654.321
    passed = 0
    for k in range(5001):
        passed += len(rig.send("inside", [f] * 12, base + k * 0.02)["outside"])
    span_ns = ns(base + 5000 * 0.02) - ns(base)
    assert abs(span_ns - 100 * 10**9) <= 1
    assert passed == 10 + 333 * span_ns // 10**9 == 10 + 33300


def test_take_is_exact_and_cannot_overflow():
    m = np.zeros((1, 2), np.int64)
    depth = 10**9 * 8 * SCALE  # the largest burst: 1 GB
    rate = 10**13  # the highest rate: 10 Tbit/s
    m[0] = (0, 0)
    assert take(m, 0, 0, 1, rate, depth, 10**18)  # a very long pause: full, no overflow
    assert m[0, 0] == depth - 1 and m[0, 1] == 10**18
    m[0] = (0, 100)
    assert not take(m, 0, 0, 1000, 3, depth, 100 + 333)  # 999 tokens < 1000
    assert take(m, 0, 0, 1000, 3, depth, 100 + 334)  # 1002
    assert m[0, 0] == 2
    m[0] = (500, 1000)
    assert not take(m, 0, 0, 600, 3, depth, 900)  # time went back: nothing earned
    assert tuple(m[0]) == (500, 1000)
    m[0] = (depth + 5, 0)  # a reload lowered the depth: clamped
    assert take(m, 0, 0, 1, 1, depth, 0) and m[0, 0] == depth - 1


# -- marking ---------------------------------------------------------------------------

def test_exceeding_packets_are_marked_with_a_valid_checksum():
    rig = Rig(appliance("rate: 10pps\nburst: 2\nexceed: {mark: af11}"))
    frames = [udp(sport=1000 + k, tos=(0xB8 | (k & 3))) for k in range(6)]  # EF + ECN
    out = rig.send("inside", frames, 1.0)["outside"]
    assert out[:2] == frames[:2]  # conforming: untouched
    for f, o in zip(frames[2:], out[2:]):
        ip = Ether(o)[SIP]
        assert ip.tos >> 2 == 10 and ip.tos & 3 == Ether(f)[SIP].tos & 3
        fresh = Ether(o)
        del fresh[SIP].chksum
        assert Ether(bytes(fresh))[SIP].chksum == ip.chksum
        assert o[:15] == f[:15] and o[16:24] == f[16:24] and o[26:] == f[26:]
    c = rig.counters()
    assert c["pol marked"] == c["pol exceed_packets"] == 4 and c["pol conform_packets"] == 2
    assert "pol drop/exceed" not in c


def test_a_bad_ipv4_checksum_stays_bad_when_marked():
    """The update is incremental: marking does not repair a header that was wrong."""
    bad = bytearray(udp())
    bad[25] ^= 0x01  # the low byte of the header checksum
    rig = Rig(appliance("rate: 10pps\nburst: 1\nexceed: {mark: 8}"))
    rig.send("inside", [udp(sport=7)], 1.0)
    (o,) = rig.send("inside", [bytes(bad)], 1.0)["outside"]
    fresh = Ether(o)
    del fresh[SIP].chksum
    right = Ether(bytes(fresh))[SIP].chksum
    assert Ether(o)[SIP].tos == 8 << 2 and Ether(o)[SIP].chksum == right ^ 0x01


def test_ipv6_traffic_class_is_marked_and_non_ip_cannot_be():
    rig = Rig(appliance("rate: 10pps\nburst: 1\nexceed: {mark: cs1}"))
    v6 = bytes(Eth(src=A_MAC, dst=B_MAC) / IPv6(src="2001:db8::1", dst="2001:db8::2", tc=0xB9,
                                                  fl=0xABCDE) / UDP(sport=1, dport=2))
    arp = bytes(Eth(src=A_MAC, dst="ff:ff:ff:ff:ff:ff") / ARP(hwsrc=A_MAC, psrc="10.0.0.1",
                                                             pdst="10.0.0.2"))
    out = rig.send("inside", [v6, v6, arp], 1.0)["outside"]
    assert out[0] == v6
    ip = Ether(out[1])[SIPv6]
    assert ip.tc == (8 << 2) | 1 and ip.fl == 0xABCDE and ip.version == 6
    c = rig.counters()
    assert c["pol marked"] == 1 and c["pol drop/unmarkable"] == 1
    assert c["pol exceed_packets"] == 2


# -- per flow, directions, table -------------------------------------------------------

def test_one_heavy_flow_does_not_eat_another_flows_tokens():
    rig = Rig(appliance("rate: 50pps\nburst: 5\nper: flow"))
    heavy, light = udp(sport=1111), udp(sport=2222)
    got_h = got_l = 0
    for k in range(400):  # 2 s: heavy at 200 pps, light at 25 pps (half the rate)
        t = 1.0 + k / 200
        frames = [heavy] + ([light] if k % 8 == 0 else [])
        out = rig.send("inside", frames, t)["outside"]
        got_h += out.count(heavy)
        got_l += out.count(light)
    assert got_l == 50  # every packet of the light flow
    assert got_h == 5 + int(50 * 399 / 200)
    # the light flow's bucket is full again 20 ms after each packet, 20 ms before the
    # next: its entry is forgotten in between (nothing lost) and made anew each time
    assert rig.counters()["pol flows_created"] == 1 + 50


def test_each_direction_of_a_flow_has_its_own_bucket():
    rig = Rig(appliance("rate: 10pps\nburst: 3\nper: flow"))
    out = rig.send("inside", [udp()] * 5, 1.0)["outside"]
    back = udp(src="10.0.0.2", dst="10.0.0.1", sport=2000, dport=1000, inside=False)
    assert len(out) == 3
    assert len(rig.send("outside", [back] * 5, 1.0)["inside"]) == 3
    assert rig.counters()["pol flows_created"] == 1  # one entry, both directions


def test_only_the_listed_directions_are_policed():
    rig = Rig(appliance("rate: 10pps\nburst: 2\ndirections: [outside]"))
    f_in = udp()
    f_out = udp(src="10.0.0.2", dst="10.0.0.1", inside=False)
    assert len(rig.send("inside", [f_in] * 50, 1.0)["outside"]) == 50
    assert len(rig.send("outside", [f_out] * 50, 1.0)["inside"]) == 2
    c = rig.counters()
    assert c["pol conform_packets"] == 2 and c["pol exceed_packets"] == 48


def test_per_port_buckets_are_shared_by_all_flows_of_a_direction():
    rig = Rig(appliance("rate: 10pps\nburst: 4"))
    frames = [udp(sport=1000 + k) for k in range(10)]
    assert len(rig.send("inside", frames, 1.0)["outside"]) == 4
    back = udp(src="10.0.0.2", dst="10.0.0.1", inside=False)
    assert len(rig.send("outside", [back] * 10, 1.0)["inside"]) == 4


def test_a_full_flow_table_polices_new_flows_by_the_overflow_bucket():
    rig = Rig(appliance("rate: 10pps\nburst: 2\nper: flow\nmax_flows: 2"))
    a, b, c_, d = (udp(sport=s) for s in (1, 2, 3, 4))
    assert len(rig.send("inside", [a, b], 1.0)["outside"]) == 2
    # c and d find the table full: they share the overflow bucket (2 packets)
    out = rig.send("inside", [c_, c_, d, d], 1.0)["outside"]
    assert out == [c_, c_]
    c = rig.counters()
    assert c["pol overflow_packets"] == 4 and c["pol flows_created"] == 2
    assert c["pol drop/exceed"] == 2
    assert len(rig.state.table) == 2


def test_a_flow_is_forgotten_only_once_its_bucket_is_full_again():
    rig = Rig(appliance("rate: 10pps\nburst: 5\nper: flow\nmax_flows: 4"))
    f = udp()
    assert len(rig.send("inside", [f] * 5, 1.0)["outside"]) == 5  # empty; full at 1.5
    assert len(rig.send("inside", [f] * 5, 1.2)["outside"]) == 2  # 2 earned
    rig.tick(1.69)  # full again at 1.2 + 0.5: still remembered
    assert len(rig.state.table) == 1 and "pol flows_expired" not in rig.counters()
    rig.tick(1.71)  # a tick sweeps the (small) table
    assert rig.counters()["pol flows_expired"] == 1 and len(rig.state.table) == 0
    assert len(rig.send("inside", [f] * 6, 1.71)["outside"]) == 5
    assert rig.counters()["pol flows_created"] == 2


def test_non_ip_and_malformed_frames_are_policed_by_their_l2_flow():
    rig = Rig(appliance("rate: 1pps\nburst: 2\nper: flow"))
    arp1 = bytes(Eth(src=A_MAC, dst="ff:ff:ff:ff:ff:ff")
                 / ARP(hwsrc=A_MAC, psrc="10.0.0.1", pdst="10.0.0.2"))
    arp2 = bytes(Eth(src="02:00:00:00:00:09", dst="ff:ff:ff:ff:ff:ff")
                 / ARP(hwsrc="02:00:00:00:00:09", psrc="10.0.0.9", pdst="10.0.0.2"))
    truncated = udp()[:30]  # IPv4 header cut short: a parse error, not dropped for it
    runt = b"\x01\x02\x03"
    vlan = bytes(Eth(src=A_MAC, dst=B_MAC) / Dot1Q(vid=7) / IPv4(src="10.0.0.1",
                                                                 dst="10.0.0.2")
                 / UDP(sport=1000, dport=2000) / Raw(b"x" * 58))
    out = rig.send("inside", [arp1] * 3 + [arp2] * 3 + [truncated] * 3 + [runt] * 3
                   + [udp()] * 3 + [vlan] * 3, 1.0)["outside"]
    assert out == [arp1] * 2 + [arp2] * 2 + [truncated] * 2 + [runt] * 2 + [udp()] * 2 \
        + [vlan] * 2  # six flows (the VLAN keeps its frames apart from the untagged)
    assert rig.counters()["pol flows_created"] == 6


def test_flow_buckets_move_with_their_flow_bucket():
    text = appliance("rate: 10pps\nburst: 3\nper: flow")
    one, two = Rig(text), Rig(text)
    f = udp()
    assert len(one.send("inside", [f] * 5, 1.0)["outside"]) == 3  # its bucket is empty
    (entry,) = one.state.table.entries(1.0)
    blob = one.state.export_flows([entry[2]], 1.0)
    assert two.state.import_flows(blob, 1.0) == 1
    assert one.state.remove_flows([entry[2]], 1.0) == 1
    assert len(two.send("inside", [f] * 5, 1.1)["outside"]) == 1  # 1 earned, no burst
    assert len(one.state.table) == 0
    assert len(one.send("inside", [f] * 5, 1.1)["outside"]) == 3  # a new flow there


def reload(rig: Rig, text: str, now: float):
    """What dva run does on SIGHUP (prepare, swap), on a rig."""
    new = prepare(parse_appliance(text), rig.engine)
    report = swap(rig.engine, new, now)
    for o in report.outputs:
        o.release_all()
    rig.engine, rig.plan = new, new.plan
    rig.check()
    return report


def test_a_reload_keeps_flow_buckets_and_clamps_them_to_a_smaller_burst():
    rig = Rig(appliance("rate: 10pps\nburst: 8\nper: flow"))
    f, g = udp(sport=1), udp(sport=2)
    assert len(rig.send("inside", [f] * 8 + [g] * 2, 1.0)["outside"]) == 10
    report = reload(rig, appliance("rate: 10pps\nburst: 4\nper: flow"), 1.0)
    assert "pol" in report.state_kept
    out = rig.send("inside", [f] * 8 + [g] * 8, 1.1)["outside"]
    assert out == [f] + [g] * 4  # f: empty, 1 earned; g: 6 left, clamped to 4
    report = reload(rig, appliance("rate: 10pps\nburst: 4"), 1.1)  # per port now
    assert "pol" in report.fresh


# -- config ----------------------------------------------------------------------------

def test_the_device_describes_its_limit():
    rig = Rig(appliance("rate: 8mbit\nexceed: {mark: ef}\nper: flow"))
    assert rig.plan.devices[0].describe() == \
        "pol (policer: 8mbit, burst 100000 bytes, per flow, exceed mark DSCP 46)"


@pytest.mark.parametrize("body, path, message", [
    ("rate: 10", "rate", "a rate needs a unit"),
    ("rate: 10mbps", "rate", "ambiguous"),
    ("rate: 10mb", "rate", "bits per second"),
    ("rate: 0pps", "rate", "out of range"),
    ("rate: 0.0001pps", "rate", "not a whole number"),
    ("rate: 20tbit", "rate", "out of range"),
    ("rate: 1mbit\nburst: 1000", "burst", "at least|must be 1518 bytes"),
    ("rate: 1mbit\nburst: 2GB", "burst", "1 GB"),
    ("rate: 100pps\nburst: 10kB", "burst", "packets per second"),
    ("rate: 1mbit\nburst: 10 packets", "burst", "bits or bytes per second"),
    ("rate: 1mbit\nburst: 10 parsecs", "burst", "bad burst"),
    ("rate: 1mbit\nburst: 1ms", "burst", "125 bytes"),
    ("rate: 1mbit\nexceed: mark", "exceed", "drop, or {mark: DSCP}"),
    ("rate: 1mbit\nexceed: {mark: 64}", "exceed.mark", "bad DSCP"),
    ("rate: 1mbit\nexceed: {mark: af51}", "exceed.mark", "bad DSCP"),
    ("rate: 1mbit\nexceed: {mark: 8, color: red}", "exceed.color", "unknown key"),
    ("rate: 1mbit\ndirections: [lan]", "directions", "not a port of this policer"),
    ("rate: 1mbit\ndirections: []", "directions", "no direction policed"),
    ("rate: 1mbit\nmax_flows: 10", "pol", "max_flows applies to per: flow only"),
    ("rate: 1mbit\nper: flow\nmax_flows: 0", "max_flows", "greater than or equal"),
    ("rate: 1mbit\nper: tenant", "per", "'port' or 'flow'"),
    ("rate: 1mbit\nceil: 2mbit", "ceil", "unknown key"),
])
def test_invalid_configs_are_rejected_at_their_path(body, path, message):
    with pytest.raises(ApplianceError) as ei:
        parse_appliance(appliance(body))
    text = str(ei.value)
    assert f"devices.pol{'' if path == 'pol' else '.' + path}" in text, text
    assert any(m in text for m in message.split("|")), text


def test_two_ports_with_different_names():
    with pytest.raises(ApplianceError, match="exactly two ports"):
        parse_appliance(appliance("rate: 1mbit").replace("[inside, outside]", "[a, a]"))


def test_config_model_values():
    c = PolicerConfig(type="policer", ports=["a", "b"], rate="1kpps", burst="0.5s",
                      exceed={"mark": "LE"})
    assert c.meter() == ("packets", 1_000_000, 500 * MILLI)
    assert c.exceed.mark == 1


# -- compiled == reference -------------------------------------------------------------



def differential_run() -> dict:
    """A mixed workload through a per-flow marking policer: every frame out, every
    counter and the flow table."""
    rnd = random.Random(7)
    rig = Rig(appliance("rate: 100kbit\nburst: 2000\nper: flow\nexceed: {mark: 12}"),
              slots=256)
    frames = []
    for k in range(60):
        frames.append(udp(src=f"10.0.0.{rnd.randrange(1, 4)}", sport=rnd.randrange(1, 4),
                          size=rnd.randrange(60, 1400), tos=rnd.randrange(256)))
        frames.append(bytes(Eth(src=B_MAC, dst=A_MAC)
                            / IPv6(src="2001:db8::2", dst=f"2001:db8::{k % 3 + 1}")
                            / TCP(sport=80, dport=5000 + k % 2)
                            / Raw(b"y" * rnd.randrange(900))))
    frames += [b"\x00" * 9, udp()[:33]]
    out, t = [], 1.0
    for k in range(0, len(frames), 7):
        res = rig.send("inside" if k % 2 else "outside", frames[k:k + 7], t)
        out.append({p: [f.hex() for f in fs] for p, fs in res.items()})
        t += rnd.choice([0.0005, 0.002, 0.01])
    return {"out": out, "counters": rig.counters(),
            "table": [[list(k), list(v), b, e] for k, v, b, e
                      in sorted(rig.state.table.entries(t))]}


def differential_arrays() -> dict[str, np.ndarray]:
    """:func:`differential_run` as one JSON string, for the reference comparison."""
    return {"json": np.array(json.dumps(differential_run()))}


@pytest.mark.slow
def test_compiled_equals_reference():
    """The same workload with numba's JIT and without it (a subprocess: the switch is
    read at import) gives the same bytes, counters and flow table."""
    jit = json.loads(str(assert_matches_reference("test_policer", "differential_arrays")
                         ["json"]))
    c = jit["counters"]
    assert c["pol marked"] > 10 and c["pol conform_packets"] > 10
    assert c["pol flows_created"] >= 6
