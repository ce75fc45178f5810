"""DeepSeek-style mixture-of-experts backbone: MLA attention, DeepSeekMoE, loss-free balancing, multi-token prediction.

References: DeepSeek-V2 (arXiv 2405.04434) for MLA, DeepSeek-V3 (arXiv 2412.19437) for sigmoid routing, the
sequence-wise balance loss and MTP, Wang et al. (arXiv 2408.15664) for the auxiliary-loss-free bias.
Read top to bottom: config, norm, rotary, MLA, MLP, gate, experts, MoE, block, MTP, model, heads, builders, converter.
Weight names follow transformers' DeepseekV3 so checkpoints convert by name. The bias update itself lives in
models/balancing.py, MTP self-speculative decoding in models/speculative.py.

Departures from DeepSeek-V3, and why:
- One expert group (n_group = topk_group = 1): node-limited routing only matters across machines.
- h^0 fed to the first MTP module is the main model's output after its final RMSNorm (the paper leaves it open).
- Padding tokens are routed and counted in expert loads like any token; with left padding they are few.
"""

import math
from dataclasses import dataclass, field
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedConfig, PreTrainedModel
from transformers import initialization as init
from transformers.cache_utils import DynamicCache
from transformers.modeling_layers import GenericForSequenceClassification, GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

from models.kv_cache import has_attention_protocol, kept_keys_allowed


class MoeConfig(PreTrainedConfig):
    model_type = "alignflow_moe"

    vocab_size: int = 512
    hidden_size: int = 128
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    q_lora_rank: int = 0  # d_c' of the query compression; 0 projects queries directly (as DeepSeek-V2-Lite)
    kv_lora_rank: int = 32  # d_c, the latent that is cached
    qk_nope_head_dim: int = 32  # d_h
    qk_rope_head_dim: int = 16  # d_h^R, the decoupled RoPE key shared by all heads
    v_head_dim: int = 32
    intermediate_size: int = 384  # the dense FFN of the first `first_k_dense_replace` layers
    moe_intermediate_size: int = 64  # one expert
    n_shared_experts: int = 1  # N_s
    n_routed_experts: int = 8  # N_r
    num_experts_per_tok: int = 2  # K_r
    first_k_dense_replace: int = 1
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 1.0  # DeepSeek-V3 uses 2.5 with 256 experts
    bias_update_speed: float = 0.001  # gamma, DeepSeek-V3 sec. 4.2
    seq_aux_alpha: float = 0.0001  # alpha of the sequence-wise balance loss; 0 disables it
    num_mtp_modules: int = 1  # D
    mtp_loss_weight: float = 0.3  # lambda, DeepSeek-V3 sec. 4.2 (0.3, then 0.1)
    # DeepSeek-V3's MTP block is a main-model block (MoE past the first k layers). A dense FFN makes the drafter
    # cheaper: on moe-tiny the MoE block's many small routing ops cost more than its matmuls (bench/models.py part 5).
    mtp_dense_ffn: bool = False
    mla_absorbed: bool = True  # decode with W^UK folded into the query, W^UV after attention
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 2048
    initializer_range: float = 0.02
    tie_word_embeddings: bool = False
    use_cache: bool = True
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    # TRL reloads a reference model by architecture name and, for names outside transformers, reads auto_map;
    # empty, it falls back to AutoModelForCausalLM, which `import models` has taught our classes.
    auto_map: dict = field(default_factory=dict)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        # In float32: the mean of squares underflows in bf16.
        y = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * y.to(x.dtype)


def rope_inverse_frequencies(dim: int, theta: float) -> torch.Tensor:
    """omega_j = theta^(-2j/d), j = 0 .. d/2-1  (RoFormer, arXiv 2104.09864, eq. 15)."""
    return 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate each interleaved pair (x_2j, x_2j+1) by angle p * omega_j:
    (x_2j cos - x_2j+1 sin, x_2j+1 cos + x_2j sin). Interleaved pairs are DeepSeek's layout."""
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return torch.stack((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).flatten(-2).to(x.dtype)


class RotaryEmbedding(nn.Module):
    def __init__(self, config: MoeConfig):
        super().__init__()
        self.dim, self.theta = config.qk_rope_head_dim, config.rope_theta

    def forward(self, position_ids):  # (B, T) -> cos, sin: (B, T, d_r/2)
        # Recomputed per call (d_r/2 numbers) rather than a buffer that from_pretrained could leave on the meta device.
        omega = rope_inverse_frequencies(self.dim, self.theta).to(position_ids.device)
        angles = position_ids[..., None].float() * omega
        return angles.cos(), angles.sin()


def positions_from_mask(attention_mask: torch.Tensor | None, past: int, length: int, device) -> torch.Tensor:
    """Position of each token counting only real tokens, so a left-padded prompt starts at 0 as in generate()."""
    if attention_mask is None:
        return torch.arange(past, past + length, device=device)[None]
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -length:]


def allowed_keys(pad_mask: torch.Tensor | None, q_len: int, kv_len: int, device) -> torch.Tensor:
    """Boolean (B|1, 1, T, S): query t sees key s when s <= t + (S - T) and s is not padding. Each query also sees
    itself, so a padding query has one key instead of none (an all-masked row is NaN, and NaN leaks into real rows)."""
    t = torch.arange(q_len, device=device)[:, None] + (kv_len - q_len)
    s = torch.arange(kv_len, device=device)[None, :]
    allowed = (s <= t)[None, None]
    if pad_mask is not None:
        allowed = (allowed & pad_mask[:, None, None, -kv_len:]) | (s == t)
    return allowed


def mla_softmax_scale(qk_nope_head_dim: int, qk_rope_head_dim: int) -> float:
    """1 / sqrt(d_h + d_h^R)  (DeepSeek-V2 eq. 19): the score is q^C.k^C + q^R.k^R over d_h + d_h^R dimensions."""
    return 1.0 / math.sqrt(qk_nope_head_dim + qk_rope_head_dim)


def mla_kv_elements_per_token(kv_lora_rank: int, qk_rope_head_dim: int, num_layers: int) -> int:
    """(d_c + d_h^R) * L  (DeepSeek-V2 table 1): MLA caches only c_t^KV and the shared k_t^R."""
    return (kv_lora_rank + qk_rope_head_dim) * num_layers


def mha_kv_elements_per_token(num_heads: int, head_dim: int, num_layers: int) -> int:
    """2 * n_h * d_h * L  (DeepSeek-V2 table 1): a key and a value per head per layer."""
    return 2 * num_heads * head_dim * num_layers


class MLA(nn.Module):
    """Multi-head latent attention (DeepSeek-V2 sec. 2.1, eq. 9-19)."""

    def __init__(self, config: MoeConfig, layer_idx: int):
        super().__init__()
        self.layer_idx, self.absorbed = layer_idx, config.mla_absorbed
        self.n_heads, self.d_c = config.num_attention_heads, config.kv_lora_rank
        self.d_nope, self.d_rope, self.d_v = config.qk_nope_head_dim, config.qk_rope_head_dim, config.v_head_dim
        d_qk, D = self.d_nope + self.d_rope, config.hidden_size
        if config.q_lora_rank:
            self.q_a_proj = nn.Linear(D, config.q_lora_rank, bias=False)
            self.q_a_layernorm = RMSNorm(config.q_lora_rank, config.rms_norm_eps)
            self.q_b_proj = nn.Linear(config.q_lora_rank, self.n_heads * d_qk, bias=False)
        else:
            self.q_proj = nn.Linear(D, self.n_heads * d_qk, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(D, self.d_c + self.d_rope, bias=False)  # W^DKV and W^KR stacked
        self.kv_a_layernorm = RMSNorm(self.d_c, config.rms_norm_eps)
        self.kv_b_proj = nn.Linear(self.d_c, self.n_heads * (self.d_nope + self.d_v), bias=False)  # W^UK, W^UV
        self.o_proj = nn.Linear(self.n_heads * self.d_v, D, bias=False)
        self.scale = mla_softmax_scale(self.d_nope, self.d_rope)

    def forward(self, x, cos, sin, pad_mask=None, cache=None):
        B, T, _ = x.shape
        if hasattr(self, "q_proj"):
            q = self.q_proj(x)
        else:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        q_nope, q_rope = q.view(B, T, self.n_heads, -1).split([self.d_nope, self.d_rope], -1)  # (B, T, H, d)
        q_rope = apply_rope(q_rope, cos[:, :, None], sin[:, :, None])
        kv_latent, k_rope = self.kv_a_proj_with_mqa(x).split([self.d_c, self.d_rope], -1)
        kv_latent = self.kv_a_layernorm(kv_latent)  # (B, T, d_c): c^KV
        k_rope = apply_rope(k_rope, cos, sin)  # (B, T, d_r): one RoPE key for all heads
        if cache is not None:  # the cache sees one "head": key = c^KV, value = k^R; an int8 cache quantizes both
            kv_latent, k_rope = cache.update(kv_latent[:, None], k_rope[:, None], self.layer_idx)
            kv_latent, k_rope = kv_latent[:, 0].to(x.dtype), k_rope[:, 0].to(x.dtype)  # (B, S, d)
        S = kv_latent.shape[1]
        if cache is not None and has_attention_protocol(cache):
            # A selective cache kept some tokens' c^KV and k^R only, and wants the probabilities, which the
            # absorbed path forms anyway (summed over the heads that share the one latent "head").
            mask = kept_keys_allowed(cache, self.layer_idx, T, pad_mask)  # (B, 1, T, S)
            out, probs = self.attend_absorbed(q_nope, q_rope, kv_latent, k_rope, mask)
            cache.observe_attention(self.layer_idx, probs)
        elif cache is not None and self.absorbed:
            mask = allowed_keys(pad_mask, T, S, x.device)
            out, _ = self.attend_absorbed(q_nope, q_rope, kv_latent, k_rope, mask)
        else:
            mask = None if pad_mask is None and (S == T or T == 1) else allowed_keys(pad_mask, T, S, x.device)
            out = self.attend_naive(q_nope, q_rope, kv_latent, k_rope, mask, causal=mask is None and T > 1)
        return self.o_proj(out.flatten(2))

    def attend_naive(self, q_nope, q_rope, kv_latent, k_rope, mask, causal=False):
        """Up-project the latent to per-head keys and values, then plain attention (DeepSeek-V2 eq. 12-19)."""
        B, S, _ = kv_latent.shape
        k_nope, v = self.kv_b_proj(kv_latent).view(B, S, self.n_heads, -1).split([self.d_nope, self.d_v], -1)
        k = torch.cat([k_nope, k_rope[:, :, None].expand(-1, -1, self.n_heads, -1)], -1)  # (B, S, H, d_qk)
        q = torch.cat([q_nope, q_rope], -1)  # (B, T, H, d_qk)
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask, is_causal=causal, scale=self.scale
        )  # (B, H, T, d_v)
        return out.transpose(1, 2)  # (B, T, H, d_v)

    def attend_absorbed(self, q_nope, q_rope, kv_latent, k_rope, mask):
        """q^C.k^C = (W^UK^T q^C).c^KV, so W^UK folds into the query; softmax(.) W^UV c^KV = W^UV (softmax(.) c^KV),
        so W^UV applies after attention (DeepSeek-V2 sec. 2.1.2). Per-head keys and values are never formed.
        Returns the output (B, T, H, d_v) and the attention probabilities (B, H, T, S)."""
        w = self.kv_b_proj.weight.view(self.n_heads, self.d_nope + self.d_v, self.d_c)
        w_uk, w_uv = w[:, : self.d_nope], w[:, self.d_nope :]  # (H, d_h, d_c), (H, d_v, d_c)
        q_latent = torch.einsum("bthd,hdc->bthc", q_nope, w_uk)
        scores = torch.einsum("bthc,bsc->bhts", q_latent, kv_latent) + torch.einsum("bthr,bsr->bhts", q_rope, k_rope)
        scores = (scores * self.scale).masked_fill(~mask, float("-inf"))
        probs = scores.softmax(-1, dtype=torch.float32).to(q_nope.dtype)
        out_latent = torch.einsum("bhts,bsc->bthc", probs, kv_latent)
        return torch.einsum("bthc,hvc->bthv", out_latent, w_uv), probs  # (B, T, H, d_v), (B, H, T, S)


class MLP(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


def route(scores, bias, top_k: int, normalize: bool, scaling: float):
    """DeepSeek-V3 eq. 13-16 with the selection bias of arXiv 2408.15664:
    g'_i = s_i if s_i + b_i in TopK({s_j + b_j}, K_r) else 0;  g_i = scaling * g'_i / sum_j g'_j.
    The bias only picks experts; the gate value uses the unbiased affinity s_i.
    scores: (..., N_r) sigmoid affinities -> gates, expert indices: (..., K_r)."""
    idx = torch.topk(scores + bias, top_k, dim=-1).indices
    gates = scores.gather(-1, idx)
    if normalize:
        gates = gates / (gates.sum(-1, keepdim=True) + 1e-20)
    return gates * scaling, idx


def expert_load(idx: torch.Tensor, n_experts: int) -> torch.Tensor:
    """load_i = number of (token, slot) assignments routed to expert i."""
    return torch.bincount(idx.flatten(), minlength=n_experts).float()


def sequence_balance_loss(scores: torch.Tensor, idx: torch.Tensor, alpha: float) -> torch.Tensor:
    """L_Bal = alpha * sum_i f_i * P_i, per sequence, averaged over the batch (DeepSeek-V3 eq. 17-20):
    f_i = N_r / (K_r T) * sum_t 1[i in TopK_t],  s'_i,t = s_i,t / sum_j s_j,t,  P_i = 1/T * sum_t s'_i,t.
    scores: (B, T, N_r) affinities; idx: (B, T, K_r) selected experts. Equals alpha when routing is uniform."""
    _, T, n_experts = scores.shape
    chosen = torch.zeros_like(scores).scatter_(-1, idx, 1.0)
    f = chosen.sum(1) * n_experts / (idx.shape[-1] * T)  # (B, N_r)
    p = (scores / scores.sum(-1, keepdim=True)).mean(1)  # (B, N_r)
    return alpha * (f * p).sum(-1).mean()


class Gate(nn.Module):
    """Sigmoid router with the loss-free balancing bias. The bias is a buffer: saved with the model, never trained."""

    def __init__(self, config: MoeConfig):
        super().__init__()
        self.top_k, self.n_experts = config.num_experts_per_tok, config.n_routed_experts
        self.normalize, self.scaling = config.norm_topk_prob, config.routed_scaling_factor
        self.alpha = config.seq_aux_alpha
        self.weight = nn.Parameter(torch.empty(self.n_experts, config.hidden_size))  # the centroids e_i
        self.register_buffer("e_score_correction_bias", torch.zeros(self.n_experts))  # b_i
        # Routing statistics, plain attributes so from_pretrained never sees them: the last forward's loads (for
        # logging) and the loads summed over training forwards since the balancing callback last read them.
        self.last_load = self.load_since_update = None

    def forward(self, x):  # x: (B, T, D)
        # The affinity is computed in float32 (DeepSeek keeps the gate in fp32): top-K is sensitive to ties.
        scores = torch.sigmoid(F.linear(x.float(), self.weight.float()))  # (B, T, N_r)
        gates, idx = route(scores, self.e_score_correction_bias.float(), self.top_k, self.normalize, self.scaling)
        with torch.no_grad():
            self.last_load = expert_load(idx, self.n_experts)
            if self.training:
                before = 0 if self.load_since_update is None else self.load_since_update
                self.load_since_update = self.last_load + before
        aux = sequence_balance_loss(scores, idx, self.alpha) if self.alpha > 0 else scores.new_zeros(())
        return gates.to(x.dtype), idx, aux


def grouped_experts(x, idx, gates, w_gate_up, w_down):
    """y_t = sum_k g_t,k * FFN_{e_t,k}(x_t), FFN_e(x) = W2_e (silu(W1_e x) * W3_e x), each expert run only on its
    tokens. x: (N, D); idx, gates: (N, K); w_gate_up: (E, 2I, D), W1 and W3 stacked; w_down: (E, D, I)."""
    token, slot_gates, counts = sort_by_expert(idx, gates, w_gate_up.shape[0])
    # grouped_mm is one kernel for all experts on a GPU; on CPU it loops over experts, slower than SlicedExperts.
    experts = grouped_mm_experts if x.is_cuda else SlicedExperts.apply
    return experts(x, slot_gates, w_gate_up, w_down, token, counts)


def sort_by_expert(idx, gates, n_experts: int):
    """One stable sort of the N*K (token, slot) assignments by expert id, so each expert owns a contiguous slice.
    idx, gates: (N, K) -> the token of each assignment and its gate, (N*K,) each, and the count per expert (E,)."""
    order = idx.flatten().argsort(stable=True)
    counts = torch.bincount(idx.flatten(), minlength=n_experts)
    return order // idx.shape[1], gates.flatten()[order], counts


def grouped_mm_experts(x, slot_gates, w_gate_up, w_down, token, counts):
    """The routed experts as two grouped matmuls over the expert-sorted rows; autograd does the backward."""
    offsets = counts.cumsum(0).to(torch.int32)
    gate, up = F.grouped_mm(x.index_select(0, token), w_gate_up.transpose(1, 2), offs=offsets).chunk(2, dim=-1)
    ys = F.grouped_mm(F.silu(gate) * up * slot_gates[:, None], w_down.transpose(1, 2), offs=offsets)  # (N*K, D)
    return torch.zeros_like(x).index_add_(0, token, ys)


class SlicedExperts(torch.autograd.Function):
    """The routed experts on CPU, one expert's slice at a time, forward and backward. Autograd through one big
    gather, a split and a cat allocates several (N*K, D) temporaries, and on a CPU those fresh allocations (page
    faults, memory bandwidth) cost more than the expert matmuls themselves; here every temporary is one expert's.
    Experts with no tokens cost nothing. With h = silu(a) * u, [a; u] = W_gate_up x, the backward is
    dh = g (dy W2),  dg = h . (dy W2),  da = dh * u * silu'(a),  du = dh * silu(a),
    silu'(a) = s (1 + a (1 - s)) with s = sigmoid(a)."""

    @staticmethod
    def forward(ctx, x, slot_gates, w_gate_up, w_down, token, counts):
        counts = counts.tolist()
        y = torch.zeros_like(x)
        gate_ups = []  # (n_e, 2I) per expert with tokens: all the backward needs beyond the inputs
        for rows, g, w1, w2 in zip(token.split(counts), slot_gates.split(counts), w_gate_up, w_down, strict=True):
            if len(rows):
                gate_up = x.index_select(0, rows) @ w1.T
                a, u = gate_up.chunk(2, dim=-1)
                y.index_add_(0, rows, (F.silu(a) * u * g[:, None]) @ w2.T)
                gate_ups.append(gate_up)
        ctx.counts = counts
        ctx.save_for_backward(x, slot_gates, w_gate_up, w_down, token, *gate_ups)
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy):
        x, slot_gates, w_gate_up, w_down, token, *gate_ups = ctx.saved_tensors
        dx, d_gates = torch.zeros_like(x), torch.empty_like(slot_gates)
        # Written expert by expert with out=: zero-filling then copying 2 * E * I * D floats costs as much as a matmul.
        d_gate_up, d_down = torch.empty_like(w_gate_up), torch.empty_like(w_down)
        gate_ups = iter(gate_ups)
        for e, (rows, g, dg) in enumerate(zip(token.split(ctx.counts), slot_gates.split(ctx.counts),
                                              d_gates.split(ctx.counts), strict=True)):
            if not len(rows):
                d_gate_up[e].zero_()
                d_down[e].zero_()
                continue
            a, u = next(gate_ups).chunk(2, dim=-1)  # (n_e, I) each
            s = torch.sigmoid(a)
            silu = a * s
            h = silu * u
            x_e, dy_e = x.index_select(0, rows), dy.index_select(0, rows)  # (n_e, D)
            dh_ungated = dy_e @ w_down[e]  # (n_e, I)
            dg.copy_((dh_ungated * h).sum(-1))
            dh = dh_ungated * g[:, None]
            torch.mm(dy_e.T, h * g[:, None], out=d_down[e])
            d_gate_up_e = torch.cat([dh * u * s * (1 + a * (1 - s)), dh * silu], -1)  # (n_e, 2I)
            torch.mm(d_gate_up_e.T, x_e, out=d_gate_up[e])
            dx.index_add_(0, rows, d_gate_up_e @ w_gate_up[e])
        return dx, d_gates, d_gate_up, d_down, None, None


class Experts(nn.Module):
    def __init__(self, config: MoeConfig):
        super().__init__()
        E, D, I = config.n_routed_experts, config.hidden_size, config.moe_intermediate_size
        self.gate_up_proj = nn.Parameter(torch.empty(E, 2 * I, D))
        self.down_proj = nn.Parameter(torch.empty(E, D, I))

    def forward(self, x, idx, gates):
        return grouped_experts(x, idx, gates, self.gate_up_proj, self.down_proj)


class MoE(nn.Module):
    """DeepSeekMoE (DeepSeek-V3 eq. 12): h' = u + sum_{N_s shared} FFN^s(u) + sum_{N_r routed} g_i FFN^r_i(u)."""

    def __init__(self, config: MoeConfig):
        super().__init__()
        self.gate = Gate(config)
        self.experts = Experts(config)
        # N_s shared experts of width I are one MLP of width N_s * I.
        self.shared_experts = MLP(config.hidden_size, config.moe_intermediate_size * config.n_shared_experts)

    def forward(self, x):  # (B, T, D)
        gates, idx, aux = self.gate(x)
        routed = self.experts(x.flatten(0, 1), idx.flatten(0, 1), gates.flatten(0, 1)).view_as(x)
        return routed + self.shared_experts(x), aux


class Block(GradientCheckpointingLayer):
    def __init__(self, config: MoeConfig, layer_idx: int, dense: bool = False):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = MLA(config, layer_idx)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.is_moe = not dense and layer_idx >= config.first_k_dense_replace
        self.mlp = MoE(config) if self.is_moe else MLP(config.hidden_size, config.intermediate_size)

    def forward(self, h, cos, sin, pad_mask=None, cache=None):
        h = h + self.self_attn(self.input_layernorm(h), cos, sin, pad_mask, cache=cache)
        if self.is_moe:
            out, aux = self.mlp(self.post_attention_layernorm(h))
        else:
            out, aux = self.mlp(self.post_attention_layernorm(h)), h.new_zeros(())
        return h + out, aux


class MTPModule(nn.Module):
    """The k-th multi-token prediction module (DeepSeek-V3 eq. 21-23):
    h'^k_i = M_k [RMSNorm(h^{k-1}_i); RMSNorm(Emb(t_{i+k}))],  h^k = TRM_k(h'^k),  P^k_{i+k+1} = OutHead(h^k_i).
    The embedding and output head are the main model's; only the norms, M_k and the block are its own."""

    def __init__(self, config: MoeConfig, layer_idx: int):
        super().__init__()
        self.hnorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.enorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.eh_proj = nn.Linear(2 * config.hidden_size, config.hidden_size, bias=False)  # M_k
        self.block = Block(config, layer_idx, dense=config.mtp_dense_ffn)
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)  # before the shared output head

    def forward(self, h_prev, emb_next, cos, sin, pad_mask=None, cache=None):  # (B, T', D) each
        h = self.eh_proj(torch.cat([self.hnorm(h_prev), self.enorm(emb_next)], -1))
        return self.block(h, cos, sin, pad_mask, cache=cache)


def mtp_loss(module_losses: list[torch.Tensor], weight: float) -> torch.Tensor:
    """L_MTP = lambda / D * sum_{k=1..D} L^k_MTP  (DeepSeek-V3 eq. 25)."""
    return weight * torch.stack(module_losses).mean()


class MoePreTrainedModel(PreTrainedModel):
    config_class = MoeConfig
    config: MoeConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules: ClassVar = ["Block"]
    _supports_sdpa = True
    # A bf16 bias cannot take steps of gamma = 1e-3 around values near 1; the router stays in float32.
    _keep_in_fp32_modules_strict: ClassVar = ["e_score_correction_bias"]

    def _init_weights(self, module):
        super()._init_weights(module)
        std = self.config.initializer_range
        if isinstance(module, Gate):
            init.normal_(module.weight, mean=0.0, std=std)
            init.zeros_(module.e_score_correction_bias)
        elif isinstance(module, Experts):
            init.normal_(module.gate_up_proj, mean=0.0, std=std)
            init.normal_(module.down_proj, mean=0.0, std=std)


@dataclass
class MoeModelOutput(BaseModelOutputWithPast):
    aux_loss: torch.Tensor | None = None  # sum over MoE layers of the sequence-wise balance loss


@dataclass
class MoeCausalLMOutput(CausalLMOutputWithPast):
    aux_loss: torch.Tensor | None = None
    mtp_loss: torch.Tensor | None = None


class MoeModel(MoePreTrainedModel):
    def __init__(self, config: MoeConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(config)
        self.post_init()

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, cache=None, inputs_embeds=None,
                use_cache=None, **kwargs):
        h = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds  # (B, T, D)
        if use_cache is None:
            use_cache = self.config.use_cache and not self.training
        if use_cache and cache is None:
            cache = DynamicCache()
        past = cache.get_seq_length() if cache is not None else 0
        if position_ids is None:
            position_ids = positions_from_mask(attention_mask, past, h.shape[1], h.device)
        cos, sin = self.rotary_emb(position_ids)
        pad_mask = None if attention_mask is None or bool(attention_mask.all()) else attention_mask.bool()
        aux = h.new_zeros((), dtype=torch.float32)
        for layer in self.layers:
            h, layer_aux = layer(h, cos, sin, pad_mask, cache=cache if use_cache else None)
            aux = aux + layer_aux
        return MoeModelOutput(last_hidden_state=self.norm(h), cache=cache if use_cache else None, aux_loss=aux)


class MoeForCausalLM(MoePreTrainedModel, GenerationMixin):
    _tied_weights_keys: ClassVar = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: MoeConfig):
        super().__init__(config)
        self.model = MoeModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        L = config.num_hidden_layers
        self.mtp = nn.ModuleList(MTPModule(config, L + k) for k in range(config.num_mtp_modules))
        self.post_init()

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, cache=None, inputs_embeds=None,
                labels=None, use_cache=None, logits_to_keep=0, **kwargs):
        out = self.model(input_ids, attention_mask=attention_mask, position_ids=position_ids, cache=cache,
                         inputs_embeds=inputs_embeds, use_cache=use_cache)
        h = out.last_hidden_state
        logits = self.lm_head(h[:, -logits_to_keep:] if logits_to_keep else h)
        loss = aux = mtp = None
        if labels is not None:
            aux = out.aux_loss
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs) + aux
            if len(self.mtp) and input_ids is not None and input_ids.shape[1] > len(self.mtp) + 1:
                mtp = self.mtp_losses(h, input_ids, attention_mask, labels)
                loss = loss + mtp
        return MoeCausalLMOutput(loss=loss, logits=logits, cache=out.cache, aux_loss=aux, mtp_loss=mtp)

    def mtp_losses(self, h, input_ids, attention_mask, labels):
        """Run the D MTP modules sequentially; module k at position i predicts token i+k+1."""
        T = input_ids.shape[1]
        emb = self.model.embed_tokens(input_ids)
        positions = positions_from_mask(attention_mask, 0, T, h.device)
        pad_mask = None if attention_mask is None or bool(attention_mask.all()) else attention_mask.bool()
        losses = []
        for k, module in enumerate(self.mtp, start=1):
            cos, sin = self.model.rotary_emb(positions[:, : T - k])
            pad_k = None if pad_mask is None else pad_mask[:, : T - k]
            h, aux = module(h[:, :-1], emb[:, k:], cos, sin, pad_k)  # (B, T-k, D)
            logits = self.lm_head(module.norm(h))
            # labels[:, k:] are the tokens at i+k; the loss shifts them by one more, to i+k+1.
            losses.append(self.loss_function(logits=logits, labels=labels[:, k:], vocab_size=self.config.vocab_size)
                          + aux)
        return mtp_loss(losses, self.config.mtp_loss_weight)


class MoeForSequenceClassification(GenericForSequenceClassification, MoePreTrainedModel):
    # A reward model starts from a causal LM checkpoint: its output head and MTP modules are left behind.
    _keys_to_ignore_on_load_unexpected: ClassVar = [r"^lm_head\.", r"^mtp\."]


# Builders: literal sizes. Parameter counts measured with sum(p.numel()), MTP module included; "active" counts the
# main model with K_r of the N_r routed experts.


def moe_tiny(vocab_size: int = 512) -> MoeConfig:
    """1.40M parameters at vocab 512 (0.73M active): trains on two CPU cores."""
    return MoeConfig(vocab_size=vocab_size, hidden_size=128, num_hidden_layers=4, num_attention_heads=4,
                     q_lora_rank=0, kv_lora_rank=32, qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32,
                     intermediate_size=384, moe_intermediate_size=64, n_shared_experts=1, n_routed_experts=8,
                     num_experts_per_tok=2, first_k_dense_replace=1, num_mtp_modules=1,
                     mtp_dense_ffn=True)  # a cheaper drafter than V3's MoE block at this size (bench/models.py part 5)


def moe_small(vocab_size: int = 32_000) -> MoeConfig:
    """202M parameters at vocab 32k (67M active): one GPU."""
    return MoeConfig(vocab_size=vocab_size, hidden_size=512, num_hidden_layers=12, num_attention_heads=8,
                     q_lora_rank=256, kv_lora_rank=128, qk_nope_head_dim=64, qk_rope_head_dim=32, v_head_dim=64,
                     intermediate_size=1536, moe_intermediate_size=256, n_shared_experts=1, n_routed_experts=32,
                     num_experts_per_tok=4, first_k_dense_replace=1, num_mtp_modules=1, max_position_embeddings=4096)


def moe_base(vocab_size: int = 32_000) -> MoeConfig:
    """1.8B parameters at vocab 32k (319M active): several GPUs."""
    return MoeConfig(vocab_size=vocab_size, hidden_size=1024, num_hidden_layers=16, num_attention_heads=16,
                     q_lora_rank=512, kv_lora_rank=256, qk_nope_head_dim=64, qk_rope_head_dim=32, v_head_dim=64,
                     intermediate_size=4096, moe_intermediate_size=512, n_shared_experts=2, n_routed_experts=64,
                     num_experts_per_tok=6, first_k_dense_replace=1, num_mtp_modules=1, max_position_embeddings=4096,
                     routed_scaling_factor=2.5)


def from_hf_deepseek_v3(hf_model) -> MoeForCausalLM:
    """Our model with the weights of transformers' DeepseekV3ForCausalLM (n_group = topk_group = 1; its MTP
    layers are not part of that class, so ours start untrained and num_mtp_modules is 0)."""
    c = hf_model.config
    if (c.n_group or 1) != 1 or (c.topk_group or 1) != 1:
        raise ValueError(f"only n_group=1, topk_group=1 convert; got n_group={c.n_group}, topk_group={c.topk_group}")
    rope = c.rope_parameters or {}
    if rope.get("rope_type", "default") != "default":
        raise ValueError(f"only default RoPE converts; got rope_type={rope.get('rope_type')}")
    config = MoeConfig(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, num_hidden_layers=c.num_hidden_layers,
        num_attention_heads=c.num_attention_heads, q_lora_rank=c.q_lora_rank or 0, kv_lora_rank=c.kv_lora_rank,
        qk_nope_head_dim=c.qk_nope_head_dim, qk_rope_head_dim=c.qk_rope_head_dim, v_head_dim=c.v_head_dim,
        intermediate_size=c.intermediate_size, moe_intermediate_size=c.moe_intermediate_size,
        n_shared_experts=c.n_shared_experts, n_routed_experts=c.n_routed_experts,
        num_experts_per_tok=c.num_experts_per_tok, first_k_dense_replace=c.first_k_dense_replace,
        norm_topk_prob=bool(c.norm_topk_prob), routed_scaling_factor=c.routed_scaling_factor,
        rope_theta=rope.get("rope_theta", 10000.0), rms_norm_eps=c.rms_norm_eps, num_mtp_modules=0,
        max_position_embeddings=c.max_position_embeddings, tie_word_embeddings=c.tie_word_embeddings,
        pad_token_id=c.pad_token_id, bos_token_id=c.bos_token_id, eos_token_id=c.eos_token_id,
    )
    model = MoeForCausalLM(config)
    state = {k: v.clone() for k, v in hf_model.state_dict().items()}
    if not c.rope_interleave:
        # HF then pairs rotary dims (j, j + d/2); ours pairs (2j, 2j+1). Permuting the RoPE output rows of the
        # query and key projections gives the same dot products.
        d_r = c.qk_rope_head_dim
        perm = torch.stack([torch.arange(d_r // 2), torch.arange(d_r // 2) + d_r // 2], -1).flatten()
        d_qk = c.qk_nope_head_dim + d_r
        for i in range(c.num_hidden_layers):
            p = f"model.layers.{i}.self_attn."
            q_name = p + ("q_b_proj.weight" if c.q_lora_rank else "q_proj.weight")
            q = state[q_name].view(c.num_attention_heads, d_qk, -1)
            q[:, c.qk_nope_head_dim :] = q[:, c.qk_nope_head_dim :][:, perm].clone()
            kv = state[p + "kv_a_proj_with_mqa.weight"]
            kv[c.kv_lora_rank :] = kv[c.kv_lora_rank :][perm].clone()
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or [k for k in missing if not k.startswith("mtp.")]:
        raise ValueError(f"weights did not map: missing={missing}, unexpected={unexpected}")
    return model
