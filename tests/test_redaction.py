"""No credential is written or logged: presigned query strings and ``user:pass@`` are removed from
every URI in rows, _RUN.json, _MANIFEST.json, logs and messages, while the written URI still
fetches the image from a store that needs no signature."""

from __future__ import annotations

import datetime as dt
import functools
import http.server
import json
import os
import shutil
import subprocess
import sys
import threading
import urllib.request
from pathlib import Path

import pyarrow as pa
import pytest
from PIL import Image
from pipeline_support import LABEL_SCRIPT, REPO_ROOT

from clipdiy.uris import redact_document, redact_text, redact_uri

# Distinct secrets, so a leak names where it came from.
SIG = "sigSECRETq81z"
CRED = "credSECRETw27x"
TOKEN = "tokSECRETe55v"
PASSWORD = "passSECRETr09u"
CKPT_SIG = "ckptSIGSECRETt64y"
CKPT_PASSWORD = "ckptPASSSECRETk13m"
CONFIG_TOKEN = "cfgTOKENSECRETj72n"
SECRETS = (SIG, CRED, TOKEN, PASSWORD, CKPT_SIG, CKPT_PASSWORD, CONFIG_TOKEN)


@pytest.mark.parametrize("uri, expected", [
    # AWS SigV4 presigned URL, user:pass in the authority
    (f"https://user:{PASSWORD}@s3.example.com:9000/b/k.jpg?X-Amz-Algorithm=AWS4-HMAC-SHA256"
     f"&X-Amz-Credential={CRED}%2F20260101&X-Amz-Date=20260101T000000Z&X-Amz-Expires=3600"
     f"&X-Amz-SignedHeaders=host&X-Amz-Security-Token={TOKEN}&X-Amz-Signature={SIG}",
     "https://s3.example.com:9000/b/k.jpg"),
    (f"https://storage.googleapis.com/b/k.png?X-Goog-Algorithm=GOOG4-RSA-SHA256&X-Goog-Signature={SIG}",
     "https://storage.googleapis.com/b/k.png"),
    (f"https://acct.blob.core.windows.net/c/k.jpg?sv=2024-01-01&se=2026-01-01&sp=r&sig={SIG}",
     "https://acct.blob.core.windows.net/c/k.jpg"),
    (f"https://cdn.example.com/k.jpg?Expires=1&Signature={SIG}&Key-Pair-Id=K2", "https://cdn.example.com/k.jpg"),
    (f"https://h.example.com/k.jpg?token={TOKEN}", "https://h.example.com/k.jpg"),
    (f"https://h.example.com/k.jpg#access_token={TOKEN}", "https://h.example.com/k.jpg"),
    (f"http://{TOKEN}@h.example.com/k.jpg", "http://h.example.com/k.jpg"),
    (f"s3://bucket/key.jpg?X-Amz-Signature={SIG}", "s3://bucket/key.jpg"),
    # nothing secret: unchanged, so the URI still fetches
    ("https://h.example.com/k.jpg?versionId=3&w=640", "https://h.example.com/k.jpg?versionId=3&w=640"),
    # only the credential parameters go (by name), the others stay, in their order and spelling
    (f"https://b.s3.amazonaws.com/k.jpg?versionId=3&X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential={CRED}"
     f"&X-Amz-Date=20260101T000000Z&X-Amz-Expires=60&X-Amz-SignedHeaders=host&X-Amz-Signature={SIG}&x-id=GetObject",
     "https://b.s3.amazonaws.com/k.jpg?versionId=3&x-id=GetObject"),
    (f"http://h:9000/b/k.jpg?versionId=V%2B1&AWSAccessKeyId=AKIA1&Signature={SIG}%3D&Expires=1796617781",
     "http://h:9000/b/k.jpg?versionId=V%2B1"),
    ("https://drive.google.com/uc?id=1&resourcekey=K&export=download",
     "https://drive.google.com/uc?id=1&resourcekey=K&export=download"),
    (f"https://maps.example.com/static?center=1,2&key={TOKEN}", "https://maps.example.com/static?center=1,2"),
    (f"https://a.blob.core.windows.net/c/k.jpg?snapshot=2&sv=1&st=2&se=3&sp=r&sr=b&sig={SIG}",
     "https://a.blob.core.windows.net/c/k.jpg?snapshot=2"),
    ("https://h.example.com/k.jpg?sp=r&st=2&se=3", "https://h.example.com/k.jpg?sp=r&st=2&se=3"),  # no SAS: kept
    ("https://h.example.com/k.jpg#page=2", "https://h.example.com/k.jpg#page=2"),
    ("s3://bucket/photos/a b.jpg", "s3://bucket/photos/a b.jpg"),
    ("/data/photos/x.jpg", "/data/photos/x.jpg"),
    ("file:///data/photos/x.jpg", "file:///data/photos/x.jpg"),
    (None, None),
])
def test_redact_uri(uri, expected):
    assert redact_uri(uri) == expected
    assert redact_uri(expected) == expected  # idempotent


def test_redact_text_and_documents():
    message = (f"FileNotFoundError: 404, message='Not Found', url='https://user:{PASSWORD}@h:1/x.jpg?"
               f"X-Amz-Signature={SIG}&X-Amz-Credential={CRED}' (the store said X-Amz-Signature={SIG} token={TOKEN})")
    redacted = redact_text(message)
    assert redacted == ("FileNotFoundError: 404, message='Not Found', url='https://h:1/x.jpg' "
                        "(the store said X-Amz-Signature=*** token=***)")
    document = {"a": [message, {"b": f"https://h/c.pt?sig={SIG}"}], "n": 3, "ok": "s3://b/k"}
    assert redact_document(document) == {"a": [redacted, {"b": "https://h/c.pt"}], "n": 3, "ok": "s3://b/k"}


def test_run_documents_and_options_hold_no_credential(tmp_path):
    from clipdiy.segmentation.config import ClipConfig, SegmenterConfig
    from clipdiy.pipeline.config import LabelJobConfig
    from clipdiy.output_layout import OutputLayout

    config = LabelJobConfig(
        input=f"https://h/list.txt?X-Amz-Signature={SIG}",
        output=str(tmp_path / "out"),
        segmenter=SegmenterConfig(clip=ClipConfig(
            checkpoint=f"https://u:{CKPT_PASSWORD}@h/c.pt?X-Amz-Signature={CKPT_SIG}",
            model_config=f"https://h/m.json?token={CONFIG_TOKEN}",
        )),
    )
    options = config.describe()
    assert options["segmenter"]["clip"]["checkpoint"] == "https://h/c.pt"
    assert options["segmenter"]["clip"]["model_config"] == "https://h/m.json"
    assert options["input"] == "https://h/list.txt"
    layout = OutputLayout.open(str(tmp_path / "out"))
    layout.write_json_atomic(layout.path("doc.json"), {"raw": config.segmenter.clip.checkpoint})
    text = Path(layout.path("doc.json")).read_text()
    assert json.loads(text) == {"raw": "https://h/c.pt"}


def test_manifest_ids_of_presigned_urls_hold_no_signature_and_survive_re_signing(tmp_path):
    from clipdiy.pipeline.sources.listing import iter_sources

    manifest = tmp_path / "list.txt"
    manifest.write_text(
        f"https://h.example.com/a.jpg?X-Amz-Signature={SIG}\n"
        f"https://h.example.com/a.jpg?X-Amz-Signature=resigned\n"  # the same image, signed again
        f"https://user:{PASSWORD}@h.example.com/b.jpg\n"
    )
    sources = list(iter_sources(str(manifest)))
    assert [s.image_id for s in sources] == ["https://h.example.com/a.jpg", "https://h.example.com/b.jpg"]
    # The listing keeps the signature, needed to read, in signed_uri only.
    assert sources[0].uri == sources[0].image_id and sources[0].signed_uri.reveal_for_read().endswith(SIG)


def test_redaction_never_merges_two_images_and_an_unparsable_url_is_no_id(tmp_path):
    """Issue 18 item 5: ids of manifest entries that differ in a parameter that is not a
    credential stay two ids (today's rule dropped the whole query of a URL with any parameter
    whose name contained "key", "sig", "token"...); an unparsable URL keeps its path in its id."""
    from clipdiy.pipeline.sources.listing import iter_sources

    manifest = tmp_path / "list.txt"
    manifest.write_text(
        "https://drive.example.com/uc?id=1&resourcekey=K\n"
        "https://drive.example.com/uc?id=2&resourcekey=K\n"
        f"https://h.example.com/a.jpg?versionId=1&X-Amz-Signature={SIG}\n"
        f"https://h.example.com/a.jpg?versionId=2&X-Amz-Signature={SIG}\n"
        f"http://user:{PASSWORD}@[::1/b.jpg?X-Amz-Security-Token={TOKEN}&w=2\n"
    )
    sources = list(iter_sources(str(manifest)))
    assert [s.image_id for s in sources] == [
        "https://drive.example.com/uc?id=1&resourcekey=K", "https://drive.example.com/uc?id=2&resourcekey=K",
        "https://h.example.com/a.jpg?versionId=1", "https://h.example.com/a.jpg?versionId=2",
        "http://[::1/b.jpg?w=2",
    ]
    assert [s.uri for s in sources] == [s.image_id for s in sources]
    # The readable location is only in signed_uri, which no repr shows.
    assert [s.signed_uri is not None for s in sources] == [False, False, True, True, True]
    assert all(secret not in repr(s) for s in sources for secret in SECRETS)


def test_rows_hold_no_credential_in_uri_or_error():
    from clipdiy.pipeline.stages.rows import RowContext, build_rows
    from clipdiy.segmentation.segmenter import Provenance

    signed = f"https://user:{PASSWORD}@h:1/x.jpg?X-Amz-Signature={SIG}&X-Amz-Credential={CRED}"
    # The listing's uri holds no credential (by construction); a library's message may quote the
    # signed location, and the signed_uri column, if any is left, is never a row's.
    batch = pa.table({
        "image_id": ["x.jpg"], "uri": ["https://h:1/x.jpg"], "signed_uri": [signed],
        "source_size": pa.array([None], pa.int64()),
        "source_etag": pa.array([None], pa.string()),
        "source_mtime": pa.array([None], pa.timestamp("us", tz="UTC")),
        "status": ["error"], "error_kind": ["unreadable"], "error": [f"FileNotFoundError: {signed}"],
        "width": pa.array([None], pa.int32()), "height": pa.array([None], pa.int32()),
        "payload": pa.array([None], pa.large_binary()),
    })
    provenance = Provenance("m", "sha256:0", "none", None, "faithful", "voc", "h")
    context = RowContext("run", dt.datetime.now(dt.timezone.utc), provenance, ("background", "cat"))
    (row,) = build_rows(batch, context).to_pylist()
    assert row["uri"] == "https://h:1/x.jpg" and "signed_uri" not in row
    assert row["error"] == "FileNotFoundError: https://h:1/x.jpg"


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    """Serves a folder; ignores query strings and credentials like a public bucket would."""

    def log_message(self, *args):
        pass


@pytest.fixture
def http_images(tmp_path, coco_images):
    folder = tmp_path / "served"
    folder.mkdir()
    for index, path in enumerate(coco_images[:2]):
        shutil.copy(path, folder / f"img{index}.jpg")
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(QuietHandler, directory=str(folder)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield folder, f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def every_written_text(output: Path) -> str:
    """Every file under OUTPUT, raw, plus each Parquet file's rows as text (a compressed column
    could hide a string from a byte search)."""
    import pyarrow.parquet as pq

    parts = []
    for path in sorted(p for p in output.rglob("*") if p.is_file()):
        parts.append(path.name)
        parts.append(path.read_bytes().decode("latin-1"))
        if path.suffix == ".parquet":
            parts.append(json.dumps(pq.read_table(path).drop_columns(["saliency_png"]).to_pylist(), default=str))
    return "\n".join(parts)


@pytest.mark.slow
def test_a_job_on_presigned_urls_writes_and_logs_no_signature(http_images, tiny_clip_config, tmp_path):
    folder, base = http_images
    manifest = tmp_path / "inputs.txt"
    manifest.write_text(
        f"{base}/img0.jpg?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential={CRED}&X-Amz-Signature={SIG}\n"
        f"http://user:{PASSWORD}@{base.removeprefix('http://')}/img1.jpg\n"
        f"{base}/missing.jpg?X-Amz-Security-Token={TOKEN}&X-Amz-Signature={SIG}\n"
    )
    # Weights behind signed URLs, already in the weights cache (the test never reaches a network).
    from clipdiy.segmentation.weights import cache_path

    cache = tmp_path / "cache"
    checkpoint = f"https://reader:{CKPT_PASSWORD}@weights.invalid/clip.pt?X-Amz-Signature={CKPT_SIG}"
    model_config = f"https://weights.invalid/{Path(tiny_clip_config.model_config).name}?token={CONFIG_TOKEN}"
    for source, local in ((checkpoint, tiny_clip_config.checkpoint), (model_config, tiny_clip_config.model_config)):
        target = cache_path(source, cache)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(local, target)

    output = tmp_path / "labels"
    args = [sys.executable, str(LABEL_SCRIPT), "--input", str(manifest), "--output", str(output),
            "--clip-model", tiny_clip_config.model, "--clip-checkpoint", checkpoint,
            "--clip-model-config", model_config, "--saliency", "none", "--num-cpus", "2", "--log-every", "1",
            "--batch-size", "2", "--decode-batch-size", "2", "--crop-batch-size", "64"]
    env = dict(os.environ, HF_HUB_OFFLINE="1", CLIPDIY_CACHE=str(cache))
    env.pop("RAY_ADDRESS", None)
    result = subprocess.run(args, capture_output=True, text=True, timeout=600, env=env, cwd=REPO_ROOT, check=False)
    assert result.returncode == 0, result.stderr[-3000:]

    written = every_written_text(output)
    shown = result.stdout + result.stderr
    for secret in SECRETS:
        assert secret not in written, f"{secret} written under OUTPUT"
        assert secret not in shown, f"{secret} in the job's output"
    assert "X-Amz-Signature" not in written

    from pipeline_support import read_all_rows

    rows = {row["image_id"]: row for row in read_all_rows(output).to_pylist()}
    assert sorted(rows) == [f"{base}/img0.jpg", f"{base}/img1.jpg", f"{base}/missing.jpg"]
    assert rows[f"{base}/missing.jpg"]["status"] == "error"
    # The error says what happened (type, status), never a library's text quoting the location.
    assert rows[f"{base}/missing.jpg"]["error"] == "cannot read the object: FileNotFoundError (HTTP 404, ENOENT)"
    for name in ("img0.jpg", "img1.jpg"):
        row = rows[f"{base}/{name}"]
        assert row["status"] == "ok" and row["uri"] == f"{base}/{name}"
        with urllib.request.urlopen(row["uri"], timeout=10) as response:  # the written uri still fetches
            assert response.read() == (folder / name).read_bytes()
    (run_state,) = output.glob("runs/*/_RUN.json")
    assert json.loads(run_state.read_text())["options"]["segmenter"]["clip"]["checkpoint"] == (
        "https://weights.invalid/clip.pt"
    )


class OutputWatch:
    """Reads every file under a folder again and again (a daemon thread) while a job writes it,
    and records every file in which one of ``secrets`` appears: raw bytes, and the rows of each
    complete Parquet file as text (compression could hide a string from a byte search)."""

    def __init__(self, root: Path, secrets: set[str]):
        self.root, self.secrets = root, secrets
        self.leaks: dict[str, str] = {}
        self.files: set[str] = set()
        self.scans = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc_info):
        self._stop.set()
        self._thread.join(timeout=60)
        self.scan()

    def _run(self):
        while not self._stop.wait(0.05):
            self.scan()

    def scan(self):
        import pyarrow.parquet as pq

        from clipdiy.output_layout import TEMP_PREFIX

        for path in sorted(self.root.rglob("*")):
            try:
                data = path.read_bytes()
            except (FileNotFoundError, IsADirectoryError):  # renamed or removed since listed; a folder
                continue
            relative = path.relative_to(self.root).as_posix()
            self.files.add(relative)
            texts = [data.decode("latin-1")]
            if path.suffix == ".parquet" and not path.name.startswith(TEMP_PREFIX):  # written atomically: whole
                texts.append(json.dumps(pq.read_table(pa.BufferReader(data)).to_pylist(), default=str))
            for secret in self.secrets:
                if any(secret in text for text in texts):
                    self.leaks.setdefault(relative, secret)
        self.scans += 1


def _presigned_secrets(url: str) -> set[str]:
    """The credential values of a presigned URL, as written in it and decoded."""
    from urllib.parse import parse_qsl, urlsplit

    values = set()
    for pair in urlsplit(url).query.split("&"):
        name, _, value = pair.partition("=")
        if name.lower() in {"signature", "x-amz-signature", "x-amz-credential", "awsaccesskeyid"}:
            values.add(value)
    values |= {value for name, value in parse_qsl(urlsplit(url).query)
               if name.lower() in {"signature", "x-amz-signature", "x-amz-credential", "awsaccesskeyid"}}
    return values


def _descendants(pid: int) -> list[int]:
    """The process ids below ``pid`` (from /proc), children first."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (FileNotFoundError, ProcessLookupError, IndexError):  # the process ended meanwhile
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


@pytest.mark.slow
def test_presigned_s3_urls_keep_distinct_ids_and_no_file_under_output_ever_holds_a_credential(
    s3_server, s3_bucket, coco_images, tiny_clip_config, tmp_path, monkeypatch
):
    """Issue 18 item 5, through the real job on moto S3's presigned URLs (SigV4 and SigV2):
    two versions of one key, whose URLs differ only in versionId, are two rows; every file
    under OUTPUT, polled while a first run streams and while a second (incremental) run plans
    into _PLAN and reads, and what a SIGKILL of that run leaves, holds no signature or key id."""
    import signal

    import boto3
    from botocore.config import Config
    from moto.s3.responses import S3Response
    from s3_server import DUMMY_KEY_ID, DUMMY_SECRET

    sigv4 = boto3.client("s3", endpoint_url=s3_server.endpoint_url, config=Config(signature_version="s3v4"))
    sigv2 = boto3.client("s3", endpoint_url=s3_server.endpoint_url)
    sigv4.put_bucket_versioning(Bucket=s3_bucket, VersioningConfiguration={"Status": "Enabled"})
    version = [sigv4.put_object(Bucket=s3_bucket, Key="photo.jpg", Body=coco_images[i].read_bytes())["VersionId"]
               for i in (0, 1)]
    for index, name in ((2, "img2.jpg"), (3, "img3.jpg"), (4, "new4.jpg"), (5, "new5.jpg")):
        s3_server.put_bytes(s3_bucket, name, coco_images[index].read_bytes())

    def sign():
        urls = [sigv4.generate_presigned_url("get_object", Params={"Bucket": s3_bucket, "Key": "photo.jpg",
                                                                   "VersionId": version[0]}, ExpiresIn=3600),
                sigv2.generate_presigned_url("get_object", Params={"Bucket": s3_bucket, "Key": "photo.jpg",
                                                                   "VersionId": version[1]}, ExpiresIn=3600)]
        for client, name in ((sigv4, "img2.jpg"), (sigv2, "img3.jpg"), (sigv4, "new4.jpg"), (sigv2, "new5.jpg")):
            urls.append(client.generate_presigned_url("get_object", Params={"Bucket": s3_bucket, "Key": name},
                                                      ExpiresIn=3600))
        return urls

    first_urls = sign()
    secrets = {DUMMY_KEY_ID, DUMMY_SECRET}.union(*map(_presigned_secrets, first_urls))
    assert "X-Amz-Signature=" in first_urls[0] and "Signature=" in first_urls[1] and len(secrets) >= 8
    manifest = tmp_path / "inputs.txt"
    manifest.write_text("\n".join(first_urls[:4]) + "\n")
    output = tmp_path / "labels"
    args = [sys.executable, str(LABEL_SCRIPT), "--input", str(manifest), "--output", str(output),
            "--clip-model", tiny_clip_config.model, "--clip-checkpoint", str(tiny_clip_config.checkpoint),
            "--saliency", "none", "--num-cpus", "2", "--log-every", "1", "--batch-size", "2",
            "--decode-batch-size", "2", "--crop-batch-size", "64", "--rows-per-file", "2"]
    if tiny_clip_config.model_config:
        args += ["--clip-model-config", str(tiny_clip_config.model_config)]
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    env.pop("RAY_ADDRESS", None)

    # The second run's read of new5.jpg waits until the test has killed the job.
    reached, release = threading.Event(), threading.Event()
    answer = S3Response._key_response_get

    def hold_new5(self, query, key_name):
        if self.bucket_name == s3_bucket and key_name == "new5.jpg":
            reached.set()
            release.wait(timeout=600)
        return answer(self, query, key_name)

    monkeypatch.setattr(S3Response, "_key_response_get", hold_new5)
    logs = tmp_path / "job.log"
    with OutputWatch(output, secrets) as watch:
        first = subprocess.run(args, capture_output=True, text=True, timeout=600, env=env, cwd=REPO_ROOT, check=False)
        assert first.returncode == 0, first.stderr[-3000:]
        assert not any(secret in first.stdout + first.stderr for secret in secrets)

        from pipeline_support import read_all_rows

        base = f"{s3_server.endpoint_url}/{s3_bucket}"
        rows = {row["image_id"]: row for row in read_all_rows(output).to_pylist()}
        assert sorted(rows) == sorted([f"{base}/photo.jpg?versionId={version[0]}",
                                       f"{base}/photo.jpg?versionId={version[1]}", f"{base}/img2.jpg",
                                       f"{base}/img3.jpg"])
        for index, image_id in enumerate(sorted(rows)[2:]):  # the two versions, by version id
            row = rows[image_id]
            with Image.open(coco_images[version.index(image_id.rsplit("=", 1)[1])]) as image:
                assert (row["status"], row["width"], row["height"]) == ("ok", *image.size)

        # The next night: every URL signed again, two new images; the run is killed mid-read.
        second_urls = sign()
        secrets |= set().union(*map(_presigned_secrets, second_urls))
        manifest.write_text("\n".join(second_urls) + "\n")
        with logs.open("w") as log:
            job = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO_ROOT,
                                   start_new_session=True)
            try:
                assert reached.wait(timeout=600), "the second run never read new5.jpg"
                watch.scan()
                processes = [job.pid, *_descendants(job.pid)]
                for pid in processes:
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                job.wait(timeout=60)
            finally:
                release.set()
                if job.poll() is None:
                    job.kill()
                    job.wait(timeout=60)
        assert job.returncode == -signal.SIGKILL
    assert not watch.leaks, f"credentials under OUTPUT: {watch.leaks}"
    plans = {name for name in watch.files if "/_PLAN/" in name and name.endswith(".parquet")}
    assert plans, f"the second run wrote no plan file that the watch saw ({watch.scans} scans)"
    assert list(output.glob("runs/*/_PLAN/*/*.parquet")), "a killed run leaves its plan files"
    assert not any(secret in logs.read_text() for secret in secrets)
