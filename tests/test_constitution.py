"""Constitutions: the default is valid, the schema file is current, and every kind of malformed file is reported
with the right line and exit code 2."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from constitutions.schema import SCHEMA_FILE, Constitution, check_file, load

ROOT = Path(__file__).resolve().parent.parent
GOOD = """\
name: small
critique_revision:
  - id: privacy
    critique: Does it reveal a private detail?
    revision: Rewrite it without the private detail.
preference:
  - id: safer
    text: Which response is safer?
"""
BOMB = "a: &a [x, x, x, x, x, x, x, x, x]\nb: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a]\nc: [*b, *b, *b, *b, *b, *b]\n"

# (kind, file content, line of the first problem, words of its message)
MALFORMED = [
    ("yaml syntax", GOOD.replace("  - id: safer", "  - id: safer\n   text: [unclosed"), 8, "YAML syntax error"),
    ("unknown top-level key", GOOD + "principals: []\n", 9, "unknown key principals"),
    ("unknown principle key", GOOD.replace("    text: Which", "    weight: 2\n    text: Which"), 8,
     "unknown key preference.0.weight"),
    ("missing name", GOOD.replace("name: small\n", ""), 1, "missing field name"),
    ("missing revision", GOOD.replace("    revision: Rewrite it without the private detail.\n", ""), 3,
     "missing field critique_revision.0.revision"),
    ("critique is a list", GOOD.replace("critique: Does it reveal a private detail?", "critique: [a, b]"), 4,
     "critique_revision.0.critique"),
    ("preference is a mapping", GOOD.replace("  - id: safer\n    text: Which response is safer?\n",
                                             "  safer: Which response is safer?\n"), 7, "preference"),
    ("empty critique list", GOOD.replace("""critique_revision:
  - id: privacy
    critique: Does it reveal a private detail?
    revision: Rewrite it without the private detail.
""", "critique_revision: []\n"), 2, "critique_revision must not be empty"),
    ("empty preference list", GOOD.replace("""preference:
  - id: safer
    text: Which response is safer?
""", "preference: []\n"), 6, "preference must not be empty"),
    ("duplicate critique id", GOOD.replace("preference:", """  - id: privacy
    critique: Again?
    revision: Again.
preference:"""), 6, "duplicate principle id 'privacy'"),
    ("duplicate preference id", GOOD + "  - id: safer\n    text: Which one is kinder?\n", 9,
     "duplicate principle id 'safer'"),
    ("non-UTF-8 bytes", GOOD.replace("Which response is safer?", "Which r\udcffesponse is safer?"), 8, "not UTF-8"),
    ("over 1 MB", GOOD + "description: " + "x" * (1 << 20) + "\n", 1, "more than"),
    ("alias bomb", BOMB, 2, "aliases are not allowed"),
    ("duplicate key", GOOD.replace("name: small\n", "name: small\nname: again\n"), 2, "duplicate key 'name'"),
    ("not a mapping", "- just\n- a list\n", 1, "a constitution is a mapping"),
    ("bad principle id", GOOD.replace("id: privacy", "id: Privacy Rule"), 3, "critique_revision.0.id"),
    ("empty critique text", GOOD.replace("critique: Does it reveal a private detail?", "critique: '  '"), 4,
     "critique_revision.0.critique"),
    ("empty file", "", 1, "a constitution is a mapping"),
]


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "constitution.yaml"
    path.write_bytes(text.encode("utf-8", "surrogateescape"))
    return path


def test_default_constitution_is_valid_and_rich_enough():
    default = load(ROOT / "constitutions" / "default.yaml")
    assert len(default.critique_revision) >= 12 and len(default.preference) >= 8
    assert (ROOT / "constitutions" / "default.yaml").read_text().startswith("# yaml-language-server: $schema=")


def test_every_constitution_file_is_valid():
    files = sorted((ROOT / "constitutions").glob("*.yaml"))
    assert files and all(check_file(f) == [] for f in files)


def test_json_schema_file_is_current():
    committed = json.loads(SCHEMA_FILE.read_text())
    assert committed["properties"] == Constitution.model_json_schema()["properties"]
    assert committed["$defs"] == Constitution.model_json_schema()["$defs"]


@pytest.mark.parametrize(("kind", "text", "line", "words"), MALFORMED, ids=[m[0] for m in MALFORMED])
def test_malformed_constitution_is_reported_with_its_line(tmp_path, kind, text, line, words):
    path = write(tmp_path, text)
    problems = check_file(path)
    assert problems, kind
    first = problems[0]
    assert first.startswith(f"{path}:{line}: "), first
    assert words in first, first


def test_check_command_exit_codes(tmp_path):
    good = write(tmp_path, GOOD)
    bad = tmp_path / "bad.yaml"
    bad.write_text(GOOD.replace("name: small\n", ""))
    ok = subprocess.run([sys.executable, "-m", "flows.cli", "constitution", "check", str(good)],
                        capture_output=True, text=True, check=False)
    assert ok.returncode == 0
    failed = subprocess.run([sys.executable, "-m", "flows.cli", "constitution", "check", str(good), str(bad)],
                            capture_output=True, text=True, check=False)
    assert failed.returncode == 2
    assert failed.stdout.strip().splitlines() == [f"{bad}:1: missing field name"]
