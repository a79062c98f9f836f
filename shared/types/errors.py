"""User-facing error types. Each carries a message that is safe to show as is."""


class SpecPipeError(Exception):
    """Base class: a clear message, shown to the user without a traceback."""


class ConfigError(SpecPipeError):
    """A setting or argument that cannot work (N > layers, width 0, ...)."""


class RequestError(SpecPipeError):
    """A request that cannot be served (prompt longer than the context, ...)."""


class ProtocolError(SpecPipeError):
    """A message that breaks the contract between processes or components."""
