"""The int8 and selective KV caches: quantization error and bytes, the logits they give against a full cache, with
the multimodal and the dense backbones, generate(), and the selective cache's bounded memory."""

import pytest
import torch
from transformers import DynamicCache

from models.dense import DenseConfig, DenseForCausalLM
from models.kv_cache import Int8Cache, SelectiveCache, dequantize_int8, quantize_int8, select_kept
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


@pytest.mark.parametrize("make", [multimodal, dense], ids=["multimodal", "dense"])
def test_int8_cache_logits_stay_close_to_the_full_cache(make):
    model = make()
    ids = torch.randint(0, 64, (2, 32))
    full = decode_logits(model, ids, DynamicCache(), prefill=8)
    int8 = decode_logits(model, ids, Int8Cache(), prefill=8)
    relative = (int8 - full).norm() / full.norm()
    assert 0 < relative < 0.02  # it does quantize, and by little
    reference = model.generate(ids[:, :8], max_new_tokens=6, do_sample=False)
    quantized = model.generate(ids[:, :8], max_new_tokens=6, do_sample=False, cache=Int8Cache())
    assert quantized.shape == (2, 14) and (reference == quantized).float().mean() > 0.9


def test_select_kept_keeps_recent_window_and_heavy_hitters():
    scores = torch.tensor([[[5.0, 0.1, 3.0, 0.2, 4.0, 0.0, 0.0, 0.0]]])
    assert select_kept(scores, budget=5, recent=2).tolist() == [[[0, 2, 4, 6, 7]]]
    assert select_kept(scores, budget=8, recent=2).tolist() == [[list(range(8))]]


def test_selective_cache_equals_full_cache_while_under_budget():
    model = multimodal()
    ids = torch.randint(0, 64, (2, 24))
    full = decode_logits(model, ids, DynamicCache(), prefill=10)
    torch.testing.assert_close(decode_logits(model, ids, SelectiveCache(budget=32, recent=4), prefill=10), full,
                               atol=1e-5, rtol=1e-5)


def test_selective_cache_memory_stays_flat_as_the_sequence_grows():
    model = multimodal()
    ids = torch.randint(0, 64, (1, 64))
    sizes = {}
    for length in (32, 64):
        cache = SelectiveCache(budget=16, recent=4)
        logits = decode_logits(model, ids[:, :length], cache, prefill=8)
        assert torch.isfinite(logits).all()
        sizes[length] = cache.nbytes()
        assert cache.get_seq_length() == length  # tokens seen: the position of the next token
        assert all(layer.keys.shape[2] == 16 for layer in cache.layers)
    assert sizes[32] == sizes[64]
    full = DynamicCache()
    decode_logits(model, ids, full, prefill=8)
    assert sum(layer.keys.numel() for layer in full.layers) == 64 / 16 * sum(
        layer.keys.numel() for layer in cache.layers)


def test_selective_cache_in_generate_with_left_padding():
    model = multimodal()
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
    model = dense()  # calls update() but not observe_attention()
    with pytest.raises(RuntimeError, match="observe_attention"):
        decode_logits(model, torch.randint(0, 64, (1, 6)), SelectiveCache(budget=4, recent=1), prefill=4)
