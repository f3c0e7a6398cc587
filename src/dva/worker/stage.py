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
"""

from __future__ import annotations

import mmap
import os
import pickle
import tempfile
from pathlib import Path

PREFIX = "dva-move-"


def stage_dir() -> Path:
    shm = Path("/dev/shm")
    return shm if shm.is_dir() and os.access(shm, os.W_OK) else Path(tempfile.gettempdir())


def write(obj, path: str) -> tuple[bytes, list[int]]:
    """Put ``obj``'s large buffers in ``path``; returns the pickle and their sizes."""
    bufs: list[pickle.PickleBuffer] = []
    head = pickle.dumps(obj, protocol=5, buffer_callback=bufs.append)
    sizes = []
    with open(path, "wb") as f:
        for b in bufs:
            m = b.raw()
            f.write(m)
            sizes.append(m.nbytes)
    return head, sizes


def read(head: bytes, sizes: list[int], path: str):
    """The object :func:`write` staged, its buffers viewing the mapped file."""
    views = []
    if sum(sizes):
        with open(path, "rb") as f:
            mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        mv = memoryview(mm)
        off = 0
        for n in sizes:
            views.append(mv[off:off + n])
            off += n
    else:
        views = [memoryview(b"")] * len(sizes)
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
