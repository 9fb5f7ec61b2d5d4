"""``exactlyonce console``: serve the console with uvicorn on a socket bound here."""

from __future__ import annotations

import dataclasses
import ipaddress
import logging
import signal
import socket
import threading

import uvicorn

from exactlyonce.console.backend import Settings
from exactlyonce.console.web import allowed_hosts_for, create_app
from exactlyonce.errors import ConfigurationError

log = logging.getLogger("exactlyonce.console")


def is_loopback(host: str) -> bool:
    """Whether ``host`` is a loopback address (or ``localhost``)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def bind(host: str, port: int) -> socket.socket:
    """A listening socket; a clear :class:`ConfigurationError` when the address cannot be had."""
    if not 0 <= port <= 65535:
        raise ConfigurationError(f"--port must be between 0 and 65535, not {port}")
    address = host.strip("[]")
    try:
        family = socket.AF_INET6 if ":" in address else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((address, port))
        sock.listen(128)
    except OSError as exc:
        raise ConfigurationError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from exc
    sock.set_inheritable(True)
    return sock


def startup_line(settings: Settings, url: str) -> str:
    """What the console logs when it starts: where, which mode, which services; never the token."""
    mode = ("replays allowed with the token" if settings.writable
            else "read-only: no token, set EXACTLYONCE_CONSOLE_TOKEN to allow replays")
    return (f"exactlyonce console at {url} ({mode}); database {settings.database_display}, "
            f"broker {settings.bootstrap_servers or '(none)'}")


def serve(settings: Settings, *, host: str = "127.0.0.1", port: int = 8080) -> None:
    """Serve the console until SIGTERM/SIGINT."""
    settings = dataclasses.replace(settings, allowed_hosts=allowed_hosts_for(host, _list(settings.allowed_hosts)))
    app = create_app(settings)
    sock = bind(host, port)
    bound = sock.getsockname()[1]
    shown = f"[{host.strip('[]')}]" if ":" in host else host
    log.info("%s", startup_line(settings, f"http://{shown}:{bound}/"))
    if not is_loopback(host):
        log.warning("listening on %s: whoever reaches port %d can read the console%s", host, bound,
                    "; the token crosses the network in clear over plain HTTP: put a TLS proxy in front"
                    if settings.writable else "")
    config = uvicorn.Config(app, log_config=None, server_header=False, proxy_headers=False, lifespan="on")
    if threading.current_thread() is threading.main_thread():
        # uvicorn shuts down gracefully on SIGTERM, then raises the signal again for the handler it found:
        # with this one the command exits 0, as `exactlyonce relay` does (SIGINT still ends it with 130).
        signal.signal(signal.SIGTERM, lambda signum, frame: None)
    try:
        uvicorn.Server(config).run(sockets=[sock])
    finally:
        sock.close()
    log.info("console stopped")


def _list(hosts: object) -> list[str] | None:
    return list(hosts) if isinstance(hosts, list | tuple) and hosts else None
