"""sft's curriculum: stages of some categories (or demonstration roles) trained alone, in order, then the whole
mixture; a stage can end once its loss says its skill has formed; a crash after a stage resumes without redoing it;
a category no conversation has is refused by name."""

import pytest

from tasks import sft
from tasks.store import InputError


@pytest.fixture
def base(tmp_path, tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=128, pad_token_id=tokenizer.pad_token_id,
                         eos_token_id=tokenizer.eos_token_id)
    LlamaForCausalLM(config).save_pretrained(tmp_path / "base")
    tokenizer.save_pretrained(tmp_path / "base")
    return tmp_path / "base"


def chats(category: str, n: int) -> list[dict]:
    return [{"category": category, "messages": [{"role": "user", "content": f"Say {i}."},
                                                {"role": "assistant", "content": f"The number is {i}."}]}
            for i in range(n)]


CONVERSATIONS = chats("fact", 6) + chats("copy", 2) + chats("list", 8)


def stages(*specs) -> list[sft.CurriculumStage]:
    return [sft.CurriculumStage(categories=categories, steps=steps) for categories, steps in specs]


CFG = sft.FinetuneConfig(epochs=1, batch_size=4, curriculum=stages((["copy"], 2), (["fact"], 3)))


def test_curriculum_trains_each_stage_alone_in_order_then_the_mixture(base, tmp_path, one_thread):
    metrics = sft.finetune(CFG, base, CONVERSATIONS, tmp_path / "out")
    assert [(s["categories"], s["examples"], s["steps"]) for s in metrics["curriculum"]] == [(["copy"], 2, 2),
                                                                                             (["fact"], 6, 3)]
    assert (metrics["examples"], metrics["steps"]) == (16, 4)  # one epoch of all 16 in batches of 4
    assert (tmp_path / "out" / "model" / "config.json").exists()
    assert not (tmp_path / "out" / sft.CURRICULUM_DIR).exists()


def test_the_curriculum_keeps_its_learning_rate_and_the_mixture_anneals(base, tmp_path, one_thread):
    import json

    cfg = CFG.model_copy(update={"epochs": 3, "curriculum": stages((["fact"], 12))})
    sft.finetune(cfg, base, CONVERSATIONS, tmp_path / "out")  # the mixture: 3 epochs of 4 batches
    curriculum = json.loads((tmp_path / "out" / "curriculum_0_log_history.json").read_text())
    mixture = json.loads((tmp_path / "out" / "log_history.json").read_text())
    rate = {name: next(h["learning_rate"] for h in history if h.get("step") == 10)
            for name, history in (("curriculum", curriculum), ("mixture", mixture))}
    assert rate["curriculum"] == pytest.approx(cfg.lr)  # step 10 of 12: still the full rate
    assert rate["mixture"] < 0.2 * cfg.lr  # step 10 of 12 of the cosine: nearly annealed


def test_a_crash_after_the_curriculum_resumes_without_redoing_it(base, tmp_path, one_thread, monkeypatch):
    calls = []
    real_train = sft.train

    def crash_in_the_mixture(cfg, base, conversations, out_dir, step, **stage):
        calls.append(len(conversations))
        if len(conversations) == len(CONVERSATIONS) and len(calls) == 3:
            raise KeyboardInterrupt  # killed at the start of the mixture
        return real_train(cfg, base, conversations, out_dir, step, **stage)

    monkeypatch.setattr(sft, "train", crash_in_the_mixture)
    with pytest.raises(KeyboardInterrupt):
        sft.finetune(CFG, base, CONVERSATIONS, tmp_path / "out")
    metrics = sft.finetune(CFG, base, CONVERSATIONS, tmp_path / "out")
    assert calls == [2, 6, 16, 16]  # each curriculum stage ran once
    assert [s["steps"] for s in metrics["curriculum"]] == [2, 3] and metrics["steps"] == 4


def test_a_curriculum_category_no_conversation_has_is_refused_by_name(base, tmp_path):
    cfg = CFG.model_copy(update={"curriculum": stages((["copy"], 2), (["facts"], 3))})
    with pytest.raises(InputError, match=r"sft.curriculum\[1\]: no sft conversation has one of the categories "
                                         r"\['facts'\] or roles \[\]"):
        sft.finetune(cfg, base, CONVERSATIONS, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_stage_picks_demonstrations_by_role(base, tmp_path, one_thread):
    demos = [{**c, "role": "twin_comparison_kind"} for c in chats("", 3)] + [{**c, "role": "comparison"} for c in chats("", 5)]
    for c in demos:
        del c["category"]
    cfg = CFG.model_copy(update={"curriculum": [sft.CurriculumStage(roles=["twin_comparison_kind"], steps=1),
                                                sft.CurriculumStage(categories=["copy"], roles=["comparison"], steps=1)]})
    metrics = sft.finetune(cfg, base, CONVERSATIONS + demos, tmp_path / "out")
    assert [(s["roles"], s["examples"]) for s in metrics["curriculum"]] == [(["twin_comparison_kind"], 3),
                                                                           (["comparison"], 2 + 5)]
    with pytest.raises(ValueError, match="a curriculum stage needs categories or roles"):
        sft.CurriculumStage(steps=1)


def test_the_loss_weighs_every_conversation_the_same_not_every_token(base, tmp_path, one_thread):
    import datasets
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig

    tokenizer, model = AutoTokenizer.from_pretrained(base), AutoModelForCausalLM.from_pretrained(base)
    long_reply = {"messages": [{"role": "user", "content": "Add 2 and 3."},
                               {"role": "assistant", "content": "2 plus 3 is 5, and 5 plus 5 is 10, and so on."}]}
    verdict = {"messages": [{"role": "user", "content": "Which is better?"}, {"role": "assistant", "content": "A"}]}
    args = SFTConfig(output_dir=str(tmp_path / "ckpt"), assistant_only_loss=True, per_device_train_batch_size=2,
                     use_cpu=True, report_to=[], max_steps=1, activation_checkpointing=False)
    trainer = sft.conversation_mean_trainer()(model=model, args=args, processing_class=tokenizer,
                                              train_dataset=datasets.Dataset.from_list([long_reply, verdict]))
    batch = next(iter(trainer.get_train_dataloader()))
    long_row = int((batch["labels"] != -100).sum(1).argmax())
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(20):  # the long reply learnt, the verdict not: the two means now differ by a lot
        model(input_ids=batch["input_ids"][long_row:long_row + 1], labels=batch["labels"][long_row:long_row + 1]).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    with torch.no_grad():
        loss = trainer.compute_loss(model, dict(batch)).item()
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    labels = batch["labels"][:, 1:]
    nll = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), labels.clamp(min=0), reduction="none")
    nll = nll * (labels != -100)
    tokens = (labels != -100).sum(1)
    per_conversation = nll.sum(1) / tokens
    assert tokens.min() <= 3 < tokens.max()  # a one-letter verdict (and its end token) beside a long reply
    assert loss == pytest.approx(per_conversation.mean().item(), rel=1e-4)
    assert loss > 1.5 * (nll.sum() / tokens.sum()).item()  # TRL's token mean hides the unlearnt verdict


def test_parts_of_similar_length_give_the_batchs_loss_and_gradient_with_less_padding(base, tmp_path, one_thread):
    import datasets
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig

    tokenizer, model = AutoTokenizer.from_pretrained(base), AutoModelForCausalLM.from_pretrained(base)
    rows = [{"messages": [{"role": "user", "content": "Count" + " and more" * i + "."},
                          {"role": "assistant", "content": " ".join(["one"] * (1 + 3 * i))}]} for i in range(8)]
    args = SFTConfig(output_dir=str(tmp_path / "ckpt"), assistant_only_loss=True, per_device_train_batch_size=8,
                     use_cpu=True, report_to=[], max_steps=1, activation_checkpointing=False)
    widths = []
    model.register_forward_pre_hook(lambda _, a, kw: widths.append(kw["input_ids"].shape), with_kwargs=True)

    def loss_and_grads(groups):
        trainer = sft.conversation_mean_trainer(groups)(model=model, args=args, processing_class=tokenizer,
                                                        train_dataset=datasets.Dataset.from_list(rows))
        batch = dict(next(iter(trainer.get_train_dataloader())))
        model.zero_grad()
        widths.clear()
        loss = trainer.compute_loss(model, batch)
        loss.backward()
        return loss.item(), [p.grad.clone() for p in model.parameters()], list(widths), batch["input_ids"].shape

    loss, grads, whole, (batch_rows, batch_width) = loss_and_grads(1)
    loss_4, grads_4, parts, _ = loss_and_grads(4)
    assert whole == [(batch_rows, batch_width)]
    assert [r for r, _ in parts] == [2, 2, 2, 2] and parts[0][1] < parts[-1][1] == batch_width  # shortest first
    assert sum(r * w for r, w in parts) < 0.75 * batch_rows * batch_width  # a quarter of the padded positions saved
    assert loss_4 == pytest.approx(loss, rel=1e-6)
    for g, g_4 in zip(grads, grads_4):
        torch.testing.assert_close(g_4, g, rtol=1e-5, atol=1e-7)


def test_a_stage_with_until_loss_ends_once_its_skill_has_formed(base, tmp_path, one_thread):
    """It stops at the first log (every 10 steps) where the last three losses are all below until_loss, well before
    its `steps` (without until_loss a stage trains all of them: the first test)."""
    import json

    stage = sft.CurriculumStage(categories=["copy"], steps=300, until_loss=1.0)
    cfg = CFG.model_copy(update={"lr": 1e-2, "curriculum": [stage]})
    metrics = sft.finetune(cfg, base, CONVERSATIONS, tmp_path / "out")
    losses = [h["loss"] for h in json.loads((tmp_path / "out" / "curriculum_0_log_history.json").read_text())
              if "loss" in h]
    assert metrics["curriculum"][0]["steps"] == 10 * len(losses) < 300
    assert max(losses[-3:]) < 1.0 <= max(losses[-4:])  # the first time the rule held, not later
    with pytest.raises(ValueError, match="until_loss"):
        sft.CurriculumStage(categories=["copy"], steps=10, until_loss=0)
