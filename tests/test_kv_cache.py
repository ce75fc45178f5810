"""The int8 and selective KV caches: quantization error and bytes, the logits and perplexity they give against a full
cache with each backbone (dense, MoE with MLA, multimodal), generate(), and the selective cache's bounded memory."""

import math

import pytest
import torch
from transformers import DynamicCache

from models.dense import DenseConfig, DenseForCausalLM
from models.kv_cache import Int8Cache, SelectiveCache, dequantize_int8, quantize_int8, select_kept
from models.moe import MoeForCausalLM, moe_tiny
from models.multimodal import MultimodalConfig, MultimodalForCausalLM


def multimodal(**kw) -> MultimodalForCausalLM:
    torch.manual_seed(0)
    config = MultimodalConfig(vocab_size=64, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                              expert_intermediate_size=64, **kw)
    return MultimodalForCausalLM(config).eval()


def dense() -> DenseForCausalLM:
    torch.manual_seed(0)
    return DenseForCausalLM(DenseConfig(vocab_size=64, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                        num_key_value_heads=2, intermediate_size=128, position="rope",
                                        norm="rmsnorm", norm_position="pre", activation="swiglu", bias=False,
                                        scale_embeddings=False, dropout=0.0)).eval()


def moe() -> MoeForCausalLM:
    torch.manual_seed(0)
    config = moe_tiny(64)  # MLA caches c^KV (d_c = 24 here) and k^R (d_h^R = 16) per token
    config.hidden_size, config.num_hidden_layers, config.intermediate_size, config.kv_lora_rank = 64, 2, 128, 24
    return MoeForCausalLM(config).eval()


BACKBONES = pytest.mark.parametrize("make", [multimodal, dense, moe], ids=["multimodal", "dense", "moe"])


@torch.no_grad()
def decode_logits(model, ids, cache, prefill: int) -> torch.Tensor:
    """Logits of every position from a prefill of `prefill` tokens, then one token at a time through `cache`."""
    out = model(ids[:, :prefill], cache=cache, use_cache=True)
    logits = [out.logits]
    for t in range(prefill, ids.shape[1]):
        out = model(ids[:, t:t + 1], cache=out.cache, use_cache=True)
        logits.append(out.logits)
    return torch.cat(logits, 1)


def test_int8_round_trip_error_is_at_most_half_a_step():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 5, 32) * torch.linspace(0.1, 10, 32)  # channels of very different ranges
    for group in (32, 8):
        q, scale = quantize_int8(x, group)
        assert q.dtype == torch.int8 and scale.shape == (2, 3, 5, 32 // group)
        step = scale.repeat_interleave(group, -1)
        assert ((dequantize_int8(q, scale, torch.float32) - x).abs() <= step / 2 + 1e-6).all()
    # smaller groups follow the small channels: lower error on them
    err = {g: (dequantize_int8(*quantize_int8(x, g), torch.float32) - x)[..., :8].abs().mean() for g in (32, 8)}
    assert err[8] < err[32] / 5


def test_int8_bytes_per_token_are_about_half_of_bf16():
    model = multimodal()  # head_dim 32, 2 heads, 2 layers
    cache = Int8Cache()
    ids = torch.randint(0, 64, (1, 40))
    decode_logits(model, ids, cache, prefill=30)
    # per token, per layer, keys and values: 2 heads x (32 int8 + one float32 scale) = 72 bytes, against 128 in bf16
    assert cache.nbytes() == 40 * 2 * 2 * 2 * (32 + 4)
    assert cache.nbytes() / (40 * 2 * 2 * 2 * 32 * 2) == pytest.approx(0.5625)
    grouped = Int8Cache(group_size=8)
    decode_logits(model, ids, grouped, prefill=30)
    assert grouped.nbytes() == 40 * 2 * 2 * 2 * (32 + 4 * 4)


def test_int8_bytes_per_token_for_dense_and_mla():
    ids = torch.randint(0, 64, (1, 40))
    dense_cache, mla_cache = Int8Cache(), Int8Cache()
    decode_logits(dense(), ids, dense_cache, prefill=30)
    decode_logits(moe(), ids, mla_cache, prefill=30)
    # dense: 2 layers x keys and values x 2 KV heads x (16 int8 + a float32 scale), against 2 bytes per element in bf16
    assert dense_cache.nbytes() == 40 * 2 * 2 * 2 * (16 + 4)
    assert dense_cache.nbytes() / (40 * 2 * 2 * 2 * 16 * 2) == pytest.approx(0.625)  # d_h = 16: the scale weighs
    # MLA: 2 layers x (c^KV: 24 int8 + a scale, k^R: 16 int8 + a scale), against (d_c + d_h^R) * L * 2 in bf16
    assert mla_cache.nbytes() == 40 * 2 * ((24 + 4) + (16 + 4))
    assert mla_cache.nbytes() / (40 * 2 * (24 + 16) * 2) == pytest.approx(0.6)
    assert all(layer.keys.dtype == torch.int8 and layer.keys.shape == (1, 1, 40, 24) for layer in mla_cache.layers)


@BACKBONES
def test_int8_cache_logits_stay_close_to_the_full_cache(make):
    model = make()
    ids = torch.randint(0, 64, (2, 32))
    full = decode_logits(model, ids, DynamicCache(), prefill=8)
    int8 = decode_logits(model, ids, Int8Cache(), prefill=8)
    relative = (int8 - full).norm() / full.norm()
    assert 0 < relative < 0.01  # it does quantize, and by little: measured 0.0024 (dense), 0.0026 (MoE)
    reference = model.generate(ids[:, :8], max_new_tokens=6, do_sample=False)
    quantized = model.generate(ids[:, :8], max_new_tokens=6, do_sample=False, cache=Int8Cache())
    assert quantized.shape == (2, 14) and (reference == quantized).float().mean() > 0.9


def markov_sequences(n: int, length: int, seed: int, vocab: int = 64) -> torch.Tensor:
    """Sequences of a fixed Markov chain in which each token has 3 equally likely successors: a model that has
    learned it reaches perplexity 3, far below the 64 of a uniform guess, so its logits are worth quantizing."""
    successors = torch.randint(0, vocab, (vocab, 3), generator=torch.Generator().manual_seed(0))
    generator = torch.Generator().manual_seed(seed)
    ids = torch.empty(n, length, dtype=torch.long)
    ids[:, 0] = torch.randint(0, vocab, (n,), generator=generator)
    for t in range(1, length):
        ids[:, t] = successors[ids[:, t - 1], torch.randint(0, 3, (n,), generator=generator)]
    return ids


@pytest.mark.parametrize("make", [dense, moe], ids=["dense", "moe"])
def test_int8_cache_moves_held_out_perplexity_by_under_one_percent(make):
    model = make().train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for step in range(80):
        batch = markov_sequences(16, 32, seed=1 + step)
        model(batch, labels=batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    held_out = markov_sequences(4, 48, seed=10_000)  # sequences never trained on

    def perplexity(cache) -> float:
        logits = decode_logits(model, held_out, cache, prefill=8)
        return math.exp(torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), held_out[:, 1:].flatten()))

    full, int8 = perplexity(DynamicCache()), perplexity(Int8Cache())
    assert full < 4  # trained: measured 3.48 (dense), 3.44 (MoE), against 64 untrained
    assert int8 != full and abs(int8 / full - 1) <= 0.01  # measured 6e-6 (dense), 1.3e-5 (MoE)


def test_select_kept_keeps_recent_window_and_heavy_hitters():
    scores = torch.tensor([[[5.0, 0.1, 3.0, 0.2, 4.0, 0.0, 0.0, 0.0]]])
    assert select_kept(scores, budget=5, recent=2).tolist() == [[[0, 2, 4, 6, 7]]]
    assert select_kept(scores, budget=8, recent=2).tolist() == [[list(range(8))]]


@BACKBONES
def test_selective_cache_equals_full_cache_while_under_budget(make):
    model = make()
    ids = torch.randint(0, 64, (2, 24))
    full = decode_logits(model, ids, DynamicCache(), prefill=10)
    cache = SelectiveCache(budget=32, recent=4)
    selective = decode_logits(model, ids, cache, prefill=10)
    # Each of the 24 queries' probabilities sums to 1 per query head; the query heads sharing a stored key head
    # (GQA's 4 / 2 in dense, MLA's 4 heads on one latent) add up into that head's accumulated attention.
    heads_per_key = {multimodal: 1, dense: 2, moe: 4}[make]
    for layer in cache.layers:
        torch.testing.assert_close(layer.scores.sum(-1), torch.full(layer.scores.shape[:2], 24.0 * heads_per_key))
    if make is moe:  # the absorbed MLA path forms the probabilities with or without the selective cache: same ops
        assert torch.equal(selective, full)
    else:  # explicit softmax against SDPA's fused kernel: float32 rounding only (measured 2.4e-7 for dense)
        torch.testing.assert_close(selective, full, atol=1e-5, rtol=1e-5)


@BACKBONES
def test_selective_cache_memory_stays_flat_as_the_sequence_grows(make):
    model = make()
    ids = torch.randint(0, 64, (1, 64))
    sizes = {}
    for length in (32, 48, 64):
        cache = SelectiveCache(budget=16, recent=4)
        logits = decode_logits(model, ids[:, :length], cache, prefill=8)
        assert torch.isfinite(logits).all()
        sizes[length] = cache.nbytes()
        assert cache.get_seq_length() == length  # tokens seen: the position of the next token
        assert all(layer.keys.shape[2] == 16 for layer in cache.layers)
    assert sizes[32] == sizes[48] == sizes[64]
    full = DynamicCache()
    decode_logits(model, ids, full, prefill=8)
    assert sum(layer.keys.numel() for layer in full.layers) == 64 / 16 * sum(
        layer.keys.numel() for layer in cache.layers)


@BACKBONES
def test_selective_cache_in_generate_with_left_padding(make):
    model = make()
    ids = torch.randint(1, 64, (2, 12))
    mask = torch.ones_like(ids)
    ids[1, :3], mask[1, :3] = 0, 0
    out = model.generate(ids, attention_mask=mask, max_new_tokens=30, do_sample=False, pad_token_id=0,
                         cache=SelectiveCache(budget=16, recent=4))
    assert out.shape == (2, 42)
    under_budget = model.generate(ids, attention_mask=mask, max_new_tokens=3, do_sample=False, pad_token_id=0,
                                  cache=SelectiveCache(budget=64, recent=4))
    assert torch.equal(under_budget, model.generate(ids, attention_mask=mask, max_new_tokens=3, do_sample=False,
                                                    pad_token_id=0))


def test_selective_cache_refuses_a_model_that_reports_no_attention():
    cache = SelectiveCache(budget=4, recent=1)
    k = v = torch.randn(1, 2, 6, 8)
    cache.update(k, v, 0)  # a model that stops here, without cache.observe_attention(0, probs)
    with pytest.raises(RuntimeError, match="observe_attention"):
        cache.update(k[:, :, :1], v[:, :, :1], 0)
