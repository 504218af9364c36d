"""The reward webhook dispatcher process: two stage loops, hosted as services of one Faust worker.

    rewards.outbound   --IntakeStage-->   rewards.deliveries: DeliveryJob keyed tenant/rewardId | rewards.dlq
    rewards.deliveries --DeliveryStage--> state table + changelog; attempts off the stream; rewards.dlq

What the Faust app provides, as in the event worker (docs/decisions/0001-explicit-stage-loops.md): the
process (signals, graceful stop, the service tree). It runs no agents and no tables and its web server is
off: the dispatcher serves only GET /metrics and GET /health on rewards.web_host:rewards.web_port.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from collections.abc import Mapping
from typing import Any

import faust
import mode
from aiohttp import web

from pipeline.config import Settings
from pipeline.kafka.clients import ensure_topics
from pipeline.kafka.faust_security import faust_credentials
from pipeline.rewards.delivery import DeliveryStage
from pipeline.rewards.intake import IntakeStage
from pipeline.rewards.metrics import RewardMetrics
from pipeline.rewards.state import changelog_config, changelog_topic
from pipeline.stream.consuming import StageProgress

log = logging.getLogger(__name__)
EXIT_STAGE_DIED = 70  # EX_SOFTWARE: a stage loop raised; the process must be restarted


class Dispatcher:
    """The Faust app and its services, built from Settings."""

    def __init__(self, settings: Settings, exit_after_s: float | None = None) -> None:
        self.settings = settings
        self.metrics = RewardMetrics()
        self.progress = {name: StageProgress(name) for name in ("rewards-intake", "rewards-delivery")}
        self.exit_code = 0
        self.exit_after_s = exit_after_s
        s = settings
        self.app = faust.App(
            f"{s.worker.app_id}-rewards-dispatcher",  # not the intake's group, <app_id>-rewards
            broker=";".join(f"kafka://{b.strip()}" for b in s.kafka.bootstrap_servers.split(",")),
            datadir=str(s.worker.data_dir / "rewards"),
            broker_credentials=faust_credentials(s.kafka),
            web_enabled=False,  # none of Faust's views (/table, /router, ...): only RewardsWeb below
            logging_config=None,
            # Faust's own (idle) consumer group: a restarted process waits for its dead member to expire
            broker_session_timeout=s.rewards.session_timeout.total_seconds(),
            broker_heartbeat_interval=min(3.0, s.rewards.session_timeout.total_seconds() / 3),
        )
        self.app.service(_bind(IntakeStage, s, self.metrics, self.progress["rewards-intake"], self.died))
        self.app.service(_bind(DeliveryStage, s, self.metrics, self.progress["rewards-delivery"], self.died))
        self.app.service(_bind(RewardsWeb, s, self.metrics, self.progress))
        if exit_after_s:
            self.app.task(self._exit_later)

    def died(self, exc: BaseException) -> None:
        """A stage loop died: stop, and exit with EXIT_STAGE_DIED (so a supervisor restarts the process)."""
        self.exit_code = EXIT_STAGE_DIED
        os.kill(os.getpid(), signal.SIGTERM)

    async def _exit_later(self) -> None:
        assert self.exit_after_s is not None
        await asyncio.sleep(self.exit_after_s)
        log.info("--exit-after %.0f s reached; stopping", self.exit_after_s)
        os.kill(os.getpid(), signal.SIGTERM)


class RewardsWeb(mode.Service):
    """GET /metrics and GET /health: 200 while both stages move; 503 when one has lag and no commit for
    worker.stall_limit_s, so that Kubernetes restarts the process (the worker's rule)."""

    def __init__(
        self, settings: Settings, metrics: RewardMetrics, progress: Mapping[str, StageProgress], **kwargs: Any
    ) -> None:
        super().__init__(**kwargs)
        self.settings = settings
        self.metrics = metrics
        self.progress = progress
        self.runner: web.AppRunner | None = None

    async def health(self, request: web.Request) -> web.Response:
        limit = self.settings.worker.stall_limit_s
        stages = {
            name: {
                "lag": p.lag,
                "seconds_since_commit": round(p.seconds_since_commit(), 1),
                "stalled": p.stalled(limit),
            }
            for name, p in self.progress.items()
        }
        stalled = any(stage["stalled"] for stage in stages.values())
        return web.json_response(
            {"status": "stalled" if stalled else "ok", "stall_limit_s": limit, "stages": stages},
            status=503 if stalled else 200,
        )

    async def on_start(self) -> None:
        host, port = self.settings.rewards.web_host, self.settings.rewards.web_port
        if not port:
            return
        app = web.Application()
        app.router.add_get("/metrics", self.metrics.handle)
        app.router.add_get("/health", self.health)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        await web.TCPSite(self.runner, host, port).start()
        log.info("rewards dispatcher listening on http://%s:%s (/metrics, /health)", host, port)

    async def on_stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()


def run_dispatcher(settings: Settings, exit_after_s: float | None = None, debug: bool = False) -> None:
    """`headwater rewards run`: create the topics, then run the Faust worker until SIGINT/SIGTERM."""
    topics = settings.topics
    if settings.rewards.store != "memory://":
        log.warning(
            "rewards.store is no longer used: the delivery state lives in memory, restored from its changelog"
        )

    async def prepare() -> None:
        await ensure_topics(settings, [topics.rewards, topics.rewards_deliveries, topics.rewards_dlq])
        await ensure_topics(settings, [changelog_topic(settings)], config=changelog_config())

    asyncio.run(prepare())
    (settings.worker.data_dir / "rewards").mkdir(parents=True, exist_ok=True)
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    dispatcher = Dispatcher(settings, exit_after_s)
    worker = faust.Worker(dispatcher.app, quiet=True, redirect_stdouts=False, override_logging=False)
    worker.spinner = None  # its cursor codes would land in the logs
    try:
        worker.execute_from_commandline()
    except SystemExit as exc:
        if dispatcher.exit_code:
            raise SystemExit(dispatcher.exit_code) from exc
        raise
    if dispatcher.exit_code:
        raise SystemExit(dispatcher.exit_code)


def _bind(service: type[mode.Service], *args: Any) -> type[mode.Service]:
    """A subclass of `service` whose constructor takes only Faust's keyword arguments, ours bound."""

    def __init__(self: mode.Service, **kwargs: Any) -> None:
        service.__init__(self, *args, **kwargs)

    return type(service.__name__, (service,), {"__init__": __init__})
