"""What every console script shares: one-line errors with exit status 2, config files as data."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mola_search.errors import UserError, with_flags

_PARSERS: list["OneLineParser"] = []  # the parsers that parsed the command `run_main` is running


class OneLineParser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line (`prog: error: ...; see --help`, exit 2), not a usage dump.

    argparse calls `error` for unknown flags, bad types and bad choices; raising a UserError lets
    `run_main` print it like every other bad input. `param_flags` name the flag of a library parameter
    whose flag has another dest (e.g. {"target_modules": "--targets"}).
    """

    def __init__(self, *args: Any, param_flags: dict[str, str] | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.param_flags = dict(param_flags or {})

    def parse_known_args(self, args=None, namespace=None):  # type: ignore[override]
        _PARSERS.append(self)  # a subcommand's parser too: its flags, not a sibling's, explain the error
        return super().parse_known_args(args, namespace)

    def error(self, message: str):  # type: ignore[override]
        raise UserError(f"{message} (see {self.prog} --help)")

    def flags(self) -> dict[str, str]:
        """Parameter name -> the flag that sets it; for a switch, "name=True" / "name=False" -> the switch
        that sets that value (`pilot=False` -> --no-pilot)."""
        out: dict[str, str] = {}
        for a in self._actions:
            flag = next((o for o in a.option_strings if o.startswith("--")), None)
            if flag is None:
                continue
            if isinstance(a, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
                out[f"{a.dest}={a.const}"] = flag
                if a.const is True:
                    out.setdefault(a.dest, flag)
            else:
                out[a.dest] = flag
        return {**out, **self.param_flags}


def run_main(prog: str, main: Callable[[list[str] | None], int | None], argv: list[str] | None = None) -> int:
    """Call `main`; a UserError becomes `prog: error: <message>` on stderr and its exit code (2; a
    ResourceTimeout 3), with the parameters it names (errors.with_flags) shown as the flags of the command's
    parsers."""
    _PARSERS.clear()
    try:
        return int(main(argv) or 0)
    except UserError as exc:
        flags: dict[str, str] = {}
        for parser in _PARSERS:
            flags.update(parser.flags())
        print(f"{prog}: error: {with_flags(str(exc), flags)}", file=sys.stderr)
        return exc.exit_code
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




def top_k_arg(text: str) -> int | tuple[int, ...]:
    """`--top-k 2` or a per-layer list `--top-k 1,2,2`."""
    parts = [x.strip() for x in text.split(",")]
    if not all(x.isdigit() and int(x) >= 1 for x in parts):
        raise argparse.ArgumentTypeError(f"{text!r} is not a top-k: use an integer >= 1 or a comma list, e.g. 1,2,2")
    values = tuple(int(x) for x in parts)
    return values[0] if len(values) == 1 else values
