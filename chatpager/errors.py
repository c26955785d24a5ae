"""Errors a user can act on. Each message names the problem; the CLI prints it without a traceback."""


class ChatpagerError(Exception):
    """Base of every error chatpager raises on purpose."""


class ModelLoadError(ChatpagerError):
    """The model could not be found, read or understood."""


class RequestError(ChatpagerError, ValueError):
    """A request that can never be served (empty, too long for the model, larger than the pool)."""


class PromptTooLong(RequestError):
    """A prompt longer than the model's context or the whole KV pool: a chat can drop old turns."""
