"""The one line that says why a run failed: the cause and where, not the wrapper that carried it.

A fault raised inside a Ray Data task reaches the driver wrapped: ``RayTaskError(UserCodeException)``
whose own text is the task's name in terminal colours (``\\x1b[36mray::MapBatches(build_rows)->
MapBatches(write_shard)()\\x1b[39m (pid=..., ip=...)``), the real exception (``OSError: [Errno 28]
No space left on device: '<OUTPUT>/runs/<run>/part-...parquet'``) two links down its cause
chain. :func:`describe_failure` walks that chain (Ray's ``cause``, ``__cause__``, ``__context__``)
to the root: clipdiy's own error where there is one (``OutputWriteError`` names the file), else
the innermost ``OSError`` when there is one (a full or read-only disk, a store that
refuses: a fault of the output or the network, with the path it concerns), else the innermost
exception that is not a Ray wrapper; its text without colour codes, on one line, redacted.
"""

from __future__ import annotations

import re

from clipdiy.uris import redact_text

#: ANSI escape sequences (colours, cursor moves) that Ray puts in task names.
_ANSI = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]")
#: Exception classes that only carry another one (Ray's task and user-code wrappers).
_WRAPPER_MODULES = ("ray.exceptions", "ray.data.exceptions")
_WRAPPER_NAMES = ("RayTaskError", "UserCodeException", "RayActorError")


def _is_wrapper(error: BaseException) -> bool:
    return any(cls.__module__ in _WRAPPER_MODULES or cls.__name__.startswith(_WRAPPER_NAMES)
               for cls in type(error).__mro__)


def cause_chain(error: BaseException) -> list[BaseException]:
    """``error`` and what it wraps, outermost first (each exception once)."""
    chain: list[BaseException] = []
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        chain.append(current)
        seen.add(id(current))
        inner = getattr(current, "cause", None)  # RayTaskError keeps the task's exception here
        if not isinstance(inner, BaseException):
            inner = current.__cause__ or (None if current.__suppress_context__ else current.__context__)
        current = inner
    return chain


def root_cause(error: BaseException) -> BaseException:
    """The exception that says what went wrong (see the module docstring): clipdiy's own error
    nearest the top (its message was written for this line, e.g. the OUTPUT file a write failed
    on), else the innermost ``OSError``, else the innermost exception that is not a Ray wrapper."""
    from clipdiy.errors import ClipdiyError

    chain = cause_chain(error)
    for candidate in chain:
        if isinstance(candidate, ClipdiyError) and not _is_wrapper(candidate):
            return candidate
    for candidate in reversed(chain):
        if isinstance(candidate, OSError):
            return candidate
    for candidate in reversed(chain):
        if not _is_wrapper(candidate):
            return candidate
    return chain[-1]


#: The retry note Ray Data appends to a task's exception message ("\nFailed to apply UDF transform
#: after 1/1 attempts ..."), also inside a repr (a KeyError's text), where the newline is "\\n".
_RAY_RETRY_NOTE = re.compile(r"(?:\n|\\n)Failed to .*? after \d+/\d+ attempts.*?(?=['\"]?\Z)", re.S)


def one_line(text: str) -> str:
    """``text`` without terminal escape codes or Ray Data's retry note, its first non-empty
    line, redacted."""
    clean = _RAY_RETRY_NOTE.sub("", _ANSI.sub("", text))
    lines = [line.strip() for line in clean.splitlines() if line.strip()]
    # The text is an exception's, from any library (finding 7): a URI in it is redacted as text.
    return redact_text(lines[0]) if lines else ""


def describe_failure(error: BaseException) -> str:
    """``Kind: message`` of ``error``'s root cause, one line, no colour codes, no credentials."""
    root = root_cause(error)
    text = one_line(str(root))
    return f"{type(root).__name__}: {text}" if text else type(root).__name__
