"""The docker-compose deployment, checked statically: no Docker engine runs where these tests run.

What is checked is what would break a `docker compose up` silently: a service command that `headwater`
would refuse, a healthcheck or published port that is not the port the mounted config listens on, a
config that does not load, an unpinned image, a container running as root (docs/deployment.md), a
port published beyond this host that should not be, a secret written into the repository instead of
taken from the environment (docs/dashboards.md).
"""

from __future__ import annotations

import fnmatch
import re
import subprocess
import sys
import tomllib
from pathlib import Path
from urllib.parse import urlsplit

import click
import pytest
import yaml
from rigs.compose import (
    EXPECTED_COMMANDS,
    HEADWATER,
    HEADWATER_IMAGE,
    LONG_RUNNING,
    ROOT,
    SECRETS,
    SERVICES,
    config_mount,
    copy_sources,
    dockerfile_instructions,
    final_stage,
    headwater_args,
    healthcheck_url,
    is_pinned,
    published_container_ports,
    published_ports,
    required_from_environment,
    resolve,
    settings_of,
)

from pipeline.config import EXAMPLE_CONFIG, load_settings


class TestCommands:
    @pytest.mark.parametrize("name", sorted(EXPECTED_COMMANDS))
    def test_each_headwater_service_runs_a_real_headwater_subcommand(self, name: str) -> None:
        """A service's command parses against the `headwater` CLI (subcommands and options) to the
        subcommand the service is for."""
        service = HEADWATER[name]
        try:
            path = resolve(headwater_args(service))
        except click.exceptions.Exit as done:  # --help: click prints the help and exits 0
            assert done.exit_code == 0
            path = ()
        assert path == EXPECTED_COMMANDS[name]

    @pytest.mark.parametrize(
        "args",
        [
            ["workers"],
            ["receiver", "--prot", "8080"],
            ["rewards", "go"],
            ["rewards", "run", "--exit-after", "soon"],
            ["kafka"],
        ],
    )
    def test_a_command_headwater_would_refuse_is_refused_here_too(self, args: list[str]) -> None:
        """The check above is not vacuous: a misspelt subcommand or option, or a bad value, fails."""
        with pytest.raises(click.UsageError):
            resolve(args)

    def test_the_stack_is_kafka_one_receiver_two_workers_the_dispatcher_and_a_console(self) -> None:
        """By default: one receiver, two workers in one consumer group, one dispatcher, Kafka, a console,
        Prometheus and Grafana."""
        running = [
            resolve(headwater_args(s)) for s in LONG_RUNNING.values() if s.get("image") == HEADWATER_IMAGE
        ]
        assert sorted(running) == [("receiver",), ("rewards", "run"), ("worker",), ("worker",)]
        images = [s["image"].split(":")[0] for s in LONG_RUNNING.values()]
        assert "apache/kafka" in images and "docker.redpanda.com/redpandadata/console" in images
        assert "prom/prometheus" in images and "grafana/grafana" in images


class TestConfig:
    @pytest.mark.parametrize("name", sorted(HEADWATER))
    def test_the_mounted_config_is_the_one_headwater_config_names(self, name: str) -> None:
        """Each Headwater service mounts deploy/headwater.compose.toml read-only at HEADWATER_CONFIG."""
        service = HEADWATER[name]
        host_file, target = config_mount(service)
        assert host_file == ROOT / "deploy" / "headwater.compose.toml" and host_file.is_file()
        assert service["environment"]["HEADWATER_CONFIG"] == target
        assert any(v.endswith(f":{target}:ro") for v in service["volumes"])

    @pytest.mark.parametrize("name", sorted(HEADWATER))
    def test_the_config_loads_and_points_at_the_kafka_service(self, name: str) -> None:
        """Loaded as the container loads it (its environment included), the config uses an address the
        broker advertises on the compose network, no local broker, and no more replicas than brokers."""
        settings = settings_of(HEADWATER[name])
        kafka = SERVICES["kafka"]
        on_network = {
            urlsplit(listener).netloc
            for listener in kafka["environment"]["KAFKA_ADVERTISED_LISTENERS"].split(",")
            if urlsplit(listener).hostname in (kafka["hostname"], "kafka")
        }
        assert settings.kafka.bootstrap_servers in on_network
        assert settings.local_kafka.enabled is False
        brokers = [s for s in SERVICES.values() if s["image"].startswith("apache/kafka:")]
        assert settings.kafka.replication_factor <= len(brokers)
        assert settings.tenants == ()  # credentials come from the tenants secret, never the repository

    def test_the_receiver_listens_on_all_interfaces_at_its_published_port(self) -> None:
        """The receiver binds 0.0.0.0 at receiver.port, which is the container port compose publishes."""
        service = HEADWATER["receiver"]
        settings = settings_of(service)
        assert settings.receiver.host == "0.0.0.0"
        assert published_container_ports(service) == {settings.receiver.port}

    def test_the_workers_cannot_outnumber_the_partitions(self) -> None:
        """Partitions bound the parallelism: every worker must be able to own at least one partition."""
        workers = [
            s
            for s in LONG_RUNNING.values()
            if s.get("image") == HEADWATER_IMAGE and resolve(headwater_args(s)) == ("worker",)
        ]
        assert 2 == len(workers) <= settings_of(workers[0]).kafka.partitions


class TestHealth:
    def test_the_receiver_healthcheck_asks_its_healthz_on_the_configured_port(self) -> None:
        """The receiver's healthcheck is GET /healthz on receiver.port, from inside its container."""
        service = HEADWATER["receiver"]
        url = healthcheck_url(service)
        port = settings_of(service).receiver.port
        assert (url.hostname, url.port, url.path) == ("127.0.0.1", port, "/healthz")

    @pytest.mark.parametrize("name", ["worker-1", "worker-2"])
    def test_a_worker_healthcheck_reads_its_health(self, name: str) -> None:
        """A worker's healthcheck reads /health on worker.web_port (503 when a stage stalls), so a stalled
        worker is restarted."""
        service = HEADWATER[name]
        url = healthcheck_url(service)
        port = settings_of(service).worker.web_port
        assert (url.hostname, url.port, url.path) == ("127.0.0.1", port, "/health")

    def test_the_dispatcher_healthcheck_reads_its_health(self) -> None:
        """The dispatcher's healthcheck reads /health on rewards.web_port (503 when a stage stalls)."""
        service = HEADWATER["rewards"]
        url = healthcheck_url(service)
        rewards = settings_of(service).rewards
        assert rewards.web_host in ("127.0.0.1", "0.0.0.0")
        assert (url.hostname, url.port, url.path) == ("127.0.0.1", rewards.web_port, "/health")

    @pytest.mark.parametrize("name", sorted(LONG_RUNNING))
    def test_a_long_running_service_restarts_by_itself(self, name: str) -> None:
        """Every service `docker compose up` starts comes back after a crash."""
        assert LONG_RUNNING[name].get("restart") in ("always", "unless-stopped", "on-failure")

    @pytest.mark.parametrize("name", sorted(set(LONG_RUNNING) - {"console"}))
    def test_kafka_and_every_headwater_process_have_a_healthcheck(self, name: str) -> None:
        """Kafka and each Headwater process have a healthcheck with a command and an interval."""
        check = LONG_RUNNING[name]["healthcheck"]
        assert check["test"] and check["interval"] and check.get("retries", 0) >= 1

    @pytest.mark.parametrize("name", sorted(HEADWATER))
    def test_headwater_starts_after_kafka_is_healthy(self, name: str) -> None:
        """Headwater services wait for the broker's healthcheck, so start-up topic creation finds a broker."""
        assert HEADWATER[name]["depends_on"]["kafka"]["condition"] == "service_healthy"


class TestImages:
    @pytest.mark.parametrize("name", sorted(SERVICES))
    def test_every_image_is_pinned(self, name: str) -> None:
        """No `latest` and no bare names: each image has a version tag or a digest."""
        assert is_pinned(SERVICES[name]["image"]), SERVICES[name]["image"]

    def test_kafka_is_the_version_the_local_broker_runs(self) -> None:
        """The compose broker is apache/kafka at the version in pipeline/kafka/pom.xml (the tested one)."""
        pom = (ROOT / "pipeline" / "kafka" / "pom.xml").read_text()
        version = re.search(r"<kafka.version>([^<]+)</kafka.version>", pom)
        assert version is not None
        assert SERVICES["kafka"]["image"] == f"apache/kafka:{version.group(1)}"
        assert SERVICES["kafka"]["environment"]["KAFKA_PROCESS_ROLES"] == "broker,controller"  # KRaft

    def test_prometheus_and_grafana_are_pinned_to_a_release(self) -> None:
        """Prometheus is a v3 release and Grafana a 12.x release, each pinned to its patch version."""
        assert re.fullmatch(r"prom/prometheus:v3\.\d+\.\d+", SERVICES["prometheus"]["image"])
        assert re.fullmatch(r"grafana/grafana:12\.\d+\.\d+", SERVICES["grafana"]["image"])

    def test_headwater_services_share_one_image_built_from_this_repository(self) -> None:
        """Receiver, workers, dispatcher and CLI are one image, tagged with the package version."""
        assert set(HEADWATER) == set(EXPECTED_COMMANDS)
        assert all(s.get("build") == "." for s in HEADWATER.values())

    def test_the_base_image_is_a_pinned_slim_python_3_11(self) -> None:
        """Every stage starts from python:3.11.<patch>-slim-*, pinned by tag and digest."""
        bases = [args.split()[0] for keyword, args in dockerfile_instructions() if keyword == "FROM"]
        pinned = r"python:3\.11\.\d+-slim(-\w+)?@sha256:[0-9a-f]{64}"
        assert bases and all(re.fullmatch(pinned, b) for b in bases), bases

    def test_the_image_runs_headwater_as_an_unprivileged_user(self) -> None:
        """The final stage switches to a non-root user before its ENTRYPOINT, which is `headwater`."""
        stage = final_stage()
        users = [args for keyword, args in stage if keyword == "USER"]
        assert users and users[-1].split(":")[0] not in ("root", "0")
        keywords = [keyword for keyword, _ in stage]
        assert keywords.index("USER") < keywords.index("ENTRYPOINT")
        [entrypoint] = [args for keyword, args in stage if keyword == "ENTRYPOINT"]
        assert yaml.safe_load(entrypoint) == ["headwater"]  # exec form: a JSON list

    def test_the_image_installs_the_package_from_the_repository(self) -> None:
        """The build copies every package pyproject.toml lists and pip-installs the project itself (its
        dependencies come from the hashed lock, so the project goes in with --no-deps)."""
        instructions = dockerfile_instructions()
        copied = {Path(source).parts[0] for source in copy_sources()}
        find = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]
        packages = {name.split(".")[0] for name in find["include"]}
        assert packages | {"pyproject.toml"} <= copied
        assert any(
            keyword == "RUN" and re.search(r"pip install --no-deps --no-build-isolation \.", args)
            for keyword, args in instructions
        )

    def test_the_image_default_config_is_the_example_without_its_demo_tenants(self, tmp_path: Path) -> None:
        """The image's /etc/headwater/headwater.toml is written by a python -c snippet; run that snippet
        here: the config loads, and has no tenant, so the image opens the receiver to no one."""
        [snippet] = [
            re.search(r'python -c "(.*)"\s*>\s*/etc/headwater/headwater.toml', args)
            for keyword, args in final_stage()
            if keyword == "RUN" and "/etc/headwater/headwater.toml" in args and "python -c" in args
        ]
        assert snippet is not None
        # In shell double quotes the backslashes stay: python -c gets the snippet exactly as written.
        result = subprocess.run(
            [sys.executable, "-c", snippet.group(1)], capture_output=True, text=True, check=True
        )
        written = tmp_path / "headwater.toml"
        written.write_text(result.stdout)
        settings = load_settings(written, environ={})
        assert settings.tenants == () and "wk_demo" not in result.stdout
        assert settings.kafka == load_settings(EXAMPLE_CONFIG, environ={}).kafka

    def test_dockerignore_keeps_what_the_build_copies_and_drops_the_virtualenv(self) -> None:
        """The build context leaves out .venv and .git but none of the files the Dockerfile copies."""
        patterns = [
            p.strip()
            for p in (ROOT / ".dockerignore").read_text().splitlines()
            if p.strip() and not p.startswith("#")
        ]
        assert {".venv", ".git"} <= set(patterns)
        for source in copy_sources():
            assert not any(fnmatch.fnmatch(source, p) for p in patterns), source


class TestExposure:
    def test_every_published_port_but_the_receivers_is_bound_to_loopback(self) -> None:
        """Kafka's host listener, the console, Prometheus and Grafana are published on 127.0.0.1 only; the
        receiver, which authenticates every request, is the one service on every interface."""
        published = {name: published_ports(s) for name, s in SERVICES.items() if s.get("ports")}
        assert {"kafka", "console", "prometheus", "grafana", "receiver"} <= set(published)
        for name, ports in published.items():
            for host_ip, _, _ in ports:
                if name == "receiver":
                    assert host_ip in (None, "0.0.0.0"), ports
                else:
                    assert host_ip == "127.0.0.1", (name, ports)

    def test_kafka_and_the_console_keep_their_host_ports_on_loopback(self) -> None:
        """Host clients still bootstrap at localhost:29092 and open the console at localhost:8081."""
        assert published_ports(SERVICES["kafka"]) == [("127.0.0.1", "29092", 29092)]
        assert published_ports(SERVICES["console"]) == [("127.0.0.1", "8081", 8080)]

    @pytest.mark.parametrize("name", ["worker-1", "worker-2", "rewards"])
    def test_worker_and_dispatcher_web_ports_stay_on_the_compose_network(self, name: str) -> None:
        """Workers (/metrics, DLQ page) and the dispatcher (/metrics) publish no port at all."""
        assert "ports" not in SERVICES[name]

    @pytest.mark.parametrize("name", ["worker-1", "worker-2"])
    def test_a_worker_takes_the_dlq_page_token_from_the_environment(self, name: str) -> None:
        """HEADWATER_DLQ_PAGE_TOKEN is passed through from the host, required, with no default."""
        environment = SERVICES[name]["environment"]
        assert required_from_environment(environment["HEADWATER_DLQ_PAGE_TOKEN"], "HEADWATER_DLQ_PAGE_TOKEN")

    @pytest.mark.parametrize("name", sorted(set(HEADWATER) - {"cli"}) + ["cli"])
    def test_tenant_credentials_come_from_a_secret_the_host_must_provide(self, name: str) -> None:
        """Every Headwater service reads its tenants from the `tenants` secret, whose file the host names
        in HEADWATER_TENANTS_FILE (required, no default): compose ships no usable credential."""
        service = HEADWATER[name]
        assert service["environment"]["HEADWATER_TENANTS_FILE"] == "/run/secrets/tenants"
        assert "tenants" in service["secrets"]
        source = SECRETS["tenants"]["file"]
        assert required_from_environment(source, "HEADWATER_TENANTS_FILE")

    def test_no_dlq_page_token_is_written_into_the_repository(self) -> None:
        """The mounted config sets no dlq.page_token: the token lives only in the host's environment."""
        host_file, _ = config_mount(HEADWATER["worker-1"])
        assert "page_token" not in tomllib.loads(host_file.read_text()).get("dlq", {})

    def test_the_env_check_rejects_a_default_or_a_literal(self) -> None:
        """The environment check above is not vacuous: a default value or a literal token fails it."""
        variable = "HEADWATER_DLQ_PAGE_TOKEN"
        assert not required_from_environment("${HEADWATER_DLQ_PAGE_TOKEN:-changeme}", variable)
        assert not required_from_environment("s3cret", variable)
        assert required_from_environment("${HEADWATER_DLQ_PAGE_TOKEN?set it}", variable)

    def test_grafana_needs_a_login_with_a_password_from_the_environment(self) -> None:
        """Grafana: anonymous access and sign-up off, the admin password required from the environment."""
        environment = SERVICES["grafana"]["environment"]
        assert environment["GF_AUTH_ANONYMOUS_ENABLED"] == "false"
        assert environment["GF_USERS_ALLOW_SIGN_UP"] == "false"
        assert required_from_environment(environment["GF_SECURITY_ADMIN_PASSWORD"], "GRAFANA_ADMIN_PASSWORD")
