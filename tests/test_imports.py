"""Code structure: no import cycle anywhere in the library, components or pipelines (lazy
imports inside functions included), and only psamf.pipeline reaches into pipelines/."""
from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _graph() -> dict[str, set[str]]:
    files = {".".join(p.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__"): p
             for d in ("psamf", "components", "pipelines") for p in (REPO / d).rglob("*.py")}

    def owner(name: str) -> str | None:  # the module a dotted import lands in
        while name and name not in files:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = defaultdict(set)
    for mod, path in files.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [owner(a.name) for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                targets = [owner(f"{node.module}.{a.name}") or owner(node.module) for a in node.names]
            else:
                continue
            graph[mod] |= {t for t in targets if t and t != mod}
    return {m: graph[m] for m in files}


def test_no_import_cycle_even_through_lazy_imports():
    graph = _graph()
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done

    def visit(m: str, path: list[str]) -> None:  # path: the import chain that reached m, m last
        state[m] = 1
        for d in sorted(graph[m]):
            assert state.get(d) != 1, "import cycle: " + " -> ".join(path[path.index(d):] + [d])
            if d not in state:
                visit(d, path + [d])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])


def test_only_psamf_pipeline_imports_the_pipelines_and_only_pipelines_import_components():
    graph = _graph()
    assert {m for m, deps in graph.items() if any(d.startswith("pipelines") for d in deps)} == {"psamf.pipeline"}
    assert {m for m, deps in graph.items() if any(d.startswith("components") for d in deps)} <= {"pipelines.training"}
    assert "psamf.pipeline" in graph["psamf.cli_pipeline"] or "psamf.pipeline" in graph["psamf.cli"]
