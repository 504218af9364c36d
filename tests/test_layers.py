"""No import cycles anywhere in pipeline/ and adapters/, function-level imports included.

The layer contracts themselves are import-linter's ([tool.importlinter] in pyproject.toml, run by ./dev test).
"""

from __future__ import annotations

import grimp


def test_no_module_imports_itself_back() -> None:
    """For every import a -> b, there is no chain of imports from b back to a."""
    graph = grimp.build_graph("pipeline", "adapters")
    cycles = []
    for module in sorted(graph.modules):
        for imported in sorted(graph.find_modules_directly_imported_by(module)):
            if imported.startswith(module + ".") or module.startswith(imported + "."):
                continue  # a package and its own modules
            chain = graph.find_shortest_chain(importer=imported, imported=module)
            if chain:
                cycles.append((module, *chain))
    assert cycles == []
