"""`[kafka]`'s security as Faust credentials, for the Faust apps (the worker and the reward dispatcher).

Apart from pipeline.kafka.security so that the receiver, which must not import Faust, can use that one.
The values are the same: the TLS context and the SASL login come from pipeline.kafka.security.
"""

from __future__ import annotations

from faust.auth import SASLCredentials, SSLCredentials
from faust.types.auth import CredentialsT

from pipeline.config import KafkaSettings
from pipeline.kafka.security import ssl_context


def faust_credentials(kafka: KafkaSettings) -> CredentialsT | None:
    """Faust's `broker_credentials` for these settings (None: PLAINTEXT)."""
    context = ssl_context(kafka)
    if kafka.security_protocol.startswith("SASL_"):
        assert kafka.sasl_username is not None and kafka.sasl_password is not None
        return SASLCredentials(
            username=kafka.sasl_username,
            password=kafka.sasl_password.get_secret_value(),
            ssl_context=context,
            mechanism=kafka.sasl_mechanism,
        )
    if context is not None:
        return SSLCredentials(context)
    return None
