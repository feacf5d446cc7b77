"""The one family of user errors: a mistake the user can fix, reported as one ``error:`` line, exit 2.

Kept free of heavy imports, so that the command line can report a mistake in a config file or an
argument without first importing torch and Lightning.
"""
from __future__ import annotations


class UserError(ValueError):
    """Something the user can fix; the message says what and how."""


class ConfigError(UserError):
    """A configuration problem the user can fix; the message names the key."""


class DataError(UserError):
    """A data set problem the user must fix; the message names it."""


class InputError(UserError):
    """Prediction inputs that match no image, or a device that is not there."""


class OutputError(UserError):
    """An output location that must not or cannot be written; the message says which and why."""


class WeightsError(UserError):
    """Pretrained weights could not be obtained or do not fit the model."""


class CheckpointError(UserError):
    """A checkpoint that cannot (or must not) be loaded; the message says why."""


class BadImageError(UserError):
    """A file that cannot be used as an image; the message is the reason."""


class Stopped(Exception):
    """Work called off (its client left, or the server is stopping): not an error of anyone's."""
