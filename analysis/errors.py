"""Exceptions raised for bad user input.

Library code raises these; only ``cli.py`` turns them into a one-line message and
exit code 2. Messages name the file or argument and say what was expected versus
what was found.
"""
from __future__ import annotations


class InputError(ValueError):
    """Bad user input: a missing, malformed or inconsistent file or argument.

    The message is a single line that names the offending file or option.
    """

    exit_code = 2


class DataProblems(InputError):
    """Several independent problems found while checking a data set.

    Args:
        problems: one message per problem, each naming its file.
    """

    def __init__(self, problems: list[str]) -> None:
        self.problems = list(problems)
        first = self.problems[0] if self.problems else "no problems"
        more = f" (and {len(self.problems) - 1} more)" if len(self.problems) > 1 else ""
        super().__init__(first + more)
