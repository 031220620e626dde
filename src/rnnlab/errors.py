"""Errors a user can fix: they are printed without a traceback and exit non-zero."""


class RnnlabError(Exception):
    """A problem with the user's input, config or data, with the fix in the message."""


class DataError(RnnlabError):
    """Input data is missing, malformed or inconsistent."""


class ConfigError(RnnlabError):
    """A configuration value is out of range or inconsistent."""


class TrainingError(RnnlabError):
    """Training went wrong in a way a setting can fix, e.g. a loss that became NaN."""
