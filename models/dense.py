"""Dense decoder-only Transformer in the mathematics of "Attention Is All You Need" (arXiv 1706.03762).

Read top to bottom: config, norms, positions, attention, FFN, block, model, heads, builders, converter.
The config defaults are the paper's: sinusoidal positions added to the scaled embeddings, post-LN with LayerNorm,
ReLU FFN, biases, tied embedding and output matrices. Options give the modern variant (RoPE, pre-LN, RMSNorm,
SwiGLU, no biases), which is transformers' Llama: `from_hf_llama` copies its weights, and the tests assert equal
logits. Weight names follow Llama's where the variants share a module, so the converter only renames the norms.

Departures from the paper, and why:
- Decoder only (GPT, arXiv 1801.06034's setup): the language models here have no encoder and no cross-attention.
- No final LayerNorm after a post-LN stack (the paper has none); a pre-LN stack needs one (arXiv 2002.04745), so
  `norm` exists only there.
- Grouped-query attention (arXiv 2305.13245) is an option so the converter covers Llama's num_key_value_heads.
"""

import math
from dataclasses import field
from typing import ClassVar, Literal

import torch
import torch.nn.functional as F
from huggingface_hub.dataclasses import strict
from torch import nn
from transformers import GenerationMixin, PreTrainedConfig, PreTrainedModel
from transformers.cache_utils import DynamicCache
from transformers.modeling_layers import GenericForSequenceClassification, GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

from models.kv_cache import has_attention_protocol, kept_keys_allowed


@strict  # checks each field's type (the Literal choices included) and runs validate_architecture
class DenseConfig(PreTrainedConfig):
    model_type = "alignflow_dense"

    vocab_size: int = 2048
    hidden_size: int = 512  # d_model
    num_hidden_layers: int = 6  # N
    num_attention_heads: int = 8  # h
    num_key_value_heads: int | None = None  # h_kv; None means h (multi-head attention), fewer is grouped-query
    head_dim: int | None = None  # d_k = d_v; None means d_model / h (64 in the paper)
    intermediate_size: int = 2048  # d_ff
    position: Literal["sinusoidal", "rope"] = "sinusoidal"
    norm: Literal["layernorm", "rmsnorm"] = "layernorm"
    norm_position: Literal["post", "pre"] = "post"
    activation: Literal["relu", "gelu", "swiglu"] = "relu"
    bias: bool = True  # the paper's linear maps and LayerNorms have biases; Llama's have none
    scale_embeddings: bool = True  # embeddings times sqrt(d_model) (sec. 3.4), so they outweigh the sinusoids
    dropout: float = 0.1  # P_drop on each sub-layer output and on the embedding sums (sec. 5.4)
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    max_position_embeddings: int = 2048
    initializer_range: float = 0.02
    tie_word_embeddings: bool = True  # sec. 3.4 shares the embedding and pre-softmax matrices
    use_cache: bool = True
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    # TRL reloads a reference model by architecture name and, for names outside transformers, reads auto_map;
    # empty, it falls back to AutoModelForCausalLM, which `import models` has taught our classes.
    auto_map: dict = field(default_factory=dict)

    def __post_init__(self, **kwargs):
        self.head_dim = self.head_dim or self.hidden_size // self.num_attention_heads
        self.num_key_value_heads = self.num_key_value_heads or self.num_attention_heads
        super().__post_init__(**kwargs)

    def validate_architecture(self):
        """Shapes that the layers below cannot take, named by field before any weight is made."""
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                             f"num_key_value_heads ({self.num_key_value_heads})")
        if self.position == "sinusoidal" and self.hidden_size % 2:
            raise ValueError(f"hidden_size ({self.hidden_size}) must be even for sinusoidal positions")
        if self.position == "rope" and self.head_dim % 2:
            raise ValueError(f"head_dim ({self.head_dim}) must be even for RoPE")


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm(x) = g * x / sqrt(mean_i x_i^2 + eps)  (Zhang & Sennrich, arXiv 1910.07467, eq. 4).
    Computed in float32: the mean of squares underflows in bf16."""
    x32 = x.float()
    return weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        return rms_norm(x, self.weight, self.eps)


def make_norm(config: DenseConfig) -> nn.Module:
    """LayerNorm(x) = g * (x - mean(x)) / sqrt(var(x) + eps) + b  (Ba et al., arXiv 1607.06450), or RMSNorm."""
    if config.norm == "rmsnorm":
        return RMSNorm(config.hidden_size, config.norm_eps)
    return nn.LayerNorm(config.hidden_size, config.norm_eps, bias=config.bias)


def sinusoidal_encoding(position_ids: torch.Tensor, dim: int) -> torch.Tensor:
    """PE(pos, 2i) = sin(pos / 10000^(2i/d_model)),  PE(pos, 2i+1) = cos(pos / 10000^(2i/d_model))  (sec. 3.5).
    position_ids: (B, T) -> (B, T, d_model)."""
    denominators = 10000.0 ** (torch.arange(0, dim, 2, dtype=torch.float32, device=position_ids.device) / dim)
    angles = position_ids[..., None].float() / denominators  # (B, T, d/2)
    return torch.stack((angles.sin(), angles.cos()), -1).flatten(-2)  # sin and cos interleaved


def rope_angles(position_ids: torch.Tensor, dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Angle pos * omega_j with omega_j = theta^(-2j/d), j = 0 .. d/2-1  (RoFormer, arXiv 2104.09864, eq. 15).
    position_ids: (B, T) -> cos, sin: (B, 1, T, d/2), ready to broadcast over heads. Recomputed per call rather
    than held in a buffer, which from_pretrained could leave on the meta device."""
    omega = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float32, device=position_ids.device) / dim)
    angles = position_ids[:, None, :, None].float() * omega
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate each pair (x_j, x_{j+d/2}) by its angle: (x_j cos - x_{j+d/2} sin, x_{j+d/2} cos + x_j sin)
    (RoFormer eq. 34). Pairs are split halves, Llama's layout, so converted weights need no permutation."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), -1).to(x.dtype)


def positions_from_mask(attention_mask: torch.Tensor | None, past: int, length: int, device) -> torch.Tensor:
    """Position of each token counting real tokens only, so a left-padded prompt starts at 0 as generate() does."""
    if attention_mask is None:
        return torch.arange(past, past + length, device=device)[None]
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -length:]


def causal_mask(pad_mask: torch.Tensor | None, q_len: int, kv_len: int, device) -> torch.Tensor:
    """allowed[b, 0, t, s] = (s <= t + S - T) and key s is not padding: the decoder's mask (sec. 3.2.3), with the
    T queries being the last T of S positions. Each query also sees itself, so a padding query has one key rather
    than none (an all-masked softmax row is NaN, and NaN leaks into the gradients of real rows)."""
    t = torch.arange(q_len, device=device)[:, None] + (kv_len - q_len)
    s = torch.arange(kv_len, device=device)[None, :]
    allowed = (s <= t)[None, None]  # (1, 1, T, S)
    if pad_mask is not None:
        allowed = (allowed & pad_mask[:, None, None, -kv_len:]) | (s == t)  # (B, 1, T, S)
    return allowed


def scaled_dot_product_attention(q, k, v, allowed: torch.Tensor | None) -> torch.Tensor:
    """Attention(Q, K, V) = softmax(Q K^T / sqrt(d_k)) V  (eq. 1), each head separately (sec. 3.2.2); keys where
    `allowed` is False get -inf before the softmax; allowed=None is the plain causal mask with T = S.
    q: (B, h, T, d_k); k, v: (B, h_kv, S, d_k), each key head shared by h / h_kv query heads (GQA) -> (B, h, T, d_k)."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, is_causal=allowed is None and q.shape[2] > 1,
                                          enable_gqa=k.shape[1] != q.shape[1])


def kv_elements_per_token(num_kv_heads: int, head_dim: int, num_layers: int) -> int:
    """2 * h_kv * d_h * L: a key and a value per KV head per layer; multi-head attention has h_kv = n_h, giving
    2 * n_h * d_h * L (DeepSeek-V2, arXiv 2405.04434, table 1)."""
    return 2 * num_kv_heads * head_dim * num_layers


def attention_probabilities(q, k, allowed: torch.Tensor) -> torch.Tensor:
    """P = softmax(Q K^T / sqrt(d_k)) in float32, formed explicitly for a cache that needs it (eq. 1's weights).
    q: (B, h, T, d_k); k: (B, h_kv, S, d_k); allowed: (B, h_kv, T, S) -> (B, h, T, S), query head i on key head
    i // (h / h_kv) as in SDPA's grouped-query attention."""
    q = q.unflatten(1, (k.shape[1], -1))  # (B, h_kv, h / h_kv, T, d_k)
    scores = torch.einsum("bkgtd,bksd->bkgts", q, k) / math.sqrt(q.shape[-1])
    scores = scores.float().masked_fill(~allowed[:, :, None], float("-inf"))
    return scores.softmax(-1).flatten(1, 2)


class Attention(nn.Module):
    """MultiHead(Q, K, V) = Concat(head_1 .. head_h) W^O, head_i = Attention(Q W_i^Q, K W_i^K, V W_i^V)  (sec. 3.2.2)."""

    def __init__(self, config: DenseConfig, layer_idx: int):
        super().__init__()
        self.layer_idx, self.head_dim = layer_idx, config.head_dim
        D, h, h_kv = config.hidden_size, config.num_attention_heads, config.num_key_value_heads
        self.q_proj = nn.Linear(D, h * self.head_dim, bias=config.bias)
        self.k_proj = nn.Linear(D, h_kv * self.head_dim, bias=config.bias)
        self.v_proj = nn.Linear(D, h_kv * self.head_dim, bias=config.bias)
        self.o_proj = nn.Linear(h * self.head_dim, D, bias=config.bias)

    def forward(self, x, rope, allowed, pad_mask=None, cache=None):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, -1, self.head_dim).transpose(1, 2)  # (B, h, T, d_k)
        k = self.k_proj(x).view(B, T, -1, self.head_dim).transpose(1, 2)  # (B, h_kv, T, d_k)
        v = self.v_proj(x).view(B, T, -1, self.head_dim).transpose(1, 2)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if cache is not None:  # any transformers Cache: dynamic, int8, selective (models/kv_cache.py)...
            k, v = cache.update(k, v, self.layer_idx)  # (B, h_kv, S, d_k)
            k, v = k.to(q.dtype), v.to(q.dtype)
        if cache is not None and has_attention_protocol(cache):  # it kept some keys only, and wants the probabilities
            probs = attention_probabilities(q, k, kept_keys_allowed(cache, self.layer_idx, T, pad_mask))
            cache.observe_attention(self.layer_idx, probs)
            out = (probs.to(v.dtype).unflatten(1, (k.shape[1], -1)) @ v[:, :, None]).flatten(1, 2)  # (B, h, T, d_k)
        else:
            out = scaled_dot_product_attention(q, k, v, allowed)  # (B, h, T, d_k)
        return self.o_proj(out.transpose(1, 2).flatten(2))


class FeedForward(nn.Module):
    """FFN(x) = max(0, x W_1 + b_1) W_2 + b_2  (eq. 2); GELU in place of max(0, .) as GPT does (arXiv 1606.08415);
    SwiGLU: (Swish(x W) * x V) W_2  (Shazeer, arXiv 2002.05202, eq. 6), with W, V, W_2 named gate, up, down."""

    def __init__(self, config: DenseConfig):
        super().__init__()
        D, d_ff = config.hidden_size, config.intermediate_size
        self.activation = config.activation
        if self.activation == "swiglu":
            self.gate_proj = nn.Linear(D, d_ff, bias=config.bias)
        self.up_proj = nn.Linear(D, d_ff, bias=config.bias)
        self.down_proj = nn.Linear(d_ff, D, bias=config.bias)

    def forward(self, x):
        if self.activation == "swiglu":
            return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
        act = F.relu if self.activation == "relu" else F.gelu
        return self.down_proj(act(self.up_proj(x)))


class Block(GradientCheckpointingLayer):
    """Post-LN (sec. 3.1): x = LayerNorm(x + Sublayer(x)). Pre-LN (Xiong et al., arXiv 2002.04745):
    x = x + Sublayer(LayerNorm(x)), which keeps an identity path through the stack and trains without warmup."""

    def __init__(self, config: DenseConfig, layer_idx: int):
        super().__init__()
        self.pre = config.norm_position == "pre"
        self.self_attn = Attention(config, layer_idx)
        self.attn_norm = make_norm(config)
        self.mlp = FeedForward(config)
        self.mlp_norm = make_norm(config)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, h, rope, allowed, pad_mask=None, cache=None):  # (B, T, D) -> (B, T, D)
        if self.pre:
            h = h + self.dropout(self.self_attn(self.attn_norm(h), rope, allowed, pad_mask, cache=cache))
            return h + self.dropout(self.mlp(self.mlp_norm(h)))
        h = self.attn_norm(h + self.dropout(self.self_attn(h, rope, allowed, pad_mask, cache=cache)))
        return self.mlp_norm(h + self.dropout(self.mlp(h)))


class DensePreTrainedModel(PreTrainedModel):
    config_class = DenseConfig
    config: DenseConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules: ClassVar = ["Block"]
    _supports_sdpa = True  # attention is always torch's SDPA


class DenseModel(DensePreTrainedModel):
    def __init__(self, config: DenseConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        self.dropout = nn.Dropout(config.dropout)
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.num_hidden_layers))
        self.norm = make_norm(config) if config.norm_position == "pre" else nn.Identity()
        self.post_init()

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, cache=None, inputs_embeds=None,
                use_cache=None, **kwargs):
        c = self.config
        h = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds  # (B, T, D)
        if c.scale_embeddings:  # inputs_embeds too: a multimodal stream passes text and media embeddings as one
            h = h * math.sqrt(c.hidden_size)
        if use_cache is None:
            use_cache = c.use_cache and not self.training
        if use_cache and cache is None:
            cache = DynamicCache()
        cache = cache if use_cache else None
        past, T = (cache.get_seq_length() if cache is not None else 0), h.shape[1]
        if position_ids is None:
            position_ids = positions_from_mask(attention_mask, past, T, h.device)
        rope = None
        if c.position == "sinusoidal":
            h = h + sinusoidal_encoding(position_ids, c.hidden_size).to(h.dtype)
        else:
            rope = tuple(a.to(h.dtype) for a in rope_angles(position_ids, c.head_dim, c.rope_theta))
        h = self.dropout(h)
        pad_mask = None if attention_mask is None or bool(attention_mask.all()) else attention_mask.bool()
        # No mask tensor where SDPA's own causal flag (T = S) or nothing at all (one query) is exact. A selective
        # cache keeps fewer keys than tokens seen; each layer then builds its mask from the kept keys' positions.
        S = past + T
        allowed = None if pad_mask is None and (T == S or T == 1) else causal_mask(pad_mask, T, S, h.device)
        for layer in self.layers:
            h = layer(h, rope, allowed, pad_mask, cache=cache)
        return BaseModelOutputWithPast(last_hidden_state=self.norm(h), cache=cache)


class DenseForCausalLM(DensePreTrainedModel, GenerationMixin):
    _tied_weights_keys: ClassVar = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: DenseConfig):
        super().__init__(config)
        self.model = DenseModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, cache=None, inputs_embeds=None,
                labels=None, use_cache=None, logits_to_keep=0, **kwargs):
        out = self.model(input_ids, attention_mask=attention_mask, position_ids=position_ids, cache=cache,
                         inputs_embeds=inputs_embeds, use_cache=use_cache)
        h = out.last_hidden_state
        logits = self.lm_head(h[:, -logits_to_keep:] if logits_to_keep else h)  # (B, T', V)
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        return CausalLMOutputWithPast(loss=loss, logits=logits, cache=out.cache)


class DenseForSequenceClassification(GenericForSequenceClassification, DensePreTrainedModel):
    """A scalar head on the last real token: the reward model. It starts from a causal LM checkpoint."""

    _keys_to_ignore_on_load_unexpected: ClassVar = [r"^lm_head\."]


def parameter_count(config: DenseConfig) -> int:
    """P = V d (1 + untied) + L (d (h + 2 h_kv) d_k + h d_k d + m d d_ff + 2 n) + n_final, with m = 3 for SwiGLU
    and 2 otherwise, n = 2d for a LayerNorm with bias and d otherwise, plus the biases when `bias` is set
    (h d_k + 2 h_kv d_k + d per attention, m_in d_ff + d per FFN with m_in = m - 1)."""
    d, L, d_ff, d_k = config.hidden_size, config.num_hidden_layers, config.intermediate_size, config.head_dim
    h, h_kv = config.num_attention_heads, config.num_key_value_heads
    m = 3 if config.activation == "swiglu" else 2
    n = 2 * d if config.norm == "layernorm" and config.bias else d
    attention = d * (h + 2 * h_kv) * d_k + h * d_k * d + config.bias * ((h + 2 * h_kv) * d_k + d)
    ffn = m * d * d_ff + config.bias * ((m - 1) * d_ff + d)
    embeddings = config.vocab_size * d * (1 if config.tie_word_embeddings else 2)
    return embeddings + L * (attention + ffn + 2 * n) + (n if config.norm_position == "pre" else 0)


# Builders: literal sizes. All use the Llama variant (RoPE, pre-LN, RMSNorm, SwiGLU, no biases) because it trained
# better here: on the tiny-world corpus at dense_tiny's size (150 steps of 8 x 128 tokens, AdamW lr 2e-3, 15 warmup
# steps, cosine, one seed) held-out loss was 2.04 against 5.41 for the paper's variant (post-LN, ReLU, sinusoidal;
# d_ff 1024, 3.68M parameters). One learning rate only: post-LN is known to want a longer warmup or a smaller step
# (arXiv 2002.04745). The same weights also load from transformers' Llama. Dropout is 0 as in GPT-3 and Llama
# pretraining. SwiGLU's d_ff is about 8/3 d_model, so its three matrices cost what the paper's two of 4 d_model do.
# Parameter counts: parameter_count(), equal to sum(p.numel()) (tested), at the default vocabulary.

MODERN = {"position": "rope", "norm": "rmsnorm", "norm_position": "pre", "activation": "swiglu", "bias": False,
          "scale_embeddings": False, "dropout": 0.0}


def dense_tiny(vocab_size: int = 2048) -> DenseConfig:
    """3.74M parameters at vocab 2048 (embeddings tied): trains on two CPU cores."""
    return DenseConfig(vocab_size=vocab_size, hidden_size=256, num_hidden_layers=4, num_attention_heads=4,
                       intermediate_size=704, max_position_embeddings=1024, **MODERN)


def dense_30m(vocab_size: int = 8192) -> DenseConfig:
    """29.9M parameters at vocab 8192: one small GPU, or a patient CPU."""
    return DenseConfig(vocab_size=vocab_size, hidden_size=512, num_hidden_layers=8, num_attention_heads=8,
                       intermediate_size=1408, max_position_embeddings=2048, **MODERN)


def dense_125m(vocab_size: int = 32_000) -> DenseConfig:
    """123.7M parameters at vocab 32k: GPT-2 small's width and depth (768, 12 layers, 12 heads), one GPU."""
    return DenseConfig(vocab_size=vocab_size, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                       intermediate_size=2560, max_position_embeddings=2048, **MODERN)


LLAMA_NORM_NAMES = {".input_layernorm.": ".attn_norm.", ".post_attention_layernorm.": ".mlp_norm."}


def from_hf_llama(hf_model) -> DenseForCausalLM:
    """Our model with the weights of transformers' LlamaForCausalLM (RoPE, RMSNorm, SwiGLU, pre-LN, GQA)."""
    c = hf_model.config
    rope = c.rope_parameters or {}
    if rope.get("rope_type", "default") != "default":
        raise ValueError(f"only default RoPE converts; got rope_type={rope.get('rope_type')}")
    if c.hidden_act != "silu" or c.attention_bias or c.mlp_bias:
        raise ValueError(f"only SiLU without biases converts; got hidden_act={c.hidden_act}, "
                         f"attention_bias={c.attention_bias}, mlp_bias={c.mlp_bias}")
    config = DenseConfig(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, num_hidden_layers=c.num_hidden_layers,
        num_attention_heads=c.num_attention_heads, num_key_value_heads=c.num_key_value_heads, head_dim=c.head_dim,
        intermediate_size=c.intermediate_size, rope_theta=rope.get("rope_theta", 10000.0), norm_eps=c.rms_norm_eps,
        max_position_embeddings=c.max_position_embeddings, tie_word_embeddings=c.tie_word_embeddings,
        pad_token_id=c.pad_token_id, bos_token_id=c.bos_token_id, eos_token_id=c.eos_token_id, **MODERN,
    )
    model = DenseForCausalLM(config)
    state = {}
    for name, tensor in hf_model.state_dict().items():
        for theirs, ours in LLAMA_NORM_NAMES.items():
            name = name.replace(theirs, ours)
        state[name] = tensor.clone()
    missing, unexpected = model.load_state_dict(state, strict=False)
    # With tied embeddings lm_head.weight is the embedding itself and may be absent from the state dict.
    if unexpected or [k for k in missing if not (k == "lm_head.weight" and c.tie_word_embeddings)]:
        raise ValueError(f"weights did not map: missing={missing}, unexpected={unexpected}")
    return model
