"""Error types. Every error a user can cause derives from `FoveateError`, so the CLI and the server can turn
it into one clear line (or one JSON error) instead of a traceback."""


class FoveateError(Exception):
    """Base class for errors caused by bad input or configuration, not by a bug."""


class ImageError(FoveateError):
    """An image could not be read, decoded, or is outside the accepted limits."""


class BoxError(FoveateError):
    """A bounding box is malformed (wrong length, non-numeric, inverted, empty, out of range)."""


class ModelLoadError(FoveateError):
    """A model or processor could not be loaded from the given directory, id or endpoint."""


class PolicyError(FoveateError):
    """A model backend failed to answer (HTTP error, timeout, unsupported request)."""


class WhiteBoxUnsupported(PolicyError):
    """A strategy asked a black-box backend for attention, gradients or log-likelihoods."""


class ContextLengthError(PolicyError):
    """A request's prompt plus the tokens it may generate exceed the model's context (its position embeddings)."""
