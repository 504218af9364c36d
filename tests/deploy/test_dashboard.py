"""The dashboards (docs/dashboards.md): Prometheus scrapes every Headwater process where it listens, and
every metric the Grafana dashboard or the Prometheus config names is one that the processes export today.

The static half reads docker-compose.yml, deploy/prometheus.yml and deploy/grafana. The live half starts
`headwater receiver`, `headwater worker` and `headwater rewards run` as a user would (subprocesses on a
TOML config, from a scratch directory, on the session's broker), sends traffic through the receiver,
scrapes each /metrics and checks the dashboard's PromQL against what was scraped.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import promql_parser
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families
from rigs.compose import HEADWATER, SERVICES, headwater_args, published_ports, resolve, settings_of
from rigs.kafka import LoopThread, die_with_parent, toml_text, wait_for
from rigs.rewards import Customer, start_customer

from pipeline.config import Settings
from pipeline.kafka.local import free_port

ROOT = Path(__file__).resolve().parents[2]
PROMETHEUS_FILE = ROOT / "deploy" / "prometheus.yml"
PROMETHEUS: dict[str, Any] = yaml.safe_load(PROMETHEUS_FILE.read_text())
GRAFANA = ROOT / "deploy" / "grafana"
DASHBOARD_FILES = sorted((GRAFANA / "dashboards").glob("*.json"))
PROVISIONING = GRAFANA / "provisioning"
DATASOURCES: dict[str, Any] = yaml.safe_load((PROVISIONING / "datasources" / "prometheus.yml").read_text())
PROVIDERS: dict[str, Any] = yaml.safe_load((PROVISIONING / "dashboards" / "headwater.yml").read_text())

# Series that Prometheus writes itself for every target; no process exports them.
PROMETHEUS_OWN = {"up"}
# What Grafana substitutes for its own variables before a query reaches Prometheus.
GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$__interval": "15s", "$__range": "1h"}


# --- reading the files ------------------------------------------------------------------------------------


def scrape_targets() -> dict[str, list[tuple[str, int]]]:
    """job name -> (host, port) of each static target in deploy/prometheus.yml."""
    out: dict[str, list[tuple[str, int]]] = {}
    for job in PROMETHEUS["scrape_configs"]:
        assert job.get("metrics_path", "/metrics") == "/metrics", job
        for static in job["static_configs"]:
            for target in static["targets"]:
                host, _, port = target.rpartition(":")
                out.setdefault(job["job_name"], []).append((host, int(port)))
    return out


def dashboard_panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """Every panel, the ones inside collapsed rows included."""
    for panel in panels:
        yield panel
        yield from dashboard_panels(panel.get("panels", []))


def dashboard_expressions() -> list[str]:
    """Every PromQL expression of the committed dashboards: panel targets and templating queries."""
    exprs: list[str] = []
    for path in DASHBOARD_FILES:
        doc = json.loads(path.read_text())
        for panel in dashboard_panels(doc["panels"]):
            exprs += [target["expr"] for target in panel.get("targets", [])]
        for variable in doc.get("templating", {}).get("list", []):
            query = variable.get("query")
            if variable.get("type") == "query":
                exprs.append(query["query"] if isinstance(query, dict) else query)
    return exprs


def prometheus_expressions() -> list[str]:
    """Every PromQL expression in the Prometheus config: the rules of the files it loads."""
    exprs: list[str] = []
    for pattern in PROMETHEUS.get("rule_files", []) or []:
        for path in sorted(PROMETHEUS_FILE.parent.glob(pattern)):
            for group in yaml.safe_load(path.read_text())["groups"]:
                exprs += [rule["expr"] for rule in group["rules"]]
    return exprs


def metric_names(expr: str) -> set[str]:
    """The metric names an expression selects, parsed as PromQL (Grafana's variables substituted first)."""
    for variable, value in GRAFANA_VARIABLES.items():
        expr = expr.replace(variable, value)
    names: set[str] = set()

    def visit(node: Any) -> None:
        if isinstance(node, promql_parser.VectorSelector):
            name = node.name or next((m.value for m in node.matchers.matchers if m.name == "__name__"), None)
            assert name, f"a selector without a metric name in {expr!r}"
            names.add(name)

    promql_parser.walk(promql_parser.parse(expr), visit)
    return names


def exposed_names(families: dict[str, str]) -> dict[str, str]:
    """Series name as a query names it -> the metric family it belongs to, for families of these types.

    prometheus_client exposes a counter `x` as `x_total`, a histogram `x` as `x_bucket`, `x_sum`,
    `x_count`; a gauge under its own name. A query naming the family's bare name for a counter or a
    histogram finds nothing, so that name is not in the result.
    """
    suffixes = {
        "counter": ["_total"],
        "histogram": ["_bucket", "_sum", "_count"],
        "summary": ["_sum", "_count"],
    }
    out: dict[str, str] = {}
    for family, kind in families.items():
        for suffix in suffixes.get(kind, [""]):
            out[family + suffix] = family
    return out


def families_of(text: str) -> dict[str, str]:
    """Metric family name -> type, from one /metrics page (declared families, with or without samples)."""
    return {family.name: family.type for family in text_string_to_metric_families(text)}


def samples_of(text: str) -> list[tuple[str, dict[str, str], float]]:
    return [
        (s.name, s.labels, s.value) for family in text_string_to_metric_families(text) for s in family.samples
    ]


# --- static: the files agree with each other ------------------------------------------------------------


# Which setting gives the port of each kind of Headwater process.
def listening_port(settings: Settings, command: tuple[str, ...]) -> int:
    return {
        ("receiver",): settings.receiver.operator_port,
        ("worker",): settings.worker.web_port,
        ("rewards", "run"): settings.rewards.web_port,
    }[command]


class TestScrapeConfig:
    def test_every_headwater_process_is_scraped_at_the_port_its_config_listens_on(self) -> None:
        """Each long-running Headwater service is one scrape target, `<service>:<port>`, at the port its
        mounted config serves /metrics on; every target is a compose service."""
        targets = [target for job in scrape_targets().values() for target in job]
        running = {name: s for name, s in HEADWATER.items() if not s.get("profiles")}
        assert sorted(host for host, _ in targets) == sorted(running)
        for host, port in targets:
            service = running[host]
            assert port == listening_port(settings_of(service), resolve(headwater_args(service))), host

    def test_the_receiver_is_scraped_at_its_operator_port_which_compose_does_not_publish(self) -> None:
        """The receiver's /metrics names tenants: it is on the operator port, reachable on the compose
        network only; the published port is the ingestion port."""
        [(host, port)] = scrape_targets()["headwater-receiver"]
        assert host == "receiver"
        assert port not in {container for _, _, container in published_ports(SERVICES["receiver"])}

    @pytest.mark.parametrize("name", ["receiver", "worker-1", "worker-2", "rewards"])
    def test_a_scraped_process_listens_beyond_its_own_loopback(self, name: str) -> None:
        """Prometheus is another container: each scraped process binds 0.0.0.0 (its port stays unpublished
        unless it is the receiver)."""
        settings = settings_of(SERVICES[name])
        command = resolve(headwater_args(SERVICES[name]))
        host = {
            ("receiver",): settings.receiver.operator_host,
            ("worker",): settings.worker.web_host,
            ("rewards", "run"): settings.rewards.web_host,
        }[command]
        assert host == "0.0.0.0"

    def test_prometheus_runs_on_this_config(self) -> None:
        """The prometheus service mounts deploy/prometheus.yml read-only where --config.file points."""
        service = SERVICES["prometheus"]
        [config_flag] = [arg for arg in service["command"] if arg.startswith("--config.file=")]
        target = config_flag.split("=", 1)[1]
        assert f"./deploy/prometheus.yml:{target}:ro" in service["volumes"]


class TestGrafanaProvisioning:
    def test_the_datasource_is_the_compose_prometheus(self) -> None:
        """The one provisioned datasource is Prometheus at the prometheus service's container port."""
        [source] = DATASOURCES["datasources"]
        [(_, _, container_port)] = published_ports(SERVICES["prometheus"])
        assert (source["type"], source["url"]) == ("prometheus", f"http://prometheus:{container_port}")

    def test_every_panel_queries_the_provisioned_datasource(self) -> None:
        """Each panel and target names the provisioned datasource's uid: it works on Grafana's first start."""
        [source] = DATASOURCES["datasources"]
        assert DASHBOARD_FILES
        for path in DASHBOARD_FILES:
            for panel in dashboard_panels(json.loads(path.read_text())["panels"]):
                for target in panel.get("targets", []):
                    assert target["expr"].strip(), panel["title"]
                    assert target["datasource"]["uid"] == source["uid"], panel["title"]
                if panel.get("targets"):
                    assert panel["datasource"]["uid"] == source["uid"], panel["title"]

    def test_grafana_loads_the_committed_dashboards(self) -> None:
        """Provisioning is mounted where Grafana reads it, and the provider's path is where the dashboards
        directory of this repository is mounted."""
        volumes = SERVICES["grafana"]["volumes"]
        assert "./deploy/grafana/provisioning:/etc/grafana/provisioning:ro" in volumes
        [provider] = PROVIDERS["providers"]
        assert f"./deploy/grafana/dashboards:{provider['options']['path']}:ro" in volumes

    def test_the_dashboard_covers_receiver_workers_and_dispatcher(self) -> None:
        """The dashboard queries the receiver's requests and produce latency, the workers' raw records, dead
        letters, duplicates and lag, and the dispatcher's deliveries, queue, in-flight and breakers."""
        names = set().union(*(metric_names(e) for e in dashboard_expressions()))
        assert {
            "headwater_receiver_requests_total",
            "headwater_receiver_produce_seconds_bucket",
            "headwater_worker_raw_records_total",
            "headwater_worker_dead_letters_total",
            "headwater_worker_duplicates_dropped_total",
            "headwater_worker_consumer_lag",
            "headwater_rewards_deliveries_total",
            "headwater_rewards_retry_queue_depth",
            "headwater_rewards_in_flight",
            "headwater_rewards_breaker_open",
        } <= names

    def test_metric_names_are_read_from_the_parsed_query(self) -> None:
        """The name extraction is PromQL's: labels, functions, grouping and range variables are not names."""
        expr = (
            'histogram_quantile(0.9, sum by (le, tenant) (rate(a_bucket{status=~"5.."}'
            "[$__rate_interval]))) / on (tenant) group_left b"
        )
        assert metric_names(expr) == {"a_bucket", "b"}

    def test_a_counter_or_histogram_is_queried_by_its_exposed_names_only(self) -> None:
        """A counter is found as `x_total`, a histogram as `x_bucket`, `x_sum`, `x_count`; never bare."""
        names = exposed_names({"c": "counter", "h": "histogram", "g": "gauge"})
        assert names == {"c_total": "c", "h_bucket": "h", "h_sum": "h", "h_count": "h", "g": "g"}


# --- live: the processes export what the dashboard asks for -----------------------------------------------


@dataclass
class Process:
    """One `headwater ...` subprocess with its output in a log file."""

    name: str
    process: subprocess.Popen[bytes]
    log_path: Path

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]


def get(url: str) -> str | None:
    """The body of GET url, or None while the process is not answering yet."""
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return bytes(response.read()).decode()
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return None


def post(url: str, body: bytes, key: str) -> int:
    request = urllib.request.Request(
        url, data=body, method="POST", headers={"X-API-KEY": key, "Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=15) as response:
            return int(response.status)
    except urllib.error.HTTPError as error:
        return int(error.code)


@pytest.fixture
def customer(loop_thread: LoopThread) -> Iterator[Customer]:
    """A customer's rewards webhook on loopback that answers 200."""
    server = start_customer(loop_thread, {})
    yield server
    loop_thread.run(server.stop())


@pytest.fixture
def stack(
    make_settings: Callable[..., Settings], customer: Customer, tmp_path: Path
) -> Iterator[tuple[Settings, dict[str, str]]]:
    """Receiver, worker and dispatcher as `headwater` subprocesses on free ports; their /metrics URLs."""
    settings = make_settings(
        receiver={"port": free_port(), "operator_port": free_port()},
        worker={"web_port": free_port()},
        rewards={"web_port": free_port(), "tick": "0.2s"},
        tenants=[
            {
                "id": "acme",
                "write_keys": ["wk_acme_1"],
                "rewards_keys": ["rk_acme_1"],
                "rewards_webhook": {
                    "url": customer.url("acme"),
                    "token": "whk_acme",
                    "allow_private_url": True,
                },
            }
        ],
    )
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    config = cwd / "headwater.toml"
    config.write_text(toml_text(settings))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    processes: list[Process] = []
    commands = {"receiver": ["receiver"], "worker": ["worker"], "rewards": ["rewards", "run"]}
    for name, command in commands.items():
        log_path = cwd / f"{name}.log"
        with log_path.open("wb") as log:
            popen = subprocess.Popen(
                [sys.executable, "-m", "pipeline.cli", "--config", str(config), *command],
                cwd=cwd,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                preexec_fn=die_with_parent,
            )
        processes.append(Process(name, popen, log_path))
    urls = {
        "receiver": f"http://127.0.0.1:{settings.receiver.operator_port}/metrics",
        "worker": f"http://127.0.0.1:{settings.worker.web_port}/metrics",
        "rewards": f"http://127.0.0.1:{settings.rewards.web_port}/metrics",
    }
    try:

        def all_up() -> bool:
            for process in processes:
                assert process.process.poll() is None, f"{process.name} exited:\n{process.output()}"
            return all(get(url) is not None for url in urls.values())

        wait_for(all_up, timeout=90)
        yield settings, urls
    finally:
        for process in processes:
            process.stop()


def has_sample(text: str | None, name: str, labels: dict[str, str], at_least: float = 0) -> bool:
    """A sample of that series with those labels (and perhaps more) and a value of at least `at_least`."""
    return text is not None and any(
        n == name and value >= at_least and all(have.get(k) == v for k, v in labels.items())
        for n, have, value in samples_of(text)
    )


def test_every_metric_the_dashboard_and_prometheus_query_is_exported(
    stack: tuple[Settings, dict[str, str]], customer: Customer
) -> None:
    """After real traffic, every metric name in the dashboard's PromQL and the Prometheus config is a series
    name that the receiver, the worker or the dispatcher exposes on /metrics."""
    settings, urls = stack
    base = f"http://127.0.0.1:{settings.receiver.port}"
    event = {
        "event_id": f"evt_{uuid.uuid4().hex}",
        "event_name": "kyc_completed",
        "user_id": "usr_501",
        "timestamp": "2024-03-01T12:00:00Z",
    }
    reward: dict[str, Any] = {
        "campaignId": "c1",
        "type": "direct",
        "userId": "usr_501",
        "rewardId": f"r-{uuid.uuid4()}",
        "rewardName": "50 Points",
        "rewardAmount": 50,
    }
    assert post(base + "/server/v4", json.dumps(event).encode(), "wk_acme_1") == 200
    assert post(base + "/server/v4", json.dumps(event).encode(), "wk_acme_1") == 200  # a duplicate
    assert post(base + "/server/v4", b"{not json", "wk_acme_1") == 200  # stored; dead-lettered by the worker
    assert post(base + "/server/v4", json.dumps(event).encode(), "wk_nobody") == 401
    assert post(base + "/rewards/v1", json.dumps(reward).encode(), "rk_acme_1") == 200

    # The positive signal: the series (labels, least value) this traffic must produce, in each process.
    expected: dict[str, list[tuple[str, dict[str, str], float]]] = {
        "receiver": [
            ("headwater_receiver_requests_total", {"source": "customerglu", "status": "200"}, 3),
            ("headwater_receiver_requests_total", {"source": "rewards", "tenant": "acme"}, 1),
            ("headwater_receiver_requests_total", {"status": "401", "tenant": "-"}, 1),
            ("headwater_receiver_produce_seconds_count", {"source": "customerglu"}, 3),
        ],
        "worker": [
            ("headwater_worker_raw_records_total", {"source": "customerglu"}, 3),
            ("headwater_worker_dead_letters_total", {"reason": "invalid_json"}, 1),
            ("headwater_worker_canonical_events_total", {}, 1),
            ("headwater_worker_duplicates_dropped_total", {}, 1),
            ("headwater_worker_consumer_lag", {}, 0),
        ],
        "rewards": [
            ("headwater_rewards_deliveries_total", {"tenant": "acme", "outcome": "delivered"}, 1),
            ("headwater_rewards_retry_queue_depth", {"tenant": "acme"}, 0),
            ("headwater_rewards_breaker_open", {"tenant": "acme"}, 0),
        ],
    }

    missing: list[
        tuple[str, str, dict[str, str], float]
    ] = []  # the last scrape's unmet series, for the failure

    def scraped_with_series() -> dict[str, str] | None:
        pages = {name: get(url) for name, url in urls.items()}
        missing[:] = [
            (name, series, labels, least)
            for name, wanted in expected.items()
            for series, labels, least in wanted
            if not has_sample(pages[name], series, labels, least)
        ]
        return {name: page for name, page in pages.items() if page is not None} if not missing else None

    try:
        pages: dict[str, str] = wait_for(scraped_with_series, timeout=90, interval=0.5)
    except AssertionError as exc:
        raise AssertionError(
            f"{exc}; series still missing (process, name, labels, least): {missing}"
        ) from None
    assert customer.seen("acme", reward["rewardId"])

    exported: dict[str, tuple[str, str]] = {}  # series name -> (process, family)
    for process, page in pages.items():
        for series, family in exposed_names(families_of(page)).items():
            exported[series] = (process, family)
    expressions = dashboard_expressions() + prometheus_expressions()
    referenced = set().union(*(metric_names(e) for e in expressions))
    assert referenced - PROMETHEUS_OWN, "the dashboard queries no Headwater metric"
    unexported = sorted(referenced - PROMETHEUS_OWN - set(exported))
    assert not unexported, f"queried but exported by no process: {unexported}; exported: {sorted(exported)}"
    # Each process has at least one panel: a dashboard that forgot one of them would pass the check above.
    assert {exported[name][0] for name in referenced - PROMETHEUS_OWN} == set(urls)
