"""A lab of Linux hosts in network namespaces, wired to the root namespace by veths.

Used by ``dva demo`` and the system tests: each :meth:`Lab.host` is a namespace
with one interface ``eth0`` (an address, a default route) whose veth peer stays in
the root namespace, up and without an address, for an appliance to attach to. A host
made with ``ip=None`` has ``eth0`` up without an address (a DHCP client configures it).

Names are unique per lab (prefix from the process id and a random suffix) so runs
cannot collide, and :meth:`Lab.close` (also on exceptions, via ``with``) stops every
process the lab started and deletes every namespace and link it made.

Offloads are switched off on every veth: a software data plane sees each frame as
it is on the wire (no partial checksums, no 64 KB segments).
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass, field


class LabError(RuntimeError):
    pass


def run(cmd: list[str], check: bool = True, **kw) -> subprocess.CompletedProcess:
    p = subprocess.run(cmd, capture_output=True, text=True, **kw)
    if check and p.returncode != 0:
        raise LabError(f"{' '.join(cmd)}: {p.stderr.strip() or p.stdout.strip()}")
    return p


@dataclass
class Host:
    name: str
    ns: str
    ip: str | None  # with prefix length, e.g. 10.0.0.11/24; None: no address
    outside: str  # the veth end in the root namespace
    mac: str = ""

    @property
    def addr(self) -> str:
        return self.ip.split("/")[0] if self.ip else ""


@dataclass
class Lab:
    prefix: str = field(default_factory=lambda: f"dva{os.getpid() % 10000}{secrets.token_hex(2)}")
    hosts: dict[str, Host] = field(default_factory=dict)
    procs: list[subprocess.Popen] = field(default_factory=list)
    links: list[str] = field(default_factory=list)

    def __enter__(self) -> Lab:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @staticmethod
    def check_environment() -> str | None:
        """Why a lab cannot be built here, or None."""
        if os.geteuid() != 0:
            return "needs root (network namespaces)"
        if shutil.which("ip") is None:
            return "needs iproute2 (the ip command)"
        return None

    def host(self, name: str, ip: str | None, gateway: str | None = None) -> Host:
        ns = f"{self.prefix}-{name}"
        outside = f"{self.prefix[:9]}{len(self.hosts)}{name[:3]}"[:15]
        run(["ip", "netns", "add", ns])
        h = Host(name, ns, ip, outside)
        self.hosts[name] = h
        run(["ip", "link", "add", outside, "type", "veth", "peer", "name", "eth0",
             "netns", ns])
        self.links.append(outside)
        for args in (["ip", "link", "set", "lo", "up"],
                     ["ip", "addr", "add", ip, "dev", "eth0"] if ip else None,
                     ["ip", "link", "set", "eth0", "up"]):
            if args:
                self.exec(h, args)
        if gateway:
            self.exec(h, ["ip", "route", "add", "default", "via", gateway])
        # Quiet, wire-exact hosts: no IPv6 chatter, no offloads.
        self.exec(h, ["sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1"], check=False)
        run(["sysctl", "-qw", f"net.ipv6.conf.{outside}.disable_ipv6=1"], check=False)
        for dev, where in (("eth0", h), (outside, None)):
            cmd = ["ethtool", "-K", dev, "tx", "off", "rx", "off", "tso", "off", "gso", "off",
                   "gro", "off"]
            if shutil.which("ethtool"):
                (self.exec(h, cmd, check=False) if where else run(cmd, check=False))
        run(["ip", "link", "set", outside, "up"])
        h.mac = self.exec(h, ["cat", "/sys/class/net/eth0/address"]).stdout.strip()
        return h

    def exec(self, h: Host, cmd: list[str], check: bool = True, timeout: float = 60,
             **kw) -> subprocess.CompletedProcess:
        return run(["ip", "netns", "exec", h.ns, *cmd], check=check, timeout=timeout, **kw)

    def popen(self, h: Host, cmd: list[str], **kw) -> subprocess.Popen:
        p = subprocess.Popen(["ip", "netns", "exec", h.ns, *cmd], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, start_new_session=True, **kw)
        self.procs.append(p)
        return p

    def http_server(self, h: Host, port: int, directory: str) -> subprocess.Popen:
        p = self.popen(h, ["python3", "-m", "http.server", str(port), "--bind", h.addr,
                           "--directory", directory])
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            r = self.exec(h, ["python3", "-c", f"import socket; socket.create_connection(('{h.addr}', {port}), 1)"], check=False)
            if r.returncode == 0:
                return p
            time.sleep(0.1)
        raise LabError(f"HTTP server on {h.name} did not start")

    def close(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                try:
                    os.killpg(p.pid, signal.SIGTERM)
                    p.wait(5)
                except (ProcessLookupError, subprocess.TimeoutExpired):
                    try:
                        os.killpg(p.pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
        self.procs.clear()
        for link in self.links:
            run(["ip", "link", "del", link], check=False)
        self.links.clear()
        for h in self.hosts.values():
            run(["ip", "netns", "del", h.ns], check=False)
        self.hosts.clear()


def leftovers(prefix: str) -> list[str]:
    """Namespaces and links whose names start with ``prefix`` (for tests)."""
    ns = run(["ip", "netns", "list"], check=False).stdout.split()
    links = run(["ip", "-o", "link"], check=False).stdout
    return [n for n in ns if n.startswith(prefix)] + \
        [ln.split(":")[1].strip().split("@")[0] for ln in links.splitlines()
         if ln.split(":")[1].strip().startswith(prefix[:9])]
