"""`headwater receiver --processes N`: N receiver processes on one port, one per core.

Each child binds the port with SO_REUSEPORT, so the kernel spreads new connections over the children
and a child that dies takes none of the others down. The supervisor restarts a child that exits, and
gives all of them one prometheus_client multiprocess directory, so /metrics on any child answers the
sum over all of them.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from prometheus_client import multiprocess

log = logging.getLogger(__name__)

RESTART_DELAY_S = 1.0


def reserve_port(host: str, port: int) -> socket.socket:
    """A bound (not listening) SO_REUSEPORT socket that holds the port for the children; port 0 = any."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    return sock


class ReceiverProcesses:
    """Start, watch and stop N `headwater receiver` children sharing one port."""

    def __init__(self, command: Sequence[str], host: str, port: int, processes: int) -> None:
        self.reserved = reserve_port(host, port)
        self.port = int(self.reserved.getsockname()[1])
        self.metrics_dir = Path(tempfile.mkdtemp(prefix="headwater-receiver-metrics-"))
        self.command = [*command, "--host", host, "--port", str(self.port), "--child"]
        self.children: list[subprocess.Popen[bytes]] = []
        self.processes = processes
        self.stopping = False

    def _spawn(self) -> subprocess.Popen[bytes]:
        env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(self.metrics_dir)}
        child = subprocess.Popen(self.command, env=env, stdin=subprocess.DEVNULL)
        log.info("receiver process started, pid %s", child.pid)
        return child

    def run(self) -> None:
        """Run until SIGINT/SIGTERM; a child that exits meanwhile is replaced after a short delay."""

        def request_stop(signum: int, frame: object) -> None:
            self.stopping = True

        signal.signal(signal.SIGINT, request_stop)
        signal.signal(signal.SIGTERM, request_stop)
        self.children = [self._spawn() for _ in range(self.processes)]
        try:
            while not self.stopping:
                for index, child in enumerate(self.children):
                    if child.poll() is not None and not self.stopping:
                        log.warning(
                            "receiver process %s exited with %s; restarting", child.pid, child.returncode
                        )
                        multiprocess.mark_process_dead(child.pid, str(self.metrics_dir))  # type: ignore[no-untyped-call]
                        time.sleep(RESTART_DELAY_S)
                        self.children[index] = self._spawn()
                time.sleep(0.2)
        finally:
            self.stop()

    def stop(self) -> None:
        for child in self.children:
            if child.poll() is None:
                child.send_signal(signal.SIGTERM)
        for child in self.children:
            try:
                child.wait(timeout=30)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()
        self.reserved.close()
        shutil.rmtree(self.metrics_dir, ignore_errors=True)
