"""A TLS-terminating TCP proxy for loopback tests.

The embedded broker (tansu) speaks plaintext only, as the tests run it. This
proxy listens on ``127.0.0.1:<port>`` with a server certificate, completes the
TLS handshake with each client, and forwards the decrypted bytes to the
broker. Started with the broker's advertised port set to the proxy's, every
connection a client makes (bootstrap, then the advertised address) goes
through TLS, so a test sees exactly what a client of a TLS-only Kafka sees,
certificate verification included.

It runs an asyncio loop in a daemon thread: asyncio's TLS goes through memory
buffers, so one connection's reads and writes never touch one ``SSLSocket``
from two threads at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import threading
from types import TracebackType

from exactlyonce.embedded import free_port


class TlsProxy:
    """Terminate TLS on ``127.0.0.1:port`` and forward plaintext to ``127.0.0.1:target_port``.

    ``context`` is the server-side :class:`ssl.SSLContext` (certificate
    loaded; client certificates required if the test wants mutual TLS); the
    proxy sets its ``sni_callback`` to count handshakes.
    """

    def __init__(self, target_port: int, context: ssl.SSLContext, *, port: int | None = None) -> None:
        self.port = port or free_port()
        self._target_port = target_port
        self._context = context
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="tlsproxy", daemon=True)
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        #: TLS handshakes begun (ClientHellos received).
        self.hellos = 0
        #: Connections whose TLS handshake completed (they were forwarded).
        self.connections = 0
        # asyncio only logs a failed handshake (at debug level): count the
        # hellos instead, so that hellos - connections is the failures.
        context.sni_callback = self._on_hello

    @property
    def address(self) -> str:
        """``127.0.0.1:<port>``, for bootstrap_servers."""
        return f"127.0.0.1:{self.port}"

    def start(self) -> TlsProxy:
        """Listen and start forwarding; returns once the port accepts connections."""
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._listen(), self._loop).result(timeout=10)
        return self

    def stop(self) -> None:
        """Stop listening, close every connection, end the loop's thread."""
        if not self._thread.is_alive():
            return
        asyncio.run_coroutine_threadsafe(self._shutdown(), self._loop).result(timeout=10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()

    async def _listen(self) -> None:
        self._server = await asyncio.start_server(
            self._serve, "127.0.0.1", self.port, ssl=self._context, ssl_handshake_timeout=10
        )

    async def _shutdown(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _serve(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        # Called once the handshake succeeded.
        self.connections += 1
        try:
            try:
                upstream_reader, upstream_writer = await asyncio.open_connection("127.0.0.1", self._target_port)
            except OSError:
                return
            pumps = [asyncio.ensure_future(_pump(client_reader, upstream_writer)),
                     asyncio.ensure_future(_pump(upstream_reader, client_writer))]
            try:
                # Kafka has no use for half-closed connections: when either
                # side ends, end both.
                await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for pump in pumps:
                    pump.cancel()
                await asyncio.gather(*pumps, return_exceptions=True)
                await _close(upstream_writer)
        finally:
            await _close(client_writer)
            self._tasks.discard(task)

    @property
    def refused(self) -> int:
        """Handshakes that did not complete (a client that does not trust the certificate, say)."""
        return self.hellos - self.connections

    def _on_hello(self, sock: ssl.SSLObject | ssl.SSLSocket, server_name: str | None, context: ssl.SSLContext) -> None:
        self.hellos += 1

    def __enter__(self) -> TlsProxy:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Copy until end of stream; a reset ends the copy quietly."""
    with contextlib.suppress(ConnectionError, OSError, ssl.SSLError):
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()


async def _close(writer: asyncio.StreamWriter) -> None:
    writer.close()
    with contextlib.suppress(ConnectionError, OSError, ssl.SSLError, asyncio.TimeoutError):
        await asyncio.wait_for(writer.wait_closed(), 5)
