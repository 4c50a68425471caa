"""URIs as the job shows them: no credential in anything it writes or logs.

A URI can carry a secret in two places: its userinfo (``https://user:password@host/...``) and
the query string (or fragment) of a presigned or token URL. :func:`public_uri` is the one place
that removes them, and it keeps everything else, so two different objects never get the same
public URI (an image id is derived from it: merging two would drop one image as a repeat):

- userinfo is dropped whole (not masked), so ``https://host/x.jpg`` stays fetchable when the
  store needs no credentials;
- query and fragment parameters are dropped **by name** (case-insensitive), the others kept in
  their order and spelling: every ``X-Amz-*`` and ``X-Goog-*`` parameter (AWS SigV4 and GCS V4
  signing: the signature, the credential, the session token, and the date, expiry, algorithm and
  signed headers, which change each time the URL is signed again, so that a URL signed anew each
  night keeps its id), and the names in :data:`CREDENTIAL_PARAMETERS` (AWS SigV2, GCS V2,
  CloudFront, bearer tokens, API keys, passwords). An Azure SAS (a query with ``sig``) loses
  its SAS fields too (:data:`AZURE_SAS_PARAMETERS`: version, permissions, start and expiry...).
  ``?id=1&resourcekey=K`` and ``?id=2&resourcekey=K`` stay two images; ``?versionId=3`` stays.
  A parameter named exactly ``key`` is taken for an API key (Google's convention) and dropped.

:func:`public_uri` raises :class:`UnparsableUriError` for a URI that cannot be parsed (an
unbalanced ``[`` in the host, a port that is not a number, a password holding ``/ ? # @`` unencoded,
see :func:`_ambiguous_userinfo_end`): the job gives such a manifest entry
an error row (``invalid_uri``). :func:`redact_uri` never raises (for log lines and options): it
applies the same rule, by text when the URI does not parse.

Inside the job a user-given or listed location is a :class:`clipdiy.locations.Location`, which
computes its public form here once and shows nothing else; the readable location of an image (a
presigned URL, as listed) travels in one column only, ``signed_uri``, from the listing to the read
(:mod:`clipdiy.pipeline.stages.decode`), and nowhere else: rows, plan files and logs carry the
public ``uri`` and the ``image_id``.

:func:`redact_text` applies :func:`redact_uri` to every URI inside a free text (an error message
from a library, a log line) and masks ``name=value`` pairs of well-known signature parameters that
appear without a URI; :func:`redact_document` applies that to every string of a JSON-able
document. The boundaries that call them: the ``error`` column of label rows, ``_RUN.json`` /
``_MANIFEST.json`` (through ``OutputLayout.write_json_atomic``), the run fingerprint, log lines of
the job (a logging filter) and its one-line refusals. All of them are idempotent.
"""

from __future__ import annotations

import logging
import re
from typing import Any
from urllib.parse import unquote_plus, urlsplit, urlunsplit

#: Query (and fragment) parameters that carry a credential or change whenever a URL is signed:
#: dropped by name (lower case; compared case-insensitively). Every ``x-amz-*`` and ``x-goog-*``
#: parameter is dropped as well (:data:`SIGNING_PREFIXES`).
CREDENTIAL_PARAMETERS = frozenset({
    # AWS Signature V2 query authentication (also S3-compatible stores), GCS V2 signed URLs
    "awsaccesskeyid", "signature", "expires", "googleaccessid",
    # CloudFront signed URLs
    "policy", "key-pair-id",
    # Azure SAS signature (its other fields: AZURE_SAS_PARAMETERS)
    "sig",
    # bearer tokens, API keys, passwords
    "token", "access_token", "id_token", "refresh_token", "auth", "authorization", "api_key", "apikey",
    "api-key", "key", "client_secret", "secret", "password", "passwd", "pwd", "security_token",
})
#: Parameter name prefixes of AWS SigV4 and GCS V4 signing (``X-Amz-Signature``, ``X-Goog-Date``...).
SIGNING_PREFIXES = ("x-amz-", "x-goog-")
#: The fields of an Azure shared access signature, dropped when the query also holds ``sig``
#: (alone, short names such as ``sp`` or ``st`` may mean something else, and are kept).
AZURE_SAS_PARAMETERS = frozenset({
    "sv", "ss", "srt", "sp", "se", "st", "spr", "sip", "sr", "si", "sdd", "ses", "skoid", "sktid", "skt",
    "ske", "sks", "skv", "saoid", "suoid", "scid",
})

# A URI inside free text: scheme://, then everything up to white space or a closing delimiter.
_URI_IN_TEXT = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]*://[^\s'\"<>()\[\]{}]+")
# A well-known signature parameter outside a URI (e.g. a store's error message quoting a query).
_BARE_SECRET_PAIR = re.compile(
    r"(?i)\b((?:x-amz-|x-goog-)?(?:signature|credential|security-token)|sig|token|access_token|api_key)=[^&\s'\"<>()\[\]{},;]+"
)
REDACTED = "***"


class UnparsableUriError(ValueError):
    """A URI that ``urllib.parse`` cannot split (its message shows the URI redacted)."""


def _is_credential(name: str, sas: bool) -> bool:
    name = unquote_plus(name).strip().lower()
    return (name in CREDENTIAL_PARAMETERS or name.startswith(SIGNING_PREFIXES)
            or (sas and name in AZURE_SAS_PARAMETERS))


def _without_credentials(parameters: str) -> str:
    """``parameters`` (a query string or fragment) without the credential parameters, by text:
    the others keep their order and spelling. A fragment that is not ``name=value`` pairs stays."""
    if not parameters or "=" not in parameters:
        return parameters
    pairs = parameters.split("&")
    names = [pair.split("=", 1)[0] for pair in pairs]
    sas = any(unquote_plus(name).strip().lower() == "sig" for name in names)
    return "&".join(pair for pair, name in zip(pairs, names, strict=True) if not _is_credential(name, sas))


def has_scheme(uri: str | None) -> bool:
    """True for ``scheme://...`` (not for local paths, which are never redacted)."""
    return bool(uri) and "://" in uri


def public_uri(uri: str) -> str:
    """``uri`` without userinfo and without credential parameters (see the module docstring).

    Local paths, ``file://`` URIs and URIs without secrets come back unchanged. Raises
    :class:`UnparsableUriError` when ``uri`` cannot be parsed, or when its userinfo cannot be told
    from its path (:func:`_ambiguous_userinfo_end`).
    """
    if not has_scheme(uri) or uri.startswith("file://"):
        return uri
    if _ambiguous_userinfo_end(uri.partition("://")[2]) is not None:
        raise UnparsableUriError(
            f"cannot parse the URI {_redact_by_text(uri)}: its user name or password seems to hold '/', '?', '#' "
            "or '@' (percent-encode them, %2F %3F %23 %40, or leave credentials to the environment)")
    try:
        parts = urlsplit(uri)
        parts.port  # noqa: B018 - raises ValueError for a port that is not a number
    except ValueError:  # its message may quote the authority, userinfo included: not shown
        raise UnparsableUriError(f"cannot parse the URI {_redact_by_text(uri)}") from None
    netloc = parts.netloc.rpartition("@")[2]
    query, fragment = _without_credentials(parts.query), _without_credentials(parts.fragment)
    if (netloc, query, fragment) == (parts.netloc, parts.query, parts.fragment):
        return uri
    return urlunsplit((parts.scheme, netloc, parts.path, query, fragment))


_IPV6_LITERAL = re.compile(r"\[[^\]]*\]")


def _authority_end(rest: str) -> int:
    """Where the authority of ``rest`` (a URI after ``scheme://``) ends by RFC 3986: at the
    first ``/``, ``?`` or ``#``."""
    return min((i for i in (rest.find("/"), rest.find("?"), rest.find("#")) if i >= 0), default=len(rest))


def _ambiguous_userinfo_end(rest: str) -> int | None:
    """The index of the last ``@`` of ``rest`` (a URI after ``scheme://``) when a userinfo may
    run past the RFC's authority, else None.

    A password pasted unencoded may hold ``/``, ``?``, ``#`` or ``@``
    (``https://AKIAX:wJalr/XUtn@h/x.jpg``, ``https://u:p@ss/w@h/x.jpg``): the RFC's parse then
    ends the authority inside the password and shows the rest of it as a host, port, path or
    query. Such a URI cannot be told by its text from one with a port, a userinfo or a ``:`` in
    its path followed by an ``@`` (``https://h:8080/x@2x.png``, ``https://u:p@h/x@2x.png``), so
    the rule errs on the side of the secret: when an ``@`` lies after the RFC's authority and a
    ``:`` (outside an IPv6 literal's brackets) lies before it, everything up to the last ``@`` is
    taken for userinfo and the URI is refused (``invalid_uri``; the user percent-encodes the
    ``@`` of the path as ``%40``). An ``@`` with no ``:`` before it (``https://cdn/x@2x.png``)
    stays in the path.
    """
    end = _authority_end(rest)
    last_at = rest.rfind("@")
    if last_at < end:
        return None
    # The text before the last "@", with the authority's own userinfo (RFC form) set aside.
    before = _IPV6_LITERAL.sub("", rest[:last_at])
    return last_at if ":" in before else None


def _redact_by_text(uri: str) -> str:
    """:func:`public_uri`'s rule without parsing: userinfo cut from the authority by text."""
    scheme, _, rest = uri.partition("://")
    ambiguous = _ambiguous_userinfo_end(rest)
    if ambiguous is not None:
        rest = rest[ambiguous + 1:]
    authority_end = _authority_end(rest)
    authority, rest = rest[:authority_end].rpartition("@")[2], rest[authority_end:]
    rest, hash_, fragment = rest.partition("#")
    path, question, query = rest.partition("?")
    query, fragment = _without_credentials(query), _without_credentials(fragment)
    return (f"{scheme}://{authority}{path}" + (question if query else "") + query
            + (hash_ if fragment else "") + fragment)


def redact_uri(uri: str | None) -> str | None:
    """:func:`public_uri` for showing a URI: never raises (an unparsable URI is redacted by text).

    Local paths and URIs without secrets come back unchanged; None and "" too.
    """
    if not has_scheme(uri):
        return uri
    try:
        return public_uri(uri)
    except UnparsableUriError:
        return _redact_by_text(uri)


def redact_text(text: str | None) -> str | None:
    """``text`` with :func:`redact_uri` applied to each URI in it and well-known signature
    parameters (``X-Amz-Signature=...``, ``sig=...``, ``token=...``) masked where they stand alone."""
    if not text:
        return text
    text = _URI_IN_TEXT.sub(lambda match: redact_uri(match.group(0)), text)
    return _BARE_SECRET_PAIR.sub(lambda match: f"{match.group(1)}={REDACTED}", text)


def redact_document(value: Any) -> Any:
    """A copy of a JSON-able ``value`` with :func:`redact_text` applied to every string in it."""
    if isinstance(value, str):
        return redact_text(value)
    if isinstance(value, dict):
        return {key: redact_document(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [redact_document(item) for item in value]
    return value


class RedactingFilter(logging.Filter):
    """A handler filter: the formatted message of each record (and its exception text) redacted.

    Installed on the job's log handler, so a URI logged by any library on the driver (fsspec,
    botocore, ...) is shown without its credentials.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        redacted = redact_text(message)
        if redacted != message:
            record.msg, record.args = redacted, None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact_text(record.exc_text)
        return True
