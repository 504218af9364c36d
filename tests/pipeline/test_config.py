"""Settings: the shipped example is complete and loads; mistakes are named
(docs/architecture.md, "Configuration")."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from pydantic import BaseModel

from pipeline.config import EXAMPLE_CONFIG, Settings, load_settings
from pipeline.errors import ConfigError


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "headwater.toml"
    path.write_text(text)
    return path


def section_fields(model: type[BaseModel]) -> dict[str, set[str]]:
    """Each TOML section of Settings (a nested model) and the keys it accepts."""
    out: dict[str, set[str]] = {}
    for name, field in model.model_fields.items():
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            out[name] = set(annotation.model_fields)
    return out


def test_the_shipped_example_loads() -> None:
    """The example config the quick start uses is valid as shipped."""
    settings = load_settings(EXAMPLE_CONFIG, environ={})
    assert settings.tenants and settings.tenants[0].id == "demo"


def test_the_shipped_example_names_every_setting() -> None:
    """Every key of every section appears in the example, set or commented out, so it documents them all."""
    text = EXAMPLE_CONFIG.read_text()
    for section, keys in section_fields(Settings).items():
        body = re.search(rf"^\[{section}\]\n(.*?)(?=^\[|\Z)", text, re.S | re.M)
        assert body, f"[{section}] is missing from the example"
        for key in keys:
            assert re.search(rf"^#? ?{key} = ", body.group(1), re.M), f"{section}.{key} is not in the example"


def test_an_unknown_key_is_named(tmp_path: Path) -> None:
    """A misspelt key fails at start-up with its dotted name, not a generic error."""
    path = write(tmp_path, "[receiver]\nmax_body_byte = 10\n")
    with pytest.raises(ConfigError, match=r"unknown key receiver\.max_body_byte"):
        load_settings(path, environ={})


def test_an_unknown_tenant_key_is_named_with_its_index(tmp_path: Path) -> None:
    """Keys inside [[tenants]] are named with the tenant's position."""
    path = write(tmp_path, '[[tenants]]\nid = "a"\nwebengage = { license_code = "~a", secret = "x" }\n')
    with pytest.raises(ConfigError, match=r"unknown key tenants\[0\]\.webengage\.secret"):
        load_settings(path, environ={})


def test_a_write_key_shared_by_two_tenants_is_refused(tmp_path: Path) -> None:
    """A credential identifies one tenant; two tenants with the same write key cannot both be right."""
    path = write(
        tmp_path, '[[tenants]]\nid = "a"\nwrite_keys = ["k1"]\n[[tenants]]\nid = "b"\nwrite_keys = ["k1"]\n'
    )
    with pytest.raises(ConfigError, match="shared by tenants 'a' and 'b'"):
        load_settings(path, environ={})


def test_environment_overrides_the_file_and_flags_override_both(tmp_path: Path) -> None:
    """HEADWATER_KAFKA_BOOTSTRAP beats the file; a command-line override beats the environment."""
    path = write(tmp_path, '[kafka]\nbootstrap_servers = "file:9092"\n[receiver]\nport = 1\n')
    settings = load_settings(
        path,
        environ={"HEADWATER_KAFKA_BOOTSTRAP": "env:9092", "HEADWATER_RECEIVER_PORT": "2"},
        overrides={"receiver.port": 3},
    )
    assert (settings.kafka.bootstrap_servers, settings.receiver.port) == ("env:9092", 3)


def test_durations_read_as_text(tmp_path: Path) -> None:
    """'7d' and '90s' are durations; a word that is not one is refused with the key's name."""
    assert load_settings(write(tmp_path, '[dedup]\nwindow = "7d"\n'), environ={}).dedup.window.days == 7
    with pytest.raises(ConfigError, match=r"dedup\.window"):
        load_settings(write(tmp_path, '[dedup]\nwindow = "soon"\n'), environ={})


def test_a_missing_file_is_a_one_line_error(tmp_path: Path) -> None:
    """HEADWATER_CONFIG pointing nowhere says which path it tried."""
    with pytest.raises(ConfigError, match="config file not found"):
        load_settings(tmp_path / "nope.toml", environ={})


def test_a_setting_reads_its_value_from_the_file_its_file_variable_names(tmp_path: Path) -> None:
    """`<NAME>_FILE` is the Docker/Kubernetes secrets convention: the value is the file's content."""
    config = write(tmp_path, '[kafka]\nsecurity_protocol = "SASL_SSL"\nsasl_username = "hw"\n')
    secret = tmp_path / "password"
    secret.write_text("s3cret\n")
    settings = load_settings(config, environ={"HEADWATER_KAFKA_SASL_PASSWORD_FILE": str(secret)})
    assert settings.kafka.sasl_password is not None
    assert settings.kafka.sasl_password.get_secret_value() == "s3cret"
    both = {"HEADWATER_KAFKA_SASL_PASSWORD_FILE": str(secret), "HEADWATER_KAFKA_SASL_PASSWORD": "x"}
    with pytest.raises(ConfigError, match="both HEADWATER_KAFKA_SASL_PASSWORD and"):
        load_settings(config, environ=both)
    with pytest.raises(ConfigError, match="cannot read"):
        load_settings(config, environ={"HEADWATER_KAFKA_SASL_PASSWORD_FILE": str(tmp_path / "none")})


def test_tenants_come_from_their_own_file_and_not_from_both(tmp_path: Path) -> None:
    config = write(tmp_path, "[kafka]\npartitions = 2\n")
    tenants = tmp_path / "tenants.toml"
    tenants.write_text('[[tenants]]\nid = "acme"\nwrite_keys = ["wk_from_secret"]\n')
    settings = load_settings(config, environ={"HEADWATER_TENANTS_FILE": str(tenants)})
    assert [k.get_secret_value() for k in settings.tenants[0].write_keys] == ["wk_from_secret"]
    doubled = write(tmp_path, '[[tenants]]\nid = "other"\n')
    with pytest.raises(ConfigError, match="keep one"):
        load_settings(doubled, environ={"HEADWATER_TENANTS_FILE": str(tenants)})


@pytest.mark.parametrize(
    ("kafka", "message"),
    [
        ('security_protocol = "SASL_SSL"', "needs sasl_username and sasl_password"),
        ('sasl_username = "hw"', "unused with PLAINTEXT"),
        ('ssl_cafile = "/ca.pem"', "unused with PLAINTEXT"),
        ('security_protocol = "SSL"\nssl_certfile = "/c.pem"', "go together"),
    ],
)
def test_kafka_security_settings_that_cannot_work_are_refused(
    tmp_path: Path, kafka: str, message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        load_settings(write(tmp_path, f"[kafka]\n{kafka}\n"), environ={})


@pytest.mark.parametrize(
    ("text", "named"),
    [
        (
            "[worker]\nsession_timeout_s = 120\n",
            r"worker\.session_timeout_s \(120\) must be below worker\.request_timeout_s",
        ),
        ('[rewards]\nsession_timeout = "2m"\n', r"rewards\.session_timeout \(120s\) must be below"),
        ("[local_kafka]\nport = 9100\ncontroller_port = 9100\n", r"local_kafka\.controller_port must differ"),
        ("[worker]\nweb_port = 8080\n", r"worker\.web_port and receiver\.port are both 127\.0\.0\.1:8080"),
    ],
)
def test_settings_that_cannot_work_together_are_refused_with_the_key(
    tmp_path: Path, text: str, named: str
) -> None:
    """A combination a process would die on at start (a session longer than the request timeout, two
    servers on one port) is refused when the config is loaded, naming the key to change."""
    with pytest.raises(ConfigError, match=named):
        load_settings(write(tmp_path, text), environ={})


def test_a_session_below_its_request_timeout_loads(tmp_path: Path) -> None:
    """A longer session is fine with a longer request timeout beside it."""
    text = "[worker]\nsession_timeout_s = 120\nrequest_timeout_s = 150\n"
    assert load_settings(write(tmp_path, text), environ={}).worker.session_timeout_s == 120
