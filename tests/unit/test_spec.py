"""Tests for dva.packet.spec: SPEC parsing, describe(), and their round trip."""

from __future__ import annotations

import re

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from dva.packet.build import (
    ARP,
    ICMP,
    TCP,
    UDP,
    Dot1Q,
    Eth,
    ICMPv6,
    IPv4,
    IPv6,
    IPv6Ext,
    Raw,
)
from dva.packet.spec import SpecError, describe, parse_spec

SRC, DST = "02:00:00:00:00:01", "ff:ff:ff:ff:ff:ff"
ETH = f"eth(dst={DST},src={SRC})"

# Specs that describe() must reproduce verbatim: the canonical, readable form.
CANONICAL = [
    f"{ETH}/arp(op=1,hwsrc=02:00:00:00:00:01,psrc=10.0.0.1,pdst=10.0.0.2)",
    "eth(dst=00:11:22:33:44:55,src=02:00:00:00:00:01,pad=true)"
    "/arp(op=2,hwsrc=02:00:00:00:00:01,psrc=10.0.0.1,hwdst=00:11:22:33:44:55,pdst=10.0.0.2)",
    f"{ETH}/vlan(vid=10)/ipv4(src=10.0.0.1,dst=10.0.0.2,ttl=3)/udp(sport=1000,dport=53)"
    "/raw(hex=deadbeef)",
    f"{ETH}/vlan(vid=100,tpid=0x88a8)/vlan(vid=200,pcp=3,dei=1)/ipv4(src=10.0.0.1,dst=10.0.0.2)"
    "/tcp(sport=1234,dport=80,seq=1,ack=2,flags=PA,window=512)/raw(text=\"GET / HTTP/1.0\")",
    f"{ETH}/ipv4(src=10.0.0.1,dst=10.0.0.2,tos=0xb8,id=77,flags=DF,options=hex:94040000)"
    "/tcp(sport=1,dport=2,flags=S,options=hex:020405b4010303070402)",
    f"{ETH}/ipv4(src=10.0.0.1,dst=10.0.0.2,id=9,flags=MF)/udp(sport=5,dport=6)/raw(hex=0000)",
    f"{ETH}/ipv4(src=10.0.0.1,dst=10.0.0.2,proto=17,frag=185)/raw(hex=0102)",
    f"{ETH}/ipv4(src=10.0.0.1,dst=10.0.0.2)/icmp(type=8,id=4660,seq=1)/raw(hex=000102)",
    f"{ETH}/ipv4(src=10.0.0.1,dst=10.0.0.2)/icmp(type=3,code=4,rest=hex:000005dc)",
    f"{ETH}/ipv4(src=10.0.0.1,dst=10.0.0.2)/ipv4(src=1.1.1.1,dst=2.2.2.2)/udp(sport=1,dport=2)",
    f"{ETH}/ipv6(src=2001:db8::1,dst=2001:db8::2,hlim=255,tc=0x2e,fl=0xabcde)/udp(sport=546,dport=547)",
    f"{ETH}/ipv6(src=fe80::1,dst=ff02::16,hlim=1)/ipv6ext(kind=hop,data=hex:05020000)"
    "/icmpv6(type=143)",
    f"{ETH}/ipv6(src=::1,dst=::2)/ipv6ext(kind=frag,m=1,ident=0x1234)/tcp(sport=1,dport=2,flags=SA)",
    f"{ETH}/ipv6(src=::1,dst=::2)/ipv6ext(kind=frag,nh=17,offset=10,ident=0x1)/raw(hex=00ff)",
    f"{ETH}/ipv6(src=::1,dst=::2)/ipv6ext(kind=dst)/ipv6ext(kind=routing,"
    "data=hex:000100000000000000000000000000000000000000ff)/udp(sport=1,dport=2)",
    f"{ETH}/ipv6(src=::1,dst=::2)/icmpv6(type=128,id=1,seq=2)",
    f"{ETH}/ipv6(src=::1,dst=::2)/icmpv6(type=2,rest=hex:00000500)/raw(hex=60)",
    f"{ETH}/ipv6(src=::1,dst=::2)",
    f"{ETH}/raw(hex=00)",
    f"{ETH}",
    # computed fields show up only when they are wrong
    f"{ETH}/ipv4(src=10.0.0.1,dst=10.0.0.2,chksum=0x1234)/udp(sport=1,dport=2,len=99,chksum=0x0000)",
    f"{ETH}/ipv4(src=10.0.0.1,dst=10.0.0.2,options=hex:00000000)/raw(hex=ffff)",
    f"{ETH}/ipv4(src=10.0.0.1,dst=10.0.0.2,options=hex:830b040a0909090a080808)/udp(sport=1,dport=2)",
    f"{ETH}/ipv6(src=::1,dst=::2,nh=6,plen=0)/raw(hex=0001)",
    f"{ETH}/ipv6(src=::1,dst=::2)/tcp(sport=1,dport=2,flags=0,options=hex:01010101,chksum=0xdead)",
    f"eth(dst={DST},src={SRC},type=0x0800)/raw(hex=4500)",
    f"eth(dst={DST},src={SRC},type=0x1234)/raw(hex=0102)",
    f"eth(dst={DST},src={SRC},type=0x0806)/raw(hex=0001080006040001)",
    "raw(hex=0102030405)",
]


@pytest.mark.parametrize("spec", CANONICAL)
def test_describe_is_canonical(spec: str) -> None:
    frame = parse_spec(spec)
    assert describe(frame) == spec
    assert parse_spec(describe(frame)) == frame


def test_parse_matches_builder() -> None:
    spec = (
        "eth(src=02:00:00:00:00:01,dst=ff:ff:ff:ff:ff:ff)/vlan(vid=10)"
        "/ipv4(src=10.0.0.1,dst=10.0.0.2,ttl=3)/udp(sport=1000,dport=53)/raw(hex=deadbeef)"
    )
    expected = (
        Eth(src="02:00:00:00:00:01", dst="ff:ff:ff:ff:ff:ff") / Dot1Q(10)
        / IPv4("10.0.0.1", "10.0.0.2", ttl=3) / UDP(1000, 53) / Raw(bytes.fromhex("deadbeef"))
    )
    assert parse_spec(spec) == bytes(expected)


@pytest.mark.parametrize(
    "spec,stack",
    [
        ("eth()", Eth()),
        (" eth ( ) / raw ( len = 3 ) ", Eth() / Raw(b"\x00\x01\x02")),
        ("raw(len=300)", Raw(bytes(i % 256 for i in range(300)))),
        ("dot1q(vid=5,pcp=7,dei=1,type=0x0806)", Dot1Q(5, pcp=7, dei=1, type=0x806)),
        ("eth(type=0x88a8)/vlan(vid=5,tpid=0x88a8)", Eth(type=0x88A8) / Dot1Q(5, tpid=0x88A8)),
        ("eth(pad=true)/arp(op=2,hwsrc=02:00:00:00:00:02,psrc=1.2.3.4,hwdst=AA-BB-CC-DD-EE-FF,pdst=5.6.7.8)",
         Eth(pad=True) / ARP(op=2, hwsrc="02:00:00:00:00:02", psrc="1.2.3.4",
                             hwdst="aa:bb:cc:dd:ee:ff", pdst="5.6.7.8")),
        ("ipv4(src=1.2.3.4,dst=5.6.7.8,ttl=0x10,proto=253,tos=1,id=2,flags=DF+MF,frag=3,"
         "options=hex:01,ihl=7,len=1,chksum=0)",
         IPv4("1.2.3.4", "5.6.7.8", ttl=16, proto=253, tos=1, id=2, flags=3, frag=3,
              options=b"\x01", ihl=7, len=1, chksum=0)),
        ("ipv4(src=1.2.3.4,dst=5.6.7.8,flags=4,options=0x0101)",
         IPv4("1.2.3.4", "5.6.7.8", flags=4, options=b"\x01\x01")),
        ("ipv4(src=1.2.3.4,dst=5.6.7.8,options=01010101)",
         IPv4("1.2.3.4", "5.6.7.8", options=b"\x01\x01\x01\x01")),
        ("ipv6(src=\"::1\",dst=2001:DB8::2,hlim=1,nh=0,tc=3,fl=0xfffff,plen=8)",
         IPv6("::1", "2001:db8::2", hlim=1, nh=0, tc=3, fl=0xFFFFF, plen=8)),
        ("ipv6ext(kind=hop,nh=17,data=hex:)", IPv6Ext("hop", nh=17)),
        ("ipv6ext(kind=frag,offset=8191,m=1,ident=4294967295,res1=255,res2=3)",
         IPv6Ext("frag", offset=8191, m=1, ident=0xFFFFFFFF, res1=255, res2=3)),
        ("tcp(sport=1,dport=2,seq=3,ack=4,flags=FSRPAUECN,window=5,options=hex:0204,dataofs=6,"
         "chksum=7,urgptr=8,reserved=7)",
         TCP(1, 2, seq=3, ack=4, flags=0x1FF, window=5, options=b"\x02\x04", dataofs=6,
             chksum=7, urgptr=8, reserved=7)),
        ("tcp(sport=1,dport=2,flags=0x12)", TCP(1, 2, flags="SA")),
        ("tcp(sport=1,dport=2,flags=)", TCP(1, 2, flags=0)),
        ("udp(sport=1,dport=2,len=3,chksum=0xffff)", UDP(1, 2, len=3, chksum=0xFFFF)),
        ("icmp(type=0,code=1,id=2,seq=3,chksum=4)", ICMP(type=0, code=1, id=2, seq=3, chksum=4)),
        ("icmp(type=5,rest=hex:0a000001)", ICMP(type=5, rest=b"\x0a\x00\x00\x01")),
        ("icmpv6(type=129,code=0,id=2,seq=3)", ICMPv6(type=129, id=2, seq=3)),
        ('raw(text="a \\"quoted\\" \\\\ /,()=")', Raw(b'a "quoted" \\ /,()=')),
        ('raw(text="h\u00e9")', Raw("h\u00e9".encode())),
        ("raw(text=plain)", Raw(b"plain")),
        ("raw(hex=)", Raw(b"")),
        ("raw(hex=0xABcd)", Raw(b"\xab\xcd")),
        ("eth(\n  dst = 00:00:00:00:00:01 ,\n  src=00:00:00:00:00:02\n)\n/\traw(hex=00)\n",
         Eth(dst="00:00:00:00:00:01", src="00:00:00:00:00:02") / Raw(b"\x00")),
    ],
)
def test_parse_layer_forms(spec: str, stack: object) -> None:
    assert parse_spec(spec) == bytes(stack)  # type: ignore[call-overload]


@pytest.mark.parametrize(
    "text,expected",
    [
        ("deadbeef", "deadbeef"),
        ("0xDEADBEEF", "deadbeef"),
        ("de ad\nbe:ef", "deadbeef"),
        ("  ff:ff:ff:ff:ff:ff  02:00:00:00:00:01\n0800 ", "ffffffffffff0200000000010800"),
        ("0x", ""),
    ],
)
def test_parse_hex_frames(text: str, expected: str) -> None:
    assert parse_spec(text).hex() == expected


@pytest.mark.parametrize(
    "text,message",
    [
        ("ipv4(src=10.0.0.300,dst=1.2.3.4)",
         "at 'ipv4(src=10.0.0.300': bad IPv4 address '10.0.0.300'"),
        ("eth()/ipx()",
         "unknown layer 'ipx'; known: eth, vlan, arp, ipv4, ipv6, ipv6ext, tcp, udp, icmp, icmpv6, raw"),
        ("eth(foo=1)", "at 'eth(foo': unknown argument 'foo' for eth; valid: dst, src, type, pad"),
        ("eth()/udp(sport=1,dport=2,chk=3)", "unknown argument 'chk' for udp; valid: sport, dport, len, chksum"),
        ("eth(dst=ff:ff)", "at 'eth(dst=ff:ff': bad MAC address 'ff:ff'"),
        ("ipv6(src=::1,dst=::g)", "bad IPv6 address '::g'"),
        ("eth()/ipv4(src=1.2.3.4)", "ipv4 needs dst="),
        ("vlan()", "vlan needs vid="),
        ("vlan(vid=4096)", "at 'vlan(vid=4096)': Dot1Q.vid=4096 out of range 0..4095"),
        ("vlan(vid=ten)", "bad integer 'ten'"),
        ("vlan(vid=-1)", "bad integer '-1'"),
        ("vlan(vid=1,vid=2)", "duplicate argument 'vid' for vlan"),
        ("tcp(sport=1,dport=2,flags=SX)", "bad TCP flag 'X'"),
        ("ipv4(src=1.2.3.4,dst=1.2.3.4,flags=EVIL)", "bad IPv4 flag 'EVIL'"),
        ("ipv4(src=1.2.3.4,dst=1.2.3.4,options=hex:123)", "odd number of hex digits"),
        ("ipv6ext(kind=bogus)", "bad kind 'bogus'"),
        ("eth(pad=maybe)", "bad boolean 'maybe'"),
        ("raw()", "raw needs exactly one of hex=, text=, len="),
        ("raw(hex=00,len=2)", "raw needs exactly one of"),
        ("raw(hex=xyz)", "bad hex 'xyz'"),
        ("raw(len=100000000)", "too large"),
        ('raw(text="abc)', "unterminated quoted string"),
        ('raw(text="a\\n")', "bad escape"),
        ("eth(", "expected an argument name, got end of spec"),
        ("eth(dst=ff:ff:ff:ff:ff:ff", "expected ',' or ')', got end of spec"),
        ("eth() raw(hex=00)", "expected '/' between layers"),
        ("eth()/", "expected a layer name, got end of spec"),
        ("eth", "at 'eth': not a hex frame"),
        ("abc", "even number of hex digits"),
        ("", "empty spec"),
        ("   \n", "empty spec"),
        ("eth()/ipv4(src=1.2.3.4,dst=1.2.3.4)/raw(len=65516)",
         "cannot build frame: IPv4 total length 65536 exceeds 65535"),
    ],
)
def test_spec_errors(text: str, message: str) -> None:
    with pytest.raises(SpecError) as info:
        parse_spec(text)
    assert message in str(info.value)


def test_spec_error_is_value_error() -> None:
    assert issubclass(SpecError, ValueError)
    with pytest.raises(SpecError):
        parse_spec(b"eth()")  # type: ignore[arg-type]


def test_long_context_is_shortened() -> None:
    with pytest.raises(SpecError) as info:
        parse_spec("raw(hex=" + "00" * 200 + "0)")
    assert len(str(info.value)) < 200


# ------------------------------------------------------------------ describe


def test_describe_short_frames_are_raw() -> None:
    assert describe(b"") == "raw(hex=)"
    assert describe(bytes(range(13))) == "raw(hex=000102030405060708090a0b0c)"
    assert describe(b"hello world") == 'raw(text="hello world")'
    assert parse_spec(describe(b"")) == b""


def test_describe_truncated_and_trailing() -> None:
    frame = parse_spec(f"{ETH}/ipv4(src=10.0.0.1,dst=10.0.0.2)/tcp(sport=1,dport=2)")
    # Truncated TCP header: decoding stops at IPv4, which now carries an explicit len.
    short = frame[:-5]
    text = describe(short)
    assert text.startswith(f"{ETH}/ipv4(src=10.0.0.1,dst=10.0.0.2,proto=6,len=40)/raw(hex=")
    assert parse_spec(text) == short
    # Non-zero Ethernet trailer past the IPv4 length stays raw after the payload.
    longer = frame + b"\x01\x02"
    assert parse_spec(describe(longer)) == longer
    assert describe(longer).endswith("raw(hex=0102)")


def test_describe_padding_only_when_it_is_padding() -> None:
    arp = f"arp(op=1,hwsrc={SRC},psrc=10.0.0.1,pdst=10.0.0.2)"
    padded = parse_spec(f"eth(pad=true)/{arp}")
    assert describe(padded) == f"eth(dst={DST},src={SRC},pad=true)/{arp}"
    # Zero bytes that do not end at 60 bytes are a plain trailer.
    assert describe(padded + b"\x00") == f"{ETH}/{arp}/raw(hex={'00' * 19})"
    assert describe(padded[:-1]) == f"{ETH}/{arp}/raw(hex={'00' * 17})"


# -------------------------------------------------------------- properties

CORPUS = [parse_spec(s) for s in CANONICAL] + [
    parse_spec("eth(pad=true)/ipv4(src=1.2.3.4,dst=5.6.7.8)/udp(sport=1,dport=2)/raw(len=4)"),
    parse_spec("eth()/ipv4(src=1.2.3.4,dst=5.6.7.8,options=hex:830b040a0909090a080808)"
               "/tcp(sport=1,dport=2,options=hex:020405b4)/raw(len=30)"),
    parse_spec("eth()/ipv4(src=1.2.3.4,dst=5.6.7.8)/ipv6(src=::1,dst=::2)/icmpv6()/raw(len=8)"),
    parse_spec("eth()/vlan(vid=1)/ipv6(src=::1,dst=::2)/ipv6ext(kind=hop)/ipv6ext(kind=routing,"
               "data=hex:040100000000000000000000000000000000000000ff)/ipv6ext(kind=dst)"
               "/ipv6ext(kind=frag)/udp(sport=1,dport=2)/raw(len=9)"),
]


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=120))
@example(b"")
@example(bytes(14))
def test_roundtrip_arbitrary_bytes(frame: bytes) -> None:
    assert parse_spec(describe(frame)) == frame


@st.composite
def mutated_frames(draw: st.DrawFn) -> bytes:
    frame = bytearray(draw(st.sampled_from(CORPUS)))
    for _ in range(draw(st.integers(0, 4))):
        if frame:
            i = draw(st.integers(0, len(frame) - 1))
            frame[i] = draw(st.integers(0, 255))
    if draw(st.booleans()):
        frame = frame[: draw(st.integers(0, len(frame)))]
    frame += draw(st.binary(max_size=8))
    return bytes(frame)


@settings(max_examples=300, deadline=None)
@given(mutated_frames())
def test_roundtrip_mutated_frames(frame: bytes) -> None:
    assert parse_spec(describe(frame)) == frame


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=80))
def test_arbitrary_text_raises_only_spec_error(text: str) -> None:
    try:
        parse_spec(text)
    except SpecError:
        pass


_NAMES = ["eth", "vlan", "dot1q", "arp", "ipv4", "ipv6", "ipv6ext", "tcp", "udp", "icmp",
          "icmpv6", "raw", "ipx", "ETH"]
_ARGS = ["dst", "src", "type", "pad", "vid", "pcp", "dei", "tpid", "op", "hwsrc", "psrc",
         "hwdst", "pdst", "ttl", "proto", "tos", "id", "flags", "frag", "options", "ihl", "len",
         "chksum", "hlim", "nh", "tc", "fl", "plen", "kind", "data", "offset", "m", "ident",
         "sport", "dport", "seq", "ack", "window", "dataofs", "urgptr", "code", "rest", "hex",
         "text", "res1", "res2", "reserved", "bogus"]
_VALUES = st.one_of(
    st.integers(-5, 1 << 33).map(str),
    st.integers(0, 1 << 33).map(hex),
    st.sampled_from(["10.0.0.1", "::1", "2001:db8::1", "02:00:00:00:00:01", "SA", "DF", "hop",
                     "frag", "routing", "dst", "true", "hex:", "hex:0102", "hex:123", "", "1.2.3",
                     '"quoted \\" text"', "0x", "FSRPAUECN", "DF+MF", "999999999999999999999"]),
    st.text(alphabet='0123456789abcdefx:."\\', max_size=12),
)


@st.composite
def specish(draw: st.DrawFn) -> str:
    layers = []
    for _ in range(draw(st.integers(1, 6))):
        name = draw(st.sampled_from(_NAMES))
        args = draw(st.lists(st.tuples(st.sampled_from(_ARGS), _VALUES), max_size=4))
        layers.append(name + "(" + ",".join(f"{k}={v}" for k, v in args) + ")")
    text = "/".join(layers)
    if draw(st.booleans()):  # sprinkle some syntax damage
        i = draw(st.integers(0, len(text)))
        text = text[:i] + draw(st.sampled_from(["", "(", ")", "/", ",", "=", " ", '"'])) + text[i:]
    return text


@settings(max_examples=300, deadline=None)
@given(specish())
def test_spec_like_text_raises_only_spec_error(text: str) -> None:
    try:
        frame = parse_spec(text)
    except SpecError:
        return
    assert parse_spec(describe(frame)) == frame


@settings(max_examples=150, deadline=None)
@given(st.text(alphabet="0123456789abcdefABCDEFxX: \n\t", max_size=40))
def test_hex_like_text(text: str) -> None:
    try:
        frame = parse_spec(text)
    except SpecError:
        return
    digits = re.sub(r"[\s:]", "", text.strip())
    digits = digits[2:] if digits[:2].lower() == "0x" else digits
    assert frame.hex() == digits.lower()
