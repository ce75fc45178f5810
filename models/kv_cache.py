"""Two KV caches for generate(): 8-bit keys and values, and a selective cache of bounded size.

Both are transformers `Cache`s made of per-layer `CacheLayerMixin`s, so any of our backbones takes them as
`model.generate(..., cache=Int8Cache())` or `model(..., cache=SelectiveCache(budget=64, recent=16))`: the attention
modules call `cache.update(k, v, layer_idx)` and get back the keys and values to attend over. Gemini (arXiv 2507.06261)
lists quantized and selective KV caches among its inference-efficiency methods; the formulas below are the ones of the
papers cited at each function. transformers' own QuantizedCache needs the optional quanto or HQQ backends; this one is
plain torch.

The selective cache needs to know where attention went. The protocol, for any model that wants to support it:

1. `k, v = cache.update(k, v, layer_idx)` as usual. The cache may hold fewer keys than tokens seen, so
2. build the attention mask from `cache.key_positions(layer_idx)` -> (B, H_kv, S) absolute positions of the returned
   keys (not from `arange(S)`): causality is `key_pos <= query_pos`;
3. compute the attention probabilities explicitly and call `cache.observe_attention(layer_idx, probs)` with probs
   (B, h, T, S) over exactly the keys `update` returned; h may be a multiple of H_kv (grouped-query attention, or
   MLA's one latent "head"): the query heads sharing a key head add up.
`has_attention_protocol(cache)` tells a model whether to do 2 and 3, and `kept_keys_allowed` builds the causal mask
of step 2. models/dense.py, models/moe.py (MLA: one latent "head") and models/multimodal.py implement it. A model
that calls update but never observe_attention gets an error on its next update instead of silently arbitrary
evictions.
"""

from functools import partial

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

# ------------------------------------------------------------------------------------------------ 8-bit quantization


def quantize_int8(x: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric absmax quantization per group of `group_size` channels (LLM.int8(), arXiv 2208.07339, sec. 3.1):
    s_g = max_{j in g} |x_j| / 127,  q_j = round(x_j / s_g) in [-127, 127],  x_j ~ q_j s_g.
    x: (..., D) with D a multiple of group_size -> q: (..., D) int8, s: (..., D / group_size) float32.
    group_size = D gives one scale per token per head ("per token"); smaller groups track outlier channels better
    at 4 / group_size extra bytes per element."""
    *lead, D = x.shape
    groups = x.float().reshape(*lead, D // group_size, group_size)
    scale = groups.abs().amax(-1, keepdim=True).clamp(min=torch.finfo(torch.float32).tiny) / 127
    q = torch.round(groups / scale).clamp(-127, 127).to(torch.int8)
    return q.reshape(*lead, D), scale.squeeze(-1)


def dequantize_int8(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """x ~ q s, each group of channels times its scale: (..., D) int8, (..., G) -> (..., D) in `dtype`."""
    *lead, D = q.shape
    groups = q.float().reshape(*lead, scale.shape[-1], -1) * scale[..., None]
    return groups.reshape(*lead, D).to(dtype)


class StoredTensorsLayer(CacheLayerMixin):
    """A cache layer whose state is a few tensors of shape (batch, heads, positions, ...), named by STORED: a beam
    reorder, a batch expansion or selection applies to all of them alike, and their bytes are the layer's."""

    STORED: tuple[str, ...] = ()

    def _apply(self, fn) -> None:
        if self.keys is not None:
            for name in self.STORED:
                setattr(self, name, fn(getattr(self, name)))

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._apply(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._apply(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._apply(lambda t: t[indices])

    def nbytes(self) -> int:
        if self.keys is None:
            return 0
        return sum(getattr(self, name).numel() * getattr(self, name).element_size() for name in self.STORED)


class Int8Layer(StoredTensorsLayer):
    """One layer's keys and values as int8 plus float32 scales, appended token by token: a token's scales depend on
    that token only, so nothing is ever re-quantized (unlike KIVI's per-channel keys, arXiv 2402.02750, which need a
    full-precision residual window). Each update returns the dequantized keys and values of all tokens, the new ones
    included, so attention sees exactly what later steps will see."""

    STORED = ("keys", "values", "key_scales", "value_scales")
    is_croppable = True

    def __init__(self, group_size: int | None = None):
        super().__init__()
        self.group_size = group_size  # None: the whole head dimension, one scale per token per head
        self.key_scales = self.value_scales = None

    def lazy_initialization(self, key_states, value_states):
        self.dtype, self.device = key_states.dtype, key_states.device
        self.key_group = self.group_size or key_states.shape[-1]
        self.value_group = self.group_size or value_states.shape[-1]  # MLA's keys and values differ in width
        for name, width, group in (("key", key_states.shape[-1], self.key_group),
                                   ("value", value_states.shape[-1], self.value_group)):
            if width % group:
                raise ValueError(f"group_size {group} must divide the {name} width {width}")
        self.is_initialized = True

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        qk, sk = quantize_int8(key_states, self.key_group)
        qv, sv = quantize_int8(value_states, self.value_group)
        if self.keys is None:
            self.keys, self.key_scales, self.values, self.value_scales = qk, sk, qv, sv
        else:
            self.keys, self.values = torch.cat([self.keys, qk], -2), torch.cat([self.values, qv], -2)
            self.key_scales = torch.cat([self.key_scales, sk], -2)
            self.value_scales = torch.cat([self.value_scales, sv], -2)
        return (dequantize_int8(self.keys, self.key_scales, self.dtype),
                dequantize_int8(self.values, self.value_scales, self.dtype))

    def get_seq_length(self) -> int:
        return 0 if self.keys is None else self.keys.shape[-2]

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0

    def get_max_length(self) -> int:
        return -1


    def reset(self) -> None:
        self.keys = self.values = self.key_scales = self.value_scales = None
        self.is_initialized = False

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove < 0:  # transformers' convention: a negative count of tokens to drop from the end
            self._apply(lambda t: t[..., :tokens_to_remove, :])



class Int8Cache(Cache):
    """8-bit KV cache: about half the bytes of bf16 (one int8 per element) plus 4 bytes of scale per group."""

    def __init__(self, group_size: int | None = None):
        super().__init__(layer_class_to_replicate=partial(Int8Layer, group_size))

    def nbytes(self) -> int:
        return sum(layer.nbytes() for layer in self.layers)


# ------------------------------------------------------------------------------------------------ selective cache


def select_kept(scores: torch.Tensor, budget: int, recent: int) -> torch.Tensor:
    """Indices of the keys to keep, per batch row and head, in position order: the last `recent` keys, plus the
    budget - recent others with the highest accumulated attention A_s = sum_{t seen} p_{t,s}
    (H2O's heavy hitters plus a recent window, Zhang et al., arXiv 2306.14048, sec. 4 eq. 2).
    scores: (B, H, S) accumulated attention of the stored keys, oldest first -> (B, H, min(S, budget)) indices."""
    S = scores.shape[-1]
    if S <= budget:
        return torch.arange(S, device=scores.device).expand(*scores.shape[:-1], S)
    older = scores[..., : S - recent]
    heavy = older.topk(budget - recent, dim=-1).indices  # (B, H, budget - recent)
    window = torch.arange(S - recent, S, device=scores.device).expand(*scores.shape[:-1], recent)
    return torch.cat([heavy, window], -1).sort(-1).values


class SelectiveLayer(StoredTensorsLayer):
    """At most `budget` keys and values per head after each step, chosen by `select_kept`. Keeps the absolute
    position of every stored key, since the stored index of a key no longer equals its position. Its bytes count the
    scores and positions too: 12 bytes per kept key per head."""

    STORED = ("keys", "values", "scores", "positions")
    is_croppable = False

    def __init__(self, budget: int, recent: int):
        super().__init__()
        if not 0 <= recent < budget:
            raise ValueError(f"need 0 <= recent < budget; got recent={recent}, budget={budget}")
        self.budget, self.recent = budget, recent
        self.cumulative_length = 0  # tokens seen: the position of the next token
        self.scores = self.positions = None
        self.awaiting_observation = False

    def lazy_initialization(self, key_states, value_states):
        self.device = key_states.device
        self.is_initialized = True

    def update(self, key_states, value_states, *args, **kwargs):
        if self.awaiting_observation:
            raise RuntimeError("SelectiveCache needs attention probabilities: the model must call "
                               "cache.observe_attention(layer_idx, probs) after each update (see models/kv_cache.py)")
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        B, H, T, _ = key_states.shape
        new_pos = torch.arange(self.cumulative_length, self.cumulative_length + T, device=key_states.device)
        new_pos = new_pos.expand(B, H, T)
        new_scores = key_states.new_zeros(B, H, T, dtype=torch.float32)
        if self.keys is None:
            self.keys, self.values, self.positions, self.scores = key_states, value_states, new_pos, new_scores
        else:
            self.keys, self.values = torch.cat([self.keys, key_states], -2), torch.cat([self.values, value_states], -2)
            self.positions = torch.cat([self.positions, new_pos], -1)
            self.scores = torch.cat([self.scores, new_scores], -1)
        self.cumulative_length += T
        self.awaiting_observation = True
        return self.keys, self.values

    def observe(self, probs: torch.Tensor) -> None:
        """Add this step's attention to each key's total, then evict down to the budget.
        probs: (B, h, T, S) with h a multiple of the stored heads H; the h / H query heads of a group add up."""
        B, h, T, S = probs.shape
        H = self.keys.shape[1]
        self.scores = self.scores + probs.float().reshape(B, H, h // H, T, S).sum((2, 3))
        keep = select_kept(self.scores, self.budget, self.recent)  # (B, H, S')
        if keep.shape[-1] < S:
            self.keys = self.keys.gather(2, keep[..., None].expand(-1, -1, -1, self.keys.shape[-1]))
            self.values = self.values.gather(2, keep[..., None].expand(-1, -1, -1, self.values.shape[-1]))
            self.scores, self.positions = self.scores.gather(2, keep), self.positions.gather(2, keep)
        self.awaiting_observation = False

    def get_seq_length(self) -> int:
        return self.cumulative_length

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return (0 if self.keys is None else self.keys.shape[-2]) + query_length, 0

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.keys = self.values = self.scores = self.positions = None
        self.cumulative_length, self.awaiting_observation, self.is_initialized = 0, False, False



class SelectiveCache(Cache):
    """KV cache of at most `budget` keys per layer and head: the `recent` newest plus the heaviest hitters."""

    def __init__(self, budget: int = 256, recent: int = 64):
        super().__init__(layer_class_to_replicate=partial(SelectiveLayer, budget, recent))

    def observe_attention(self, layer_idx: int, probs: torch.Tensor) -> None:
        self.layers[layer_idx].observe(probs)

    def key_positions(self, layer_idx: int) -> torch.Tensor:
        """(B, H_kv, S) absolute positions of the keys the last update of this layer returned."""
        return self.layers[layer_idx].positions

    def nbytes(self) -> int:
        return sum(layer.nbytes() for layer in self.layers)


def has_attention_protocol(cache) -> bool:
    """Whether a cache wants the key positions used for the mask and the attention probabilities reported."""
    return hasattr(cache, "observe_attention")


def kept_keys_allowed(cache, layer_idx: int, query_length: int, pad_mask: torch.Tensor | None) -> torch.Tensor:
    """Step 2 of the protocol for a causal decoder: allowed[b, h, t, s] = pos_s <= pos_t and key s is not padding,
    where the queries are the last `query_length` tokens the layer has seen and pos_s the kept keys' positions.
    Each query also sees itself, so a padding query has one key rather than an all-masked (NaN) row.
    pad_mask: (B, tokens seen) bool, True for real tokens, or None -> (B, H_kv, T, S) bool."""
    key_pos = cache.key_positions(layer_idx)  # (B, H_kv, S)
    seen = cache.get_seq_length(layer_idx)
    query_pos = torch.arange(seen - query_length, seen, device=key_pos.device)[:, None]  # (T, 1)
    allowed = key_pos[:, :, None] <= query_pos  # (B, H_kv, T, S)
    if pad_mask is not None:
        real = pad_mask[:, None].expand(-1, key_pos.shape[1], -1).gather(-1, key_pos)  # (B, H_kv, S)
        allowed = (allowed & real[:, :, None]) | (key_pos[:, :, None] == query_pos)
    return allowed
