"""User-facing errors.

Every mistake a user can make (a bad recipe, a missing file, mismatched experts) is raised as a
:class:`UserError`. The CLI turns it into one line on stderr and exit code 2, without a traceback:
people fixing a YAML typo should not have to read a stack trace.
"""

from __future__ import annotations


class UserError(Exception):
    """An error caused by the user's input; printed as one line, exit code 2."""

    exit_code = 2

    def __init__(self, message: str, *, where: str | None = None) -> None:
        # `where` names the file (and field) so every message says what to fix and where.
        self.message, self.where = message, where
        super().__init__(f"{where}: {message}" if where else message)

    def located_in(self, file: str) -> UserError:
        """The same error placed in `file`, for errors that name only a field of it (``data.sources[0]``)."""
        return type(self)(self.message, where=f"{file}: {self.where}" if self.where else file)
