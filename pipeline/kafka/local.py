"""A real single-node Kafka (KRaft, broker+controller) from Apache's jars on Maven Central.

`headwater kafka up | down | status` and the test fixture use this, so a fresh machine needs only Java
and Maven: the jars are resolved by `mvn` from pipeline/kafka/pom.xml into a cache outside the work tree.
"""

from __future__ import annotations

import base64
import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.config import LocalKafkaSettings
from pipeline.errors import LocalKafkaError

POM = Path(__file__).with_name("pom.xml")
KAFKA_VERSION = "4.1.1"

_LOG4J2 = """\
status = warn
appender.file.type = File
appender.file.name = file
appender.file.fileName = {log}
appender.file.layout.type = PatternLayout
appender.file.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = warn
rootLogger.appenderRef.file.ref = file
logger.kafka.name = kafka
logger.kafka.level = info
logger.server.name = org.apache.kafka.server
logger.server.level = info
"""


@dataclass(frozen=True)
class SecuredListener:
    """An extra SASL_SSL listener next to the plaintext one, for testing Kafka security end to end.

    The broker presents `certfile` (PEM chain) with `keyfile` (PEM, PKCS#8, unencrypted); clients log in
    with SCRAM as one of `users`, whose credentials are written into the storage when it is formatted
    (`kafka-storage format --add-scram`), so they exist before the broker takes its first connection.
    The quick-start broker has none: it stays plaintext on loopback.
    """

    port: int
    certfile: Path
    keyfile: Path
    users: Mapping[str, str] = field(default_factory=dict)  # SCRAM user name -> password

    def scram_arguments(self) -> list[str]:
        """`--add-scram` arguments: each user under both SCRAM mechanisms."""
        out: list[str] = []
        for name, password in sorted(self.users.items()):
            for mechanism in SCRAM_MECHANISMS:
                out += ["--add-scram", f"{mechanism}=[name={name},password={password}]"]
        return out

    def properties(self) -> list[str]:
        jaas = "org.apache.kafka.common.security.scram.ScramLoginModule required;"
        return [
            f"sasl.enabled.mechanisms={','.join(SCRAM_MECHANISMS)}",
            *(f"listener.name.sasl_ssl.{m.lower()}.sasl.jaas.config={jaas}" for m in SCRAM_MECHANISMS),
            "listener.name.sasl_ssl.ssl.keystore.type=PEM",
            f"listener.name.sasl_ssl.ssl.keystore.location={self._keystore_pem()}",
        ]

    def _keystore_pem(self) -> Path:
        """Kafka's PEM keystore is one file: the private key, then the certificate chain."""
        combined = self.keyfile.with_name(self.keyfile.stem + ".keystore.pem")
        combined.write_text(self.keyfile.read_text() + self.certfile.read_text())
        return combined


SCRAM_MECHANISMS = ("SCRAM-SHA-256", "SCRAM-SHA-512")


@dataclass(frozen=True)
class BrokerStatus:
    running: bool
    pid: int | None
    bootstrap: str
    data_dir: Path
    controller: str | None = None  # host:port of the KRaft controller; None before the first start

    def describe(self) -> str:
        controller = f", controller on {self.controller}" if self.controller else ""
        if self.running:
            return (
                f"kafka {KAFKA_VERSION} running (pid {self.pid}) on {self.bootstrap}{controller}, "
                f"data in {self.data_dir}"
            )
        return f"kafka not running (would listen on {self.bootstrap}{controller}, data in {self.data_dir})"


class LocalKafka:
    """One local broker, identified by its data directory (pid file, config, log and KRaft storage)."""

    def __init__(self, settings: LocalKafkaSettings, secured: SecuredListener | None = None) -> None:
        self.settings = settings
        self.secured = secured
        self.data_dir = settings.data_dir.expanduser().resolve()
        self.jars_dir = settings.jars_dir.expanduser().resolve() / KAFKA_VERSION
        self.pid_file = self.data_dir / "broker.pid"
        self.log_file = self.data_dir / "server.log"  # log4j2 output
        self.stdout_file = self.data_dir / "broker.out"  # JVM stdout/stderr
        self.properties_file = self.data_dir / "server.properties"

    @property
    def bootstrap(self) -> str:
        return f"{self.settings.host}:{self.settings.port}"

    @property
    def secured_bootstrap(self) -> str:
        """host:port of the SASL_SSL listener (only with a SecuredListener)."""
        if self.secured is None:
            raise LocalKafkaError("this broker has no SASL_SSL listener")
        return f"{self.settings.host}:{self.secured.port}"

    # --- jars -------------------------------------------------------------------------------------------

    def ensure_jars(self) -> Path:
        """Resolve the broker jars once; later calls reuse the cache."""
        marker = self.jars_dir / ".complete"
        if marker.exists():
            return self.jars_dir
        mvn = _require("mvn", "Maven")
        _require("java", "Java (17 or newer)")
        self.jars_dir.mkdir(parents=True, exist_ok=True)
        command = [
            mvn,
            "-q",
            "-B",
            "-f",
            str(POM),
            "dependency:copy-dependencies",
            f"-DoutputDirectory={self.jars_dir}",
        ]
        result = subprocess.run(command, capture_output=True, text=True, check=False)
        if result.returncode != 0:
            tail = (result.stdout + result.stderr).strip().splitlines()[-5:]
            raise LocalKafkaError("mvn could not resolve the Kafka jars: " + " | ".join(tail))
        marker.touch()
        return self.jars_dir

    # --- lifecycle --------------------------------------------------------------------------------------

    def status(self) -> BrokerStatus:
        pid = self._our_pid()
        running = pid is not None and _port_open(self.settings.host, self.settings.port)
        port = self.settings.controller_port or self._last_controller_port()
        controller = f"{self.settings.host}:{port}" if port else None
        return BrokerStatus(running, pid, self.bootstrap, self.data_dir, controller)

    def controller_port(self) -> int:
        """The controller port to start with: local_kafka.controller_port when set; else the one this data
        dir used last, the broker port + 1, or any free port, whichever is free first."""
        if self.settings.controller_port:
            if _port_open(self.settings.host, self.settings.controller_port):
                raise LocalKafkaError(
                    f"controller port {self.settings.controller_port} is taken; set "
                    "local_kafka.controller_port to another, or to 0 to have one chosen"
                )
            return self.settings.controller_port
        for candidate in (self._last_controller_port(), self.settings.port + 1):
            if candidate and candidate != self.settings.port and _port_free(self.settings.host, candidate):
                return candidate
        return free_port(self.settings.host)

    def up(self, timeout_s: float = 90.0, bound_to_parent: bool = False) -> BrokerStatus:
        """Start the broker unless it already runs; return once it accepts connections.

        `bound_to_parent` makes the broker die with the calling process (used by the test fixture).
        """
        current = self.status()
        if current.running:
            return current
        if self._our_pid() is None and _port_open(self.settings.host, self.settings.port):
            raise LocalKafkaError(
                f"port {self.settings.port} on {self.settings.host} is taken by something that is not "
                f"our broker (data dir {self.data_dir}); choose another with --port"
            )
        controller_port = self.controller_port()
        jars = self.ensure_jars()
        java = _require("java", "Java (17 or newer)")
        self.data_dir.mkdir(parents=True, exist_ok=True)
        properties = self._write_config(controller_port)
        classpath = f"{jars}/*"
        if not (self.data_dir / "kraft" / "meta.properties").exists():
            cluster_id = new_cluster_id()
            fmt = subprocess.run(
                [
                    java,
                    "-cp",
                    classpath,
                    "kafka.tools.StorageTool",
                    "format",
                    f"--cluster-id={cluster_id}",
                    "-c",
                    str(properties),
                    *(self.secured.scram_arguments() if self.secured else []),
                ],
                capture_output=True,
                text=True,
                check=False,
            )
            if fmt.returncode != 0:
                raise LocalKafkaError(f"formatting KRaft storage failed: {fmt.stdout}{fmt.stderr}".strip())
        if self.log_file.exists():  # keep one previous log; readiness is read from the fresh one
            self.log_file.replace(self.log_file.with_suffix(".log.1"))
        log = self.stdout_file.open("ab")
        command = [
            java,
            f"-Xms{self.settings.heap}",
            f"-Xmx{self.settings.heap}",
            "-XX:+UseG1GC",
            "-XX:TieredStopAtLevel=1",
            f"-Dlog4j2.configurationFile={self.data_dir / 'log4j2.properties'}",
            "-Dkafka.logs.dir=" + str(self.data_dir),
            "-cp",
            classpath,
            "kafka.Kafka",
            str(properties),
        ]
        process = subprocess.Popen(
            command,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=not bound_to_parent,
            preexec_fn=_die_with_parent if bound_to_parent else None,
        )
        log.close()
        self.pid_file.write_text(str(process.pid))
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if process.poll() is not None:
                self.pid_file.unlink(missing_ok=True)
                raise LocalKafkaError(
                    f"broker exited with code {process.returncode}; "
                    f"see {self.log_file} and {self.stdout_file}"
                )
            if _port_open(self.settings.host, self.settings.port) and self._log_says_started():
                return self.status()
            time.sleep(0.2)
        self.down()
        raise LocalKafkaError(f"broker did not start within {timeout_s:.0f}s; see {self.log_file}")

    def down(self, timeout_s: float = 30.0) -> bool:
        """Stop the broker if it runs (SIGTERM, then SIGKILL after the timeout). True if one was stopped."""
        pid = self._our_pid()
        if pid is None:
            self.pid_file.unlink(missing_ok=True)
            return False
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and _alive(pid):
            time.sleep(0.1)
        if _alive(pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.pid_file.unlink(missing_ok=True)
        return True

    # --- internals --------------------------------------------------------------------------------------

    def _our_pid(self) -> int | None:
        try:
            pid = int(self.pid_file.read_text().strip())
        except (FileNotFoundError, ValueError):
            return None
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
        except OSError:
            return pid if _alive(pid) else None
        if "kafka.Kafka" in cmdline and str(self.data_dir) in cmdline:
            return pid
        return None

    def _log_says_started(self) -> bool:
        try:
            return b"Kafka Server started" in self.log_file.read_bytes()
        except OSError:
            return False

    def _last_controller_port(self) -> int | None:
        """The controller port in the config this data dir was last started with."""
        try:
            text = self.properties_file.read_text()
        except OSError:
            return None
        match = re.search(r"^controller\.quorum\.voters=1@.*:(\d+)$", text, re.M)
        return int(match.group(1)) if match else None

    def _write_config(self, controller_port: int) -> Path:
        s = self.settings
        (self.data_dir / "log4j2.properties").write_text(_LOG4J2.format(log=self.log_file))
        properties = self.properties_file
        listeners = f"PLAINTEXT://{s.host}:{s.port},CONTROLLER://{s.host}:{controller_port}"
        advertised = f"PLAINTEXT://{s.host}:{s.port}"
        protocols = "PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT"
        secured: list[str] = []
        if self.secured is not None:
            listeners += f",SASL_SSL://{s.host}:{self.secured.port}"
            advertised += f",SASL_SSL://{s.host}:{self.secured.port}"
            protocols += ",SASL_SSL:SASL_SSL"
            secured = self.secured.properties()
        properties.write_text(
            "\n".join(
                [
                    "process.roles=broker,controller",
                    "node.id=1",
                    f"controller.quorum.voters=1@{s.host}:{controller_port}",
                    f"listeners={listeners}",
                    f"advertised.listeners={advertised}",
                    "controller.listener.names=CONTROLLER",
                    f"listener.security.protocol.map={protocols}",
                    *secured,
                    "inter.broker.listener.name=PLAINTEXT",
                    f"log.dirs={self.data_dir / 'kraft'}",
                    "num.network.threads=2",
                    "num.io.threads=4",
                    "offsets.topic.replication.factor=1",
                    "offsets.topic.num.partitions=10",
                    "transaction.state.log.replication.factor=1",
                    "transaction.state.log.min.isr=1",
                    "group.initial.rebalance.delay.ms=0",
                    "auto.create.topics.enable=true",
                    "num.partitions=1",
                    "log.retention.hours=168",
                    "",
                ]
            )
        )
        return properties


def new_cluster_id() -> str:
    """A random KRaft cluster id as Kafka's Uuid.randomUuid makes one: 22 URL-safe base64 characters, never
    starting with '-' (1 in 64 would, and a command-line tool reads such an id as an option)."""
    while True:
        text = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        if not text.startswith("-"):
            return text


def _require(command: str, name: str) -> str:
    found = shutil.which(command)
    if not found:
        raise LocalKafkaError(
            f"{name} is required to run the local Kafka broker: `{command}` not found on PATH"
        )
    return found


def _port_open(host: str, port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=0.5):
        return True
    return False


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie child of ours is not alive
        state = Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
        return state != "Z"
    except OSError:
        return True


def _die_with_parent() -> None:
    """Linux: SIGKILL this child when the parent exits, so a killed test run leaves no broker behind."""
    import ctypes

    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    pr_set_pdeathsig = 1
    libc.prctl(pr_set_pdeathsig, signal.SIGKILL)


def _port_free(host: str, port: int) -> bool:
    """Whether a server could listen on host:port now (nothing listens, nothing holds it)."""
    with socket.socket() as sock:
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])
