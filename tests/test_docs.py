"""The docs site (mkdocs.yml, docs/): every public name has an API entry, and the site builds strictly.

The API pages (docs/api/*.md) render each public name from the module that defines it
(`::: mola_search.mola.model.MoLAModel`), because the front door's lazy `__getattr__` re-exports
cannot be followed statically. Which module that is, is asked of the code at test time, so when a
name moves or a new one joins an `__all__`, the first test below says which `:::` line to add or
change. The last test builds the whole site with `mkdocs build --strict` into a temporary folder:
a broken internal link or anchor, a snippet that is gone or an entry that no longer resolves fails it.
External links are not checked (the build has no network).
"""

from __future__ import annotations

import ast
import importlib
import inspect
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
API = REPO / "docs" / "api"

# The packages whose `__all__` the API pages cover: the front door first.
DOCUMENTED = ("mola_search", "mola_search.allocation", "mola_search.mola", "mola_search.trial",
              "mola_search.search", "mola_search.stats", "mola_search.analysis")

# Names an `__all__` lists that the package cannot import (a code bug, reported to the code's owners). The
# test fails as soon as one of them imports again, so it is documented then and leaves this list.
KNOWN_BROKEN: dict[str, set[str]] = {}

ENTRY = re.compile(r"^:::\s+([\w.]+)\s*$", re.M)


def api_entries() -> dict[str, list[str]]:
    """`:::` identifier -> the API pages that hold it."""
    found: dict[str, list[str]] = {}
    for page in sorted(API.glob("*.md")):
        for ident in ENTRY.findall(page.read_text()):
            found.setdefault(ident, []).append(page.relative_to(REPO).as_posix())
    return found


def _assigned_at_top_level(path: Path, name: str) -> bool:
    for node in ast.parse(path.read_text()).body:
        targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(
            node, ast.AnnAssign) else []
        names = {t.id for t in targets if isinstance(t, ast.Name)}
        names |= {e.id for t in targets if isinstance(t, ast.Tuple) for e in t.elts if isinstance(e, ast.Name)}
        if name in names:
            return True
    return False


def defining_path(package: str, name: str) -> str:
    """Where `package.name` is defined: `module.qualname` for a class or function, else the one module of
    the package's tree that assigns it at top level (a constant has no `__module__`)."""
    obj = getattr(importlib.import_module(package), name)
    if inspect.isclass(obj) or inspect.isroutine(obj):
        return f"{obj.__module__}.{obj.__qualname__}"
    root = Path(importlib.import_module(package).__file__).parent
    owners = []
    for path in sorted(root.rglob("*.py")):
        if path.name != "__init__.py" and _assigned_at_top_level(path, name):
            parts = path.relative_to(REPO).with_suffix("").parts
            owners.append(".".join(parts))
    assert len(owners) == 1, f"{package}.{name}: expected one module to define it, found {owners or 'none'}"
    return f"{owners[0]}.{name}"


def public_names() -> list[tuple[str, str]]:
    return [(package, name) for package in DOCUMENTED for name in importlib.import_module(package).__all__]


def resolves(ident: str) -> bool:
    """Does `a.b.c.Name` name an object (the longest importable module prefix, then attributes)?"""
    parts = ident.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        try:
            for attr in parts[cut:]:
                obj = getattr(obj, attr)
        except AttributeError:
            return False
        return True
    return False


def test_every_public_name_has_one_api_entry_from_its_defining_module() -> None:
    entries = api_entries()
    problems, expected = [], set()
    for package, name in public_names():
        if name in KNOWN_BROKEN.get(package, ()):
            if resolves(f"{package}.{name}"):
                problems.append(f"{package}.{name} imports again: remove it from KNOWN_BROKEN in "
                                f"tests/test_docs.py and document it")
            continue
        path = defining_path(package, name)
        expected.add(path)
        if path not in entries:
            problems.append(f"{package}.{name} has no API entry: add `::: {path}` to a page in docs/api/")
    for ident, pages in entries.items():
        if len(pages) > 1:
            problems.append(f"`::: {ident}` is rendered more than once ({', '.join(pages)}): keep one")
        if ident not in expected:
            hint = "it no longer imports (moved? renamed?)" if not resolves(ident) else \
                "it is in no documented `__all__` (dropped from the public API?)"
            problems.append(f"`::: {ident}` in {pages[0]}: {hint}; point it at the name's defining module "
                            f"or remove it")
    assert not problems, "\n".join(problems)


def test_known_broken_names_are_still_listed_in_their_all() -> None:
    for package, names in KNOWN_BROKEN.items():
        stale = names - set(importlib.import_module(package).__all__)
        assert not stale, f"{sorted(stale)} left {package}.__all__: remove them from KNOWN_BROKEN"


def test_readme_stays_a_first_visit() -> None:
    lines = len((REPO / "README.md").read_text().splitlines())
    assert lines <= 150, (f"README.md has {lines} lines (at most 150): it holds what a first visit needs; "
                          f"measurements and explanations go into a page under docs/")


README_LINK = re.compile(r"\]\((docs/[^)#\s]+\.md)(?:#([^)\s]+))?\)")


@pytest.mark.slow
def test_the_site_builds_strictly_and_readme_links_land(tmp_path: Path) -> None:
    site = tmp_path / "site"
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}  # Material's banner about MkDocs 2.0 is not a warning
    # Not --quiet: it hides warnings from the counter that --strict aborts on, and a broken link would pass.
    proc = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(REPO / "mkdocs.yml"),
                           "-d", str(site)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (f"`mkdocs build --strict` failed; the broken link, anchor or API entry is named "
                                  f"below (the docs tools come with `pip install -e '.[test]'`):\n"
                                  f"{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    assert "MoLAModel" in (site / "api" / "index.html").read_text()  # mkdocstrings rendered the front door
    # README is GitHub's page, outside the site: its links into docs/ must land on a page and a heading there.
    for page, anchor in README_LINK.findall((REPO / "README.md").read_text()):
        assert (REPO / page).is_file(), f"README links to {page}, which does not exist"
        html = site / Path(page).relative_to("docs").with_suffix("") / "index.html"
        if Path(page).name == "index.md":
            html = site / Path(page).relative_to("docs").with_name("index.html")
        if anchor:
            assert f'id="{anchor}"' in html.read_text(), f"README links to {page}#{anchor}: no such heading"
