"""A location the job was given, as one typed value: shown only in its public form.

A user-given URI (``--input``, ``--output``, ``--endpoint-url``, a manifest entry, a shard's or a
sample's URL) may carry a secret: ``user:password@`` or the query of a presigned URL. Kept as a
plain ``str`` it is one f-string away from a log line or a row. A :class:`Location` holds it
instead: ``str``, ``repr``, ``format`` (and so every f-string, ``%s`` log argument and exception
message built from it) give :attr:`Location.public`, the URI without its credentials, computed
once by the rules of :func:`clipdiy.uris.public_uri`. The readable form comes out through one
deliberately named accessor, :meth:`Location.reveal_for_read`, that only the listing, the
manifest and shard readers and the storage functions call (``tests/test_locations.py`` checks
the allow-list by reading the source).

A location that cannot be parsed (``https://u:p/w@h/x.jpg``, a port that is not a number) is
still a :class:`Location`: its public form is redacted by text (never raises), and
:attr:`Location.parse_error` says why it cannot be read, so the read stage gives that image an
``invalid_uri`` row instead of reading it.

Equality and hash compare the full value (two signings of one object are two locations; they
share their public form). A location pickles as its full value (Ray moves it between workers) and
computes its public form again where it is unpickled.
"""

from __future__ import annotations

from typing import Any

from clipdiy.uris import UnparsableUriError, has_scheme, public_uri, redact_uri


class Location:
    """One location: its public form everywhere, its readable form on request (see the module)."""

    __slots__ = ("_value", "parse_error", "public")

    #: The credential-free URI: what rows, logs and messages name.
    public: str
    #: Why the location cannot be parsed (a message that shows only the public form), else None.
    parse_error: str | None

    def __init__(self, value: str | Location) -> None:
        if isinstance(value, Location):
            value = value._value
        if not isinstance(value, str):
            raise TypeError(f"a location is text, not {type(value).__name__}")
        self._value = value
        try:
            self.public, self.parse_error = public_uri(value), None
        except UnparsableUriError as error:
            # The unparsable-URL fallback: redacted by text, and marked so that nothing reads it.
            self.public, self.parse_error = redact_uri(value), str(error)

    def reveal_for_read(self) -> str:
        """The location as given, credentials included: only for handing to a reader (the
        listing, the manifest and shard readers, ``clipdiy.storage``). Never show it."""
        return self._value

    @property
    def is_signed(self) -> bool:
        """Whether the location carries something its public form leaves out (a credential)."""
        return self._value != self.public

    @property
    def has_scheme(self) -> bool:
        """``scheme://...`` (not a local path)."""
        return has_scheme(self.public)

    def __bool__(self) -> bool:
        return bool(self._value)  # an empty flag value stays falsy, as the text was

    def __str__(self) -> str:
        return self.public

    def __repr__(self) -> str:
        return f"Location({self.public!r})"

    def __format__(self, spec: str) -> str:
        return format(self.public, spec)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Location) and other._value == self._value

    def __hash__(self) -> int:
        return hash((Location, self._value))

    def __reduce__(self) -> tuple[Any, ...]:
        return (Location, (self._value,))


def as_location(value: str | Location | None) -> Location | None:
    """``value`` as a :class:`Location` (None stays None): where a user-given URI enters."""
    return None if value is None else value if isinstance(value, Location) else Location(value)

