"""User-facing errors: one line, naming the bad value and what is accepted."""


class RaymetaError(Exception):
    """An error caused by user input (config, data, registry); the CLI prints it on one line."""


class ConfigError(RaymetaError, ValueError):
    """A config file or argument names an unknown key, a wrong type or an impossible value."""


class DataNotFoundError(RaymetaError, FileNotFoundError):
    """A dataset's files are missing or truncated; the message says where it looked."""


class NonFiniteLossError(RaymetaError, FloatingPointError):
    """The training loss became NaN or infinite; the run stops instead of producing a NaN LR."""


class DeadRunError(RaymetaError):
    """A run makes no progress (its training loss is not below its initial value after the
    guard's patience, or grew past a multiple of it): stopped instead of training on at chance.
    Deterministic, so never retried."""
