"""The one error type user-facing programs turn into a one-line message and a non-zero exit."""

import sys
from collections.abc import Callable


class InputError(ValueError):
    """Bad user input: a file that is missing, truncated, or disagrees with what it claims.

    `str(err)` is a single line: "<path>: <problem>".
    """

    def __init__(self, path, problem: str):
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")


def exit_code(body: Callable[[], int], *, interrupted: str, user_errors: tuple[type[Exception], ...] = (InputError,)
              ) -> int:
    """Run a program's body: a user error becomes "error: ..." on one line and exit 2, Ctrl-C `interrupted` and 130."""
    try:
        return body()
    except user_errors as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(interrupted, file=sys.stderr)
        return 130
