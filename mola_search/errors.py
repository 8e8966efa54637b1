"""The one exception type that means "the user asked for something we cannot do".

The CLIs catch it, print its message on one line and exit with status 2; anything
else is a bug and keeps its traceback.
"""

from __future__ import annotations


class UserError(ValueError):
    """Bad input: an infeasible budget, a malformed spec, an unknown task or model, a missing file.

    The message must say what was wrong and what would be accepted.
    """

    exit_code = 2
