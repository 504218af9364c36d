"""The one place that turns `[kafka]`'s security keys into what every Kafka client is given.

Producers, consumers and admin clients get `client_security(...)` merged into their kwargs (the factories
in pipeline.kafka.clients); the Faust apps get the same values as Faust credentials
(pipeline.kafka.faust_security). `verify_access` runs at start-up: a wrong password or an untrusted
certificate ends the process with one line, because aiokafka reports both as "unable to bootstrap" and
retries forever, which would look like a broker that is down.
"""

from __future__ import annotations

import logging
import ssl
from typing import Any

from aiokafka.conn import create_conn
from aiokafka.errors import (
    AuthenticationFailedError,
    IllegalSaslStateError,
    SaslAuthenticationFailed,
    UnsupportedSaslMechanismError,
)

from pipeline.config import KafkaSettings
from pipeline.errors import ConfigError, KafkaAccessRefused

log = logging.getLogger(__name__)

_REFUSED = (
    SaslAuthenticationFailed,
    AuthenticationFailedError,
    UnsupportedSaslMechanismError,
    IllegalSaslStateError,
)
PROBE_TIMEOUT_MS = 10_000


def uses_tls(kafka: KafkaSettings) -> bool:
    return kafka.security_protocol in ("SSL", "SASL_SSL")


def ssl_context(kafka: KafkaSettings) -> ssl.SSLContext | None:
    """The TLS context of SSL and SASL_SSL: `ssl_cafile` (else the system's trust store), the broker's
    host name checked, and the client certificate when one is configured. None for the plaintext protocols."""
    if not uses_tls(kafka):
        return None
    try:
        context = ssl.create_default_context(
            ssl.Purpose.SERVER_AUTH, cafile=str(kafka.ssl_cafile) if kafka.ssl_cafile else None
        )
        if kafka.ssl_certfile is not None and kafka.ssl_keyfile is not None:
            context.load_cert_chain(str(kafka.ssl_certfile), str(kafka.ssl_keyfile))
    except (OSError, ssl.SSLError) as exc:  # FileNotFoundError, a file that is not PEM
        raise ConfigError(f"kafka.ssl_*: cannot load the TLS files ({exc})") from None
    return context


def client_security(kafka: KafkaSettings) -> dict[str, Any]:
    """aiokafka's security kwargs for a producer, consumer, admin client or connection."""
    options: dict[str, Any] = {"security_protocol": kafka.security_protocol}
    context = ssl_context(kafka)
    if context is not None:
        options["ssl_context"] = context
    if kafka.security_protocol.startswith("SASL_"):
        assert kafka.sasl_password is not None  # KafkaSettings checks it
        options["sasl_mechanism"] = kafka.sasl_mechanism
        options["sasl_plain_username"] = kafka.sasl_username
        options["sasl_plain_password"] = kafka.sasl_password.get_secret_value()
    return options


def bootstrap_addresses(kafka: KafkaSettings) -> list[tuple[str, int]]:
    out = []
    for entry in kafka.bootstrap_servers.split(","):
        host, _, port = entry.strip().rpartition(":")
        out.append((host.strip("[]") or entry.strip(), int(port) if port.isdigit() else 9092))
    return out


async def verify_access(kafka: KafkaSettings) -> bool:
    """Log in to the first bootstrap server that answers. Raises KafkaAccessRefused when the broker refuses
    the credentials or its certificate is not trusted; returns False when no server answers (down, or not
    reachable yet: the caller's usual retries apply), True once one accepted us."""
    options = client_security(kafka)
    for host, port in bootstrap_addresses(kafka):
        try:
            conn = await create_conn(
                host, port, client_id=kafka.client_id, request_timeout_ms=PROBE_TIMEOUT_MS, **options
            )
        except _REFUSED as exc:
            raise KafkaAccessRefused(
                f"Kafka at {host}:{port} refused {kafka.security_protocol}/{kafka.sasl_mechanism} login as "
                f"{kafka.sasl_username!r}: {_first_line(exc)}"
            ) from None
        except ssl.SSLCertVerificationError as exc:
            raise KafkaAccessRefused(
                f"Kafka at {host}:{port}: its TLS certificate is not trusted ({exc.verify_message}; "
                f"kafka.ssl_cafile = {kafka.ssl_cafile or 'the system trust store'})"
            ) from None
        except ssl.SSLError as exc:
            raise KafkaAccessRefused(
                f"Kafka at {host}:{port}: the TLS handshake failed ({exc.reason or exc}); "
                f"is {kafka.security_protocol} the listener's protocol?"
            ) from None
        except (OSError, TimeoutError) as exc:
            log.debug("Kafka at %s:%s did not answer the access check: %s", host, port, exc)
            continue
        conn.close()
        return True
    return False


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0]
