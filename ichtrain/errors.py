"""Errors raised by ichtrain; each subclasses a built-in so callers may catch either."""

from __future__ import annotations


class IchtrainError(Exception):
    """Base class of every error ichtrain raises on purpose."""


class ConfigError(IchtrainError, ValueError):
    """An invalid option value or combination; the message lists the valid choices."""


class DataError(IchtrainError, ValueError):
    """The store cannot feed this training run (no positives, empty split, ...)."""


class CheckpointError(IchtrainError, ValueError):
    """A checkpoint is unreadable, unsafe, or does not fit the model/store it is used with."""


class SpecMismatchError(CheckpointError):
    """The store was made with another preprocessing spec than the checkpoint's model saw."""
