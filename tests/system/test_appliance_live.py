"""Live appliances between real Linux hosts in network namespaces.

The appliance runs as its own process (``dva run``) on af_packet attachments; the
hosts use their own tools (ping, curl, traceroute, tcpdump, ip neigh). Every
namespace and link is removed afterwards, also when a test fails.
"""

from __future__ import annotations

import re
import tempfile
import time
from pathlib import Path

import pytest

from dva.tools.demo import run_demo, start_appliance, stop_appliance
from dva.tools.lab import Lab, leftovers

pytestmark = pytest.mark.system

why = Lab.check_environment()
if why:
    pytest.skip(f"system tests {why}", allow_module_level=True)


@pytest.fixture
def lab():
    with Lab() as lb:
        yield lb
    assert leftovers(lb.prefix) == []


SWITCH = """\
appliance: lan
devices:
  sw: {{type: switch, ports: [a, b]}}
attach:
  sw.a: {{af_packet: {a}}}
  sw.b: {{af_packet: {b}}}
"""


def test_switch_between_two_hosts(lab):
    h1 = lab.host("h1", "10.9.0.1/24")
    h2 = lab.host("h2", "10.9.0.2/24")
    with tempfile.TemporaryDirectory() as tmp:
        app = Path(tmp) / "lan.yaml"
        app.write_text(SWITCH.format(a=h1.outside, b=h2.outside))
        proc, _ = start_appliance(app, Path(tmp))
        try:
            p = lab.exec(h1, ["ping", "-c", "5", "-i", "0.2", "-W", "2", h2.addr], check=False)
            neigh1 = lab.exec(h1, ["ip", "neigh", "show", h2.addr]).stdout
            neigh2 = lab.exec(h2, ["ip", "neigh", "show", h1.addr]).stdout
        finally:
            code, counters, err = stop_appliance(proc)
    assert code == 0, err
    assert " 0% packet loss" in p.stdout, p.stdout
    assert h2.mac in neigh1 and h1.mac in neigh2  # ARP resolved both ways
    # 5 requests + 5 replies + ARP; what the hosts sent is what the switch forwarded.
    assert counters["sw.a rx"] >= 6 and counters["sw.b rx"] >= 6
    assert counters["sw.a rx"] == counters["sw.b tx"]
    assert counters["sw.b rx"] == counters["sw.a tx"]
    assert counters["sw learned"] == 2


@pytest.mark.parametrize("workers", [None, 0], ids=["default-workers", "inline"])
def test_demo_lab_router_switch_real_tools(workers):
    """The README's demo as a test: every check of real traffic passes, with ``dva
    run``'s default (one worker per core left) and with the graph inline."""
    lines: list[str] = []
    res = run_demo(say=lines.append, workers=workers)
    text = "\n".join(lines)
    assert res.ok, text
    names = [c.what for c in res.checks]
    assert any("curl" in n for n in names) and any("traceroute" in n for n in names)
    c = res.counters
    assert c["r1 drop/no_route"] >= 1
    assert c["r1 drop/ttl_exceeded"] >= 1  # traceroute's first probes
    prefix = re.search(r"dva\d+[0-9a-f]{4}", text)
    assert prefix is None or leftovers(prefix.group(0)) == []


BLAST = """
import socket, sys
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
s.bind(("eth0", 0))
frame = bytes.fromhex(sys.argv[1])
for _ in range(int(sys.argv[2])):
    s.send(frame)
"""


def test_every_frame_is_forwarded_or_counted_under_load(lab):
    """As fast as a sender can go: what the port did not take, the kernel counted
    as dropped before our ring, and the port reports it."""
    h1 = lab.host("h1", "10.9.0.1/24")
    h2 = lab.host("h2", "10.9.0.2/24")
    frame = (bytes.fromhex(h2.mac.replace(":", "")) + bytes.fromhex(h1.mac.replace(":", ""))
             + bytes.fromhex("88b5") + bytes(46))
    sent = 60000
    with tempfile.TemporaryDirectory() as tmp:
        app = Path(tmp) / "lan.yaml"
        app.write_text(SWITCH.format(a=h1.outside, b=h2.outside))
        proc, _ = start_appliance(app, Path(tmp))
        try:
            tx0 = int(lab.exec(h1, ["cat", "/sys/class/net/eth0/statistics/tx_packets"]).stdout)
            lab.exec(h1, ["python3", "-c", BLAST, frame.hex(), str(sent)], timeout=120)
            tx = int(lab.exec(h1, ["cat", "/sys/class/net/eth0/statistics/tx_packets"]).stdout)
            time.sleep(1.5)  # drain, and a kernel-drop reading (every second)
        finally:
            code, counters, err = stop_appliance(proc)
    assert code == 0, err
    assert tx - tx0 >= sent
    taken = counters["port sw.a rx"]
    dropped = counters.get("attach sw.a drop/kernel_drops", 0)
    assert taken + dropped == tx - tx0
    # everything taken entered the graph, or was dropped (counted) on the way to a worker
    bus = sum(v for k, v in counters.items() if k.startswith("bus ") and "drop/" in k)
    assert counters["sw.a rx"] + bus == taken


def test_demo_runs_with_two_workers():
    """The demo's checks of real traffic (ARP, ping, TTL, curl through the NAT,
    traceroute, unreachable, iperf3, the port forward, the firewall) pass with the
    graph on two worker processes behind a dispatcher."""
    lines: list[str] = []
    res = run_demo(say=lines.append, workers=2)
    assert res.ok, "\n".join(lines)
    c = res.counters
    assert c["bus w0 drop/ring_full"] == 0 and c["bus w1 drop/ring_full"] == 0
    assert c["worker w0 restarts"] == 0 and c["worker w1 restarts"] == 0
    assert c["nat dnat_flows"] >= 1 and c["fw drop/denied"] >= 1
