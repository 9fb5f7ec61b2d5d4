"""A fault-injecting TCP proxy for loopback tests.

It forwards ``127.0.0.1:<port>`` to a target and can cut every open
connection at once (both directions, mid-stream) or refuse new ones for a
while: the broker connection drops that real networks produce, without
restarting the broker (the embedded broker's storage is memory only).
"""

from __future__ import annotations

import contextlib
import socket
import threading
from types import TracebackType

from exactlyonce.embedded import free_port


class FaultProxy:
    """Forward loopback TCP traffic to ``target``; inject cuts on demand."""

    def __init__(self, target_port: int, *, port: int | None = None, target_host: str = "127.0.0.1") -> None:
        self.port = port or free_port()
        self._target = (target_host, target_port)
        self._listener: socket.socket | None = None
        self._lock = threading.Lock()
        self._open: set[socket.socket] = set()
        self._refusing = threading.Event()
        self._closed = threading.Event()
        #: Connections cut so far (for test assertions and chaos reports).
        self.cuts = 0

    def start(self) -> FaultProxy:
        """Listen and start forwarding."""
        listener = socket.create_server(("127.0.0.1", self.port), reuse_port=False)
        listener.settimeout(0.2)
        self._listener = listener
        threading.Thread(target=self._accept_loop, name="faultproxy-accept", daemon=True).start()
        return self

    def cut(self) -> int:
        """Close every open connection now; clients see a reset mid-stream. Returns how many."""
        with self._lock:
            sockets, self._open = self._open, set()
        for sock in sockets:
            _close(sock)
        self.cuts += 1
        return len(sockets) // 2

    def refuse(self, refusing: bool = True) -> None:
        """While refusing, new connections are accepted and closed at once."""
        if refusing:
            self._refusing.set()
            self.cut()
        else:
            self._refusing.clear()

    def stop(self) -> None:
        """Stop listening and close everything."""
        self._closed.set()
        if self._listener is not None:
            _close(self._listener)
        self.cut()

    def _accept_loop(self) -> None:
        assert self._listener is not None
        while not self._closed.is_set():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            if self._refusing.is_set():
                _close(client)
                continue
            try:
                upstream = socket.create_connection(self._target, timeout=5)
            except OSError:
                _close(client)
                continue
            for sock in (client, upstream):
                sock.settimeout(None)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self._lock:
                self._open.update((client, upstream))
            for src, dst in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(src, dst), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                dst.sendall(data)
        except OSError:
            pass
        finally:
            with self._lock:
                self._open.discard(src)
                self._open.discard(dst)
            _close(src)
            _close(dst)

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()


def _close(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)
    sock.close()
