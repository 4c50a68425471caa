"""The listing under hostile manifests and names (issue 26, section 1 and findings 3, 5).

Invariant: every entry of a manifest (every file of a folder) becomes one listing row that the
pipeline can carry (its Arrow listing builds), or the manifest as a whole gets one clear
:class:`~clipdiy.errors.InputError` naming it; never a crash of another type.
"""

from __future__ import annotations

import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from clipdiy.errors import InputError
from clipdiy.pipeline.planning.incremental import listing_table
from clipdiy.pipeline.sources.listing import iter_sources

names = st.text(alphabet="abcé日 -_.%@:", min_size=1, max_size=8).map(lambda s: s.strip(" ") or "x")
uri_cells = st.one_of(st.none(), names.map(lambda n: n + ".jpg"), st.just(""), st.just("   "),
                      names.map(lambda n: f"https://h.example/{n}.jpg?sig=S"), st.integers(-5, 5),
                      st.just("s3://b/a//x.jpg"), st.just("https://u:p/w@h/x.jpg"))
size_columns = st.sampled_from([
    (pa.int64(), st.one_of(st.none(), st.integers(-(2**63), 2**63 - 1))),
    (pa.float64(), st.one_of(st.none(), st.floats(allow_nan=True, allow_infinity=True))),
    (pa.string(), st.one_of(st.none(), st.text(max_size=6), st.integers(0, 10**6).map(str))),
    (pa.uint64(), st.one_of(st.none(), st.integers(0, 2**64 - 1))),
])
mtime_columns = st.sampled_from([
    (pa.int64(), st.one_of(st.none(), st.integers(-(2**63), 2**63 - 1), st.just(10**18))),
    (pa.float64(), st.one_of(st.none(), st.floats(allow_nan=True, allow_infinity=True))),
    (pa.string(), st.one_of(st.none(), st.text(max_size=12), st.just("2026-01-01T00:00:00Z"), st.just("99999-01-01"))),
    (pa.timestamp("s"), st.one_of(st.none(), st.integers(-(2**62), 2**62))),
    (pa.timestamp("ns", tz="UTC"), st.one_of(st.none(), st.integers(-(2**63) + 1, 2**63 - 1))),
])


def _listed_or_refused(path) -> list | None:
    try:
        sources = list(iter_sources(str(path), unique=False))
    except InputError as error:
        assert str(path.name) in str(error)
        return None
    listing_table(sources)  # the pipeline's Arrow listing of them builds (ArrowInvalid before)
    for source in sources:
        source.image_id.encode("utf-8")
        source.uri.encode("utf-8")
    return sources


@settings(max_examples=150)
@given(data=st.data())
def test_a_parquet_manifest_of_any_cells_lists_one_row_per_entry(tmp_path_factory, data):
    rows = data.draw(st.integers(1, 6))
    uris = data.draw(st.lists(uri_cells, min_size=rows, max_size=rows))
    columns = {"uri": pa.array([None if u is None else str(u) for u in uris], pa.string())}
    for name, strategy in (("size", size_columns), ("mtime", mtime_columns)):
        if data.draw(st.booleans()):
            kind, cells = data.draw(strategy)
            values = data.draw(st.lists(cells, min_size=rows, max_size=rows))
            columns[name] = pa.array(values, kind)
    if data.draw(st.booleans()):
        columns["etag"] = pa.array(data.draw(st.lists(st.one_of(st.none(), st.text(max_size=5)), min_size=rows,
                                                      max_size=rows)), pa.string())
    path = tmp_path_factory.mktemp("m") / "list.parquet"
    pq.write_table(pa.table(columns), path)
    sources = _listed_or_refused(path)
    assert sources is not None
    expected = sum(1 for u in uris if u is not None and str(u).strip())
    assert len(sources) == expected
    for source in sources:
        assert source.size is None or 0 <= source.size < 2**63
        assert source.mtime is None or source.mtime.tzinfo is not None


@settings(max_examples=150)
@given(lines=st.lists(st.one_of(st.binary(max_size=12), names.map(lambda n: (n + ".jpg").encode("utf-8"))),
                      min_size=1, max_size=8))
def test_a_text_manifest_of_any_bytes_lists_one_row_per_entry(tmp_path_factory, lines):
    """Finding 3: one byte that is not UTF-8 crashed the listing (UnicodeDecodeError)."""
    lines = [line.replace(b"\n", b"").replace(b"\r", b"") for line in lines]
    path = tmp_path_factory.mktemp("m") / "list.txt"
    path.write_bytes(b"\n".join(lines) + b"\n")
    sources = _listed_or_refused(path)
    assert sources is not None
    expected = [line for line in lines if line.strip() and not line.strip().startswith(b"#")]
    # Independent count: bytes.strip() strips ASCII white space as str.strip() does for it; a
    # line of other Unicode white space only (U+3000...) is blank too.
    expected = [line for line in expected if line.decode("utf-8", "backslashreplace").strip()]
    assert len(sources) == len(expected)


@settings(max_examples=40)
@given(raw=st.lists(st.binary(min_size=1, max_size=6).filter(lambda b: b"/" not in b and b"\0" not in b
                                                               and b not in (b".", b"..") and not b.startswith(b".")),
                    min_size=1, max_size=5, unique=True))
def test_local_files_whose_names_are_not_utf8_are_listed_and_read(tmp_path_factory, raw):
    """Finding 3: a local file name that is not UTF-8 crashed the run (UnicodeEncodeError). Each
    is one row, with a writable id that stays apart from the others, and is read by its bytes."""
    from clipdiy.pipeline.stages.decode import DecodeBatch

    folder = tmp_path_factory.mktemp("names")
    contents = {}
    for i, name in enumerate(raw):
        full = os.path.join(os.fsencode(folder), name + b".jpg")
        with open(full, "wb") as handle:
            handle.write(b"photo %d" % i)
        contents[name + b".jpg"] = b"photo %d" % i
    sources = _listed_or_refused(folder)
    assert len(sources) == len(raw) and len({s.image_id for s in sources}) == len(raw)
    decode = DecodeBatch(None, "faithful", 10**8, 1)
    read = sorted(decode._read(s.location) for s in sources)
    assert read == sorted(contents.values())


def test_wrong_files_are_one_clear_error_naming_the_manifest(tmp_path):
    bad = tmp_path / "list.parquet"
    bad.write_bytes(b"PAR1 not parquet at all")
    with pytest.raises(InputError, match="list.parquet"):
        list(iter_sources(str(bad)))


def test_s3_relative_entries_are_keys_as_written(s3_server, s3_bucket):
    """Finding 5: ``a//x.jpg`` was normalised to ``a/x.jpg`` (another object), the two merged."""
    from clipdiy.storage import open_filesystem, read_bytes

    s3_server.put_bytes(s3_bucket, "m/a//x.jpg", b"double")
    s3_server.put_bytes(s3_bucket, "m/a/x.jpg", b"single")
    s3_server.put_bytes(s3_bucket, "m/a/../x.jpg", b"dots")
    s3_server.put_bytes(s3_bucket, "m/list.txt", b"a//x.jpg\na/x.jpg\na/../x.jpg\n./a/x.jpg\n")
    sources = list(iter_sources(f"s3://{s3_bucket}/m/list.txt", s3_server.options, unique=False))
    assert [s.image_id for s in sources] == ["a//x.jpg", "a/x.jpg", "a/../x.jpg", "a/x.jpg"]
    fs, _ = open_filesystem(f"s3://{s3_bucket}", s3_server.options)
    assert [read_bytes(fs, s.uri, deadline_s=10) for s in sources] == [b"double", b"single", b"dots", b"single"]
