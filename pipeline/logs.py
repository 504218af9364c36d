"""Process logging for every `headwater` command: one handler on stderr, text or JSON lines.

Headwater's own loggers log at the chosen level; Faust, mode, aiokafka and aiohttp only from WARNING up
(everything at `debug`). The retries Kafka clients log while a broker or a consumer group is still
coming up are expected, so they are moved to DEBUG; real failures keep their level.
"""

from __future__ import annotations

import logging
import sys
from datetime import UTC, datetime
from typing import IO, Literal

import orjson

from pipeline.kafka.outage import OUTAGE, OutageFilter
from pipeline.printable import printable

Level = Literal["debug", "info", "warning", "error"]
Format = Literal["text", "json"]
LEVELS: tuple[Level, ...] = ("debug", "info", "warning", "error")
FORMATS: tuple[Format, ...] = ("text", "json")

OWN_LOGGERS = ("pipeline", "adapters", "__main__")
LIBRARY_LOGGERS = ("faust", "mode", "aiokafka", "aiohttp", "kafka", "asyncio")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

# (logger, message template) pairs that are routine while a group forms or a coordinator starts: aiokafka
# logs them at ERROR or WARNING and retries by itself (aiokafka/consumer/group_coordinator.py).
_COORDINATOR = "aiokafka.consumer.group_coordinator"
ROUTINE_RETRIES = {
    (_COORDINATOR, "Group Coordinator Request failed: %s"),  # only when the error is retriable
    (_COORDINATOR, "Marking the coordinator dead (node %s)for group %s."),
    (_COORDINATOR, "Heartbeat failed for group %s because it is rebalancing"),
}
_HANDLER_NAME = "headwater"


def is_routine_retry(record: logging.LogRecord) -> bool:
    """True for a start-up retry aiokafka logs loudly but recovers from by itself."""
    if (record.name, record.msg) not in ROUTINE_RETRIES:
        return False
    if record.msg == "Group Coordinator Request failed: %s":
        error = record.args[0] if isinstance(record.args, tuple) and record.args else None
        return bool(getattr(error, "retriable", False))
    return True


def is_malformed_http(record: logging.LogRecord) -> bool:
    """True for aiohttp's ERROR about a request it could not parse: the sender's fault, answered 400."""
    if record.name != "aiohttp.server" or not record.exc_info or record.exc_info[1] is None:
        return False
    from aiohttp.http_exceptions import HttpProcessingError  # aiohttp is loaded when it logs

    return isinstance(record.exc_info[1], HttpProcessingError)


class RoutineRetriesToDebug(logging.Filter):
    """Rewrite routine retries, and malformed requests a sender made, as DEBUG records; let them through
    only when DEBUG is shown. A sender's bad input is not an error of ours (it got its 400)."""

    def __init__(self, show_debug: bool) -> None:
        super().__init__()
        self.show_debug = show_debug

    def filter(self, record: logging.LogRecord) -> bool:
        if is_routine_retry(record) or is_malformed_http(record):
            record.levelno, record.levelname = logging.DEBUG, "DEBUG"
            return self.show_debug
        return True


class StderrHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes to whatever sys.stderr is when a record comes (click's test runner swaps it per command)."""

    def __init__(self) -> None:
        super().__init__()

    @property
    def stream(self) -> IO[str]:
        return sys.stderr

    @stream.setter
    def stream(self, value: IO[str]) -> None:
        pass  # always sys.stderr


class TextFormatter(logging.Formatter):
    """TEXT_FORMAT lines whose message is one line: outside text in it (a tenant endpoint's response, a
    header) cannot start lines the process never wrote, nor send a terminal its control sequences. A
    traceback, which the process does write, keeps its lines."""

    def __init__(self) -> None:
        super().__init__(TEXT_FORMAT)

    def formatMessage(self, record: logging.LogRecord) -> str:  # noqa: N802 - logging's name
        record.message = printable(record.message)
        return super().formatMessage(record)


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time (UTC, ISO-8601), level, logger, message, and the traceback if any."""

    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, object] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            doc["exception"] = self.formatException(record.exc_info)
        elif record.exc_text:
            doc["exception"] = record.exc_text
        if record.stack_info:
            doc["stack"] = self.formatStack(record.stack_info)
        return orjson.dumps(doc, default=str).decode()


def configure(
    level: Level = "info",
    fmt: Format = "text",
    stream: IO[str] | None = None,
    kafka_bootstrap: str | None = None,
    kafka_outage_summary_s: float | None = None,
) -> None:
    """Install (or replace) Headwater's one stderr handler; safe to call again once settings are known.

    Kafka outages are logged as one line when Kafka becomes unreachable, a summary every 30 s and one line
    when it is back (pipeline.kafka.outage): `kafka_bootstrap` is what the outage watcher probes."""
    number = logging.getLevelNamesMapping()[level.upper()]
    handler = logging.StreamHandler(stream) if stream else StderrHandler()
    handler.set_name(_HANDLER_NAME)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    handler.addFilter(RoutineRetriesToDebug(show_debug=number <= logging.DEBUG))
    handler.addFilter(OutageFilter())
    if kafka_bootstrap:
        OUTAGE.set_bootstrap(kafka_bootstrap)
    if kafka_outage_summary_s:
        OUTAGE.summary_every_s = kafka_outage_summary_s
    root = logging.getLogger()
    for old in [h for h in root.handlers if h.get_name() == _HANDLER_NAME]:
        root.removeHandler(old)
    root.addHandler(handler)
    # Libraries (everything not ours) inherit the root level: warnings and up, unless DEBUG is asked for.
    root.setLevel(number if number <= logging.DEBUG else max(number, logging.WARNING))
    for name in OWN_LOGGERS:
        logging.getLogger(name).setLevel(number)
    for name in LIBRARY_LOGGERS:
        logging.getLogger(name).setLevel(logging.NOTSET)
