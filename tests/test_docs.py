"""The documentation says what the code does: every job flag it shows exists, the schema tables
list every field, and its relative links lead somewhere. Fast: no Ray; each job's ``--help`` is its parser, run in this process.

``mkdocs build --strict`` (in ``.ci/run``) checks links and the nav as a site; these checks run in
the test suite itself, so a renamed flag or a new schema field fails where it is changed.
"""

from __future__ import annotations

import contextlib
import functools
import io
import json
import re
from pathlib import Path

import pytest
from pipeline_support import load_job

REPO_ROOT = Path(__file__).resolve().parent.parent
DOC_FILES = sorted([REPO_ROOT / "README.md", *(REPO_ROOT / "docs").rglob("*.md")])

#: ``jobs/<name>.py`` in a command line, and what follows it on that line.
_JOB_COMMAND = re.compile(r"jobs/(?P<job>\w+)\.py(?P<rest>[^\n]*)")
_FLAG = re.compile(r"(?<![\w-])--[a-z][a-z0-9-]*")
_FENCE = re.compile(r"^(\s*)(```|~~~)[^\n]*\n(.*?)^\1\2[ \t]*$", re.MULTILINE | re.DOTALL)
_INLINE = re.compile(r"(?<!`)`([^`]+)`(?!`)")
#: Where a shell command ends: a comment, a pipe, a list operator, a redirection.
_COMMAND_END = re.compile(r"\s(#|\|\|?|&&|;|>)")


def code_in(markdown: str) -> list[str]:
    """The code of a Markdown text: each fenced block (backslash continuations joined into one
    line) and each inline code span outside the blocks."""
    blocks = [match.group(3).replace("\\\n", " ") for match in _FENCE.finditer(markdown)]
    prose = _FENCE.sub("", markdown)
    return blocks + [span.replace("\n", " ") for span in _INLINE.findall(prose)]


def job_flags(code: str) -> list[tuple[str, str | None, str]]:
    """(job, subcommand or None, --flag) for every flag given to a ``jobs/*.py`` command in
    ``code``. ``review.py`` has subcommands; its flags belong to the subcommand's ``--help``."""
    found = []
    for match in _JOB_COMMAND.finditer(code):
        job, rest = match.group("job"), match.group("rest")
        end = _COMMAND_END.search(rest)
        words = (rest[: end.start()] if end else rest).split()
        subcommand = words[0] if job == "review" and words and not words[0].startswith("-") else None
        found += [(job, subcommand, flag) for flag in _FLAG.findall(" ".join(words))]
    return found


@functools.cache
def help_text(job: str, subcommand: str | None) -> str:
    """What ``python jobs/<job>.py [subcommand] --help`` prints: the job's own parser, run in this
    process (a subprocess per job costs seconds each on a loaded 2-core box)."""
    module = load_job(job)
    argv = [*([subcommand] if subcommand else []), "--help"]
    # label.py's main installs excepthooks before parsing; its parser is what --help prints.
    parse = module.build_parser().parse_args if hasattr(module, "build_parser") else module.parse_args
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed), pytest.raises(SystemExit) as exit_status:
        parse(argv)
    assert exit_status.value.code == 0, f"jobs/{job}.py {' '.join(argv)} exited with {exit_status.value.code}"
    return printed.getvalue()


def test_the_extractor_finds_flags_of_job_commands_only():
    markdown = (
        "Run `python jobs/evaluate.py --labels L --gt G` or:\n\n"
        "```bash\n"
        "RAY_ADDRESS=x ray job submit --working-dir . -- \\\n"
        "    python jobs/label.py --input s3://b/ --output o/ --max-actors 8   # not --a-comment\n"
        "python jobs/review.py export --to t.json && echo --not-a-flag\n"
        "python benchmarks/bench_x.py --not-a-job\n"
        "```\n"
    )
    flags = [flag for code in code_in(markdown) for flag in job_flags(code)]
    assert sorted(flags) == sorted([
        ("label", None, "--input"), ("label", None, "--output"), ("label", None, "--max-actors"),
        ("review", "export", "--to"), ("evaluate", None, "--labels"), ("evaluate", None, "--gt"),
    ])


def test_every_documented_job_flag_is_in_that_jobs_help():
    shown = {
        (job, subcommand, flag, path.relative_to(REPO_ROOT).as_posix())
        for path in DOC_FILES
        for code in code_in(path.read_text(encoding="utf-8"))
        for job, subcommand, flag in job_flags(code)
    }
    # Not vacuous: the README and the pages show every job with flags.
    assert {job for job, *_ in shown} >= {"label", "evaluate", "preview", "report", "review"}
    missing = sorted(
        f"{where}: jobs/{job}.py{' ' + subcommand if subcommand else ''} {flag}"
        for job, subcommand, flag, where in shown
        if not re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", help_text(job, subcommand))
    )
    assert not missing, "flags shown in the docs that the job's --help does not know:\n" + "\n".join(missing)


def _tables_by_section(markdown: str) -> dict[str, list[list[str]]]:
    """For each ``## `` section, its tables, each as the backticked names in its first column."""
    sections: dict[str, list[list[str]]] = {}
    title, previous_was_row = "", False
    for line in markdown.splitlines():
        if line.startswith("## "):
            title, previous_was_row = line[3:].strip(), False
            continue
        row = re.match(r"\|\s*`([^`]+)`\s*\|", line)
        if line.startswith("|"):
            if not previous_was_row:
                sections.setdefault(title, []).append([])
            if row:
                sections[title][-1].append(row.group(1))
        previous_was_row = line.startswith("|")
    return sections


def test_the_outputs_page_lists_every_schema_field():
    tables = _tables_by_section((REPO_ROOT / "docs" / "job" / "outputs.md").read_text(encoding="utf-8"))
    row_schema = json.loads((REPO_ROOT / "schemas" / "label_row.v1.json").read_text())
    manifest_schema = json.loads((REPO_ROOT / "schemas" / "run_manifest.v1.json").read_text())
    (masks,) = [field for field in row_schema["fields"] if field["name"] == "masks"]

    row_columns, mask_fields = tables["Label rows"][:2]
    assert set(row_columns) == {field["name"] for field in row_schema["fields"]}
    assert set(mask_fields) == {field["name"] for field in masks["type"]["list"]["struct"]}
    assert set(tables["The run manifest"][0]) == {field["name"] for field in manifest_schema["fields"]}


_LINK = re.compile(r"\]\((?!https?://|mailto:|#)([^)\s]+)\)")


@pytest.mark.parametrize("path", DOC_FILES, ids=lambda path: path.relative_to(REPO_ROOT).as_posix())
def test_relative_links_lead_to_files_in_the_repository(path):
    prose = _FENCE.sub("", path.read_text(encoding="utf-8"))
    broken = [
        target for target in _LINK.findall(prose)
        if not (path.parent / target.split("#", 1)[0]).resolve().exists()
    ]
    assert not broken, f"{path.relative_to(REPO_ROOT)} links to missing files: {broken}"
    # Nothing outside the repository: a reader's clone has nothing beside it.
    outside = [t for t in _LINK.findall(prose) if REPO_ROOT not in (path.parent / t.split("#", 1)[0]).resolve().parents
               and (path.parent / t.split("#", 1)[0]).resolve() != REPO_ROOT]
    assert not outside, f"{path.relative_to(REPO_ROOT)} links outside the repository: {outside}"


def test_the_readme_test_command_is_the_one_ci_runs():
    ci = (REPO_ROOT / ".ci" / "run").read_text()
    readme_blocks = code_in((REPO_ROOT / "README.md").read_text(encoding="utf-8"))
    assert "python3 -m pytest -q\n" in ci.split("# The README's test command:", 1)[1]
    assert any(block.strip() == "python -m pytest -q" for block in readme_blocks)
