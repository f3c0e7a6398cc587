"""Handing a large object (the flow state of moving buckets) from one worker to
another through a file in shared memory instead of two pipes.

The object is pickled with protocol 5 and its large buffers (numpy arrays: the
tables' records) kept out of band: they are written once, back to back, to a file
under ``/dev/shm`` (tmpfs: memory, no disk), and only the small pickle and the buffer
sizes go through the control pipes. The reader maps the file and unpickles with the
buffers as views of the mapping, so its arrays are the file's pages (no copy).

The dispatcher names the file (its pid and a counter, prefix ``dva-move-``) and
removes it once the move ended, whatever the outcome; a dispatcher that starts
removes files of dispatchers that are gone (:func:`clean_stale`).

Large buffers do not even take that copy: a worker exports the records of moving
buckets straight into its **staging area** (:class:`Area`), a file of its own under
``/dev/shm`` (``dva-move-PID-area-W``) that it keeps, and keeps mapped, from one move
to the next, growing it when a move needs more. Buffers inside the area travel as
(offset, size); the reader maps the area (and keeps that mapping too) and views them
in place. Kept pages are the point: on these VMs a first touch of fresh memory costs
about ten times the copy itself (exporting 3M records: 135 ms into touched pages,
1.3-1.7 s into fresh ones), so a fresh buffer or file per move paid that every time.
The price is memory: the area stays as large as the largest move made (tmpfs pages),
until the worker stops and the dispatcher removes it.
"""

from __future__ import annotations

import mmap
import os
import pickle
import tempfile
from pathlib import Path

import numpy as np

PREFIX = "dva-move-"


def stage_dir() -> Path:
    shm = Path("/dev/shm")
    return shm if shm.is_dir() and os.access(shm, os.W_OK) else Path(tempfile.gettempdir())


class Area:
    """A worker's staging area: a shared file kept mapped; :meth:`reserve` hands out
    its first ``n`` bytes (growing the file first when it is smaller)."""

    GROW = 16 << 20  # sizes are rounded up to this

    def __init__(self, path: str) -> None:
        self.path = path
        self.mm: mmap.mmap | None = None
        self.size = 0
        self.base = 0  # address of the mapping

    def reserve(self, n: int) -> np.ndarray:
        if n == 0:
            return np.zeros(0, np.uint8)
        if n > self.size:
            size = -(-n // self.GROW) * self.GROW
            with open(self.path, "a+b") as f:
                os.ftruncate(f.fileno(), size)
                mm = mmap.mmap(f.fileno(), size)
            # the old mapping goes when nothing views it any more (no close: views of
            # it may still be alive in the caller)
            self.mm, self.size = mm, size
            self.base = np.frombuffer(mm, np.uint8, count=1).ctypes.data
        return np.frombuffer(self.mm, np.uint8, count=n)

    def offset_of(self, m: memoryview) -> int:
        """Where ``m`` lies in the area, or -1 when it is not inside it."""
        if self.mm is None or m.nbytes == 0:
            return -1
        a = np.frombuffer(m, np.uint8).ctypes.data - self.base
        return a if 0 <= a and a + m.nbytes <= self.size else -1


_areas: dict[str, Area] = {}


def area(path: str) -> Area:
    """This process's staging area at ``path`` (made on first use, then kept)."""
    a = _areas.get(path)
    if a is None:
        a = _areas[path] = Area(path)
    return a


_mapped: dict[str, mmap.mmap] = {}


def _area_view(path: str, end: int) -> memoryview:
    """Another process's staging area, mapped read-only (kept mapped; mapped again
    when it grew past what is mapped)."""
    mm = _mapped.get(path)
    if mm is None or len(mm) < end:
        with open(path, "rb") as f:
            mm = _mapped[path] = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    return memoryview(mm)


def write(obj, path: str, within: Area | None = None) -> tuple:
    """Put ``obj``'s large buffers in ``path`` -- those inside the staging area
    ``within`` stay where they are; returns what :func:`read` needs."""
    bufs: list[pickle.PickleBuffer] = []
    head = pickle.dumps(obj, protocol=5, buffer_callback=bufs.append)
    places = []  # (in the area?, offset, size)
    off = 0
    with open(path, "wb") as f:
        for b in bufs:
            m = b.raw()
            at = within.offset_of(m) if within is not None else -1
            if at >= 0:
                places.append((True, at, m.nbytes))
            else:
                f.write(m)
                places.append((False, off, m.nbytes))
                off += m.nbytes
    return head, places, within.path if within is not None else None


def read(head: bytes, places: list, area_path: str | None, path: str):
    """The object :func:`write` staged, its buffers viewing the mapped file and area."""
    views = []
    mv = None
    if any(not inside and n for inside, _, n in places):
        with open(path, "rb") as f:
            mv = memoryview(mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ))
    end = max((o + n for inside, o, n in places if inside), default=0)
    av = _area_view(area_path, end) if end else None
    for inside, o, n in places:
        src = av if inside else mv
        views.append(src[o:o + n] if n else memoryview(b""))
    return pickle.loads(head, buffers=views)


def clean_stale() -> None:
    """Remove staged files whose dispatcher is gone."""
    d = stage_dir()
    for p in d.glob(PREFIX + "*"):
        try:
            pid = int(p.name[len(PREFIX):].split("-")[0])
            os.kill(pid, 0)
        except (ValueError, ProcessLookupError):
            try:
                p.unlink()
            except OSError:
                pass
        except PermissionError:
            pass
