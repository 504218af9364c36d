"""Settings: one TOML file (path from HEADWATER_CONFIG), a few environment overrides, then CLI flags.

`load_settings` is the only reader of the environment; everything else receives a `Settings`
(docs/architecture.md, "Configuration"). Unknown keys and a write key shared by two tenants fail at start-up.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import tomllib
from collections.abc import Mapping
from datetime import timedelta
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    model_validator,
)

from pipeline.errors import ConfigError
from pipeline.signing import whsec_key
from pipeline.webhook_urls import url_problem

EXAMPLE_CONFIG = Path(__file__).with_name("headwater.example.toml")
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d|w)\s*$")
_UNIT_SECONDS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_duration(value: object) -> timedelta:
    """'24h', '7d', '90s', '500ms' or a number of seconds -> timedelta."""
    if isinstance(value, timedelta):
        return value
    if isinstance(value, bool):
        raise ValueError("a duration is a number of seconds or a string like '24h'")
    if isinstance(value, int | float):
        return timedelta(seconds=value)
    if isinstance(value, str):
        match = _DURATION.match(value)
        if match:
            return timedelta(seconds=float(match.group(1)) * _UNIT_SECONDS[match.group(2)])
    raise ValueError(f"cannot read {value!r} as a duration (examples: '90s', '30m', '24h', '7d')")


Duration = Annotated[timedelta, BeforeValidator(parse_duration)]


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


SecurityProtocol = Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"]
SaslMechanism = Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"]


class KafkaSettings(_Frozen):
    """Where the brokers are and how every client reaches them. The security keys are named as aiokafka
    names them; pipeline.kafka.security turns them into the kwargs of every client (docs/production.md)."""

    bootstrap_servers: str = "127.0.0.1:9092"
    partitions: int = Field(6, ge=1, le=10_000)
    replication_factor: int = Field(1, ge=1)
    client_id: str = "headwater"
    # false: the topics are managed by an operator (Strimzi KafkaTopic, Terraform); Headwater only checks
    # that they exist and refuses to start without them.
    create_topics: bool = True
    security_protocol: SecurityProtocol = "PLAINTEXT"
    sasl_mechanism: SaslMechanism = "PLAIN"
    sasl_username: str | None = None
    sasl_password: SecretStr | None = None  # HEADWATER_KAFKA_SASL_PASSWORD(_FILE)
    ssl_cafile: Path | None = None  # None: the system's trust store
    ssl_certfile: Path | None = None  # a client certificate (mutual TLS), with ssl_keyfile
    ssl_keyfile: Path | None = None

    @model_validator(mode="after")
    def _security_is_whole(self) -> KafkaSettings:
        sasl = self.security_protocol.startswith("SASL_")
        tls = self.security_protocol.endswith("SSL")
        if sasl and (not self.sasl_username or self.sasl_password is None):
            raise ValueError(f"{self.security_protocol} needs sasl_username and sasl_password")
        if not sasl and (self.sasl_username or self.sasl_password is not None):
            raise ValueError(f"sasl_username/sasl_password are unused with {self.security_protocol}")
        if not tls and (self.ssl_cafile or self.ssl_certfile or self.ssl_keyfile):
            raise ValueError(f"ssl_* files are unused with {self.security_protocol}")
        if (self.ssl_certfile is None) != (self.ssl_keyfile is None):
            raise ValueError("ssl_certfile and ssl_keyfile go together (a client certificate and its key)")
        return self


class LocalKafkaSettings(_Frozen):
    """The broker `headwater kafka up` runs from Maven Central jars (single KRaft node)."""

    enabled: bool = True
    host: str = "127.0.0.1"
    port: int = 9092
    # 0: the broker port + 1 when free, else any free port (`kafka up` says which; `kafka status` shows it)
    controller_port: int = Field(0, ge=0, le=65535)
    data_dir: Path = Path(".headwater/kafka")
    jars_dir: Path = Path("~/.cache/headwater/kafka-jars")
    heap: str = "512m"

    @model_validator(mode="after")
    def _two_ports(self) -> LocalKafkaSettings:
        if self.controller_port == self.port:
            raise ValueError("local_kafka.controller_port must differ from local_kafka.port")
        return self


class TopicSettings(_Frozen):
    raw_prefix: str = "raw."
    canonical: str = "events.canonical"
    dlq: str = "events.dlq"
    keyed: str = "headwater.keyed"
    replay_results: str = "headwater.replay-results"
    rewards: str = "rewards.outbound"
    rewards_dlq: str = "rewards.dlq"
    rewards_deliveries: str = (
        "rewards.deliveries"  # internal: jobs and attempt outcomes, keyed tenant/rewardId
    )

    def raw(self, source: str) -> str:
        return f"{self.raw_prefix}{source}"


class ReceiverSettings(_Frozen):
    host: str = "127.0.0.1"
    port: int = Field(8080, ge=0, le=65535)  # ingestion, /healthz and /readyz: nothing names a tenant
    # /metrics (per-tenant volumes and refusals) and /healthz with the pid: an operator surface, on
    # loopback unless deliberately opened (Prometheus in the pod's network namespace, or a private network)
    operator_host: str = "127.0.0.1"
    operator_port: int = Field(8079, ge=0, le=65535)  # 0 = no operator port (no /metrics)
    max_body_bytes: int = Field(5_242_880, ge=1)
    max_in_flight: int = Field(2_000, ge=1)
    ack_timeout_s: float = Field(10.0, gt=0)
    retry_after_s: int = Field(2, ge=1)
    linger_ms: int = Field(0, ge=0)  # the receiver batches itself: one batch per topic with the broker
    # Body bytes held in memory at once (being read or awaiting the ack), counted as they arrive. When full,
    # a tenant over its share (this / active tenants) gives way (429); else reading waits, then 503.
    max_bytes_in_flight: int = Field(268_435_456, ge=1)
    # Deadlines (docs/receiver-limits.md): the request head within head_timeout_s; the body within
    # body_timeout_s in all and, after its first body_grace_s, no slower than body_min_bytes_per_s. Else 408.
    head_timeout_s: float = Field(10.0, gt=0)
    body_timeout_s: float = Field(60.0, gt=0)
    body_grace_s: float = Field(5.0, ge=0)
    body_min_bytes_per_s: int = Field(16_384, ge=1)
    # Items in one request, counted while scanning the body, before any per-item work; over: 413.
    max_items: int = Field(10_000, ge=1)  # elements of a batched source's array (events, profiles, batch)
    max_rewards: int = Field(1_000, ge=1)  # rewards in one POST /rewards/v1 array
    # Fair shares: while other tenants are active, a tenant may hold only its share
    # (max_in_flight / active tenants) of the in-flight bound; over it: 429 + Retry-After. Alone, a tenant
    # may use everything. "Active" = a request in flight, waiting, or seen within fair_window_s.
    fair_shares: bool = True
    fair_window_s: float = Field(1.0, gt=0)
    admission_wait_s: float = Field(0.5, ge=0)  # a request within its share waits this long for a slot
    processes: int = Field(1, ge=1, le=256)  # receiver processes sharing the port (SO_REUSEPORT)

    @model_validator(mode="after")
    def _one_body_fits_in_flight(self) -> ReceiverSettings:
        if self.max_body_bytes > self.max_bytes_in_flight:
            raise ValueError("receiver.max_bytes_in_flight must be at least receiver.max_body_bytes")
        return self


class DedupSettings(_Frozen):
    window: Duration = timedelta(hours=24)
    store: str = "memory://"
    expire_every: Duration = timedelta(minutes=1)
    checkpoint_every: Duration = timedelta(minutes=1)  # a restart reads the changelog written since


class WorkerSettings(_Frozen):
    app_id: str = "headwater"
    data_dir: Path = Path(".headwater/worker")
    web_host: str = "127.0.0.1"
    web_port: int = Field(6066, ge=0, le=65535)  # /metrics and the DLQ page; 0 = off
    batch_max: int = Field(2_000, ge=1)
    batch_within_s: float = Field(0.05, gt=0)
    max_poll_records: int = Field(2_000, ge=1)
    session_timeout_s: float = Field(10.0, ge=3)  # a dead worker's partitions move after this
    # How long a stage's consumer waits for the broker's answer; a group join may take a whole session.
    request_timeout_s: float = Field(40.0, gt=0)
    # Static group membership (group.instance.id): a worker back within session_timeout_s keeps its
    # partitions. "" = the pod's name under Kubernetes (HOSTNAME), none elsewhere; unique per worker.
    instance_id: str = ""
    # A canonical event larger than this is dead-lettered (output_too_large): Kafka's default record
    # limit, so any consumer of events.canonical with default settings can read every event.
    max_event_bytes: int = Field(1_048_576, ge=1024)
    # /health fails when a stage has lag and has committed nothing for this long.
    stall_limit_s: float = Field(120.0, gt=0)
    # A batch whose outputs fail this many times in a row is processed record by record, and a
    # record whose outputs still fail is dead-lettered (output_refused) if the DLQ takes it.
    isolate_after_failures: int = Field(3, ge=1)

    @model_validator(mode="after")
    def _session_within_requests(self) -> WorkerSettings:
        # Kafka clients refuse a session longer than their request timeout (the worker would die at start).
        if self.session_timeout_s >= self.request_timeout_s:
            raise ValueError(
                f"worker.session_timeout_s ({self.session_timeout_s:g}) must be below "
                f"worker.request_timeout_s ({self.request_timeout_s:g})"
            )
        return self


class WebEngageCredentials(_Frozen):
    license_code: str = Field(min_length=1, max_length=256)
    secret_key: SecretStr

    def expected_secret(self) -> str:
        """WebEngage sends md5_hex("<licenseCode>:<secret key>") as `secret` (docs/sources.md §4.6)."""
        material = f"{self.license_code}:{self.secret_key.get_secret_value()}".encode()
        return hashlib.md5(material, usedforsecurity=False).hexdigest()

    def accepts(self, secret: str) -> bool:
        return hmac.compare_digest(self.expected_secret().encode(), secret.lower().encode())


# Faust's broker_request_timeout, which the rewards dispatcher keeps: its session must be shorter.
FAUST_REQUEST_TIMEOUT_S = 90.0


class RewardsWebhook(_Frozen):
    url: str = Field(min_length=1)
    token: SecretStr | None = None
    standard_webhooks_secrets: tuple[SecretStr, ...] = ()
    max_concurrency: int = Field(8, ge=1)
    timeout_s: float = Field(10.0, gt=0)
    allow_private_url: bool = False  # http:// and loopback/private addresses: tests and internal receivers

    @model_validator(mode="after")
    def _secrets_are_whsec(self) -> RewardsWebhook:
        for secret in self.standard_webhooks_secrets:
            whsec_key(secret.get_secret_value())  # ValueError names the expected form
        problem = url_problem(self.url, self.allow_private_url)
        if problem is not None:
            raise ValueError(f"rewards_webhook url {self.url!r} {problem}")
        return self


class RewardsSettings(_Frozen):
    """The reward webhook dispatcher (`headwater rewards`); per-tenant URLs live in the tenants."""

    # Delay before each retry; attempts = 1 (immediately) + len(retry_delays). The default spreads 8
    # attempts over about a day, like the webhook platforms users know.
    retry_delays: tuple[Duration, ...] = tuple(
        timedelta(seconds=s) for s in (5, 300, 1800, 7200, 18000, 36000, 36000)
    )
    jitter: float = Field(0.1, ge=0, le=0.5)  # each delay is scaled by uniform(1-j, 1+j)
    max_retry_after: Duration = timedelta(hours=24)  # cap on a receiver's Retry-After
    breaker_failures: int = Field(5, ge=1)  # consecutive failed attempts that open a tenant's breaker
    breaker_open: Duration = timedelta(seconds=30)  # open this long, then one probe (half-open)
    tick: Duration = timedelta(seconds=1)  # how often due retries are looked for
    dedup_window: Duration = timedelta(days=30)  # delivered (tenant, rewardId) markers kept this long
    store: str = "memory://"  # no longer used (the delivery state is in memory); kept so old configs load
    session_timeout: Duration = timedelta(seconds=30)  # a dead worker's partitions move after this
    web_host: str = "127.0.0.1"
    web_port: int = Field(6067, ge=0, le=65535)  # /metrics of the dispatcher

    @model_validator(mode="after")
    def _session_within_requests(self) -> RewardsSettings:
        if self.session_timeout.total_seconds() >= FAUST_REQUEST_TIMEOUT_S:
            raise ValueError(
                f"rewards.session_timeout ({self.session_timeout.total_seconds():g}s) must be below the "
                f"dispatcher's Kafka request timeout ({FAUST_REQUEST_TIMEOUT_S:g}s)"
            )
        return self


DEFAULT_REDRIVE_LIMIT = 3


class DlqSettings(_Frozen):
    """The dead-letter tooling (`headwater dlq`): the redrive limit and the read-only web page."""

    redrive_limit: int = Field(DEFAULT_REDRIVE_LIMIT, ge=0)  # redriven more often than this: parked
    page_host: str = "127.0.0.1"
    page_port: int = Field(6068, ge=0, le=65535)
    # Bearer token, or HTTP basic auth password; without it the page is served on loopback only
    page_token: SecretStr | None = Field(None, min_length=16)
    page_window: Duration = timedelta(hours=24)  # the list shows dead letters failed this recently...
    page_limit: int = Field(100, ge=1, le=1000)  # ...at most this many, newest first (the form may ask fewer)
    page_scan_limit: int = Field(10_000, ge=100)  # records one page request reads at most


class LoggingSettings(_Frozen):
    """What every `headwater` process logs to stderr; --log-level, --log-format and --debug override it."""

    level: Literal["debug", "info", "warning", "error"] = "info"  # Headwater's own lines; libraries: warnings
    format: Literal["text", "json"] = "text"  # json: one object per line, for log shippers
    # While Kafka is unreachable: one line when it starts, a summary this often, one line when it ends.
    kafka_outage_summary_s: float = Field(30.0, gt=0)


class Tenant(_Frozen):
    id: str = Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9_.:-]+$")
    write_keys: tuple[SecretStr, ...] = ()
    rewards_keys: tuple[SecretStr, ...] = ()  # X-API-KEY of POST /rewards/v1; none = no reward intake
    usermaven_tokens: tuple[SecretStr, ...] = ()
    webengage: WebEngageCredentials | None = None
    segment_shared_secret: SecretStr | None = None
    # With a shared secret: refuse arrays whose signature covers only their first element (Segment's batch
    # scheme leaves the other elements unsigned). The safe choice; docs/segment-signatures.md.
    segment_refuse_arrays: bool = False
    rewards_webhook: RewardsWebhook | None = None

    @model_validator(mode="after")
    def _tokens_are_composite(self) -> Tenant:
        for token in self.usermaven_tokens:
            if "." not in token.get_secret_value():
                raise ValueError("usermaven_tokens entries have the form API_KEY.SERVER_TOKEN")
        return self


class Settings(_Frozen):
    kafka: KafkaSettings = KafkaSettings()
    local_kafka: LocalKafkaSettings = LocalKafkaSettings()
    topics: TopicSettings = TopicSettings()
    receiver: ReceiverSettings = ReceiverSettings()
    dedup: DedupSettings = DedupSettings()
    worker: WorkerSettings = WorkerSettings()
    rewards: RewardsSettings = RewardsSettings()
    dlq: DlqSettings = DlqSettings()
    logging: LoggingSettings = LoggingSettings()
    tenants: tuple[Tenant, ...] = ()

    @property
    def max_record_bytes(self) -> int:
        """The largest Kafka record Headwater writes: a dead letter of a bulk body at the receiver's limit
        (the body in base64 plus the failing item). Topics we create allow it (max.message.bytes), and
        producers may send it, so a body the receiver accepted can always be stored downstream."""
        return 3 * self.receiver.max_body_bytes + 1_048_576

    @model_validator(mode="after")
    def _credentials_are_unique(self) -> Settings:
        seen: dict[tuple[str, str], str] = {}
        for tenant in self.tenants:
            pairs = [("write key", k.get_secret_value()) for k in tenant.write_keys]
            # one namespace with the write keys: a key a vendor holds must never open /rewards/v1
            rewards = {k.get_secret_value() for k in tenant.rewards_keys}
            if rewards & {k.get_secret_value() for k in tenant.write_keys}:
                raise ValueError(f"tenant {tenant.id!r}: a rewards key must not also be a write key")
            pairs += [("write key", k) for k in sorted(rewards)]
            pairs += [("usermaven token", t.get_secret_value()) for t in tenant.usermaven_tokens]
            if tenant.webengage:
                pairs.append(("webengage license_code", tenant.webengage.license_code))
            for kind, value in pairs:
                owner = seen.setdefault((kind, value), tenant.id)
                if owner != tenant.id:
                    raise ValueError(f"a {kind} is shared by tenants {owner!r} and {tenant.id!r}")
        ids = [t.id for t in self.tenants]
        if len(ids) != len(set(ids)):
            raise ValueError("tenant ids must be unique")
        return self

    @model_validator(mode="after")
    def _listeners_do_not_collide(self) -> Settings:
        """Two servers of one `headwater up` on one address and port: the second would fail at start."""
        listeners = [
            ("receiver.port", self.receiver.host, self.receiver.port),
            ("receiver.operator_port", self.receiver.operator_host, self.receiver.operator_port),
            ("worker.web_port", self.worker.web_host, self.worker.web_port),
            ("rewards.web_port", self.rewards.web_host, self.rewards.web_port),
            ("dlq.page_port", self.dlq.page_host, self.dlq.page_port),
        ]
        if self.local_kafka.enabled:
            listeners += [
                ("local_kafka.port", self.local_kafka.host, self.local_kafka.port),
                ("local_kafka.controller_port", self.local_kafka.host, self.local_kafka.controller_port),
            ]
        seen: dict[tuple[str, int], str] = {}
        for key, host, port in listeners:
            if port == 0:  # chosen at start
                continue
            other = seen.setdefault((host, port), key)
            if other != key:
                raise ValueError(f"{key} and {other} are both {host}:{port}")
        return self

    def with_overrides(self, overrides: Mapping[str, Any]) -> Settings:
        """Apply dotted overrides such as {"receiver.port": 18080} (CLI flags); None values are skipped."""
        doc = self.model_dump(mode="python")
        for dotted, value in overrides.items():
            if value is None:
                continue
            *parents, leaf = dotted.split(".")
            node = doc
            for key in parents:
                node = node[key]
            node[leaf] = value
        return _validate(doc, "command-line flags")


# Environment variables that override one setting each; each also reads `<NAME>_FILE`, the path of a file
# holding the value (the Docker and Kubernetes secrets convention). Secrets: docs/production.md.
ENV_OVERRIDES = {
    "HEADWATER_KAFKA_BOOTSTRAP": "kafka.bootstrap_servers",
    "HEADWATER_KAFKA_SECURITY_PROTOCOL": "kafka.security_protocol",
    "HEADWATER_KAFKA_SASL_MECHANISM": "kafka.sasl_mechanism",
    "HEADWATER_KAFKA_SASL_USERNAME": "kafka.sasl_username",
    "HEADWATER_KAFKA_SASL_PASSWORD": "kafka.sasl_password",
    "HEADWATER_KAFKA_CREATE_TOPICS": "kafka.create_topics",
    "HEADWATER_RECEIVER_HOST": "receiver.host",
    "HEADWATER_RECEIVER_PORT": "receiver.port",
    "HEADWATER_RECEIVER_OPERATOR_HOST": "receiver.operator_host",
    "HEADWATER_RECEIVER_OPERATOR_PORT": "receiver.operator_port",
    "HEADWATER_DEDUP_WINDOW": "dedup.window",
    "HEADWATER_DEDUP_STORE": "dedup.store",
    "HEADWATER_WORKER_INSTANCE_ID": "worker.instance_id",
    "HEADWATER_LOCAL_KAFKA": "local_kafka.enabled",
    "HEADWATER_LOG_LEVEL": "logging.level",
    "HEADWATER_LOG_FORMAT": "logging.format",
    "HEADWATER_DLQ_PAGE_TOKEN": "dlq.page_token",
}
# A TOML file of [[tenants]] tables (every tenant secret), e.g. mounted from a Kubernetes Secret: it
# replaces the config file's tenants, which must then have none.
TENANTS_FILE_ENV = "HEADWATER_TENANTS_FILE"


def _validate(doc: Mapping[str, Any], origin: str) -> Settings:
    try:
        return Settings.model_validate(doc)
    except ValidationError as exc:
        errors = exc.errors()
        # An unknown key is usually the misspelling of a missing one: name it first.
        first = next((e for e in errors if e["type"] == "extra_forbidden"), errors[0])
        where = _dotted(first["loc"])
        if first["type"] == "extra_forbidden":
            raise ConfigError(f"unknown key {where} in {origin}") from None
        message = first["msg"].removeprefix("Value error, ")
        raise ConfigError(f"{where or 'config'}: {message} (in {origin})") from None


def _dotted(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def load_settings(
    path: str | Path | None = None,
    environ: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Settings:
    """Read the TOML file (HEADWATER_CONFIG, else the shipped example), then env overrides, then flags."""
    env = os.environ if environ is None else environ
    chosen = Path(path or env.get("HEADWATER_CONFIG") or EXAMPLE_CONFIG)
    doc = _read_toml(chosen)
    for variable, dotted in ENV_OVERRIDES.items():
        value = _from_env(env, variable)
        if value is not None:
            section, key = dotted.split(".")
            doc.setdefault(section, {})[key] = value
    origin = str(chosen)
    tenants_file = _from_env(env, TENANTS_FILE_ENV)
    if tenants_file:
        if doc.get("tenants"):
            raise ConfigError(f"{chosen} has [[tenants]] and {TENANTS_FILE_ENV} is set: keep one of them")
        doc["tenants"] = _read_toml(Path(tenants_file)).get("tenants", [])
        origin = f"{chosen} with tenants from {tenants_file}"
    settings = _validate(doc, origin)
    return settings.with_overrides(overrides) if overrides else settings


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML ({exc})") from None


def _from_env(env: Mapping[str, str], variable: str) -> str | None:
    """`variable`'s value, else the content of the file `<variable>_FILE` names (one trailing newline
    dropped, as `echo secret > file` leaves one); both set is an error, since one of them would be ignored."""
    file_variable = f"{variable}_FILE"
    if file_variable not in env:
        return env.get(variable)
    if variable in env:
        raise ConfigError(f"both {variable} and {file_variable} are set: keep one")
    path = Path(env[file_variable])
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{file_variable}: cannot read {path} ({exc.strerror})") from None
    return text[:-1] if text.endswith("\n") else text
