"""Tests for the ``dva`` command line, run as a real subprocess.

Covers ``dva validate`` (ok lines, warnings, file:line: path: message errors),
``dva run`` over pcap attachments (output pcaps and counters, as a table and JSON) and
``dva trace`` (device steps, verdicts, drop reasons, argument errors).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from scapy.layers.inet import IP, UDP
from scapy.layers.l2 import Ether
from scapy.utils import wrpcap

from dva.packet.spec import SpecError, describe, parse_spec
from dva.ports.pcapfile import read_frames, write_frames

MAC1, MAC2, MAC3 = "02:00:00:00:00:01", "02:00:00:00:00:02", "02:00:00:00:00:03"
BCAST = "ff:ff:ff:ff:ff:ff"


# UTF-8 output (rich draws tables with box characters) and a wide console, so that
# nothing depends on the locale or terminal of the machine running the tests.
ENV = {**os.environ, "PYTHONIOENCODING": "utf-8", "COLUMNS": "200", "NO_COLOR": "1"}


def dva(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    p = subprocess.run([sys.executable, "-m", "dva.cli", *map(str, args)], cwd=cwd,
                       capture_output=True, text=True, encoding="utf-8", env=ENV,
                       timeout=180)
    both = p.stdout + p.stderr
    assert "Traceback" not in both, both
    return p


def write(path: Path, text: str) -> Path:
    path.write_text(textwrap.dedent(text))
    return path


def nonempty_lines(s: str) -> list[str]:
    return [ln for ln in s.splitlines() if ln.strip()]


def frames_of(path: Path) -> list[tuple[float, bytes]]:
    return list(read_frames(path))


PCAP_APP = """\
    appliance: edge
    devices:
      lan:
        type: switch
        ports: [h1, h2, h3, spare]
    attach:
      lan.h1: {pcap: {read: in/h1.pcap, write: out/h1.pcap}}
      lan.h2: {pcap: {read: in/h2.pcap, write: out/h2.pcap}}
      lan.h3: {pcap: {write: out/h3.pcap}}
    """

MEMORY_APP = """\
    appliance: edge
    tenant: acme
    devices:
      lan:
        type: switch
        ports: [h1, h2, h3]
    attach:
      lan.h1: {memory: m1}
      lan.h2: {memory: m2}
      lan.h3: {af_packet: veth-h3}
    """


@pytest.fixture
def pcap_setup(tmp_path: Path):
    """An appliance with pcap attachments and two inputs.

    t=1.0: h1 broadcasts (scapy frame, written with scapy's wrpcap);
    t=2.0: h2 sends unicast to h1's MAC, learned by then (dva spec frame).
    """
    (tmp_path / "in").mkdir()
    (tmp_path / "out").mkdir()
    app = write(tmp_path / "edge.yaml", PCAP_APP)
    bcast = Ether(src=MAC1, dst=BCAST) / IP(src="10.0.0.1", dst="10.0.0.255") / \
        UDP(sport=68, dport=67)
    bcast.time = 1.0
    wrpcap(str(tmp_path / "in" / "h1.pcap"), [bcast])
    ucast = parse_spec(f"eth(dst={MAC1},src={MAC2})/ipv4(src=10.0.0.2,dst=10.0.0.1)"
                       f"/udp(sport=1000,dport=53)/raw(len=20)")
    write_frames(tmp_path / "in" / "h2.pcap", [(2.0, ucast)])
    return tmp_path, app, bytes(bcast), ucast


# --------------------------------------------------------------------------
# dva validate
# --------------------------------------------------------------------------


def test_validate_good_file_ok_and_warnings(tmp_path: Path):
    write(tmp_path / "edge.yaml", MEMORY_APP.replace("[h1, h2, h3]", "[h1, h2, h3, spare]"))
    p = dva("validate", "edge.yaml", cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    out = nonempty_lines(p.stdout)
    assert out[0] == ("edge.yaml: ok: appliance acme/edge, 1 devices, 0 links, "
                      "3 attachments")
    warnings = [ln for ln in out if ": warning: " in ln]
    assert len(warnings) == 1
    assert warnings[0].startswith("edge.yaml: warning: port lan.spare ")
    assert "neither linked nor attached" in warnings[0]
    assert p.stderr.strip() == ""


def test_validate_bad_file_lists_every_problem(tmp_path: Path):
    write(tmp_path / "bad.yaml", """\
        appliance: edge
        colour: red
        devices:
          lan:
            type: hub
          sw:
            type: switch
            ports: [a, a]
        """)
    p = dva("validate", "bad.yaml", cwd=tmp_path)
    assert p.returncode == 1
    err = nonempty_lines(p.stderr)
    assert err[0] == "bad.yaml: invalid appliance (3 problems)"
    assert err[1].strip() == "bad.yaml:2: colour: unknown key"
    assert err[2].strip().startswith("bad.yaml:5: devices.lan.type: unknown device type "
                                     "'hub'; known: ")
    assert "switch" in err[2]
    assert err[3].strip().startswith("bad.yaml:8: devices.sw.ports: ")
    assert "duplicate port names: a" in err[3]
    assert len(err) == 4
    assert ": ok" not in p.stdout


def test_validate_several_files_reports_each(tmp_path: Path):
    write(tmp_path / "good.yaml", MEMORY_APP)
    write(tmp_path / "bad.yaml", "appliance: edge\ndevices:\n  lan: {type: switch, "
                                 "ports: [h1]}\n  lan: {type: switch, ports: [h2]}\n")
    p = dva("validate", "good.yaml", "bad.yaml", cwd=tmp_path)
    assert p.returncode == 1
    assert "good.yaml: ok: appliance acme/edge" in p.stdout
    assert "bad.yaml: ok" not in p.stdout
    assert "bad.yaml:4: devices.lan: duplicate key 'lan' (first on line 3)" in p.stderr


def test_validate_yaml_syntax_error(tmp_path: Path):
    write(tmp_path / "bad.yaml", "appliance: edge\ndevices:\n  lan:\n\ttype: switch\n")
    p = dva("validate", "bad.yaml", cwd=tmp_path)
    assert p.returncode == 1
    assert "bad.yaml:4: YAML syntax:" in p.stderr


def test_validate_missing_file(tmp_path: Path):
    p = dva("validate", "nope.yaml", cwd=tmp_path)
    assert p.returncode == 1
    assert p.stderr.startswith("nope.yaml: invalid appliance")
    assert "cannot read" in p.stderr


def test_validate_binary_file(tmp_path: Path):
    (tmp_path / "junk.yaml").write_bytes(bytes(range(256)) * 8)
    p = dva("validate", "junk.yaml", cwd=tmp_path)
    assert p.returncode == 1
    assert p.stderr.startswith("junk.yaml: invalid appliance")


# --------------------------------------------------------------------------
# dva run
# --------------------------------------------------------------------------


def test_run_writes_output_pcaps_and_prints_counters(pcap_setup):
    tmp_path, _, bcast, ucast = pcap_setup
    p = dva("run", "edge.yaml", cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    out = tmp_path / "out"
    # the broadcast from h1 reaches h2 and h3, never h1; the unicast to h1's learned MAC
    # reaches h1 only
    assert frames_of(out / "h1.pcap") == [(2.0, ucast)]
    assert frames_of(out / "h2.pcap") == [(1.0, bcast)]
    assert frames_of(out / "h3.pcap") == [(1.0, bcast)]
    # the counters table
    assert "default/edge: 2 batches" in p.stdout
    rows = {tuple(c.strip() for c in ln.strip("│┃ ").split("│"))
            for ln in p.stdout.splitlines() if "│" in ln}
    assert ("lan.h1", "rx", "1") in rows
    assert ("lan.h2", "rx", "1") in rows
    assert ("lan.h3", "tx", "1") in rows
    assert ("lan", "learned", "2") in rows
    assert ("lan", "flooded", "1") in rows
    assert ("graph", "drop/unconnected", "1") in rows  # the flood copy to 'spare'
    # zero counters are left out unless --all
    assert not any(r[:2] == ("lan", "moved") for r in rows)


def test_run_all_shows_zero_counters(pcap_setup):
    tmp_path, *_ = pcap_setup
    p = dva("run", "--all", "edge.yaml", cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    assert "same_port" in p.stdout and "moved" in p.stdout


def test_run_json_counters(pcap_setup):
    tmp_path, *_ = pcap_setup
    p = dva("run", "--json", "edge.yaml", cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    c = json.loads(p.stdout)
    assert c["lan.h1 rx"] == 1
    assert c["lan.h2 rx"] == 1
    assert c["lan.h3 rx"] == 0
    assert c["lan.h1 tx"] == 1
    assert c["lan.h2 tx"] == 1
    assert c["lan.h3 tx"] == 1
    assert c["lan.spare tx"] == 1
    assert c["lan learned"] == 2
    assert c["lan flooded"] == 1
    assert c["lan drop/same_port"] == 0
    assert c["attach lan.h1 rx"] == 1
    assert c["attach lan.h3 tx"] == 1
    assert c["graph drop/unconnected"] == 1
    assert c["attach lan.h1 drop/too_long"] == 0
    assert all(isinstance(v, int) for v in c.values())


def test_run_quiet_prints_nothing(pcap_setup):
    tmp_path, _, bcast, _ = pcap_setup
    p = dva("run", "--quiet", "edge.yaml", cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == "" and p.stderr.strip() == ""
    assert frames_of(tmp_path / "out" / "h2.pcap") == [(1.0, bcast)]


def test_run_same_port_drop_counted(tmp_path: Path):
    (tmp_path / "out").mkdir()
    write(tmp_path / "edge.yaml", """\
        appliance: edge
        devices:
          lan:
            type: switch
            ports: [h1, h2]
        attach:
          lan.h1: {pcap: {read: h1.pcap, write: out/h1.pcap}}
          lan.h2: {pcap: {write: out/h2.pcap}}
        """)
    f1 = parse_spec(f"eth(dst={BCAST},src={MAC1})")
    f2 = parse_spec(f"eth(dst={MAC1},src={MAC3})")  # to a MAC learned on h1 itself
    write_frames(tmp_path / "h1.pcap", [(1.0, f1), (1.5, f2)])
    p = dva("run", "--json", "--batch-size", "1", "edge.yaml", cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    c = json.loads(p.stdout)
    assert c["lan.h1 rx"] == 2
    assert c["lan drop/same_port"] == 1
    assert c["lan.h2 tx"] == 1
    assert frames_of(tmp_path / "out" / "h2.pcap") == [(1.0, f1)]
    assert frames_of(tmp_path / "out" / "h1.pcap") == []


def test_run_invalid_appliance(tmp_path: Path):
    write(tmp_path / "bad.yaml", "appliance: edge\ndevices:\n  lan: {type: hub}\n")
    p = dva("run", "bad.yaml", cwd=tmp_path)
    assert p.returncode == 1
    assert "bad.yaml:3: devices.lan.type: unknown device type 'hub'" in p.stderr
    assert p.stdout.strip() == ""


def test_run_missing_input_pcap(tmp_path: Path):
    (tmp_path / "out").mkdir()
    write(tmp_path / "edge.yaml", PCAP_APP)
    p = dva("run", "edge.yaml", cwd=tmp_path)
    assert p.returncode != 0
    err = nonempty_lines(p.stderr)
    assert len(err) == 1
    assert err[0].startswith("error: lan.h1: ")
    assert "h1.pcap" in err[0] and "does not exist" in err[0]


def test_live_run_refuses_non_interface_attachments(tmp_path: Path):
    write(tmp_path / "edge.yaml", """\
        appliance: edge
        devices:
          lan: {type: switch, ports: [h1, h2]}
        attach:
          lan.h1: {memory: m}
          lan.h2: {af_packet: veth0}
        """)
    p = dva("run", "edge.yaml", cwd=tmp_path)
    assert p.returncode != 0
    err = nonempty_lines(p.stderr)
    assert len(err) == 1
    assert err[0].startswith("error: a live run attaches only interfaces")
    assert "lan.h1" in err[0]


def test_live_run_on_a_missing_interface_is_a_clean_error(tmp_path: Path):
    write(tmp_path / "edge.yaml", """\
        appliance: edge
        devices:
          lan: {type: switch, ports: [h1, h2]}
        attach:
          lan.h1: {af_packet: dvanosuch0}
          lan.h2: {af_packet: dvanosuch1}
        """)
    p = dva("run", "edge.yaml", cwd=tmp_path)
    assert p.returncode == 1
    err = nonempty_lines(p.stderr)
    assert len(err) == 1 and "Traceback" not in p.stderr
    assert "lan.h1" in err[0] and "dvanosuch0" in err[0] and "no such interface" in err[0]


def test_run_input_that_is_not_a_pcap(tmp_path: Path):
    (tmp_path / "out").mkdir()
    write(tmp_path / "edge.yaml", PCAP_APP)
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "h1.pcap").write_text("this is not a capture file\n")
    write_frames(tmp_path / "in" / "h2.pcap", [])
    p = dva("run", "edge.yaml", cwd=tmp_path)
    assert p.returncode != 0
    err = nonempty_lines(p.stderr)
    assert len(err) == 1
    assert err[0].startswith("error: lan.h1: ") and "not a pcap" in err[0]


def test_run_output_folder_missing(tmp_path: Path):
    write(tmp_path / "edge.yaml", PCAP_APP)
    (tmp_path / "in").mkdir()
    write_frames(tmp_path / "in" / "h1.pcap", [])
    write_frames(tmp_path / "in" / "h2.pcap", [])
    p = dva("run", "edge.yaml", cwd=tmp_path)  # no out/ folder
    assert p.returncode != 0
    err = nonempty_lines(p.stderr)
    assert len(err) == 1
    assert err[0].startswith("error: lan.h1: cannot write ")


def test_run_paths_are_relative_to_the_appliance_file(pcap_setup):
    tmp_path, _, bcast, _ = pcap_setup
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    p = dva("run", "--quiet", tmp_path / "edge.yaml", cwd=elsewhere)
    assert p.returncode == 0, p.stderr
    assert frames_of(tmp_path / "out" / "h3.pcap") == [(1.0, bcast)]
    assert list(elsewhere.iterdir()) == []


# --------------------------------------------------------------------------
# dva trace
# --------------------------------------------------------------------------


def test_trace_shows_steps_outputs_and_drop_reason(tmp_path: Path):
    write(tmp_path / "edge.yaml", MEMORY_APP)
    s1 = f"eth(dst={MAC2},src={MAC1})/ipv4(src=10.0.0.1,dst=10.0.0.2)/udp(sport=1,dport=2)"
    s2 = f"eth(dst={MAC1},src={MAC3})"  # MAC1 was learned on h1, the ingress port
    d1, d2 = describe(parse_spec(s1)), describe(parse_spec(s2))
    p = dva("trace", "edge.yaml", "--in", "lan.h1", "--packet", s1, "--packet", s2,
            cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    lines = [ln.strip() for ln in nonempty_lines(p.stdout)]
    i1 = lines.index(f"packet 1 at t=0 into lan.h1: {d1}")
    i2 = lines.index(f"packet 2 at t=1 into lan.h1: {d2}")
    first, second = lines[i1 + 1:i2], lines[i2 + 1:]
    # packet 1: unknown unicast, flooded to h2 and h3 (not back to h1)
    assert first[0] == f"1. lan (switch) in h1: {d1}"
    assert first[1].startswith("unknown unicast: flood -> out ")
    assert "h2 (attached, leaves the appliance)" in first[1]
    assert "h3 (attached, leaves the appliance)" in first[1]
    assert "h1 (" not in first[1]
    assert f"=> out lan.h2: {d1}" in first
    assert f"=> out lan.h3: {d1}" in first
    assert not any(ln.startswith("=> out lan.h1") for ln in first)
    # packet 2: destination learned on the ingress port -> dropped as same_port
    assert second[0] == f"1. lan (switch) in h1: {d2}"
    assert second[1] == "known unicast -> DROP /nf/switch/same_port"
    assert second[-1] == "=> nothing leaves the appliance"
    assert not any(ln.startswith("=> out") for ln in second)


def test_trace_time_and_fresh_state(tmp_path: Path):
    write(tmp_path / "edge.yaml", MEMORY_APP)
    s1 = f"eth(dst={BCAST},src={MAC2})"
    s2 = f"eth(dst={MAC3},src={MAC2})"
    p = dva("trace", "edge.yaml", "--in", "lan.h2", "--packet", s1, "--packet", s2,
            "--time", "5", cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    assert f"packet 1 at t=5 into lan.h2: {describe(parse_spec(s1))}" in p.stdout
    assert f"packet 2 at t=6 into lan.h2: {describe(parse_spec(s2))}" in p.stdout
    assert ("broadcast: flood -> out h1 (attached, leaves the appliance), "
            "h3 (attached, leaves the appliance)") in p.stdout
    # each trace starts with empty tables: MAC2, learned on h2 above, is unknown here
    p = dva("trace", "edge.yaml", "--in", "lan.h2", "--packet",
            f"eth(dst={MAC2},src={MAC1})", cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    assert "unknown unicast: flood -> out h1" in p.stdout
    assert "same_port" not in p.stdout


def test_trace_invalid_source_mac_drop(tmp_path: Path):
    write(tmp_path / "edge.yaml", MEMORY_APP)
    p = dva("trace", "edge.yaml", "--in", "lan.h3", "--packet",
            f"eth(dst={MAC1},src={BCAST})", cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    assert "-> DROP /nf/switch/invalid_src_mac" in p.stdout
    assert "=> nothing leaves the appliance" in p.stdout


def test_trace_hex_packet(tmp_path: Path):
    write(tmp_path / "edge.yaml", MEMORY_APP)
    frame = parse_spec(f"eth(dst={BCAST},src={MAC1})")
    p = dva("trace", "edge.yaml", "--in", "lan.h1", "--packet", frame.hex(), cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    assert f"packet 1 at t=0 into lan.h1: {describe(frame)}" in p.stdout


@pytest.mark.parametrize("inport", ["lan.h9", "wan"])
def test_trace_unknown_in_port(tmp_path: Path, inport: str):
    write(tmp_path / "edge.yaml", MEMORY_APP)
    p = dva("trace", "edge.yaml", "--in", inport, "--packet", "eth()", cwd=tmp_path)
    assert p.returncode == 2
    err = nonempty_lines(p.stderr)
    assert len(err) == 1
    assert err[0].startswith(f"error: --in {inport}: ")
    assert err[0].endswith("ports: lan.h1, lan.h2, lan.h3")
    assert p.stdout.strip() == ""


@pytest.mark.parametrize("spec", [
    "eth(bogus=1)",
    f"eth(dst={MAC2},src={MAC1})/udp()",
])
def test_trace_bad_packet_spec(tmp_path: Path, spec: str):
    write(tmp_path / "edge.yaml", MEMORY_APP)
    with pytest.raises(SpecError) as ei:
        parse_spec(spec)
    p = dva("trace", "edge.yaml", "--in", "lan.h1", "--packet", spec, cwd=tmp_path)
    assert p.returncode == 2
    err = nonempty_lines(p.stderr)
    assert len(err) == 1
    assert err[0] == f"error: --packet {spec!r}: {ei.value}"
    assert p.stdout.strip() == ""


def test_trace_invalid_appliance(tmp_path: Path):
    write(tmp_path / "bad.yaml", "appliance: edge\ndevices:\n  lan: {type: hub}\n")
    p = dva("trace", "bad.yaml", "--in", "lan.h1", "--packet", "eth()", cwd=tmp_path)
    assert p.returncode == 1
    assert "bad.yaml:3: devices.lan.type: unknown device type" in p.stderr


def test_trace_does_not_truncate_pcap_outputs(pcap_setup):
    tmp_path, _, bcast, _ = pcap_setup
    p = dva("run", "--quiet", "edge.yaml", cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    assert frames_of(tmp_path / "out" / "h2.pcap") == [(1.0, bcast)]
    p = dva("trace", "edge.yaml", "--in", "lan.h1", "--packet",
            f"eth(dst={BCAST},src={MAC1})", cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    assert frames_of(tmp_path / "out" / "h2.pcap") == [(1.0, bcast)]


def test_trace_opens_no_capture_file(tmp_path: Path):
    # A trace feeds its own packets: a missing pcap input does not matter, and no
    # output file is created or emptied.
    write(tmp_path / "edge.yaml", PCAP_APP)
    p = dva("trace", "edge.yaml", "--in", "lan.h1", "--packet",
            f"eth(dst={BCAST},src={MAC1})", cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    assert "Traceback" not in p.stdout + p.stderr
    assert "out lan.h2" in p.stdout
    assert not any(tmp_path.rglob("*.pcap"))
