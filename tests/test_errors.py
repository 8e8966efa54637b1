"""Library errors name parameters; a console script shows the flag that sets each one."""

from __future__ import annotations

import pytest

from mola_search.cli.common import OneLineParser, run_main
from mola_search.errors import UserError, with_flags
from mola_search.search.config import StudyConfig
from mola_search.train.trainer import TrainConfig


def test_with_flags_replaces_marked_parameters_only() -> None:
    flags = {"max_train_examples": "--max-train-examples", "pilot=False": "--no-pilot"}
    assert with_flags("`max_train_examples` is -1; `pilot=False`; `lr` 0; `mola-search --resume x`", flags) == \
        "--max-train-examples is -1; --no-pilot; lr 0; `mola-search --resume x`"


def test_run_main_shows_the_flags_of_the_parsers_that_parsed(capsys) -> None:
    def main(argv):
        p = OneLineParser(prog="demo", param_flags={"target_modules": "--targets"})
        p.add_argument("--max-train-examples", dest="max_train_examples", type=int)
        p.add_argument("--no-pilot", dest="pilot", action="store_false")
        p.add_argument("--auto-fidelity", dest="auto_fidelity", action="store_true")
        sub = p.add_subparsers(dest="cmd")
        sub.add_parser("a", param_flags={"tasks": "--order"}).add_argument("--order")
        sub.add_parser("b").add_argument("--tasks")
        p.parse_args(argv)
        raise UserError("`max_train_examples`, `pilot=False`, `auto_fidelity`, `target_modules`, `tasks`")

    assert run_main("demo", main, ["b", "--tasks", "x"]) == 2
    assert capsys.readouterr().err.strip() == \
        "demo: error: --max-train-examples, --no-pilot, --auto-fidelity, --targets, --tasks"
    assert run_main("demo", main, ["a"]) == 2  # the subcommand that parsed decides: a's --order
    assert capsys.readouterr().err.strip().endswith("--targets, --order")


@pytest.mark.parametrize(("build", "parameter"), [
    (lambda: TrainConfig(batch_size=0), "`batch_size` 0"),
    (lambda: StudyConfig(trials=2, pilot_seeds=3), "`pilot=False`"),
    (lambda: StudyConfig(time_budget=-1), "`time_budget` is -1"),
])
def test_library_errors_name_parameters_not_flags(build, parameter) -> None:
    with pytest.raises(UserError) as info:
        build()
    assert parameter in str(info.value) and "--" not in str(info.value)
