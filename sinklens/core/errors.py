"""Exceptions that name the problem and the fix.

Every input check in sinklens raises one of these before any heavy work starts, so
nothing already computed is lost. They subclass the builtin a caller would expect
(ValueError, LookupError, ...) so generic handlers keep working.
"""


class SinklensError(Exception):
    """Base class of every sinklens error."""


class UnknownModelError(SinklensError, LookupError):
    """The model name is neither a bundled alias, a local folder nor a hub id."""


class HubUnreachableError(SinklensError, ConnectionError):
    """A Hugging Face hub id was given but the hub cannot be reached."""


class UnsupportedArchitectureError(SinklensError, ValueError):
    """The checkpoint is not a Llama-family decoder."""


class InputError(SinklensError, ValueError):
    """A argument is out of range, empty, of the wrong type or shape."""


class WriteError(SinklensError, OSError):
    """A file or folder could not be written (read-only destination, full disk); nothing half-written is left."""


class HandleUsageError(InputError, TypeError):
    """An edit's handle was used as something it is not (e.g. ``with handle:``); the message names the call to use."""
