"""A real S3 endpoint for tests: moto's threaded server on 127.0.0.1, reached through s3fs.

A pytest plugin (``tests/conftest.py`` lists it in ``pytest_plugins``), so any test can ask
for its fixtures::

    def test_x(s3_server, s3_bucket):
        s3_server.upload_folder(local_dir, s3_bucket, "images")
        opts = s3_server.options          # StorageOptions(endpoint_url=...)
        uri = f"s3://{s3_bucket}/images"

``s3_server`` is session-scoped: it starts one moto server on a free loopback port and sets
dummy AWS credentials (:data:`DUMMY_KEY_ID`, :data:`DUMMY_SECRET`) in ``os.environ`` for the
session, so Ray workers started by the tests inherit them; nothing reaches a real AWS endpoint
(instance-metadata lookups are disabled, shared config/credential files point nowhere). Tests
can search their outputs and logs for the dummy secrets to prove credentials never leak.
``s3_bucket`` gives each test a fresh, empty bucket.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from clipdiy.storage import StorageOptions

DUMMY_KEY_ID = "AKIACLIPDIYTESTKEY01"
DUMMY_SECRET = "clipdiy-dummy-secret-NEVER-LOG-ME-0123456789"
DUMMY_ENV = {
    "AWS_ACCESS_KEY_ID": DUMMY_KEY_ID,
    "AWS_SECRET_ACCESS_KEY": DUMMY_SECRET,
    "AWS_SESSION_TOKEN": "",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",
    "AWS_CONFIG_FILE": os.devnull,
    "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
}
# Variables that would point boto at another account or endpoint; unset for the session.
_CLEARED = ("AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3",
            "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "CLIPDIY_S3_ANON")
_bucket_numbers = itertools.count()


@dataclass
class S3Server:
    """A running moto S3 server and helpers to fill it."""

    endpoint_url: str

    @property
    def options(self) -> StorageOptions:
        return StorageOptions(endpoint_url=self.endpoint_url, connect_timeout=5, read_timeout=30)

    def filesystem(self):
        import s3fs

        # A private instance: tests must not share s3fs's listing cache with the code under test.
        return s3fs.S3FileSystem(skip_instance_cache=True, use_listings_cache=False,
                                 **self.options.storage_options("s3"))

    def make_bucket(self, name: str | None = None) -> str:
        name = name or f"clipdiy-test-{os.getpid()}-{next(_bucket_numbers)}"
        self.filesystem().mkdir(name)
        return name

    def upload_folder(self, local_dir: str | os.PathLike, bucket: str, prefix: str = "") -> list[str]:
        """Upload every file below ``local_dir`` to ``s3://bucket/prefix/<relative path>``;
        returns the keys in upload order (sorted relative paths)."""
        fs = self.filesystem()
        root = Path(local_dir)
        keys = []
        for path in sorted(p for p in root.rglob("*") if p.is_file()):
            relative = path.relative_to(root).as_posix()
            key = f"{prefix.strip('/')}/{relative}" if prefix.strip("/") else relative
            fs.pipe_file(f"{bucket}/{key}", path.read_bytes())
            keys.append(key)
        return keys

    def put_bytes(self, bucket: str, key: str, data: bytes) -> None:
        self.filesystem().pipe_file(f"{bucket}/{key}", data)


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    import logging

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one log line per request otherwise
    saved = {k: os.environ.get(k) for k in (*DUMMY_ENV, *_CLEARED)}
    for key in _CLEARED:
        os.environ.pop(key, None)
    os.environ.update({k: v for k, v in DUMMY_ENV.items() if v})
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        yield S3Server(endpoint_url=f"http://{host}:{port}")
    finally:
        server.stop()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@pytest.fixture
def s3_bucket(s3_server: S3Server) -> str:
    return s3_server.make_bucket()
