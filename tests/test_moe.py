"""The DeepSeek-style MoE backbone: formulas against hand-computed numbers, parity with transformers' DeepseekV3,
cache size, absorbed decoding, expert dispatch, balancing invariants, MTP (speculative decoding: test_speculative.py)."""

import math

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    DeepseekV3Config,
    DeepseekV3ForCausalLM,
)
from transformers.cache_utils import DynamicCache

import models  # noqa: F401  (registers the Auto classes)
from models.balancing import LoadBalanceCallback, bias_update, max_violation, routing_stats, update_biases
from models.moe import (
    MLA,
    MoeForCausalLM,
    SlicedExperts,
    allowed_keys,
    apply_rope,
    from_hf_deepseek_v3,
    grouped_experts,
    grouped_mm_experts,
    mha_kv_elements_per_token,
    mla_kv_elements_per_token,
    mla_softmax_scale,
    moe_tiny,
    mtp_loss,
    rope_inverse_frequencies,
    route,
    sequence_balance_loss,
    sort_by_expert,
)


def tiny(vocab_size=64, **overrides):
    config = moe_tiny(vocab_size)
    config.hidden_size, config.num_hidden_layers, config.intermediate_size = 64, 3, 128
    config.qk_nope_head_dim, config.v_head_dim, config.kv_lora_rank = 16, 16, 24
    for key, value in overrides.items():
        setattr(config, key, value)
    torch.manual_seed(0)
    return MoeForCausalLM(config)


# --- the formulas, on numbers worked by hand ---


def test_rope_frequencies_and_relative_position():
    assert rope_inverse_frequencies(4, 10000.0).tolist() == pytest.approx([1.0, 0.01])
    freqs = rope_inverse_frequencies(8, 10000.0)
    q, k = torch.randn(8), torch.randn(8)

    def rotated(x, position):
        angle = position * freqs
        return apply_rope(x, angle.cos(), angle.sin())

    # A rotation keeps the norm, and q.k depends only on the distance between the positions.
    assert float(rotated(q, 5).norm()) == pytest.approx(float(q.norm()), rel=1e-6)
    assert float(rotated(q, 7) @ rotated(k, 3)) == pytest.approx(float(rotated(q, 14) @ rotated(k, 10)), abs=1e-5)
    # The first pair turns by angle p * 1: (1, 0) at p = pi/2 becomes (0, 1).
    angle = (math.pi / 2) * rope_inverse_frequencies(2, 10000.0)
    assert apply_rope(torch.tensor([1.0, 0.0]), angle.cos(), angle.sin()).tolist() == pytest.approx([0, 1], abs=1e-7)


def test_mla_scale_and_cache_size_formulas():
    assert mla_softmax_scale(128, 64) == pytest.approx(1 / math.sqrt(192))
    # DeepSeek-V2: d_c = 512, d_h^R = 64, 60 layers; MHA with 128 heads of 128 over 60 layers.
    assert mla_kv_elements_per_token(512, 64, 60) == 34_560
    assert mha_kv_elements_per_token(128, 128, 60) == 1_966_080


def test_route_uses_bias_for_selection_only():
    scores = torch.tensor([[0.9, 0.8, 0.1, 0.5]])
    gates, idx = route(scores, torch.zeros(4), top_k=2, normalize=True, scaling=1.0)
    assert sorted(idx[0].tolist()) == [0, 1]
    assert gates[0].tolist() == pytest.approx([0.9 / 1.7, 0.8 / 1.7])
    # A bias of +0.5 on expert 3 makes it win the second slot; its gate is still its own unbiased score.
    gates, idx = route(scores, torch.tensor([0.0, 0.0, 0.0, 0.5]), top_k=2, normalize=True, scaling=2.5)
    assert idx[0].tolist() == [3, 0]
    assert gates[0].tolist() == pytest.approx([2.5 * 0.5 / 1.4, 2.5 * 0.9 / 1.4])
    # Without normalization the gates are the raw affinities times the scaling.
    gates, _ = route(scores, torch.zeros(4), top_k=2, normalize=False, scaling=2.0)
    assert gates[0].tolist() == pytest.approx([1.8, 1.6])


def test_sequence_balance_loss_numbers():
    # Uniform affinities and every expert chosen equally often: f_i = 1, P_i = 1/N_r, L = alpha.
    scores = torch.full((1, 4, 4), 0.5)
    idx = torch.tensor([[[0, 1], [2, 3], [0, 1], [2, 3]]])
    assert float(sequence_balance_loss(scores, idx, alpha=0.1)) == pytest.approx(0.1)
    # One sequence, T = 2, N_r = 2, K_r = 1, both tokens on expert 0: f = (2, 0);
    # s' rows (0.75, 0.25) and (0.5, 0.5) give P = (0.625, 0.375); L = alpha * 2 * 0.625.
    scores = torch.tensor([[[0.6, 0.2], [0.4, 0.4]]])
    idx = torch.tensor([[[0], [0]]])
    assert float(sequence_balance_loss(scores, idx, alpha=1.0)) == pytest.approx(1.25)


def test_bias_update_invariants_after_n_steps():
    gamma, steps = 0.001, 50
    generator = torch.Generator().manual_seed(0)
    bias = torch.zeros(8)
    for _ in range(steps):
        bias = bias_update(bias, torch.randint(0, 100, (8,), generator=generator).float(), gamma)
    assert bias.abs().max() <= steps * gamma + 1e-9
    multiples = bias / gamma
    assert torch.allclose(multiples, multiples.round(), atol=1e-3)
    assert multiples.abs().sum() > 0
    # The direction: the overloaded expert goes down, the underloaded one up, the average one stays.
    assert bias_update(torch.zeros(3), torch.tensor([1.0, 2.0, 3.0]), 0.5).tolist() == [0.5, 0.0, -0.5]
    assert max_violation(torch.tensor([1.0, 2.0, 3.0])) == pytest.approx(0.5)


def test_mtp_loss_is_weighted_mean():
    assert float(mtp_loss([torch.tensor(2.0), torch.tensor(4.0)], 0.3)) == pytest.approx(0.9)


# --- the layers ---


@pytest.mark.parametrize("experts_fn", [SlicedExperts.apply, grouped_mm_experts], ids=["sliced", "grouped_mm"])
def test_grouped_dispatch_equals_per_expert_loop(experts_fn):
    torch.manual_seed(0)
    n, d, inner, experts, k = 40, 16, 8, 6, 2
    x = torch.randn(n, d, requires_grad=True)
    w_gate_up = torch.randn(experts, 2 * inner, d, requires_grad=True)
    w_down = torch.randn(experts, d, inner, requires_grad=True)
    scores = torch.rand(n, experts - 1, requires_grad=True)  # expert 5 is never chosen: an empty slice
    gates, idx = route(scores, torch.zeros(experts - 1), k, True, 1.0)
    token, slot_gates, counts = sort_by_expert(idx, gates, experts)
    assert counts[5] == 0 and counts.sum() == n * k
    ours = experts_fn(x, slot_gates, w_gate_up, w_down, token, counts)
    reference = torch.zeros(n, d)
    for e in range(experts):
        gate, up = (x @ w_gate_up[e].T).chunk(2, dim=-1)
        out = (torch.nn.functional.silu(gate) * up) @ w_down[e].T
        weight = (gates * (idx == e)).sum(-1, keepdim=True)  # g_t,e, zero where token t did not pick e
        reference = reference + weight * out
    assert torch.allclose(ours, reference, atol=1e-4)
    inputs = (x, w_gate_up, w_down, scores)  # the router's scores get their gradient through the gates
    grads = torch.autograd.grad(ours.pow(2).sum(), inputs, retain_graph=True)  # the router's graph is shared
    reference_grads = torch.autograd.grad(reference.pow(2).sum(), inputs)
    for ours_grad, reference_grad in zip(grads, reference_grads, strict=True):
        assert torch.allclose(ours_grad, reference_grad, rtol=1e-4, atol=1e-3)
    assert grads[1][5].abs().max() == 0 and grads[2][5].abs().max() == 0


def test_sliced_experts_backward_passes_gradcheck():
    """The hand-written backward against finite differences, in float64, an empty expert included."""
    torch.manual_seed(0)
    n, d, inner, experts, k = 12, 6, 4, 4, 2
    x = torch.randn(n, d, dtype=torch.float64, requires_grad=True)
    w_gate_up = torch.randn(experts, 2 * inner, d, dtype=torch.float64, requires_grad=True)
    w_down = torch.randn(experts, d, inner, dtype=torch.float64, requires_grad=True)
    gates, idx = route(torch.rand(n, experts - 1, dtype=torch.float64), torch.zeros(experts - 1), k, True, 1.0)
    token, slot_gates, counts = sort_by_expert(idx, gates, experts)
    slot_gates = slot_gates.detach().requires_grad_()
    assert torch.autograd.gradcheck(lambda *a: SlicedExperts.apply(a[0], a[1], a[2], a[3], token, counts),
                                    (x, slot_gates, w_gate_up, w_down))


def test_cpu_dispatch_runs_the_sliced_experts():
    x, w_gate_up, w_down = torch.randn(5, 8, requires_grad=True), torch.randn(4, 6, 8), torch.randn(4, 8, 3)
    gates, idx = route(torch.rand(5, 4), torch.zeros(4), 2, True, 1.0)
    assert type(grouped_experts(x, idx, gates, w_gate_up, w_down).grad_fn).__name__ == "SlicedExpertsBackward"


def test_absorbed_attention_equals_naive():
    config = moe_tiny(64)
    torch.manual_seed(0)
    attention = MLA(config, 0)
    torch.nn.init.normal_(attention.kv_b_proj.weight, std=0.3)
    B, T, S = 2, 3, 9
    q_nope, q_rope = torch.randn(B, T, 4, 32), torch.randn(B, T, 4, 16)
    latent, k_rope = torch.randn(B, S, 32), torch.randn(B, S, 16)
    pad = torch.ones(B, S, dtype=torch.bool)
    pad[1, :4] = False
    mask = allowed_keys(pad, T, S, "cpu")
    naive = attention.attend_naive(q_nope, q_rope, latent, k_rope, mask)
    absorbed, _ = attention.attend_absorbed(q_nope, q_rope, latent, k_rope, mask)
    assert torch.allclose(naive, absorbed, atol=1e-5)


@pytest.mark.parametrize("absorbed", [True, False])
def test_cached_decoding_equals_full_forward(absorbed):
    model = tiny(mla_absorbed=absorbed).eval()
    x = torch.randint(0, 64, (2, 12))
    with torch.no_grad():
        full = model(x, use_cache=False).logits
        cache = DynamicCache()
        steps = [model(x[:, :8], cache=cache, use_cache=True).logits]
        steps += [model(x[:, t : t + 1], cache=cache, use_cache=True).logits for t in range(8, 12)]
    assert torch.allclose(torch.cat(steps, 1), full, atol=1e-5)


def test_kv_cache_holds_latent_and_rope_key_only():
    model = tiny().eval()
    cache = DynamicCache()
    with torch.no_grad():
        model(torch.randint(0, 64, (1, 10)), cache=cache, use_cache=True)
    elements = sum(layer.keys[0, :, 0].numel() + layer.values[0, :, 0].numel() for layer in cache.layers)
    c = model.config
    assert elements == mla_kv_elements_per_token(c.kv_lora_rank, c.qk_rope_head_dim, c.num_hidden_layers)
    assert elements == (24 + 16) * 3
    assert cache.layers[0].keys.shape == (1, 1, 10, 24) and cache.layers[0].values.shape == (1, 1, 10, 16)


def test_left_padding_matches_unpadded():
    model = tiny(pad_token_id=0).eval()
    short, long = torch.randint(1, 64, (1, 5)), torch.randint(1, 64, (1, 9))
    batch = torch.cat([torch.cat([torch.zeros(1, 4, dtype=torch.long), short], 1), long])
    mask = (torch.arange(9) >= torch.tensor([[4], [0]])).long()
    with torch.no_grad():
        padded = model(batch, attention_mask=mask, use_cache=False).logits
        alone = model(short, use_cache=False).logits
        generated = model.generate(batch, attention_mask=mask, max_new_tokens=6, do_sample=False)
        generated_alone = model.generate(short, max_new_tokens=6, do_sample=False)
    assert torch.allclose(padded[0, 4:], alone[0], atol=1e-5)
    assert generated[0, 9:].tolist() == generated_alone[0, 5:].tolist()


@pytest.mark.parametrize(
    ("interleave", "q_lora_rank", "norm_topk_prob", "first_k_dense"),
    [(True, None, True, 1), (False, 24, False, 0), (True, 16, True, 2), (False, None, True, 1)],
)
def test_parity_with_transformers_deepseek_v3(interleave, q_lora_rank, norm_topk_prob, first_k_dense):
    torch.manual_seed(0)
    config = DeepseekV3Config(
        vocab_size=97, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=4, n_shared_experts=1, n_routed_experts=8, num_experts_per_tok=3,
        routed_scaling_factor=2.5, kv_lora_rank=16, q_lora_rank=q_lora_rank, qk_rope_head_dim=8, v_head_dim=12,
        qk_nope_head_dim=16, n_group=1, topk_group=1, first_k_dense_replace=first_k_dense,
        norm_topk_prob=norm_topk_prob, rope_interleave=interleave, initializer_range=0.1,
    )  # fmt: skip
    hf = DeepseekV3ForCausalLM(config).eval()
    for name, buffer in hf.named_buffers():
        if name.endswith("e_score_correction_bias"):  # a trained-looking bias, so selection depends on it
            buffer.copy_(torch.rand_like(buffer) * 0.1)
    ours = from_hf_deepseek_v3(hf).eval()
    x = torch.randint(0, 97, (2, 20))
    with torch.no_grad():
        expected, got = hf(x).logits, ours(x, use_cache=False).logits
    assert expected.abs().max() > 1.0  # weights large enough that a wrong mapping would show
    assert (expected - got).abs().max() < 1e-5


# --- the model as a whole ---


def test_loss_is_lm_plus_balance_plus_mtp():
    model = tiny(seq_aux_alpha=0.01, mtp_loss_weight=0.3, num_mtp_modules=2)
    x = torch.randint(0, 64, (2, 16))
    out = model(x, labels=x)
    lm = torch.nn.functional.cross_entropy(out.logits[:, :-1].reshape(-1, 64), x[:, 1:].reshape(-1))
    assert out.loss.item() == pytest.approx((lm + out.aux_loss + out.mtp_loss).item(), rel=1e-5)
    # Two MoE layers (the first is dense), each near alpha at initialization (routing near uniform).
    assert 0.01 < out.aux_loss.item() < 0.03
    # Two MTP modules at a random start predict about as badly as uniform: 0.3 * ln(64) plus their balance terms.
    assert out.mtp_loss.item() == pytest.approx(0.3 * math.log(64), rel=0.1)
    out.loss.backward()
    assert model.mtp[1].eh_proj.weight.grad.abs().sum() > 0
    assert model.model.layers[1].mlp.gate.weight.grad.abs().sum() > 0


def test_save_load_and_auto_classes(tmp_path):
    model = tiny(pad_token_id=0).eval()
    model.model.layers[1].mlp.gate.e_score_correction_bias.fill_(0.003)
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(loaded) is MoeForCausalLM
    assert float(loaded.model.layers[1].mlp.gate.e_score_correction_bias[0]) == pytest.approx(0.003)
    saved, restored = model.state_dict(), loaded.state_dict()
    assert saved.keys() == restored.keys() and all(torch.equal(saved[k], restored[k]) for k in saved)
    x = torch.randint(1, 64, (2, 7))
    with torch.no_grad():  # bit-identical weights; the kernels may still round differently (3e-8 seen on one CPU)
        assert torch.allclose(model(x).logits, loaded(x).logits, rtol=0, atol=1e-6)
    classifier = AutoModelForSequenceClassification.from_pretrained(tmp_path, num_labels=1)
    assert classifier(x).logits.shape == (2, 1)


def test_gradient_checkpointing_gives_the_same_gradients():
    x = torch.randint(0, 64, (2, 12))
    grads = []
    for checkpointing in (False, True):
        model = tiny().train()
        if checkpointing:
            model.activation_checkpointing_enable()
        model(x, labels=x).loss.backward()
        grads.append(model.model.layers[2].self_attn.kv_b_proj.weight.grad)
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


def test_routing_statistics_and_bias_update_from_training_forwards():
    model = tiny(mtp_dense_ffn=False).train()  # DeepSeek-V3's MTP block routes too
    x = torch.randint(0, 64, (2, 16))
    model(x, labels=x)
    model(x, labels=x)
    stats = routing_stats(model)
    assert len(stats["loads"]) == 3  # two MoE layers and the MTP block
    assert sum(stats["loads"][0]) == 2 * 16 * 2  # every token routed to K_r = 2 experts
    violations = update_biases(model, gamma=0.01)
    assert violations[0] == pytest.approx(max_violation(torch.tensor(stats["loads"][0])))
    bias = model.model.layers[1].mlp.gate.e_score_correction_bias
    assert set((bias / 0.01).round().tolist()) <= {-1.0, 0.0, 1.0} and bias.abs().sum() > 0
    assert model.model.layers[1].mlp.gate.load_since_update is None


def test_balancing_callback_under_the_trainer(tmp_path):
    from transformers import Trainer, TrainingArguments

    model = tiny(bias_update_speed=0.01)
    gate = model.model.layers[1].mlp.gate
    weight_before = gate.weight.detach().clone()
    data = [{"input_ids": ids, "labels": ids} for ids in torch.randint(0, 64, (8, 16))]
    args = TrainingArguments(
        output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=2, gradient_accumulation_steps=2,
        learning_rate=1e-2, logging_steps=1, save_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True,
    )  # fmt: skip
    trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=[LoadBalanceCallback()])
    trainer.train()
    bias = gate.e_score_correction_bias
    steps = bias / 0.01
    assert bias.abs().max() <= 3 * 0.01 + 1e-7  # three optimizer steps, at most one gamma each
    assert torch.allclose(steps, steps.round(), atol=1e-4) and steps.abs().sum() > 0
    assert not torch.equal(gate.weight, weight_before)  # the centroids train; the bias is not a parameter
    assert "e_score_correction_bias" not in dict(model.named_parameters())
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logged) == 3 and all("moe_max_vio_max" in entry for entry in logged)
    assert all(entry["moe_max_vio_max"] >= entry["moe_max_vio_mean"] >= 0 for entry in logged)


def test_bfloat16_loading_keeps_the_router_bias_in_float32(tmp_path):
    tiny().save_pretrained(tmp_path)
    model = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16).eval()
    assert model.model.layers[1].mlp.gate.e_score_correction_bias.dtype == torch.float32
    assert model.lm_head.weight.dtype == torch.bfloat16
    x = torch.randint(0, 64, (1, 8))
    with torch.no_grad():
        full = model(x, use_cache=False).logits
        cache = DynamicCache()
        model(x[:, :7], cache=cache, use_cache=True)
        last = model(x[:, 7:], cache=cache, use_cache=True).logits  # the absorbed path, in bf16
    assert full.dtype == torch.bfloat16
    assert (full[0, -1].float() - last[0, -1].float()).abs().max() < 0.1
