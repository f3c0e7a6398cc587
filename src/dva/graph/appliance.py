"""Appliance files: load, validate whole, and build the device graph.

The file format is the user contract of ARCHITECTURE.md::

    appliance: edge          # name, unique per tenant
    tenant: acme             # optional, default "default"
    devices: {NAME: {type: TYPE, ...device config...}}
    links: [[DEV.PORT, DEV.PORT], ...]     # bidirectional
    attach: {DEV.PORT: {memory: NAME} | {pcap: {read: F, write: F}}
                       | {af_packet: IFNAME} | {tap: IFNAME}}

Every problem is reported with the file, the line, the path in the document (e.g.
``devices.r1.ports.lan.ip``) and what is wrong; all problems are reported at once.
Nothing is built from an invalid file.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path as FsPath
from typing import Annotated, Any

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    TypeAdapter,
    ValidationError,
    model_validator,
)

from dva.graph.yamlsrc import SourceIssue, YamlDoc, YamlSourceError, load_yaml
from dva.nf import registry
from dva.nf.base import NAME_RE, Device, Name

PORTREF_RE = NAME_RE[:-1] + r"\." + NAME_RE[1:]
PortRef = Annotated[str, StringConstraints(pattern=PORTREF_RE)]
IFNAME_RE = r"^[A-Za-z0-9_.:@-]{1,15}$"  # Linux IFNAMSIZ - 1, no '/' or spaces
IfName = Annotated[str, StringConstraints(pattern=IFNAME_RE)]


class PcapSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    read: str | None = None
    write: str | None = None

    @model_validator(mode="after")
    def _some(self) -> PcapSpec:
        if self.read is None and self.write is None:
            raise ValueError("a pcap attachment needs 'read', 'write' or both")
        return self


ATTACH_KINDS = ("memory", "pcap", "af_packet", "tap")


class AttachSpec(BaseModel):
    """How a device port meets the outside world: exactly one kind."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    memory: Name | None = None
    pcap: PcapSpec | None = None
    af_packet: IfName | None = None
    tap: IfName | None = None

    @model_validator(mode="after")
    def _one(self) -> AttachSpec:
        given = [k for k in ATTACH_KINDS if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"exactly one of {', '.join(ATTACH_KINDS)} (got "
                             f"{', '.join(given) or 'none'})")
        return self

    @property
    def kind(self) -> str:
        return next(k for k in ATTACH_KINDS if getattr(self, k) is not None)

    @property
    def target(self) -> Any:
        return getattr(self, self.kind)


class ApplianceModel(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    appliance: Name
    tenant: Name = "default"
    devices: dict[Name, dict[str, Any]] = Field(min_length=1)
    links: list[tuple[PortRef, PortRef]] = []
    attach: dict[PortRef, AttachSpec] = {}


@dataclass(frozen=True)
class Attachment:
    device: str
    port: str
    spec: AttachSpec

    @property
    def ref(self) -> str:
        return f"{self.device}.{self.port}"


@dataclass
class Appliance:
    """A validated appliance: its devices (built), links and attachments."""

    name: str
    tenant: str
    devices: dict[str, Device]
    links: list[tuple[tuple[str, str], tuple[str, str]]]
    attachments: list[Attachment]
    source: str = "<string>"
    base_dir: FsPath = field(default_factory=FsPath.cwd)
    warnings: list[str] = field(default_factory=list)

    @property
    def qualified_name(self) -> str:
        return f"{self.tenant}/{self.name}"

    def resolve(self, path: str) -> FsPath:
        """A file named in the appliance file, relative to the file's folder."""
        p = FsPath(path)
        return p if p.is_absolute() else self.base_dir / p


class ApplianceError(ValueError):
    """An invalid appliance file; ``issues`` lists every problem found."""

    def __init__(self, source: str, issues: list[SourceIssue]) -> None:
        self.source = source
        self.issues = issues
        super().__init__(self.render())

    def render(self) -> str:
        lines = [f"{self.source}: invalid appliance ({len(self.issues)} "
                 f"problem{'s' if len(self.issues) != 1 else ''})"]
        for i in self.issues:
            where = self.source + (f":{i.line}" if i.line else "")
            path = format_path(i.path)
            lines.append(f"  {where}: {path + ': ' if path else ''}{i.message}")
        return "\n".join(lines)


def format_path(path) -> str:
    out = ""
    for p in path:
        if isinstance(p, int):
            out += f"[{p}]"
        else:
            out += ("." if out else "") + str(p)
    return out


def _pydantic_issues(err: ValidationError, prefix: tuple, doc: YamlDoc,
                     data: Any) -> list[SourceIssue]:
    """Issues from a pydantic error of validating ``data`` found at ``prefix``."""
    issues = []
    for e in err.errors(include_url=False):
        if _wrong_union_branch(e["loc"], data):
            continue
        loc = prefix + tuple(x for x in e["loc"] if not _is_union_tag(x))
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown key"
        elif e["type"] == "missing":
            msg = "required key missing"
        elif e["type"] == "string_pattern_mismatch":
            msg = f"bad name {e.get('input')!r}: " + _pattern_hint(e["ctx"]["pattern"])
        elif msg.startswith("Value error, "):
            msg = msg[len("Value error, "):]
        issues.append(SourceIssue(loc, msg, doc.line_of(loc)))
    return _dedupe(issues)


def _is_union_tag(x) -> bool:
    # pydantic names union members in locations (e.g. 'list[...]'); users never see those
    return isinstance(x, str) and ("[" in x or x in ("str", "int", "function-after"))


def _wrong_union_branch(loc: tuple, data: Any) -> bool:
    """True for an error of the list branch of a list|dict union given a dict (and
    vice versa): the user wrote the other form, that branch's complaint is noise."""
    cur = data
    for x in loc:
        if isinstance(x, str) and x.startswith("list["):
            return not isinstance(cur, list)
        if isinstance(x, str) and x.startswith("dict["):
            return not isinstance(cur, dict)
        if _is_union_tag(x):
            continue
        try:
            cur = cur[x]
        except (KeyError, IndexError, TypeError):
            return False
    return False


def _pattern_hint(pattern: str) -> str:
    if pattern == PORTREF_RE:
        return "expected DEVICE.PORT (letters, digits, '_' or '-', starting with a letter)"
    if pattern == IFNAME_RE:
        return "expected an interface name of at most 15 characters"
    return "names start with a letter and hold letters, digits, '_' or '-' (32 at most)"


def _dedupe(issues: list[SourceIssue]) -> list[SourceIssue]:
    seen, out = set(), []
    for i in issues:
        k = (i.path, i.message)
        if k not in seen:
            seen.add(k)
            out.append(i)
    return out


def load_appliance(path: str | FsPath) -> Appliance:
    p = FsPath(path)
    try:
        text = p.read_text()
    except OSError as e:
        raise ApplianceError(str(p), [SourceIssue((), f"cannot read: {e.strerror}")]) \
            from None
    except UnicodeDecodeError:
        raise ApplianceError(str(p), [SourceIssue((), "not a text (UTF-8) file")]) from None
    return parse_appliance(text, source=str(p), base_dir=p.resolve().parent)


def parse_appliance(text: str, source: str = "<string>",
                    base_dir: FsPath | None = None) -> Appliance:
    try:
        doc = load_yaml(text)
    except YamlSourceError as e:
        raise ApplianceError(source, e.issues) from None
    if not isinstance(doc.data, dict):
        raise ApplianceError(source, [SourceIssue((), "expected a mapping with keys "
                                                  "appliance, devices, links, attach", 1)])
    issues: list[SourceIssue] = []
    try:
        model = ApplianceModel.model_validate(doc.data)
        parts = (model.devices, model.links, model.attach)
    except ValidationError as e:
        # Keep going with the parts that are valid, so one run reports everything.
        issues += _pydantic_issues(e, (), doc, doc.data)
        raw = doc.data.get("devices")
        parts = (raw if isinstance(raw, dict) else {},
                 _valid_part("links", doc.data.get("links", [])),
                 _valid_part("attach", doc.data.get("attach", {})))
        model = None
    devs, links_in, attach_in = parts
    devices, dev_issues = _device_issues(devs if isinstance(devs, dict) else {}, doc)
    # A device's own check says more than the file-level one at the same path.
    mine = {i.path for i in dev_issues}
    issues = [i for i in issues if i.path not in mine] + dev_issues
    names = set(devs) if isinstance(devs, dict) else set()
    base = base_dir or FsPath.cwd()
    links, attachments, warnings, wire_issues = _wire(links_in, attach_in, devices, names,
                                                      doc, base)
    issues += wire_issues
    if issues or model is None:
        raise ApplianceError(source, _dedupe(issues))
    return Appliance(model.appliance, model.tenant, devices, links, attachments, source,
                     base, warnings)


def _valid_part(name: str, value: Any) -> Any:
    """The ``name`` part of an invalid document if that part alone is valid, else empty."""
    field = ApplianceModel.model_fields[name]
    try:
        return TypeAdapter(field.annotation).validate_python(value)
    except ValidationError:
        return type(field.default)()


def _device_issues(devs: dict, doc: YamlDoc) -> tuple[dict[str, Device], list[SourceIssue]]:
    devices: dict[str, Device] = {}
    issues: list[SourceIssue] = []
    for name, body in devs.items():
        loc = ("devices", name)
        if not isinstance(body, dict):
            issues.append(SourceIssue(loc, "expected a mapping with a 'type'",
                                      doc.line_of(loc)))
            continue
        tname = body.get("type")
        if tname is None:
            issues.append(SourceIssue(loc + ("type",), "required key missing",
                                      doc.line_of(loc)))
            continue
        cls = registry.get(tname) if isinstance(tname, str) else None
        if cls is None:
            issues.append(SourceIssue(loc + ("type",), f"unknown device type {tname!r}; "
                                      f"known: {', '.join(registry.names())}",
                                      doc.line_of(loc + ("type",))))
            continue
        try:
            cfg = cls.config_model.model_validate(body)
        except ValidationError as e:
            issues += _pydantic_issues(e, loc, doc, body)
            continue
        try:
            devices[name] = cls(name, cfg)
        except ValueError as e:
            issues.append(SourceIssue(loc, str(e), doc.line_of(loc)))
    return devices, issues


def _wire(links_in, attach_in, devices: dict[str, Device], names: set, doc: YamlDoc,
          base: FsPath):
    """Check links and attachments. Endpoints on a device that exists in the file but
    is invalid are skipped (its own problems are already reported)."""
    issues: list[SourceIssue] = []
    used: dict[tuple[str, str], str] = {}  # endpoint -> where it is used

    def endpoint(ref: str, loc: tuple) -> tuple[str, str] | None:
        dev, port = ref.split(".")
        d = devices.get(dev)
        if d is None:
            if dev not in names:
                issues.append(SourceIssue(loc, f"no device {dev!r} (devices: "
                                          f"{', '.join(map(str, names))})", doc.line_of(loc)))
            return None
        if port not in d.port_index:
            issues.append(SourceIssue(loc, f"device {dev} ({d.type_name}) has no port "
                                      f"{port!r}; its ports: {', '.join(d.ports)}",
                                      doc.line_of(loc)))
            return None
        ep = (dev, port)
        if ep in used:
            issues.append(SourceIssue(loc, f"port {ref} is already bound at {used[ep]}",
                                      doc.line_of(loc)))
            return None
        used[ep] = format_path(loc)
        return ep

    links = []
    for i, (a, b) in enumerate(links_in):
        loc = ("links", i)
        if a == b:
            issues.append(SourceIssue(loc, f"a port cannot be linked to itself ({a})",
                                      doc.line_of(loc)))
            continue
        ea, eb = endpoint(a, loc + (0,)), endpoint(b, loc + (1,))
        if ea and eb:
            links.append((ea, eb))

    attachments = []
    targets: dict[tuple[str, str], str] = {}  # (what, name) -> attachment using it
    reads: dict[str, str] = {}

    def claim(key: tuple[str, str], what: str, loc: tuple) -> None:
        if key in targets:
            issues.append(SourceIssue(loc, f"{what} is already used by {targets[key]}",
                                      doc.line_of(loc)))
        else:
            targets[key] = format_path(loc)

    for ref, spec in attach_in.items():
        loc = ("attach", ref)
        ep = endpoint(ref, loc)
        if spec.kind == "pcap":
            r = _norm(base, spec.pcap.read) if spec.pcap.read else None
            w = _norm(base, spec.pcap.write) if spec.pcap.write else None
            if r:
                reads.setdefault(r, format_path(loc))
            if w:
                claim(("pcap file", w), f"pcap file {spec.pcap.write!r}", loc)
        elif spec.kind in ("af_packet", "tap"):
            claim(("interface", spec.target), f"{spec.kind} interface {spec.target!r}", loc)
        else:
            claim((spec.kind, spec.target), f"{spec.kind} {spec.target!r}", loc)
        if ep:
            attachments.append(Attachment(ep[0], ep[1], spec))
    for (what, path), where in targets.items():
        if what == "pcap file" and path in reads:
            loc = ("attach", where.split(".", 1)[1])
            issues.append(SourceIssue(loc, f"pcap file {path!r} is both read (by "
                                      f"{reads[path]}) and written: writing would destroy "
                                      f"the input", doc.line_of(loc)))

    warnings = []
    for name, d in devices.items():
        for p in d.ports:
            if (name, p) not in used:
                warnings.append(f"port {name}.{p} is neither linked nor attached: packets "
                                f"sent there are dropped (counted as unconnected)")
    return links, attachments, warnings, issues


def _norm(base: FsPath, path: str) -> str:
    p = FsPath(path)
    return os.path.normpath(p if p.is_absolute() else base / p)
