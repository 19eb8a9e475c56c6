"""Errors a user can act on: each names what is wrong, where, and how to fix it."""

from __future__ import annotations


class Sam3ftError(Exception):
    """Base class: a problem in the user's input or environment, reported without a traceback."""

    def __init__(self, message: str, fix: str | None = None) -> None:
        self.message = message
        self.fix = fix
        super().__init__(message if fix is None else f"{message}\n  fix: {fix}")


class ConfigError(Sam3ftError):
    """A params.yaml value or config file is invalid. `key` (e.g. "trainer.batch_size") marks a
    value of the params file; where the error is printed, that file's name goes in front of it
    (`sam3ft.params.in_file`), so a run on another file (`--params gpu.yaml`) names that one."""

    def __init__(self, message: str, fix: str | None = None, key: str | None = None) -> None:
        super().__init__(message, fix)
        self.key = key


class DatasetError(Sam3ftError):
    """A dataset export is malformed."""


class WeightsError(Sam3ftError):
    """A weights file does not fit the model it is loaded into."""
