"""Fail when modules of one package import each other in a cycle (function-level imports included).

import-linter's layers contract (pyproject.toml) keeps the packages in one direction; this keeps the
modules inside each package in one direction too, so every module can be read after the ones it uses.
"""

from __future__ import annotations

import sys

import grimp

PACKAGES = ("pose", "lut_service", "search", "effpose")


def cycles(graph: grimp.ImportGraph, package: str) -> list[list[str]]:
    """Every module cycle found inside ``package`` (each reported once, from its first module)."""
    modules = sorted(m for m in graph.modules if m == package or m.startswith(package + "."))
    found, done = [], set()

    def visit(module: str, path: list[str]) -> None:
        for target in sorted(graph.find_modules_directly_imported_by(module)):
            if not target.startswith(package):
                continue
            if target in path:
                found.append(path[path.index(target) :] + [target])
            elif target not in done:
                visit(target, path + [target])
        done.add(module)

    for module in modules:
        if module not in done:
            visit(module, [module])
    return found


def main() -> int:
    graph = grimp.build_graph(*PACKAGES)
    problems = [cycle for package in PACKAGES for cycle in cycles(graph, package)]
    for cycle in problems:
        print("import cycle: " + " -> ".join(cycle), file=sys.stderr)
    if not problems:
        print(f"no import cycles inside {', '.join(PACKAGES)}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
