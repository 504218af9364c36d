"""The per-event modules run compiled (setup.py, mypyc); an edit is never shadowed by an older build."""

from __future__ import annotations

import ast
import importlib
import os
import shutil
import sysconfig
from pathlib import Path

import pytest
from rigs.build import ROOT, stale_extensions

from pipeline.stream.worker import runs_compiled


def compiled_modules() -> list[str]:
    """The modules setup.py compiles, by import name (read from its COMPILED list, not imported: that
    would run setup())."""
    tree = ast.parse((ROOT / "setup.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(
            isinstance(t, ast.Name) and t.id == "COMPILED" for t in node.targets
        ):
            paths = ast.literal_eval(node.value)
            return [path.removesuffix(".py").replace("/", ".") for path in paths]
    raise AssertionError("setup.py has no COMPILED list")


def can_compile() -> bool:
    compiler = (os.environ.get("CC") or sysconfig.get_config_var("CC") or "cc").split()[0]
    headers = Path(sysconfig.get_paths()["include"]) / "Python.h"
    wanted = os.environ.get("HEADWATER_COMPILE", "1") != "0"
    return wanted and shutil.which(compiler) is not None and headers.exists()


@pytest.mark.skipif(not can_compile(), reason="a pure-Python install (HEADWATER_COMPILE=0 or no C compiler)")
def test_every_module_setup_compiles_is_loaded_from_its_extension() -> None:
    modules = compiled_modules()
    assert "adapters.segment" in modules and "pipeline.stream.normalize_batch" in modules
    for name in modules:
        origin = importlib.import_module(name).__file__ or ""
        assert origin.endswith(".so"), f"{name} runs from {origin}, not from its compiled extension"
    assert runs_compiled()  # so the worker does not warn that it runs as pure Python


def test_every_compiled_path_is_a_module_of_the_tree() -> None:
    for name in compiled_modules():
        assert (ROOT / (name.replace(".", "/") + ".py")).is_file(), name


def test_an_extension_older_than_its_source_or_without_one_is_stale(tmp_path: Path) -> None:
    package = tmp_path / "adapters"
    package.mkdir()
    (tmp_path / "pipeline").mkdir()
    fresh, edited = package / "fresh.py", package / "edited.py"
    for source in (fresh, edited):
        source.write_text("x = 1\n")
    extension = {p: package / f"{p.stem}.cpython-311-x86_64-linux-gnu.so" for p in (fresh, edited)}
    for path in extension.values():
        path.write_bytes(b"\x7fELF")
    (package / "removed.cpython-311-x86_64-linux-gnu.so").write_bytes(b"\x7fELF")
    os.utime(fresh, (1_000, 1_000))
    os.utime(extension[fresh], (2_000, 2_000))
    os.utime(extension[edited], (1_000, 1_000))
    os.utime(edited, (2_000, 2_000))

    assert sorted(p.name for p in stale_extensions(tmp_path)) == ["edited.py", "removed.py"]
