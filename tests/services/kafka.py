"""Apache Kafka brokers for the tests: jars from Maven Central, KRaft mode, one node or a quorum.

The broker's jars come from Maven Central through ``tests/services/pom.xml``
(``mvn dependency:copy-dependencies``) into a cache outside the work tree
(``$EXACTLYONCE_KAFKA_JARS``, else ``~/.cache/exactlyonce/kafka-<version>``),
once per machine. Each node runs as a combined broker and controller
(``process.roles=broker,controller``) with a static voter set, so one node is a
whole cluster and three nodes form a three-voter quorum.

Every node has two client-facing listeners: ``PLAINTEXT`` (the one clients are
told about; its advertised port may be a test's fault-injecting proxy) and
``INTERNAL`` (broker-to-broker traffic and the harness's own checks, never
behind a proxy). Logs go to ``<node dir>/server.log``.

A :class:`ClientListener` secures the first one instead (a single node's
``SSL``, ``SASL_PLAINTEXT`` or ``SASL_SSL`` listener, named after its
protocol); ``INTERNAL`` and ``CONTROLLER`` stay plaintext, so the harness's
own checks need no credentials.

Used as a module it starts a cluster in the foreground::

    python -m tests.services.kafka --nodes 1     # prints the bootstrap servers
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import fcntl
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")

POM = Path(__file__).with_name("pom.xml")
JARS_ENV = "EXACTLYONCE_KAFKA_JARS"

# Tuned for tests on a small machine: small heaps, no initial rebalance delay,
# short group session floor (the tests use 1-6 s session timeouts).
JVM_OPTS = ["-Xms64m", "-Xmx384m", "-XX:+UseG1GC", "-XX:MaxGCPauseMillis=20",
            "-Djava.awt.headless=true", "-XX:+ExitOnOutOfMemoryError"]


class KafkaUnavailable(RuntimeError):
    """Apache Kafka cannot be fetched or started here; the message says why in one line."""


def kafka_version() -> str:
    """The Kafka version the pom names (the one CI tests on)."""
    match = re.search(r"<kafka\.version>([^<]+)</kafka\.version>", POM.read_text())
    assert match, f"no <kafka.version> in {POM}"
    return match.group(1)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def jars_dir() -> Path:
    """The directory of the broker's jars, fetched with Maven on first use."""
    explicit = os.environ.get(JARS_ENV)
    if explicit:
        return Path(explicit)
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    target = cache / "exactlyonce" / f"kafka-{kafka_version()}"
    if (target / ".complete").exists():
        return target
    for tool in ("java", "mvn"):
        if shutil.which(tool) is None:
            raise KafkaUnavailable(
                f"Apache Kafka needs `{tool}` (install a JDK 17+ and Maven, e.g. "
                "`apt-get install -y openjdk-17-jdk-headless maven`), or set "
                "EXACTLYONCE_TEST_BROKER=tansu")
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f".kafka-{kafka_version()}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one fetch even if two sessions start at once
        if (target / ".complete").exists():
            return target
        staging = Path(tempfile.mkdtemp(prefix="kafka-jars-", dir=target.parent))
        result = subprocess.run(
            ["mvn", "-q", "-B", "-f", str(POM), "dependency:copy-dependencies",
             f"-DoutputDirectory={staging}", "-DincludeScope=runtime"],
            capture_output=True, text=True, timeout=900, check=False)
        if result.returncode != 0:
            shutil.rmtree(staging, ignore_errors=True)
            tail = (result.stdout + result.stderr).strip().splitlines()[-5:]
            raise KafkaUnavailable("fetching Apache Kafka from Maven Central failed: " + " | ".join(tail))
        (staging / ".complete").touch()
        shutil.rmtree(target, ignore_errors=True)
        staging.rename(target)
    return target


def _cluster_id() -> str:
    """A random KRaft cluster ID (a UUID in URL-safe base64, as Kafka's own tool makes).

    Never one that starts with ``-``: the storage tool would read it as an option.
    """
    while True:
        cluster_id = base64.urlsafe_b64encode(uuid.uuid4().bytes).rstrip(b"=").decode()
        if not cluster_id.startswith("-"):
            return cluster_id


PROTOCOLS = ("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL")
SASL_MECHANISMS = ("PLAIN", "SCRAM-SHA-256")


@dataclass(frozen=True, slots=True)
class ClientListener:
    """How the client-facing listener is secured.

    ``keystore`` (``SSL``, ``SASL_SSL``) is a PEM file holding the server's
    private key (unencrypted PKCS#8) and then its certificate chain. ``users``
    (``SASL_*``) maps user names to passwords; each is a ``PLAIN`` user and,
    when ``SCRAM-SHA-256`` is among ``mechanisms``, also a SCRAM user, whose
    credentials are written into the metadata log when the storage is formatted.
    """

    protocol: str = "PLAINTEXT"
    keystore: Path | None = None
    users: Mapping[str, str] = field(default_factory=dict)
    mechanisms: tuple[str, ...] = ("PLAIN",)

    def __post_init__(self) -> None:
        if self.protocol not in PROTOCOLS:
            raise ValueError(f"protocol must be one of {', '.join(PROTOCOLS)}, not {self.protocol!r}")
        if self.protocol.endswith("SSL") and self.keystore is None:
            raise ValueError(f"{self.protocol} needs a keystore (PEM: private key and certificate chain)")
        if self.protocol.startswith("SASL_"):
            if not self.users:
                raise ValueError(f"{self.protocol} needs at least one user")
            unknown = set(self.mechanisms) - set(SASL_MECHANISMS)
            if unknown or not self.mechanisms:
                raise ValueError(f"mechanisms must be among {', '.join(SASL_MECHANISMS)}")
        for text in [*self.users, *self.users.values()]:
            if not re.fullmatch(r"[A-Za-z0-9_.-]+", text):
                raise ValueError(f"SASL user names and passwords here are [A-Za-z0-9_.-]+, not {text!r}")

    @property
    def name(self) -> str:
        """The listener's name: its protocol."""
        return self.protocol

    def properties(self) -> dict[str, str]:
        """The broker settings for this listener (besides its place in ``listeners``)."""
        prefix = f"listener.name.{self.name.lower()}."
        props: dict[str, str] = {}
        if self.protocol.endswith("SSL"):
            props[prefix + "ssl.keystore.type"] = "PEM"
            props[prefix + "ssl.keystore.location"] = str(self.keystore)
        if self.protocol.startswith("SASL_"):
            props["sasl.enabled.mechanisms"] = ",".join(self.mechanisms)
            if "PLAIN" in self.mechanisms:
                users = " ".join(f'user_{name}="{password}"' for name, password in self.users.items())
                props[prefix + "plain.sasl.jaas.config"] = (
                    f"org.apache.kafka.common.security.plain.PlainLoginModule required {users};")
            if "SCRAM-SHA-256" in self.mechanisms:
                props[prefix + "scram-sha-256.sasl.jaas.config"] = (
                    "org.apache.kafka.common.security.scram.ScramLoginModule required;")
        return props

    def format_arguments(self) -> list[str]:
        """``kafka-storage format`` arguments creating the SCRAM users."""
        if not self.protocol.startswith("SASL_") or "SCRAM-SHA-256" not in self.mechanisms:
            return []
        return [argument for name, password in self.users.items()
                for argument in ("--add-scram", f"SCRAM-SHA-256=[name={name},password={password}]")]


@dataclass(slots=True)
class KafkaNode:
    """One combined broker+controller process."""

    node_id: int
    directory: Path
    port: int
    advertised_port: int
    internal_port: int
    controller_port: int
    process: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @property
    def log_path(self) -> Path:
        """The node's log file."""
        return self.directory / "server.log"

    @property
    def running(self) -> bool:
        """Whether the node's process is alive."""
        return self.process is not None and self.process.poll() is None

    def log_tail(self, lines: int = 30) -> str:
        """The end of the node's log, for failure messages."""
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"


class KafkaCluster:
    """``size`` Apache Kafka nodes in KRaft mode on loopback; a context manager.

    ``bootstrap_servers`` lists every node's advertised address. With one node,
    ``port``/``advertised_port`` choose its ports (a test puts a proxy on the
    advertised one). Replication settings follow the size: factor ``size`` and
    ``min.insync.replicas=2`` for three nodes, 1 for one. ``client_listener``
    secures a single node's client-facing listener (see :class:`ClientListener`).
    """

    def __init__(
        self,
        size: int = 1,
        *,
        port: int | None = None,
        advertised_port: int | None = None,
        workdir: Path | None = None,
        startup_timeout_s: float = 90.0,
        extra_properties: dict[str, str] | None = None,
        client_listener: ClientListener | None = None,
    ) -> None:
        if size < 1:
            raise ValueError("size must be at least 1")
        if size > 1 and (port or advertised_port or client_listener):
            raise ValueError("port/advertised_port/client_listener are for a single node")
        self.client_listener = client_listener or ClientListener()
        self.size = size
        self.workdir = workdir or Path(tempfile.mkdtemp(prefix="kafka-"))
        self._owns_workdir = workdir is None
        self._startup_timeout_s = startup_timeout_s
        self._extra = extra_properties or {}
        self.cluster_id = _cluster_id()
        self.nodes: list[KafkaNode] = []
        for node_id in range(1, size + 1):
            listen = port if (port and size == 1) else free_port()
            self.nodes.append(KafkaNode(
                node_id=node_id, directory=self.workdir / f"node-{node_id}", port=listen,
                advertised_port=advertised_port or listen, internal_port=free_port(),
                controller_port=free_port()))
        self._jars: Path | None = None

    @property
    def bootstrap_servers(self) -> str:
        """The addresses clients should use (the advertised ones)."""
        return ",".join(f"127.0.0.1:{n.advertised_port}" for n in self.nodes)

    @property
    def internal_bootstrap_servers(self) -> str:
        """The broker-to-broker listeners: never behind a test's proxy."""
        return ",".join(f"127.0.0.1:{n.internal_port}" for n in self.nodes)

    def node(self, node_id: int) -> KafkaNode:
        """The node with this ID (1-based)."""
        return self.nodes[node_id - 1]

    # -- configuration -----------------------------------------------------

    def _properties(self, node: KafkaNode) -> str:
        voters = ",".join(f"{n.node_id}@127.0.0.1:{n.controller_port}" for n in self.nodes)
        replication = str(min(self.size, 3))
        min_isr = "2" if self.size >= 3 else "1"
        client = self.client_listener
        props = {
            "process.roles": "broker,controller",
            "node.id": str(node.node_id),
            "controller.quorum.voters": voters,
            "listeners": (f"{client.name}://127.0.0.1:{node.port},INTERNAL://127.0.0.1:{node.internal_port},"
                          f"CONTROLLER://127.0.0.1:{node.controller_port}"),
            "advertised.listeners": (f"{client.name}://127.0.0.1:{node.advertised_port},"
                                     f"INTERNAL://127.0.0.1:{node.internal_port}"),
            "listener.security.protocol.map": (f"{client.name}:{client.protocol},INTERNAL:PLAINTEXT,"
                                               "CONTROLLER:PLAINTEXT"),
            "inter.broker.listener.name": "INTERNAL",
            "controller.listener.names": "CONTROLLER",
            "log.dirs": str(node.directory / "data"),
            "num.partitions": "1",
            "auto.create.topics.enable": "true",
            "default.replication.factor": replication,
            "min.insync.replicas": min_isr,
            "offsets.topic.replication.factor": replication,
            "offsets.topic.num.partitions": "10",
            "transaction.state.log.replication.factor": replication,
            "transaction.state.log.min.isr": min_isr,
            "transaction.state.log.num.partitions": "10",
            "unclean.leader.election.enable": "false",
            "group.initial.rebalance.delay.ms": "0",
            "group.min.session.timeout.ms": "500",
            "log.retention.check.interval.ms": "60000",
            "num.network.threads": "2",
            "num.io.threads": "4",
            "num.recovery.threads.per.data.dir": "1",
            "background.threads": "4",
            # Faster failover on a three-node cluster: a dead broker is fenced
            # (and its partitions get new leaders) within a few seconds.
            "broker.session.timeout.ms": "4000",
            "broker.heartbeat.interval.ms": "1000",
            "controller.quorum.election.timeout.ms": "1000",
            "controller.quorum.fetch.timeout.ms": "2000",
            "replica.lag.time.max.ms": "5000",
            "share.coordinator.state.topic.replication.factor": replication,
            "share.coordinator.state.topic.min.isr": min_isr,
            **client.properties(),
            **self._extra,
        }
        return "".join(f"{key}={value}\n" for key, value in props.items())

    @staticmethod
    def _log4j(node: KafkaNode) -> str:
        return (
            "status = warn\n"
            "appender.file.type = File\n"
            "appender.file.name = file\n"
            f"appender.file.fileName = {node.log_path}\n"
            "appender.file.layout.type = PatternLayout\n"
            "appender.file.layout.pattern = [%d] %p %m (%c)%n\n"
            "rootLogger.level = INFO\n"
            "rootLogger.appenderRef.file.ref = file\n"
            "logger.kafka.name = org.apache.kafka\n"
            "logger.kafka.level = INFO\n"
        )

    def _java(self, main: str, *args: str, node: KafkaNode) -> list[str]:
        assert self._jars is not None
        return ["java", *JVM_OPTS, f"-Dlog4j2.configurationFile={node.directory / 'log4j2.properties'}",
                "-cp", f"{self._jars}/*", main, *args]

    # -- lifecycle -----------------------------------------------------------

    def start(self) -> KafkaCluster:
        """Format every node's storage, start them all and wait until the cluster serves."""
        self._jars = jars_dir()
        for node in self.nodes:
            node.directory.mkdir(parents=True, exist_ok=True)
            (node.directory / "server.properties").write_text(self._properties(node))
            (node.directory / "log4j2.properties").write_text(self._log4j(node))
            result = subprocess.run(
                self._java("kafka.tools.StorageTool", "format", "--ignore-formatted",
                           "-t", self.cluster_id, "-c", str(node.directory / "server.properties"),
                           *self.client_listener.format_arguments(), node=node),
                capture_output=True, text=True, timeout=120, check=False)
            if result.returncode != 0:
                raise KafkaUnavailable(f"formatting Kafka storage failed: {result.stderr.strip()[-400:]}")
        for node in self.nodes:
            self._spawn(node)
        try:
            self.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def _spawn(self, node: KafkaNode) -> None:
        with open(node.directory / "stdout.log", "ab") as out:
            node.process = subprocess.Popen(
                self._java("kafka.Kafka", str(node.directory / "server.properties"), node=node),
                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)

    def wait_ready(self, timeout_s: float | None = None) -> float:
        """Wait until every running node is registered and serves metadata; returns the seconds waited."""
        from kafka import KafkaAdminClient

        started = time.monotonic()
        deadline = started + (timeout_s or self._startup_timeout_s)
        live = [n for n in self.nodes if n.running]
        last = "no answer yet"
        while time.monotonic() < deadline:
            for node in live:
                if not node.running:
                    raise KafkaUnavailable(
                        f"Kafka node {node.node_id} exited with {node.process and node.process.returncode}; "
                        f"see {node.log_path}:\n{node.log_tail()}")
            try:
                admin = KafkaAdminClient(
                    bootstrap_servers=",".join(f"127.0.0.1:{n.internal_port}" for n in live),
                    request_timeout_ms=5000)
                try:
                    brokers = {b["broker_id"] for b in admin.describe_cluster()["brokers"] if not b.get("is_fenced")}
                finally:
                    admin.close()
                if brokers >= {n.node_id for n in live}:
                    return time.monotonic() - started
                last = f"brokers registered: {sorted(brokers)}"
            except Exception as exc:
                last = f"{type(exc).__name__}: {exc}"
            time.sleep(0.3)
        raise KafkaUnavailable(f"Kafka did not become ready in time ({last}); see {self.workdir}")

    def kill(self, node_id: int, sig: int = signal.SIGKILL) -> None:
        """Kill one node (SIGKILL by default: no clean shutdown)."""
        node = self.node(node_id)
        if node.process is not None and node.process.poll() is None:
            node.process.send_signal(sig)
            if sig in (signal.SIGKILL, signal.SIGTERM):
                node.process.wait(timeout=60)

    def start_node(self, node_id: int) -> None:
        """Start a stopped node again with its data (does not wait; see :meth:`wait_ready`)."""
        node = self.node(node_id)
        if not node.running:
            self._spawn(node)

    def stop_node(self, node_id: int, timeout_s: float = 30.0) -> None:
        """Stop one node cleanly (SIGTERM), killing it if it takes longer than ``timeout_s``."""
        node = self.node(node_id)
        if node.process is None or node.process.poll() is not None:
            return
        node.process.terminate()
        try:
            node.process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            node.process.kill()
            node.process.wait()

    def stop(self) -> None:
        """Stop every node, the controllers last so the brokers can shut down cleanly."""
        for node in self.nodes:
            if node.process is not None and node.process.poll() is None:
                node.process.terminate()
        for node in self.nodes:
            if node.process is not None:
                try:
                    node.process.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    node.process.kill()
                    node.process.wait()

    def close(self) -> None:
        """Stop every node and remove the cluster's directory if the cluster made it."""
        self.stop()
        if self._owns_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> KafkaCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- what the failover tests ask ----------------------------------------

    def leader_of(self, topic: str, partition: int) -> int:
        """The node ID leading ``topic``'s ``partition`` (asked over the internal listener)."""
        return self.leaders(topic)[partition]

    def leaders(self, topic: str, timeout_s: float = 60.0) -> dict[int, int]:
        """Partition -> leader node ID for ``topic``, once every partition has a leader."""
        def ask() -> dict[int, int] | None:
            leaders = {p: int(info["leader_id"]) for p, info in self._describe_partitions(topic).items()}
            return leaders if leaders and min(leaders.values()) >= 0 else None

        return self._retry(ask, timeout_s, f"leaders of {topic}")

    def _describe_partitions(self, topic: str) -> dict[int, dict[str, Any]]:
        from kafka import KafkaAdminClient

        admin = KafkaAdminClient(bootstrap_servers=self._live_internal(), request_timeout_ms=10000)
        try:
            described = admin.describe_topics([topic])
        finally:
            admin.close()
        return {int(p["partition_index"]): p for p in described[0]["partitions"]}

    def coordinator_of(self, group: str, timeout_s: float = 60.0) -> int:
        """The node ID coordinating consumer group ``group`` (retried while a new one is elected)."""
        from kafka import KafkaAdminClient

        def ask() -> int | None:
            admin = KafkaAdminClient(bootstrap_servers=self._live_internal(), request_timeout_ms=10000)
            try:
                # kafka-python has no public "find coordinator"; its admin client does it internally.
                return int(admin._manager.run(admin._find_coordinator_ids, [group])[group])
            finally:
                admin.close()

        return self._retry(ask, timeout_s, f"the coordinator of {group}")

    @staticmethod
    def _retry(ask: Callable[[], T | None], timeout_s: float, what: str) -> T:
        """``ask()`` until it answers (not ``None``, no exception), for up to ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        last = "no answer"
        while True:
            try:
                answer = ask()
                if answer is not None:
                    return answer
            except Exception as exc:  # a broker just died or came back: ask again
                last = f"{type(exc).__name__}: {exc}"
            if time.monotonic() > deadline:
                raise KafkaUnavailable(f"could not learn {what} in {timeout_s:.0f}s ({last})")
            time.sleep(0.3)

    def _live_internal(self) -> str:
        live = [n for n in self.nodes if n.running] or self.nodes
        return ",".join(f"127.0.0.1:{n.internal_port}" for n in live)


@contextlib.contextmanager
def kafka_cluster(size: int = 1, **kwargs: object) -> Iterator[KafkaCluster]:
    """``with kafka_cluster(3) as cluster: ...``"""
    cluster = KafkaCluster(size, **kwargs)  # type: ignore[arg-type]
    with cluster:
        yield cluster


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=1)
    parser.add_argument("--fetch-only", action="store_true", help="only fetch the jars")
    args = parser.parse_args()
    try:
        if args.fetch_only:
            print(jars_dir())
            return
        with KafkaCluster(args.nodes) as cluster:
            print(cluster.bootstrap_servers, flush=True)
            with contextlib.suppress(KeyboardInterrupt):
                signal.pause()
    except KafkaUnavailable as exc:
        raise SystemExit(f"kafka: {exc}") from None


if __name__ == "__main__":
    main()
