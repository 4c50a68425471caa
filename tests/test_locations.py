"""A location with a credential, as one typed value: nothing built from it shows the secret.

Generated URLs put a secret in the userinfo (with ``/ ? # @ :`` pasted unencoded, so that some do
not parse) or in a signing parameter of the query or fragment (any case); every form the job may
show a location in (``str``, ``repr``, ``format``, ``%s``/``%r`` logging, a pickled copy, the
messages and records the job builds from it) must hold neither half of the secret. A last test
reads the source: only the listing, the readers and storage open a location.
"""

from __future__ import annotations

import ast
import io
import logging
import pickle
from pathlib import Path

import fsspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from clipdiy.locations import Location

REPOSITORY = Path(__file__).resolve().parents[1]

# Hosts and paths are lower case: the secrets (upper case, "SECRET" first) cannot appear in them.
_LOWER = "abcdefghijklmnopqrstuvwxyz0123456789"
_SECRET_BODY = "ABCDEFGHJKLMNPQRSTUVWXYZ0123456789"
secrets = st.text(_SECRET_BODY, min_size=8, max_size=16).map(lambda body: "SECRET" + body)
hosts = st.builds(lambda name, port: name + ".example.com" + port,
                  st.text(_LOWER, min_size=1, max_size=8), st.sampled_from(["", ":9000"]))
paths = st.lists(st.text(_LOWER + "-_.", min_size=1, max_size=8), min_size=1, max_size=3).map(
    lambda parts: "/" + "/".join(parts) + ".jpg")
#: Names of parameters that carry a credential (AWS SigV4/V2, GCS, Azure SAS, tokens, API keys).
SIGNING_NAMES = ["X-Amz-Signature", "X-Amz-Credential", "X-Amz-Security-Token", "X-Goog-Signature",
                 "X-Goog-Credential", "Signature", "AWSAccessKeyId", "sig", "token", "access_token",
                 "id_token", "api_key", "apikey", "key", "password", "Policy", "Key-Pair-Id"]


def _any_case(name: str):
    return st.lists(st.booleans(), min_size=len(name), max_size=len(name)).map(
        lambda upper: "".join(c.upper() if u else c.lower() for c, u in zip(name, upper, strict=True)))


@st.composite
def signed_urls(draw) -> tuple[str, list[str]]:
    """A URL with a credential, and the secret strings that must never show."""
    scheme = draw(st.sampled_from(["https", "http", "s3", "gs", "ftp"]))
    host, path = draw(hosts), draw(paths)
    if draw(st.booleans()):  # userinfo: a password, maybe with unencoded / ? # @ : in it
        first, second = draw(secrets), draw(secrets)
        joint = draw(st.sampled_from(["", "/", "?", "#", "@", ":", "%40"]))
        user = draw(st.sampled_from(["user", "AKIAX", ""]))
        url = f"{scheme}://{user}:{first}{joint}{second}@{host}{path}"
        hidden = [first, second]
    else:  # a signing parameter in the query or the fragment, with other parameters around it
        secret = draw(secrets)
        name = draw(st.sampled_from(SIGNING_NAMES).flatmap(_any_case))
        before = draw(st.sampled_from(["", "versionId=3&", "X-Amz-Date=20260101T000000Z&"]))
        after = draw(st.sampled_from(["", "&X-Amz-Expires=900", "&sv=2022-11-02&sp=r", "&width=10"]))
        mark = draw(st.sampled_from(["?", "#"]))
        url = f"{scheme}://{host}{path}{mark}{before}{name}={secret}{after}"
        hidden = [secret]
    return url, hidden


def _shown(text: str, hidden: list[str]) -> list[str]:
    return [secret for secret in hidden if secret in text]


@settings(max_examples=300)
@given(signed_urls())
def test_no_form_of_a_location_shows_its_secret(case):
    url, hidden = case
    assert _shown(url, hidden) == hidden  # the secrets are there to hide
    location = Location(url)
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)  # no RedactingFilter: the type alone must keep it out
    logger = logging.getLogger("test_locations.plain")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        logger.warning("reading %s", location)
        logger.warning("reading %r", location)
        logger.warning("reading %s", [location])
    finally:
        logger.removeHandler(handler)
    copy = pickle.loads(pickle.dumps(location))
    forms = {
        "str": str(location), "repr": repr(location), "format": format(location, ""),
        "f-string": f"{location} {location!r} {location:>200}", "percent": "%s %r" % (location, location),  # noqa: UP031 - the %-form is the case
        "public": location.public, "log": stream.getvalue(), "pickled": f"{copy} {copy!r}",
        "parse error": location.parse_error or "", "exception": str(ValueError(f"cannot read {location}")),
    }
    assert {name: _shown(text, hidden) for name, text in forms.items() if _shown(text, hidden)} == {}
    # The readable form comes back whole, on request, and survives the trip to a worker.
    assert location.reveal_for_read() == url and copy.reveal_for_read() == url
    assert copy == location and hash(copy) == hash(location)
    assert location.is_signed


@settings(max_examples=100)
@given(signed_urls())
def test_what_the_job_builds_from_a_location_shows_no_secret(case):
    """StorageOptions, the job's config and its run record, a listed object, OUTPUT's messages."""
    from clipdiy.output_layout import OutputLayout
    from clipdiy.pipeline.config import LabelJobConfig
    from clipdiy.pipeline.sources.objects import SourceObject
    from clipdiy.storage import StorageOptions

    url, hidden = case
    storage = StorageOptions(endpoint_url=url)
    config = LabelJobConfig(input=url, output=url, storage=storage)
    source = SourceObject(uri=Location(url).public, image_id="x.jpg", signed_uri=url)
    layout = OutputLayout(fs=fsspec.filesystem("memory"), root="/out", uri=url)
    forms = {
        "storage": f"{storage} {storage!r} {storage.describe()} {pickle.loads(pickle.dumps(storage))}",
        "config": f"{config!r} {config.describe()} {config.input} {config.output}",
        "source": f"{source} {source!r} {source.location}",
        "layout": f"{layout.uri} {layout.where('/out/runs/x/_RUN.json')}",
    }
    assert {name: _shown(text, hidden) for name, text in forms.items() if _shown(text, hidden)} == {}
    # What the readers get: the whole location.
    assert storage.storage_options("s3")["endpoint_url"] == url
    assert source.location.reveal_for_read() == url


def test_refusals_about_output_name_it_without_its_credential():
    """A RunConflictError quoted OUTPUT as given (``s3://user:password@...`` included) before
    OUTPUT was a Location."""
    from clipdiy.output_layout import OutputLayout
    from clipdiy.pipeline.planning.manifest import RunConflictError, plan_run

    fs = fsspec.filesystem("memory")
    root = "/refusal-out"
    for run_id in ("run-a", "run-b"):  # two unfinished runs: the job refuses to pick one
        fs.makedirs(f"{root}/runs/{run_id}", exist_ok=True)
        fs.pipe(f"{root}/runs/{run_id}/.keep", b"")
    layout = OutputLayout(fs=fs, root=root, uri="memory://AKIAX:SECRETpass%2Fword@bucket/out?token=SECRETtoken")
    with pytest.raises(RunConflictError) as refused:
        plan_run(layout, None, {})
    assert "several unfinished runs" in str(refused.value)
    assert "SECRET" not in str(refused.value)


def test_an_unparsable_location_is_marked_and_still_hides_its_secret():
    location = Location("https://AKIAX:wJalr/XUtnSECRET@h.example.com/x.jpg")
    assert location.parse_error is not None and "SECRET" not in location.parse_error
    assert location.public == "https://h.example.com/x.jpg"
    assert Location("https://h.example.com/x.jpg").parse_error is None


def test_two_signings_of_one_object_are_two_locations_with_one_public_form():
    first = Location("https://h.example.com/x.jpg?X-Amz-Signature=SECRETone&X-Amz-Date=1")
    again = Location("https://h.example.com/x.jpg?X-Amz-Signature=SECRETtwo&X-Amz-Date=2")
    assert first != again and first.public == again.public == "https://h.example.com/x.jpg"
    assert len({first, again, Location(first.reveal_for_read())}) == 2
    assert not Location("/data/photos/x.jpg").is_signed and not Location("")


#: The modules that may open a location: the listing and manifest reader (a listed object's
#: signed column), the shard listing and reader, and storage (filesystems and reads).
MAY_REVEAL = {
    "clipdiy/locations.py",
    "clipdiy/storage.py",
    "clipdiy/pipeline/sources/objects.py",
    "clipdiy/pipeline/sources/formats.py",
    "clipdiy/pipeline/stages/expand.py",
}


def _revealing_modules() -> set[str]:
    found = set()
    for path in [*(REPOSITORY / "clipdiy").rglob("*.py"), *(REPOSITORY / "jobs").glob("*.py")]:
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            # A call of .reveal_for_read(), or a read of the private value from outside the type.
            if (isinstance(node, ast.Attribute) and node.attr in ("reveal_for_read", "_value")
                    and not (isinstance(node.ctx, ast.Store))):
                found.add(path.relative_to(REPOSITORY).as_posix())
    return found


def test_only_the_listing_the_readers_and_storage_open_a_location():
    revealing = _revealing_modules()
    assert "clipdiy/storage.py" in revealing  # the scan sees the calls it is meant to see
    assert revealing - MAY_REVEAL == set()
