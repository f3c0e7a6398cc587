"""The policer between real Linux hosts: iperf3 UDP at twice the configured rate.

Two hosts in one subnet, "inside" (10.79.0.1) and "outside" (10.79.0.2), each a
network namespace whose veth's root-namespace end is attached to a policer port. The
appliance runs as its own process (``dva run``); iperf3 sends UDP from inside, its
server outside reports what arrived. Every namespace, link and process is removed
afterwards, also when a test fails.

What "rate" means here: the policer counts Ethernet frame bytes (header + payload, no
FCS), iperf3 reports UDP payload. With 1000-byte datagrams a frame is 1000 + 8 (UDP)
+ 20 (IPv4) + 14 (Ethernet) = 1042 bytes, so a limit of 1042 kB/s of frames is 1000
datagrams per second: 8 Mbit/s of payload. The burst is 20 ms of the rate (about 20
datagrams), 0.4 % of a 5-second run. The rate is modest so that the appliance (one
process on a small, shared machine) is never the bottleneck: without a policer the
same path carries far more.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from dva.tools.demo import start_appliance, stop_appliance
from dva.tools.lab import Host, Lab, leftovers

pytestmark = pytest.mark.system

why = Lab.check_environment()
if why:
    pytest.skip(f"system tests {why}", allow_module_level=True)
if shutil.which("iperf3") is None:
    pytest.skip("iperf3 is not installed (apt-get install iperf3)", allow_module_level=True)

PAYLOAD = 1000
FRAME = PAYLOAD + 8 + 20 + 14
RATE_FRAMES = 1000  # frames per second allowed
PAYLOAD_BPS = RATE_FRAMES * PAYLOAD * 8  # 8 Mbit/s of iperf3 payload
SECONDS = 5


def appliance(per: str, inside: Host, outside: Host) -> str:
    return f"""\
appliance: edge
tenant: lab
devices:
  pol:
    type: policer
    ports: [inside, outside]
    rate: {RATE_FRAMES * FRAME // 1000}kB/s
    burst: 20ms
    per: {per}
    directions: [inside]
attach:
  pol.inside: {{af_packet: {inside.outside}}}
  pol.outside: {{af_packet: {outside.outside}}}
"""


@pytest.fixture
def lab():
    with Lab() as lb:
        yield lb
    assert leftovers(lb.prefix) == []


def iperf_server(lab: Lab, h: Host, port: int) -> None:
    lab.popen(h, ["iperf3", "-s", "-B", h.addr, "-p", str(port)])
    end = time.monotonic() + 10
    while str(port) not in lab.exec(h, ["ss", "-ltnH"]).stdout:
        assert time.monotonic() < end, "iperf3 -s did not start"
        time.sleep(0.1)


def iperf_udp(lab: Lab, frm: Host, to: Host, port: int, bps: int) -> subprocess.Popen:
    return lab.popen(frm, ["iperf3", "-c", to.addr, "-p", str(port), "-u", "-b", str(bps),
                           "-l", str(PAYLOAD), "-t", str(SECONDS), "-J"], text=True)


def received(p: subprocess.Popen) -> dict:
    """What the iperf3 server got, as the client reports it (payload bits/s)."""
    out, err = p.communicate(timeout=60)
    assert p.returncode == 0, out[-2000:] + err
    return json.loads(out)["end"]["sum_received"]


def run_policer(lab: Lab, tmp: Path, per: str, clients) -> tuple[list[dict], dict]:
    inside = lab.host("inside", "10.79.0.1/24")
    outside = lab.host("outside", "10.79.0.2/24")
    for port, _ in clients:
        iperf_server(lab, outside, port)
    app = tmp / "edge.yaml"
    app.write_text(appliance(per, inside, outside))
    proc, _ = start_appliance(app, tmp)
    try:
        ps = [iperf_udp(lab, inside, outside, port, bps) for port, bps in clients]
        results = [received(p) for p in ps]
    finally:
        code, counters, err = stop_appliance(proc)
    assert code == 0, err
    return results, counters


def test_udp_at_twice_the_rate_gets_the_configured_rate(lab, tmp_path):
    (got,), c = run_policer(lab, tmp_path, "port", [(5201, 2 * PAYLOAD_BPS)])
    rate = got["bytes"] * 8 / got["seconds"]
    print(f"policer 8 Mbit/s (payload), offered 16: received {rate / 1e6:.3f} Mbit/s, "
          f"lost {got['lost_percent']:.1f} %; conform {c['pol conform_packets']}, "
          f"exceed {c['pol exceed_packets']}")
    assert abs(rate - PAYLOAD_BPS) <= 0.05 * PAYLOAD_BPS, got
    assert 35 <= got["lost_percent"] <= 65, got  # about half was over the rate
    # what was dropped was dropped by the policer, for exceeding
    assert c["pol drop/exceed"] == c["pol exceed_packets"] > 0.3 * got["packets"]
    assert c["pol.outside tx"] == c["pol conform_packets"]
    assert c["port pol.outside tx"] == c["pol.outside tx"]


def test_per_flow_a_light_flow_keeps_its_rate_beside_a_heavy_one(lab, tmp_path):
    (heavy, light), c = run_policer(lab, tmp_path, "flow", [(5201, 2 * PAYLOAD_BPS),
                                                            (5202, PAYLOAD_BPS // 4)])
    heavy_rate = heavy["bytes"] * 8 / heavy["seconds"]
    light_rate = light["bytes"] * 8 / light["seconds"]
    print(f"per flow 8 Mbit/s: heavy (16 offered) {heavy_rate / 1e6:.3f} Mbit/s, light "
          f"(2 offered) {light_rate / 1e6:.3f} Mbit/s, lost {light['lost_percent']:.2f} %")
    assert abs(heavy_rate - PAYLOAD_BPS) <= 0.05 * PAYLOAD_BPS, heavy
    assert light["lost_percent"] < 1, light
    assert c["pol flows_created"] >= 4  # two UDP flows, two iperf3 control connections
    assert c["pol overflow_packets"] == 0
