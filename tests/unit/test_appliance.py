"""Tests for dva.graph.appliance: loading and validating appliance files.

Every invalid file must raise :class:`ApplianceError` whose issues carry the exact
document path, the line of the offending text and a message saying what is wrong;
``render()`` starts with the file name. All problems are reported at once.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from dva.graph.appliance import (
    Appliance,
    ApplianceError,
    Attachment,
    format_path,
    load_appliance,
    parse_appliance,
)
from dva.nf import registry
from dva.nf.switch import Switch

SRC = "edge.yaml"


# --------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------


def doc(text: str) -> str:
    """Dedent a YAML text written inline in a test (keeps a leading blank line)."""
    return textwrap.dedent(text)


def line_no(text: str, needle: str, nth: int | None = None) -> int:
    """1-based line of ``text`` containing ``needle``: the only one, or the ``nth``."""
    hits = [i for i, ln in enumerate(text.splitlines(), 1) if needle in ln]
    if nth is None:
        assert len(hits) == 1, f"{needle!r} is not unique in the test text: lines {hits}"
        return hits[0]
    assert len(hits) >= nth, f"{needle!r} occurs {len(hits)} times in the test text"
    return hits[nth - 1]


def errors(text: str, source: str = SRC) -> ApplianceError:
    with pytest.raises(ApplianceError) as ei:
        parse_appliance(text, source=source)
    err = ei.value
    assert err.issues, "an ApplianceError must list at least one issue"
    assert err.render().startswith(f"{source}:")
    assert isinstance(err, ValueError)
    return err


def paths(err: ApplianceError) -> list[str]:
    return [format_path(i.path) for i in err.issues]


def check(err: ApplianceError, path: str, line: int | None, *words: str,
          source: str = SRC):
    """The one issue at ``path``: its line and key words; and how it renders."""
    found = [i for i in err.issues if format_path(i.path) == path]
    assert len(found) == 1, f"expected one issue at {path!r}, got {paths(err)}: {err}"
    issue = found[0]
    assert issue.line == line, f"{path}: line {issue.line}, expected {line}"
    msg = issue.message.lower()
    for w in words:
        assert w.lower() in msg, f"{path}: {w!r} not in {issue.message!r}"
    rendered = err.render()
    where = f"{source}:{line}" if line else source
    prefix = f"{where}: {path}: " if path else f"{where}: "
    assert f"  {prefix}{issue.message}" in rendered.splitlines()
    return issue


VALID = doc("""\
    appliance: edge
    tenant: acme
    devices:
      lan:
        type: switch
        ports: [h1, h2, h3, spare]
      core:
        type: switch
        ports:
          down: {trunk: [10, "20-29"], native: 1}
          srv: {vlan: 10}
          mgmt:
        mac_table_size: 1024
        aging: 30
    links:
      - [lan.h3, core.down]
    attach:
      lan.h1: {pcap: {read: in/h1.pcap, write: out/h1.pcap}}
      lan.h2: {memory: m2}
      core.srv: {af_packet: veth-srv}
    """)


# --------------------------------------------------------------------------
# Valid files
# --------------------------------------------------------------------------


def test_valid_file_builds_devices_links_and_attachments():
    app = parse_appliance(VALID, source=SRC)
    assert isinstance(app, Appliance)
    assert app.name == "edge"
    assert app.tenant == "acme"
    assert app.qualified_name == "acme/edge"
    assert app.source == SRC
    assert set(app.devices) == {"lan", "core"}
    lan, core = app.devices["lan"], app.devices["core"]
    assert isinstance(lan, Switch) and isinstance(core, Switch)
    assert lan.name == "lan" and lan.type_name == "switch"
    assert lan.ports == ("h1", "h2", "h3", "spare")
    assert lan.port_index == {"h1": 0, "h2": 1, "h3": 2, "spare": 3}
    assert core.ports == ("down", "srv", "mgmt")
    assert core.config.mac_table_size == 1024
    assert core.config.aging == 30
    # switch defaults
    assert lan.config.mac_table_size == 8192
    assert lan.config.aging == 300
    # VLAN configuration compiled: trunk carries 10, 20..29 and native 1; srv is VLAN 10
    allowed = set(map(int, core.allowed[0].nonzero()[0]))
    assert allowed == {1, 10, *range(20, 30)}
    assert int(core.native[0]) == 1
    assert int(core.pvlan[1]) == 10
    assert int(core.pvlan[2]) == 1  # "mgmt:" (null options) is an access port in VLAN 1

    assert app.links == [(("lan", "h3"), ("core", "down"))]
    assert [a.ref for a in app.attachments] == ["lan.h1", "lan.h2", "core.srv"]
    a1, a2, a3 = app.attachments
    assert isinstance(a1, Attachment)
    assert (a1.device, a1.port, a1.spec.kind) == ("lan", "h1", "pcap")
    assert (a1.spec.pcap.read, a1.spec.pcap.write) == ("in/h1.pcap", "out/h1.pcap")
    assert (a2.spec.kind, a2.spec.target) == ("memory", "m2")
    assert (a3.spec.kind, a3.spec.target) == ("af_packet", "veth-srv")


def test_warnings_for_unconnected_ports_only():
    app = parse_appliance(VALID, source=SRC)
    assert len(app.warnings) == 2
    assert any("lan.spare" in w for w in app.warnings)
    assert any("core.mgmt" in w for w in app.warnings)
    for w in app.warnings:
        assert "neither linked nor attached" in w
    # connected ports (linked or attached) are never warned about
    for ref in ("lan.h1", "lan.h2", "lan.h3", "core.down", "core.srv"):
        assert not any(f"port {ref} " in w for w in app.warnings)


def test_fully_connected_appliance_has_no_warnings():
    app = parse_appliance(doc("""\
        appliance: edge
        devices:
          a: {type: switch, ports: [x, y]}
          b: {type: switch, ports: [x]}
        links: [[a.y, b.x]]
        attach: {a.x: {memory: m}}
        """))
    assert app.warnings == []


def test_tenant_defaults_to_default_and_links_attach_are_optional():
    app = parse_appliance("appliance: edge\ndevices:\n  lan: {type: switch, ports: [h1]}\n")
    assert app.tenant == "default"
    assert app.qualified_name == "default/edge"
    assert app.links == [] and app.attachments == []
    assert app.warnings and "lan.h1" in app.warnings[0]


def test_names_of_32_characters_and_63_ports_are_accepted():
    name = "a" + "b" * 31
    ports = ", ".join(f"p{i}" for i in range(62)) + ", " + "q" * 32
    app = parse_appliance(f"appliance: {name}\ndevices:\n  {name}:\n    type: switch\n"
                          f"    ports: [{ports}]\n")
    assert app.name == name
    assert len(app.devices[name].ports) == 63


def test_load_appliance_from_file_resolves_relative_paths(tmp_path: Path):
    sub = tmp_path / "conf"
    sub.mkdir()
    f = sub / "edge.yaml"
    f.write_text(VALID)
    app = load_appliance(f)
    assert app.source == str(f)
    assert app.base_dir == sub.resolve()
    att = app.attachments[0]
    assert app.resolve(att.spec.pcap.read) == sub.resolve() / "in" / "h1.pcap"
    assert app.resolve(att.spec.pcap.write) == sub.resolve() / "out" / "h1.pcap"
    absolute = tmp_path / "elsewhere.pcap"
    assert app.resolve(str(absolute)) == absolute


def test_load_appliance_relative_paths_do_not_depend_on_cwd(tmp_path: Path, monkeypatch):
    sub = tmp_path / "conf"
    sub.mkdir()
    (sub / "edge.yaml").write_text(VALID)
    monkeypatch.chdir(tmp_path)
    app = load_appliance("conf/edge.yaml")
    assert app.resolve("x.pcap") == sub.resolve() / "x.pcap"


# --------------------------------------------------------------------------
# Files that cannot be read or are not YAML mappings
# --------------------------------------------------------------------------


def test_missing_file(tmp_path: Path):
    f = tmp_path / "nope.yaml"
    with pytest.raises(ApplianceError) as ei:
        load_appliance(f)
    err = ei.value
    assert err.render().startswith(f"{f}:")
    assert len(err.issues) == 1
    assert "cannot read" in err.issues[0].message
    assert "No such file" in err.issues[0].message


def test_directory(tmp_path: Path):
    with pytest.raises(ApplianceError) as ei:
        load_appliance(tmp_path)
    assert ei.value.render().startswith(f"{tmp_path}:")
    assert "cannot read" in ei.value.issues[0].message
    assert "directory" in ei.value.issues[0].message.lower()


@pytest.mark.parametrize("data", [
    bytes(range(256)) * 4,  # not UTF-8
    b"\x00\x01\x02appliance: edge\x00\n",  # UTF-8 but control characters
    b"\xd4\xc3\xb2\xa1\x02\x00\x04\x00" + b"\x00" * 16,  # a pcap file header
], ids=["not-utf8", "control-chars", "pcap"])
def test_binary_garbage(tmp_path: Path, data: bytes):
    f = tmp_path / "garbage.yaml"
    f.write_bytes(data)
    with pytest.raises(ApplianceError) as ei:
        load_appliance(f)
    assert ei.value.render().startswith(f"{f}:")
    assert ei.value.issues


def test_empty_file():
    err = errors("")
    check(err, "", 1, "expected a mapping")
    assert len(err.issues) == 1


def test_only_comments_is_empty():
    err = errors("# nothing here\n")
    check(err, "", 1, "expected a mapping")


def test_file_that_is_a_list():
    err = errors("- appliance: edge\n- devices: {}\n")
    check(err, "", 1, "expected a mapping", "appliance", "devices")


def test_file_that_is_a_scalar():
    err = errors("just some text\n")
    check(err, "", 1, "expected a mapping")


def test_yaml_syntax_error_has_line():
    text = doc("""\
        appliance: edge
        devices:
          lan:
        \ttype: switch
        """)
    err = errors(text)
    check(err, "", line_no(text, "\ttype"), "yaml syntax")
    assert len(err.issues) == 1


def test_yaml_syntax_error_bad_indentation_line():
    text = doc("""\
        appliance: edge
        devices:
          lan:
            type: switch
           ports: [h1]
        """)
    err = errors(text)
    check(err, "", line_no(text, "ports"), "yaml syntax")


def test_yaml_unclosed_flow_sequence():
    text = doc("""\
        appliance: edge
        devices:
          lan: {type: switch, ports: [h1}
        """)
    err = errors(text)
    assert len(err.issues) == 1
    issue = err.issues[0]
    assert issue.path == ()
    assert "YAML syntax" in issue.message
    assert issue.line == line_no(text, "lan:")


# --------------------------------------------------------------------------
# Top level
# --------------------------------------------------------------------------


def test_unknown_top_level_key():
    text = doc("""\
        appliance: edge
        devices:
          lan: {type: switch, ports: [h1]}
        colour: red
        """)
    err = errors(text)
    check(err, "colour", line_no(text, "colour"), "unknown key")
    assert len(err.issues) == 1


def test_missing_appliance():
    text = doc("""\
        tenant: acme
        devices:
          lan: {type: switch, ports: [h1]}
        """)
    err = errors(text)
    check(err, "appliance", 1, "missing")
    assert len(err.issues) == 1


def test_missing_devices():
    err = errors("appliance: edge\n")
    check(err, "devices", 1, "missing")


def test_no_devices():
    text = "appliance: edge\ndevices: {}\n"
    err = errors(text)
    check(err, "devices", 2, "at least 1")


@pytest.mark.parametrize("name", ["my edge", "edge.1", "1edge", "-edge", "a" * 33, "é"])
def test_bad_appliance_name(name):
    text = f"tenant: acme\nappliance: '{name}'\ndevices:\n  lan: {{type: switch, ports: [h1]}}\n"
    err = errors(text)
    check(err, "appliance", 2, "bad name", repr(name), "letter")


def test_bad_tenant_name():
    text = "appliance: edge\ntenant: acme/prod\ndevices:\n  lan: {type: switch, ports: [h1]}\n"
    err = errors(text)
    check(err, "tenant", 2, "bad name", "acme/prod")


# --------------------------------------------------------------------------
# Devices
# --------------------------------------------------------------------------


def test_unknown_key_inside_device():
    text = doc("""\
        appliance: edge
        devices:
          lan:
            type: switch
            ports: [h1]
            speed: 10G
        """)
    err = errors(text)
    check(err, "devices.lan.speed", line_no(text, "speed"), "unknown key")
    assert len(err.issues) == 1


def test_unknown_device_type_lists_known_types():
    text = doc("""\
        appliance: edge
        devices:
          lan:
            ports: [h1]
            type: hub
        """)
    err = errors(text)
    issue = check(err, "devices.lan.type", line_no(text, "type: hub"),
                  "unknown device type", "'hub'", "known")
    for t in registry.names():
        assert t in issue.message
    assert "switch" in issue.message


def test_device_type_not_a_string():
    text = "appliance: edge\ndevices:\n  lan: {type: [switch], ports: [h1]}\n"
    err = errors(text)
    check(err, "devices.lan.type", 3, "unknown device type")


def test_missing_device_type():
    text = doc("""\
        appliance: edge
        devices:
          lan:
            ports: [h1]
        """)
    err = errors(text)
    check(err, "devices.lan.type", line_no(text, "lan:"), "missing")
    assert len(err.issues) == 1


def test_device_that_is_not_a_mapping():
    text = "appliance: edge\ndevices:\n  lan: switch\n"
    err = errors(text)
    assert set(paths(err)) == {"devices.lan"}
    assert all(i.line == 3 for i in err.issues)
    assert any("mapping" in i.message for i in err.issues)


@pytest.mark.parametrize("name", ["l.an", "my lan", "9lan", "x" * 33])
def test_bad_device_name(name):
    text = f"appliance: edge\ndevices:\n  {name!r}: {{type: switch, ports: [h1]}}\n"
    err = errors(text)
    check(err, f"devices.{name}", 3, "bad name", repr(name))


@pytest.mark.parametrize("name", ["h.1", "h 1", "p" * 33, "1h"])
def test_bad_port_name_in_list(name):
    text = doc(f"""\
        appliance: edge
        devices:
          lan:
            type: switch
            ports:
              - ok
              - {name!r}
        """)
    err = errors(text)
    check(err, "devices.lan.ports[1]", line_no(text, repr(name)), "bad name", repr(name))


@pytest.mark.parametrize("name", ["h.1", "h 1", "p" * 33])
def test_bad_port_name_in_mapping(name):
    text = doc(f"""\
        appliance: edge
        devices:
          lan:
            type: switch
            ports:
              ok: {{vlan: 2}}
              {name!r}: {{vlan: 3}}
        """)
    err = errors(text)
    check(err, f"devices.lan.ports.{name}", line_no(text, repr(name)), "bad name",
          repr(name))


def test_duplicate_device_is_an_error_not_last_wins():
    text = doc("""\
        appliance: edge
        devices:
          lan:
            type: switch
            ports: [h1]
          lan:
            type: switch
            ports: [h2, h3]
        """)
    err = errors(text)
    first, second = line_no(text, "lan:", 1), line_no(text, "lan:", 2)
    assert text.splitlines()[first - 1].strip() == "lan:"
    assert text.splitlines()[second - 1].strip() == "lan:"
    check(err, "devices.lan", second, "duplicate key", "'lan'", f"line {first}")
    assert len(err.issues) == 1


def test_duplicate_key_at_top_level_and_in_attach():
    text = doc("""\
        appliance: edge
        devices:
          lan: {type: switch, ports: [h1]}
        attach:
          lan.h1: {memory: a}
          lan.h1: {memory: b}
        appliance: other
        """)
    err = errors(text)
    check(err, "attach.lan.h1", 6, "duplicate key", "first on line 5")
    check(err, "appliance", 7, "duplicate key", "first on line 1")
    assert len(err.issues) == 2


# --------------------------------------------------------------------------
# Switch configuration
# --------------------------------------------------------------------------


def switch_doc(body: str) -> str:
    return "appliance: edge\ndevices:\n  lan:\n    type: switch\n" + textwrap.indent(
        textwrap.dedent(body), "    ")


def test_switch_duplicate_port_names():
    text = switch_doc("ports: [h1, h2, h1]\n")
    err = errors(text)
    check(err, "devices.lan.ports", line_no(text, "ports"), "duplicate port", "h1")
    assert "h2" not in err.issues[0].message


def test_switch_duplicate_port_names_in_mapping_is_a_duplicate_key():
    text = switch_doc("""\
        ports:
          h1: {vlan: 2}
          h1: {vlan: 3}
        """)
    err = errors(text)
    check(err, "devices.lan.ports.h1", line_no(text, "h1: {vlan: 3}"), "duplicate key")


def test_switch_access_and_trunk_on_one_port():
    text = switch_doc("""\
        ports:
          h1: {vlan: 10}
          up: {vlan: 10, trunk: [20]}
        """)
    err = errors(text)
    check(err, "devices.lan.ports.up", line_no(text, "up:"), "access", "trunk", "not both")


def test_switch_native_without_trunk():
    text = switch_doc("""\
        ports:
          h1: {native: 5}
        """)
    err = errors(text)
    check(err, "devices.lan.ports.h1", line_no(text, "h1:"), "native", "trunk")


@pytest.mark.parametrize("vid", [0, 4095, -1, 5000])
def test_switch_access_vlan_out_of_range(vid):
    text = switch_doc(f"""\
        ports:
          h1: {{vlan: {vid}}}
        """)
    err = errors(text)
    issue = check(err, "devices.lan.ports.h1.vlan", line_no(text, "h1:"))
    assert ("1" if vid < 1 else "4094") in issue.message


@pytest.mark.parametrize("vid", [0, 4095])
def test_switch_native_vlan_out_of_range(vid):
    text = switch_doc(f"""\
        ports:
          up: {{trunk: [10], native: {vid}}}
        """)
    err = errors(text)
    check(err, "devices.lan.ports.up.native", line_no(text, "up:"))


@pytest.mark.parametrize("item", ["0", "4095", "'20-10'", "'4090-4095'", "'0-5'"])
def test_switch_trunk_vlan_out_of_range(item):
    text = switch_doc(f"""\
        ports:
          up:
            trunk: [10, {item}]
        """)
    err = errors(text)
    check(err, "devices.lan.ports.up.trunk", line_no(text, "trunk"), "bad vlan",
          "1..4094")


@pytest.mark.parametrize("item", ["abc", "'1-2-3'", "'5-'", "'x-9'"])
def test_switch_trunk_bad_range_syntax(item):
    text = switch_doc(f"""\
        ports:
          up:
            trunk: [{item}]
        """)
    err = errors(text)
    check(err, "devices.lan.ports.up.trunk", line_no(text, "trunk"), "bad vlan")


def test_switch_bad_range_20_10_names_the_range():
    text = switch_doc("""\
        ports:
          up: {trunk: ["20-10"]}
        """)
    err = errors(text)
    check(err, "devices.lan.ports.up.trunk", line_no(text, "up:"), "'20-10'")


def test_switch_empty_trunk_list():
    text = switch_doc("""\
        ports:
          up:
            trunk: []
        """)
    err = errors(text)
    check(err, "devices.lan.ports.up.trunk", line_no(text, "trunk"), "at least one vlan")


def test_switch_no_ports():
    text = switch_doc("ports: []\n")
    err = errors(text)
    check(err, "devices.lan.ports", line_no(text, "ports"), "at least one port")


def test_switch_missing_ports():
    text = switch_doc("aging: 10\n")
    err = errors(text)
    check(err, "devices.lan.ports", line_no(text, "lan:"), "missing")


@pytest.mark.parametrize("value", [0, -5, 2_000_000])
def test_switch_mac_table_size_bounds(value):
    text = switch_doc(f"ports: [h1]\nmac_table_size: {value}\n")
    err = errors(text)
    issue = check(err, "devices.lan.mac_table_size", line_no(text, "mac_table_size"))
    assert ("greater than" if value < 1 else "less than") in issue.message


@pytest.mark.parametrize("value", ["0", "-1", "-0.5", "soon"])
def test_switch_aging_must_be_positive(value):
    text = switch_doc(f"ports: [h1]\naging: {value}\n")
    err = errors(text)
    issue = check(err, "devices.lan.aging", line_no(text, "aging"))
    if value != "soon":
        assert "greater than 0" in issue.message


def test_switch_more_than_63_ports():
    ports = ", ".join(f"p{i}" for i in range(64))
    text = switch_doc(f"ports: [{ports}]\n")
    err = errors(text)
    check(err, "devices.lan.ports", line_no(text, "ports"), "63")


def test_switch_more_than_63_ports_as_mapping():
    ports = ", ".join(f"p{i}: {{vlan: 2}}" for i in range(64))
    text = switch_doc(f"ports: {{{ports}}}\n")
    err = errors(text)
    check(err, "devices.lan.ports", line_no(text, "ports"), "63")


def test_switch_unknown_port_option():
    text = switch_doc("""\
        ports:
          h1: {vlan: 10, speed: 100}
        """)
    err = errors(text)
    check(err, "devices.lan.ports.h1.speed", line_no(text, "h1:"), "unknown key")


# --------------------------------------------------------------------------
# Links
# --------------------------------------------------------------------------

TWO = doc("""\
    appliance: edge
    devices:
      lan:
        type: switch
        ports: [h1, h2, h3]
      sw:
        type: switch
        ports: [a, b]
    """)


def test_link_to_missing_device():
    text = TWO + "links:\n  - [lan.h1, sw.a]\n  - [lan.h2, nope.x]\n"
    err = errors(text)
    issue = check(err, "links[1][1]", line_no(text, "nope.x"), "no device", "'nope'")
    assert "lan" in issue.message and "sw" in issue.message  # the devices that exist
    assert len(err.issues) == 1


def test_link_to_missing_port_lists_the_device_ports():
    text = TWO + "links:\n  - [sw.zz, lan.h1]\n"
    err = errors(text)
    issue = check(err, "links[0][0]", line_no(text, "sw.zz"), "no port", "'zz'", "switch")
    assert "a, b" in issue.message


def test_link_endpoints_in_block_style_have_their_own_lines():
    text = TWO + doc("""\
        links:
          - - lan.h1
            - sw.a
          - - lan.h2
            - sw.nope
        """)
    err = errors(text)
    check(err, "links[1][1]", line_no(text, "sw.nope"), "no port", "'nope'")


def test_port_linked_twice():
    text = TWO + "links:\n  - [lan.h1, sw.a]\n  - [lan.h2, sw.a]\n"
    err = errors(text)
    check(err, "links[1][1]", line_no(text, "[lan.h2, sw.a]"), "sw.a", "already",
          "links[0][1]")
    assert len(err.issues) == 1


@pytest.mark.parametrize("second", ["[lan.h1, sw.a]", "[sw.a, lan.h1]"])
def test_same_link_twice_either_orientation(second):
    text = TWO + f"links:\n  - [lan.h1, sw.a]\n  - {second}\n"
    err = errors(text)
    line = line_no(text, "links:") + 2
    assert paths(err) == ["links[1][0]", "links[1][1]"]
    for i in err.issues:
        assert i.line == line
        assert "already" in i.message
    assert err.render().startswith(SRC)


def test_port_linked_to_itself():
    text = TWO + "links:\n  - [lan.h1, sw.a]\n  - [lan.h3, lan.h3]\n"
    err = errors(text)
    check(err, "links[1]", line_no(text, "[lan.h3, lan.h3]"), "itself", "lan.h3")
    assert len(err.issues) == 1


def test_port_both_linked_and_attached():
    text = TWO + doc("""\
        links:
          - [lan.h1, sw.a]
        attach:
          lan.h2: {memory: m}
          sw.a: {memory: n}
        """)
    err = errors(text)
    check(err, "attach.sw.a", line_no(text, "sw.a: {memory"), "sw.a", "already",
          "links[0][1]")
    assert len(err.issues) == 1


@pytest.mark.parametrize("ref", ["lan", "lan.h1.x", "lan h1", ".h1", "lan."])
def test_link_with_bad_port_reference(ref):
    text = TWO + f"links:\n  - [sw.a, '{ref}']\n"
    err = errors(text)
    check(err, "links[0][1]", line_no(text, "links:") + 1, "DEVICE.PORT")


def test_link_with_three_ends():
    text = TWO + "links:\n  - [lan.h1, sw.a, sw.b]\n"
    err = errors(text)
    check(err, "links[0]", line_no(text, "links:") + 1, "2 items")


# --------------------------------------------------------------------------
# Attachments
# --------------------------------------------------------------------------

SIX = "appliance: edge\ndevices:\n  lan:\n    type: switch\n    ports: [h1, h2, h3, h4]\n"


def test_attach_to_missing_port():
    text = SIX + "attach:\n  lan.h1: {memory: m}\n  lan.h9: {memory: x}\n"
    err = errors(text)
    check(err, "attach.lan.h9", line_no(text, "lan.h9"), "no port", "'h9'",
          "h1, h2, h3, h4")


def test_attach_to_missing_device():
    text = SIX + "attach:\n  wan.h1: {memory: m}\n"
    err = errors(text)
    check(err, "attach.wan.h1", line_no(text, "wan.h1"), "no device", "'wan'")


def test_attach_with_no_kind():
    text = SIX + "attach:\n  lan.h1: {}\n"
    err = errors(text)
    check(err, "attach.lan.h1", line_no(text, "lan.h1"), "exactly one of",
          "memory", "pcap", "af_packet", "tap", "none")


def test_attach_with_two_kinds():
    text = SIX + "attach:\n  lan.h1:\n    memory: a\n    tap: t0\n"
    err = errors(text)
    check(err, "attach.lan.h1", line_no(text, "lan.h1"), "exactly one of",
          "got memory, tap")


def test_attach_unknown_kind():
    text = SIX + "attach:\n  lan.h1: {veth: v0}\n"
    err = errors(text)
    check(err, "attach.lan.h1.veth", line_no(text, "lan.h1"), "unknown key")


def test_attach_pcap_without_read_or_write():
    text = SIX + "attach:\n  lan.h1:\n    pcap: {}\n"
    err = errors(text)
    check(err, "attach.lan.h1.pcap", line_no(text, "pcap"), "read", "write")


@pytest.mark.parametrize("kind", ["af_packet", "tap"])
@pytest.mark.parametrize("ifname", ["veth-very-long-1", "has space", "a/b", ""])
def test_attach_bad_interface_name(kind, ifname):
    text = SIX + f"attach:\n  lan.h1:\n    {kind}: '{ifname}'\n"
    err = errors(text)
    check(err, f"attach.lan.h1.{kind}", line_no(text, kind), "interface name",
          "15 characters")


def test_attach_interface_name_of_15_characters_is_fine():
    app = parse_appliance(SIX + "attach:\n  lan.h1: {tap: veth-fifteen15}\n")
    assert app.attachments[0].spec.tap == "veth-fifteen15"


@pytest.mark.parametrize("kind", ["af_packet", "tap", "memory"])
def test_same_target_used_by_two_attachments(kind):
    text = SIX + f"attach:\n  lan.h1: {{{kind}: veth0}}\n  lan.h2: {{{kind}: veth0}}\n"
    err = errors(text)
    check(err, "attach.lan.h2", line_no(text, "lan.h2"), kind, "'veth0'", "already used",
          "attach.lan.h1")
    assert len(err.issues) == 1


def test_same_pcap_write_file_used_by_two_attachments():
    text = SIX + doc("""\
        attach:
          lan.h1: {pcap: {write: out.pcap}}
          lan.h2: {pcap: {write: other.pcap}}
          lan.h3: {pcap: {read: in.pcap, write: out.pcap}}
        """)
    err = errors(text)
    check(err, "attach.lan.h3", line_no(text, "lan.h3"), "pcap", "'out.pcap'",
          "already used", "attach.lan.h1")
    assert len(err.issues) == 1


def test_same_pcap_read_file_may_feed_two_attachments():
    app = parse_appliance(SIX + doc("""\
        attach:
          lan.h1: {pcap: {read: in.pcap}}
          lan.h2: {pcap: {read: in.pcap}}
        """))
    assert [a.ref for a in app.attachments] == ["lan.h1", "lan.h2"]


def test_same_pcap_write_file_spelled_differently():
    text = SIX + doc("""\
        attach:
          lan.h1: {pcap: {write: out.pcap}}
          lan.h2: {pcap: {write: ./out.pcap}}
        """)
    err = errors(text)
    check(err, "attach.lan.h2", line_no(text, "lan.h2"), "already used")


def test_pcap_file_read_and_written_is_rejected():
    text = SIX + doc("""\
        attach:
          lan.h1: {pcap: {read: cap.pcap, write: cap.pcap}}
        """)
    err = errors(text)
    assert paths(err) and paths(err)[0].startswith("attach.lan.h1")


def test_attach_key_that_is_not_a_port_reference():
    text = SIX + "attach:\n  lan: {memory: m}\n"
    err = errors(text)
    check(err, "attach.lan", line_no(text, "lan: {memory"), "DEVICE.PORT")


# --------------------------------------------------------------------------
# Many problems at once
# --------------------------------------------------------------------------


def test_several_problems_reported_in_one_error():
    text = doc("""\
        appliance: my edge
        colour: red
        devices:
          lan:
            type: hub
          sw:
            type: switch
            ports: [a]
            aging: -1
          fw:
            ports: [x]
        """)
    err = errors(text)
    check(err, "appliance", 1, "bad name")
    check(err, "colour", 2, "unknown key")
    check(err, "devices.lan.type", line_no(text, "type: hub"), "unknown device type")
    check(err, "devices.sw.aging", line_no(text, "aging"), "greater than 0")
    check(err, "devices.fw.type", line_no(text, "fw:"), "missing")
    assert len(err.issues) == 5
    assert err.render().splitlines()[0] == f"{SRC}: invalid appliance (5 problems)"
    assert len(err.render().splitlines()) == 6
    assert str(err) == err.render()


def test_several_switch_problems_in_one_device_all_reported():
    text = switch_doc("""\
        ports:
          h1: {vlan: 10, trunk: [20]}
          h2: {native: 5}
          h3: {vlan: 0}
          h4: {vlan: 4095}
          h5: {trunk: ["20-10"]}
          h6: {trunk: []}
        mac_table_size: 0
        aging: 0
        """)
    err = errors(text)
    check(err, "devices.lan.ports.h1", line_no(text, "h1:"), "not both")
    check(err, "devices.lan.ports.h2", line_no(text, "h2:"), "native")
    check(err, "devices.lan.ports.h3.vlan", line_no(text, "h3:"))
    check(err, "devices.lan.ports.h4.vlan", line_no(text, "h4:"))
    check(err, "devices.lan.ports.h5.trunk", line_no(text, "h5:"), "'20-10'")
    check(err, "devices.lan.ports.h6.trunk", line_no(text, "h6:"), "at least one")
    check(err, "devices.lan.mac_table_size", line_no(text, "mac_table_size"))
    check(err, "devices.lan.aging", line_no(text, "aging"))


def test_several_wiring_problems_all_reported():
    text = TWO + doc("""\
        links:
          - [lan.h1, nope.x]
          - [lan.h2, sw.zz]
          - [lan.h3, lan.h3]
          - [sw.a, lan.h2]
        attach:
          sw.a: {memory: m}
          lan.h9: {af_packet: veth0}
          sw.b: {af_packet: veth0}
        """)
    err = errors(text)
    check(err, "links[0][1]", line_no(text, "nope.x"), "no device")
    check(err, "links[1][1]", line_no(text, "sw.zz"), "no port")
    check(err, "links[2]", line_no(text, "[lan.h3, lan.h3]"), "itself")
    check(err, "links[3][1]", line_no(text, "[sw.a, lan.h2]"), "already", "links[1][0]")
    check(err, "attach.sw.a", line_no(text, "sw.a: {memory"), "already", "links[3][0]")
    check(err, "attach.lan.h9", line_no(text, "lan.h9"), "no port")
    check(err, "attach.sw.b", line_no(text, "sw.b:"), "already used", "attach.lan.h9")
    assert len(err.issues) == 7


def test_several_duplicate_keys_all_reported():
    text = doc("""\
        appliance: edge
        devices:
          lan: {type: switch, ports: [h1]}
          lan: {type: switch, ports: [h2]}
          sw: {type: switch, ports: [a]}
          sw: {type: switch, ports: [b]}
        """)
    err = errors(text)
    assert [(format_path(i.path), i.line) for i in err.issues] == [
        ("devices.lan", 4), ("devices.sw", 6)]


def test_nothing_is_built_from_an_invalid_file():
    # a valid device next to an invalid one: still an error, no partial appliance
    text = TWO + "links:\n  - [lan.h1, sw.nope]\n"
    with pytest.raises(ApplianceError):
        parse_appliance(text)


def test_top_level_problem_does_not_hide_wiring_problems():
    text = TWO + "colour: red\nlinks:\n  - [lan.h1, nope.x]\n"
    err = errors(text)
    check(err, "colour", line_no(text, "colour"), "unknown key")
    check(err, "links[0][1]", line_no(text, "nope.x"), "no device")


def test_port_option_problem_reported_once_without_union_noise():
    text = switch_doc("""\
        ports:
          h1: {vlan: 0}
        """)
    err = errors(text)
    assert paths(err) == ["devices.lan.ports.h1.vlan"]


def test_non_string_device_name_points_at_its_line():
    text = "appliance: edge\ndevices:\n  5: {type: switch, ports: [h1]}\n"
    err = errors(text)
    assert [i.line for i in err.issues] == [3]


def test_control_character_error_has_a_line():
    text = "appliance: edge\ndevices:\n  lan: {type: switch, ports: [h1\x00]}\n"
    err = errors(text)
    assert err.issues[0].line == 3
