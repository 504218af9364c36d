"""System failures, as exceptions. Data failures are not here: they are reason codes (pipeline.reasons).

HeadwaterError
├── ConfigError          start-up; the message names the key and the file
├── AuthError            receiver -> 401; never carries the credential
├── PayloadTooLarge      receiver -> 413
├── BrokerUnavailable    retry_after_s; receiver -> 503 + Retry-After; CLI -> one line, exit 1
├── KafkaAccessRefused   start-up: wrong Kafka credentials or an untrusted certificate; one line, exit 1
├── LocalKafkaError      `headwater kafka up/down`: Java or Maven missing, port taken, start timed out
└── NotFound             CLI: an id that names nothing (exit 2)
"""

from __future__ import annotations


class HeadwaterError(Exception):
    """Root of every error Headwater raises on purpose."""

    exit_code = 1


class ConfigError(HeadwaterError):
    """The settings cannot be used; the message names the key."""


class AuthError(HeadwaterError):
    """The request's credentials name no tenant. Never carries the credential itself."""


class PayloadTooLarge(HeadwaterError):
    """The body is over `receiver.max_body_bytes`."""


class BrokerUnavailable(HeadwaterError):
    """Kafka did not acknowledge in time, or the in-flight bound is reached: retry later."""

    def __init__(self, message: str, retry_after_s: float = 2.0) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class KafkaAccessRefused(HeadwaterError):
    """The broker refused our login or we do not trust its certificate: retrying cannot help."""


class LocalKafkaError(HeadwaterError):
    """The local broker cannot be resolved, started or stopped."""


class NotFound(HeadwaterError):
    """An id given on the command line names nothing."""

    exit_code = 2
