"""docker-compose.yml, the Dockerfile and the compose config, parsed for the static compose checks and the
dashboard test."""

from __future__ import annotations

import re
import shlex
import tomllib
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import click
import yaml

from pipeline.cli import main
from pipeline.config import Settings, load_settings

ROOT = Path(__file__).resolve().parents[2]


COMPOSE: dict[str, Any] = yaml.safe_load((ROOT / "docker-compose.yml").read_text())


SERVICES: dict[str, dict[str, Any]] = COMPOSE["services"]
SECRETS: dict[str, dict[str, Any]] = COMPOSE.get("secrets", {})


PROJECT_VERSION = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]


HEADWATER_IMAGE = f"headwater:{PROJECT_VERSION}"


HEADWATER = {name: s for name, s in SERVICES.items() if s.get("image") == HEADWATER_IMAGE}


LONG_RUNNING = {name: s for name, s in SERVICES.items() if not s.get("profiles")}


# What each Headwater service must run: the path of `headwater` subcommands its command resolves to.
EXPECTED_COMMANDS = {
    "receiver": ("receiver",),
    "worker-1": ("worker",),
    "worker-2": ("worker",),
    "rewards": ("rewards", "run"),
    "cli": (),
}


def resolve(args: list[str]) -> tuple[str, ...]:
    """The subcommands `headwater ARGS` would run, parsed by click exactly as at run time; nothing runs.

    Raises click.UsageError (unknown command or option, bad value) where `headwater` would exit with 2.
    """
    path: list[str] = []
    command: click.Command = main
    ctx = main.make_context("headwater", list(args))
    while isinstance(command, click.Group):
        protected = ctx._protected_args if hasattr(ctx, "_protected_args") else ctx.protected_args
        rest = [*protected, *ctx.args]
        if not rest:
            if not command.invoke_without_command:
                raise click.UsageError(f"{' '.join(['headwater', *path])} needs a subcommand")
            break
        name, sub, rest = command.resolve_command(ctx, rest)
        assert name is not None and sub is not None
        path.append(name)
        ctx = sub.make_context(name, rest, parent=ctx)
        command = sub
    return tuple(path)


def headwater_args(service: dict[str, Any]) -> list[str]:
    command = service["command"]
    return shlex.split(command) if isinstance(command, str) else list(command)


def healthcheck_url(service: dict[str, Any]) -> Any:
    test = service["healthcheck"]["test"]
    text = test if isinstance(test, str) else " ".join(test)
    urls = re.findall(r"https?://[^\s'\"]+", text)
    assert len(urls) == 1, f"one URL expected in the healthcheck {text!r}"
    return urlsplit(urls[0])


def published_container_ports(service: dict[str, Any]) -> set[int]:
    return {int(str(p).split(":")[-1].split("/")[0]) for p in service.get("ports", [])}


def published_ports(service: dict[str, Any]) -> list[tuple[str | None, str, int]]:
    """(host IP or None for every interface, host port, container port) of each published port.

    Short syntax `[HOST_IP:]HOST:CONTAINER[/PROTO]` and long syntax (`host_ip`, `published`, `target`).
    """
    out: list[tuple[str | None, str, int]] = []
    for port in service.get("ports", []):
        if isinstance(port, dict):
            out.append((port.get("host_ip"), str(port.get("published", "")), int(port["target"])))
            continue
        parts = str(port).split("/")[0].split(":")
        host_ip = parts[0] if len(parts) == 3 else None
        host_port = parts[-2] if len(parts) >= 2 else ""
        out.append((host_ip, host_port, int(parts[-1])))
    return out


def required_from_environment(value: Any, variable: str) -> bool:
    """`${VARIABLE:?message}` or `${VARIABLE?message}`: compose takes it from the environment and refuses to
    start when it is unset, so there is no default to leak."""
    return re.fullmatch(r"\$\{" + re.escape(variable) + r":?\?[^}]*\}", str(value)) is not None


def config_mount(service: dict[str, Any]) -> tuple[Path, str]:
    """(host file, container path) of the mounted TOML config."""
    for volume in service.get("volumes", []):
        source, target, *_ = volume.split(":")
        if source.endswith(".toml"):
            return ROOT / source, target
    raise AssertionError("no TOML config is mounted")


def settings_of(service: dict[str, Any]) -> Settings:
    """The Settings the container would load: its mounted file, under its own environment."""
    host_file, _ = config_mount(service)
    environment = {k: str(v) for k, v in service.get("environment", {}).items()}
    environment.pop("HEADWATER_TENANTS_FILE", None)  # a compose secret: it exists in the container only
    return load_settings(host_file, environ=environment)


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", (ROOT / "Dockerfile").read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, rest = line.partition(" ")
            out.append((keyword.upper(), rest.strip()))
    return out


def copy_sources() -> list[str]:
    """What the Dockerfile copies from the build context (not from another stage)."""
    sources = []
    for keyword, args in dockerfile_instructions():
        if keyword == "COPY" and not args.startswith("--from"):
            sources += [source.rstrip("/") for source in args.split()[:-1]]
    return sources


def final_stage() -> list[tuple[str, str]]:
    instructions = dockerfile_instructions()
    last_from = max(i for i, (keyword, _) in enumerate(instructions) if keyword == "FROM")
    return instructions[last_from:]


def is_pinned(image: str) -> bool:
    """A digest, or a tag with a version number in it (not `latest`, not a bare name)."""
    if "@sha256:" in image:
        return True
    name, _, tag = image.rpartition(":")
    return bool(name) and "/" not in tag and tag != "latest" and re.search(r"\d+\.\d+", tag) is not None
