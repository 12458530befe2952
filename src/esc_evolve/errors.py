"""Errors a user can cause and fix. The CLI prints them as one clear message, never as a traceback."""


class EscEvolveError(Exception):
    """Base class for user-facing errors."""


class ConfigError(EscEvolveError):
    """A config file or override is missing, malformed, or names an unknown key."""


class DataFormatError(EscEvolveError):
    """A data file is unreadable or a record does not fit the schema; the message names file, line, field."""


class BackboneError(EscEvolveError):
    """A backbone cannot be resolved, converted or loaded."""


class RunBusyError(EscEvolveError):
    """Another process is writing the same run directory; the message names it (pid and host)."""


class DiskFullError(EscEvolveError):
    """The disk filled up while a run was writing; what was finished before is kept for --resume."""


class StageFailedError(EscEvolveError):
    """A stage run in its own process failed; the message gives its exit status and the end of its output."""
