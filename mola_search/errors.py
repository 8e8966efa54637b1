"""The one exception type that means "the user asked for something we cannot do".

The CLIs catch it, print its message on one line and exit with status 2 (`ResourceTimeout`, its one subclass:
status 3); anything else is a bug and keeps its traceback.

Library code speaks in parameters, not flags: a message names a parameter in backticks
(`max_train_examples`, or a switch's setting: `pilot=False`), which reads as a parameter to a
Python caller; a console script shows the flag that sets it instead (`--max-train-examples`,
`--no-pilot`; see `cli.common.run_main`).
"""

from __future__ import annotations

import re
from collections.abc import Mapping

PARAMETER = re.compile(r"`([A-Za-z_][A-Za-z0-9_]*(?:=(?:True|False))?)`")


class UserError(ValueError):
    """Bad input: an infeasible budget, a malformed spec, an unknown task or model, a missing file.

    The message must say what was wrong and what would be accepted.
    """

    exit_code = 2


def with_flags(message: str, flags: Mapping[str, str]) -> str:
    """`message` with each backticked parameter replaced by its flag in `flags`, or by its bare name."""
    return PARAMETER.sub(lambda m: flags.get(m.group(1), m.group(1)), message)


class ResourceTimeout(UserError):
    """A Ray study waited `resource_timeout` minutes with no node able to run a trial, and ended cleanly:
    every finished trial and run is kept, and resuming the study (once the resources are back) continues it.

    A subclass of UserError, so it is one line too, with its own exit status: a script can tell "bad input"
    (2) from "the cluster could not run it" (3), and add a node and resume.
    """

    exit_code = 3
