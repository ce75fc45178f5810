"""The dense backbone: the paper's formulas on numbers worked by hand, the block orderings, parity with transformers'
Llama, cached decoding, left padding, cache size and parameter counts."""

import math

import pytest
import torch
from huggingface_hub.errors import StrictDataclassError
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.cache_utils import DynamicCache

from models.dense import (
    Block,
    DenseConfig,
    DenseForCausalLM,
    FeedForward,
    apply_rope,
    causal_mask,
    dense_30m,
    dense_125m,
    dense_tiny,
    from_hf_llama,
    kv_elements_per_token,
    parameter_count,
    rms_norm,
    rope_angles,
    scaled_dot_product_attention,
    sinusoidal_encoding,
)

PAPER = {}  # the config defaults: sinusoidal, post-LN LayerNorm, ReLU, biases, tied
VARIANTS = [
    PAPER,
    {"position": "rope", "activation": "gelu"},
    {"norm_position": "pre", "norm": "rmsnorm", "bias": False},
    {"position": "rope", "norm": "rmsnorm", "norm_position": "pre", "activation": "swiglu", "bias": False,
     "scale_embeddings": False, "num_key_value_heads": 2, "tie_word_embeddings": False},
]


def small(vocab_size=61, **overrides):
    torch.manual_seed(0)
    config = DenseConfig(vocab_size=vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                         intermediate_size=48, dropout=0.0, **overrides)
    return DenseForCausalLM(config).eval()


# --- the formulas, on numbers worked by hand ---


def test_sinusoidal_encoding_is_the_papers():
    pe = sinusoidal_encoding(torch.tensor([[0, 1, 7]]), 4)[0]  # d_model = 4: denominators 10000^0, 10000^(2/4)
    assert pe[0].tolist() == pytest.approx([0, 1, 0, 1])
    assert pe[1].tolist() == pytest.approx([math.sin(1), math.cos(1), math.sin(0.01), math.cos(0.01)])
    assert pe[2].tolist() == pytest.approx([math.sin(7), math.cos(7), math.sin(0.07), math.cos(0.07)])


def test_rms_norm_numbers():
    # mean of squares of (3, 4) is 12.5; 3 / sqrt(12.5) = 0.8485, 4 / sqrt(12.5) = 1.1314; g scales each.
    out = rms_norm(torch.tensor([3.0, 4.0]), torch.tensor([1.0, 2.0]), eps=0.0)
    assert out.tolist() == pytest.approx([0.848528, 2 * 1.131371], rel=1e-5)


def test_rope_rotates_pairs_and_depends_on_relative_position():
    cos, sin = rope_angles(torch.tensor([[1]]), 4, theta=100.0)  # omega = (1, 100^-0.5 = 0.1)
    assert cos.flatten().tolist() == pytest.approx([math.cos(1), math.cos(0.1)])
    # Pairs are (x_0, x_2) and (x_1, x_3): (1, 0) in the first pair turns by 1 rad.
    rotated = apply_rope(torch.tensor([1.0, 0.0, 0.0, 0.0]), cos.flatten(), sin.flatten())
    assert rotated.tolist() == pytest.approx([math.cos(1), 0, math.sin(1), 0], abs=1e-7)
    q, k = torch.randn(8), torch.randn(8)

    def at(x, position):
        cos, sin = rope_angles(torch.tensor([[position]]), 8, 10000.0)
        return apply_rope(x, cos.flatten(), sin.flatten())

    assert float(at(q, 9).norm()) == pytest.approx(float(q.norm()), rel=1e-6)
    assert float(at(q, 7) @ at(k, 3)) == pytest.approx(float(at(q, 21) @ at(k, 17)), abs=1e-5)


def test_attention_is_softmax_of_scaled_scores():
    # One head, d_k = 4: scores q.k / 2 are (2, 0) for the two keys of the last query.
    q = torch.tensor([[[[0.0, 0, 0, 0], [2.0, 2, 0, 0]]]])
    k = torch.tensor([[[[1.0, 1, 0, 0], [0.0, 0, 1, 1]]]])
    v = torch.tensor([[[[1.0, 0, 0, 0], [0.0, 1, 0, 0]]]])
    out = scaled_dot_product_attention(q, k, v, None)[0, 0]
    assert out[0].tolist() == pytest.approx([1, 0, 0, 0])  # causal: the first query sees only the first key
    p = math.exp(2) / (math.exp(2) + 1)
    assert out[1].tolist() == pytest.approx([p, 1 - p, 0, 0], rel=1e-6)


@pytest.mark.parametrize(("activation", "expected"), [
    ("relu", [2.0 + 0.5, 0.0 + 0.5]),  # max(0, (2, -3)) + b_1 = (2, 0), through W_2 = I, plus b_2 = 0.5
    ("gelu", [2.0 * 0.97725 + 0.5, -3.0 * 0.00135 + 0.5]),  # GELU(x) = x * Phi(x); Phi(2) = 0.97725
    ("swiglu", [2.0 / (1 + math.exp(-2.0)) * 2.0 + 0.5, -3.0 / (1 + math.exp(3.0)) * -3.0 + 0.5]),  # Swish(xW) * xV
])
def test_feed_forward_numbers(activation, expected):
    ffn = FeedForward(DenseConfig(hidden_size=2, num_attention_heads=1, intermediate_size=2, activation=activation))
    with torch.no_grad():
        for p in ffn.parameters():
            p.copy_(torch.eye(2) if p.dim() == 2 else torch.zeros(2))
        ffn.down_proj.bias.fill_(0.5)
        out = ffn(torch.tensor([2.0, -3.0]))
    assert out.tolist() == pytest.approx(expected, rel=1e-4)


def test_causal_mask_with_cache_offset_and_padding():
    allowed = causal_mask(torch.tensor([[False, True, True, True]]), q_len=2, kv_len=4, device="cpu")
    assert allowed[0, 0].int().tolist() == [[0, 1, 1, 0], [0, 1, 1, 1]]
    assert causal_mask(None, 3, 3, "cpu")[0, 0].int().tolist() == [[1, 0, 0], [1, 1, 0], [1, 1, 1]]


def test_kv_cache_elements_per_token_equal_the_formula():
    assert kv_elements_per_token(12, 64, 12) == 2 * 12 * 64 * 12 == 18_432  # GPT-2 small, MHA
    for heads, kv_heads in ((4, 4), (4, 2), (4, 1)):
        model = small(num_key_value_heads=kv_heads)
        cache = DynamicCache()
        with torch.no_grad():
            model(torch.randint(0, 61, (1, 10)), cache=cache, use_cache=True)
        per_token = sum(layer.keys[0, :, 0].numel() + layer.values[0, :, 0].numel() for layer in cache.layers)
        assert per_token == kv_elements_per_token(kv_heads, 8, 2) == 2 * kv_heads * 8 * 2
        assert cache.get_seq_length() == 10


@pytest.mark.parametrize("variant", VARIANTS)
def test_parameter_count_formula_equals_the_model(variant):
    model = small(**variant)
    assert parameter_count(model.config) == sum(p.numel() for p in model.parameters())


def test_builder_sizes():
    # Measured with sum(p.numel()) on the meta device; parameter_count equals it (test above).
    assert parameter_count(dense_tiny(2048)) == 3_737_856
    assert parameter_count(dense_30m()) == 29_893_120
    assert parameter_count(dense_125m()) == 123_685_632
    assert 1e6 < parameter_count(dense_tiny(4096)) < 5e6


# --- the block orderings ---


@pytest.mark.parametrize("norm_position", ["post", "pre"])
def test_block_is_post_ln_or_pre_ln(norm_position):
    config = small(norm_position=norm_position).config
    torch.manual_seed(1)
    block = Block(config, 0).eval()
    for p in block.parameters():  # non-trivial norm gains and biases, so a swapped order shows
        torch.nn.init.normal_(p, std=0.3)
    x = torch.randn(2, 5, 32)
    with torch.no_grad():
        got = block(x, None, None)
        attn, ffn, n1, n2 = block.self_attn, block.mlp, block.attn_norm, block.mlp_norm
        if norm_position == "post":  # LayerNorm(x + Sublayer(x)), twice (sec. 3.1)
            h = n1(x + attn(x, None, None))
            expected = n2(h + ffn(h))
        else:
            h = x + attn(n1(x), None, None)
            expected = h + ffn(n2(h))
    assert torch.allclose(got, expected, atol=1e-6)


def test_post_ln_output_is_normalized_and_paper_defaults():
    model = small()
    c = model.config
    assert (c.position, c.norm, c.norm_position, c.activation) == ("sinusoidal", "layernorm", "post", "relu")
    assert model.lm_head.weight is model.model.embed_tokens.weight  # sec. 3.4: shared matrices
    with torch.no_grad():
        h = model.model(torch.randint(0, 61, (1, 9))).last_hidden_state
    # The last operation is a LayerNorm with gain 1 and bias 0 at initialization.
    assert h.mean(-1).abs().max() < 1e-5
    assert torch.allclose(h.var(-1, unbiased=False), torch.ones(1, 9), atol=1e-3)


def test_config_validation_names_the_field():
    with pytest.raises(StrictDataclassError, match="num_key_value_heads"):
        DenseConfig(hidden_size=32, num_attention_heads=4, num_key_value_heads=3)
    with pytest.raises(StrictDataclassError, match="position.*expected one of"):
        DenseConfig(position="alibi")
    with pytest.raises(StrictDataclassError, match="head_dim"):
        DenseConfig(position="rope", hidden_size=36, num_attention_heads=4)  # d_k = 9 cannot split in pairs


# --- parity with transformers' Llama ---


@pytest.mark.parametrize(
    ("heads", "kv_heads", "head_dim", "tied"),
    [(4, 4, None, False), (4, 2, None, True), (6, 2, 16, False), (2, 1, 24, True)],
)
def test_logits_equal_llama_with_the_same_weights(heads, kv_heads, head_dim, tied):
    torch.manual_seed(heads * 10 + kv_heads)
    config = LlamaConfig(
        vocab_size=97, hidden_size=48, intermediate_size=80, num_hidden_layers=3, num_attention_heads=heads,
        num_key_value_heads=kv_heads, head_dim=head_dim, tie_word_embeddings=tied, initializer_range=0.2,
        rope_parameters={"rope_type": "default", "rope_theta": 500.0}, pad_token_id=0,
    )  # fmt: skip
    llama = LlamaForCausalLM(config).eval()
    for name, p in llama.named_parameters():  # random norm gains too, so a misplaced norm would show
        if "norm" in name:
            torch.nn.init.uniform_(p, 0.5, 1.5)
    ours = from_hf_llama(llama).eval()
    assert (ours.lm_head.weight is ours.model.embed_tokens.weight) == tied
    ids = torch.randint(1, 97, (2, 17))
    mask = torch.ones_like(ids)
    mask[1, :5] = 0
    with torch.no_grad():
        expected, got = llama(ids).logits, ours(ids, use_cache=False).logits
        expected_padded = llama(ids, attention_mask=mask).logits
        got_padded = ours(ids, attention_mask=mask, use_cache=False).logits
    assert expected.abs().max() > 1.0  # large enough that a wrong mapping would show
    assert (expected - got).abs().max() < 1e-5
    # Left padding: compare real tokens only. Llama counts positions from the first column unless given
    # position_ids, ours from the first real token, so give it ours.
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        expected_padded = llama(ids, attention_mask=mask, position_ids=positions).logits
    assert (expected_padded - got_padded)[mask.bool()].abs().max() < 1e-5


def test_converter_rejects_what_it_cannot_copy():
    config = LlamaConfig(vocab_size=31, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, mlp_bias=True)
    with pytest.raises(ValueError, match="mlp_bias"):
        from_hf_llama(LlamaForCausalLM(config))


# --- decoding ---


@pytest.mark.parametrize("variant", VARIANTS)
def test_cached_decoding_equals_full_forward(variant):
    model = small(**variant)
    x = torch.randint(0, 61, (2, 12))
    with torch.no_grad():
        full = model(x, use_cache=False).logits
        cache = DynamicCache()
        steps = [model(x[:, :7], cache=cache, use_cache=True).logits]
        steps.append(model(x[:, 7:9], cache=cache, use_cache=True).logits)  # a chunk of two: offset causal mask
        steps += [model(x[:, t : t + 1], cache=cache, use_cache=True).logits for t in range(9, 12)]
    assert torch.allclose(torch.cat(steps, 1), full, atol=1e-5)


@pytest.mark.parametrize("variant", VARIANTS)
def test_left_padding_matches_unpadded(variant):
    model = small(pad_token_id=0, **variant)
    short, long = torch.randint(1, 61, (1, 5)), torch.randint(1, 61, (1, 9))
    batch = torch.cat([torch.cat([torch.zeros(1, 4, dtype=torch.long), short], 1), long])
    mask = (torch.arange(9) >= torch.tensor([[4], [0]])).long()
    with torch.no_grad():
        padded = model(batch, attention_mask=mask, use_cache=False).logits
        alone = model(short, use_cache=False).logits
        generated = model.generate(batch, attention_mask=mask, max_new_tokens=6, do_sample=False)
        generated_alone = model.generate(short, max_new_tokens=6, do_sample=False)
    assert torch.allclose(padded[0, 4:], alone[0], atol=1e-5)
    assert generated[0, 9:].tolist() == generated_alone[0, 5:].tolist()


def test_gradient_checkpointing_gives_the_same_gradients():
    x = torch.randint(0, 61, (2, 12))
    grads = []
    for checkpointing in (False, True):
        model = small(position="rope").train()
        if checkpointing:
            model.activation_checkpointing_enable()
        model(x, labels=x).loss.backward()
        grads.append(model.model.layers[0].self_attn.q_proj.weight.grad)
    assert grads[0].abs().sum() > 0
    assert torch.allclose(grads[0], grads[1], atol=1e-6)
