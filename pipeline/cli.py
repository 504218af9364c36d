"""`headwater` command line: each subcommand parses options, calls one library function, renders.

A HeadwaterError prints one line and exits with its code (1, or 2 for a bad id); --debug shows tracebacks.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Coroutine, Mapping
from pathlib import Path
from typing import Any, TypeVar

import click

from pipeline import logs
from pipeline.config import EXAMPLE_CONFIG, Settings, load_settings
from pipeline.errors import HeadwaterError
from pipeline.kafka.local import LocalKafka
from pipeline.kafka.security import verify_access
from pipeline.ops.dlq_cli import dlq_command
from pipeline.ops.replay import replay_command
from pipeline.rewards.cli import rewards_command
from pipeline.sources import SOURCES

T = TypeVar("T")
F = TypeVar("F", bound=Callable[..., Any])
log = logging.getLogger("pipeline.cli")


class Context:
    def __init__(
        self, config: str | None, debug: bool, log_level: logs.Level | None, log_format: logs.Format | None
    ) -> None:
        self.config = config
        self.debug = debug
        self.log_level: logs.Level | None = "debug" if debug else log_level
        self.log_format = log_format

    def settings(self, **overrides: Any) -> Settings:
        """Load the settings (see `load`); with a secured Kafka, log in once first: a refused password or an
        untrusted certificate ends the command here with one line (KafkaAccessRefused), before any client
        starts retrying it as if Kafka were down."""
        settings = self.load(overrides)
        if settings.kafka.security_protocol != "PLAINTEXT":
            asyncio.run(verify_access(settings.kafka))
        return settings

    def load(self, overrides: Mapping[str, Any]) -> Settings:
        """Load the settings, then log as they say unless a flag said otherwise (no Kafka check: for the
        commands that do not use the configured Kafka)."""
        settings = load_settings(self.config, overrides=overrides)
        logs.configure(
            self.log_level or settings.logging.level,
            self.log_format or settings.logging.format,
            kafka_bootstrap=settings.kafka.bootstrap_servers,
            kafka_outage_summary_s=settings.logging.kafka_outage_summary_s,
        )
        return settings

    def global_options(self) -> list[str]:
        """The global options this process got, for the `headwater` processes it starts."""
        options = ["--config", self.config] if self.config else []
        options += ["--debug"] if self.debug else []
        options += ["--log-level", self.log_level] if self.log_level and not self.debug else []
        return options + (["--log-format", self.log_format] if self.log_format else [])

    def announce_config(self, command: str) -> None:
        """The one start-up line that says which config a long-running command runs on."""
        log.info("%s: config %s", command, self.config or f"{EXAMPLE_CONFIG} (the shipped example)")


class HeadwaterGroup(click.Group):
    """Print HeadwaterErrors as one red line instead of a traceback."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except HeadwaterError as exc:
            if ctx.obj is not None and ctx.obj.debug:
                raise
            click.secho(f"error: {exc}", fg="red", err=True)
            ctx.exit(exc.exit_code)


@click.group(cls=HeadwaterGroup)
@click.option(
    "--config",
    envvar="HEADWATER_CONFIG",
    show_envvar=True,
    type=click.Path(dir_okay=False),
    help="TOML config file (default: the shipped example).",
)
@click.option("--debug", is_flag=True, help="Show tracebacks and debug logs (same as --log-level debug).")
@click.option(
    "--log-level",
    type=click.Choice(logs.LEVELS),
    help="Headwater's log level (default logging.level: info); libraries log warnings unless debug.",
)
@click.option(
    "--log-format",
    type=click.Choice(logs.FORMATS),
    help="text, or json: one JSON object per line (default logging.format).",
)
@click.pass_context
def main(
    ctx: click.Context,
    config: str | None,
    debug: bool,
    log_level: logs.Level | None,
    log_format: logs.Format | None,
) -> None:
    """Headwater: vendor events in, one clean deduplicated stream out."""
    ctx.obj = Context(config, debug, log_level, log_format)
    logs.configure(ctx.obj.log_level or "info", log_format or "text")  # until the settings are read


def run_async(factory: Callable[[asyncio.Event], Coroutine[Any, Any, T]]) -> T:
    """Run a coroutine that stops when SIGINT/SIGTERM sets the event it is given."""

    async def runner() -> T:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        return await factory(stop)

    with contextlib.suppress(ImportError):
        import uvloop

        return uvloop.run(runner())
    return asyncio.run(runner())


# --- kafka ----------------------------------------------------------------------------------------------


@main.group()
def kafka() -> None:
    """The local single-node Kafka broker (KRaft, Apache jars from Maven Central)."""


def _local_kafka(ctx: Context, port: int | None, data_dir: str | None) -> LocalKafka:
    settings = ctx.load({"local_kafka.port": port, "local_kafka.data_dir": data_dir})  # the local broker only
    return LocalKafka(settings.local_kafka)


def _broker_options(command: F) -> F:
    """--port and --data-dir, shared by kafka up, down and status."""
    command = click.option(
        "--data-dir",
        type=click.Path(file_okay=False),
        help="Storage directory (default local_kafka.data_dir).",
    )(command)
    return click.option("--port", type=int, help="Broker port (default local_kafka.port).")(command)


@kafka.command("up")
@_broker_options
@click.pass_obj
def kafka_up(ctx: Context, port: int | None, data_dir: str | None) -> None:
    """Start the broker (idempotent) and wait until it answers."""
    click.echo(_local_kafka(ctx, port, data_dir).up().describe())


@kafka.command("down")
@_broker_options
@click.pass_obj
def kafka_down(ctx: Context, port: int | None, data_dir: str | None) -> None:
    """Stop the broker (fine when none runs)."""
    stopped = _local_kafka(ctx, port, data_dir).down()
    click.echo("kafka stopped" if stopped else "kafka was not running")


@kafka.command("status")
@_broker_options
@click.pass_obj
def kafka_status(ctx: Context, port: int | None, data_dir: str | None) -> None:
    """Say whether the broker runs; exit 3 when it does not."""
    status = _local_kafka(ctx, port, data_dir).status()
    click.echo(status.describe())
    if not status.running:
        sys.exit(3)


# --- receiver -------------------------------------------------------------------------------------------


@main.command()
@click.option("--host", help="Listen address (default receiver.host).")
@click.option("--port", type=int, help="Listen port (default receiver.port).")
@click.option(
    "--processes",
    type=click.IntRange(1, 256),
    help="Receiver processes sharing the port, one per core (default receiver.processes).",
)
@click.option("--child", is_flag=True, hidden=True, help="Internal: one of the --processes children.")
@click.pass_obj
def receiver(ctx: Context, host: str | None, port: int | None, processes: int | None, child: bool) -> None:
    """Run the HTTP receiver until Ctrl-C."""
    settings = ctx.settings(**{"receiver.host": host, "receiver.port": port, "receiver.processes": processes})
    if child or settings.receiver.processes == 1:
        from pipeline.ingest.receiver import serve

        ctx.announce_config("receiver")
        run_async(lambda stop: serve(settings, stop, reuse_port=child, multiprocess_metrics=child))
        return
    from pipeline.ingest.processes import ReceiverProcesses

    command = [sys.executable, "-m", "pipeline.cli", *ctx.global_options()]
    supervisor = ReceiverProcesses(
        [*command, "receiver"], settings.receiver.host, settings.receiver.port, settings.receiver.processes
    )
    log.info(
        "receiver on http://%s:%s (%d processes, SO_REUSEPORT)",
        settings.receiver.host,
        supervisor.port,
        settings.receiver.processes,
    )
    supervisor.run()


# --- up -------------------------------------------------------------------------------------------------


@main.command()
@click.option(
    "--workers", type=int, default=1, show_default=True, help="Worker processes (one consumer group)."
)
@click.option("--port", type=int, help="Receiver port.")
@click.option(
    "--processes",
    type=click.IntRange(1, 256),
    help="Receiver processes, one per core (default receiver.processes).",
)
@click.option("--no-workers", is_flag=True, help="Run only Kafka and the receiver.")
@click.option("--no-rewards", is_flag=True, help="Do not run the reward webhook dispatcher.")
@click.pass_obj
def up(
    ctx: Context, workers: int, port: int | None, processes: int | None, no_workers: bool, no_rewards: bool
) -> None:
    """Run everything: local Kafka (unless disabled), the receiver, the workers and the reward webhook
    dispatcher. Ctrl-C stops all."""
    settings = ctx.settings(**{"receiver.port": port, "receiver.processes": processes})
    ctx.announce_config("up")
    broker: LocalKafka | None = None
    if settings.local_kafka.enabled:
        broker = LocalKafka(settings.local_kafka)
        started_here = not broker.status().running
        log.info("%s", broker.up().describe())
        if not started_here:
            broker = None  # not ours to stop
    base = [sys.executable, "-m", "pipeline.cli", *ctx.global_options()]
    receiver_args = ["--processes", str(settings.receiver.processes)] + (
        ["--port", str(port)] if port else []
    )
    commands = [base + ["receiver", *receiver_args]]
    if not no_workers:
        # One /metrics port per worker process: worker.web_port, +1, +2, ...
        web = settings.worker.web_port
        # ...and one data dir each: the dedup state has one owner (dedup_checkpoint.StoreLocked).
        data = settings.worker.data_dir
        commands += [
            base
            + ["worker", "--web-port", str(web + i if web else 0), "--data-dir", str(data / f"worker-{i}")]
            for i in range(workers)
        ]
    if not no_rewards:
        commands.append(base + ["rewards", "run"])
    children = [subprocess.Popen(command) for command in commands]
    log.info(
        "starting: receiver (%d process(es)), %d worker process(es), rewards dispatcher %s; "
        "'ready' follows once the receiver answers and the workers own their partitions",
        settings.receiver.processes,
        0 if no_workers else workers,
        "off" if no_rewards else "on",
    )
    ready = _Readiness(settings, port or settings.receiver.port, 0 if no_workers else workers, no_rewards)
    stopping = False

    def request_stop(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, request_stop)
    signal.signal(signal.SIGTERM, request_stop)
    try:
        while not stopping:
            for child in children:
                if child.poll() is not None:
                    what = " ".join(str(arg) for arg in child.args[len(base) :])  # type: ignore[index]
                    log.error("%s exited with %s", what, child.returncode)
                    stopping = True
            if not stopping and ready.check():
                log.info("%s", ready.line(ctx.config or f"{EXAMPLE_CONFIG} (the shipped example)"))
            time.sleep(0.2)
    finally:
        for child in children:
            if child.poll() is None:
                child.send_signal(signal.SIGTERM)
        for child in children:
            try:
                child.wait(timeout=30)
            except subprocess.TimeoutExpired:
                child.kill()
        if broker is not None:
            broker.down()
            log.info("kafka stopped")


class _Readiness:
    """Polls, every few tenths of a second until it holds once, what `up` needs to say "ready"."""

    def __init__(self, settings: Settings, receiver_port: int, workers: int, no_rewards: bool) -> None:
        self.settings = settings
        self.receiver = f"http://{_reachable(settings.receiver.host)}:{receiver_port}"
        web = settings.worker.web_port
        host = _reachable(settings.worker.web_host)
        self.workers = [f"http://{host}:{web + i}" for i in range(workers)] if web else []
        self.unchecked_workers = workers and not web
        self.no_rewards = no_rewards
        self.done = False
        self.started = time.monotonic()
        self.waiting: list[str] = []
        self.reported = 0.0

    def check(self) -> bool:
        """True once, when everything is ready; later calls say False (the line is printed once)."""
        from pipeline.ops import ready

        if self.done:
            return False
        waiting = [] if ready.answers(f"{self.receiver}/readyz") else ["receiver"]
        waiting += ready.stages_waiting([ready.health(f"{url}/health") for url in self.workers])
        waited = time.monotonic() - self.started
        if waiting and waited - self.reported > 30:  # a long wait says what it waits for
            self.reported = waited
            log.info("not ready after %.0fs: waiting for %s", waited, ", ".join(waiting))
        self.done = not waiting
        return self.done

    def line(self, config: str) -> str:
        s = self.settings
        workers = f"worker /metrics {self.workers[0]}" + (
            f" (+{len(self.workers) - 1} on the next ports)" if len(self.workers) > 1 else ""
        )
        if self.unchecked_workers:
            workers = "workers started (worker.web_port = 0: their partitions were not checked)"
        elif not self.workers:
            workers = "no workers"
        rewards = "rewards off" if self.no_rewards else f"rewards /metrics :{s.rewards.web_port}"
        raw = f"{s.topics.raw_prefix}{{{','.join(SOURCES)}}}"
        operator = s.receiver.operator_port
        receiver = self.receiver + (f" (/metrics :{operator})" if operator else "")
        return (
            f"ready in {time.monotonic() - self.started:.1f}s: receiver {receiver}, {workers}, "
            f"{rewards}; "
            f"topics {raw} -> {s.topics.canonical}, {s.topics.dlq}; config {config}"
        )


def _reachable(host: str) -> str:
    """The address to reach a server listening on host (a wildcard listener answers on loopback)."""
    return "127.0.0.1" if host in ("0.0.0.0", "::", "") else host  # noqa: S104 - compared, not bound


# --- worker ---------------------------------------------------------------------------------------------


@main.command("worker")
@click.option(
    "--source",
    "sources",
    multiple=True,
    type=click.Choice(SOURCES),
    help="Only these sources (repeatable; default all). Workers of one group must share the set.",
)
@click.option("--web-port", type=int, help="Port of /metrics (default worker.web_port; 0 = off).")
@click.option("--data-dir", help="Local state (the dedup store) of this worker (default worker.data_dir).")
@click.pass_obj
def worker(ctx: Context, sources: tuple[str, ...], web_port: int | None, data_dir: str | None) -> None:
    """Run the pipeline workers (normalize + dedup) until Ctrl-C."""
    from pipeline.stream.worker import Worker  # imports faust: only for the commands that run it

    settings = ctx.settings(**{"worker.web_port": web_port, "worker.data_dir": data_dir})
    ctx.announce_config(f"worker ({', '.join(sources)})" if sources else "worker")
    Worker(settings, sources or SOURCES).run()


# --- tail -----------------------------------------------------------------------------------------------


@main.command("tail")
@click.argument("topic")
@click.option(
    "-n",
    "count",
    type=click.IntRange(min=0),
    help="How many records (default 10; all with --from-beginning).",
)
@click.option("-f", "--follow", is_flag=True, help="Keep printing new records until Ctrl-C.")
@click.option("--from-beginning", is_flag=True, help="Start at the oldest record instead of the newest N.")
@click.option(
    "--meta", is_flag=True, help="Wrap each value with topic, partition, offset, timestamp, key, headers."
)
@click.pass_obj
def tail(ctx: Context, topic: str, count: int | None, follow: bool, from_beginning: bool, meta: bool) -> None:
    """Print the newest records of TOPIC, one JSON value a line (committed records only).

    TOPIC is a name as the shipped config spells it (events.canonical, events.dlq, raw.segment, ...),
    mapped to this config's topics, or any literal topic name. A value that is not JSON is printed as a
    JSON string.
    """
    from pipeline.ops.tail import TailOptions
    from pipeline.ops.tail import tail as run_tail

    options = TailOptions(topic, count, follow, from_beginning, meta)
    settings = ctx.settings()
    out = click.get_binary_stream("stdout")

    def write(lines: list[bytes]) -> None:
        out.write(b"".join(line + b"\n" for line in lines))
        out.flush()

    try:
        run_async(lambda stop: run_tail(settings, options, write, stop))
    except BrokenPipeError:  # `headwater tail ... | head`: the reader has what it wanted
        sys.stderr.close()


# --- import ---------------------------------------------------------------------------------------------


@main.command("import")
@click.argument("path", type=click.Path(exists=True, path_type=Path))
@click.option("--tenant", required=True, help="The tenant the bodies belong to (a configured tenant id).")
@click.option("--source", required=True, type=click.Choice(SOURCES), help="The source that sent them.")
@click.option(
    "--rate",
    type=click.FloatRange(min=1),
    default=1000,
    show_default=True,
    help="At most this many events per second (the share of the workers' capacity the import takes).",
)
@click.option(
    "--vendor",
    "vendor_pairs",
    multiple=True,
    metavar="NAME=VALUE",
    help="A vendor header the receiver would have stored (e.g. WebEngage's event_type); repeatable.",
)
@click.option(
    "--state",
    "state_file",
    type=click.Path(dir_okay=False, path_type=Path),
    help="The resume state file (default .headwater/imports/<source>-<tenant>-<hash>.json).",
)
@click.option("--restart", is_flag=True, help="Ignore an earlier run's state and import everything again.")
@click.pass_obj
def import_(
    ctx: Context,
    path: Path,
    tenant: str,
    source: str,
    rate: float,
    vendor_pairs: tuple[str, ...],
    state_file: Path | None,
    restart: bool,
) -> None:
    """Load request bodies from PATH (an NDJSON file, one body per line; a JSON file, one body; or a
    directory of them) into raw.<source> for a tenant, as the receiver would have written them, marked
    hw-imported. Resumable: run the same command again after Ctrl-C or a crash (docs/importing.md)."""
    from pipeline.ops import importing

    settings = ctx.settings()
    known = {t.id: t for t in settings.tenants}
    if tenant not in known:
        raise importing.ImportError_(f"unknown tenant {tenant!r} (configured: {', '.join(known) or 'none'})")
    vendor = dict(pair.split("=", 1) for pair in vendor_pairs if "=" in pair)
    if len(vendor) != len(vendor_pairs):
        raise importing.ImportError_("--vendor takes NAME=VALUE")
    files = importing.input_files(path)
    state_file = state_file or importing.state_path(tenant, source, path)
    state = None if restart else importing.load_state(state_file)
    if state is not None and (state.tenant, state.source) != (tenant, source):
        raise importing.ImportError_(f"{state_file} belongs to an import for {state.tenant}/{state.source}")
    if state is not None and state.done:
        click.echo(
            f"import {state.import_id} is complete ({state.records:,} records); --restart imports again"
        )
        return
    if state is None:
        state = importing.new_state(tenant, source, path)
        click.echo(
            f"import {state.import_id}: {len(files)} file(s) into {settings.topics.raw(source)}, "
            f"at most {rate:,.0f} events/s; state in {state_file}",
            err=True,
        )
    else:
        click.echo(
            f"resuming import {state.import_id} at {files[min(state.file_index, len(files) - 1)]} byte "
            f"{state.offset} ({state.records:,} records acknowledged before)",
            err=True,
        )
    vendor = importing.vendor_meta(source, known[tenant], vendor)
    chosen = state
    done = run_async(
        lambda stop: importing.run_import(
            settings, chosen, files, state_file, vendor, rate, stop, importing.terminal_progress()
        )
    )
    click.echo("", err=True)
    for where in done.refused:
        click.echo(f"not imported (over receiver.max_body_bytes): {where}", err=True)
    if done.done:
        click.echo(
            f"imported {done.records:,} records ({done.events:,} events, {done.bytes:,} bytes) "
            f"as {done.import_id}"
        )
        return
    click.echo(
        f"interrupted: {done.records:,} records acknowledged; the same command resumes at "
        f"{files[min(done.file_index, len(files) - 1)]} byte {done.offset}",
        err=True,
    )
    sys.exit(130)


main.add_command(dlq_command)
main.add_command(replay_command)
main.add_command(rewards_command)

if __name__ == "__main__":
    main()
