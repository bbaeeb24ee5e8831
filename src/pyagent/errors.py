"""The exception tree: every error PyAgent raises on purpose derives from `PyAgentError`."""


class PyAgentError(Exception):
    """Base of all PyAgent errors; its message is meant to be shown to a user as is."""


class ConfigError(PyAgentError):
    """A definition or option is invalid; the message names the file, line or field."""


class ModelError(PyAgentError):
    """A model cannot be found, prepared or loaded."""


class ModelNotFoundError(ModelError):
    """A model reference matches no registered name and no path on disk."""


class RequestError(PyAgentError):
    """A generation request is invalid (bad sampling values, too long for the context, ...).

    `param` names the offending field, as the OpenAI error body does.
    """

    def __init__(self, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.param = param
        self.code = code


class BackendError(PyAgentError):
    """A backend failed to produce a completion."""


class BackendUnavailableError(BackendError):
    """A remote backend could not be reached."""


class ReplayMissError(BackendError):
    """A replay backend has no recording for a request."""


class OverloadedError(RequestError):
    """The engine cannot take a request now (its queue is full, or it is shutting down); try again
    after `retry_after` seconds."""

    def __init__(self, message: str, retry_after: int, code: str = "overloaded"):
        super().__init__(message, code=code)
        self.retry_after = retry_after
