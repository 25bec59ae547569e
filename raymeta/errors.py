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


class RegistrationError(RaymetaError):
    """Registering a trained meta-learner failed (the store refused it or is unreachable). The
    meta-learner is kept in the output folder and the command writes its results tables before
    it ends with this error.

    Attributes:
        result: what the training returned (set by the stage that trained it), so that its
            results are still reported.
    """

    def __init__(self, message: str, result=None):
        super().__init__(message)
        self.result = result
