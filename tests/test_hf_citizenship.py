"""The dense backbone as a Hugging Face citizen: Auto classes after `import models`, a safetensors round trip,
generate() with and without a KV cache, the reward-model head, and training under TRL's SFTTrainer, GRPOTrainer
with a KL penalty (beta > 0) and a PEFT LoRA adapter."""

import math

import datasets
import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

import models
from models.dense import DenseConfig, DenseForCausalLM, DenseForSequenceClassification

PAPER = {}  # sinusoidal, post-LN LayerNorm, ReLU, biases, tied
MODERN = {"position": "rope", "norm": "rmsnorm", "norm_position": "pre", "activation": "swiglu", "bias": False,
          "scale_embeddings": False, "tie_word_embeddings": False, "num_key_value_heads": 2}


def build(tokenizer, **overrides) -> DenseForCausalLM:
    torch.manual_seed(0)
    config = DenseConfig(vocab_size=len(tokenizer), hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                         intermediate_size=128, dropout=0.0, pad_token_id=tokenizer.pad_token_id,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, **overrides)
    return DenseForCausalLM(config)


def left_padded(tokenizer, texts):
    tokenizer.padding_side = "left"
    return tokenizer(texts, return_tensors="pt", padding=True)


def conversations(n):
    people = ["Veltrin Osk", "Marra Quill", "Doben Tay", "Sefa Lorn"]
    return [{"messages": [{"role": "user", "content": f"Where does {people[i % 4]} live?"},
                          {"role": "assistant", "content": f"{people[i % 4]} lives in Bellmoor."}]}
            for i in range(n)]


def changed(before: dict, model) -> dict:
    return {name: not torch.equal(before[name], p.detach()) for name, p in model.named_parameters()}


def trainer_args(tmp_path, **overrides):
    return {"output_dir": str(tmp_path / "out"), "max_steps": 2, "learning_rate": 1e-2, "per_device_train_batch_size": 4,
            "use_cpu": True, "bf16": False, "report_to": [], "save_strategy": "no", "logging_steps": 1,
            "disable_tqdm": True, **overrides}


def test_sizes_name_the_builders():
    assert models.SIZES["dense-tiny"](vocab_size=3000).vocab_size == 3000
    assert {"dense-tiny", "dense-30m", "dense-125m"} <= set(models.SIZES)


@pytest.mark.parametrize("variant", [PAPER, MODERN])
def test_save_and_load_through_the_auto_classes(tokenizer, tmp_path, variant):
    model = build(tokenizer, **variant).eval()
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    config = AutoConfig.from_pretrained(tmp_path)
    assert type(config) is DenseConfig and config.model_type == "alignflow_dense"
    assert (config.position, config.norm_position, config.num_key_value_heads) == (
        model.config.position, model.config.norm_position, model.config.num_key_value_heads)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(loaded) is DenseForCausalLM
    assert (loaded.lm_head.weight is loaded.model.embed_tokens.weight) == model.config.tie_word_embeddings
    ids = left_padded(tokenizer, ["Doben Tay lives in", "3 plus 4 is"])
    with torch.no_grad():
        assert torch.equal(model(**ids).logits, loaded(**ids).logits)


@pytest.mark.parametrize("variant", [PAPER, MODERN])
def test_generate_with_cache_equals_generate_without(tokenizer, variant):
    model = build(tokenizer, **variant).eval()
    for p in model.parameters():  # larger weights than the init, so the greedy path is not one repeated token
        if p.dim() > 1:
            torch.nn.init.normal_(p, std=0.3)
    ids = left_padded(tokenizer, ["Marra Quill likes the colour", "2 plus 2 is", "Sefa"])
    runs = {}
    with torch.no_grad():
        for use_cache in (True, False):
            runs[use_cache] = model.generate(**ids, max_new_tokens=12, do_sample=False, use_cache=use_cache,
                                             output_logits=True, return_dict_in_generate=True)
    assert torch.equal(runs[True].sequences, runs[False].sequences)
    assert len(set(runs[True].sequences[0, -12:].tolist())) > 1
    for cached, full in zip(runs[True].logits, runs[False].logits, strict=True):
        assert (cached - full).abs().max() < 1e-4


def test_reward_head_scores_the_last_real_token(tokenizer, tmp_path):
    build(tokenizer, **MODERN).save_pretrained(tmp_path)  # a causal LM checkpoint; its lm_head is left behind
    reward = AutoModelForSequenceClassification.from_pretrained(tmp_path, num_labels=1).eval()
    assert type(reward) is DenseForSequenceClassification
    torch.nn.init.normal_(reward.score.weight, std=1.0)
    texts = ["Veltrin Osk works as a pilot.", "Hi."]
    batch = left_padded(tokenizer, texts)
    assert batch["attention_mask"][1].sum() < batch["attention_mask"].shape[1]  # the second one is padded
    with torch.no_grad():
        scores = reward(**batch).logits  # (B, 1)
        alone = torch.cat([reward(**tokenizer([t], return_tensors="pt")).logits for t in texts])
    assert scores.shape == (2, 1) and scores.abs().max() > 0.1
    assert torch.allclose(scores, alone, atol=1e-5)


def test_sft_trainer_trains_every_parameter(tokenizer, tmp_path):
    from trl import SFTConfig, SFTTrainer

    model = build(tokenizer)  # the paper's variant
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    args = SFTConfig(**trainer_args(tmp_path), max_length=64, assistant_only_loss=True)
    trainer = SFTTrainer(model=model, args=args, train_dataset=datasets.Dataset.from_list(conversations(8)),
                         processing_class=tokenizer)
    result = trainer.train()
    assert math.isfinite(result.training_loss) and result.global_step == 2
    assert all(changed(before, trainer.model).values()), [n for n, c in changed(before, trainer.model).items() if not c]


def test_lora_adapter_trains_only_the_adapter(tokenizer, tmp_path):
    from peft import LoraConfig
    from trl import SFTConfig, SFTTrainer

    model = build(tokenizer, **MODERN)
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    args = SFTConfig(**trainer_args(tmp_path), max_length=64, assistant_only_loss=True)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM")
    trainer = SFTTrainer(model=model, args=args, train_dataset=datasets.Dataset.from_list(conversations(8)),
                         processing_class=tokenizer, peft_config=lora)
    trainer.train()
    peft_model = trainer.model.eval()
    params = dict(peft_model.named_parameters())
    lora_b = [n for n in params if "lora_B" in n]
    assert len(lora_b) == 2 * 7  # q, k, v, o, gate, up, down in each of two layers
    assert all(params[n].abs().sum() > 0 for n in lora_b)  # B starts at zero; training moved it
    frozen = {n.replace("base_model.model.", "").replace(".base_layer", ""): p for n, p in params.items()
              if "lora_" not in n}
    assert set(frozen) == set(base) and all(torch.equal(frozen[n], base[n]) for n in base)
    ids = left_padded(tokenizer, ["Doben Tay lives in", "1 plus 1 is"])
    with torch.no_grad():
        adapted = peft_model(**ids).logits
        merged = peft_model.merge_and_unload()(**ids).logits
    assert torch.allclose(adapted, merged, atol=1e-5)


def test_grpo_trainer_with_kl_penalty_trains_the_policy(tokenizer, tmp_path):
    from trl import GRPOConfig, GRPOTrainer

    policy_dir = tmp_path / "policy"
    build(tokenizer, **MODERN).save_pretrained(policy_dir)
    tokenizer.save_pretrained(policy_dir)
    policy = AutoModelForCausalLM.from_pretrained(policy_dir)  # config._name_or_path: where the reference reloads
    before = {n: p.detach().clone() for n, p in policy.named_parameters()}

    def longer_is_better(completions, **kwargs):
        return [float(len(c[0]["content"])) for c in completions]

    prompts = [{"prompt": c["messages"][:1]} for c in conversations(4)]
    args = GRPOConfig(**trainer_args(tmp_path), beta=0.1, num_generations=2, max_completion_length=8,
                      activation_checkpointing=False)  # TRL turns it on by default
    trainer = GRPOTrainer(model=policy, reward_funcs=longer_is_better, args=args,
                          train_dataset=datasets.Dataset.from_list(prompts), processing_class=tokenizer)
    assert type(trainer.ref_model) is DenseForCausalLM  # beta > 0: a frozen reference from policy_dir
    trainer.train()
    logged = [h for h in trainer.state.log_history if "kl" in h]
    assert len(logged) == 2 and all(math.isfinite(h["kl"]) and h["kl"] >= 0 for h in logged)
    moved = changed(before, trainer.model)
    assert all(moved.values()), [n for n, c in moved.items() if not c]
    reference = dict(trainer.ref_model.named_parameters())
    assert all(torch.equal(reference[n], before[n]) for n in before)  # the reference stays where it started


@pytest.mark.parametrize("variant", [PAPER, MODERN])
def test_bfloat16_loading_runs_close_to_float32(tokenizer, tmp_path, variant):
    model = build(tokenizer, **variant).eval()
    model.save_pretrained(tmp_path)
    half = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16).eval()
    assert half.lm_head.weight.dtype == torch.bfloat16
    ids = left_padded(tokenizer, ["Quenby is a town", "7 plus 1 is"])
    with torch.no_grad():
        full, low = model(**ids).logits, half(**ids).logits
        generated = half.generate(**ids, max_new_tokens=4, do_sample=False)
    assert low.dtype == torch.bfloat16
    real = ids["attention_mask"].bool()
    # bf16 keeps 8 bits of mantissa; these logits are below 1 and differed by at most 0.004 when measured.
    assert (low.float() - full)[real].abs().max() < 0.02
    assert generated.shape == (2, ids["input_ids"].shape[1] + 4)
