"""VXLAN between real Linux hosts: two dva appliances join two segments over an
underlay veth, and a dva VTEP talks to Linux's own vxlan device.

1. Two appliances (two ``dva run`` processes), each a switch (the host's veth) linked
   to a vxlan device whose underlay port is attached to one end of a veth pair in the
   root namespace (the underlay "wire"). h1 and h2, in one subnet, ping each other;
   tcpdump on the underlay captures the tunnel traffic, which scapy re-parses: UDP
   4789, source ports in 49152-65535, VNI 100, the I flag, DF and TTL 64, correct IPv4
   checksums, and inside, the very pings and ARP of the hosts. A frame too large for
   the underlay MTU is dropped and counted (``too_big``), one that fits passes.
2. Interop: a namespace "peer" runs Linux's vxlan device (``ip link add ... type
   vxlan id 100 ... dstport 4789``) in a bridge with host h2; h1 sits behind a dva
   appliance whose VTEP is Linux's remote. They ping each other; each side learned
   the other's MAC behind the right VTEP; the capture holds both implementations'
   packets and scapy reads them alike.

Namespaces, links and processes are named per run (:class:`dva.tools.lab.Lab`) and
removed afterwards, also when a test fails.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from dva.tools.demo import start_appliance, stop_appliance
from dva.tools.lab import Lab, leftovers, run

pytestmark = pytest.mark.system

why = Lab.check_environment() or (None if shutil.which("tcpdump") else "need tcpdump")
if why:
    pytest.skip(f"system tests {why}", allow_module_level=True)

from scapy.layers.inet import ICMP, IP, UDP  # noqa: E402
from scapy.layers.l2 import ARP  # noqa: E402
from scapy.layers.vxlan import VXLAN  # noqa: E402
from scapy.utils import rdpcap  # noqa: E402

SIDE = """\
appliance: {name}
tenant: lab
devices:
  lan:
    type: switch
    ports: [host, vx]
  vx:
    type: vxlan
    vni: 100
    local: {local}/24
    remotes: [{remote}]
links:
  - [lan.vx, vx.overlay]
attach:
  lan.host: {{af_packet: {host}}}
  vx.underlay: {{af_packet: {underlay}}}
"""


def quiet_link(name: str) -> None:
    """Up, no IPv6 chatter, no offloads (the data plane sees wire frames)."""
    run(["sysctl", "-qw", f"net.ipv6.conf.{name}.disable_ipv6=1"], check=False)
    if shutil.which("ethtool"):
        run(["ethtool", "-K", name, "tx", "off", "rx", "off", "tso", "off", "gso", "off",
             "gro", "off"], check=False)
    run(["ip", "link", "set", name, "up"])


class Capture:
    """tcpdump of UDP 4789 on a root-namespace link, into a pcap file."""

    def __init__(self, lab: Lab, link: str, path: Path) -> None:
        self.path = path
        # --immediate-mode: else packets wait in a ring block until it times out, and
        # those of the last second are lost when tcpdump is stopped
        self.proc = subprocess.Popen(["tcpdump", "-i", link, "-n", "--immediate-mode", "-U",
                                      "-s", "0", "-w", str(path), "udp port 4789"],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                     text=True, start_new_session=True)
        lab.procs.append(self.proc)  # stopped by lab.close() whatever happens
        line = self.proc.stderr.readline()
        assert "listening on" in line, line

    def packets(self) -> list:
        time.sleep(0.3)
        self.proc.send_signal(signal.SIGINT)
        self.proc.wait(10)
        stats = self.proc.stderr.read().split()  # N packets captured, M received by filter
        assert stats[0] == stats[3] and "dropped" in stats, stats
        return list(rdpcap(str(self.path)))


def ping(lab: Lab, frm, to, count: int = 4, size: int | None = None,
         df: bool = False) -> subprocess.CompletedProcess:
    cmd = ["ping", "-c", str(count), "-i", "0.2", "-W", "2"]
    if size is not None:
        cmd += ["-s", str(size)]
    if df:
        cmd += ["-M", "do"]
    return lab.exec(frm, cmd + [to.addr], check=False)


def replies(p: subprocess.CompletedProcess) -> int:
    for line in p.stdout.splitlines():
        if "received" in line:
            return int(line.split(",")[1].split()[0])
    return 0


def check_vxlan(pkts: list, vteps: set[str], dva_vteps: set[str]) -> list:
    """Every captured tunnel packet, re-parsed; returns the inner frames."""
    inner = []
    assert pkts, "nothing captured on the underlay"
    for p in pkts:
        ip, udp = p[IP], p[UDP]
        assert {ip.src, ip.dst} == vteps, p.summary()
        assert udp.dport == 4789 and p.haslayer(VXLAN), p.summary()
        v = p[VXLAN]
        assert v.flags == 0x08 and v.vni == 100 and v.reserved1 == 0 and v.reserved2 == 0
        fresh = IP(bytes(ip))
        del fresh.chksum
        assert IP(bytes(fresh)).chksum == ip.chksum
        if ip.src in dva_vteps:  # what dva sent: the choices it documents
            assert 49152 <= udp.sport <= 65535 and udp.chksum == 0, p.summary()
            assert ip.flags == "DF" and ip.ttl == 64 and ip.len == len(ip)
            assert udp.len == ip.len - 20
        inner.append(v.payload)
    return inner


def pings_between(inner: list, a, b) -> tuple[int, int]:
    """Echo requests a -> b and replies b -> a among the inner frames."""
    req = sum(1 for f in inner if f.haslayer(ICMP) and f[ICMP].type == 8
              and f[IP].src == a.addr and f[IP].dst == b.addr and f.src == a.mac)
    rep = sum(1 for f in inner if f.haslayer(ICMP) and f[ICMP].type == 0
              and f[IP].src == b.addr and f[IP].dst == a.addr and f.src == b.mac)
    return req, rep


@pytest.fixture
def lab():
    with Lab() as lab_:
        yield lab_
    assert leftovers(lab_.prefix) == []


def test_two_appliances_join_two_segments_over_an_underlay_veth(lab, tmp_path):
    h1 = lab.host("h1", "10.88.0.1/24")
    h2 = lab.host("h2", "10.88.0.2/24")
    ua, ub = f"{lab.prefix[:9]}ua", f"{lab.prefix[:9]}ub"
    run(["ip", "link", "add", ua, "type", "veth", "peer", "name", ub])
    lab.links.append(ua)
    for link in (ua, ub):
        quiet_link(link)
    procs = []
    try:
        for name, host, local, remote, under in (("side-a", h1, "192.168.77.1",
                                                  "192.168.77.2", ua),
                                                 ("side-b", h2, "192.168.77.2",
                                                  "192.168.77.1", ub)):
            work = tmp_path / name
            work.mkdir()
            f = work / f"{name}.yaml"
            f.write_text(SIDE.format(name=name, local=local, remote=remote,
                                     host=host.outside, underlay=under))
            # one after the other: the second finds the first one's kernels compiled
            procs.append(start_appliance(f, work)[0])
        cap = Capture(lab, ua, tmp_path / "underlay.pcap")
        p12 = ping(lab, h1, h2, count=5)
        p21 = ping(lab, h2, h1, count=5)
        fits = ping(lab, h1, h2, count=2, size=1422, df=True)  # IP 1450: 1464-byte frames
        big = ping(lab, h1, h2, count=2, size=1472, df=True)  # 1514: over the MTU
        pkts = cap.packets()
    finally:
        results = [stop_appliance(p) for p in procs]
    assert replies(p12) >= 4, p12.stdout
    assert replies(p21) >= 4, p21.stdout
    assert replies(fits) == 2, fits.stdout
    assert replies(big) == 0, big.stdout
    for code, _, err in results:
        assert code == 0, err
    (_, ca, _), (_, cb, _) = results
    assert ca["vx drop/too_big"] == 2 and cb["vx drop/too_big"] == 0
    for c in (ca, cb):
        assert c["vx learned"] >= 1 and c["vx neighbors_learned"] >= 1
        assert c["vx drop/unknown_vni"] == 0 and c["vx drop/bad_vxlan"] == 0
        assert c["vx drop/malformed"] == 0 and c["vx drop/unknown_vtep"] == 0
    inner = check_vxlan(pkts, {"192.168.77.1", "192.168.77.2"},
                        {"192.168.77.1", "192.168.77.2"})
    req, rep = pings_between(inner, h1, h2)
    assert req >= 5 + 2 and rep >= 4 + 2, (req, rep)
    req, rep = pings_between(inner, h2, h1)
    assert req >= 5 and rep >= 4, (req, rep)
    assert any(f.haslayer(ARP) and f[ARP].psrc in (h1.addr, h2.addr) for f in inner)
    sizes = {len(f) for f in inner if f.haslayer(IP)}
    assert 1464 in sizes and max(sizes) == 1464  # the 1514-byte frames never left


def test_a_dva_vtep_interoperates_with_linux_vxlan(lab, tmp_path):
    h1 = lab.host("h1", "10.89.0.1/24")
    h2 = lab.host("h2", "10.89.0.2/24")
    peer = lab.host("peer", "192.168.78.2/24")
    for k in ("all", "default"):
        lab.exec(peer, ["sysctl", "-qw", f"net.ipv6.conf.{k}.disable_ipv6=1"], check=False)
    # h2's veth end goes into the peer namespace, bridged with Linux's VTEP
    run(["ip", "link", "set", h2.outside, "netns", peer.ns])
    for cmd in (["ip", "link", "add", "vx0", "type", "vxlan", "id", "100", "local",
                 "192.168.78.2", "remote", "192.168.78.1", "dstport", "4789", "dev", "eth0"],
                ["ip", "link", "add", "br0", "type", "bridge"],
                ["ip", "link", "set", "vx0", "master", "br0"],
                ["ip", "link", "set", h2.outside, "master", "br0"],
                ["ip", "link", "set", "vx0", "up"],
                ["ip", "link", "set", h2.outside, "up"],
                ["ip", "link", "set", "br0", "up"]):
        lab.exec(peer, cmd)
    # Linux's VTEP carries 1450-byte IP packets: so does h2, and h1 behind dva
    lab.exec(h2, ["ip", "link", "set", "eth0", "mtu", "1450"])
    lab.exec(h1, ["ip", "link", "set", "eth0", "mtu", "1450"])
    work = tmp_path / "dva"
    work.mkdir()
    f = work / "dva.yaml"
    f.write_text(SIDE.format(name="dva-side", local="192.168.78.1", remote="192.168.78.2",
                             host=h1.outside, underlay=peer.outside))
    proc = start_appliance(f, work)[0]
    try:
        cap = Capture(lab, peer.outside, tmp_path / "underlay.pcap")
        p12 = ping(lab, h1, h2, count=5)
        p21 = ping(lab, h2, h1, count=5)
        full = ping(lab, h1, h2, count=2, size=1450 - 28, df=True)
        fdb = lab.exec(peer, ["bridge", "fdb", "show", "dev", "vx0"]).stdout
        pkts = cap.packets()
    finally:
        code, c, err = stop_appliance(proc)
    assert code == 0, err
    assert replies(p12) >= 4, p12.stdout
    assert replies(p21) >= 4, p21.stdout
    assert replies(full) == 2, full.stdout
    # Linux learned h1 behind the dva VTEP; dva learned h2 behind Linux's
    assert any(h1.mac in line and "dst 192.168.78.1" in line for line in fdb.splitlines()), fdb
    assert c["vx learned"] >= 1 and c["vx neighbors_learned"] >= 1
    assert c["vx drop/bad_checksum"] == 0 and c["vx drop/unknown_vtep"] == 0
    assert c["vx drop/bad_vxlan"] == 0 and c["vx drop/unknown_vni"] == 0
    inner = check_vxlan(pkts, {"192.168.78.1", "192.168.78.2"}, {"192.168.78.1"})
    for a, b in ((h1, h2), (h2, h1)):
        req, rep = pings_between(inner, a, b)
        assert req >= 5 and rep >= 4, (a.name, req, rep)
    linux = [p for p in pkts if p[IP].src == "192.168.78.2"]
    ours = [p for p in pkts if p[IP].src == "192.168.78.1"]
    assert len(linux) >= 9 and len(ours) >= 9
