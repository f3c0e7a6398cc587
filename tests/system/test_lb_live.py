"""The load balancer between real Linux hosts: HTTP servers behind a VIP.

A client host (10.88.0.10) reaches the VIP 10.88.2.100 through its gateway, the
router r1 (10.88.0.1); the lb sits on the wire between the client and the router
(DNAT mode), the backends (10.88.1.11-14, each a Python HTTP server and an echo
server) hang off a switch behind the router's other port. The appliance runs as
its own process (``dva run``); every namespace, link and process is removed
afterwards, also when a test fails.
"""

from __future__ import annotations

import numpy as np
import pytest
from test_firewall_live import ECHO_CLIENT, ECHO_SERVER, Appliance

from dva.nf.maglev import build_table, shares
from dva.tools.lab import Lab, leftovers

pytestmark = pytest.mark.system

why = Lab.check_environment()
if why:
    pytest.skip(f"system tests {why}", allow_module_level=True)

VIP = "10.88.2.100"
TABLE = 65537

APPLIANCE = """\
appliance: web
tenant: lab
devices:
  lb:
    type: lb
    ports: [front, back]
    table_size: {table}
    vips:
      http: {{addr: {vip}, proto: tcp, port: 80, backends: [{http}]}}
      echo: {{addr: {vip}, proto: tcp, port: 7000, backends: [{echo}]}}
  r1:
    type: router
    ports:
      lan: {{ip: 10.88.0.1/24}}
      srv: {{ip: 10.88.1.1/24}}
  sw:
    type: switch
    ports: [up, {swports}]
links:
  - [lb.back, r1.lan]
  - [r1.srv, sw.up]
attach:
  lb.front: {{af_packet: {client}}}
{attach}
"""


class Net:
    def __init__(self, lab: Lab, workdir) -> None:
        self.lab = lab
        self.workdir = workdir
        self.client = lab.host("client", "10.88.0.10/24", "10.88.0.1")
        self.backends = [lab.host(f"b{i}", f"10.88.1.{10 + i}/24", "10.88.1.1")
                         for i in range(1, 5)]
        for b in self.backends:
            www = workdir / b.name
            www.mkdir()
            (www / "who").write_text(f"{b.name}\n")
            lab.http_server(b, 8000, str(www))
            p = lab.popen(b, ["python3", "-c", ECHO_SERVER, b.addr, "7000"], text=True)
            assert p.stdout.readline().strip() == "listening", p.stderr.read()
        self.file = workdir / "web.yaml"
        self.app: Appliance | None = None

    def text(self, n: int) -> str:
        use = self.backends[:n]
        return APPLIANCE.format(
            table=TABLE, vip=VIP,
            http=", ".join(f"{{addr: {b.addr}, port: 8000}}" for b in use),
            echo=", ".join(f"{{addr: {b.addr}}}" for b in use),
            swports=", ".join(b.name for b in self.backends),
            client=self.client.outside,
            attach="\n".join(f"  sw.{b.name}: {{af_packet: {b.outside}}}"
                             for b in self.backends))

    def start(self, n: int) -> Appliance:
        self.file.write_text(self.text(n))
        self.app = Appliance(self.file, self.workdir)
        return self.app

    def requests(self, count: int) -> dict[str, int]:
        """``count`` HTTP requests from the client with curl, one connection each;
        how many each backend answered."""
        urls = [f"http://{VIP}/who"] * count
        p = self.lab.exec(self.client, ["curl", "-sS", "--max-time", "10",
                                        "-H", "Connection: close", *urls], timeout=120,
                          check=False)
        assert p.returncode == 0, p.stderr
        got = {b.name: 0 for b in self.backends}
        for line in p.stdout.split():
            got[line] += 1
        assert sum(got.values()) == count, p.stdout
        return got


@pytest.fixture
def net(tmp_path):
    with Lab() as lab:
        n = Net(lab, tmp_path)
        try:
            yield n
        finally:
            if n.app is not None:
                n.app.stop()
    assert leftovers(lab.prefix) == []


def expected_shares(net: Net, n: int) -> np.ndarray:
    names = [f"{b.addr}:8000" for b in net.backends[:n]]
    return shares(build_table(names, [1] * n, [True] * n, TABLE), n)


def test_requests_spread_over_the_backends_as_the_maglev_table_says(net):
    net.start(3)
    count = 300
    got = net.requests(count)
    share = expected_shares(net, 3)
    for k, b in enumerate(net.backends[:3]):
        sd = (count * share[k] * (1 - share[k])) ** 0.5
        assert abs(got[b.name] - count * share[k]) < 4.5 * sd, (got, share)
    assert got["b4"] == 0
    code, c, err = net.app.stop()
    assert code == 0, err
    for b in net.backends[:3]:
        assert c[f"lb http/{b.addr}:8000 flows"] == got[b.name]
    assert c["lb balanced_flows"] == count
    assert c["lb drop/invalid"] == 0 and c["lb drop/no_backend"] == 0


def test_a_long_connection_survives_a_backend_being_added(net):
    app = net.start(3)
    client = net.lab.popen(net.client, ["python3", "-u", "-c", ECHO_CLIENT, VIP, "7000"],
                           text=True)
    for _ in range(5):
        line = client.stdout.readline().strip()
        assert line.startswith("ok"), line + client.stderr.read()
    n = app.reload(net.text(4))
    app.wait_line(r"^reloaded .*web\.yaml: generation 2\b", n)
    for _ in range(10):  # two more seconds of round trips on the same connection
        line = client.stdout.readline().strip()
        assert line.startswith("ok"), line
    assert client.poll() is None
    got = net.requests(200)
    assert got["b4"] > 0  # new connections do reach the new backend
    client.terminate()
    code, c, err = app.stop()
    assert code == 0, err
    assert c["lb drop/invalid"] == 0
    # the echo connection's packets were all counted on one backend
    echo = [c[f"lb echo/{b.addr}:7000 packets"] for b in net.backends]
    assert sum(1 for x in echo if x) == 1 and max(echo) >= 2 * 10
