"""The multimodal post-training steps: sft_multimodal resumes exactly from its checkpoints after a crash and trains
the answer only; evaluate_multimodal grades generated answers per modality and attribute on held-out combinations."""

import json

import pytest
import torch
from safetensors.torch import load_file

from data import multimodal as mm
from models.multimodal import MultimodalConfig, MultimodalForCausalLM, MultimodalProcessor
from tasks.evaluate_multimodal import MultimodalEvalConfig, evaluate_multimodal
from tasks.sft_multimodal import MultimodalSFTConfig, finetune_multimodal

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def base(tokenizer, tmp_path_factory):
    """A small multimodal backbone saved with its processor, as pretrain_multimodal leaves it."""
    folder = tmp_path_factory.mktemp("base")
    config = MultimodalConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                              expert_intermediate_size=32, pad_token_id=tokenizer.pad_token_id,
                              bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    MultimodalForCausalLM(config).save_pretrained(folder)
    MultimodalProcessor(tokenizer, config).save_pretrained(folder)
    return folder


def test_sft_resumes_from_its_checkpoint_to_the_same_weights(base, tmp_path):
    cfg = MultimodalSFTConfig(max_steps=4, checkpoint_every=2, batch_size=4, lr=3e-3)

    class Crash(Exception):
        pass

    def crash_at_3(step):
        if step == 3:
            raise Crash

    whole = finetune_multimodal(cfg, base, tmp_path / "whole")
    with pytest.raises(Crash):
        finetune_multimodal(cfg, base, tmp_path / "crashed", on_step_end=crash_at_3)
    assert sorted(p.name for p in (tmp_path / "crashed" / "checkpoints").glob("checkpoint-*")) == ["checkpoint-2"]
    seen = []
    resumed = finetune_multimodal(cfg, base, tmp_path / "crashed", on_step_end=seen.append)
    assert seen == [3, 4]  # resumed from step 2, not retrained from scratch
    assert whole["steps"] == resumed["steps"] == 4
    a, b = load_file(tmp_path / "whole/model/model.safetensors"), load_file(tmp_path / "crashed/model/model.safetensors")
    start = load_file(base / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["model.embed_tokens.weight"], start["model.embed_tokens.weight"])
    assert MultimodalProcessor.from_pretrained(tmp_path / "whole" / "model").slots("image", None) == 16
    assert not (tmp_path / "whole" / "checkpoints").exists()


def test_sft_trains_the_answers_only(base, tmp_path, monkeypatch):
    """The labels the Trainer sees hold exactly each answer and its end token."""
    seen = []
    real = MultimodalForCausalLM.forward

    def recording(self, *args, labels=None, **kwargs):
        seen.append(labels)
        return real(self, *args, labels=labels, **kwargs)

    monkeypatch.setattr(MultimodalForCausalLM, "forward", recording)
    finetune_multimodal(MultimodalSFTConfig(max_steps=1, batch_size=3), base, tmp_path)
    processor = MultimodalProcessor.from_pretrained(base)
    labelled = {tuple(row[row != -100].tolist()) for row in seen[0]}
    eos = processor.tokenizer.eos_token_id
    answers = {tuple(processor.tokenizer(v, add_special_tokens=False)["input_ids"] + [eos])
               for values in (vs for attrs in mm.ATTRIBUTES.values() for vs in attrs.values()) for v in values}
    assert len(seen[0]) == 3 and labelled <= answers


def test_evaluate_grades_every_heldout_question_per_modality(base, tmp_path):
    metrics = evaluate_multimodal(MultimodalEvalConfig(heldout_samples=6, train_samples=3, max_new_tokens=3),
                                  base, tmp_path)
    answers = [json.loads(line) for line in (tmp_path / "answers.jsonl").read_text().splitlines()]
    heldout = [a for a in answers if a["split"] == "heldout"]
    assert len(heldout) == 2 * 4 + 2 * 4 + 2 * 3  # two samples per modality, every attribute asked
    assert len(answers) - len(heldout) == 4 + 4 + 3
    for modality in mm.ATTRIBUTES:
        mine = [a for a in heldout if a["modality"] == modality]
        assert metrics[f"heldout/{modality}"] == pytest.approx(sum(a["right"] for a in mine) / len(mine), abs=1e-4)
        for a in mine:
            assert a["right"] == mm.answer_is_right(a["answer"], a["attribute"], a["value"])
    pair_of = {m: (a, b) for m, (a, b, _) in mm.HELDOUT_PAIRS.items()}
    for index in {a["index"] for a in heldout}:  # each one shows a pair that training never does
        s = mm.sample("heldout", index)
        a, b = pair_of[s["modality"]]
        assert (s["attributes"][a], s["attributes"][b]) in mm.HELDOUT_PAIRS[s["modality"]][2]
    assert json.loads((tmp_path / "metrics.json").read_text()) == metrics
    assert "heldout/audio.pitch" in metrics and "train/video" in metrics
