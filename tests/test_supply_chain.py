"""Supply chain: installed dependencies at or above pyproject's floors, every dependency pinned with hashes
in the lock files CI and the image install from, and the base image pinned by digest.

Run by `./dev check` too: an environment with a dependency below its floor (one with a published advisory
on our paths) fails before anything else runs.
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Callable, Iterable
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
# Releases with published advisories on our paths: the floors must stay above them.
ADVISORIES = {"aiohttp": ["3.14.3", "3.13.3", "3.9.5"], "orjson": ["3.11.5", "3.9.14"]}


def declared(extras: Iterable[str] = ("test",)) -> list[Requirement]:
    project = PYPROJECT["project"]
    lines = list(project["dependencies"])
    for extra in extras:
        lines += project["optional-dependencies"][extra]
    return [Requirement(line) for line in lines]


def installed_version(name: str) -> str | None:
    try:
        return version(name)
    except PackageNotFoundError:
        return None


def unmet(requirements: Iterable[Requirement], installed: Callable[[str], str | None]) -> list[str]:
    """Each requirement (whose marker applies here) that the installed version does not satisfy."""
    out = []
    for requirement in requirements:
        if requirement.marker is not None and not requirement.marker.evaluate():
            continue
        found = installed(requirement.name)
        if found is None or not requirement.specifier.contains(found, prereleases=True):
            out.append(f"{requirement.name} {found or 'missing'} does not satisfy {requirement}")
    return out


def pins(lock: str) -> dict[str, tuple[str, int]]:
    """name -> (pinned version, number of hashes) of a pip-compile style lock file."""
    text = (ROOT / lock).read_text()
    out: dict[str, tuple[str, int]] = {}
    for block in re.split(r"\n(?=[A-Za-z0-9])", text):
        match = re.match(r"([A-Za-z0-9_.-]+)==(\S+)", block)
        if match:
            out[canonicalize_name(match[1])] = (match[2], block.count("--hash=sha256:"))
    return out


def test_every_installed_dependency_is_at_or_above_its_floor() -> None:
    assert unmet(declared(), installed_version) == []


def test_the_check_names_a_dependency_below_its_floor() -> None:
    """The check itself: an aiohttp of 3.14.3 (an advisory release) is reported, 3.14.5 is not."""
    requirement = [Requirement("aiohttp>=3.14.4")]
    assert unmet(requirement, lambda name: "3.14.3") == ["aiohttp 3.14.3 does not satisfy aiohttp>=3.14.4"]
    assert unmet(requirement, lambda name: "3.14.5") == []


@pytest.mark.parametrize("name", sorted(ADVISORIES))
def test_the_floors_exclude_releases_with_advisories(name: str) -> None:
    (requirement,) = [r for r in declared(()) if canonicalize_name(r.name) == name]
    assert not any(requirement.specifier.contains(v) for v in ADVISORIES[name]), requirement
    build = [Requirement(r) for r in PYPROJECT["build-system"]["requires"]]
    assert not any(r.specifier.contains(v) for r in build if r.name == name for v in ADVISORIES[name])


@pytest.mark.parametrize(
    ("lock", "extras"), [("requirements.lock", ()), ("requirements-test.lock", ("test",))]
)
def test_the_locks_pin_every_dependency_with_hashes_within_its_floor(
    lock: str, extras: tuple[str, ...]
) -> None:
    pinned = pins(lock)
    for requirement in declared(extras):
        name = canonicalize_name(requirement.name)
        assert name in pinned, f"{name} is not pinned in {lock}: regenerate the locks (docs/dependencies.md)"
        assert requirement.specifier.contains(pinned[name][0], prereleases=True), (name, pinned[name])
    assert all(hashes > 0 for _, hashes in pinned.values()), lock
    build = [Requirement(r) for r in PYPROJECT["build-system"]["requires"]]
    for requirement in build:  # the image builds with --no-build-isolation from these pins
        name = canonicalize_name(requirement.name)
        assert name in pinned and requirement.specifier.contains(pinned[name][0]), (lock, requirement)


def test_the_test_lock_keeps_the_runtime_locks_versions() -> None:
    runtime, test = pins("requirements.lock"), pins("requirements-test.lock")
    assert {name: test[name][0] for name in runtime} == {
        name: pinned for name, (pinned, _) in runtime.items()
    }


def test_the_image_installs_from_the_lock_on_a_base_pinned_by_digest() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    bases = re.findall(r"^FROM\s+(\S+)", dockerfile, flags=re.MULTILINE)
    assert bases and all(re.search(r"@sha256:[0-9a-f]{64}$", base) for base in bases), bases
    assert "--require-hashes -r requirements.lock" in dockerfile
    assert Version(pins("requirements.lock")["aiohttp"][0]) >= Version("3.14.4")
