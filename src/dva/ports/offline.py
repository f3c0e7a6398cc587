"""Offline port attachments: ``memory`` and ``pcap``.

An offline port is a source of timestamped frames (``peek`` / ``take``) and a sink
(``send``). The offline runner merges all sources by timestamp, so a run over pcap
files is deterministic and device time (``now``) is the capture's time.

* ``memory: NAME`` -- frames injected by the caller (tests, ``dva trace``) and the
  frames sent collected in ``sent``; one test body can run against memory and pcap.
* ``pcap: {read: FILE, write: FILE}`` -- classic pcap or pcapng in, classic pcap out.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Iterator
from pathlib import Path

from dva.ports.pcapfile import PcapError, PcapWriter, read_frames


class PortError(RuntimeError):
    """A port could not be opened or used; the message says which and why."""


class OfflinePort:
    """Base: a timestamp-ordered source and a sink of frames."""

    def __init__(self, ref: str) -> None:
        self.ref = ref

    def peek(self) -> float | None:
        """Timestamp of the next frame to read, None when exhausted."""
        return None

    def take(self) -> tuple[float, bytes]:
        raise IndexError("no frames")

    def send(self, ts: float, frames: Iterable[bytes]) -> None:
        """Frames leaving the appliance at time ``ts``."""

    def close(self) -> None:
        pass


class MemoryPort(OfflinePort):
    def __init__(self, ref: str, frames: Iterable[tuple[float, bytes]] = ()) -> None:
        super().__init__(ref)
        self.inbox: deque[tuple[float, bytes]] = deque(frames)
        self.sent: list[tuple[float, bytes]] = []

    def inject(self, frames: Iterable[bytes], ts: float = 0.0) -> None:
        self.inbox.extend((ts, f) for f in frames)

    def peek(self) -> float | None:
        return self.inbox[0][0] if self.inbox else None

    def take(self) -> tuple[float, bytes]:
        return self.inbox.popleft()

    def send(self, ts: float, frames: Iterable[bytes]) -> None:
        self.sent.extend((ts, f) for f in frames)


class PcapPort(OfflinePort):
    def __init__(self, ref: str, read: Path | None, write: Path | None) -> None:
        super().__init__(ref)
        self._it: Iterator[tuple[float, bytes]] | None = None
        self._next: tuple[float, bytes] | None = None
        self._writer: PcapWriter | None = None
        if read is not None:
            if not read.is_file():
                raise PortError(f"{ref}: pcap input {read} does not exist")
            self._it = read_frames(read)
            self._advance()
        if write is not None:
            try:
                self._writer = PcapWriter(write)
            except OSError as e:
                raise PortError(f"{ref}: cannot write {write}: {e.strerror}") from None

    def _advance(self) -> None:
        try:
            self._next = next(self._it) if self._it is not None else None
        except StopIteration:
            self._next = None
        except PcapError as e:
            raise PortError(f"{self.ref}: {e}") from None

    def peek(self) -> float | None:
        return None if self._next is None else self._next[0]

    def take(self) -> tuple[float, bytes]:
        item = self._next
        if item is None:
            raise IndexError("no frames")
        self._advance()
        return item

    def send(self, ts: float, frames: Iterable[bytes]) -> None:
        if self._writer is not None:
            for f in frames:
                self._writer.write(ts, f)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
        if self._it is not None:
            self._it.close()
