"""Old argument spellings that keep working, with a warning, for one release.

The analyses share one signature form (see CONTRIBUTING, "Signatures"): ``f(model_or_cache,
tokens=None, *, ...)`` per text or ``f(model, corpus=None, *, ...)`` over a corpus, with every other
argument keyword-only. :func:`renamed_arguments` lets a function keep accepting the spellings it had
before it took that form: a keyword that was renamed, and the old positional order. Either is mapped
onto the new form and raises a ``DeprecationWarning`` that shows the call to write instead.

The decorated function keeps its new signature for :func:`inspect.signature` (through
``functools.wraps``), so documentation and ``tests/test_signatures.py`` see only the new form.
Keep it the outermost decorator: a run-time type check (``@jaxtyped``, which jaxtyping's import
hook places innermost) must see the call after it is mapped onto the new form.
"""

from __future__ import annotations

import functools
import inspect
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

__all__ = ["REMOVED_IN", "Renamed", "looks_like_lens", "renamed_arguments"]

#: The release in which the old spellings stop working.
REMOVED_IN = "0.2.0"

F = TypeVar("F", bound=Callable[..., Any])

#: A renamed keyword: the new name, or ``(new name, convert)`` where ``convert(value, kwargs)``
#: turns the old value into the new one (``kwargs`` are the other keywords of the call).
Renamed = str | tuple[str, Callable[[Any, dict[str, Any]], Any]]


def _positional_names(sig: inspect.Signature) -> list[str]:
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    return [p.name for p in sig.parameters.values() if p.kind in kinds]


def _is_old_order(
    args: tuple[Any, ...],
    kwargs: Mapping[str, Any],
    new_pos: Sequence[str],
    old_pos: Sequence[str],
    required_kw: set[str],
) -> bool:
    n = len(args)
    if n == 0 or list(old_pos[:n]) == list(new_pos[:n]):
        return False
    if n > len(new_pos):
        return True
    # A slot filled by position and also by keyword: the positional value was meant for the
    # old slot (``f(model, lens, tokens=t)``).
    if any(name in kwargs for name in new_pos[:n]):
        return True
    # A required keyword-only argument that used to be positional is missing: it came by position.
    return any(name in required_kw and name not in kwargs for name in old_pos[:n])


def _call_form(name: str, new_pos: Sequence[str], moved: Sequence[str]) -> str:
    parts = [*new_pos, *(f"{m}=..." for m in moved)]
    if moved:
        parts.insert(len(new_pos), "*")
    return f"{name}({', '.join(parts)})"


def renamed_arguments(
    *,
    renamed: Mapping[str, Renamed] | None = None,
    old_positional: Sequence[str] = (),
    old_order_if: Callable[[tuple[Any, ...], dict[str, Any]], bool] | None = None,
) -> Callable[[F], F]:
    """Accept a function's old keyword names and old positional order, with a DeprecationWarning.

    Args:
        renamed: Old keyword name -> new name, or ``(new name, convert)`` when the meaning of the
            value changed (``convert(old_value, other_kwargs)`` returns the new value).
        old_positional: The function's old positional parameter names in their old order, from
            the first (``("model", "lens", "basis", "layer", "tokens")``). A call is read in the
            old order when it passes more positional arguments than the new form takes, when a
            positional slot is also given by keyword, or when a required keyword-only argument that
            used to be positional is missing.
        old_order_if: Also read the call in the old order when ``old_order_if(args, kwargs)`` is
            true: for an optional argument that moved, recognised by its value (a lens where the
            new form takes a corpus).

    Examples:
        >>> @renamed_arguments(renamed={"prompts": "tokens"}, old_positional=("model", "lens"))
        ... def f(model, tokens=None, *, lens):
        ...     return model, tokens, lens
        >>> f("m", "hi", lens="logit")
        ('m', 'hi', 'logit')
        >>> with warnings.catch_warnings(record=True) as w:
        ...     warnings.simplefilter("always")
        ...     out = f("m", "logit", prompts="hi")
        >>> out, w[0].category.__name__, "f(model, tokens, *, lens=...)" in str(w[0].message)
        (('m', 'hi', 'logit'), 'DeprecationWarning', True)
        >>> str(inspect.signature(f))
        '(model, tokens=None, *, lens)'
    """
    renamed = dict(renamed or {})

    def decorate(func: F) -> F:
        sig = inspect.signature(func)
        new_pos = _positional_names(sig)
        required_kw = {
            p.name
            for p in sig.parameters.values()
            if p.kind is inspect.Parameter.KEYWORD_ONLY and p.default is inspect.Parameter.empty
        }
        moved = [n for n in old_positional if n not in new_pos]
        name = func.__name__

        @functools.wraps(func)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            notes: list[str] = []
            for old, spec in renamed.items():
                if old not in kwargs:
                    continue
                new, convert = (spec, None) if isinstance(spec, str) else spec
                if new in kwargs:
                    raise TypeError(
                        f"{name}() got both {old}= (its old name) and {new}=; pass only {new}=."
                    )
                value = kwargs.pop(old)
                kwargs[new] = value if convert is None else convert(value, kwargs)
                notes.append(f"{old}= is now {new}=")
            if old_positional and (
                _is_old_order(args, kwargs, new_pos, old_positional, required_kw)
                or (old_order_if is not None and old_order_if(args, kwargs))
            ):
                if len(args) > len(old_positional):
                    raise TypeError(
                        f"{name}() takes at most {len(new_pos)} positional arguments "
                        f"({', '.join(new_pos)}); pass the rest by keyword."
                    )
                for arg_name, value in zip(old_positional, args, strict=False):
                    if arg_name in kwargs:
                        raise TypeError(f"{name}() got {arg_name} by position and by keyword.")
                    kwargs[arg_name] = value
                args = ()
                notes.append(f"the positional order ({', '.join(old_positional)}) is now keywords")
            if notes:
                warnings.warn(
                    f"{name}(): {'; '.join(notes)}. Call "
                    f"{_call_form(name, new_pos, moved)}; the old form stops working in "
                    f"{REMOVED_IN}.",
                    DeprecationWarning,
                    stacklevel=2,
                )
            return func(*args, **kwargs)

        wrapper.__deprecated_arguments__ = {  # type: ignore[attr-defined]
            "renamed": {k: (v if isinstance(v, str) else v[0]) for k, v in renamed.items()},
            "old_positional": tuple(old_positional),
        }
        return wrapper  # type: ignore[return-value]

    return decorate


def looks_like_lens(value: Any) -> bool:
    """Whether ``value`` is a lens or names one (``"logit"``, ``"logit-paper"``, a lens folder).

    Used to recognise the old positional order of functions that took a lens before a corpus.

    Examples:
        >>> looks_like_lens("logit"), looks_like_lens("some text"), looks_like_lens(None)
        (True, False, False)
    """
    import os
    from pathlib import Path

    if value is None:
        return False
    if hasattr(value, "transform") and hasattr(value, "check_model"):
        return True
    if isinstance(value, str) and value in ("logit", "logit-paper"):
        return True
    if isinstance(value, (str, os.PathLike)) and len(str(value)) < 4096:
        try:
            path = Path(value)
            return path.is_dir() and any(
                (path / name).is_file() for name in ("config.json", "lens.json", "params.pt")
            )
        except OSError:
            return False
    return False
