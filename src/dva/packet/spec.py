"""The packet SPEC language: readable text <-> frame bytes.

A SPEC is either a hex frame (optional ``0x`` prefix; spaces, colons and
newlines allowed between byte pairs) or layers joined by ``/``::

    eth(dst=ff:ff:ff:ff:ff:ff,src=02:00:00:00:00:01)/vlan(vid=10)
      /ipv4(src=10.0.0.1,dst=10.0.0.2,ttl=3)/udp(sport=1000,dport=53)/raw(hex=deadbeef)

Layer names are eth, vlan (alias dot1q), arp, ipv4, ipv6, ipv6ext, tcp, udp,
icmp, icmpv6 and raw; their arguments are the keyword names of the builders in
:mod:`dva.packet.build` and everything not given is defaulted/auto-filled
exactly as the builders do.  Values are written as:

* integers: decimal or ``0x`` hex;
* MAC addresses ``aa:bb:cc:dd:ee:ff``; IPv4 / IPv6 addresses;
* bytes (``options``, ``data``, ``rest``): ``hex:0101080a`` (``0x`` or bare
  hex digits also accepted; ``hex:`` alone is empty);
* ``tcp(flags=SA)`` letters from FSRPAUECN, or an int;
  ``ipv4(flags=DF)`` names DF, MF, RB joined by ``+``, or an int;
* ``eth(pad=true)``; ``ipv6ext(kind=hop|routing|dst|frag)``;
* ``raw(hex=..)``, ``raw(text="..")`` (UTF-8; ``\\"`` and ``\\\\`` escapes) or
  ``raw(len=N)`` (N bytes counting ``i % 256``, so the content is not all zero).

Any value may be double-quoted.  :func:`parse_spec` raises only
:class:`SpecError` for bad text.

:func:`describe` renders any byte string back into this language such that
``parse_spec(describe(f)) == f`` for every ``f``.  It decodes eth, vlan (TPID
0x8100 and 0x88a8), arp, ipv4 (with options; L4 only in the first fragment),
ipv6 with extension headers, tcp, udp, icmp and icmpv6, plus IP-in-IP.
Whatever cannot be decoded ends the decoding and becomes ``raw(hex=..)``
(``raw(text="..")`` when it is printable ASCII).  Fields are written in the
builders' keyword order (for eth that is wire order, ``dst`` before ``src``);
a field is left out when the builder would produce the same bytes without it,
so defaults and correct lengths and checksums disappear, while wrong ones are
written explicitly.  A few key fields (eth dst and src, arp op, icmp/icmpv6
type, tcp flags) are always written for readability.
Zero padding that brings a frame to exactly 60 bytes is written as
``eth(pad=true)``.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import re
import struct
from typing import Any

from dva.packet.build import (
    ARP,
    ETH_MIN_FRAME,
    ICMP,
    IPV6EXT_KINDS,
    TCP,
    UDP,
    Dot1Q,
    Eth,
    ICMPv6,
    IPv4,
    IPv6,
    IPv6Ext,
    Layer,
    Raw,
    Stack,
    int_to_mac,
    ipv4_flags_names,
    ipv4_flags_value,
    mac_to_int,
    tcp_flags_letters,
    tcp_flags_value,
)

__all__ = ["SpecError", "parse_spec", "describe"]


class SpecError(ValueError):
    """Bad SPEC text; the message points at the offending part."""


# Value kinds: how an argument is parsed and how describe() renders it.
_INT, _HEX, _HEX16, _MAC, _IP4, _IP6, _BYTES = "int", "hex", "hex16", "mac", "ip4", "ip6", "bytes"
_TCPFLAGS, _IPFLAGS, _BOOL, _KIND = "tcpflags", "ipflags", "bool", "kind"
_RAWHEX, _TEXT, _RAWLEN = "rawhex", "text", "rawlen"

# Argument tables in the builders' keyword order, which describe() also uses
# (for eth that is wire order: dst before src).
_LAYERS: dict[str, tuple[type[Layer], dict[str, str]]] = {
    "eth": (Eth, {"dst": _MAC, "src": _MAC, "type": _HEX16, "pad": _BOOL}),
    "vlan": (Dot1Q, {"vid": _INT, "pcp": _INT, "dei": _INT, "type": _HEX16, "tpid": _HEX16}),
    "arp": (ARP, {"op": _INT, "hwsrc": _MAC, "psrc": _IP4, "hwdst": _MAC, "pdst": _IP4}),
    "ipv4": (
        IPv4,
        {
            "src": _IP4, "dst": _IP4, "ttl": _INT, "proto": _INT, "tos": _HEX, "id": _INT,
            "flags": _IPFLAGS, "frag": _INT, "options": _BYTES, "ihl": _INT, "len": _INT,
            "chksum": _HEX16,
        },
    ),
    "ipv6": (
        IPv6,
        {"src": _IP6, "dst": _IP6, "hlim": _INT, "nh": _INT, "tc": _HEX, "fl": _HEX, "plen": _INT},
    ),
    "ipv6ext": (
        IPv6Ext,
        {
            "kind": _KIND, "nh": _INT, "data": _BYTES, "offset": _INT, "m": _INT,
            "ident": _HEX, "res1": _INT, "res2": _INT,
        },
    ),
    "tcp": (
        TCP,
        {
            "sport": _INT, "dport": _INT, "seq": _INT, "ack": _INT, "flags": _TCPFLAGS,
            "window": _INT, "options": _BYTES, "dataofs": _INT, "chksum": _HEX16,
            "urgptr": _INT, "reserved": _INT,
        },
    ),
    "udp": (UDP, {"sport": _INT, "dport": _INT, "len": _INT, "chksum": _HEX16}),
    "icmp": (
        ICMP,
        {"type": _INT, "code": _INT, "id": _INT, "seq": _INT, "chksum": _HEX16, "rest": _BYTES},
    ),
    "icmpv6": (
        ICMPv6,
        {"type": _INT, "code": _INT, "id": _INT, "seq": _INT, "chksum": _HEX16, "rest": _BYTES},
    ),
    "raw": (Raw, {"hex": _RAWHEX, "text": _TEXT, "len": _RAWLEN}),
}
_ALIASES = {"dot1q": "vlan"}
_KNOWN = ", ".join(_LAYERS)
# Written by describe() even when default: they say what the packet *is*.
_ALWAYS = {"eth": {"dst", "src"}, "arp": {"op"}, "icmp": {"type"}, "icmpv6": {"type"}, "tcp": {"flags"}}
_RAW_LEN_MAX = 1 << 20  # raw(len=N) bigger than any sane frame is a typo, not a request

_INT_RE = re.compile(r"0[xX][0-9a-fA-F]+|[0-9]+")
_HEXDIGITS_RE = re.compile(r"[0-9a-fA-F]*")
_IDENT_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_BARE_STOP = set(",()/=\"") | set(" \t\r\n\f\v")


def _required(cls: type[Layer]) -> list[str]:
    return [
        f.name
        for f in dataclasses.fields(cls)
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]


# --------------------------------------------------------------------------
# value conversion


def _q(s: str) -> str:
    return repr(_short(s, 40))


def _to_int(s: str) -> int:
    if not _INT_RE.fullmatch(s):
        raise ValueError(f"bad integer {_q(s)} (decimal or 0x hex)")
    try:
        return int(s, 0) if s[:2] in ("0x", "0X") else int(s, 10)
    except ValueError:  # e.g. more digits than int() accepts
        raise ValueError(f"bad integer {_q(s)}") from None


def _to_hex_bytes(s: str, what: str) -> bytes:
    digits = s[2:] if s[:2] in ("0x", "0X") else s
    if not _HEXDIGITS_RE.fullmatch(digits):
        raise ValueError(f"bad hex {_q(s)} for {what}")
    if len(digits) % 2:
        raise ValueError(f"odd number of hex digits in {_q(s)} for {what}")
    return bytes.fromhex(digits)


def _convert(kind: str, s: str, what: str) -> Any:
    if kind in (_INT, _HEX, _HEX16):
        return _to_int(s)
    if kind == _MAC:
        try:
            return int_to_mac(mac_to_int(s))
        except ValueError:
            raise ValueError(f"bad MAC address {_q(s)}") from None
    if kind == _IP4:
        try:
            return ipaddress.IPv4Address(s)
        except ValueError:
            raise ValueError(f"bad IPv4 address {_q(s)}") from None
    if kind == _IP6:
        try:
            return ipaddress.IPv6Address(s)
        except ValueError:
            raise ValueError(f"bad IPv6 address {_q(s)}") from None
    if kind == _BYTES:
        return _to_hex_bytes(s[4:] if s[:4].lower() == "hex:" else s, what)
    if kind == _TCPFLAGS:
        if s == "":
            return 0
        if _INT_RE.fullmatch(s):
            return _to_int(s)
        tcp_flags_value(s)  # validates the letters with a clear message
        return s
    if kind == _IPFLAGS:
        if _INT_RE.fullmatch(s):
            return _to_int(s)
        ipv4_flags_value(s)
        return s
    if kind == _BOOL:
        low = s.lower()
        if low in ("true", "1", "yes"):
            return True
        if low in ("false", "0", "no"):
            return False
        raise ValueError(f"bad boolean {_q(s)} (true/false)")
    if kind == _KIND:
        if s not in IPV6EXT_KINDS:
            raise ValueError(f"bad kind {_q(s)}; one of " + ", ".join(IPV6EXT_KINDS))
        return s
    if kind == _RAWHEX:
        return _to_hex_bytes(s, what)
    if kind == _TEXT:
        try:
            return s.encode("utf-8")
        except UnicodeError:
            raise ValueError(f"text {_q(s)} is not encodable as UTF-8") from None
    if kind == _RAWLEN:
        n = _to_int(s)
        if n > _RAW_LEN_MAX:
            raise ValueError(f"raw len={n} too large (max {_RAW_LEN_MAX})")
        return (bytes(range(256)) * (n // 256 + 1))[:n]
    raise AssertionError(kind)


# --------------------------------------------------------------------------
# parsing


_HEX_SEP_RE = re.compile(r"[\s:]+")


def _parse_hex_frame(text: str) -> bytes:
    body = text.strip()
    if body[:2] in ("0x", "0X"):
        body = body[2:]
    out = bytearray()
    for chunk in _HEX_SEP_RE.split(body):
        if not chunk:
            continue
        if not _HEXDIGITS_RE.fullmatch(chunk):
            raise SpecError(
                f"at {_short(chunk)!r}: not a hex frame (and no 'layer(...)' found); "
                f"known layers: {_KNOWN}"
            )
        if len(chunk) % 2:
            raise SpecError(f"at {_short(chunk)!r}: hex frame needs an even number of hex digits")
        out += bytes.fromhex(chunk)
    return bytes(out)


def _short(s: str, limit: int = 60) -> str:
    if len(s) <= limit:
        return s
    half = (limit - 3) // 2
    return s[:half] + "..." + s[-half:]


class _Parser:
    def __init__(self, text: str) -> None:
        self.text = text
        self.pos = 0
        self.layer_start = 0

    def error(self, message: str, end: int | None = None) -> SpecError:
        ctx = self.text[self.layer_start : self.pos if end is None else end]
        return SpecError(f"at {_short(ctx.strip())!r}: {message}")

    def skip_ws(self) -> None:
        while self.pos < len(self.text) and self.text[self.pos].isspace():
            self.pos += 1

    def peek(self) -> str:
        return self.text[self.pos] if self.pos < len(self.text) else ""

    def ident(self, what: str) -> str:
        m = _IDENT_RE.match(self.text, self.pos)
        if not m:
            got = self.peek()
            raise self.error(f"expected {what}, got " + (repr(got) if got else "end of spec"),
                             self.pos + 1)
        self.pos = m.end()
        return m.group()

    def expect(self, ch: str, what: str) -> None:
        self.skip_ws()
        if self.peek() != ch:
            got = self.peek()
            raise self.error(f"expected {what}, got " + (repr(got) if got else "end of spec"),
                             self.pos + 1)
        self.pos += 1

    def value(self) -> str:
        if self.peek() == '"':
            self.pos += 1
            out = []
            while True:
                if self.pos >= len(self.text):
                    raise self.error("unterminated quoted string")
                ch = self.text[self.pos]
                if ch == '"':
                    self.pos += 1
                    return "".join(out)
                if ch == "\\":
                    nxt = self.text[self.pos + 1 : self.pos + 2]
                    if nxt not in ('"', "\\"):
                        raise self.error(f"bad escape '\\{nxt}' (only \\\" and \\\\)", self.pos + 2)
                    out.append(nxt)
                    self.pos += 2
                    continue
                out.append(ch)
                self.pos += 1
        start = self.pos
        while self.pos < len(self.text) and self.text[self.pos] not in _BARE_STOP:
            self.pos += 1
        return self.text[start : self.pos]

    def layer(self) -> Layer:
        self.skip_ws()
        self.layer_start = self.pos
        name = self.ident("a layer name")
        key = _ALIASES.get(name, name)
        if key not in _LAYERS:
            raise SpecError(f"unknown layer {name!r}; known: {_KNOWN}")
        cls, kinds = _LAYERS[key]
        self.expect("(", f"'(' after {name!r}")
        args: dict[str, Any] = {}
        self.skip_ws()
        if self.peek() == ")":
            self.pos += 1
        else:
            while True:
                self.skip_ws()
                arg = self.ident("an argument name")
                if arg not in kinds:
                    raise self.error(
                        f"unknown argument {arg!r} for {key}; valid: " + ", ".join(kinds)
                    )
                if arg in args:
                    raise self.error(f"duplicate argument {arg!r} for {key}")
                self.expect("=", f"'=' after {arg!r}")
                self.skip_ws()
                raw_value = self.value()
                try:
                    args[arg] = _convert(kinds[arg], raw_value, f"{key}.{arg}")
                except ValueError as e:
                    raise self.error(str(e)) from None
                self.skip_ws()
                if self.peek() == ",":
                    self.pos += 1
                    continue
                self.expect(")", "',' or ')'")
                break
        return self.make(key, cls, args)

    def make(self, key: str, cls: type[Layer], args: dict[str, Any]) -> Layer:
        if key == "raw":
            if len(args) != 1:
                raise self.error("raw needs exactly one of hex=, text=, len=")
            return Raw(next(iter(args.values())))
        missing = [n for n in _required(cls) if n not in args]
        if missing:
            raise self.error(f"{key} needs " + ", ".join(f"{n}=" for n in missing))
        try:
            return cls(**args)
        except (ValueError, TypeError, OverflowError) as e:
            raise self.error(str(e)) from None

    def parse(self) -> bytes:
        layers = [self.layer()]
        while True:
            self.skip_ws()
            if self.pos >= len(self.text):
                break
            self.layer_start = self.pos
            self.expect("/", "'/' between layers")
            layers.append(self.layer())
        try:
            return bytes(Stack(tuple(layers)))
        except (ValueError, TypeError, OverflowError, struct.error) as e:
            raise SpecError(f"cannot build frame: {e}") from None


def parse_spec(text: str) -> bytes:
    """Parse SPEC text (hex frame or layer form) into frame bytes."""
    if not isinstance(text, str):
        raise SpecError(f"spec must be a str, got {type(text).__name__}")
    if not text.strip():
        raise SpecError("empty spec")
    if "(" not in text:
        return _parse_hex_frame(text)
    return _Parser(text).parse()


# --------------------------------------------------------------------------
# describe: decoding


Fields = dict[str, Any]


class _Entry:
    """One decoded layer: spec name, all fields explicit, and where it starts."""

    __slots__ = ("name", "fields", "start")

    def __init__(self, name: str, fields: Fields, start: int) -> None:
        self.name, self.fields, self.start = name, fields, start


_BY_ETHERTYPE = {0x8100: "vlan", 0x88A8: "vlan", 0x0806: "arp", 0x0800: "ipv4", 0x86DD: "ipv6"}
_BY_IPPROTO4 = {6: "tcp", 17: "udp", 1: "icmp", 4: "ipv4", 41: "ipv6"}
_BY_IPPROTO6 = {6: "tcp", 17: "udp", 58: "icmpv6", 4: "ipv4", 41: "ipv6",
                **{v: "ipv6ext" for v in IPV6EXT_KINDS.values()}}
_EXT_KIND = {v: k for k, v in IPV6EXT_KINDS.items()}


def _mac(b: bytes) -> str:
    return ":".join(f"{x:02x}" for x in b)


def _decode(frame: bytes) -> tuple[list[_Entry], int, int]:
    """Decode as many layers as possible.

    Returns the entries, the offset where decoding stopped and the end of the
    innermost length-delimited region (bytes past it are link-layer trailer).
    """
    n = len(frame)
    if n < 14:
        return [], 0, n
    etype = int.from_bytes(frame[12:14], "big")
    entries = [_Entry("eth", {"dst": _mac(frame[0:6]), "src": _mac(frame[6:12]),
                              "type": etype, "pad": False}, 0)]
    off, end = 14, n
    nxt = _BY_ETHERTYPE.get(etype)
    prev_type = etype
    while nxt:
        avail = end - off
        b = frame[off:end]
        if nxt == "vlan":
            if avail < 4:
                break
            tci, t = struct.unpack("!HH", b[:4])
            entries.append(_Entry("vlan", {"pcp": tci >> 13, "dei": tci >> 12 & 1,
                                           "vid": tci & 0xFFF, "type": t,
                                           "tpid": prev_type}, off))
            off += 4
            prev_type = t
            nxt = _BY_ETHERTYPE.get(t)
        elif nxt == "arp":
            if avail < 28 or b[:6] != b"\x00\x01\x08\x00\x06\x04":
                break
            entries.append(_Entry("arp", {
                "op": int.from_bytes(b[6:8], "big"), "hwsrc": _mac(b[8:14]),
                "psrc": ipaddress.IPv4Address(b[14:18]), "hwdst": _mac(b[18:24]),
                "pdst": ipaddress.IPv4Address(b[24:28])}, off))
            off += 28
            end = off  # ARP has no length field: anything after it is trailer
            nxt = None
        elif nxt == "ipv4":
            if avail < 20 or b[0] >> 4 != 4:
                break
            ihl = b[0] & 0xF
            hlen = ihl * 4
            if ihl < 5 or hlen > avail:
                break
            (_, tos, total, ident, ff, ttl, proto, chk) = struct.unpack("!BBHHHBBH", b[:12])
            entries.append(_Entry("ipv4", {
                "ihl": ihl, "tos": tos, "len": total, "id": ident, "flags": ff >> 13,
                "frag": ff & 0x1FFF, "ttl": ttl, "proto": proto, "chksum": chk,
                "src": ipaddress.IPv4Address(b[12:16]), "dst": ipaddress.IPv4Address(b[16:20]),
                "options": b[20:hlen]}, off))
            end = off + min(max(total, hlen), avail)
            off += hlen
            # Later fragments carry no L4 header.
            nxt = _BY_IPPROTO4.get(proto) if ff & 0x1FFF == 0 else None
        elif nxt == "ipv6":
            if avail < 40 or b[0] >> 4 != 6:
                break
            first, plen, nh, hlim = struct.unpack("!IHBB", b[:8])
            entries.append(_Entry("ipv6", {
                "tc": first >> 20 & 0xFF, "fl": first & 0xFFFFF, "plen": plen, "nh": nh,
                "hlim": hlim, "src": ipaddress.IPv6Address(b[8:24]),
                "dst": ipaddress.IPv6Address(b[24:40])}, off))
            end = off + 40 + min(plen, avail - 40)
            off += 40
            nxt = _BY_IPPROTO6.get(nh)
            prev_type = nh
        elif nxt == "ipv6ext":
            kind = _EXT_KIND[prev_type]
            if kind == "frag":
                if avail < 8:
                    break
                nh, res1, fo, ident = struct.unpack("!BBHI", b[:8])
                entries.append(_Entry("ipv6ext", {
                    "kind": kind, "nh": nh, "res1": res1, "offset": fo >> 3,
                    "res2": fo >> 1 & 3, "m": fo & 1, "ident": ident}, off))
                off += 8
                nxt = _BY_IPPROTO6.get(nh) if fo >> 3 == 0 else None
            else:
                if avail < 2 or 8 * (b[1] + 1) > avail:
                    break
                hlen = 8 * (b[1] + 1)
                nh = b[0]
                entries.append(_Entry("ipv6ext", {"kind": kind, "nh": nh, "data": b[2:hlen]}, off))
                off += hlen
                nxt = _BY_IPPROTO6.get(nh)
            prev_type = nh
        elif nxt == "tcp":
            dataofs = b[12] >> 4 if avail >= 20 else 0
            if dataofs < 5 or dataofs * 4 > avail:
                break
            sport, dport, seq, ack, x, fl, win, chk, urg = struct.unpack("!HHIIBBHHH", b[:20])
            entries.append(_Entry("tcp", {
                "sport": sport, "dport": dport, "seq": seq, "ack": ack, "dataofs": dataofs,
                "reserved": x >> 1 & 7, "flags": (x & 1) << 8 | fl, "window": win,
                "chksum": chk, "urgptr": urg, "options": b[20 : dataofs * 4]}, off))
            off += dataofs * 4
            nxt = None
        elif nxt == "udp":
            if avail < 8:
                break
            sport, dport, ulen, chk = struct.unpack("!HHHH", b[:8])
            entries.append(_Entry("udp", {"sport": sport, "dport": dport, "len": ulen,
                                          "chksum": chk}, off))
            off += 8
            nxt = None
        elif nxt in ("icmp", "icmpv6"):
            if avail < 8:
                break
            typ, code, chk = struct.unpack("!BBH", b[:4])
            fields: Fields = {"type": typ, "code": code, "chksum": chk}
            if typ in ((0, 8) if nxt == "icmp" else (128, 129)):
                fields["id"], fields["seq"] = struct.unpack("!HH", b[4:8])
            else:
                fields["rest"] = b[4:8]
            entries.append(_Entry(nxt, fields, off))
            off += 8
            nxt = None
        else:  # pragma: no cover - every name above is handled
            raise AssertionError(nxt)
    return entries, off, end


# --------------------------------------------------------------------------
# describe: minimising and rendering


def _layer(name: str, fields: Fields) -> Layer:
    if name == "raw":
        return Raw(fields["data"])
    return _LAYERS[name][0](**fields)


def _build(entries: list[tuple[str, Fields]]) -> bytes | None:
    try:
        return bytes(Stack(tuple(_layer(n, f) for n, f in entries)))
    except (ValueError, TypeError, OverflowError, struct.error):
        return None


def _with_raw(entries: list[tuple[str, Fields]], data: bytes) -> list[tuple[str, Fields]]:
    return entries + [("raw", {"data": data})] if data else entries


def _candidates(frame: bytes) -> list[list[tuple[str, Fields]]]:
    """Fully explicit layer lists to try, most decoded (and most readable) first."""
    decoded, off, end = _decode(frame)
    plain = [(e.name, dict(e.fields)) for e in decoded]
    out = []
    trailer = frame[end:]
    if (decoded and len(frame) == ETH_MIN_FRAME and trailer and not any(trailer)):
        padded = [(n, dict(f)) for n, f in plain]
        padded[0][1]["pad"] = True
        out.append(_with_raw(padded, frame[off:end]))
    out.append(_with_raw(plain, frame[off:]))
    # Safety net: should a decoder ever disagree with the builder, give up
    # layers from the inside out rather than break the round trip.
    for k in range(len(decoded) - 1, -1, -1):
        out.append(_with_raw(plain[:k], frame[decoded[k].start :]))
    return out


def _eol_start(opts: bytes) -> int:
    """IPv4/TCP options: offset of the End-of-List option, else ``len(opts)``."""
    i = 0
    while i < len(opts):
        kind = opts[i]
        if kind == 0:
            return i
        if kind == 1:  # NOP
            i += 1
            continue
        if i + 1 >= len(opts) or opts[i + 1] < 2:
            break
        i += opts[i + 1]
    return len(opts)


def _pad_run_start(opts: bytes) -> int:
    """IPv6 options: offset of the trailing run of Pad1/PadN, else ``len(opts)``."""
    i, start = 0, None
    while i < len(opts):
        kind = opts[i]
        if kind == 0:  # Pad1 is a lone byte
            step = 1
        elif i + 1 < len(opts):
            step = 2 + opts[i + 1]
        else:
            return len(opts)
        if kind in (0, 1):
            start = i if start is None else start
        else:
            start = None
        i += step
    return start if start is not None and i == len(opts) else len(opts)


def _trim(entries: list[tuple[str, Fields]], fields: Fields, key: str, frame: bytes) -> None:
    """Drop trailing option padding when the builder re-creates the same bytes.

    Options are walked as TLVs so that zero bytes inside a real option (e.g.
    the value of a Router Alert) are never mistaken for padding.
    """
    data = fields[key]
    cut = _eol_start(data) if key == "options" else _pad_run_start(data)
    if cut < len(data):
        fields[key] = data[:cut]
        if _build(entries) != frame:
            fields[key] = data


def _minimise(entries: list[tuple[str, Fields]], frame: bytes) -> None:
    for name, fields in entries:
        if name == "raw":
            continue
        keep = _ALWAYS.get(name, set()) | set(_required(_LAYERS[name][0]))
        for key in list(fields):
            if key in keep:
                continue
            value = fields.pop(key)
            if _build(entries) != frame:
                fields[key] = value
        # Drop trailing padding the builder re-creates by itself: zeros after
        # IPv4/TCP options, Pad1/PadN after IPv6 hop-by-hop/destination options.
        if name in ("ipv4", "tcp") and "options" in fields:
            _trim(entries, fields, "options", frame)
        elif name == "ipv6ext" and fields.get("kind") in ("hop", "dst") and "data" in fields:
            _trim(entries, fields, "data", frame)
        # Restore the canonical order after pops and re-inserts.
        order = list(_LAYERS[name][1])
        fields_sorted = sorted(fields.items(), key=lambda kv: order.index(kv[0]))
        fields.clear()
        fields.update(fields_sorted)


def _render_value(kind: str, value: Any) -> str:
    if kind == _HEX16:
        return f"0x{value:04x}"
    if kind == _HEX:
        return f"0x{value:x}"
    if kind == _BYTES:
        return "hex:" + value.hex()
    if kind == _TCPFLAGS:
        return tcp_flags_letters(value) or "0"
    if kind == _IPFLAGS:
        return ipv4_flags_names(value) or "0"
    if kind == _BOOL:
        return "true" if value else "false"
    return str(value)


def _render_raw(data: bytes) -> str:
    if len(data) >= 4 and all(0x20 <= c < 0x7F for c in data):
        text = data.decode("ascii").replace("\\", "\\\\").replace('"', '\\"')
        return f'raw(text="{text}")'
    return f"raw(hex={data.hex()})"


def describe(frame: bytes) -> str:
    """Render frame bytes as SPEC text; ``parse_spec(describe(f)) == f`` always."""
    frame = bytes(frame)
    for entries in _candidates(frame):
        if _build(entries) == frame:
            break
    else:  # pragma: no cover - the bare raw candidate always matches
        entries = [("raw", {"data": frame})]
    _minimise(entries, frame)
    parts = []
    for name, fields in entries:
        if name == "raw":
            parts.append(_render_raw(fields["data"]))
            continue
        kinds = _LAYERS[name][1]
        args = ",".join(f"{k}={_render_value(kinds[k], v)}" for k, v in fields.items())
        parts.append(f"{name}({args})")
    return "/".join(parts) if parts else "raw(hex=)"
