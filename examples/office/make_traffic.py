"""Write the office example's input captures (in/*.pcap) with dva's packet builders.

Staff hosts h1/h2 (VLAN 10) resolve each other with ARP and talk TCP/UDP; guest h3
prints to the printer (VLAN 20); the router behind the trunk answers h1 (tagged 10)
and sends one frame in VLAN 30, which the trunk does not carry; one frame is cut
short. Times are seconds from the start of the capture.
"""

from __future__ import annotations

import sys
from pathlib import Path

from dva.packet.build import ARP, ICMP, TCP, UDP, Dot1Q, Eth, IPv4, Raw
from dva.ports.pcapfile import write_frames

H1, H2, H3, PR, GW = (f"02:00:00:00:00:{i:02x}" for i in (0x11, 0x12, 0x23, 0x24, 0xfe))
BC = "ff:ff:ff:ff:ff:ff"


def main(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    t0 = 1_700_000_000.0
    caps: dict[str, list] = {p: [] for p in ("h1", "h2", "h3", "printer", "uplink")}

    def at(t, port, frame):
        caps[port].append((t0 + t, bytes(frame)))

    at(0.0, "h1", Eth(src=H1, dst=BC) / ARP(op=1, hwsrc=H1, psrc="10.0.10.11", pdst="10.0.10.12"))
    at(0.1, "h2", Eth(src=H2, dst=H1) / ARP(op=2, hwsrc=H2, psrc="10.0.10.12", hwdst=H1,
                                            pdst="10.0.10.11"))
    for i in range(20):
        at(0.2 + i * 0.01, "h1", Eth(src=H1, dst=H2) / IPv4(src="10.0.10.11", dst="10.0.10.12")
           / TCP(sport=50000, dport=22, flags="PA", seq=1000 + 100 * i) / Raw(bytes(100)))
        at(0.205 + i * 0.01, "h2", Eth(src=H2, dst=H1) / IPv4(src="10.0.10.12", dst="10.0.10.11")
           / TCP(sport=22, dport=50000, flags="A", ack=1100 + 100 * i))
    at(1.0, "h3", Eth(src=H3, dst=BC) / ARP(op=1, hwsrc=H3, psrc="10.0.20.23", pdst="10.0.20.24"))
    at(1.1, "printer", Eth(src=PR, dst=H3) / ARP(op=2, hwsrc=PR, psrc="10.0.20.24", hwdst=H3,
                                                 pdst="10.0.20.23"))
    for i in range(10):
        at(1.2 + i * 0.02, "h3", Eth(src=H3, dst=PR) / IPv4(src="10.0.20.23", dst="10.0.20.24")
           / TCP(sport=40000, dport=9100, flags="PA") / Raw(bytes(512)))
    at(2.0, "h1", Eth(src=H1, dst=GW) / IPv4(src="10.0.10.11", dst="198.51.100.7")
       / ICMP(type=8, id=1, seq=1) / Raw(bytes(56)))
    at(2.1, "uplink", Eth(src=GW, dst=H1) / Dot1Q(vid=10) / IPv4(src="198.51.100.7",
                                                               dst="10.0.10.11")
       / ICMP(type=0, id=1, seq=1) / Raw(bytes(56)))
    at(2.2, "uplink", Eth(src=GW, dst=BC) / Dot1Q(vid=30) / IPv4(src="10.0.30.1",
                                                               dst="10.0.30.255")
       / UDP(sport=520, dport=520))
    at(2.3, "h2", bytes(Eth(src=H2, dst=H1) / IPv4(src="10.0.10.12", dst="10.0.10.11")
                        / UDP(sport=1, dport=2))[:20])
    for port, frames in caps.items():
        write_frames(out / f"{port}.pcap", frames)
        print(f"wrote {len(frames):3} frames to {out / f'{port}.pcap'}")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).parent / "in")
