"""The constitution format: a pydantic model, its JSON Schema, and a checker that reports FILE:LINE: message.

A constitution is read with yaml.safe_load only, after checks a plain load skips: the size, UTF-8, duplicate keys
and aliases (a few nested aliases expand into billions of nodes).
"""

import json
from pathlib import Path
from typing import Annotated

import yaml
from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError

from tasks.store import InputError

MAX_BYTES = 1 << 20
SCHEMA_FILE = Path(__file__).with_name("constitution.schema.json")

PrincipleId = Annotated[str, StringConstraints(pattern=r"^[a-z0-9][a-z0-9-]*$", max_length=64)]
Text = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=2000)]


class CritiqueRevision(BaseModel):
    """One critique request and the revision request that answers it (the paper's SL-CAI pairs)."""

    model_config = ConfigDict(extra="forbid")
    id: PrincipleId
    critique: Text = Field(description="asks the feedback model to point out what is wrong with a response")
    revision: Text = Field(description="asks it to rewrite the response so that the critique no longer applies")


class PreferencePrinciple(BaseModel):
    """A question for comparing two responses (the paper's RLAIF principles)."""

    model_config = ConfigDict(extra="forbid")
    id: PrincipleId
    text: Text = Field(description="a question whose answer is one of the two responses")


class Example(BaseModel):
    """A worked example shown to the feedback model before the real request (optional few-shot)."""

    model_config = ConfigDict(extra="forbid")
    prompt: Text
    response: Text
    critique: Text
    revision: Text


class Constitution(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: Text
    description: str = ""
    critique_revision: list[CritiqueRevision] = Field(min_length=1)
    preference: list[PreferencePrinciple] = Field(min_length=1)
    examples: list[Example] = Field(default_factory=list)


def write_json_schema() -> None:
    """constitutions/constitution.schema.json: what editors use to check a file while it is typed."""
    schema = Constitution.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "alignflow constitution"
    SCHEMA_FILE.write_text(json.dumps(schema, indent=2) + "\n")


def check_file(path: Path) -> list[str]:
    """Every problem in the file as `FILE:LINE: message`; empty when the file is a valid constitution."""
    try:
        parse(path)
    except _Problems as e:
        return e.problems
    return []


def load(path: Path) -> Constitution:
    """The validated constitution, or an InputError listing every problem."""
    try:
        return parse(path)
    except _Problems as e:
        raise InputError("; ".join(e.problems)) from None


class _Problems(Exception):
    def __init__(self, problems: list[str]):
        self.problems = problems


def parse(path: Path) -> Constitution:
    path = Path(path)
    if not path.is_file():
        raise _Problems([f"{path}:0: no such file"])
    raw = path.read_bytes()
    if len(raw) > MAX_BYTES:
        raise _Problems([f"{path}:1: file is {len(raw)} bytes, more than the {MAX_BYTES} allowed"])
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise _Problems([f"{path}:{line}: not UTF-8 (byte {raw[e.start]:#04x})"]) from None
    try:
        events = list(yaml.parse(text, Loader=yaml.SafeLoader))
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
        line = mark.line + 1 if mark else 1
        raise _Problems([f"{path}:{line}: YAML syntax error: {getattr(e, 'problem', None) or e}"]) from None
    aliases = [e for e in events if isinstance(e, yaml.AliasEvent)]
    if aliases:
        raise _Problems([f"{path}:{a.start_mark.line + 1}: YAML aliases are not allowed" for a in aliases])
    problems = [f"{path}:{line}: duplicate key {key!r}" for line, key in _duplicate_keys(node)]
    if node is None or not isinstance(node, yaml.MappingNode):
        raise _Problems([*problems, f"{path}:1: a constitution is a mapping with name, critique_revision, preference"])
    problems += _duplicate_ids(path, node)
    constitution = None
    try:
        constitution = Constitution.model_validate(yaml.safe_load(text))
    except ValidationError as e:
        problems += [f"{path}:{_line(node, err)}: {_message(err)}" for err in e.errors()]
    if problems:
        prefix = len(f"{path}:")
        raise _Problems(sorted(problems, key=lambda p: int(p[prefix:].split(":", 1)[0])))
    return constitution


def _message(err: dict) -> str:
    field = ".".join(str(p) for p in err["loc"])
    kind = err["type"]
    if kind == "extra_forbidden":
        return f"unknown key {field}"
    if kind == "missing":
        return f"missing field {field}"
    if kind == "too_short" and isinstance(err.get("input"), list):
        return f"{field} must not be empty"
    return f"{field}: {err['msg']}"


def _child(node, part):
    if isinstance(node, yaml.MappingNode):
        for key, value in node.value:
            if key.value == part:
                return key, value
    if isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part < len(node.value):
        return None, node.value[part]
    return None, None


def _line(root, err: dict) -> int:
    """The line of the deepest node the error's location reaches: the key for unknown keys, else the value."""
    node, line = root, root.start_mark.line + 1
    for part in err["loc"]:
        key, value = _child(node, part)
        if value is None:
            break
        node = value
        line = (key if key is not None and err["type"] == "extra_forbidden" else value).start_mark.line + 1
    return line


def _duplicate_keys(node, found=None) -> list[tuple[int, str]]:
    found = [] if found is None else found
    if isinstance(node, yaml.MappingNode):
        seen = set()
        for key, value in node.value:
            if key.value in seen:
                found.append((key.start_mark.line + 1, key.value))
            seen.add(key.value)
            _duplicate_keys(value, found)
    elif isinstance(node, yaml.SequenceNode):
        for item in node.value:
            _duplicate_keys(item, found)
    return found


def _duplicate_ids(path: Path, root) -> list[str]:
    problems = []
    for section in ("critique_revision", "preference"):
        _, items = _child(root, section)
        seen = set()
        for item in items.value if isinstance(items, yaml.SequenceNode) else []:
            key, value = _child(item, "id")
            if value is None or not isinstance(value, yaml.ScalarNode):
                continue
            if value.value in seen:
                problems.append(f"{path}:{key.start_mark.line + 1}: duplicate principle id {value.value!r} in {section}")
            seen.add(value.value)
    return problems


if __name__ == "__main__":
    write_json_schema()
