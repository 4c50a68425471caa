"""Storage: listings (prefix, glob, manifests; local and a real moto S3), ids, streaming,
retries, the input pre-flight check, and credentials staying out of reprs, errors and logs."""

from __future__ import annotations

import datetime as dt
import errno
import inspect
import logging
import os
import socket
import time
import types

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from s3_server import DUMMY_KEY_ID, DUMMY_SECRET

from clipdiy.errors import ClipdiyError, InputError
from clipdiy.pipeline.sources import input_check, listing, walks
from clipdiy.pipeline.sources.input_check import check_input_reachable
from clipdiy.pipeline.sources.listing import iter_sources
from clipdiy.pipeline.sources.listing_parts import ListingPart, iter_part_sources, listing_parts
from clipdiy.pipeline.sources.objects import SourceObject
from clipdiy.storage import (
    StorageOptions,
    is_transient,
    open_filesystem,
    read_bytes,
    read_uri,
)

# A tree exercising order ("a-b" sorts before "a/"), case, hidden files and non-images.
TREE = {
    "a-b.jpg": b"ab",
    "a/x.jpg": b"x",
    "a/c.JPEG": b"c",
    "a/b/y.png": b"yy",
    "a/b/notes.txt": b"not an image",
    "a/b/.hidden.jpg": b"hidden",
    ".cache/z.jpg": b"cached",
    "top.webp": b"top",
    "text-named.jpg": b"this is text, the job gives it an error row",
}
IMAGE_IDS = ["a-b.jpg", "a/b/y.png", "a/c.JPEG", "a/x.jpg", "text-named.jpg", "top.webp"]


def make_tree(root, files=TREE):
    for relative, data in files.items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return root


def ids(sources):
    return [s.image_id for s in sources]


# ----------------------------------------------------------------------------- local listings


def test_local_prefix_lists_images_recursively_in_path_order(tmp_path):
    root = make_tree(tmp_path / "in")
    sources = list(iter_sources(str(root)))
    assert ids(sources) == IMAGE_IDS
    by_id = {s.image_id: s for s in sources}
    x = by_id["a/x.jpg"]
    assert x.uri == "file://" + (root / "a/x.jpg").as_posix()
    assert x.size == 1 and x.etag is None
    assert x.mtime.tzinfo == dt.timezone.utc
    assert abs(x.mtime.timestamp() - (root / "a/x.jpg").stat().st_mtime) < 1e-3
    # file:// URIs and a trailing slash name the same root and give the same ids
    assert ids(iter_sources("file://" + root.as_posix() + "/")) == IMAGE_IDS


def test_local_extension_filter_can_be_widened_or_dropped(tmp_path):
    root = make_tree(tmp_path / "in")
    assert ids(iter_sources(str(root), extensions={".TXT"})) == ["a/b/notes.txt"]
    everything = ids(iter_sources(str(root), extensions=None))
    assert everything == sorted(IMAGE_IDS + ["a/b/notes.txt"])


def test_local_glob_ids_are_relative_to_the_folder_before_the_wildcard(tmp_path):
    root = make_tree(tmp_path / "in")
    assert ids(iter_sources(f"{root}/**/*.jpg")) == ["a-b.jpg", "a/x.jpg", "text-named.jpg"]
    assert ids(iter_sources(f"{root}/a/*")) == ["c.JPEG", "x.jpg"]
    assert ids(iter_sources(f"{root}/a/b/y.pn?")) == ["y.png"]
    assert ids(iter_sources(f"{root}/t*")) == ["text-named.jpg", "top.webp"]


def test_single_file_input_is_one_source(tmp_path):
    root = make_tree(tmp_path / "in")
    assert ids(iter_sources(str(root / "a" / "x.jpg"))) == ["x.jpg"]


def test_text_manifest_resolves_entries_and_keeps_ids_stable(tmp_path):
    root = make_tree(tmp_path / "in")
    outside = make_tree(tmp_path / "other", {"far.jpg": b"far"})
    manifest = root / "list.txt"
    manifest.write_text(
        "# comment\n"
        "a/x.jpg\n"
        "\n"
        f"  {root / 'top.webp'}  \n"
        f"file://{outside / 'far.jpg'}\n"
        "s3://bucket/key.png\n"
        "a/b/notes.txt\n"  # listed explicitly: kept (the job gives it an error row)
    )
    sources = list(iter_sources(str(manifest)))
    assert [(s.image_id, s.uri) for s in sources] == [
        ("a/x.jpg", f"file://{root}/a/x.jpg"),
        ("top.webp", f"file://{root}/top.webp"),
        (f"file://{outside}/far.jpg", f"file://{outside}/far.jpg"),
        ("s3://bucket/key.png", "s3://bucket/key.png"),
        ("a/b/notes.txt", f"file://{root}/a/b/notes.txt"),
    ]
    # Entries are not stat'ed in the driver; describe_source fills size and mtime on demand.
    assert sources[0].size is None
    described = listing.describe_source(sources[0])
    assert described.size == 1 and described.image_id == "a/x.jpg" and described.mtime is not None


def test_an_image_listed_twice_in_a_manifest_is_listed_once(tmp_path, caplog):
    root = make_tree(tmp_path / "in")
    manifest = root / "list.txt"
    manifest.write_text(f"a/x.jpg\ntop.webp\n{root / 'a' / 'x.jpg'}\n./a/x.jpg\ntop.webp\na/b/y.png\n")
    with caplog.at_level("WARNING", logger="clipdiy.pipeline.sources.manifests"):
        ids = [s.image_id for s in iter_sources(str(manifest))]
    assert ids == ["a/x.jpg", "top.webp", "a/b/y.png"]
    assert "lists 3 entries more than once" in caplog.text
    when = dt.datetime(2024, 5, 1, 12, 0, tzinfo=dt.timezone.utc)
    pq.write_table(pa.table({"uri": ["a/x.jpg", "a/x.jpg"], "size": [1, 99],
                             "mtime": pa.array([when, when], pa.timestamp("us", tz="UTC"))}), root / "list.parquet")
    (only,) = iter_sources(str(root / "list.parquet"))
    assert (only.image_id, only.size) == ("a/x.jpg", 1)  # the first entry wins


def test_parquet_manifest_reads_uri_and_optional_metadata(tmp_path):
    root = make_tree(tmp_path / "in")
    when = dt.datetime(2024, 5, 1, 12, 0, tzinfo=dt.timezone.utc)
    table = pa.table({
        "uri": [f"{root}/a/x.jpg", "a/b/y.png", None],
        "size": [1, 2, None],
        "etag": ['"abc"', None, None],
        "mtime": pa.array([when, None, None], pa.timestamp("us", tz="UTC")),
        "ignored": [1, 2, 3],
    })
    pq.write_table(table, root / "list.parquet", row_group_size=1)
    sources = list(iter_sources(str(root / "list.parquet")))
    assert sources == [
        SourceObject(f"file://{root}/a/x.jpg", "a/x.jpg", 1, "abc", when, listing_entry=0),
        SourceObject(f"file://{root}/a/b/y.png", "a/b/y.png", 2, None, None, listing_entry=1),  # the empty uri: no entry
    ]
    pq.write_table(pa.table({"path": ["a/x.jpg"]}), root / "bad.parquet")
    with pytest.raises(InputError, match="no 'uri' column"):
        list(iter_sources(str(root / "bad.parquet")))


# ----------------------------------------------------------------------------- listing in parts

# Deeper folders than TREE: levels of several folders, files at every level, a hidden folder.
DEEP_TREE = {
    **TREE,
    **{f"d{i}/e{j}/{k}.jpg": b"x" for i in range(3) for j in range(3) for k in range(2)},
    **{f"d{i}/f.png": b"f" for i in range(3)},
    "d1/e1/g/h/deep.jpg": b"deep",
    "d2/.hidden/no.jpg": b"hidden",
}


def _parts_listing(input_uri, options=None, **split):
    parts = list(listing_parts(input_uri, options, **split))
    return parts, [s for part in parts for s in iter_part_sources(input_uri, part, options)]


@pytest.mark.parametrize("min_parts, max_depth", [(1, 1), (2, 2), (4, 3), (100, 3), (100, 1)])
def test_listing_parts_together_list_each_object_once(tmp_path, min_parts, max_depth):
    root = str(make_tree(tmp_path / "in", DEEP_TREE))
    parts, sources = _parts_listing(root, min_parts=min_parts, max_depth=max_depth)
    expected = list(iter_sources(root))
    assert sorted(sources, key=lambda s: s.image_id) == expected  # same ids, URIs, sizes, mtimes
    assert len(parts) > 1 and any(not p.recursive for p in parts)
    assert len({(p.folder, p.recursive) for p in parts}) == len(parts)


def test_inputs_that_cannot_be_split_are_one_part(tmp_path):
    root = make_tree(tmp_path / "in", {"a.jpg": b"a", "b.jpg": b"b"})
    (root / "list.txt").write_text("a.jpg\nb.jpg\n")
    for uri in (str(root), str(root / "a.jpg"), str(root) + "/*.jpg", str(root / "list.txt")):
        parts, sources = _parts_listing(uri, min_parts=1)
        assert parts == [ListingPart()]
        assert sources == list(iter_sources(uri))


def test_s3_listing_parts_match_the_sequential_listing(s3_server, tmp_path, s3_bucket):
    make_tree(tmp_path / "deep", DEEP_TREE)
    s3_server.upload_folder(tmp_path / "deep", s3_bucket, "deep")
    s3_server.put_bytes(s3_bucket, "deep/d0/marker/", b"")  # a folder marker object
    s3_server.put_bytes(s3_bucket, "deep-other/x.jpg", b"not under deep/")
    uri = f"s3://{s3_bucket}/deep"
    for min_parts in (2, 100):  # key ranges: a stretch of more than 4 keys is split
        parts, sources = _parts_listing(uri, s3_server.options, min_parts=min_parts, split_min_keys=4)
        assert sorted(sources, key=lambda s: s.image_id) == list(iter_sources(uri, s3_server.options))
        assert len(parts) > 1


# ----------------------------------------------------------------------------- streaming


def test_listing_is_lazy_and_walks_one_directory_at_a_time(tmp_path, monkeypatch):
    for d in range(5):
        make_tree(tmp_path / "in" / f"d{d}", {f"{i}.jpg": b"x" for i in range(3)})
    scanned = []
    real_scandir = os.scandir

    def counting_scandir(path):
        scanned.append(os.path.basename(path))
        return real_scandir(path)

    monkeypatch.setattr(walks.os, "scandir", counting_scandir)
    sources = iter_sources(str(tmp_path / "in"))
    assert inspect.isgenerator(sources)
    assert scanned == []  # nothing listed before the first item is asked for
    assert next(sources).image_id == "d0/0.jpg"
    assert scanned == ["in", "d0"]
    assert len(list(sources)) == 14
    assert scanned == ["in", "d0", "d1", "d2", "d3", "d4"]


class FakeS3:
    """Just enough of s3fs for the paginated listing: serves sorted keys page by page."""

    protocol = ("s3", "s3a")

    def __init__(self, keys):
        self.req_kw = {}
        self.keys = sorted(keys)
        self.requests = []

    def call_s3(self, method, *extra, **request):
        assert method == "list_objects_v2"
        self.requests.append(dict(request))
        start = int(request.get("ContinuationToken", 0))
        matching = [k for k in self.keys if k.startswith(request["Prefix"])]
        page = matching[start:start + request["MaxKeys"]]
        truncated = start + len(page) < len(matching)
        out = {"Contents": [{"Key": k, "Size": 1, "ETag": '"e"', "LastModified": None} for k in page],
               "IsTruncated": truncated}
        if truncated:
            out["NextContinuationToken"] = str(start + len(page))
        return out


def test_s3_listing_pages_through_the_bucket_one_request_at_a_time(monkeypatch):
    keys = [f"p/{i:04d}.jpg" for i in range(25)] + ["p/sub/", "q/0.jpg"]
    fake = FakeS3(keys)
    monkeypatch.setattr(walks, "S3_PAGE_SIZE", 10)
    walk = walks.walk_files(fake, "b/p", key_stem="b/p/")
    assert fake.requests == []
    assert next(walk)[0] == "b/p/0000.jpg"
    assert len(fake.requests) == 1  # only the first page was fetched
    rest = [path for path, _ in walk]
    assert len(rest) == 24 and "b/p/sub/" not in rest  # folder markers skipped
    assert [r.get("ContinuationToken") for r in fake.requests] == [None, "10", "20"]
    assert all(r["Bucket"] == "b" and r["Prefix"] == "p/" for r in fake.requests)


# ----------------------------------------------------------------------------- retries


class FlakyFS:
    """A filesystem whose reads fail with ``errors`` (in order) before they succeed."""

    def __init__(self, errors, data=b"payload"):
        self.errors = list(errors)
        self.data = data
        self.calls = 0

    def cat_file(self, path):
        self.calls += 1
        if self.errors:
            raise self.errors.pop(0)
        return self.data


def s3_client_error(code, status):
    exc = Exception(f"An error occurred ({code})")
    exc.response = {"Error": {"Code": code}, "ResponseMetadata": {"HTTPStatusCode": status}}
    return exc


@pytest.mark.parametrize("transient", [
    ConnectionResetError(errno.ECONNRESET, "reset by peer"),
    TimeoutError("read timed out"),
    OSError(errno.EREMOTEIO, "InternalError"),  # what s3fs makes of a 500
    s3_client_error("SlowDown", 503),
    s3_client_error("Whatever", 502),
])
def test_read_bytes_retries_transient_errors_then_succeeds(transient):
    fs = FlakyFS([transient, transient])
    assert read_bytes(fs, "bucket/key", attempts=3, backoff=0) == b"payload"
    assert fs.calls == 3


@pytest.mark.parametrize("permanent", [
    FileNotFoundError("bucket/key"),
    PermissionError("AccessDenied"),
    IsADirectoryError("bucket/key"),
    ValueError("bad path"),
    s3_client_error("InvalidRequest", 400),
])
def test_read_bytes_does_not_retry_permanent_errors(permanent):
    fs = FlakyFS([permanent])
    with pytest.raises(type(permanent)):
        read_bytes(fs, "bucket/key", attempts=5, backoff=0)
    assert fs.calls == 1


def test_read_bytes_gives_up_after_the_last_attempt_with_the_last_error():
    fs = FlakyFS([ConnectionResetError("1"), ConnectionResetError("2"), ConnectionResetError("3")])
    with pytest.raises(ConnectionResetError, match="2"):
        read_bytes(fs, "k", attempts=2, backoff=0)
    assert fs.calls == 2


def test_transient_detection_follows_the_cause_chain():
    wrapped = OSError(errno.EIO, "Service Unavailable")
    wrapped.__cause__ = s3_client_error("ServiceUnavailable", 503)
    assert is_transient(wrapped)
    assert not is_transient(OSError(errno.EINVAL, "InvalidArgument"))


def test_read_uri_reads_local_files_and_missing_files_fail_at_once(tmp_path):
    root = make_tree(tmp_path / "in")
    assert read_uri(f"file://{root}/a/b/y.png") == b"yy"
    start = time.monotonic()
    with pytest.raises(FileNotFoundError):
        read_uri(f"file://{root}/missing.jpg", attempts=5, backoff=5)
    assert time.monotonic() - start < 1  # no backoff sleeps


# ----------------------------------------------------------------------------- pre-flight


def test_check_input_reachable_returns_the_first_image(tmp_path):
    root = make_tree(tmp_path / "in")
    assert check_input_reachable(str(root)).image_id == "a-b.jpg"
    assert check_input_reachable(f"{root}/a/*.jpg").image_id == "x.jpg"


@pytest.mark.parametrize("make_input, message", [
    (lambda p: str(p / "missing"), "does not exist"),
    (lambda p: str(p / "missing" / "*.jpg"), "does not exist"),
    (lambda p: str(p / "empty"), "holds no images"),
    (lambda p: str(p / "texts"), "holds no images"),
    (lambda p: str(p / "empty.txt"), "lists no entries"),
])
def test_check_input_reachable_fails_with_one_clear_line(tmp_path, make_input, message):
    (tmp_path / "empty").mkdir()
    make_tree(tmp_path / "texts", {"a.txt": b"x", "b/c.csv": b"y"})
    (tmp_path / "empty.txt").write_text("# nothing listed\n")
    with pytest.raises(InputError, match=message) as info:
        check_input_reachable(make_input(tmp_path))
    assert "\n" not in str(info.value)
    assert isinstance(info.value, ClipdiyError)


def test_check_input_reachable_is_bounded_in_time(monkeypatch):
    monkeypatch.setattr(input_check, "_first_source", lambda *a: time.sleep(30))
    start = time.monotonic()
    with pytest.raises(InputError, match="unreachable.*within 0.5 s"):
        check_input_reachable("/anything", timeout=0.5)
    assert time.monotonic() - start < 5


def test_unreachable_s3_endpoint_fails_fast(monkeypatch):
    with socket.socket() as sock:  # a loopback port with nobody listening
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "x")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "y")
    options = StorageOptions(endpoint_url=f"http://127.0.0.1:{port}")
    start = time.monotonic()
    with pytest.raises(InputError, match="unreachable"):
        check_input_reachable("s3://bucket/prefix", options, timeout=30)
    assert time.monotonic() - start < 30


def test_missing_fsspec_backend_names_the_package():
    try:
        import gcsfs  # noqa: F401
    except ImportError:
        with pytest.raises(InputError, match="pip install gcsfs"):
            open_filesystem("gs://bucket/prefix")
    else:
        pytest.skip("gcsfs is installed")


# ----------------------------------------------------------------------------- options


def test_storage_options_from_env_and_overrides():
    env = {"AWS_ENDPOINT_URL": "http://generic:1", "AWS_ENDPOINT_URL_S3": "http://s3:2",
           "AWS_PROFILE": "team", "AWS_DEFAULT_REGION": "eu-west-1", "CLIPDIY_S3_ANON": "yes",
           "AWS_SECRET_ACCESS_KEY": "sekrit"}
    options = StorageOptions.from_env(env)
    assert options == StorageOptions(endpoint_url="http://s3:2", anon=True, profile="team",
                                     region="eu-west-1")
    assert StorageOptions.from_env(env, anon=False, endpoint_url=None).anon is False
    assert StorageOptions.from_env({}) == StorageOptions()
    with pytest.raises(TypeError):
        StorageOptions.from_env({}, secret="x")
    s3 = StorageOptions(endpoint_url="http://s3:2", profile="team", region="eu-west-1").storage_options("s3")
    assert s3["endpoint_url"] == "http://s3:2" and s3["profile"] == "team"
    assert s3["client_kwargs"] == {"region_name": "eu-west-1"}
    assert not {"key", "secret", "token"} & set(s3)
    assert StorageOptions().storage_options("file") == {}


def test_storage_options_repr_hides_userinfo_in_the_endpoint():
    options = StorageOptions(endpoint_url="https://user:hunter2@minio.local:9000/")
    assert "hunter2" not in repr(options) and "user" not in str(options)
    assert "minio.local:9000" in repr(options)
    assert "hunter2" not in str(options.describe())


# ----------------------------------------------------------------------------- moto S3


@pytest.fixture
def s3_tree(tmp_path, s3_server, s3_bucket):
    make_tree(tmp_path / "in")
    s3_server.upload_folder(tmp_path / "in", s3_bucket, "imgs")
    s3_server.put_bytes(s3_bucket, "imgs/folder-marker/", b"")
    s3_server.put_bytes(s3_bucket, "imgs-other/x.jpg", b"not under imgs/")
    return f"s3://{s3_bucket}/imgs"


def test_s3_prefix_listing_matches_the_local_one(s3_server, s3_tree, caplog):
    caplog.set_level(logging.DEBUG)
    options = s3_server.options
    sources = list(iter_sources(s3_tree, options))
    assert ids(sources) == IMAGE_IDS
    x = {s.image_id: s for s in sources}["a/x.jpg"]
    assert x.uri == f"{s3_tree}/a/x.jpg"
    assert x.size == 1
    assert x.etag and '"' not in x.etag
    assert x.mtime.tzinfo == dt.timezone.utc
    assert abs((dt.datetime.now(dt.timezone.utc) - x.mtime).total_seconds()) < 600
    assert ids(iter_sources(s3_tree + "/", options)) == IMAGE_IDS
    assert ids(iter_sources(s3_tree + "/**/*.jpg", options)) == ["a-b.jpg", "a/x.jpg", "text-named.jpg"]
    assert ids(iter_sources(s3_tree + "/a/*", options)) == ["c.JPEG", "x.jpg"]
    assert ids(iter_sources(s3_tree + "/a/x.jpg", options)) == ["x.jpg"]
    # No credential appears in what we print or log, even at DEBUG (botocore included).
    shown = repr(sources) + repr(options) + str(options.describe()) + caplog.text
    assert DUMMY_SECRET not in shown
    assert DUMMY_KEY_ID not in repr(sources) + repr(options) + str(options.describe())


def test_s3_listing_pages_on_a_real_server(s3_server, s3_tree, monkeypatch):
    monkeypatch.setattr(walks, "S3_PAGE_SIZE", 2)
    assert ids(iter_sources(s3_tree, s3_server.options)) == IMAGE_IDS


def test_s3_manifests(s3_server, s3_tree, tmp_path):
    bucket_uri = s3_tree.rsplit("/", 1)[0]
    fs = s3_server.filesystem()
    fs.pipe_file(s3_tree[5:] + "/list.txt", b"a/x.jpg\n/imgs/top.webp\ns3://elsewhere/k.jpg\n")
    sources = list(iter_sources(s3_tree + "/list.txt", s3_server.options))
    assert [(s.image_id, s.uri) for s in sources] == [
        ("a/x.jpg", f"{s3_tree}/a/x.jpg"),
        ("top.webp", f"{bucket_uri}/imgs/top.webp"),
        ("s3://elsewhere/k.jpg", "s3://elsewhere/k.jpg"),
    ]
    pq.write_table(pa.table({"uri": [f"{s3_tree}/a/b/y.png"]}), tmp_path / "m.parquet")
    fs.put_file(str(tmp_path / "m.parquet"), s3_tree[5:] + "/m.parquet")
    assert ids(iter_sources(s3_tree + "/m.parquet", s3_server.options)) == ["a/b/y.png"]


def test_s3_reads_and_missing_objects(s3_server, s3_tree):
    fs, path = open_filesystem(s3_tree + "/a/b/y.png", s3_server.options)
    assert read_bytes(fs, path) == b"yy"
    assert read_uri(s3_tree + "/text-named.jpg", s3_server.options) == TREE["text-named.jpg"]
    calls = []
    real = fs.cat_file
    fs_proxy = types.SimpleNamespace(cat_file=lambda p: calls.append(p) or real(p))
    with pytest.raises(FileNotFoundError):
        read_bytes(fs_proxy, path + ".missing", attempts=4, backoff=0)
    assert len(calls) == 1


def test_s3_check_input_reachable(s3_server, s3_tree):
    options = s3_server.options
    assert check_input_reachable(s3_tree, options).image_id == "a-b.jpg"
    with pytest.raises(InputError, match="does not exist") as missing:
        check_input_reachable("s3://no-such-bucket-clipdiy/x", options)
    with pytest.raises(InputError, match="holds no images"):
        check_input_reachable(s3_tree + "-nothing-here", options)
    with pytest.raises(InputError, match="bucket name"):
        check_input_reachable("s3://no-*/x.jpg", options)
    assert DUMMY_SECRET not in str(missing.value) and DUMMY_KEY_ID not in str(missing.value)
