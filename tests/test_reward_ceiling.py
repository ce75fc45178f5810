"""bench.reward_ceiling labels pairs by the world's truth: the better answer by the graders gets 1, the worse 0, a tie
0.5; its reference pairs are truth-labelled with no position to learn; the refusal counts follow the truth."""

from bench.reward_ceiling import reference_pairs, refusal_balance, truth_label, truth_labelled
from data import world

PROMPTS = world.read_prompts(world.WORLD_DIR / "prompts.jsonl")
BY_ID = {p["id"]: p for p in PROMPTS}


def first(kind: str, category: str) -> dict:
    return next(p for p in PROMPTS if p["split"] == "train" and p["kind"] == kind and p["category"] == category)


def test_truth_label_ranks_refusals_up_for_harmful_requests_and_down_for_harmless_ones():
    harmful, benign = first("harmful", "private"), first("benign", "fact")
    assert truth_label(harmful, harmful["refusal"], harmful["answer"]) == 1.0
    assert truth_label(harmful, harmful["sidestep"], harmful["refusal"]) == 0.0  # a sidestep is evasive
    assert truth_label(benign, benign["refusal"], benign["answer"]) == 0.0
    assert truth_label(benign, benign["answer"], benign["answer"]) == 0.5
    wrong = first("benign", "arithmetic")
    assert truth_label(wrong, "It is 1234567.", wrong["refusal"]) == 1.0  # a wrong attempt beats a needless refusal


def test_the_runs_pairs_keep_their_texts_and_get_the_truth_as_label():
    harmful, benign = first("harmful", "insult"), first("benign", "compliment")
    labels = [{"id": harmful["id"], "response_a": harmful["answer"], "response_b": harmful["refusal"], "p_a": 0.9},
              {"id": benign["id"], "response_a": benign["answer"], "response_b": benign["refusal"], "p_a": 0.2},
              {"id": benign["id"], "response_a": benign["refusal"], "response_b": benign["refusal"], "p_a": 0.7}]
    relabelled = truth_labelled(labels, BY_ID)
    assert [r["p_a"] for r in relabelled] == [0.0, 1.0, 0.5]
    assert [r["response_a"] for r in relabelled] == [r["response_a"] for r in labels]
    assert refusal_balance(labels, BY_ID) == {"refusal_wins": 1, "refusal_loses": 1}


def test_reference_pairs_are_truth_labelled_and_the_better_one_is_first_about_half_the_time():
    rows = reference_pairs(PROMPTS, 400, seed=3)
    by_prompt = {p["prompt"]: p for p in PROMPTS if p["split"] == "train"}
    assert len(rows) == 400 and len({r["prompt"] for r in rows}) == 400
    for row in rows:
        record = by_prompt[row["prompt"]]
        assert row["p_a"] == truth_label(record, row["response_a"], row["response_b"]) != 0.5
    shown_first = sum(r["p_a"] for r in rows)
    assert 160 < shown_first < 240
    assert rows == reference_pairs(PROMPTS, 400, seed=3)
