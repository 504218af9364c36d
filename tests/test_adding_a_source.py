"""Adding a source is one adapter module: its route, auth and processing come from what it declares."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import orjson
import pytest
from rigs.kafka import LoopThread, read_records, toml_text, wait_for

from adapters import ADAPTERS
from pipeline.config import Settings
from pipeline.ingest.receiver import Receiver
from pipeline.records import RawHeaders

# A source nobody else knows about, written the way adapters/<source>.py are: pure, declarative.
ACMEFORMS = '''
"""Acme Forms webhooks (POST /acmeforms/v1): one submitted form per request."""

from collections.abc import Mapping

from pipeline import reading as read
from pipeline import reasons
from pipeline.adapting import AuthScheme, Draft, Header, RawMeta, RequestValue, VendorRecord, reject

SOURCE = "acmeforms"
BATCHED = False
ROUTES = ("/acmeforms/v1",)
AUTH: AuthScheme = "write_key"
REQUEST_META: Mapping[str, RequestValue] = {"form_id": Header("X-Form-Id")}


def parse(body: bytes, meta: RawMeta) -> list[VendorRecord]:
    return [read.as_object(read.json_body(body), "the body")]


def normalize(record: VendorRecord, meta: RawMeta) -> Draft:
    user_id = read.identifier(record, "respondent")
    if user_id is None:
        reject(reasons.MISSING_USER_IDENTITY, "respondent is required", path="respondent")
    return Draft(event_name="form_submitted", user_id=user_id, anonymous_id=None,
                 vendor_event_id=read.event_id(record, "submission_id"),
                 timestamp=read.timestamp(record, "submitted_at", required=True),
                 properties={"form_id": meta.vendor.get("form_id")})
'''

WORKER = """
import sys
sys.path.insert(0, sys.argv[2])
import acmeforms
from adapters import ADAPTERS
from pipeline.config import load_settings
from pipeline.stream.worker import Worker

Worker(load_settings(sys.argv[1]), ["acmeforms"], {**ADAPTERS, "acmeforms": acmeforms}).run()
"""


@pytest.fixture
def acmeforms(tmp_path: Path) -> ModuleType:
    """The throwaway adapter as an importable module in its own directory."""
    path = tmp_path / "plugins" / "acmeforms.py"
    path.parent.mkdir()
    path.write_text(ACMEFORMS)
    spec = importlib.util.spec_from_file_location("acmeforms", path)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def acmeforms_worker(settings: Settings, tmp_path: Path) -> Iterator[subprocess.Popen[bytes]]:
    config = tmp_path / "worker.toml"
    config.write_text(toml_text(settings))
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    with (tmp_path / "worker.log").open("wb") as log:
        process = subprocess.Popen(
            [sys.executable, str(script), str(config), str(tmp_path / "plugins")],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
        yield process
        process.terminate()
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)


def post(url: str, body: bytes, headers: dict[str, str]) -> int:
    request = urllib.request.Request(url, data=body, headers=headers, method="POST")
    with urllib.request.urlopen(request, timeout=10) as response:
        status: int = response.status
        return status


def test_a_registered_adapter_gets_a_route_auth_and_end_to_end_processing(
    settings: Settings,
    loop_thread: LoopThread,
    acmeforms: ModuleType,
    acmeforms_worker: subprocess.Popen[bytes],
) -> None:
    """A module that declares ROUTES, AUTH and REQUEST_META is served, authenticated, stored with its request
    metadata and normalized into a canonical event, with no other module changed."""
    receiver = Receiver(settings, adapters={**ADAPTERS, "acmeforms": acmeforms})
    port = loop_thread.run(receiver.start())
    try:
        url = f"http://127.0.0.1:{port}/acmeforms/v1"
        body = orjson.dumps(
            {"respondent": "u_7", "submission_id": "sub_1", "submitted_at": "2024-03-01T12:00:00Z"}
        )
        with pytest.raises(urllib.error.HTTPError) as refused:
            post(url, body, {"X-API-KEY": "not-a-key"})
        assert refused.value.code == 401
        assert post(url, body, {"X-API-KEY": "wk_acme_1", "X-Form-Id": "f_42"}) == 200
    finally:
        loop_thread.run(receiver.stop())
    [record] = wait_for(lambda: read_records(settings, settings.topics.raw("acmeforms")))
    headers = RawHeaders.from_kafka(record.headers)
    assert (headers.tenant, headers.source, headers.vendor) == ("acme", "acmeforms", {"form_id": "f_42"})
    [event] = wait_for(lambda: read_records(settings, settings.topics.canonical), timeout=90)
    canonical = orjson.loads(event.value)
    assert (canonical["source"], canonical["event_id"], canonical["user_id"]) == ("acmeforms", "sub_1", "u_7")
    assert canonical["properties"] == {"form_id": "f_42"}
