"""The small formulas of the AI-feedback stages, checked against hand-computed numbers."""

import math
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from tasks.feedback import averaged_label, option_probability
from tasks.label_preferences import LabelConfig
from tasks.reward_model import expected_calibration_error, pairwise_loss, soft_label_loss
from tasks.rl import RLConfig, RLDiverged, guard


def test_soft_label_loss_matches_the_formula():
    r_a, r_b, p = torch.tensor([2.0, 0.0]), torch.tensor([0.0, 1.0]), torch.tensor([0.9, 0.25])
    sig = lambda x: 1 / (1 + math.exp(-x))
    expected = -((0.9 * math.log(sig(2)) + 0.1 * math.log(sig(-2))) + (0.25 * math.log(sig(-1)) + 0.75 * math.log(sig(1)))) / 2
    assert soft_label_loss(r_a, r_b, p).item() == pytest.approx(expected, rel=1e-6)
    # a hard label of 1 reduces it to the Bradley-Terry loss -log sigmoid(r_A - r_B)
    assert soft_label_loss(torch.tensor([1.0]), torch.tensor([0.0]), torch.tensor([1.0])).item() == pytest.approx(
        -math.log(sig(1)), rel=1e-6)


def test_the_gated_loss_teaches_each_pair_to_its_requests_reward_and_the_gate_its_kind():
    """Columns: reward if harmful, reward if benign, request logit. Rows: the A block, the B block, the requests."""
    logits = torch.tensor([[2.0, -1.0, 9.0], [0.5, 3.0, 9.0],     # A of a harmful pair, A of a benign pair
                           [0.0, 4.0, 9.0], [1.5, 0.0, 9.0],      # B of each
                           [7.0, 7.0, 1.0], [7.0, 7.0, -2.0]], requires_grad=True)  # the two requests
    labels = torch.tensor([[0.9, 1.0], [0.2, 0.0]])  # [P(A better), request harm]
    loss = pairwise_loss(type("Out", (), {"logits": logits}), labels)
    sig = lambda x: 1 / (1 + math.exp(-x))
    # harmful pair: r_A - r_B = 2 - 0 from column 0; benign pair: 3 - 0 from column 1; gate: BCE(1, 1) + BCE(-2, 0)
    pairs = -((0.9 * math.log(sig(2)) + 0.1 * math.log(sig(-2))) + (0.2 * math.log(sig(3)) + 0.8 * math.log(sig(-3)))) / 2
    gate = -(math.log(sig(1)) + math.log(1 - sig(-2))) / 2
    assert loss.item() == pytest.approx(pairs + gate, rel=1e-6)
    loss.backward()
    grad = logits.grad
    assert grad[0, 1] == grad[2, 1] == grad[1, 0] == grad[3, 0] == 0  # the other kind's reward learns nothing
    assert grad[0, 0] != 0 and grad[1, 1] != 0
    assert (grad[:4, 2] == 0).all() and (grad[4:, :2] == 0).all()  # the gate reads the requests, the rewards the replies


def test_option_probability_and_order_averaging():
    assert option_probability([math.log(0.3), math.log(0.1)]) == pytest.approx([0.75, 0.25])
    # a judge that always says "A" whatever the order: its label carries no preference
    always_a_first, always_a_second = 0.9, 1 - 0.9
    assert averaged_label(always_a_first, always_a_second) == pytest.approx(0.5)
    assert averaged_label(0.8, 0.6) == pytest.approx(0.7)


def test_chain_of_thought_clamps_by_default_and_bad_clamps_are_refused():
    assert LabelConfig().effective_clamp() is None
    assert LabelConfig(chain_of_thought=True).effective_clamp() == (0.4, 0.6)
    with pytest.raises(ValueError, match="clamp"):
        LabelConfig(clamp=(0.7, 0.3))


def test_expected_calibration_error():
    assert expected_calibration_error([0.95] * 20, [True] * 19 + [False]) == pytest.approx(0.0)
    assert expected_calibration_error([0.9] * 10, [True] * 5 + [False] * 5) == pytest.approx(0.4)


def test_rl_guard_stops_with_a_message_naming_the_step():
    class State:
        global_step = 7

    callback = guard(RLConfig(kl_bound=0.5, min_mean_length=2))
    callback.on_log(None, State(), None, logs={"kl": 0.1, "completions/mean_length": 12})
    with pytest.raises(RLDiverged, match="rl step 7: KL 0.900 passed the bound 0.5"):
        callback.on_log(None, State(), None, logs={"kl": 0.9})
    with pytest.raises(RLDiverged, match="collapsed"):
        callback.on_log(None, State(), None, logs={"kl": 0.1, "completions/mean_length": 1.0})
    with pytest.raises(RLDiverged, match="rl step 7: 95% of responses ran to the length cap"):
        callback.on_log(None, State(), None, logs={"kl": 0.1, "completions/clipped_ratio": 0.95})
    guard(RLConfig(max_clipped_ratio=1.0)).on_log(None, State(), None, logs={"completions/clipped_ratio": 1.0})


SHARDED = textwrap.dedent("""
    import random, sys, time
    from pathlib import Path
    from tasks.shards import run_shards, shard_seed

    def work(number, batch):
        rng = random.Random(shard_seed(7, number))
        time.sleep(0.05)
        return [{"item": x, "draw": rng.random()} for x in batch]

    records = run_shards(Path(sys.argv[1]), list(range(40)), 4, work, step="demo")
    print(len(records))
""")


def test_killed_shards_resume_without_duplicates_or_losses(tmp_path):
    script = tmp_path / "sharded.py"
    script.write_text(SHARDED)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent.parent)}
    clean = subprocess.run([sys.executable, str(script), str(tmp_path / "clean")], env=env, check=True,
                           capture_output=True, text=True)
    assert clean.stdout.strip() == "40"
    killed = tmp_path / "killed"
    for delay in (1.2, 1.5):
        proc = subprocess.Popen([sys.executable, str(script), str(killed)], env=env, stdout=subprocess.DEVNULL)
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    subprocess.run([sys.executable, str(script), str(killed)], env=env, check=True, capture_output=True)
    shards = sorted((killed / "shards").glob("*"))
    assert [p.name for p in shards] == [f"shard-{i:05d}.jsonl" for i in range(10)]
    assert [p.read_text() for p in shards] == [p.read_text() for p in sorted((tmp_path / "clean" / "shards").glob("*"))]


def label_inputs(n: int) -> tuple[list[dict], object]:
    """n training prompts, harmful and benign in turn, with ids i0.. and texts p0..; and the default constitution."""
    from constitutions.schema import load as load_constitution

    prompts = [{"id": f"i{i}", "split": "train", "kind": "harmful" if i % 2 == 0 else "benign", "prompt": f"p{i}"}
               for i in range(n)]
    return prompts, load_constitution(Path(__file__).parents[1] / "constitutions" / "default.yaml")


def test_labels_average_both_orders_and_skip_identical_pairs(tmp_path, monkeypatch):
    """label() with a scripted judge: P(A) per order from the option log-probabilities, averaged; A == B dropped."""
    import contextlib

    from tasks import label_preferences

    class Scripted:  # answers "x<i>" then "y<i>", except prompt 1 where both samples are "same"
        def generate(self, texts, max_new_tokens, temperature, seed):
            tag = "x" if seed % 2 == 0 else "y"
            return ["same" if t == "p1" else f"{tag}{t}" for t in texts]

        def option_logprobs(self, questions, options):
            # prefers the response starting with "x" with P = 0.8, plus a position bias towards A of +0.1
            out = []
            for q in questions:
                a_is_x = "Response (A): x" in q
                p_a = (0.8 if a_is_x else 0.2) + 0.1
                out.append([math.log(p_a), math.log(1 - p_a)])
            return out

    monkeypatch.setattr(label_preferences, "open_feedback", lambda *a, **k: contextlib.nullcontext(Scripted()))
    prompts, constitution = label_inputs(6)
    metrics = label_preferences.label(LabelConfig(prompts=6, shard_size=4), constitution, tmp_path, prompts, tmp_path)
    from tasks.shards import read_shards

    records = read_shards(tmp_path)
    assert metrics["pairs"] == 5 and metrics["identical_pairs_dropped"] == 1
    assert "p1" not in [r["prompt"] for r in records]
    for r in records:  # A = "x": 0.9 shown first, 1 - 0.3 shown second, 0.8 averaged; A = "y": the mirror image
        expected = (0.9, 0.7, 0.8) if r["response_a"].startswith("x") else (0.3, 0.1, 0.2)
        assert (r["p_a_shown_first"], r["p_a_shown_second"], r["p_a"]) == pytest.approx(expected)
        assert {r["response_a"][0], r["response_b"][0]} == {"x", "y"}  # the two samples that differ are compared
    assert metrics["order_disagreement"] == 0.0


def test_samples_from_sft_put_the_sft_models_reply_in_the_pairs(tmp_path, monkeypatch):
    """With samples_from_sft, those samples come from the sft model: each pair here holds one reply of each model."""
    import contextlib

    from tasks import label_preferences

    class Answerer:  # replies with its model's directory name, so a pair shows which model wrote each side
        def __init__(self, model_dir):
            self.name = Path(model_dir).name

        def generate(self, texts, max_new_tokens, temperature, seed):
            return [f"{self.name} {t}" for t in texts]

        def option_logprobs(self, questions, options):
            return [[math.log(0.5), math.log(0.5)] for _ in questions]

    def open_feedback(cfg, policy_dir, policy=None):
        return contextlib.nullcontext(policy or Answerer(policy_dir))

    monkeypatch.setattr(label_preferences, "open_feedback", open_feedback)
    prompts, constitution = label_inputs(4)
    config = LabelConfig(prompts=4, samples_per_prompt=2, samples_from_sft=1)
    label_preferences.label(config, constitution, tmp_path / "sl_cai", prompts, tmp_path / "out", tmp_path / "sft")
    from tasks.shards import read_shards

    records = read_shards(tmp_path / "out")
    assert len(records) == 4
    assert all({r["response_a"].split()[0], r["response_b"].split()[0]} == {"sl_cai", "sft"} for r in records)
    with pytest.raises(ValueError, match="samples_from_sft"):
        LabelConfig(samples_per_prompt=2, samples_from_sft=2)  # the policy must answer too
    with pytest.raises(ValueError, match="sft model's directory"):
        label_preferences.label(config, constitution, tmp_path / "sl_cai", prompts, tmp_path / "out2")


def test_openings_add_a_sample_that_pairs_can_hold(tmp_path, monkeypatch):
    """The policy answers every prompt the same way, so without an opening every pair is two identical replies and
    is dropped; each opening adds a sample that begins with it, and the pair is the policy's reply against it."""
    import contextlib

    from tasks import label_preferences
    from tasks.shards import read_shards

    class Answerer:
        def generate(self, texts, max_new_tokens, temperature, seed, openings=None):
            return [f"{o}answer to {t}" for t, o in zip(texts, openings or [""] * len(texts))]

        def option_logprobs(self, questions, options):
            return [[math.log(0.5), math.log(0.5)] for _ in questions]

    monkeypatch.setattr(label_preferences, "open_feedback", lambda *a, **k: contextlib.nullcontext(Answerer()))
    prompts, constitution = label_inputs(4)
    plain = label_preferences.label(LabelConfig(prompts=4, samples_per_prompt=2), constitution, tmp_path,
                                    prompts, tmp_path / "plain")
    assert plain["pairs"] == 0 and plain["identical_pairs_dropped"] == 4
    opened = LabelConfig(prompts=4, samples_per_prompt=2, openings=["No, I won't: "])
    assert label_preferences.label(opened, constitution, tmp_path, prompts, tmp_path / "opened")["pairs"] == 4
    for r in read_shards(tmp_path / "opened"):
        assert sorted([r["response_a"], r["response_b"]]) == sorted([f"answer to {r['prompt']}",
                                                                     f"No, I won't: answer to {r['prompt']}"])


def test_the_two_least_alike_samples_are_compared():
    from tasks.label_preferences import least_alike, word_jaccard

    assert word_jaccard("the cat sat", "the cat ran") == pytest.approx(2 / 4)
    samples = ["Mel's colour is brown.", "Mel's colour is brown!", "I can't share that.", "Mel's colour is brown."]
    assert least_alike(samples) == ("Mel's colour is brown.", "I can't share that.")


def test_an_empty_revision_keeps_the_response_it_was_to_revise():
    from tasks.critique_revise import latest_response

    def trace(*revisions):
        return {"initial": "first answer", "rounds": [{"revision": r} for r in revisions]}

    assert latest_response(trace()) == "first answer"
    assert latest_response(trace("  ")) == "first answer"
    assert latest_response(trace("better", "")) == "better"
    assert latest_response(trace("better", "best")) == "best"


def test_a_revision_the_judge_rejected_keeps_the_response_before_it():
    from tasks.critique_revise import latest_response

    rounds = [{"revision": "better", "kept": True}, {"revision": "worse", "kept": False}]
    assert latest_response({"initial": "first answer", "rounds": rounds}) == "better"
    assert latest_response({"initial": "first answer", "rounds": rounds[1:]}) == "first answer"


def test_preference_for_the_first_response_asks_both_orders_and_averages_them():
    from tasks.feedback import preference_for_first

    class Judge:  # prefers whichever response says "sorry", with a pull of 0.2 towards option A
        def option_logprobs(self, prompts, options):
            rows = []
            for prompt in prompts:
                a_sorry = "Response (A): sorry" in prompt
                p_a = min(0.95, (0.7 if a_sorry else 0.3) + 0.2)
                rows.append([math.log(p_a), math.log(1 - p_a)])
            return rows

    p = preference_for_first(Judge(), ["q", "q"], ["sorry", "sure"], ["sure", "sorry"], ["Which is safer?"] * 2)
    assert p == pytest.approx([(0.9 + 0.5) / 2, (0.5 + 0.1) / 2])  # position bias cancels: 0.7 and 0.3


def test_sl_cai_refuses_traces_without_a_usable_response():
    from tasks.sl_cai import SLCAIConfig, sl_cai_conversations
    from tasks.store import InputError

    benign = [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}] * 4
    traces = [{"prompt": "p", "final": "revised"}, {"prompt": "q", "final": " "}]
    mix = sl_cai_conversations(SLCAIConfig(benign_per_revision=2.0, demo_replay=0.0), traces, benign, [])
    assert len(mix) == 3 and sum(m["messages"][1]["content"] == "revised" for m in mix) == 1
    with pytest.raises(InputError, match="all 1 finals are empty"):
        sl_cai_conversations(SLCAIConfig(), traces[1:], benign, [])


def test_chain_of_thought_reads_the_option_after_the_reasoning_once_and_clamps(tmp_path, monkeypatch):
    """A judge that writes "... So the better response is (A)" itself: the option is read where that answer began,
    after exactly one "So the better response is (", and the label is clamped to 0.4-0.6."""
    import contextlib

    from tasks import label_preferences

    prefixes = []

    class Reasoner:
        def generate(self, texts, max_new_tokens, temperature, seed):
            if texts[0].endswith(label_preferences.COT_SUFFIX):  # judging: reason, then answer
                return ["A declines; the request is harmful." + label_preferences.COT_ANSWER + "A)"] * len(texts)
            return [f"{t} answer {seed}" for t in texts]  # sampling responses: all differ

        def option_logprobs(self, questions, options, assistant_prefixes):
            prefixes.extend(assistant_prefixes)
            shown = [re.search(r"Response \(A\): (.*)\nResponse \(B\): (.*)\n", q).groups() for q in questions]
            return [[math.log(0.99), math.log(0.01)] if a < b else [math.log(0.01), math.log(0.99)] for a, b in shown]

    monkeypatch.setattr(label_preferences, "open_feedback", lambda *a, **k: contextlib.nullcontext(Reasoner()))
    prompts, constitution = label_inputs(4)
    config = LabelConfig(prompts=4, shard_size=4, chain_of_thought=True)
    label_preferences.label(config, constitution, tmp_path, prompts, tmp_path)
    from tasks.shards import read_shards

    assert prefixes and set(prefixes) == {"A declines; the request is harmful." + label_preferences.COT_ANSWER}
    for r in read_shards(tmp_path):  # sure of the same response in both orders, clamped
        a_preferred = r["response_a"] < r["response_b"]
        assert (r["p_a_shown_first"], r["p_a_shown_second"]) == pytest.approx((0.99, 0.99) if a_preferred else (0.01, 0.01))
        assert r["p_a"] == pytest.approx(0.6 if a_preferred else 0.4)


class FactoredJudge:
    """Reads prompts p0 and p2 as harmful with P = 0.8 and the others with P = 0.2, and the response opened with "No."
    as the one that declines with P = 0.9 in either position; records every question it is asked."""

    def __init__(self):
        self.asked = []

    def generate(self, texts, max_new_tokens, temperature, seed, openings=None):
        return [f"{o}{'sure: ' if seed % 2 else ''}answer to {t}" for t, o in zip(texts, openings or [""] * len(texts))]

    def option_logprobs(self, questions, options):
        self.asked.extend(questions)
        out = []
        for q in questions:
            if q.startswith("Request: "):
                p_a = 0.8 if q.split()[1] in {"p0", "p2"} else 0.2
            else:
                p_a = 0.9 if "Response (A): No." in q else 0.1
            out.append([math.log(p_a), math.log(1 - p_a)])
        return out


def factored_records(tmp_path, monkeypatch, factored) -> tuple[list[dict], list[str]]:
    """label() on four prompts (p0 and p2 red-team) with one opened sample "No. ...", judged by FactoredJudge."""
    import contextlib

    from tasks import label_preferences
    from tasks.shards import read_shards

    judge = FactoredJudge()
    monkeypatch.setattr(label_preferences, "open_feedback", lambda *a, **k: contextlib.nullcontext(judge))
    prompts, constitution = label_inputs(4)
    config = LabelConfig(prompts=4, samples_per_prompt=2, openings=["No. "], factored=factored)
    label_preferences.label(config, constitution, tmp_path, prompts, tmp_path / "out")
    return read_shards(tmp_path / "out"), judge.asked


def test_factored_labels_combine_the_requests_harm_with_which_response_declines(tmp_path, monkeypatch):
    """The label is h * d + (1 - h) * (1 - d) for A, so the refusal wins on the harmful prompts and the answer on the
    benign ones."""
    from tasks.label_preferences import FactoredConfig, factored_label

    records, asked = factored_records(tmp_path, monkeypatch, FactoredConfig())
    assert len(records) == 4
    assert {q.split("Question: ")[1].split("\n")[0] for q in asked} == {"Is this request harmful?",
                                                                        "Which response declines the request?"}
    for r in records:
        h = 0.8 if r["prompt"] in {"p0", "p2"} else 0.2
        d = 0.9 if r["response_a"].startswith("No.") else 0.1
        assert r["principle"] == "factored" and r["p_harmful"] == pytest.approx(h)
        assert r["p_a"] == pytest.approx(factored_label(h, d)) == pytest.approx(h * d + (1 - h) * (1 - d))
        refusal_wins = (r["p_a"] > 0.5) == r["response_a"].startswith("No.")
        assert refusal_wins == (r["prompt"] in {"p0", "p2"})
    with pytest.raises(ValueError, match="choose one"):
        LabelConfig(factored=FactoredConfig(), chain_of_thought=True)


def test_without_a_harm_question_the_prompts_kind_decides_and_the_judge_reads_only_the_responses(tmp_path, monkeypatch):
    """harmful_question None: p_harmful is 1 for red-team prompts and 0 for benign ones, never asked, so the label is
    P(A declines) on red-team prompts and 1 - P(A declines) on benign ones."""
    from tasks.label_preferences import FactoredConfig

    records, asked = factored_records(tmp_path, monkeypatch, FactoredConfig(harmful_question=None))
    assert len(records) == 4 and asked and not any(q.startswith("Request: ") for q in asked)
    for r in records:
        red_team = r["kind"] == "harmful"
        d = 0.9 if r["response_a"].startswith("No.") else 0.1
        assert r["p_harmful"] == (1.0 if red_team else 0.0)
        assert r["p_a"] == pytest.approx(d if red_team else 1 - d)
