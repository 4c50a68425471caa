"""The job's invariants (docs/job/invariants.md) under generated corpora, over two nights.

Each example is a generated corpus: real photos, corrupt bytes (a photo truncated or bit-flipped),
zero-byte files, odd file names (spaces, ``#``, ``&``, ``%``, quotes, non-ASCII) in nested folders,
and a text manifest listing them with URLs that carry credentials (userinfo, signing parameters in
any case, tokens) on a closed local port; and a write task killed (SIGKILL) at a generated shard,
before or after its file is renamed into place. The job runs twice (two nights) and:

- each night ends by itself with the documented exit status: night 1 with 0 (every fault here is
  one object's, or a killed process the run recovers from); night 2 reads only the objects whose
  night-1 row was a transient error (the URLs), every one of those reads fails, which the policy
  calls systemic: exit 1, the reading failure in the last line, the run left unfinished (with no
  URL in the corpus, night 2 reads nothing and ends with 0);
- night 1 writes exactly one row per listed object, under the id an independent computation
  gives (the relative path; the URL without its credentials); night 2 writes rows only for the
  objects retried, under the same ids; ids are unique in each run;
- every good photo is ``ok``, every corrupt or empty file an error row of its own;
- no credential of the manifest appears in any byte under OUTPUT (Parquet values read back, not
  its compressed bytes) nor in the job's stdout/stderr.

A few seeded examples (each is two job runs); one Ray for the module.
"""

from __future__ import annotations

import json
import shutil
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from fault_injection import runtime_env, set_writer_killer
from hypothesis import given, settings
from hypothesis import strategies as st
from pipeline_support import cli_args, label_main, local_ray, manifests

pytestmark = pytest.mark.slow

#: Transient error kinds: rows that the next night reads again (--retry-errors transient).
TRANSIENT = {"unreadable", "model"}
_NAME = st.text(st.sampled_from("ab XYZ_-#&%'é漢+=,;@!~()[]"), min_size=1, max_size=8).filter(
    lambda n: n.strip() == n and n not in (".", ".."))


@dataclass
class Corpus:
    """A generated corpus: files written under ``folder``, a manifest naming them and URLs."""

    folder: Path
    lines: list[str] = field(default_factory=list)
    expected: dict[str, str] = field(default_factory=dict)  # image id -> "ok" / "error" / "url"
    secrets: list[str] = field(default_factory=list)


@st.composite
def corpora(draw, photos: list[Path], root: Path) -> Corpus:
    corpus = Corpus(root / f"corpus-{uuid.uuid4().hex[:8]}")
    corpus.folder.mkdir()
    used: set[str] = set()

    def place(suffix: str) -> Path:
        while True:
            parts = draw(st.lists(_NAME, min_size=0, max_size=2)) + [draw(_NAME) + suffix]
            relative = "/".join(parts)
            # Distinct ids, and no file where another needs a folder (case-sensitive disk).
            if relative not in used and not any(u.startswith(relative + "/") or relative.startswith(u + "/")
                                                for u in used):
                used.add(relative)
                path = corpus.folder / relative
                path.parent.mkdir(parents=True, exist_ok=True)
                corpus.lines.append(relative)
                return path

    for photo in draw(st.lists(st.sampled_from(photos), min_size=1, max_size=2, unique=True)):
        shutil.copy(photo, place(".jpg"))
        corpus.expected[corpus.lines[-1]] = "ok"
    for _ in range(draw(st.integers(0, 2))):
        data = photos[0].read_bytes()
        if draw(st.booleans()):
            data = data[:draw(st.integers(1, 600))]  # truncated inside the header
        else:
            data = bytearray(data[:4096])
            for position in draw(st.lists(st.integers(0, 4095), min_size=1, max_size=8)):
                data[position] ^= 0xFF  # bit-flipped header and beginning, then cut
            data = bytes(data[:draw(st.integers(2, 4096))])
        place(draw(st.sampled_from([".jpg", ".png", ".webp"]))).write_bytes(data)
        corpus.expected[corpus.lines[-1]] = "error"
    for _ in range(draw(st.integers(0, 1))):
        place(".jpg").write_bytes(b"")
        corpus.expected[corpus.lines[-1]] = "error"
    for number in range(draw(st.integers(0, 2))):
        secret = f"s3cr3t{uuid.uuid4().hex[:10]}"
        key = f"AKIA{uuid.uuid4().hex[:12].upper()}"
        public = f"http://127.0.0.1:9/remote-{number}/{draw(_NAME).replace('#', '').replace('%', '').replace(' ', '')}.jpg"
        form = draw(st.sampled_from(["userinfo", "signed", "token"]))
        scheme, rest = public.split("://", 1)
        if form == "userinfo":
            line = f"{scheme}://{key}:{secret}@{rest}"
        elif form == "signed":
            casing = draw(st.sampled_from([str.lower, str.upper, lambda s: s]))
            line = (f"{public}?{casing('X-Amz-Credential')}={key}%2F20260501&{casing('X-Amz-Signature')}={secret}"
                    f"&{casing('X-Amz-Security-Token')}={secret}tok")
        else:
            line = f"{public}?token={secret}&sig={secret}sig"
        corpus.lines.append(line)
        corpus.expected[public] = "url"
        corpus.secrets += [secret, key]
    order = draw(st.permutations(range(len(corpus.lines))))
    corpus.lines = [corpus.lines[i] for i in order]
    (corpus.folder / "manifest.txt").write_text("".join(line + "\n" for line in corpus.lines), encoding="utf-8")
    return corpus


@pytest.fixture(scope="module")
def fault_spec(tmp_path_factory):
    return tmp_path_factory.mktemp("invariants") / "fault.json"


@pytest.fixture(scope="module")
def ray_with_faults(fault_spec):
    with local_ray(runtime_env=runtime_env(fault_spec)) as ray:
        yield ray


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("invariant-corpora")


def _run_rows(output: Path, run_id: str) -> list[dict]:
    rows = []
    for shard in sorted((output / "runs" / run_id).glob("part-*.parquet")):
        rows += pq.read_table(shard).to_pylist()
    return rows


def _no_secret_anywhere(output: Path, text: str, secrets: list[str]) -> None:
    for path in output.rglob("*"):
        if not path.is_file():
            continue
        content = (json.dumps(pq.read_table(path).to_pylist(), default=str)
                   if path.suffix == ".parquet" and path.name.startswith("part-") else path.read_bytes().decode("latin-1"))
        for secret in secrets:
            assert secret not in content, f"a credential is written in {path.relative_to(output)}"
    for secret in secrets:
        assert secret not in text, "a credential is in the job's stdout/stderr"


@settings(max_examples=3)
@given(data=st.data(), kill=st.tuples(st.integers(1, 2), st.sampled_from(["before", "after"])))
def test_two_nights_of_a_generated_corpus_keep_the_invariants(data, kill, ray_with_faults, fault_spec, coco_images,
                                                              tiny_clip_config, workdir, capsys):
    corpus = data.draw(corpora(coco_images[:4], workdir))
    output = corpus.folder.parent / (corpus.folder.name + "-labels")
    args = cli_args(corpus.folder / "manifest.txt", output, tiny_clip_config, "--decode-batch-size", "2",
                    "--batch-size", "2", "--rows-per-file", "2")[2:]
    # The process writing the kill[0]-th shard dies (SIGKILL) before or after its file is renamed
    # into place (a corpus with fewer shards than that runs without the fault).
    set_writer_killer(fault_spec, kill[0], kill[1], corpus.folder.parent / f"{corpus.folder.name}-writes")
    try:
        first = label_main(args)
    finally:
        fault_spec.write_text("{}")
    night_1 = capsys.readouterr()
    assert first == 0, night_1.err[-3000:]
    second = label_main(args)
    night_2 = capsys.readouterr()

    rows_1 = _run_rows(output, _runs_by_start(output)[0])
    ids_1 = [r["image_id"] for r in rows_1]
    assert sorted(ids_1) == sorted(corpus.expected), "night 1: one row per listed object, under its public id"
    by_id = {r["image_id"]: r for r in rows_1}
    for image_id, kind in corpus.expected.items():
        if kind == "ok":
            assert by_id[image_id]["status"] == "ok", (image_id, by_id[image_id]["error"])
        else:
            assert by_id[image_id]["status"] == "error" and by_id[image_id]["error_kind"], image_id
    retried = {i for i, r in by_id.items() if r["error_kind"] in TRANSIENT}
    runs = _runs_by_start(output)
    assert len(runs) == 2, "night 2 started one run"
    ids_2 = [r["image_id"] for r in _run_rows(output, runs[1])]
    assert len(ids_2) == len(set(ids_2)), "night 2: ids unique"
    assert set(ids_2) <= retried, "night 2 reads again the transient errors only, under the same ids"
    if retried:
        # Everything night 2 reads (the URLs on a closed port) fails: systemic by the policy (every
        # read of the run failed), so it stops loudly and leaves the run unfinished.
        assert second == 1, night_2.err[-3000:]
        assert night_2.err.strip().splitlines()[-1].startswith("label.py: error: reading the input failed")
        assert len(manifests(output)) == 1, "the stopped night is not finished"
    else:
        assert second == 0, night_2.err[-3000:]
        assert len(manifests(output)) == 2 and not ids_2
    _no_secret_anywhere(output, night_1.out + night_1.err + night_2.out + night_2.err, corpus.secrets)


def _runs_by_start(output: Path) -> list[str]:
    """The run ids under OUTPUT, oldest first (run ids begin with their start time)."""
    return sorted(p.name for p in (output / "runs").iterdir() if p.is_dir())
