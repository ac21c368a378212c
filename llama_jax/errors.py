"""The one error type user-facing programs turn into a one-line message and a non-zero exit."""


class InputError(ValueError):
    """Bad user input: a file that is missing, truncated, or disagrees with what it claims.

    `str(err)` is a single line: "<path>: <problem>".
    """

    def __init__(self, path, problem: str):
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")
