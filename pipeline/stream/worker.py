"""The worker process: both stream stages, hosted as services of one Faust worker, plus /metrics and the page.

    raw.<source> --NormalizeStage (every adapter)--> keyed topic --DedupStage--> events.canonical
                               \\--------------------> events.dlq

What the Faust app still provides (docs/decisions/0001-explicit-stage-loops.md): the worker process
(signals, graceful stop, the service tree that starts and stops the stages) and the producer the stages
send through. It runs no agents, no tables and no consumer of its own (the app is "producer only", so a
worker starts without Faust's group join and table recovery): the stages are explicit consume -> process
-> ack -> commit loops on their own aiokafka consumers.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import threading
from collections.abc import Awaitable, Mapping, Sequence
from typing import Any

import faust
import mode
from aiohttp import web

from adapters import ADAPTERS
from pipeline.adapting import AdapterModule
from pipeline.config import Settings
from pipeline.kafka.clients import ensure_topics, producer_options, require_partition_counts
from pipeline.kafka.faust_security import faust_credentials
from pipeline.kafka.outage import OUTAGE
from pipeline.process import WORKER_GC_GEN0_THRESHOLD, keep_freed_memory, settle_garbage_collector
from pipeline.records import KafkaHeaders
from pipeline.stream import normalize_batch
from pipeline.stream.consuming import StageProgress
from pipeline.stream.dedup_stage import DedupStage, changelog_config, changelog_topic
from pipeline.stream.metrics import WorkerMetrics
from pipeline.stream.normalize_stage import NormalizeStage

log = logging.getLogger(__name__)
EXIT_STAGE_DIED = 70  # EX_SOFTWARE: a stage loop raised; the process must be restarted


class Worker:
    """The Faust app and its services from Settings: one NormalizeStage (every adapter), one DedupStage."""

    def __init__(
        self,
        settings: Settings,
        sources: Sequence[str] | None = None,
        adapters: Mapping[str, AdapterModule] | None = None,
    ) -> None:
        self.settings = settings
        self.adapters = dict(adapters or ADAPTERS)
        self.sources = list(sources or self.adapters)
        self.metrics = WorkerMetrics()
        topics = settings.topics
        self.progress = {
            f"normalize:{s}": StageProgress(f"normalize:{s}", topic=topics.raw(s)) for s in self.sources
        }
        self.progress["dedup"] = StageProgress("dedup", topic=topics.keyed)
        self.exit_code = 0
        self.app = self._app()
        self.app.service(
            _bind(
                NormalizeStage,
                settings,
                [self.adapters[source] for source in self.sources],
                self._send_with_headers,
                self.metrics,
                {source: self.progress[f"normalize:{source}"] for source in self.sources},
                self.died,
            )
        )
        self.app.service(_bind(DedupStage, settings, self.metrics, self.progress["dedup"], self.died))
        if settings.worker.web_port:
            self.app.service(_bind(WebService, settings, self.metrics, self.progress))

    def _app(self) -> faust.App:
        s = self.settings
        brokers = ";".join(f"kafka://{b.strip()}" for b in s.kafka.bootstrap_servers.split(","))
        producer = producer_options(s, linger_ms=5)
        app = faust.App(
            s.worker.app_id,
            broker=brokers,
            broker_credentials=faust_credentials(s.kafka),
            datadir=str(s.worker.data_dir),
            web_enabled=False,
            producer_acks=-1 if producer["acks"] == "all" else producer["acks"],
            producer_linger_ms=producer["linger_ms"],
            producer_max_batch_size=producer["max_batch_size"],
            producer_max_request_size=producer["max_request_size"],
            producer_compression_type=producer["compression_type"],
            broker_session_timeout=s.worker.session_timeout_s,
            broker_request_timeout=s.worker.request_timeout_s,
            broker_heartbeat_interval=max(1.0, s.worker.session_timeout_s / 4),
            logging_config=None,
        )
        app.producer_only = True  # start the producer only: no Faust consumer, group, tables or recovery
        return app

    async def _send_with_headers(
        self, topic: str, key: bytes | None, value: bytes, partition: int | None, headers: KafkaHeaders | None
    ) -> Awaitable[Any]:
        return await self.app.producer.send(
            topic, key, value, partition, None, list(headers) if headers else None
        )

    async def prepare_topics(self) -> None:
        topics = self.settings.topics
        await ensure_topics(
            self.settings,
            [topics.raw(s) for s in self.sources] + [topics.keyed, topics.canonical, topics.dlq],
        )
        await ensure_topics(self.settings, [topics.replay_results], partitions=1)
        await ensure_topics(
            self.settings,
            [changelog_topic(self.settings)],
            partitions=self.settings.kafka.partitions,
            config=changelog_config(self.settings),
        )
        partitions = self.settings.kafka.partitions
        await require_partition_counts(
            self.settings, {topics.keyed: partitions, changelog_topic(self.settings): partitions}
        )

    def died(self, exc: BaseException) -> None:
        """A stage loop died: stop the worker, exit with EXIT_STAGE_DIED (so a supervisor restarts it)."""
        self.exit_code = EXIT_STAGE_DIED
        os.kill(os.getpid(), signal.SIGTERM)  # Faust's graceful stop; run() turns its exit into ours

    def run(self) -> None:
        """Run the worker until SIGINT/SIGTERM, or until a stage dies (exit code EXIT_STAGE_DIED)."""
        self.settings.worker.data_dir.mkdir(parents=True, exist_ok=True)
        keep_freed_memory()
        if not runs_compiled():
            log.warning(
                "the per-event modules run as pure Python (installed with HEADWATER_COMPILE=0 or without a"
                " C compiler): the worker spends more CPU per event (docs/benchmarks.md, 'Compiled modules')"
            )
        asyncio.run(self.prepare_topics())
        # What start-up loaded stays: out of every collection from now on.
        settle_garbage_collector(WORKER_GC_GEN0_THRESHOLD)
        with contextlib.suppress(ImportError):  # uvloop: ~10-20% more events/s for the same CPU
            import uvloop

            asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
        # Logging is set up by pipeline.logs (the CLI), not by Faust.
        worker = faust.Worker(self.app, quiet=True, redirect_stdouts=False, override_logging=False)
        worker.spinner = None  # its cursor codes would land in the logs
        try:
            worker.execute_from_commandline()
        except SystemExit as exc:
            if self.exit_code:
                raise SystemExit(self.exit_code) from exc
            raise
        if self.exit_code:
            raise SystemExit(self.exit_code)


class WebService(mode.Service):
    """/metrics, /health and the read-only DLQ page (/, /letters/{id}) on worker.web_host:worker.web_port.

    The server runs in its own thread with its own event loop: a page request reads Kafka and parses dead
    letters there, never on the loop that runs the stages and their heartbeats. On a
    non-loopback address the page is served only with `dlq.page_token` set; /metrics and /health always are.
    """

    def __init__(
        self, settings: Settings, metrics: WorkerMetrics, progress: Mapping[str, StageProgress], **kwargs: Any
    ) -> None:
        super().__init__(**kwargs)
        self.settings = settings
        self.metrics = metrics
        self.progress = progress
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="headwater-web", daemon=True)
        self.runner: web.AppRunner | None = None

    async def health(self, request: web.Request) -> web.Response:
        """200 while every stage moves; 503 when one has lag and no commit for worker.stall_limit_s."""
        limit = self.settings.worker.stall_limit_s
        stages = {
            name: {
                "lag": p.lag,
                "seconds_since_commit": round(p.seconds_since_commit(), 1),
                "stalled": p.stalled(limit),
                "topic": p.topic,
                "partitions_owned": sorted(p.owned),
                "partitions": p.partitions,
                "restoring": p.restoring,
            }
            for name, p in self.progress.items()
        }
        stalled = any(stage["stalled"] for stage in stages.values())
        return web.json_response(
            {
                "status": "stalled" if stalled else "ok",
                "stall_limit_s": limit,
                "stages": stages,
                "kafka": OUTAGE.state(),
            },
            status=503 if stalled else 200,
        )

    async def on_start(self) -> None:
        from pipeline.ops.dlq_page import make_app, refusal

        host, port = self.settings.worker.web_host, self.settings.worker.web_port
        withheld = self.page_withheld = refusal(host, self.settings.dlq)
        if withheld is not None:
            log.warning("DLQ page not served on %s:%d (/metrics is): %s", host, port, withheld)
        app = make_app(self.settings, serve_page=withheld is None)
        app.router.add_get("/metrics", self.metrics.handle)
        app.router.add_get("/health", self.health)
        self.runner = web.AppRunner(app, access_log=None)
        self.thread.start()
        await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(self._serve(host, port), self.loop))

    async def _serve(self, host: str, port: int) -> None:
        assert self.runner is not None
        await self.runner.setup()
        await web.TCPSite(self.runner, host, port).start()
        served = "/metrics" if self.page_withheld else "/metrics, DLQ page"
        log.info("worker listening on http://%s:%s (%s)", host, port, served)

    async def on_stop(self) -> None:
        if self.thread.ident is None:  # never started
            return
        if self.runner is not None and self.thread.is_alive():
            done = asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop)
            await asyncio.wrap_future(done)
        self.loop.call_soon_threadsafe(self.loop.stop)
        await asyncio.to_thread(self.thread.join, 10)
        if not self.thread.is_alive():
            self.loop.close()


def runs_compiled() -> bool:
    """Whether the per-event modules were compiled when Headwater was installed (setup.py): then the
    normalize_batch module, like the others, is loaded from a C extension, not from its source."""
    return not (normalize_batch.__file__ or "").endswith(".py")


def _bind(service: type[mode.Service], *args: Any) -> type[mode.Service]:
    """A subclass of `service` whose constructor takes only Faust's keyword arguments (app.service wants a
    class it can instantiate itself), with our arguments bound."""

    def __init__(self: mode.Service, **kwargs: Any) -> None:
        service.__init__(self, *args, **kwargs)

    return type(service.__name__, (service,), {"__init__": __init__})
