"""Errors a user can cause and fix.

Every such error is raised as :class:`UserError` with one line that names the culprit
(the settings key and file, the image, the artefact field ...). The command-line wrapper
in :mod:`lib.cli` prints that line and exits with ``exit_code``; nothing else is printed,
no stack trace.
"""

from __future__ import annotations


class UserError(Exception):
    """A problem in the user's input: settings, data, or artefacts from another run."""

    exit_code = 2

    def __init__(self, message: str, exit_code: int | None = None) -> None:
        super().__init__(message)
        if exit_code is not None:
            self.exit_code = exit_code


class SettingsError(UserError):
    """A settings key is unknown, of the wrong type, or names a missing path."""


class ArtefactMismatchError(UserError):
    """An input artefact was made with other settings than the ones asked for now."""


class LockedError(UserError):
    """Another run holds the lock on the output folder."""

    exit_code = 3
