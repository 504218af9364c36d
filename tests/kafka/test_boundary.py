"""aiokafka's internals are touched in pipeline/kafka/ only.

The private attributes and methods of aiokafka's clients (a consumer's `_client`, a producer's `_sender`,
...) change between releases without notice. pipeline/kafka/ wraps what Headwater needs of them
(pipeline.kafka.reading: partitions with a metadata refresh, ranges, offsets at a time, tails), so an
aiokafka upgrade is checked in one package. This test reads aiokafka's source for the private names its
client classes define and fails on any use of one, on anything but `self`, outside pipeline/kafka/.
"""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import aiokafka.admin.client
import aiokafka.client
import aiokafka.consumer.consumer
import aiokafka.producer.producer

ROOT = Path(__file__).resolve().parents[2]
SCANNED = ("pipeline", "adapters", "bench", "tests")
ALLOWED = ROOT / "pipeline" / "kafka"
CLASSES = (
    aiokafka.consumer.consumer.AIOKafkaConsumer,
    aiokafka.producer.producer.AIOKafkaProducer,
    aiokafka.client.AIOKafkaClient,
    aiokafka.admin.client.AIOKafkaAdminClient,
)


def private_names() -> set[str]:
    """The `_name` attributes and methods aiokafka's client classes define (dunder names excluded)."""
    names: set[str] = set()
    for cls in CLASSES:
        for node in ast.walk(ast.parse(inspect.getsource(cls))):
            if (
                isinstance(node, ast.Attribute)
                and isinstance(node.value, ast.Name)
                and node.value.id == "self"
            ):
                names.add(node.attr)
            elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                names.add(node.name)
    return {n for n in names if n.startswith("_") and not n.startswith("__")}


def uses(path: Path, names: set[str]) -> list[str]:
    """`file:line: expr` for each `<something other than self or cls>._name` with `_name` in names."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if (
            isinstance(node, ast.Attribute)
            and node.attr in names
            and not (isinstance(node.value, ast.Name) and node.value.id in ("self", "cls"))
        ):
            found.append(f"{path.relative_to(ROOT)}:{node.lineno}: {ast.unparse(node)}")
    return found


def test_the_private_names_are_found_in_aiokafka() -> None:
    """The scan below is only as good as this list: it holds the names the boundary exists for."""
    names = private_names()
    assert {"_client", "_fetcher", "_coordinator", "_sender"} <= names


def test_no_module_outside_pipeline_kafka_uses_a_private_aiokafka_attribute() -> None:
    names = private_names()
    offenders = [
        use
        for top in SCANNED
        for path in sorted((ROOT / top).rglob("*.py"))
        if ALLOWED not in path.parents and ".venv" not in path.parts
        for use in uses(path, names)
    ]
    assert offenders == [], "use pipeline.kafka.reading (or add what is missing there):\n" + "\n".join(
        offenders
    )
