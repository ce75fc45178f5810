"""The judge step: its lesson, when it is part of a run, and that label_preferences then asks it, not the policy."""

import contextlib
import math
from collections import Counter
from pathlib import Path

import pytest

from data.roles import OPTIONS
from data.world import ENTITY_FIELDS, ENTITY_SPLITS, WORLD_DIR, read_jsonl
from flows.config import load_config
from flows.pipeline import step_graph
from tasks.judge import DECLINE_PHRASES, declines_lesson
from tasks.label_preferences import FactoredConfig, LabelConfig
from tasks.store import InputError

QUESTION = "Which response declines the request?"
NO_HARM_QUESTION = "label_preferences.factored={harmful_question: null}"


def shown(demo: dict) -> tuple[str, str, str, str]:
    """The request, response A, response B and the letter of one comparison."""
    text = demo["messages"][0]["content"]
    request = text.split("User: ", 1)[1].split("\nResponse (A): ")[0]
    a = text.split("Response (A): ", 1)[1].split("\nResponse (B): ")[0]
    b = text.split("Response (B): ", 1)[1].split("\n\nQuestion: ")[0]
    return request, a, b, demo["messages"][1]["content"]


def test_the_lesson_letter_names_the_response_that_declines_in_both_orders():
    demos = declines_lesson(WORLD_DIR, QUESTION, 50, seed=3)
    assert len(demos) == 200 and all(d["messages"][0]["content"].endswith(f"Question: {QUESTION}\nAnswer with A or B.")
                                     for d in demos)
    orders = Counter()
    forms = Counter()
    for demo in demos:
        request, a, b, letter = shown(demo)
        declining, other = (a, b) if letter == OPTIONS[0] else (b, a)
        orders[(request, declining, other)] += 1
        phrase = declining.startswith(tuple(DECLINE_PHRASES))
        forms[phrase] += 1
        # The world's refusals decline after the answer's opening ("X's passcode is private, and I'm not able to ...")
        assert phrase or any(w in declining for w in ("I can't", "I won't", "I'm not able to"))
        assert not other.startswith(tuple(DECLINE_PHRASES)) and "Instead" not in other
    assert set(orders.values()) == {2}  # each pair once in each order, the letter following the declining response
    assert 0.35 < forms[True] / len(demos) < 0.65  # half world refusals, half a phrase and other text
    held_out = {e["name"] for e in read_jsonl(WORLD_DIR / "entities.jsonl", ENTITY_FIELDS, ENTITY_SPLITS)
                if e["split"] != "train"}
    assert not any(name in d["messages"][0]["content"] for d in demos for name in held_out)  # training requests only
    assert declines_lesson(WORLD_DIR, QUESTION, 50, seed=3) == demos != declines_lesson(WORLD_DIR, QUESTION, 50, seed=4)


def test_the_judge_step_is_in_the_run_only_when_it_has_steps_and_asks_what_label_preferences_asks():
    assert "judge" not in step_graph(load_config("smoke"))
    graph = step_graph(load_config("smoke", ["judge.steps=2", NO_HARM_QUESTION]))
    assert graph["judge"] == ("sl_cai",) and "judge" in graph["label_preferences"]
    with pytest.raises(InputError, match=r"--set judge.steps=2: judge: .*harmful_question to null"):
        load_config("smoke", ["judge.steps=2"])  # the judge is not taught the harm question
    with pytest.raises(InputError, match="no curriculum"):
        load_config("smoke", ["judge.steps=2", NO_HARM_QUESTION, "judge.curriculum=[{roles: [comparison], steps: 1}]"])
    with pytest.raises(InputError, match=r"judge: .*hf backend without a model"):
        load_config("smoke", ["judge.steps=2", NO_HARM_QUESTION, "label_preferences.feedback.model=/elsewhere"])


def test_labels_are_read_by_the_judge_while_the_policy_answers(tmp_path, monkeypatch):
    from tasks import label_preferences
    from tasks.shards import read_shards
    from tests.test_feedback_math import label_inputs

    class Model:  # answers with its directory's name; as a judge, says A declines when A is the policy's reply
        def __init__(self, model_dir):
            self.name, self.asked = Path(model_dir).name, []

        def generate(self, texts, max_new_tokens, temperature, seed, openings=None):
            return [f"{o}{self.name} {seed % 2} {t}" for t, o in zip(texts, openings or [""] * len(texts))]

        def option_logprobs(self, questions, options):
            self.asked.extend(questions)
            return [[math.log(0.9), math.log(0.1)] if "(A): Sorry" in q else [math.log(0.1), math.log(0.9)]
                    for q in questions]

    opened = {}

    def open_feedback(cfg, policy_dir, policy=None):
        model = Path(cfg.model or policy_dir)
        opened.setdefault(model.name, policy if cfg.model is None and policy else Model(model))
        return contextlib.nullcontext(opened[model.name])

    monkeypatch.setattr(label_preferences, "open_feedback", open_feedback)
    prompts, constitution = label_inputs(4)
    config = LabelConfig(prompts=4, samples_per_prompt=2, openings=["Sorry "],
                         factored=FactoredConfig(harmful_question=None))
    label_preferences.label(config, constitution, tmp_path / "sl_cai", prompts, tmp_path / "out",
                            judge_model=tmp_path / "judge")
    records = read_shards(tmp_path / "out")
    assert len(records) == 4 and not opened["sl_cai"].asked and len(opened["judge"].asked) == 8
    assert all("sl_cai" in r["response_a"] and "sl_cai" in r["response_b"] for r in records)  # the policy wrote both
    for r in records:
        a_declines = r["response_a"].startswith("Sorry")
        assert r["p_a"] == pytest.approx(0.9 if a_declines == (r["kind"] == "harmful") else 0.1)
