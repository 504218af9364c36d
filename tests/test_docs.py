"""The repository is its own reference: every document the code and docs cite is in docs/, every `§`
section cited exists in docs/sources.md, and the README stays a ten-minute read.

Cheap text checks over the tracked files (git ls-files) and docs/; no broker."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

from pipeline.config import ENV_OVERRIDES
from pipeline.reasons import CATALOGUE, REWARD_CATALOGUE

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
README_MAX_LINES = 300

# A document name the project once cited from outside the repository, with what comes before it.
CITED_DOC = re.compile(r"(?P<before>[\w./-]*?)(?P<name>sources|style|pitfalls|architecture)\.md")
SECTION = re.compile(r"§ ?(\d+(?:\.\d+)*)")


def text_files() -> dict[str, str]:
    """Tracked and new (not ignored) text files, by path relative to the root."""
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    out = {}
    for name in listed:
        path = ROOT / name
        if not path.is_file() or path.suffix in {".so", ".png", ".jar", ".pyc"}:
            continue
        try:
            out[name] = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue
    return out


def sources_sections() -> set[str]:
    """The section numbers of docs/sources.md: its numbered headings and the decisions of §6 (6.N)."""
    text = (DOCS / "sources.md").read_text(encoding="utf-8")
    found = set(re.findall(r"^#{2,3} (\d+(?:\.\d+)*)\.? ", text, re.M))
    decisions = text.split("## 6.", 1)[1]
    found |= {f"6.{n}" for n in re.findall(r"^(\d+)\. ", decisions, re.M)}
    return found


def test_cited_documents_are_the_ones_in_docs() -> None:
    """sources.md, architecture.md and pitfalls.md are cited as docs/… (or relatively from docs/);
    style.md, a file outside the repository, is not cited at all."""
    wrong = []
    for name, text in text_files().items():
        if name == "tests/test_docs.py":
            continue
        for match in CITED_DOC.finditer(text):
            before, doc = match["before"], match["name"]
            inside_docs = name.startswith("docs/") and before in ("", "./")
            if doc == "style" or not (before.endswith("docs/") or inside_docs):
                line = text.count("\n", 0, match.start()) + 1
                wrong.append(f"{name}:{line}: {match.group(0)}")
        if "shared/spec" in text:
            wrong.append(f"{name}: cites shared/spec")
    assert not wrong, "citations of files the repository lacks:\n" + "\n".join(wrong)


def test_every_cited_section_exists_in_docs_sources() -> None:
    """A `§N.M` anywhere (code, tests, vectors, docs) names a section of docs/sources.md."""
    sections = sources_sections()
    assert {"1", "1.1", "2", "3.5", "3.6", "4.2", "5", "6.17"} <= sections
    missing = []
    for name, text in text_files().items():
        for match in SECTION.finditer(text):
            if match[1] not in sections:
                line = text.count("\n", 0, match.start()) + 1
                missing.append(f"{name}:{line}: §{match[1]}")
    assert not missing, "sections docs/sources.md does not have:\n" + "\n".join(missing)


def test_relative_links_in_docs_and_the_readme_resolve() -> None:
    """Every [text](path) link to a file of the repository points at a file that exists."""
    broken = []
    for name, text in text_files().items():
        if not name.endswith(".md"):
            continue
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text):
            if "://" in target or target.startswith("mailto:"):
                continue
            if not (ROOT / name).parent.joinpath(target).exists():
                broken.append(f"{name}: {target}")
    assert not broken, "links to files that do not exist:\n" + "\n".join(broken)


def test_the_readme_is_a_ten_minute_read() -> None:
    """What it is, the quick start, the first five minutes and where to go next; the reference is in docs/."""
    lines = (ROOT / "README.md").read_text(encoding="utf-8").count("\n")
    assert lines <= README_MAX_LINES, f"README.md has {lines} lines; move reference material to docs/"


def test_docs_reasons_lists_every_code_with_its_stage() -> None:
    """Operators read the reason codes in docs/reasons.md; it lists both catalogues whole."""
    text = (DOCS / "reasons.md").read_text(encoding="utf-8")
    for reason in [*CATALOGUE.values(), *REWARD_CATALOGUE.values()]:
        assert f"| `{reason.code}` | {reason.stage} |" in text, reason.code


def test_docs_configuration_lists_every_environment_override() -> None:
    """Each environment variable the settings read is named in docs/configuration.md with its setting."""
    text = (DOCS / "configuration.md").read_text(encoding="utf-8")
    for variable, setting in ENV_OVERRIDES.items():
        assert f"| `{variable}` | `{setting}` |" in text, variable


def test_code_names_no_issue_or_stop_numbers() -> None:
    """Code, docstrings and comments say what a thing does, not which issue or stop asked for it."""
    history = re.compile(r"\b(?:issues? \d+|stops? \d+|stop-\d+)\b", re.I)
    found = [
        f"{name}:{text.count(chr(10), 0, match.start()) + 1}: {match.group(0)}"
        for name, text in text_files().items()
        if name.endswith(".py") or name in ("dev", "Dockerfile", "docker-compose.yml")
        for match in history.finditer(text)
    ]
    assert not found, "issue or stop numbers in code:\n" + "\n".join(found)
