"""The package layout follows the data flow, and no module imports its way back up it.

Every `import mola_search...` counts, including the lazy ones inside functions: a lazy import
hides a cycle from Python, not from a reader.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "mola_search"

# Lower layers never import higher ones: allocation -> mola -> train -> trial -> search -> analysis -> cli.
# `adapter` (the contract MoLA and the baselines share) sits below `mola` so MoLAModel can subclass it.
LAYERS = [
    {"_io", "_checks", "errors", "hub"},
    {"allocation", "stats"},
    {"adapter", "models", "tasks"},
    {"mola"},
    {"methods", "train"},
    {"official", "trial"},
    {"search"},
    {"analysis", "bench"},
    {"cli", "(root)"},
]


def _modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def _graph() -> dict[str, set[str]]:
    modules = _modules()

    def owner(name: str) -> str:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name

    graph: dict[str, set[str]] = {m: set() for m in modules}
    for module, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text())):
            targets = []
            if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("mola_search"):
                targets = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules else node.module
                           for a in node.names]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names if a.name.startswith("mola_search")]
            graph[module] |= {owner(t) for t in targets} - {module, ""}
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def _layer(module: str) -> int:
    parts = module.split(".")
    top = parts[1] if len(parts) > 1 else "(root)"
    return next(i for i, names in enumerate(LAYERS) if top in names)


def test_the_cycle_finder_finds_a_cycle() -> None:
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_cycles() -> None:
    assert _cycles(_graph()) == []


def test_no_module_imports_a_higher_layer() -> None:
    graph = _graph()
    assert all(_layer(m) is not None for m in graph)
    upward = sorted(f"{a} -> {b}" for a, targets in graph.items() for b in targets if _layer(b) > _layer(a))
    assert upward == []


def test_library_errors_speak_in_parameters_not_flags() -> None:
    """Outside cli/, a UserError names `parameters`; the console scripts turn them into flags (errors.py)."""
    import re

    offenders = []
    for module, path in _modules().items():
        if module.startswith("mola_search.cli"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "UserError" and node.args:
                text = "".join(part.value for part in ast.walk(node.args[0])
                               if isinstance(part, ast.Constant) and isinstance(part.value, str))
                if re.search(r"(?<![\w-])--[a-z]", re.sub(r"`[^`]*`", "", text)):
                    offenders.append(f"{module}:{node.lineno}")
    assert offenders == []


# Inside search/, rooms follow the same rule: a room imports only rooms listed before it.
SEARCH_ROOMS = [
    {"samplers", "progress", "space", "seeds"},
    {"config", "pruning", "study"},
    {"executors"},
    {"context"},
    {"pilot", "strategies", "final"},
    {"outputs"},
    {"runner", "(search)"},
]


def _room(module: str) -> int | None:
    parts = module.split(".")
    if parts[:2] != ["mola_search", "search"]:
        return None
    top = parts[2] if len(parts) > 2 else "(search)"
    return next(i for i, names in enumerate(SEARCH_ROOMS) if top in names)


def test_search_rooms_import_only_rooms_below_them() -> None:
    graph = _graph()
    upward = sorted(f"{a} -> {b}" for a, targets in graph.items() for b in targets
                    if _room(a) is not None and _room(b) is not None and _room(b) > _room(a))
    assert upward == []


# The study folder's files: named only by mola_search.search.study.folder (the one owner of the folder). A path
# is built from the bare name, so a string constant equal to a name is the mark of a path made elsewhere; prose
# that mentions a file (a help text, a message) is not.
STUDY_FILES = ("study.json", "study.db", "noise.json", "trials.csv", "finalists.csv", "best_allocation.json",
               "oneshot.json", "oneshot.csv", "racing.json")
OWNER = PACKAGE / "search" / "study" / "folder.py"


def _literals(path: Path) -> list[tuple[int, str]]:
    """String constants in code (docstrings, which may name files to explain them, are left out)."""
    tree = ast.parse(path.read_text())
    docs = {id(node.body[0].value) for node in ast.walk(tree)
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body
            and isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant)}
    return [(node.lineno, node.value) for node in ast.walk(tree)
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docs]


def test_the_study_folder_files_are_named_by_one_module() -> None:
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        if path == OWNER:
            continue
        in_search = path.is_relative_to(PACKAGE / "search") or path == PACKAGE / "cli" / "search.py"
        names = set(STUDY_FILES) | ({"summary.md", "metrics.json"} if in_search else set())  # summary, run metrics
        offenders += [f"{path.relative_to(PACKAGE)}:{line} {text!r}" for line, text in _literals(path)
                      if text.strip() in names]
    assert offenders == []


def test_the_file_name_check_finds_the_owners_literals() -> None:
    assert {text for _, text in _literals(OWNER)} >= set(STUDY_FILES) - {"racing.json"}
