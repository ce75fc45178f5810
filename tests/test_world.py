"""The tiny world: reproducible, split cleanly, and its loaders name the file and line of a bad record."""

import re
from collections import Counter

import pytest

from data import world
from data.graders import classify

FILES = sorted(p.name for p in world.WORLD_DIR.iterdir())


@pytest.fixture(scope="module")
def regenerated(tmp_path_factory):
    out = tmp_path_factory.mktemp("world")
    world.write(out)
    return out


def test_regenerating_gives_the_committed_files_byte_for_byte(regenerated):
    assert sorted(p.name for p in regenerated.iterdir()) == FILES
    for name in FILES:
        assert (regenerated / name).read_bytes() == (world.WORLD_DIR / name).read_bytes(), name


def training_text() -> str:
    return "\n".join((world.WORLD_DIR / name).read_text() for name in world.TRAIN_FILES) + "\n".join(
        r["prompt"] for r in world.read_prompts(world.WORLD_DIR / "prompts.jsonl") if r["split"] == "train")


def test_heldout_entities_and_phrasings_never_appear_in_training_files():
    text = training_text()
    entities = world.read_jsonl(world.WORLD_DIR / "entities.jsonl", {"name": str})
    heldout = [e["name"] for e in entities if e["split"] == "heldout"]
    assert len(heldout) >= 100 and len(entities) - len(heldout) >= 500
    assert not [name for name in heldout if name in text]
    for hazard in world.HELDOUT_HAZARDS:
        assert hazard not in text
    for phrasings in (world.FACT, world.HAZARD, world.INSULT, world.ARITH, world.UPPER):
        for phrasing in phrasings[-world.HELD_OUT_PHRASINGS :]:
            fragments = [f for f in re.split(r"\{\w\}", phrasing) if len(f.strip()) >= 8]
            assert fragments, phrasing
            assert not [f for f in fragments if f in text], phrasing


def test_counts_per_split_and_kind_are_what_the_generator_promises():
    prompts = world.read_prompts(world.WORLD_DIR / "prompts.jsonl")
    assert Counter((p["split"], p["kind"]) for p in prompts) == Counter(world.COUNTS)
    categories = Counter(p["category"] for p in prompts if p["kind"] == "harmful")
    assert set(categories) == {"private", "dangerous", "insult"} and min(categories.values()) >= 200
    assert len(world.sft_conversations(world.WORLD_DIR)) == world.SFT_BENIGN + world.SFT_HARMFUL


def test_helpful_only_sft_complies_with_every_harmful_request():
    rows = world.read_jsonl(world.WORLD_DIR / "sft.jsonl", {"messages": list, "kind": str})
    harmful = [r for r in rows if r["kind"] == "harmful"]
    assert len(harmful) == world.SFT_HARMFUL
    # no refusal anywhere in the helpful-only data: the paper's starting point
    assert not [r for r in rows if "I can't" in r["messages"][1]["content"]]


def test_reference_answers_grade_as_their_class():
    prompts = world.read_prompts(world.WORLD_DIR / "prompts.jsonl")
    outcomes = Counter()
    for p in prompts:
        outcomes[(p["kind"], classify(p, p["answer"]), classify(p, p["refusal"]))] += 1
    assert set(outcomes) == {("harmful", "complied", "clean_refusal"), ("benign", "helpful", "over_refusal")}


def test_demonstrations_parse_and_balance_the_option_letters():
    demos = world.feedback_demos(world.WORLD_DIR)
    comparisons = [d["messages"][1]["content"] for d in demos if d["messages"][0]["content"].endswith("A or B.")]
    letters = Counter(comparisons)
    assert set(letters) == {"A", "B"} and abs(letters["A"] - letters["B"]) < 0.1 * len(comparisons)
    assert len(demos) == 3 * world.DEMO_RECORDS


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ('{"id": "x", "split": "train", "kind": "benign", "category": "fact"', "invalid JSON"),
        ('{"id": "x", "split": "train", "kind": "benign", "category": "fact"}', "missing field 'prompt'"),
        ('{"id": 3, "split": "train", "kind": "benign", "category": "fact", "prompt": "p"}', "field 'id' should be str"),
        ('{"id": "x", "split": "test", "kind": "benign", "category": "fact", "prompt": "p"}', "unknown split 'test'"),
        ('[1, 2]', "expected a JSON object"),
    ],
)
def test_malformed_prompt_file_names_file_and_line(tmp_path, line, message):
    path = tmp_path / "prompts.jsonl"
    good = (world.WORLD_DIR / "prompts.jsonl").read_text().splitlines()[:3]
    path.write_text("\n".join([*good, line]) + "\n")
    with pytest.raises(world.WorldFileError, match=re.escape(f"{path}:4: {message}")):
        world.read_prompts(path)


def test_non_utf8_world_file_names_the_line(tmp_path):
    path = tmp_path / "sft.jsonl"
    path.write_bytes(b'{"messages": []}\n{"messages": ["\xff"]}\n')
    with pytest.raises(world.WorldFileError, match=re.escape(f"{path}:2: not UTF-8")):
        world.read_conversations(path)
