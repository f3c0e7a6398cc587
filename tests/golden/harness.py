"""Golden cases: data files that say what an appliance must do.

A case (``tests/golden/<area>/<name>.yaml``)::

    description: one line
    appliance: {...}            # an appliance file; attachments are {memory: NAME}
    packets: {NAME: SPEC}       # optional named packets (SPEC as in dva trace)
    input:                      # in time order
      - {t: 0, port: h1, packet: NAME-or-SPEC}
    expect:                     # frames out of each memory port, in order;
      h2: [NAME-or-SPEC, ...]   # a port not listed must send nothing
    counters: {"lan.h1 rx": 1}  # every counter not listed must stay 0

:func:`run_case` runs a case with its attachments as memory ports or rewritten to
pcap files (``kind="pcap"``: inputs written as pcap, outputs read back), so the
same expectations check both port kinds.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from dva.dispatch.offline import OfflineRunner
from dva.graph.appliance import load_appliance, parse_appliance
from dva.packet.spec import describe, parse_spec
from dva.ports.offline import MemoryPort
from dva.ports.pcapfile import read_frames, write_frames


def load_case(path: Path) -> dict:
    case = yaml.safe_load(path.read_text())
    named = case.get("packets", {}) or {}

    def frame(s: str) -> bytes:
        return parse_spec(named.get(s, s))

    case["_inputs"] = [(float(i["t"]), i["port"], frame(i["packet"])) for i in case["input"]]
    case["_expect"] = {p: [frame(s) for s in v] for p, v in (case.get("expect") or {}).items()}
    return case


def _memory_names(app_doc: dict) -> dict[str, str]:
    """memory name -> attachment ref."""
    return {spec["memory"]: ref for ref, spec in app_doc.get("attach", {}).items()
            if "memory" in spec}


def run_case(case: dict, kind: str, tmp: Path):
    """Run a case; returns (frames sent per memory-port name, RunResult)."""
    doc = case["appliance"]
    names = _memory_names(doc)
    if kind == "memory":
        ports = {n: MemoryPort(ref) for n, ref in names.items()}
        for t, p, f in case["_inputs"]:
            ports[p].inbox.append((t, f))
        with OfflineRunner(parse_appliance(yaml.safe_dump(doc)), memory=ports) as r:
            res = r.run()
        sent = {n: [f for _, f in port.sent] for n, port in ports.items()}
    else:
        doc = dict(doc)
        attach = {}
        for ref, spec in doc.get("attach", {}).items():
            n = spec["memory"]
            inputs = [(t, f) for t, p, f in case["_inputs"] if p == n]
            write_frames(tmp / f"{n}.in.pcap", inputs)
            attach[ref] = {"pcap": {"read": f"{n}.in.pcap", "write": f"{n}.out.pcap"}}
        doc["attach"] = attach
        (tmp / "appliance.yaml").write_text(yaml.safe_dump(doc))
        with OfflineRunner(load_appliance(tmp / "appliance.yaml")) as r:
            res = r.run()
        sent = {n: [f for _, f in read_frames(tmp / f"{n}.out.pcap")] for n in names}
    return sent, res


def check_case(case: dict, kind: str, tmp: Path) -> None:
    sent, res = run_case(case, kind, tmp)
    assert res.accounting_errors == []
    expect = case["_expect"]
    for port, frames in sent.items():
        want = expect.get(port, [])
        got = [describe(f) for f in frames]
        assert got == [describe(f) for f in want], f"frames out of {port}"
        assert frames == want, f"bytes out of {port}"
    want_counters = case.get("counters") or {}
    unknown = set(want_counters) - set(res.counters)
    assert not unknown, f"case names counters that do not exist: {sorted(unknown)}"
    nonzero = {k: v for k, v in res.counters.items() if v}
    assert nonzero == want_counters
