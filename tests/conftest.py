"""The test suite's fixtures live in tests/rigs/ (style.md §2.9): rigs.fixtures holds the session broker,
per-test settings with unique topic names, and receivers and workers on loopback."""

pytest_plugins = ["rigs.fixtures"]
