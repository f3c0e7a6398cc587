"""A filtering NAT (``nat`` with ``filter``) between real Linux hosts.

Two hosts in one subnet, "inside" (10.78.0.1) and "outside" (10.78.0.2), each a
network namespace whose veth's root-namespace end is attached to a NAT port (a bump
in the wire). The NAT masquerades the inside host as 10.78.0.100 (the outside host
has a static neighbour entry for it: nothing answers ARP for that address) and
forwards 10.78.0.100:8080 and :2222 to the inside host's ports 8000 and 22; its filter
lets the inside out, lets the outside in only to 10.78.0.1:8000 and rejects port 22.
The appliance runs as its own process (``dva run``); the hosts use curl, ping and
Python sockets. Every namespace, link and process is removed afterwards.
"""

from __future__ import annotations

import time

import pytest
from test_firewall_live import CONNECT, Appliance

from dva.tools.lab import Lab, leftovers

pytestmark = pytest.mark.system

why = Lab.check_environment()
if why:
    pytest.skip(f"system tests {why}", allow_module_level=True)

NAT_IP = "10.78.0.100"
APPLIANCE = """\
appliance: edge
tenant: lab
devices:
  nat:
    type: nat
    ports: [inside, outside]
    snat: {{to: {nat_ip}}}
    dnat:
      - {{proto: tcp, dport: 8080, to: "10.78.0.1:8000"}}
      - {{proto: tcp, dport: 2222, to: "10.78.0.1:22"}}
    filter:
      default: deny
      rules:
        - {{action: allow, from: inside}}
        - {{action: allow, from: outside, proto: tcp, dst: 10.78.0.1, dport: 8000}}
        - {{action: reject, from: outside, proto: tcp, dport: 22}}
attach:
  nat.inside: {{af_packet: {inside}}}
  nat.outside: {{af_packet: {outside}}}
"""


def test_the_filter_lets_inside_out_and_outside_in_only_through_its_rules(tmp_path):
    with Lab() as lab:
        inside = lab.host("inside", "10.78.0.1/24")
        outside = lab.host("outside", "10.78.0.2/24")
        lab.exec(outside, ["ip", "neigh", "replace", NAT_IP, "lladdr", inside.mac, "dev",
                           "eth0", "nud", "permanent"])
        www = tmp_path / "www"
        www.mkdir()
        (www / "index.html").write_text("hello\n")
        out_srv = lab.http_server(outside, 8080, str(www))
        lab.http_server(inside, 8000, str(www))
        f = tmp_path / "edge.yaml"
        f.write_text(APPLIANCE.format(nat_ip=NAT_IP, inside=inside.outside,
                                      outside=outside.outside))
        app = Appliance(f, tmp_path)
        try:
            def curl(frm, url):
                return lab.exec(frm, ["curl", "-sS", "--connect-timeout", "3",
                                      "--max-time", "10", url], check=False)

            def connect(frm, port, timeout):
                p = lab.exec(frm, ["python3", "-c", CONNECT, NAT_IP, str(port),
                                   str(timeout)])
                what, secs = p.stdout.split()
                return what, float(secs)

            p = curl(inside, f"http://{outside.addr}:8080/index.html")
            assert p.returncode == 0 and p.stdout == "hello\n", p.stderr
            p = curl(outside, f"http://{NAT_IP}:8080/index.html")  # the port forward
            assert p.returncode == 0 and p.stdout == "hello\n", p.stderr
            what, secs = connect(outside, 2222, 3.0)  # forwarded to 22: rejected
            assert what == "ConnectionRefusedError" and secs < 0.5
            t0 = time.monotonic()
            assert connect(outside, 9, 1.0)[0] == "TimeoutError"  # default deny
            assert time.monotonic() - t0 >= 0.9
            p = lab.exec(inside, ["ping", "-c", "3", "-i", "0.2", "-W", "1", outside.addr],
                         check=False)
            assert " 0% packet loss" in p.stdout, p.stdout
            p = lab.exec(outside, ["ping", "-c", "3", "-i", "0.2", "-W", "1", NAT_IP],
                         check=False)
            assert p.returncode == 1 and "100% packet loss" in p.stdout, p.stdout
        finally:
            code, c, err = app.stop()
        assert code == 0, err
        out_srv.terminate()
        log = out_srv.communicate(timeout=10)[1].decode()
        # the outside server saw the NAT's address, never the inside host's
        assert f"{NAT_IP} - -" in log and f"{inside.addr} - -" not in log, log
        assert c["nat rule1_hits"] >= 2  # the curl and the ping from inside
        assert c["nat rule2_hits"] == 1 and c["nat dnat_flows"] >= 1
        assert c["nat rule3_hits"] == 1 and c["nat rst_sent"] == 1
        assert c["nat drop/rejected"] == 1
        assert c["nat drop/denied"] >= 1 + 3  # the SYN (and retransmits), the pings
        assert c["port nat.inside rx"] == c["nat.inside rx"]
        assert c["nat.outside tx"] == c["port nat.outside tx"]
    assert leftovers(lab.prefix) == []
