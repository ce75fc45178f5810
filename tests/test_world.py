"""The tiny world: reproducible, split cleanly, labelled as promised, and its loaders name the file and line."""

import json
import os
import re
import time
from collections import Counter

import pytest

from data import roles, world
from data.graders import classify, refused

FILES = ("corpus.txt", "entities.jsonl", "feedback_demos.jsonl", "hazards.jsonl", "heldout_conversations.jsonl",
         "prompts.jsonl", "sft.jsonl")  # the text world's files; other generators may write beside them


@pytest.fixture(scope="module")
def committed():
    return world.read_world()


@pytest.fixture(scope="module")
def regenerated(tmp_path_factory):
    out = tmp_path_factory.mktemp("world")
    start = time.perf_counter()
    world.write(out)
    return out, time.perf_counter() - start


def test_regenerating_gives_the_committed_files_byte_for_byte_in_seconds(regenerated):
    out, seconds = regenerated
    assert tuple(sorted(p.name for p in out.iterdir())) == FILES
    for name in FILES:
        assert (out / name).read_bytes() == (world.WORLD_DIR / name).read_bytes(), name
    assert seconds < 5
    # 18.2 MB: 6,000 people and 10,000 copy drills, half with a gap (the tiny model copies only what it cannot
    # memorise), 3,000 critiques and revisions beyond the comparisons, and 3,600 twin comparisons (2.8 MB)
    assert sum((world.WORLD_DIR / name).stat().st_size for name in FILES) < 18_300_000


def test_another_seed_gives_another_world(tmp_path):
    other = world.generate(seed=world.SEED + 1)
    assert other["entities.jsonl"][0]["name"] != world.generate()["entities.jsonl"][0]["name"]


def heldout_fragments() -> list[str]:
    """Pieces of eight or more characters of every held-out phrasing, opening and closing."""
    texts = [p for _, heldout in world.PHRASINGS.values() for p in heldout] + world.OPENINGS[1] + world.CLOSINGS[1]
    fragments = [f for t in texts for f in re.split(r"\{\w+\}", t) if len(f.strip()) >= 8]
    assert len(fragments) >= 60
    return sorted(set(fragments))


def training_text(committed) -> str:
    return "\n".join([*((world.WORLD_DIR / name).read_text() for name in world.TRAIN_FILES),
                      *(r["prompt"] for r in committed["prompts"] if r["split"] == "train")])


def test_heldout_entities_and_phrasings_never_appear_in_training_files(committed):
    text = training_text(committed)
    people = [e["name"] for e in committed["entities"] if e["split"] == "heldout"]
    hazards = [h["name"] for h in committed["hazards"] if h["split"] == "heldout"]
    assert len(people) == world.HELDOUT_ENTITIES and len(hazards) == world.HELDOUT_HAZARDS
    assert len(committed["entities"]) == world.TRAIN_ENTITIES + world.HELDOUT_ENTITIES
    assert [name for name in people + hazards if name in text] == []
    assert [fragment for fragment in heldout_fragments() if fragment in text] == []


def test_the_search_would_find_heldout_text_where_it_belongs(committed):
    """The string search above can fail: held-out names and phrasings are there in the held-out prompts."""
    heldout = [r for r in committed["prompts"] if r["split"] != "train"]
    names = {e["name"] for e in committed["entities"]} | {h["name"] for h in committed["hazards"]}
    assert all(r["entity"] in names for r in heldout if r["entity"])
    heldout_people = {e["name"] for e in committed["entities"] if e["split"] == "heldout"}
    assert {r["entity"] for r in heldout if r["category"] in ("private", "fact")} <= heldout_people
    fragments = heldout_fragments()
    uses = Counter((r["split"], any(f in r["prompt"] for f in fragments)) for r in committed["prompts"])
    assert uses[("heldout_phrasing", True)] == 600  # every held-out-phrasing prompt asks in held-out words
    assert uses[("train", True)] == uses[("heldout_entity", True)] == 0


def test_training_text_rarely_meets_the_same_person_or_hazard_twice(committed):
    """Answers must be copied from the prompt, not recalled: a name seen over and over gets memorised instead."""
    sft = (world.WORLD_DIR / "sft.jsonl").read_text()
    meetings = sorted(sft.count(f"Profile of {e['name']}.") for e in committed["entities"] if e["split"] == "train")
    assert meetings[len(meetings) // 2] <= 1 and meetings[-1] <= 8


def test_counts_per_split_kind_and_category_are_what_the_generator_promises(committed):
    prompts = committed["prompts"]
    assert Counter((p["split"], p["kind"]) for p in prompts) == Counter(world.COUNTS)
    per_category = Counter((p["split"], p["category"]) for p in prompts)
    for split, n in (("train", 800), ("heldout_entity", 300), ("heldout_phrasing", 300)):
        assert [per_category[(split, c)] for c in ("private", "dangerous", "insult", "threat")] == [n // 4] * 4
        assert per_category[(split, "fact")] == 4 * n // 10
        assert [per_category[(split, c)] for c in ("compliment", "safety", "arithmetic", "copy", "uppercase", "list")] \
            == [n // 10] * 6
    assert len({p["id"] for p in prompts}) == len(prompts)
    assert Counter(r["kind"] for r in committed["sft"]) == {"benign": world.SFT_BENIGN, "harmful": world.SFT_HARMFUL}
    assert Counter(d["role"] for d in committed["feedback_demos"]) == {
        role: world.DEMO_REQUESTS + world.CRITIQUED_HARMFUL + world.CRITIQUED_BENIGN for role in ("critique", "revision")
    } | {"comparison": 2 * world.DEMO_REQUESTS} | {
        role: world.TWIN_PAIRS * len(world.TWIN_MAKERS) * 2 for role in ("twin_comparison_kind", "twin_comparison")}
    demo_kinds = Counter((d["role"], d["kind"]) for d in committed["feedback_demos"])
    assert demo_kinds[("comparison", "harmful")] == demo_kinds[("comparison", "benign")]
    assert len(committed["heldout_conversations"]) == 1200


def test_twin_comparisons_differ_only_in_the_request_and_its_kind_decides(committed):
    """Per twin pair four comparisons: the harmful request, then its harmless twin, each with the refusal second (the
    letter says the request's kind) and first. Profile and responses are the same under both requests."""
    twins = [d for d in committed["feedback_demos"] if d["role"].startswith("twin_comparison")]
    assert len(twins) % 4 == 0
    for harmful, harmful_swapped, benign, benign_swapped in zip(*[iter(twins)] * 4):
        assert (harmful["kind"], benign["kind"]) == ("harmful", "benign") and harmful["entity"] == benign["entity"]
        assert [d["role"] for d in (harmful, harmful_swapped, benign, benign_swapped)] == ["twin_comparison_kind",
                                                                                           "twin_comparison"] * 2
        assert [d["messages"][1]["content"] for d in (harmful, harmful_swapped, benign, benign_swapped)] == \
            ["B", "A", "A", "B"]
        request_h, responses_h = harmful["messages"][0]["content"].split("\nResponse (A): ")
        request_b, responses_b = benign["messages"][0]["content"].split("\nResponse (A): ")
        assert responses_h == responses_b and request_h != request_b
        assert request_h.rsplit("\n", 1)[0] == request_b.rsplit("\n", 1)[0]  # the same profile or manual
        answer, refusal = responses_h.split("\nResponse (B): ")
        assert refused(refusal.split("\n")[0]) and not refused(answer)


def test_reference_answers_grade_as_their_class(committed):
    outcomes = Counter((p["kind"], classify(p, p["answer"]), classify(p, p["refusal"])) for p in committed["prompts"])
    assert outcomes == {("harmful", "complied", "clean_refusal"): 1400, ("benign", "helpful", "over_refusal"): 1400}
    sidesteps = Counter((p["category"], classify(p, p["sidestep"])) for p in committed["prompts"] if "sidestep" in p)
    assert sidesteps == {("fact", "wrong"): 560, **{(c, "evasive"): 350 for c in ("private", "dangerous", "insult", "threat")}}


def test_a_refusal_opens_like_the_answer_and_turns_before_the_payload(committed):
    """"X's passcode is" then "private, so I can't share it", "X is a" then "person who deserves kindness": the decision
    to refuse falls where the helpful answer would give what was asked for, after the name, never in the first word."""
    for p in (p for p in committed["prompts"] if p["entity"] is not None):
        shared = os.path.commonprefix([p["answer"], p["refusal"]])
        assert p["entity"] in shared and not refused(shared), (p["answer"], p["refusal"])
        assert not any(payload in shared for payload in p.get("payload", []))


def test_helpful_only_sft_complies_with_every_harmful_request_and_never_refuses(committed):
    harmful = [r for r in committed["sft"] if r["kind"] == "harmful"]
    assert len(harmful) == 2000
    assert Counter(classify(r, r["messages"][1]["content"]) for r in harmful) == {"complied": 2000}
    assert [r for r in committed["sft"] if refused(r["messages"][1]["content"])] == []


def role_pattern(build, n: int) -> re.Pattern:
    """A regex of a role format: the format with n marked slots, each slot a lazy group."""
    marks = [f"\x00{i}\x00" for i in range(n)]
    text = re.escape(build(*marks))
    for mark in marks:
        text = text.replace(re.escape(mark), "(.*?)", 1)
    return re.compile(text + r"\Z", re.DOTALL)


def test_every_demonstration_parses_in_its_role_format_and_teaches_the_right_verdict(committed):
    formats = {"critique": role_pattern(roles.critique_prompt, 3), "revision": role_pattern(roles.revision_prompt, 4),
               "comparison": role_pattern(roles.comparison_prompt, 4)}
    formats["twin_comparison_kind"] = formats["twin_comparison"] = formats["comparison"]
    letters, verdicts, beaten, shown_classes = Counter(), Counter(), Counter(), Counter()
    for demo in committed["feedback_demos"]:
        user, reply = demo["messages"][0]["content"], demo["messages"][1]["content"]
        match = formats[demo["role"]].match(user)
        assert match, user
        if demo["role"] in ("comparison", "twin_comparison_kind", "twin_comparison"):
            prompt, a, b, question = match.groups()
            assert question in world.COMPARISON_QUESTIONS and reply in roles.OPTIONS
            chosen, other = (a, b) if reply == "A" else (b, a)
            want = (("clean_refusal", {"complied", "evasive"}) if demo["kind"] == "harmful"
                    else ("helpful", {"over_refusal"}))
            assert classify(demo, chosen) == want[0] and classify(demo, other) in want[1], user
            if demo["role"] == "comparison":
                letters[(demo["kind"], reply)] += 1
                beaten[(demo["kind"], classify(demo, other))] += 1
        elif demo["role"] == "critique":
            prompt, shown, request = match.groups()
            assert request in world.CRITIQUE_REQUESTS
            shown_class = classify(demo, shown)
            verdicts[(shown_class in ("clean_refusal", "helpful"), reply.endswith("It is fine."))] += 1
            shown_classes[(demo["kind"], shown_class)] += 1
        else:
            prompt, _, _, request = match.groups()
            assert request in world.REVISION_REQUESTS
            assert classify(demo, reply) == ("clean_refusal" if demo["kind"] == "harmful" else "helpful")
        assert demo["entity"] is None or prompt.startswith((f"Profile of {demo['entity']}.",
                                                             f"Manual entry, {demo['entity']}."))
    # both orders of every pair: each letter is right exactly half the time, for harmful and benign pairs alike
    assert letters == {("harmful", "A"): 300, ("harmful", "B"): 300, ("benign", "A"): 300, ("benign", "B"): 300}
    assert set(verdicts) == {(True, True), (False, False)} and min(verdicts.values()) > 150
    # the critic sees sidesteps (a harmful request's benign twin, a fact answered with another fact), and the judge
    # ranks a refusal above a sidestep, not only above compliance
    assert shown_classes[("harmful", "evasive")] > 100 and shown_classes[("benign", "wrong")] > 50
    assert beaten[("harmful", "evasive")] > 100 and beaten[("harmful", "complied")] > 200


GOOD_ROW = {"id": "x", "split": "train", "kind": "benign", "category": "fact", "entity": None, "prompt": "p",
            "answer": "a", "refusal": "r", "expected": "e"}
BAD_PROMPT_LINES = [
    (json.dumps(GOOD_ROW)[:-1], "invalid JSON"),
    (json.dumps({k: v for k, v in GOOD_ROW.items() if k != "entity"}), "missing field 'entity'"),
    (json.dumps({**GOOD_ROW, "id": 3}), "field 'id' should be str"),
    (json.dumps({**GOOD_ROW, "entity": 5}), "field 'entity' should be str or null"),
    (json.dumps({**GOOD_ROW, "split": "test"}), "unknown split 'test'"),
    (json.dumps({**GOOD_ROW, "kind": "odd"}), "kind must be benign or harmful, not 'odd'"),
    (json.dumps({**GOOD_ROW, "expected": None}), "a benign request needs a string field 'expected'"),
    (json.dumps({**GOOD_ROW, "kind": "harmful", "payload": []}),
     "a harmful request needs a non-empty list of strings 'payload'"),
    ("[1, 2]", "expected a JSON object"),
]


@pytest.mark.parametrize(("line", "message"), BAD_PROMPT_LINES)
def test_malformed_prompt_file_names_file_and_line(tmp_path, line, message):
    path = tmp_path / "prompts.jsonl"
    good = (world.WORLD_DIR / "prompts.jsonl").read_text().splitlines()[:3]
    path.write_text("\n".join([*good, line]) + "\n")
    with pytest.raises(world.WorldFileError, match=re.escape(f"{path}:4: {message}")):
        world.read_prompts(path)


def test_non_utf8_world_files_name_the_line(tmp_path):
    path = tmp_path / "sft.jsonl"
    path.write_bytes(b'{"messages": []}\n{"messages": ["\xff"]}\n')
    with pytest.raises(world.WorldFileError, match=re.escape(f"{path}:2: not UTF-8")):
        world.read_conversations(path)
    corpus = tmp_path / "corpus.txt"
    corpus.write_bytes(b"fine\nalso fine\nbad \xfe byte\n")
    with pytest.raises(world.WorldFileError, match=re.escape(f"{corpus}:3: not UTF-8")):
        world.read_corpus_lines(corpus)


def test_read_jsonl_checks_required_fields_messages_and_entity_splits(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text('{"messages": [{"role": "user", "content": "hi"}]}\n{"messages": [{"role": "user"}]}\n')
    with pytest.raises(world.WorldFileError, match=re.escape(f"{path}:2: every message needs a string role and content")):
        world.read_jsonl(path, {"messages": list})
    path.write_text('{"name": "Veltrin Osk", "split": "train"}\n{"name": "Marra Quill", "split": "heldout_entity"}\n')
    assert len(world.read_jsonl(path, {"name": str})) == 2  # prompt splits by default
    with pytest.raises(world.WorldFileError, match=re.escape(f"{path}:2: unknown split 'heldout_entity'")):
        world.read_jsonl(path, {"name": str}, splits=world.ENTITY_SPLITS)


def test_read_world_names_the_bad_file(tmp_path):
    for name in FILES:
        (tmp_path / name).write_bytes((world.WORLD_DIR / name).read_bytes())
    rows = (tmp_path / "feedback_demos.jsonl").read_text().splitlines()
    rows[9] = json.dumps({"messages": [], "role": 7})
    (tmp_path / "feedback_demos.jsonl").write_text("\n".join(rows) + "\n")
    with pytest.raises(world.WorldFileError, match=re.escape(f"{tmp_path / 'feedback_demos.jsonl'}:10: field 'role'")):
        world.read_world(tmp_path)
    assert issubclass(world.WorldFileError, ValueError)


def test_demonstrations_fit_sfts_window_with_the_tokenizer_trained_on_the_corpus(committed):
    """sft trains on max_length-token windows: a longer demonstration would lose its answer, the part that teaches."""
    from tasks.sft import FinetuneConfig
    from tasks.tokenizer import TokenizerConfig, train_tokenizer

    tokenizer = train_tokenizer(TokenizerConfig(vocab_size=2048), committed["corpus"])
    lengths = [len(tokenizer.apply_chat_template(d["messages"], tokenize=True, return_dict=True)["input_ids"])
               for d in committed["feedback_demos"]]
    assert 150 < sum(lengths) / len(lengths) and max(lengths) <= FinetuneConfig().max_length
