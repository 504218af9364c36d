"""Test rigs: fixtures (rigs.fixtures, loaded by conftest's pytest_plugins) and the helpers tests share."""
