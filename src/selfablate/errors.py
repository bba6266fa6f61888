"""User-facing errors.

Every problem a user can cause (bad config, missing data, corrupt checkpoint, ...) is raised as a
`SelfAblateError` with a one-line message naming the problem; the CLI prints it without a traceback.
"""


class SelfAblateError(Exception):
    """A problem with the user's input, reported as one line."""


class ConfigError(SelfAblateError, ValueError):
    """An invalid configuration value."""


class DataError(SelfAblateError):
    """Missing or unreadable training data."""


class CheckpointError(SelfAblateError):
    """A missing, corrupt or incompatible checkpoint."""


class DivergedError(SelfAblateError):
    """Training produced a non-finite loss, gradient or weight; nothing non-finite was saved."""
