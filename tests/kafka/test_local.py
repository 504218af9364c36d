"""The local broker's set-up steps that do not need a broker (pipeline.kafka.local)."""

from __future__ import annotations

import uuid

import pytest

from pipeline.kafka import local


def test_a_cluster_id_never_starts_with_a_dash(monkeypatch: pytest.MonkeyPatch) -> None:
    """A random id whose text would start with '-' is drawn again: StorageTool reads '-...' as an option
    ("--cluster-id expected one argument"), which once failed a fresh `kafka up`."""
    draws = iter([uuid.UUID(bytes=b"\xf8" + bytes(15)), uuid.UUID(bytes=b"\x10" + bytes(15))])
    monkeypatch.setattr(local.uuid, "uuid4", lambda: next(draws))
    cluster_id = local.new_cluster_id()
    assert cluster_id == "EAAAAAAAAAAAAAAAAAAAAA"
    assert len(cluster_id) == 22
