"""The firewall between real Linux hosts, and reloading it while connections run.

Two hosts in one subnet, "inside" (10.77.0.1) and "outside" (10.77.0.2), each a
network namespace whose veth's root-namespace end is attached to a firewall port
(a bump in the wire: ARP passes, frames are not rewritten). The appliance runs as its
own process (``dva run``); the hosts use real tools and sockets (curl, ping, a Python
echo server and client, iperf3). Every namespace, link and process is removed
afterwards, also when a test fails.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest

from dva.tools.demo import start_appliance
from dva.tools.lab import Host, Lab, leftovers

pytestmark = pytest.mark.system

why = Lab.check_environment()
if why:
    pytest.skip(f"system tests {why}", allow_module_level=True)

APPLIANCE = """\
appliance: edge
tenant: lab
devices:
  fw:
    type: firewall
    ports: [inside, outside]
    default: deny
    rules: {rules}
attach:
  fw.inside: {{af_packet: {inside}}}
  fw.outside: {{af_packet: {outside}}}
"""
ALLOW_INSIDE = "[{action: allow, from: inside}]"

ECHO_SERVER = r"""
import socket, sys, threading
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], int(sys.argv[2])))
s.listen(16)
print("listening", flush=True)
def serve(c):
    with c:
        while True:
            d = c.recv(65536)
            if not d:
                return
            c.sendall(d)
while True:
    c, _ = s.accept()
    threading.Thread(target=serve, args=(c,), daemon=True).start()
"""

# One line every 0.2 s, each read back from the echo server; "ok N" per round trip,
# "error: ..." and exit 1 at the first problem (5 s without the echo included).
ECHO_CLIENT = r"""
import socket, sys, time
try:
    c = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5)
    i = 0
    while True:
        msg = f"line {i}\n".encode()
        c.sendall(msg)
        got = b""
        while not got.endswith(b"\n"):
            d = c.recv(4096)
            if not d:
                raise RuntimeError("closed by the server")
            got += d
        if got != msg:
            raise RuntimeError(f"sent {msg!r}, got back {got!r}")
        print(f"ok {i}", flush=True)
        i += 1
        time.sleep(0.2)
except Exception as e:
    print(f"error: {type(e).__name__}: {e}", flush=True)
    sys.exit(1)
"""

CONNECT = r"""
import socket, sys, time
t = time.monotonic()
try:
    socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=float(sys.argv[3])).close()
    r = "connected"
except Exception as e:
    r = type(e).__name__
print(r, f"{time.monotonic() - t:.3f}")
"""


class Appliance:
    """A ``dva run`` process; its stderr is read line by line as it comes (reload
    messages), its stdout (the final counters, JSON) when it ends."""

    def __init__(self, path: Path, workdir: Path, extra: tuple = ()) -> None:
        self.path = path
        self.proc, _ = start_appliance(path, workdir, extra)
        self.lines: list[str] = []
        self.stdout: list[str] = []
        self._cv = threading.Condition()
        self._threads = [threading.Thread(target=self._read_err, daemon=True),
                         threading.Thread(target=self._read_out, daemon=True)]
        for t in self._threads:
            t.start()
        self.result: tuple[int, dict[str, int], str] | None = None

    def _read_err(self) -> None:
        for line in self.proc.stderr:
            with self._cv:
                self.lines.append(line.rstrip("\n"))
                self._cv.notify_all()

    def _read_out(self) -> None:
        self.stdout.append(self.proc.stdout.read())

    def wait_line(self, pattern: str, after: int = 0, timeout: float = 60) -> int:
        """Index of the first stderr line from ``after`` on that matches ``pattern``."""
        rx = re.compile(pattern)
        end = time.monotonic() + timeout
        with self._cv:
            while True:
                for i in range(after, len(self.lines)):
                    if rx.search(self.lines[i]):
                        return i
                left = end - time.monotonic()
                if left <= 0 or self.proc.poll() is not None:
                    raise AssertionError(f"no line like {pattern!r}; stderr so far:\n"
                                         + "\n".join(self.lines))
                self._cv.wait(min(left, 0.1))

    def reload(self, text: str | None = None) -> int:
        """Rewrite the file (if ``text``) and send SIGHUP; returns the line count
        before, for :meth:`wait_line`."""
        n = len(self.lines)
        if text is not None:
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text(text)
            tmp.replace(self.path)  # the process never reads a half-written file
        self.proc.send_signal(signal.SIGHUP)
        return n

    def stop(self) -> tuple[int, dict[str, int], str]:
        if self.result is not None:
            return self.result
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        for t in self._threads:
            t.join(10)
        out = "".join(self.stdout)
        try:
            counters = json.loads(out) if out.strip() else {}
        except json.JSONDecodeError:
            counters = {}
        self.result = (self.proc.returncode, counters, "\n".join(self.lines))
        return self.result


class Net:
    """The lab: inside and outside hosts, the appliance file, the running appliance."""

    def __init__(self, lab: Lab, workdir: Path) -> None:
        self.lab = lab
        self.workdir = workdir
        self.inside = lab.host("inside", "10.77.0.1/24")
        self.outside = lab.host("outside", "10.77.0.2/24")
        self.file = workdir / "edge.yaml"
        self.app: Appliance | None = None

    def text(self, rules: str) -> str:
        return APPLIANCE.format(rules=rules, inside=self.inside.outside,
                                outside=self.outside.outside)

    def start(self, rules: str) -> Appliance:
        self.file.write_text(self.text(rules))
        self.app = Appliance(self.file, self.workdir)
        return self.app

    def stop(self) -> tuple[int, dict[str, int], str]:
        code, counters, err = self.app.stop()
        assert code == 0, err
        return code, counters, err

    def connect(self, frm: Host, to: Host, port: int, timeout: float = 2.0
                ) -> tuple[str, float]:
        """A TCP connect from ``frm`` to ``to``: (outcome, seconds it took)."""
        p = self.lab.exec(frm, ["python3", "-c", CONNECT, to.addr, str(port), str(timeout)])
        what, secs = p.stdout.split()
        return what, float(secs)

    def server(self, h: Host, port: int) -> subprocess.Popen:
        p = self.lab.popen(h, ["python3", "-c", ECHO_SERVER, h.addr, str(port)], text=True)
        assert p.stdout.readline().strip() == "listening", p.stderr.read()
        return p

    def ping(self, frm: Host, to: Host, count: int = 3) -> subprocess.CompletedProcess:
        return self.lab.exec(frm, ["ping", "-c", str(count), "-i", "0.2", "-W", "1",
                                   to.addr], check=False)


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


def test_inside_may_connect_out_but_outside_may_not_connect_in(net):
    inside, outside = net.inside, net.outside
    www = net.workdir / "www"
    www.mkdir()
    (www / "index.html").write_text("hello from outside\n")
    net.lab.http_server(outside, 8080, str(www))
    net.lab.http_server(inside, 8080, str(www))
    net.start(ALLOW_INSIDE)
    p = net.lab.exec(inside, ["curl", "-sS", "--max-time", "10",
                              f"http://{outside.addr}:8080/index.html"], check=False)
    assert p.returncode == 0 and p.stdout == "hello from outside\n", p.stderr
    t0 = time.monotonic()
    p = net.lab.exec(outside, ["curl", "-sS", "--connect-timeout", "2",
                               f"http://{inside.addr}:8080/index.html"], check=False)
    assert p.returncode == 28, (p.returncode, p.stderr)  # timed out: the SYN was dropped
    assert time.monotonic() - t0 >= 1.9
    assert net.connect(outside, inside, 8080, 1.0)[0] == "TimeoutError"
    p = net.ping(inside, outside)
    assert " 0% packet loss" in p.stdout, p.stdout
    p = net.ping(outside, inside)
    assert p.returncode == 1 and "100% packet loss" in p.stdout, p.stdout
    _, c, _ = net.stop()
    assert c["fw drop/denied"] >= 2 + 3  # SYNs (retransmitted too), echo requests
    assert c["fw rule1_hits"] >= 2  # the curl and the ping from inside
    # everything the hosts sent reached the firewall; what it passed reached the hosts
    assert c["port fw.inside rx"] == c["fw.inside rx"]
    assert c["fw.outside tx"] == c["port fw.outside tx"]


def test_a_download_from_outside_passes_without_invalid_drops(net):
    """Data from the answering side (a download) beyond the first 63 bytes in flight."""
    www = net.workdir / "www"
    www.mkdir()
    (www / "big").write_bytes(bytes(1 << 20))
    net.lab.http_server(net.outside, 8080, str(www))
    net.start(ALLOW_INSIDE)
    p = net.lab.exec(net.inside, ["curl", "-sS", "-o", "/dev/null", "-w", "%{size_download}",
                                  "--max-time", "10", f"http://{net.outside.addr}:8080/big"],
                     check=False)
    _, c, _ = net.stop()
    assert p.returncode == 0 and p.stdout == str(1 << 20), (p.stdout, p.stderr)
    assert c["fw drop/invalid"] == 0


def test_a_reject_rule_refuses_at_once(net):
    inside, outside = net.inside, net.outside
    net.start("[{action: allow, from: inside}, "
              "{action: reject, from: outside, proto: tcp, dport: 9}]")
    t0 = time.monotonic()
    p = net.lab.exec(outside, ["curl", "-sS", "--connect-timeout", "5",
                               f"http://{inside.addr}:9/"], check=False)
    took = time.monotonic() - t0
    # 7: could not connect (refused); a dropped SYN would end in 28 (timed out)
    assert p.returncode == 7, (p.returncode, p.stderr)
    assert took < 1.0
    what, secs = net.connect(outside, inside, 9, 3.0)
    assert what == "ConnectionRefusedError" and secs < 0.5
    # another port: no rule, default deny: dropped, so the connect times out
    assert net.connect(outside, inside, 10, 1.0)[0] == "TimeoutError"
    _, c, _ = net.stop()
    assert c["fw drop/rejected"] == 2 and c["fw rst_sent"] == 2
    assert c["fw rule2_hits"] == 2
    assert c["fw drop/denied"] >= 1


def test_open_connections_survive_a_reload_and_an_invalid_file_is_refused(net):
    inside, outside = net.inside, net.outside
    net.server(outside, 7000)
    app = net.start(ALLOW_INSIDE)
    client = net.lab.popen(inside, ["python3", "-c", ECHO_CLIENT, outside.addr, "7000"],
                           text=True)
    rounds: list[tuple[float, str]] = []

    def read():
        for line in client.stdout:
            rounds.append((time.monotonic(), line.strip()))

    reader = threading.Thread(target=read, daemon=True)
    reader.start()

    def oks_since(t: float) -> int:
        return sum(1 for when, s in rounds if when >= t and s.startswith("ok"))

    def errors() -> list[str]:
        return [s for _, s in rounds if not s.startswith("ok")]

    deadline = time.monotonic() + 10
    while oks_since(0) < 3 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert oks_since(0) >= 3, rounds

    # rules that no longer allow inside: the open connection goes on, new ones fail
    n = app.reload(net.text("[]"))
    i = app.wait_line(r"^reloaded .*edge\.yaml: generation 2\b", n)
    assert "state kept: fw" in app.lines[i]
    t = time.monotonic()
    time.sleep(2.5)
    assert oks_since(t) >= 8 and errors() == [], rounds[-5:]
    assert net.connect(inside, outside, 7000, 1.5)[0] == "TimeoutError"
    assert client.poll() is None and errors() == []

    # an invalid file: refused, one line per problem; generation 2 keeps running
    n = app.reload(net.text("[{action: maybe, from: inside}]"))
    i = app.wait_line(r"^reload of .*edge\.yaml rejected: invalid appliance \(1 problem\); "
                      r"generation 2 keeps running$", n)
    app.wait_line(r"^  .*edge\.yaml:8: devices\.fw\.rules\[0\]\.action: ", i + 1, timeout=5)
    # other attachments: refused too
    other = net.text("[]").replace(outside.outside, "lo")
    n = app.reload(other)
    i = app.wait_line(r"rejected: attachments cannot change", n)
    app.wait_line(r"^  attachment fw\.outside: \{af_packet: lo\} is new$", i + 1, timeout=5)
    t = time.monotonic()
    time.sleep(2.0)
    assert oks_since(t) >= 6 and errors() == [], rounds[-5:]
    assert net.connect(inside, outside, 7000, 1.0)[0] == "TimeoutError"

    os.killpg(client.pid, signal.SIGTERM)
    client.wait(5)
    reader.join(5)
    assert errors() == []
    _, c, err = net.stop()
    assert c["config generation"] == 2 and c["config reloads_rejected"] == 2
    assert c["fw drop/denied"] >= 2  # the SYNs of the refused connects
    assert c["fw drop/invalid"] == 0, err
    assert c["fw flows_created"] >= 1


def test_iperf3_through_the_firewall(net):
    if shutil.which("iperf3") is None:
        pytest.skip("iperf3 is not installed (apt-get install iperf3)")
    inside, outside = net.inside, net.outside
    net.lab.popen(outside, ["iperf3", "-s", "-B", outside.addr, "-p", "5201"])
    end = time.monotonic() + 10
    while "5201" not in net.lab.exec(outside, ["ss", "-ltnH"]).stdout:
        assert time.monotonic() < end, "iperf3 -s did not start"
        time.sleep(0.1)
    net.start(ALLOW_INSIDE)
    p = net.lab.exec(inside, ["iperf3", "-c", outside.addr, "-p", "5201", "-t", "3", "-J"],
                     check=False, timeout=60)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr
    res = json.loads(p.stdout)
    received = res["end"]["sum_received"]
    assert received["bytes"] > 0 and received["bits_per_second"] > 0, received
    _, c, _ = net.stop()
    print(f"iperf3 through the firewall: {received['bits_per_second'] / 1e6:.0f} Mbit/s, "
          f"{res['end']['sum_sent'].get('retransmits', 0)} retransmits; "
          f"fw drop/invalid {c['fw drop/invalid']}")
    assert c["fw flows_created"] == 2  # iperf3's control and data connections
    assert c["fw.inside rx"] > 1000
