"""sft's curriculum: some categories trained alone first, then the whole mixture; a crash between the two stages
resumes without redoing the first; a category no conversation has is refused by name."""

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


CONVERSATIONS = chats("fact", 6) + chats("list", 10)
CFG = sft.FinetuneConfig(epochs=1, batch_size=4, curriculum_categories=["fact"], curriculum_steps=3)


def test_curriculum_trains_its_categories_alone_then_the_mixture(base, tmp_path, one_thread):
    metrics = sft.finetune(CFG, base, CONVERSATIONS, tmp_path / "out")
    assert (metrics["curriculum_examples"], metrics["curriculum_steps"]) == (6, 3)
    assert (metrics["examples"], metrics["steps"]) == (16, 4)  # one epoch of all 16 in batches of 4
    assert (tmp_path / "out" / "model" / "config.json").exists()
    assert not (tmp_path / "out" / sft.CURRICULUM_DIR).exists()


def test_a_crash_after_the_curriculum_resumes_without_redoing_it(base, tmp_path, one_thread, monkeypatch):
    calls = []
    real_train = sft.train

    def crash_in_the_mixture(cfg, base, conversations, out_dir, step, max_steps=-1):
        calls.append(len(conversations))
        if len(conversations) == len(CONVERSATIONS) and len(calls) == 2:
            raise KeyboardInterrupt  # killed at the start of the second stage
        return real_train(cfg, base, conversations, out_dir, step, max_steps)

    monkeypatch.setattr(sft, "train", crash_in_the_mixture)
    with pytest.raises(KeyboardInterrupt):
        sft.finetune(CFG, base, CONVERSATIONS, tmp_path / "out")
    metrics = sft.finetune(CFG, base, CONVERSATIONS, tmp_path / "out")
    assert calls == [6, 16, 16]  # the curriculum ran once
    assert metrics["curriculum_steps"] == 3 and metrics["steps"] == 4


def test_a_curriculum_category_no_conversation_has_is_refused_by_name(base, tmp_path):
    cfg = CFG.model_copy(update={"curriculum_categories": ["facts"]})
    with pytest.raises(InputError, match=r"sft.curriculum_categories \['facts'\]: no sft conversation"):
        sft.finetune(cfg, base, CONVERSATIONS, tmp_path / "out")
    assert not (tmp_path / "out").exists()
