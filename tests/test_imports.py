"""Code structure: no import cycle anywhere in the library, components or pipelines (lazy
imports inside functions included), only psamf.cli.kfp reaches into pipelines/, and neither
method's folder (psamf.mult, psamf.psa_mf) imports the other's."""
from __future__ import annotations

import ast
import re
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


def test_only_psamf_cli_kfp_imports_the_pipelines_and_only_pipelines_import_components():
    graph = _graph()
    assert {m for m, deps in graph.items() if any(d.startswith("pipelines") for d in deps)} == {"psamf.cli.kfp"}
    assert {m for m, deps in graph.items() if any(d.startswith("components") for d in deps)} <= {"pipelines.training"}
    assert "psamf.cli.kfp" in graph["psamf.cli.pipeline"] or "psamf.cli.kfp" in graph["psamf.cli.main"]


def test_a_method_never_imports_the_other_method():
    graph = _graph()
    methods = ("psamf.mult", "psamf.psa_mf")
    for a in methods:
        for b in methods:
            if a != b:
                crossing = {f"{m} -> {d}" for m, deps in graph.items() if m.startswith(a)
                            for d in deps if d == b or d.startswith(b + ".")}
                assert not crossing, f"{a} imports {b}: {sorted(crossing)}"
    # the rule is about real folders: both must exist, or it would pass vacuously
    assert all(any(m.startswith(x + ".") for m in graph) for x in methods)


def test_the_readme_layout_table_names_paths_that_exist():
    import re

    readme = (REPO / "README.md").read_text()
    table = readme[readme.index("## How it is laid out"):readme.index("## Configuration")]
    rows = [line for line in table.splitlines() if line.startswith("| `")]
    named = []
    for row in rows:
        first, _, rest = row[2:].partition("|")
        for path in re.findall(r"`([^`*]+)`", first):
            named.append(path)
        folder = re.findall(r"`([^`*]+/)`", first) or re.findall(r"`([^`]+/)\*[^`]*`", first)
        # the files a folder's row names (`train.py`, `tune/`) live in that folder
        for name in re.findall(r"`([\w.]+(?:\.py|/))`", rest):
            named.append(folder[0] + name if folder else name)
    missing = [p for p in named if not (REPO / p).exists()]
    assert named and not missing, f"README layout table names paths that do not exist: {missing}"
    # and every folder of the library has a row
    folders = {p.name for p in (REPO / "psamf").iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    assert folders <= {Path(p).name for p in named if p.startswith("psamf/") and p.endswith("/")}


def _declared() -> tuple[set[str], dict[str, list[str]]]:
    import tomllib

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    name = lambda req: re.split(r"[\[<>=!~; ]", req, maxsplit=1)[0].lower().replace("_", "-")  # noqa: E731
    return {name(r) for r in project["dependencies"]}, {
        k: [name(r) for r in v] for k, v in project["optional-dependencies"].items()}


def test_every_third_party_import_is_a_declared_dependency():
    """What psamf imports, pyproject.toml declares (botocore was imported and undeclared), and what
    it pins in constraints.txt is used (optuna-integration was pinned and never imported)."""
    import sys
    from importlib.metadata import packages_distributions

    declared, extras = _declared()
    dists = packages_distributions()
    missing = {}
    for d in ("psamf", "components", "pipelines"):
        for path in (REPO / d).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                         [node.module] if isinstance(node, ast.ImportFrom) and node.module and not node.level else [])
                for top in {n.split(".")[0] for n in names}:
                    if top in sys.stdlib_module_names or top in ("psamf", "components", "pipelines"):
                        continue
                    owners = {o.lower().replace("_", "-") for o in dists.get(top, [top])}
                    if not owners & (declared | set(extras["server"]) | {"dvc-s3"}):
                        missing.setdefault(top, set()).add(str(path.relative_to(REPO)))
    assert not missing, f"imported but not declared in pyproject.toml: {missing}"
    # psutil is MLflow's system metrics' (psamf asks MLflow for them), nvidia-ml-py its GPU ones
    assert "psutil" in declared and "nvidia-ml-py" in extras["gpu"]
    assert not re.search(r"^optuna-integration==", (REPO / "constraints.txt").read_text(), re.M)


def test_the_cuda_image_installs_the_gpu_extra():
    """MLflow logs GPU system metrics only with nvidia-ml-py; the CPU image has no GPU to read."""
    cuda = (REPO / "infra" / "Dockerfile.cuda").read_text()
    assert "['optional-dependencies']['gpu']" in cuda
    assert "['gpu']" not in (REPO / "infra" / "Dockerfile").read_text()


def test_the_loo_report_task_imports_no_torch():
    """The loo-report task only reads the per-user JSON reports: importing its module must not pull
    in torch (about 2 s of every such task's start, outside any stage's compute)."""
    import subprocess
    import sys

    code = "import sys, psamf.mult.loo, psamf.stages; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"
