"""Options that became keyword-only: a former positional call still works for one release, with a warning.

The public functions take their data positionally (``run_census(model, tokens)``) and their options by keyword
(``batch_size=16``). Options that used to be positional are accepted positionally by
:func:`keyword_only_after` for one release: each is mapped to its keyword in the old order and a
``DeprecationWarning`` names the keyword to write instead.
"""

from __future__ import annotations

import functools
import inspect
import warnings
from collections.abc import Callable, Sequence
from typing import TypeVar

F = TypeVar("F", bound=Callable)

__all__ = ["keyword_only_after"]


def keyword_only_after(last_positional: str, *, since: str, formerly: Sequence[str] | None = None) -> Callable[[F], F]:
    """Decorator: arguments past ``last_positional`` given positionally are passed by keyword, with a warning.

    The decorated function declares its options keyword-only (after a ``*``); a call that still passes them
    positionally, as the signature before ``since`` allowed, gets the same result and a ``DeprecationWarning``
    naming each keyword. ``inspect.signature`` and the docstring are the function's own (``functools.wraps``).

    Args:
        last_positional: the last parameter that stays positional (e.g. ``"tokens"``).
        since: the sinklens version that made the options keyword-only (named in the warning).
        formerly: the keyword-only parameters that used to be positional, in their old order
            (None: every keyword-only parameter, in declaration order).
    """
    def decorate(func: F) -> F:
        params = list(inspect.signature(func).parameters.values())
        positional = [p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        keyword_only = [p.name for p in params if p.kind is p.KEYWORD_ONLY]
        if not positional or positional[-1] != last_positional:
            raise TypeError(f"{func.__qualname__}: {last_positional!r} is not its last positional parameter "
                            f"(positional: {positional}).")
        if any(p.kind is p.VAR_POSITIONAL for p in params):
            raise TypeError(f"{func.__qualname__} takes *args: its extra positional arguments cannot be mapped.")
        names = list(keyword_only if formerly is None else formerly)
        unknown = [name for name in names if name not in keyword_only]
        if unknown:
            raise TypeError(f"{func.__qualname__}: {unknown} are not keyword-only parameters.")
        n_positional = len(positional)

        @functools.wraps(func)
        def wrapper(*args, **kwargs):
            if len(args) > n_positional:
                extra = args[n_positional:]
                if len(extra) > len(names):
                    raise TypeError(f"{func.__name__}() takes at most {n_positional} positional arguments "
                                    f"({', '.join(positional)}) but {len(args)} were given; pass the options by "
                                    "keyword.")
                for name, value in zip(names, extra):
                    if name in kwargs:
                        raise TypeError(f"{func.__name__}() got multiple values for argument {name!r}.")
                    kwargs[name] = value
                spelled = ", ".join(f"{name}=..." for name in names[:len(extra)])
                warnings.warn(f"{func.__name__}(): passing {', '.join(names[:len(extra)])} positionally is deprecated "
                              f"since sinklens {since}; write {spelled} (keyword-only in the next release).",
                              DeprecationWarning, stacklevel=2)
                args = args[:n_positional]
            return func(*args, **kwargs)
        return wrapper  # type: ignore[return-value]
    return decorate
