"""Local + global sparse attention: the mask's pattern, the blockwise kernel against masked dense attention, and
the multimodal model's sparse option against its dense one."""

import torch
import torch.nn.functional as F

from models.multimodal import MultimodalConfig, MultimodalForCausalLM
from models.sparse_attention import allowed_fraction, local_global_attention, local_global_mask


def test_mask_pattern_by_hand():
    pos = torch.arange(6)
    # window 2 (itself and the previous key), globals at 0 and 3
    expected = torch.tensor([
        [1, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0],
        [1, 1, 1, 0, 0, 0],
        [1, 0, 1, 1, 0, 0],
        [1, 0, 0, 1, 1, 0],
        [1, 0, 0, 1, 1, 1],
    ], dtype=torch.bool)
    assert torch.equal(local_global_mask(pos, pos, window=2, stride=3), expected)
    assert torch.equal(local_global_mask(pos, pos, window=6, stride=0), torch.ones(6, 6).tril().bool())
    assert allowed_fraction(4, window=1, stride=2) == 0.8  # 4 self pairs + (1,0), (2,0), (3,0), (3,2) of 10


def test_mask_uses_positions_not_indices():
    """Keys a cache kept (positions 0, 5, 9) are judged by their positions."""
    allowed = local_global_mask(torch.tensor([10]), torch.tensor([0, 5, 9]), window=3, stride=5)
    assert allowed.tolist() == [[True, True, True]]
    assert local_global_mask(torch.tensor([10]), torch.tensor([1, 6, 9]), window=3, stride=5).tolist() == \
        [[False, False, True]]


def test_blockwise_kernel_equals_masked_dense():
    torch.manual_seed(0)
    for T, window, stride in [(37, 8, 5), (64, 16, 16), (10, 32, 4), (50, 7, 0)]:
        q, k, v = torch.randn(3, 2, 3, T, 16).unbind(0)
        pos = torch.arange(T)
        dense = F.scaled_dot_product_attention(q, k, v, attn_mask=local_global_mask(pos, pos, window, stride))
        torch.testing.assert_close(local_global_attention(q, k, v, window, stride), dense, atol=1e-5, rtol=1e-5)


def test_kernel_attends_only_where_the_mask_allows():
    torch.manual_seed(0)
    T, window, stride = 40, 4, 10
    q, k, v = torch.randn(3, 1, 1, T, 8).unbind(0)
    out = local_global_attention(q, k, v, window, stride)
    t = 35  # sees 32..35 locally, 0, 10, 20, 30 globally
    for s, allowed in [(33, True), (30, True), (0, True), (31, False), (25, False), (36, False)]:
        v2 = v.clone()
        v2[..., s, :] += 10.0
        changed = (local_global_attention(q, k, v2, window, stride)[..., t, :] - out[..., t, :]).abs().max() > 1e-3
        assert bool(changed) == allowed, s


def tiny(attention: str, **kw) -> MultimodalConfig:
    return MultimodalConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                            expert_intermediate_size=32, attention=attention, **kw)


def test_sparse_model_equals_dense_when_the_window_covers_the_sequence():
    torch.manual_seed(0)
    dense = MultimodalForCausalLM(tiny("dense")).eval()
    ids = torch.randint(0, 64, (2, 24))
    covering = MultimodalForCausalLM(tiny("local_global", attention_window=24, attention_stride=0)).eval()
    covering.load_state_dict(dense.state_dict())
    narrow = MultimodalForCausalLM(tiny("local_global", attention_window=4, attention_stride=8)).eval()
    narrow.load_state_dict(dense.state_dict())
    with torch.no_grad():
        reference = dense(ids).logits
        torch.testing.assert_close(covering(ids).logits, reference, atol=1e-5, rtol=1e-5)
        sparse = narrow(ids).logits
        # the first 4 positions see the same keys either way; later ones lose keys
        torch.testing.assert_close(sparse[:, :4], reference[:, :4], atol=1e-5, rtol=1e-5)
        assert (sparse[:, 10:] - reference[:, 10:]).abs().max() > 1e-3


def test_sparse_model_decodes_with_a_cache_like_its_full_forward():
    """Prefill uses the blockwise kernel, decoding the masked path: the same logits."""
    torch.manual_seed(0)
    model = MultimodalForCausalLM(tiny("local_global", attention_window=4, attention_stride=8)).eval()
    ids = torch.randint(0, 64, (1, 20))
    with torch.no_grad():
        full = model(ids, use_cache=False).logits
        out = model(ids[:, :12], use_cache=True)
        steps = [out.logits]
        for t in range(12, 20):
            out = model(ids[:, t:t + 1], cache=out.cache, use_cache=True)
            steps.append(out.logits)
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=1e-5)
