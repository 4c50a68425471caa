"""URIs as the job shows them: no credential in anything it writes or logs.

A URI can carry a secret in two places: its userinfo (``https://user:password@host/...``) and
the query string of a presigned or token URL (S3 ``X-Amz-Signature``/``X-Amz-Credential``/
``X-Amz-Security-Token``, GCS ``X-Goog-Signature``, Azure SAS ``sig``, CloudFront
``Signature``/``Key-Pair-Id``, ``token``, ``access_token``, ``api_key``, ...).

:func:`redact_uri` is the one place that removes them. The rule:

- userinfo is dropped whole (not masked), so ``https://host/x.jpg`` stays fetchable when the
  store needs no credentials;
- when any query (or fragment) parameter's *name* looks like a credential (it contains ``sig``,
  ``token``, ``credential``, ``secret``, ``passw``, ``pwd``, ``key``, ``auth``, ``policy``,
  ``session`` or ``security``), the whole query string (and fragment) is dropped: the other
  parameters of a signing scheme (expiry, signed headers, ...) are worthless without the
  signature, and dropping all of them leaves no half of an unknown scheme behind. A query with
  no such parameter (``?versionId=3``, ``?w=640``) is kept, so such a URI still fetches.

:func:`redact_text` applies it to every URI inside a free text (an error message, a log line)
and masks ``name=value`` pairs of well-known signature parameters that appear without a URI;
:func:`redact_document` applies that to every string of a JSON-able document. The boundaries
that call them: label rows (``uri``, ``error``), ``_RUN.json`` / ``_MANIFEST.json`` (through
``OutputLayout.write_json_atomic``), the run fingerprint, log lines of the job (a logging
filter) and its one-line refusals. All three functions are idempotent.
"""

from __future__ import annotations

import logging
import re
from typing import Any
from urllib.parse import parse_qsl, urlsplit, urlunsplit

#: A query parameter whose name matches this (case-insensitive) makes the query secret.
SECRET_PARAMETER = re.compile(r"sig|token|credential|secret|passw|pwd|key|auth|policy|session|security", re.IGNORECASE)

# A URI inside free text: scheme://, then everything up to white space or a closing delimiter.
_URI_IN_TEXT = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]*://[^\s'\"<>()\[\]{}]+")
# A well-known signature parameter outside a URI (e.g. a store's error message quoting a query).
_BARE_SECRET_PAIR = re.compile(
    r"(?i)\b((?:x-amz-|x-goog-)?(?:signature|credential|security-token)|sig|token|access_token|api_key)=[^&\s'\"<>()\[\]{},;]+"
)
REDACTED = "***"


def redact_uri(uri: str | None) -> str | None:
    """``uri`` without userinfo, and without its query string when that carries a credential.

    Local paths and URIs without secrets come back unchanged; None and "" too.
    """
    if not uri or "://" not in uri:
        return uri
    try:
        parts = urlsplit(uri)
    except ValueError:  # e.g. an unbalanced [ in the host: show nothing after the scheme's host
        return uri.split("://", 1)[0] + "://" + REDACTED
    netloc = parts.netloc.rpartition("@")[2] if "@" in parts.netloc else parts.netloc
    query, fragment = parts.query, parts.fragment
    if _has_secret_parameter(query) or _has_secret_parameter(fragment):
        query = fragment = ""
    if (netloc, query, fragment) == (parts.netloc, parts.query, parts.fragment):
        return uri
    return urlunsplit((parts.scheme, netloc, parts.path, query, fragment))


def _has_secret_parameter(query: str) -> bool:
    if not query:
        return False
    names = [name for name, _ in parse_qsl(query, keep_blank_values=True)] or [query]
    return any(SECRET_PARAMETER.search(name) for name in names)


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
