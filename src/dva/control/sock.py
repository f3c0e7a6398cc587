"""The local control socket of a running instance: ``dva status|counters|apply|stop``.

A Unix stream socket (mode 0600, root's) that takes one JSON request per line and
answers one JSON line: ``{"ok": true, ...}`` or ``{"ok": false, "error": "..."}``.
Requests: ``{"op": "status"}``, ``{"op": "counters"}``, ``{"op": "apply", "file":
PATH}`` (answered once every worker runs the new generation, or with the reasons it
was rejected: the running generation stays), ``{"op": "buckets"}`` (the indirection
table: the worker of each flow bucket, see :func:`dva.packet.steer.flow_buckets`),
``{"op": "scale", "workers": N}`` (answered when the workers run and the buckets
moved: the moves), ``{"op": "stop"}``.

A thread accepts connections and reads requests; the runtime's loop takes them
between batches (:meth:`ControlServer.serve`), since only it may talk to the
workers. Default path: ``$DVA_RUN_DIR`` (else ``/run/dva``)
``/TENANT-APPLIANCE.sock``.
"""

from __future__ import annotations

import json
import os
import queue
import socket
import threading
from pathlib import Path

MAX_REQUEST = 1 << 16


def default_path(tenant: str, appliance: str) -> str:
    return str(Path(os.environ.get("DVA_RUN_DIR") or "/run/dva") / f"{tenant}-{appliance}.sock")


class ControlServer:
    def __init__(self, path: str) -> None:
        self.path = path
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        if os.path.exists(path):
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                probe.connect(path)
            except OSError:
                os.unlink(path)  # a stale socket of an instance that is gone
            else:
                probe.close()
                raise OSError(f"another instance is running on {path}")
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o177)
        try:
            self.sock.bind(path)
        finally:
            os.umask(old)
        self.sock.listen(8)
        self.requests: queue.Queue = queue.Queue()
        self._closed = False
        self.thread = threading.Thread(target=self._accept, daemon=True, name="dva-control")
        self.thread.start()

    def _accept(self) -> None:
        while not self._closed:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._read, args=(conn,), daemon=True).start()

    def _read(self, conn: socket.socket) -> None:
        conn.settimeout(30)
        buf = b""
        try:
            while b"\n" not in buf and len(buf) < MAX_REQUEST:
                chunk = conn.recv(4096)
                if not chunk:
                    break
                buf += chunk
            try:
                req = json.loads(buf.split(b"\n", 1)[0] or b"{}")
                if not isinstance(req, dict):
                    raise ValueError("a request is a JSON object")
            except ValueError as e:
                self.reply(conn, {"ok": False, "error": f"bad request: {e}"})
                return
            self.requests.put((conn, req))
        except OSError:
            conn.close()

    @staticmethod
    def reply(conn: socket.socket, msg: dict) -> None:
        try:
            conn.sendall(json.dumps(msg).encode() + b"\n")
        except OSError:
            pass
        finally:
            conn.close()

    def serve(self, rt) -> None:
        """Answer the queued requests (called by the runtime between batches)."""
        while True:
            try:
                conn, req = self.requests.get_nowait()
            except queue.Empty:
                return
            op = req.get("op")
            try:
                if op == "status":
                    self.reply(conn, {"ok": True, "status": rt.status()})
                elif op == "counters":
                    self.reply(conn, {"ok": True, "counters": rt.counters(),
                                      "generation": rt.generation})
                elif op == "apply":
                    f = req.get("file")
                    if not isinstance(f, str):
                        self.reply(conn, {"ok": False, "error": "apply needs a file"})
                        continue
                    rt.apply(f, done=lambda ok, msg, c=conn: self.reply(
                        c, {"ok": ok, "message": msg, "generation": rt.generation}
                        if ok else {"ok": False, "error": msg}))
                elif op == "buckets":
                    self.reply(conn, {"ok": True, "table": rt.table.tolist(),
                                      "generation": rt.generation})
                elif op == "scale":
                    n = req.get("workers")
                    if not isinstance(n, int) or isinstance(n, bool):
                        self.reply(conn, {"ok": False, "error": "scale needs workers: N"})
                        continue
                    moves = rt.scale(n, reason="dva scale")
                    self.reply(conn, {"ok": True, "workers": rt.nworkers, "moves": moves})
                elif op == "stop":
                    rt.request_stop()
                    self.reply(conn, {"ok": True})
                else:
                    self.reply(conn, {"ok": False, "error": f"unknown op {op!r}; ops: "
                                      "status, counters, buckets, apply, scale, stop"})
            except Exception as e:  # a request must never take the data plane down
                self.reply(conn, {"ok": False, "error": f"{type(e).__name__}: {e}"})

    def close(self) -> None:
        self._closed = True
        try:
            self.sock.close()
        finally:
            try:
                os.unlink(self.path)
            except OSError:
                pass


def request(path: str, msg: dict, timeout: float = 120.0) -> dict:
    """Send one request to the instance at ``path``; its answer."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        s.connect(path)
        s.sendall(json.dumps(msg).encode() + b"\n")
        buf = b""
        while not buf.endswith(b"\n"):
            chunk = s.recv(65536)
            if not chunk:
                break
            buf += chunk
    finally:
        s.close()
    return json.loads(buf)
