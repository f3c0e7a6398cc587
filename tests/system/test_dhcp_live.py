"""The dhcp device serving real DHCP clients (busybox udhcpc, ISC dhclient).

Hosts are network namespaces without addresses whose veths are attached to a
``switch``; the switch's last port is linked to the dhcp server's port. The appliance
runs as its own ``dva run`` process with ``--state-dir`` in the test's temporary
directory. Each client runs a small script of ours (``udhcpc -s``, ``dhclient -sf``)
that configures ``eth0`` with ``ip`` and writes what it was told (address, mask,
router, DNS, domain, server) to a file; the tests read that file and the host's own
view (``ip addr``, ``ip route``). Every namespace, link and process is removed
afterwards, also when a test fails.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dva.tools.demo import stop_appliance
from dva.tools.lab import Host, Lab, leftovers
from dva.worker.persist import decode

pytestmark = pytest.mark.system

why = Lab.check_environment()
if why:
    pytest.skip(f"system tests {why}", allow_module_level=True)
missing = [c for c in ("busybox", "dhclient") if shutil.which(c) is None]
if missing:
    pytest.skip(f"the DHCP system tests need {' and '.join(missing)} (packages busybox, "
                f"isc-dhcp-client)", allow_module_level=True)

READY_TIMEOUT = 300  # the first run after a source change compiles every kernel
POOL = "{{start: {start}, end: {end}, router: 10.55.0.1, dns: [10.55.0.53, 10.55.0.54], " \
       "domain: {domain}, lease: 600}}"
APPLIANCE = """\
appliance: net
tenant: {tenant}
devices:
  lan:
    type: switch
    ports: [{ports}, srv]
  dhcp:
    type: dhcp
    ports: {{lan: {{ip: 10.55.0.2/24}}}}
    pool: {pool}
links:
  - [lan.srv, dhcp.lan]
attach:
{attach}
"""

# One script for both clients: udhcpc passes the event as $1 and options as $ip,
# $subnet, ...; dhclient passes $reason and $new_*.
CLIENT_SCRIPT = r"""#!/bin/sh
OUT=@OUT@
event="${reason:-$1}"
if [ -n "$reason" ]; then
  ip="$new_ip_address"; subnet="$new_subnet_mask"; router="$new_routers"
  dns="$new_domain_name_servers"; domain="$new_domain_name"
  serverid="$new_dhcp_server_identifier"; lease="$new_dhcp_lease_time"
fi
echo "$event" >> "$OUT.events"
# A release is unicast to the server and may wait in the kernel for ARP; removing the
# last address at once purges that queue, and the release never leaves. Give it time.
settle() { ip -4 addr show dev "$interface" | grep -q inet && sleep 0.5; }
case "$event" in
  deconfig|PREINIT) ip link set "$interface" up; settle; ip -4 addr flush dev "$interface" ;;
  bound|renew|BOUND|RENEW|REBIND|REBOOT)
    ip -4 addr flush dev "$interface"
    ip addr add "$ip/$subnet" dev "$interface"
    [ -n "$router" ] && ip route replace default via "${router%% *}" dev "$interface"
    { for s in $dns; do echo "nameserver $s"; done; [ -n "$domain" ] && echo "search $domain"; } \
      > "$OUT.resolv"
    printf 'event=%s\nip=%s\nsubnet=%s\nrouter=%s\ndns=%s\ndomain=%s\nserverid=%s\nlease=%s\n' \
      "$event" "$ip" "$subnet" "$router" "$dns" "$domain" "$serverid" "$lease" > "$OUT.tmp"
    mv "$OUT.tmp" "$OUT" ;;
  EXPIRE|FAIL|RELEASE|STOP|nak|leasefail) settle; ip -4 addr flush dev "$interface" ;;
esac
exit 0
"""
DHCLIENT_CONF = "timeout 20;\nretry 5;\nreboot 5;\nrequest subnet-mask, broadcast-address, routers, " \
                "domain-name, domain-name-servers;\n"


class Appliance:
    """A ``dva run --state-dir`` process."""

    def __init__(self, path: Path, state_dir: Path) -> None:
        ready = path.with_suffix(".ready")
        ready.unlink(missing_ok=True)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "dva.cli", "run", str(path), "--json", "--ready-file",
             str(ready), "--state-dir", str(state_dir)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + READY_TIMEOUT
        while not ready.exists():
            if self.proc.poll() is not None:
                raise RuntimeError(f"the appliance did not start: {self.proc.stderr.read()}")
            if time.monotonic() > deadline:
                self.proc.kill()
                self.proc.wait()
                raise RuntimeError("the appliance did not get ready")
            time.sleep(0.1)
        self.result: tuple[int, dict[str, int], str] | None = None

    def stop(self) -> tuple[int, dict[str, int], str]:
        if self.result is None:
            self.result = stop_appliance(self.proc)
        return self.result


class Client:
    """A DHCP client host: its script, lease and output files."""

    def __init__(self, lab: Lab, host: Host, work: Path) -> None:
        self.lab, self.h = lab, host
        self.out = work / f"{host.name}.out"
        self.script = work / f"{host.name}.sh"
        self.script.write_text(CLIENT_SCRIPT.replace("@OUT@", str(self.out)))
        self.script.chmod(0o755)
        self.conf = work / f"{host.name}.conf"
        self.conf.write_text(DHCLIENT_CONF)
        self.leases = work / f"{host.name}.leases"
        self.pidfile = work / f"{host.name}.pid"
        self.dhclient: subprocess.Popen | None = None
        self.udhcpc_proc: subprocess.Popen | None = None

    def told(self) -> dict[str, str]:
        if not self.out.exists():
            return {}
        return dict(line.split("=", 1) for line in self.out.read_text().splitlines())

    def events(self) -> list[str]:
        p = Path(f"{self.out}.events")
        return p.read_text().split() if p.exists() else []

    def udhcpc(self, *extra: str, tries: int = 4) -> subprocess.CompletedProcess:
        """``busybox udhcpc`` in the foreground until it has a lease (exit 0) or gave up."""
        self.out.unlink(missing_ok=True)
        return self.lab.exec(self.h, ["busybox", "udhcpc", "-i", "eth0", "-s",
                                      str(self.script), "-f", "-q", "-n", "-t", str(tries),
                                      "-T", "1", "-A", "1", *extra], check=False, timeout=60)

    def _wait_out(self, proc: subprocess.Popen, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not self.out.exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                if proc.poll() is None:
                    os.killpg(proc.pid, 9)
                proc.wait(10)
                raise AssertionError(f"{what} on {self.h.name} got no lease: "
                                     f"{proc.stderr.read().decode()[-2000:]}")
            time.sleep(0.2)

    def udhcpc_start(self, timeout: float = 30) -> dict[str, str]:
        """``busybox udhcpc`` kept running (renewing) until :meth:`udhcpc_release`."""
        self.out.unlink(missing_ok=True)
        self.udhcpc_proc = self.lab.popen(self.h, [
            "busybox", "udhcpc", "-i", "eth0", "-s", str(self.script), "-f", "-t", "5",
            "-T", "1"])
        self._wait_out(self.udhcpc_proc, timeout, "udhcpc")
        return self.told()

    def udhcpc_release(self) -> None:
        """SIGUSR2: udhcpc releases its lease (and deconfigures eth0), then stop it."""
        p = self.udhcpc_proc
        n = len(self.events())
        p.send_signal(signal.SIGUSR2)
        deadline = time.monotonic() + 10
        while "deconfig" not in self.events()[n:] and time.monotonic() < deadline:
            time.sleep(0.1)
        p.terminate()
        p.wait(10)
        self.udhcpc_proc = None

    def dhclient_start(self, timeout: float = 40) -> dict[str, str]:
        """``dhclient -d`` (kept running, as a lab process); returns what it was told."""
        self.out.unlink(missing_ok=True)
        self.dhclient = self.lab.popen(self.h, [
            "dhclient", "-d", "-v", "-cf", str(self.conf), "-sf", str(self.script),
            "-lf", str(self.leases), "-pf", str(self.pidfile), "eth0"])
        self._wait_out(self.dhclient, timeout, "dhclient")
        return self.told()

    def dhclient_kill(self) -> str:
        """Stop dhclient without a release (as a crash or power loss would)."""
        p = self.dhclient
        if p is None:
            return ""
        if p.poll() is None:
            os.killpg(p.pid, 9)
        p.wait(10)
        self.dhclient = None
        return p.stderr.read().decode()

    def dhclient_release(self) -> subprocess.CompletedProcess:
        """``dhclient -r``: stops the running dhclient and sends a DHCPRELEASE."""
        r = self.lab.exec(self.h, ["dhclient", "-r", "-v", "-cf", str(self.conf), "-sf",
                                   str(self.script), "-lf", str(self.leases), "-pf",
                                   str(self.pidfile), "eth0"], check=False, timeout=60)
        if self.dhclient is not None:
            self.dhclient.wait(10)
            self.dhclient = None
        return r

    def view(self) -> tuple[str, str]:
        """The host's own address (with prefix) on eth0 and its default gateway."""
        a = self.lab.exec(self.h, ["ip", "-4", "-o", "addr", "show", "dev", "eth0"]).stdout
        r = self.lab.exec(self.h, ["ip", "-4", "route", "show", "default"]).stdout
        addr = re.search(r"inet (\S+)", a)
        gw = re.search(r"default via (\S+)", r)
        return (addr.group(1) if addr else "", gw.group(1) if gw else "")


@pytest.fixture
def lab():
    with Lab() as lab:
        yield lab
    assert leftovers(lab.prefix) == []


def _appliance(work: Path, lab: Lab, hosts: list[Host], *, tenant: str = "t1",
               start: str = "10.55.0.100", end: str = "10.55.0.120",
               domain: str = "t1.example") -> Path:
    text = APPLIANCE.format(
        tenant=tenant, ports=", ".join(h.name for h in hosts),
        pool=POOL.format(start=start, end=end, domain=domain),
        attach="\n".join(f"  lan.{h.name}: {{af_packet: {h.outside}}}" for h in hosts))
    path = work / f"{tenant}.yaml"
    path.write_text(text)
    return path


def _check_lease(c: Client, *, domain: str = "t1.example", pool: range = range(100, 121),
                 view: bool = True) -> str:
    """What the client was told and what the host shows agree with the appliance file."""
    t = c.told()
    ip = t["ip"]
    assert ip.startswith("10.55.0.") and int(ip.split(".")[3]) in pool, t
    assert (t["subnet"], t["router"], t["dns"], t["domain"], t["serverid"]) == \
        ("255.255.255.0", "10.55.0.1", "10.55.0.53 10.55.0.54", domain, "10.55.0.2"), t
    if view:
        assert c.view() == (f"{ip}/24", "10.55.0.1")
    resolv = Path(f"{c.out}.resolv").read_text()
    assert resolv == f"nameserver 10.55.0.53\nnameserver 10.55.0.54\nsearch {domain}\n"
    return ip


def test_udhcpc_and_dhclient_get_leases_through_a_switch(lab, tmp_path):
    h1, h2 = lab.host("u1", None), lab.host("d2", None)
    app = Appliance(_appliance(tmp_path, lab, [h1, h2]), tmp_path / "state")
    try:
        u, d = Client(lab, h1, tmp_path), Client(lab, h2, tmp_path)
        r = u.udhcpc()
        assert r.returncode == 0, r.stderr
        assert u.told()["event"] == "bound"
        ip1 = _check_lease(u)
        d.dhclient_start()
        assert d.told()["event"] == "BOUND"
        ip2 = _check_lease(d)
        assert ip1 != ip2
        # the addresses work: the hosts reach each other through the switch
        ping = lab.exec(h2, ["ping", "-c", "2", "-W", "2", ip1], check=False)
        assert ping.returncode == 0, ping.stdout
        r = d.dhclient_release()
        assert "DHCPRELEASE of " + ip2 in r.stderr
        assert d.view()[0] == ""
        time.sleep(0.5)
    finally:
        rc, counters, err = app.stop()
    assert rc == 0, err
    assert counters["dhcp offers"] >= 2 and counters["dhcp leases_bound"] == 2, counters
    assert counters["dhcp leases_released"] == 1
    assert counters["dhcp drop/malformed"] == 0 and counters["dhcp drop/bad_option"] == 0


def test_a_release_frees_the_address_for_another_client(lab, tmp_path):
    h1, h2 = lab.host("d1", None), lab.host("u2", None)
    app = Appliance(_appliance(tmp_path, lab, [h1, h2], end="10.55.0.100"),
                    tmp_path / "state")
    try:
        d, u = Client(lab, h1, tmp_path), Client(lab, h2, tmp_path)
        d.dhclient_start()
        assert _check_lease(d, pool=range(100, 101)) == "10.55.0.100"
        r = u.udhcpc(tries=2)
        assert r.returncode != 0 and u.told() == {}  # the only address is taken
        d.dhclient_release()
        u.udhcpc_start()
        assert _check_lease(u, pool=range(100, 101)) == "10.55.0.100"
        u.udhcpc_release()
        assert u.events()[-2:] == ["bound", "deconfig"] and u.view() == ("", "")
        d.dhclient_start()  # and back, after udhcpc released it
        assert _check_lease(d, pool=range(100, 101)) == "10.55.0.100"
        d.dhclient_kill()
    finally:
        rc, counters, err = app.stop()
    assert rc == 0, err
    assert counters["dhcp drop/pool_exhausted"] >= 1, counters
    assert counters["dhcp leases_released"] == 2 and counters["dhcp leases_bound"] == 3


def test_two_tenants_with_the_same_pool_each_get_their_own_leases(lab, tmp_path):
    """Two appliances (tenants t1 and t2) with the same one-address pool, as two
    ``dva run`` processes: each client gets that address from its own tenant's server,
    and each tenant keeps its own state file."""
    h1, h2 = lab.host("a1", None), lab.host("b1", None)
    state = tmp_path / "state"
    w1, w2 = tmp_path / "t1", tmp_path / "t2"
    w1.mkdir()
    w2.mkdir()
    apps = [Appliance(_appliance(w1, lab, [h1], tenant="t1", end="10.55.0.100",
                                 domain="t1.example"), state)]
    try:
        apps.append(Appliance(_appliance(w2, lab, [h2], tenant="t2", end="10.55.0.100",
                                         domain="t2.example"), state))
        u, d = Client(lab, h1, w1), Client(lab, h2, w2)
        assert u.udhcpc().returncode == 0
        d.dhclient_start()
        assert _check_lease(u, domain="t1.example", pool=range(100, 101)) == "10.55.0.100"
        assert _check_lease(d, domain="t2.example", pool=range(100, 101)) == "10.55.0.100"
        d.dhclient_kill()
    finally:
        results = [a.stop() for a in apps]
    for rc, counters, err in results:
        assert rc == 0, err
        assert counters["dhcp leases_bound"] == 1 and counters["dhcp drop/pool_exhausted"] == 0
    for tenant in ("t1", "t2"):
        f = state / tenant / "net" / "dhcp.state"
        assert decode(f.read_bytes()).header["device"] == "dhcp"


def test_leases_survive_an_appliance_restart(lab, tmp_path):
    h1, h2 = lab.host("d1", None), lab.host("u2", None)
    path = _appliance(tmp_path, lab, [h1, h2], end="10.55.0.100")
    state = tmp_path / "state"
    app = Appliance(path, state)
    d, u = Client(lab, h1, tmp_path), Client(lab, h2, tmp_path)
    try:
        d.dhclient_start()
        assert _check_lease(d, pool=range(100, 101)) == "10.55.0.100"
        d.dhclient_kill()  # the client keeps its lease file, and its address
    finally:
        rc, first, err = app.stop()
    assert rc == 0, err
    f = state / "t1" / "net" / "dhcp.state"
    assert f.exists() and decode(f.read_bytes()).header["type"] == "dhcp"
    app = Appliance(path, state)
    try:
        # the restarted server still knows the lease: a new client gets nothing ...
        r = u.udhcpc(tries=2)
        assert r.returncode != 0 and u.told() == {}
        # ... and the client, restarting in INIT-REBOOT, is acknowledged its address
        d.dhclient_start()
        assert d.told()["event"] == "REBOOT"
        assert _check_lease(d, pool=range(100, 101)) == "10.55.0.100"
        log = d.dhclient_kill()
        assert "DHCPREQUEST for 10.55.0.100" in log and "DHCPDISCOVER" not in log
    finally:
        rc, counters, err = app.stop()
    assert rc == 0, err
    assert "state of dhcp loaded from" in err and "leases 1" in err
    assert counters["dhcp offers"] == 0 and counters["dhcp leases_renewed"] == 1, counters
    assert counters["dhcp drop/pool_exhausted"] >= 1
    assert counters["dhcp drop/unknown_client"] == 0
    assert decode(f.read_bytes()).header["wall"] == pytest.approx(time.time(), abs=60)
