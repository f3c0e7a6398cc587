"""Connection tracking and the firewall: TCP states and timeouts, window scaling,
reopening, the bounded table under a SYN flood, export/import by bucket, config
validation. Golden cases (tests/golden/firewall) cover the packet-level behaviour.
"""

from __future__ import annotations

import numpy as np
import pytest
from rig import Rig

from dva.graph.appliance import ApplianceError, parse_appliance
from dva.nf.conntrack import DEFAULT_TIMEOUTS
from dva.packet.build import TCP, UDP, Eth, IPv4, Raw

IN_MAC, OUT_MAC = "02:00:00:00:00:05", "02:00:00:00:00:01"
WS7 = bytes([3, 3, 7, 1])  # TCP options: window scale 7, NOP


def appliance(rules: str = "[{action: allow, from: inside}]", extra: str = "") -> str:
    return f"""
appliance: t
devices:
  fw:
    type: firewall
    ports: [inside, outside]
    rules: {rules}
{extra}
attach:
  fw.inside: {{memory: in}}
  fw.outside: {{memory: out}}
"""


def seg(src, sport, dst, dport, flags, seq=0, ack=0, window=65535, payload=b"",
        options=b"") -> bytes:
    smac, dmac = (IN_MAC, OUT_MAC) if src.startswith("10.") else (OUT_MAC, IN_MAC)
    return bytes(Eth(src=smac, dst=dmac) / IPv4(src=src, dst=dst)
                 / TCP(sport=sport, dport=dport, seq=seq, ack=ack, flags=flags,
                       window=window, options=options) / Raw(payload))


class Conn:
    """One TCP connection from 10.0.0.5:sport to 192.0.2.9:80 through a rig;
    ``seq`` / ``rseq``: the next sequence number of the client / the server."""

    def __init__(self, rig: Rig, sport: int = 40000, isn: int = 1000, risn: int = 5000):
        self.rig, self.sport = rig, sport
        self.seq, self.rseq = isn, risn

    def out(self, flags, payload=b"", now=1.0, **kw):
        f = seg("10.0.0.5", self.sport, "192.0.2.9", 80, flags, self.seq, self.rseq,
                payload=payload, **kw)
        self.seq += len(payload) + ("S" in flags) + ("F" in flags)
        return self.rig.send("inside", [f], now)["outside"]

    def back(self, flags, payload=b"", now=1.0, **kw):
        f = seg("192.0.2.9", 80, "10.0.0.5", self.sport, flags, self.rseq, self.seq,
                payload=payload, **kw)
        self.rseq += len(payload) + ("S" in flags) + ("F" in flags)
        return self.rig.send("outside", [f], now)["inside"]

    def open(self, now=1.0, options=b"", window=65535, ack_window=65535):
        """The three-way handshake; SYN and SYN/ACK carry ``options`` (e.g. a window
        scale), the SYN ``window``, the last ACK ``ack_window``."""
        self.out("S", now=now, options=options, window=window)
        f = seg("192.0.2.9", 80, "10.0.0.5", self.sport, "SA", self.rseq, self.seq,
                options=options)
        self.rseq += 1
        assert self.rig.send("outside", [f], now)["inside"] == [f]
        assert self.out("A", now=now, window=ack_window)


def conns(rig: Rig, now: float) -> list[dict]:
    return rig.state.ct.connections(now)


def test_tcp_states_and_timeouts():
    rig = Rig(appliance())
    c = Conn(rig)
    c.out("S")
    (e,) = conns(rig, 1.0)
    assert e["state"] == "SYN_SENT" and not e["assured"]
    assert e["expires"] == pytest.approx(1.0 + DEFAULT_TIMEOUTS["tcp_syn_sent"])
    assert (e["src"], e["sport"], e["dport"]) == (0x0A000005, 40000, 80)
    f = seg("192.0.2.9", 80, "10.0.0.5", 40000, "SA", 5000, c.seq)
    c.rseq = 5001
    assert rig.send("outside", [f], 1.1)["inside"] == [f]
    assert conns(rig, 1.1)[0]["state"] == "SYN_RECV"
    assert c.out("A", now=1.2)
    (e,) = conns(rig, 1.2)
    assert e["state"] == "ESTABLISHED" and e["assured"]
    assert e["expires"] == pytest.approx(1.2 + 432000)
    assert c.out("PA", b"x" * 500, now=1.3) and c.back("A", now=1.3)
    assert c.out("FA", now=2.0)
    assert conns(rig, 2.0)[0]["state"] == "FIN_WAIT"
    assert c.back("FA", now=2.1)
    assert conns(rig, 2.1)[0]["state"] == "LAST_ACK"
    assert c.out("A", now=2.2)
    (e,) = conns(rig, 2.2)
    assert e["state"] == "TIME_WAIT" and e["expires"] == pytest.approx(2.2 + 120)
    # gone after TIME_WAIT: a late segment is invalid, and expiry is counted
    assert c.out("A", now=200) == []
    assert conns(rig, 200) == []
    c_ = rig.counters()
    assert c_["fw drop/invalid"] == 1 and c_["fw flows_created"] == 1


def test_rst_closes_and_a_new_syn_reopens():
    rig = Rig(appliance())
    c = Conn(rig)
    c.open()
    assert c.back("R", now=1.5)
    (e,) = conns(rig, 1.5)
    assert e["state"] == "CLOSE" and e["expires"] == pytest.approx(1.5 + 10)
    # the same ports again: a new connection (rules again), not an invalid packet
    c2 = Conn(rig, isn=90000)
    assert c2.out("S", now=2.0)
    (e,) = conns(rig, 2.0)
    assert e["state"] == "SYN_SENT"
    assert rig.counters()["fw reopened"] == 1
    assert rig.counters()["fw rule1_hits"] == 2


def test_out_of_window_is_invalid_and_window_scaling_is_honoured():
    rig = Rig(appliance())
    c = Conn(rig)
    c.open(options=WS7, window=64240, ack_window=2000)
    assert c.back("A", window=65535)  # windows in SYNs are never scaled; this one is
    # the receiver's window is 65535 << 7 (8 MB): a segment 4 MB ahead is acceptable
    c.seq += 4_000_000
    assert c.out("PA", b"y" * 100)
    # 64 MB ahead is not
    c.seq += 64_000_000
    assert c.out("PA", b"z" * 100) == []
    assert rig.counters()["fw invalid"] == 1


def test_the_clients_window_scale_counts_for_the_servers_segments():
    """Both sides offer scale 7: a client window of 100 means 12,800 bytes, so the
    server's segments may start up to 12,800 bytes past the client's ACK
    (regression: the client's scale was lost)."""
    rig = Rig(appliance())
    c = Conn(rig)
    c.open(options=WS7, window=64240, ack_window=100)
    for _ in range(9):  # segments that start inside the 12,800 bytes
        assert c.back("PA", b"s" * 1460)
    assert c.back("PA", b"s" * 1460) == []  # this one starts at 13,140: outside
    assert rig.counters()["fw invalid"] == 1


def test_unscaled_window_rejects_what_scaling_would_allow():
    rig = Rig(appliance())
    c = Conn(rig)
    c.open()
    assert c.back("A", window=65535)
    c.seq += 4_000_000
    assert c.out("PA", b"y" * 100) == []


def test_syn_flood_keeps_established_flows_and_the_limit():
    """Limit 10,000: 1,000 established connections keep passing while 100,000
    spoofed SYNs arrive; the table never exceeds its limit; evictions and refusals
    are counted; after the SYN timeout the table holds the 1,000 again."""
    rig = Rig(appliance(extra="    max_flows: 10000"), slots=4096)
    est = []
    for k in range(1000):
        c = Conn(rig, sport=10000 + k)
        c.open(now=1.0)
        est.append(c)
    table = rig.state.ct.table
    assert len(table) == 1000
    rng = np.random.default_rng(1)
    srcs = rng.integers(0x0A000100, 0x0A00FF00, 100_000)
    sports = rng.integers(1024, 65535, 100_000)
    passed = 0
    for i in range(0, 100_000, 1000):
        now = 2.0 + i / 100_000
        flood = [seg(f"10.{(s >> 16) & 255}.{(s >> 8) & 255}.{s & 255}", int(p),
                     "192.0.2.9", 80, "S", seq=int(s)) for s, p in
                 zip(srcs[i:i + 1000], sports[i:i + 1000])]
        rig.send("inside", flood, now)
        assert len(table) <= 10000
        if i % 20000 == 0:  # every established connection still passes, both ways
            for c in est:
                passed += bool(c.out("PA", b"d", now=now)) + bool(c.back("A", now=now))
    assert passed == 2 * 1000 * 5
    cnt = rig.counters()
    assert len(table) == 10000
    assert cnt["fw early_drops"] > 80_000
    assert cnt["fw flows_created"] - cnt["fw early_drops"] == 10000
    assert cnt.get("fw drop/table_full", 0) == cnt.get("fw flows_refused", 0)
    assert {e["state"] for e in conns(rig, 3.0) if e["sport"] == 80 or e["dport"] == 80} \
        >= {"ESTABLISHED", "SYN_SENT"}
    # time passes (SYN_SENT: 120 s); ticks sweep the table
    for k in range(16):
        rig.tick(130.0 + k * 0.1)
    assert len(table) == 1000
    assert {e["state"] for e in conns(rig, 131)} == {"ESTABLISHED"}
    cnt = rig.counters()
    assert cnt["fw flows_expired"] == 9000
    assert cnt["fw flows_created"] - cnt["fw early_drops"] - cnt["fw flows_expired"] == 1000


def test_full_table_of_assured_flows_refuses_new_ones():
    rig = Rig(appliance(extra="    max_flows: 10"))
    for k in range(10):
        Conn(rig, sport=20000 + k).open()
    f = seg("10.0.0.5", 30000, "192.0.2.9", 80, "S", 1)
    assert rig.send("inside", [f], 2.0)["outside"] == []
    cnt = rig.counters()
    assert cnt["fw drop/table_full"] == 1 and cnt["fw flows_refused"] == 1
    assert "fw early_drops" not in cnt


def test_export_import_by_bucket_is_lossless():
    rig = Rig(appliance())
    for k in range(300):
        c = Conn(rig, sport=30000 + k)
        c.open()
        if k % 3 == 0:
            c.out("PA", b"q" * 10)
    for k in range(100):
        f = bytes(Eth(src=IN_MAC, dst=OUT_MAC) / IPv4(src="10.0.0.7", dst="192.0.2.53")
                  / UDP(sport=40000 + k, dport=53))
        rig.send("inside", [f], 1.5)
    st = rig.state
    before = sorted(st.ct.table.entries(2.0))
    buckets = sorted({b for _, _, b, _ in before})
    half = buckets[::2]
    blob = st.export_flows(half, 2.0)
    other = Rig(appliance())
    n = other.state.import_flows(blob, 2.0)
    moved = sorted(e for e in before if e[2] in set(half))
    assert n == len(moved) > 0
    assert sorted(other.state.ct.table.entries(2.0)) == moved
    st.remove_flows(half, 2.0)
    assert sorted(st.ct.table.entries(2.0)) == sorted(e for e in before
                                                      if e[2] not in set(half))
    # the moved connections go on where they were imported
    c = Conn(other, sport=30000 + next(k for k in range(300) if _bucket_of(
        other, 30000 + k) in set(half)))
    c.seq, c.rseq = _next_seq(other, c.sport)
    assert c.out("PA", b"after the move", now=2.5)


def test_a_new_udp_connection_writes_only_its_records_first_line():
    """A UDP flow's entry is its record's first line (expiry, key, bucket, flags and
    aux, the device's words: the run-ahead fetches that line alone); the second,
    TCP's state and windows, keeps what the slot held. A TCP connection writes both.
    The key holds the largest zone, the entry the allowing rule (aux)."""
    from dva.nf.conntrack import S_SYN_SENT, V_SCALE, V_STATE, ZONE_LIMIT
    from dva.packet import layout as L
    from dva.worker.engine import Engine

    rig = Rig(appliance("[{action: deny, proto: tcp, dport: 22}, "
                        "{action: allow, from: inside}]"))
    rig.engine.tenant_id = ZONE_LIMIT - 1
    t = rig.state.ct.table
    junk = 0x0123456789ABCDEF
    t.records[:] = junk  # what slots held before (all are free)
    udp = bytes(Eth(src=IN_MAC, dst=OUT_MAC) / IPv4(src="10.0.0.7", dst="192.0.2.53")
                / UDP(sport=40000, dport=53))
    syn = seg("10.0.0.5", 40001, "192.0.2.9", 80, "S", seq=7)
    assert len(rig.send("inside", [udp, syn], 1.0)["outside"]) == 2
    got = {c["proto"]: c for c in conns(rig, 1.0)}
    assert {k: got[17][k] for k in ("zone", "src", "sport", "dst", "dport", "aux", "state")} \
        == {"zone": ZONE_LIMIT - 1, "src": 0x0A000007, "sport": 40000, "dst": 0xC0000235,
            "dport": 53, "aux": 2, "state": "UNREPLIED"}
    assert got[6]["zone"] == ZONE_LIMIT - 1 and got[6]["state"] == "SYN_SENT"
    (su,) = [s for s in t.live(1.0) if (t.keys[s, 1] >> 32) & 0xFF == 17]
    (st,) = [s for s in t.live(1.0) if (t.keys[s, 1] >> 32) & 0xFF == 6]
    assert (t.records[su, 8:] == junk).all() and (t.records[su, :8] != junk).all()
    assert t.vals[st, V_STATE] == S_SYN_SENT and t.vals[st, V_SCALE] != junk
    # the reply finds the entry and makes it REPLIED, whatever its second line holds
    reply = bytes(Eth(src=OUT_MAC, dst=IN_MAC) / IPv4(src="192.0.2.53", dst="10.0.0.7")
                  / UDP(sport=53, dport=40000))
    assert rig.send("outside", [reply], 1.5)["inside"] == [reply]
    assert {c["proto"]: c["state"] for c in conns(rig, 1.5)}[17] == "REPLIED"
    with pytest.raises(ValueError, match="tenant id"):
        Engine(rig.plan, rig.pool, tenant_id=L.TENANT_LIMIT)


def _bucket_of(rig: Rig, sport: int) -> int:
    for e in rig.state.ct.connections(2.0):
        if e["sport"] == sport and e["proto"] == 6:
            return e["bucket"]
    return -1


def _next_seq(rig: Rig, sport: int) -> tuple[int, int]:
    from dva.nf.conntrack import V_END, window_word
    for key, val, _, _ in rig.state.ct.table.entries(2.0):
        if key[1] & 0xFFFF == sport or (key[1] >> 16) & 0xFFFF == sport:
            return window_word(val[V_END], 0), window_word(val[V_END], 1) - 1
    raise AssertionError("connection not found")


@pytest.mark.parametrize("rules, extra, message", [
    ("[{action: allow, src: 10.0.0.1/24}]", "", "host bits set"),
    ("[{action: allow, from: lan}]", "", "not a port of this firewall"),
    ("[{action: allow, proto: icmp, dport: 80}]", "", "sport/dport need proto tcp or udp"),
    ("[{action: allow, proto: tcp, icmp_type: 8}]", "", "icmp_type needs proto icmp"),
    ("[{action: allow, proto: tcp, dport: 90-80}]", "", "LO <= HI"),
    ("[{action: maybe}]", "", "action"),
    ("[]", "    max_flows: 0", "max_flows"),
    ("[]", "    timeouts: {tcp_establshed: 5}", "unknown timeout"),
    ("[]", "    timeouts: {udp: -1}", "must be > 0"),
])
def test_invalid_configs_are_rejected_with_their_path(rules, extra, message):
    with pytest.raises(ApplianceError) as ei:
        parse_appliance(appliance(rules, extra))
    assert message in str(ei.value)
    assert "devices.fw" in str(ei.value)
