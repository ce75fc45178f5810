"""The reward model's report against the world's true pairs, apart from training it (test_pipeline trains it)."""

from types import SimpleNamespace

import torch

from tasks import reward_model


def test_held_out_accuracy_is_reported_by_kind_and_split_with_the_gates_reading(monkeypatch):
    """A gated head that reads one new-phrasing insult request as harmless ranks its pair wrong: the report puts the
    miss in new phrasings and harmful requests, on the gate's reading, and not on the rewards once the kind is known."""
    pairs = [{"prompt": f"{split} {kind}", "kind": kind, "split": f"heldout_{split}", "better": better, "worse": worse}
             for split in ("entity", "phrasing")
             for kind, better, worse in (("benign", "answer", "refusal"), ("harmful", "refusal", "answer"))]
    # Outputs are (reward if harmful, reward if benign, request logit): a refusal wins under a harmful request only.
    monkeypatch.setattr(reward_model, "reply_outputs", lambda model, tokenizer, prompts, replies, max_length:
                        torch.tensor([[1.0, 0.0, 0.0] if r == "refusal" else [0.0, 1.0, 0.0] for r in replies]))
    reading = {"entity benign": 0.0, "entity harmful": 1.0, "phrasing benign": 0.0, "phrasing harmful": 0.1}
    monkeypatch.setattr(reward_model, "request_gates", lambda model, tokenizer, prompts, max_length: reading)
    gated = SimpleNamespace(config=SimpleNamespace(num_labels=3))

    metrics = reward_model.judge_true_pairs(gated, None, pairs, max_length=64)

    assert metrics["heldout_accuracy"] == 0.75
    assert (metrics["heldout_accuracy_entity"], metrics["heldout_accuracy_phrasing"]) == (1.0, 0.5)
    assert (metrics["heldout_accuracy_benign"], metrics["heldout_accuracy_harmful"]) == (1.0, 0.5)
    assert metrics["heldout_request_accuracy"] == 0.75
    assert (metrics["heldout_request_accuracy_entity"], metrics["heldout_request_accuracy_phrasing"]) == (1.0, 0.5)
    assert metrics["heldout_accuracy_kind_known"] == 1.0
