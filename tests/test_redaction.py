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
    from clipdiy.pipeline.listing import iter_sources

    manifest = tmp_path / "list.txt"
    manifest.write_text(
        f"https://h.example.com/a.jpg?X-Amz-Signature={SIG}\n"
        f"https://h.example.com/a.jpg?X-Amz-Signature=resigned\n"  # the same image, signed again
        f"https://user:{PASSWORD}@h.example.com/b.jpg\n"
    )
    sources = list(iter_sources(str(manifest)))
    assert [s.image_id for s in sources] == ["https://h.example.com/a.jpg", "https://h.example.com/b.jpg"]
    assert sources[0].uri.endswith(SIG)  # the listing keeps the signature: it is needed to read


def test_rows_hold_no_credential_in_uri_or_error():
    from clipdiy.pipeline.rows import RowContext, build_rows
    from clipdiy.segmentation.segmenter import Provenance

    signed = f"https://user:{PASSWORD}@h:1/x.jpg?X-Amz-Signature={SIG}&X-Amz-Credential={CRED}"
    batch = pa.table({
        "image_id": ["x.jpg"], "uri": [signed], "source_size": pa.array([None], pa.int64()),
        "source_etag": pa.array([None], pa.string()),
        "source_mtime": pa.array([None], pa.timestamp("us", tz="UTC")),
        "status": ["error"], "error_kind": ["unreadable"], "error": [f"FileNotFoundError: {signed}"],
        "width": pa.array([None], pa.int32()), "height": pa.array([None], pa.int32()),
        "payload": pa.array([None], pa.large_binary()),
    })
    provenance = Provenance("m", "sha256:0", "none", None, "faithful", "voc", "h")
    context = RowContext("run", dt.datetime.now(dt.timezone.utc), provenance, ("background", "cat"))
    (row,) = build_rows(batch, context).to_pylist()
    assert row["uri"] == "https://h:1/x.jpg"
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
    assert f"{base}/missing.jpg" in rows[f"{base}/missing.jpg"]["error"]
    for name in ("img0.jpg", "img1.jpg"):
        row = rows[f"{base}/{name}"]
        assert row["status"] == "ok" and row["uri"] == f"{base}/{name}"
        with urllib.request.urlopen(row["uri"], timeout=10) as response:  # the written uri still fetches
            assert response.read() == (folder / name).read_bytes()
    (run_state,) = output.glob("runs/*/_RUN.json")
    assert json.loads(run_state.read_text())["options"]["segmenter"]["clip"]["checkpoint"] == (
        "https://weights.invalid/clip.pt"
    )
