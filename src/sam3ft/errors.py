"""Errors a user can act on: each names what is wrong, where, and how to fix it."""

from __future__ import annotations


class Sam3ftError(Exception):
    """Base class: a problem in the user's input or environment, reported without a traceback."""

    def __init__(self, message: str, fix: str | None = None) -> None:
        self.message = message
        self.fix = fix
        super().__init__(message if fix is None else f"{message}\n  fix: {fix}")


class ConfigError(Sam3ftError):
    """A params.yaml value or config file is invalid."""


class DatasetError(Sam3ftError):
    """A dataset export is malformed."""


class WeightsError(Sam3ftError):
    """A weights file does not fit the model it is loaded into."""
