"""Every heavy test carries its marker, so `pytest -m "not slow"` stays a fast loop (see tests/README.md).

An AST scan of the test modules: a test that starts or joins a Ray cluster must be marked `netns` (conftest
runs those in a private network namespace, where 127.0.0.1 is the only address); one that spawns a process
or loads the real SmolLM2 must be marked `slow` (`integration` and `netns` imply `slow`). What a test uses
counts through its fixtures and the helpers it calls, in its own module, conftest.py and helpers.py.
"""

from __future__ import annotations

import ast
import re
import socket
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
SLOW = {"slow", "integration", "netns"}  # conftest adds `slow` to every `integration` and `netns` test

# Tests that spawn a process and still belong to the fast loop: `python -c` import checks well under a second.
QUICK_SUBPROCESS = {
    "test_allocation.py::test_allocation_does_not_import_torch": "python -c 'import mola_search.allocation'",
}

RAY, PROCESS, MODEL = "starts or joins a Ray cluster", "spawns a process", "loads the real SmolLM2"
# The repository's scripts and benchmarks that run Ray: a test that names one (to run it) runs Ray.
_RAY_IN_TEXT = re.compile(r"--executor[ =]+[\"']?ray\b|\bray start\b|\bray\.init\(|executor\s*=\s*[\"']ray[\"']")
RAY_SCRIPTS = {path.name for folder in ("scripts", "benchmarks") for path in (TESTS.parent / folder).glob("*")
               if path.is_file() and _RAY_IN_TEXT.search(path.read_text(errors="replace"))}
_SPAWN = {("os", "system"), ("os", "popen"), ("os", "fork"), ("os", "posix_spawn"), ("os", "posix_spawnp")}


def _direct(node: ast.AST) -> set[str]:
    """What a function body or module-level value does by itself."""
    found = set()
    for n in ast.walk(node):
        if isinstance(n, ast.Import) and any(a.name.split(".")[0] == "ray" for a in n.names):
            found.add(RAY)
        elif isinstance(n, ast.ImportFrom) and (n.module or "").split(".")[0] == "ray":
            found.add(RAY)
        elif isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name):
            if n.value.id == "ray" and n.attr == "init":
                found.add(RAY)
            if n.value.id in ("subprocess", "multiprocessing", "pexpect") or (n.value.id, n.attr) in _SPAWN \
                    or (n.value.id == "os" and n.attr.startswith(("exec", "spawn"))):
                found.add(PROCESS)
        elif isinstance(n, ast.keyword) and n.arg == "executor" and _const(n.value) == "ray":
            found.add(RAY)
        elif isinstance(n, (ast.List, ast.Tuple)):
            items = n.elts
            for a, b in zip(items, items[1:]):
                if _const(a) == "--executor" and _const(b) == "ray":
                    found.add(RAY)  # mola-search --executor ray
                if _const(b) == "start" and ((_const(a) or "").endswith("ray")
                                             or isinstance(a, ast.Name) and a.id.upper() == "RAY"):
                    found.add(RAY)  # [RAY, "start", ...]: the ray CLI
        elif isinstance(n, ast.Call) and getattr(n.func, "id", getattr(n.func, "attr", None)) == "load_base_model":
            if not n.args or isinstance(n.args[0], ast.Constant) and n.args[0].value is None:
                found.add(MODEL)  # load_base_model(None): the embedded SmolLM2
        elif isinstance(n, ast.arg) and n.arg == "smollm2":
            found.add(MODEL)
        elif isinstance(n, ast.Constant) and isinstance(n.value, str) and ("ray start" in n.value
                                                                         or n.value in RAY_SCRIPTS):
            found.add(RAY)  # a shell line with `ray start`, or the name of a script that runs Ray
    return found


def _const(node: ast.AST) -> str | None:
    return node.value if isinstance(node, ast.Constant) and isinstance(node.value, str) else None


def _uses(node: ast.AST) -> set[str]:
    """Names a definition refers to: globals and helpers it reads or calls, fixtures it asks for."""
    names = {n.id for n in ast.walk(node) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)}
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
        names -= {n.id for n in ast.walk(node) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store)}
        names |= {a.arg for a in node.args.args + node.args.kwonlyargs}
        names |= {_const(arg) for d in node.decorator_list for call in ast.walk(d)
                  if isinstance(call, ast.Call) and getattr(call.func, "attr", "") == "usefixtures"
                  for arg in call.args} - {None}
    return names


def _definitions(tree: ast.Module) -> dict[str, ast.AST]:
    defs: dict[str, ast.AST] = {}
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            defs[node.name] = node
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            for target in (node.targets if isinstance(node, ast.Assign) else [node.target]):
                if isinstance(target, ast.Name):
                    defs[target.id] = node
    return defs


def heavy_uses(modules: dict[str, str]) -> dict[str, dict[str, set[str]]]:
    """{module: {definition: what it does}}, through the definitions it uses; `conftest` and `helpers`
    are shared by every module, as pytest's fixtures and the test modules' imports make them."""
    info = {name: {k: (_direct(v), _uses(v)) for k, v in _definitions(ast.parse(text)).items()}
            for name, text in modules.items()}
    shared = {k: v for name in ("conftest", "helpers") for k, v in info.get(name, {}).items()}
    result = {}
    for name in modules:
        scope = shared | info[name]
        doing = {k: set(direct) for k, (direct, _) in scope.items()}
        uses = {k: used & (scope.keys() - {k}) for k, (_, used) in scope.items()}
        changed = True
        while changed:  # until nothing new flows along `uses`
            changed = False
            for k in scope:
                more = set().union(*(doing[u] for u in uses[k])) - doing[k]
                if more:
                    doing[k] |= more
                    changed = True
        result[name] = doing
    return result


def _marks(node: ast.AST | None, aliases: dict[str, ast.AST]) -> set[str]:
    """Mark names in an expression (`pytest.mark.x`, a list of them, a module-level alias of one)."""
    if node is None:
        return set()
    found = set()
    for n in ast.walk(node):
        if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Attribute) and n.value.attr == "mark":
            found.add(n.attr)
        elif isinstance(n, ast.Name) and n.id in aliases and n.id != "pytestmark":
            found |= _marks(getattr(aliases[n.id], "value", None), {})
    return found


def unmarked(modules: dict[str, str]) -> list[str]:
    """`module::test: what it does, and the mark it lacks` for every heavy test without its mark."""
    doing = heavy_uses(modules)
    offenders = []
    for name, text in modules.items():
        if not name.startswith("test_"):
            continue
        tree = ast.parse(text)
        defs = _definitions(tree)
        module_marks = _marks(getattr(defs.get("pytestmark"), "value", None), defs)
        tests: list[tuple[ast.AST, set[str]]] = []
        for node in tree.body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name.startswith("test"):
                tests.append((node, set()))
            elif isinstance(node, ast.ClassDef) and node.name.startswith("Test"):
                class_marks = set().union(*(_marks(d, defs) for d in node.decorator_list))
                for sub in node.body:
                    if isinstance(sub, ast.Assign) and any(getattr(t, "id", "") == "pytestmark" for t in sub.targets):
                        class_marks |= _marks(sub.value, defs)
                tests += [(sub, class_marks) for sub in node.body
                          if isinstance(sub, (ast.FunctionDef, ast.AsyncFunctionDef)) and sub.name.startswith("test")]
        for node, class_marks in tests:
            marks = module_marks | class_marks | set().union(*(_marks(d, defs) for d in node.decorator_list))
            does = doing[name][node.name] if node in tree.body else \
                _direct(node).union(*(doing[name][u] for u in _uses(node) & (doing[name].keys() - {node.name})))
            test_id = f"{name}.py::{node.name}"
            if RAY in does and "netns" not in marks:
                offenders.append(f"{test_id}: {RAY} but is not marked netns")
            if PROCESS in does and not marks & SLOW and test_id not in QUICK_SUBPROCESS:
                offenders.append(f"{test_id}: {PROCESS} but is not marked slow")
            if MODEL in does and not marks & SLOW:
                offenders.append(f"{test_id}: {MODEL} but is not marked slow (or integration)")
    return sorted(offenders)


def _suite() -> dict[str, str]:
    """Every module of tests/ but this one, whose strings are examples for the scan."""
    return {path.stem: path.read_text() for path in sorted(TESTS.glob("*.py")) if path.name != Path(__file__).name}


def test_every_heavy_test_carries_its_marker() -> None:
    assert unmarked(_suite()) == []


def test_the_scan_finds_what_a_test_does_through_fixtures_and_helpers(monkeypatch) -> None:
    monkeypatch.setattr(sys.modules[__name__], "RAY_SCRIPTS", {"runs_ray.sh"})
    helpers = ("import subprocess\nimport sys\n"
               "def run_cli(argv):\n    return subprocess.run([sys.executable, *argv])\n")
    conftest = ("import pytest\n@pytest.fixture(scope='session')\ndef smollm2():\n"
                "    from mola_search.models import load_base_model\n    return load_base_model(None)\n"
                "@pytest.fixture\ndef tokenizer(smollm2):\n    return smollm2[1]\n")
    module = (
        "import pytest\nfrom helpers import run_cli\n"
        "BASE = ['--task', 'mrpc', '--executor', 'ray']\n"
        "slow = pytest.mark.slow\n"
        "@pytest.fixture(scope='module')\ndef cluster():\n    from ray.cluster_utils import Cluster\n"
        "    yield Cluster()\n"
        "def test_cli():\n    run_cli(['x'])\n"
        "@slow\ndef test_cli_marked():\n    run_cli(['x'])\n"
        "def test_on_ray(cluster):\n    pass\n"
        "@pytest.mark.netns\ndef test_on_ray_marked(cluster):\n    pass\n"
        "def test_base():\n    print(BASE)\n"
        "def test_tokenizer(tokenizer):\n    pass\n"
        "@pytest.mark.integration\ndef test_tokenizer_marked(tokenizer):\n    pass\n"
        "def test_ray_start():\n    argv = [RAY, 'start', '--head']\n"
        "def test_script():\n    subprocess.run(['bash', ROOT / 'scripts' / 'runs_ray.sh'])\n"
        "def test_plain(tmp_path):\n    assert tmp_path\n")
    assert unmarked({"conftest": conftest, "helpers": helpers, "test_x": module}) == [
        f"test_x.py::test_base: {RAY} but is not marked netns",
        f"test_x.py::test_cli: {PROCESS} but is not marked slow",
        f"test_x.py::test_on_ray: {RAY} but is not marked netns",
        f"test_x.py::test_ray_start: {RAY} but is not marked netns",
        f"test_x.py::test_script: {PROCESS} but is not marked slow",
        f"test_x.py::test_script: {RAY} but is not marked netns",
        f"test_x.py::test_tokenizer: {MODEL} but is not marked slow (or integration)",
    ]
    marked = "import pytest\npytestmark = [pytest.mark.slow, pytest.mark.netns]\n" + module.split("\n", 2)[2]
    assert unmarked({"conftest": conftest, "helpers": "", "test_y": marked}) == []


def test_a_ray_node_started_outside_a_private_network_namespace_is_refused() -> None:
    """conftest refuses, while a test runs, the process start of a Ray node (what Python's audit hook sees)."""
    if [name for _, name in socket.if_nameindex()] == ["lo"]:
        pytest.skip("inside a private network namespace Ray can only bind 127.0.0.1: nothing to refuse")
    for argv in (["/venv/lib/ray/core/src/ray/gcs/gcs_server", "--gcs_server_port=0"],
                 ["/venv/bin/ray", "start", "--head", "--port", "6379"],
                 ["unshare", "-m", "sh", "-c", "mount -t tmpfs none /x && exec ray start --address 127.0.0.1:1"]):
        with pytest.raises(RuntimeError, match="starts a Ray node outside a private network namespace"):
            sys.audit("subprocess.Popen", argv[0], argv, None, None)
    sys.audit("subprocess.Popen", sys.executable, [sys.executable, "-c", "print('ray')"], None, None)  # let through


@pytest.mark.integration
def test_integration_implies_slow(request) -> None:
    assert request.node.get_closest_marker("slow") is not None


@pytest.mark.netns
def test_netns_tests_run_where_loopback_is_the_only_interface(request) -> None:
    """Run by conftest in a private network namespace (`unshare -n`): no address but 127.0.0.1, no route out."""
    assert request.node.get_closest_marker("slow") is not None  # netns implies slow
    assert [name for _, name in socket.if_nameindex()] == ["lo"]
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        with pytest.raises(OSError):  # "Network is unreachable": nothing but loopback can be reached
            s.connect(("192.0.2.1", 9))
        s.connect(("127.0.0.1", 9))
        assert s.getsockname()[0] == "127.0.0.1"
