"""What every console script shares: one-line errors with exit status 2, config files as data."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mola_search.errors import UserError


class OneLineParser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line (`prog: error: ...; see --help`, exit 2), not a usage dump.

    argparse calls `error` for unknown flags, bad types and bad choices; raising a UserError lets
    `run_main` print it like every other bad input.
    """

    def error(self, message: str):  # type: ignore[override]
        raise UserError(f"{message} (see {self.prog} --help)")


def run_main(prog: str, main: Callable[[list[str] | None], int | None], argv: list[str] | None = None) -> int:
    """Call `main`; a UserError becomes `prog: error: <message>` on stderr and exit code 2."""
    try:
        return int(main(argv) or 0)
    except UserError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return UserError.exit_code
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130


def load_config_file(path: str | Path) -> dict[str, Any]:
    """A YAML or JSON mapping; malformed files are user errors, not tracebacks."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise UserError(f"config file {path} does not exist")
    try:
        raw = json.loads(path.read_text()) if path.suffix == ".json" else yaml.safe_load(path.read_text())
    except (json.JSONDecodeError, yaml.YAMLError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise UserError(f"{path} is not valid {'JSON' if path.suffix == '.json' else 'YAML'}: {first}") from None
    if not isinstance(raw, dict):
        raise UserError(f"{path} must hold a mapping of keys to values, got {type(raw).__name__}")
    return raw


