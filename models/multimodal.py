"""Multimodal decoder: one Transformer over a single stream of text tokens, image patches, audio frames and video
patches, with a softmax-routed sparse mixture-of-experts feed-forward (the Gemini recipe, arXiv 2312.11805 sec. 2 and
2507.06261 sec. 2.1: "a unified token stream", "sparse MoE with a learned router").

Read top to bottom: config, token-count arithmetic, encoders (image patches, audio spectrogram CNN, video patches),
attention (dense or local+global), MoE, block, model, causal-LM head, processor, builders.

The stream: `<|image|> e_1 .. e_N <|/image|>` where e_i are encoder outputs put in place of N slot tokens; the
processor writes the slots (pad ids) and marks them in `mm_token_type_ids` (0 text, 1 image, 2 audio, 3 video), the
names transformers' generate() already slices and drops after the first step. The decoder itself is a pre-LN Llama
block (RMSNorm, RoPE over stream positions) whose FFN is the MoE.

Departures, and why:
- Gemini's encoders are not public; ours are the textbook minimum: ViT's Linear(Flatten(patch)) (arXiv 2010.11929),
  a two-layer CNN over a log-mel spectrogram (as Whisper's conv stem, arXiv 2212.04356), video frames through the
  image's patch embedding with a factorized spatio-temporal encoding (ViViT's model 1, arXiv 2103.15691). Their
  encodings are fixed sines, added before the stream's RoPE, which then orders the spans in the sequence.
- Two inductive biases for reading attributes in combinations never seen together (measured on the tiny world's
  held-out pairs): video frames share the image encoder, so shapes learned from images are read in videos whatever
  their motion; the audio tokens add a frequency-pooled view of the CNN features, so a sweep's local slope on the
  mel axis, which is about the same at every pitch, is recognized at pitches where training never showed it.
- Top-K of the softmax renormalized over the chosen experts (Mixtral, arXiv 2401.04088, eq. 1-2 does the softmax
  after the top-K, which is the same gates), plus the Switch Transformer's balance loss (arXiv 2101.03961) so that
  the tiny model uses all experts.
"""

import json
import math
import re
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import ClassVar, Literal

import numpy as np
import torch
import torch.nn.functional as F
from huggingface_hub.dataclasses import strict
from torch import nn
from transformers import GenerationMixin, PreTrainedConfig, PreTrainedModel
from transformers.cache_utils import DynamicCache
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

from models.dense import RMSNorm, apply_rope, positions_from_mask, rope_angles, sinusoidal_encoding
from models.kv_cache import has_attention_protocol
from models.sparse_attention import local_global_attention, local_global_mask

MODALITIES = {"image": 1, "audio": 2, "video": 3}  # mm_token_type_ids codes; 0 is text


@strict
class MultimodalConfig(PreTrainedConfig):
    model_type = "alignflow_multimodal"

    vocab_size: int = 2048
    hidden_size: int = 256
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    head_dim: int | None = None  # None means hidden_size / heads
    num_experts: int = 4
    num_experts_per_tok: int = 2  # K
    expert_intermediate_size: int = 256  # SwiGLU width of one expert
    router_aux_loss_coef: float = 0.01  # alpha of the Switch balance loss (its paper's value)
    attention: Literal["dense", "local_global"] = "dense"
    attention_window: int = 256  # keys within this distance, the query included
    attention_stride: int = 256  # and every stride-th position
    image_size: int = 32  # pixels per side (square images and video frames)
    patch_size: int = 8
    num_channels: int = 3
    video_frames: int = 4  # frames are images: the image's patch_size and encoder
    sample_rate: int = 16_000  # Hz
    n_fft: int = 400  # 25 ms window at 16 kHz
    hop_length: int = 160  # 10 ms
    n_mels: int = 40  # 40 triangles over 0-8 kHz: the narrowest (~43 Hz) still covers one 40 Hz STFT bin
    audio_channels: int = 16  # CNN width
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 2048
    initializer_range: float = 0.02
    tie_word_embeddings: bool = True
    use_cache: bool = True
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    auto_map: dict = field(default_factory=dict)  # empty: TRL falls back to the Auto classes (see models/dense.py)

    def __post_init__(self, **kwargs):
        self.head_dim = self.head_dim or self.hidden_size // self.num_attention_heads
        super().__post_init__(**kwargs)

    def validate_architecture(self):
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size ({self.image_size}) must be a multiple of patch_size ({self.patch_size})")
        if self.hidden_size % 4:
            raise ValueError(f"hidden_size ({self.hidden_size}) must be a multiple of 4 for the 2D sine encoding")
        if not 1 <= self.num_experts_per_tok <= self.num_experts:
            raise ValueError(f"num_experts_per_tok ({self.num_experts_per_tok}) must be in 1..num_experts")


# ---------------------------------------------------------------------------------------------- token arithmetic
def image_tokens(image_size: int, patch_size: int) -> int:
    """N = (H / P)^2 patches: a 224 x 224 image in 14 x 14 patches gives 256 tokens (ViT, arXiv 2010.11929 sec. 3.1)."""
    return (image_size // patch_size) ** 2


def audio_frames(num_samples: int, hop_length: int) -> int:
    """STFT frames with centred windows: 1 + floor(L / hop). One second at 16 kHz with a 10 ms hop: 101."""
    return 1 + num_samples // hop_length


def audio_tokens(num_samples: int, hop_length: int) -> int:
    """Each stride-2 convolution (kernel 3, padding 1) maps n frames to floor((n - 1) / 2) + 1; two of them."""
    n = audio_frames(num_samples, hop_length)
    for _ in range(2):
        n = (n - 1) // 2 + 1
    return n


def video_tokens(frames: int, image_size: int, patch_size: int) -> int:
    return frames * image_tokens(image_size, patch_size)


# -------------------------------------------------------------------------------------------------------- encoders
def patchify(pixels: torch.Tensor, p: int) -> torch.Tensor:
    """(N, C, H, W) -> (N, (H/p)(W/p), C p p): patches row by row, each flattened in (C, p, p) order, the layout of a
    Conv2d weight, so Linear(Flatten(patch)) equals Conv2d(kernel = stride = p) (ViT eq. 1, x_p^i E)."""
    N, C, H, W = pixels.shape
    x = pixels.reshape(N, C, H // p, p, W // p, p).permute(0, 2, 4, 1, 3, 5)  # (N, H/p, W/p, C, p, p)
    return x.reshape(N, (H // p) * (W // p), C * p * p)


def sincos_2d(rows: int, cols: int, dim: int, device=None) -> torch.Tensor:
    """PE(r, c) = [PE(r), PE(c)], each the sine encoding of sec. 3.5 of arXiv 1706.03762 in dim/2 channels
    (the 2D sine-cosine of MAE, arXiv 2111.06377). -> (rows * cols, dim)."""
    r, c = torch.meshgrid(torch.arange(rows, device=device), torch.arange(cols, device=device), indexing="ij")
    return torch.cat([sinusoidal_encoding(r.reshape(1, -1), dim // 2), sinusoidal_encoding(c.reshape(1, -1), dim // 2)],
                     -1)[0]


class PatchEmbedding(nn.Module):
    """z = x_p E + E_pos: each flattened patch through one linear map, plus its 2D position (ViT eq. 1)."""

    def __init__(self, config: MultimodalConfig, patch_size: int):
        super().__init__()
        self.patch_size, self.grid = patch_size, config.image_size // patch_size
        self.proj = nn.Linear(config.num_channels * patch_size**2, config.hidden_size)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:  # (N, C, H, W) -> (N, P, D)
        z = self.proj(patchify(pixels.to(self.proj.weight.dtype), self.patch_size))
        return z + sincos_2d(self.grid, self.grid, z.shape[-1], z.device).to(z.dtype)


def spectrogram(wave: torch.Tensor, n_fft: int, hop_length: int) -> torch.Tensor:
    """|STFT(x)|, Hann window of n_fft samples every hop_length: (N, L) -> (N, n_fft/2 + 1, 1 + L // hop)."""
    window = torch.hann_window(n_fft, device=wave.device)
    return torch.stft(wave.float(), n_fft, hop_length, window=window, center=True, return_complex=True).abs()


def mel(hz):
    """m = 2595 log10(1 + f / 700)  (O'Shaughnessy's mel scale, as HTK)."""
    return 2595 * np.log10(1 + np.asarray(hz) / 700)


@lru_cache
def mel_filterbank(n_fft: int, n_mels: int, sample_rate: int) -> torch.Tensor:
    """(n_mels, n_fft/2 + 1): triangles with peaks equally spaced in mel from 0 to the Nyquist frequency, each
    rising from its left neighbour's peak and falling to its right one's (the HTK filterbank, unnormalized)."""
    peaks = 700 * (10 ** (np.linspace(0, mel(sample_rate / 2), n_mels + 2) / 2595) - 1)  # Hz
    bins = np.linspace(0, sample_rate / 2, n_fft // 2 + 1)
    left, centre, right = peaks[:-2, None], peaks[1:-1, None], peaks[2:, None]
    rising, falling = (bins - left) / (centre - left), (right - bins) / (right - centre)
    return torch.tensor(np.clip(np.minimum(rising, falling), 0, None), dtype=torch.float32)


# The spectrogram's change over 80 ms beside it: a tone's is zero after its onset, a chirp's is not at every pitch.
# Without it a probe of this encoder trained on the training clips named the kind of held-out ones (a high tone, a low
# chirp) 0.00-0.09 from their frequency content; with it 0.49-0.92 (0.29-0.71 with a 40 ms lag).
DELTA_FRAMES = 8


def log_mel_and_change(wave: torch.Tensor, n_fft: int, hop_length: int, n_mels: int, sample_rate: int) -> torch.Tensor:
    """S = log(1 + mel |STFT|) and S(t) - S(t - DELTA_FRAMES) (S before the clip is 0): (N, L) -> (N, 2, M, T)."""
    # log1p keeps silence at 0 and compresses the 20 dB between quiet and loud clips into a few units.
    filterbank = mel_filterbank(n_fft, n_mels, sample_rate).to(wave.device)
    spec = torch.einsum("mf,nft->nmt", filterbank, spectrogram(wave, n_fft, hop_length)).log1p()
    return torch.stack([spec, spec - F.pad(spec, (DELTA_FRAMES, 0))[..., :spec.shape[-1]]], 1)


class AudioEncoder(nn.Module):
    """Log-mel spectrogram and its change over DELTA_FRAMES -> two stride-2 3x3 convolutions over (mel, time) -> one
    token per 4 frames (40 ms): the features of every mel band through one linear map, plus their maximum over the
    bands through another (the frequency-invariant view), plus a sine encoding of the token's time index."""

    def __init__(self, config: MultimodalConfig):
        super().__init__()
        # The filterbank is looked up per call, not held in a buffer, which from_pretrained could leave on the meta
        # device (uninitialized memory) since no checkpoint carries it.
        self.n_fft, self.hop, self.n_mels, self.sample_rate = (config.n_fft, config.hop_length, config.n_mels,
                                                               config.sample_rate)
        c = config.audio_channels
        self.conv1 = nn.Conv2d(2, c, 3, stride=2, padding=1)  # log-mel and its change over DELTA_FRAMES
        self.conv2 = nn.Conv2d(c, c, 3, stride=2, padding=1)
        bands = config.n_mels
        for _ in range(2):
            bands = (bands - 1) // 2 + 1
        self.proj = nn.Linear(c * bands, config.hidden_size)
        self.pooled_proj = nn.Linear(c, config.hidden_size)

    def forward(self, wave: torch.Tensor) -> torch.Tensor:  # (N, L) -> (N, T', D)
        x = log_mel_and_change(wave, self.n_fft, self.hop, self.n_mels, self.sample_rate)
        x = F.gelu(self.conv2(F.gelu(self.conv1(x.to(self.proj.weight.dtype)))))  # (N, c, M', T')
        z = self.proj(x.permute(0, 3, 1, 2).flatten(2)) + self.pooled_proj(x.amax(2).transpose(1, 2))  # (N, T', D)
        t = torch.arange(z.shape[1], device=z.device)[None]
        return z + sinusoidal_encoding(t, z.shape[-1])[0].to(z.dtype)


def encode_video(image_encoder: PatchEmbedding, videos: torch.Tensor) -> torch.Tensor:
    """Each frame through the image encoder (patches and their 2D encoding), plus a sine encoding of the frame index
    (factorized space-time). (N, F, C, H, W) -> (N, F * P, D)."""
    N, T = videos.shape[:2]
    z = image_encoder(videos.flatten(0, 1)).unflatten(0, (N, T))  # (N, F, P, D)
    t = torch.arange(T, device=z.device)[None]
    z = z + sinusoidal_encoding(t, z.shape[-1])[0, :, None].to(z.dtype)
    return z.flatten(1, 2)


# ------------------------------------------------------------------------------------------------------- attention
class Attention(nn.Module):
    """Multi-head attention over the stream, dense or local+global (models/sparse_attention.py). With a cache that
    asks for it (models/kv_cache.py), the mask uses the cache's key positions and the probabilities are reported."""

    def __init__(self, config: MultimodalConfig, layer_idx: int):
        super().__init__()
        self.layer_idx, self.heads, self.head_dim = layer_idx, config.num_attention_heads, config.head_dim
        self.qkv_proj = nn.Linear(config.hidden_size, 3 * self.heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.heads * self.head_dim, config.hidden_size, bias=False)
        sparse = config.attention == "local_global"
        self.window = config.attention_window if sparse else None
        self.stride = config.attention_stride

    def mask(self, query_idx, key_idx, key_real):
        """allowed (..., T, S) over stream indices: causal or local+global, padding keys off, each query on itself."""
        if self.window is None:
            allowed = key_idx[..., None, :] <= query_idx[:, None]
        else:
            allowed = local_global_mask(query_idx, key_idx, self.window, self.stride)
        if key_real is not None:
            allowed = (allowed & key_real) | (key_idx[..., None, :] == query_idx[:, None])
        return allowed

    def forward(self, x, rope, query_idx, attention_mask, cache=None):
        B, T, _ = x.shape
        q, k, v = self.qkv_proj(x).view(B, T, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)  # (B, h, T, d)
        q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)  # (B, h, S, d)
        S, observe = k.shape[2], cache is not None and has_attention_protocol(cache)
        if observe:  # the cache kept some keys only: their stream indices, and the probabilities it needs
            key_idx = cache.key_positions(self.layer_idx)  # (B, h, S)
            real = None if attention_mask is None else attention_mask[:, None].expand(-1, self.heads, -1)
            real = None if real is None else real.gather(-1, key_idx)[:, :, None]  # (B, h, 1, S)
            scores = torch.einsum("bhtd,bhsd->bhts", q, k) / math.sqrt(self.head_dim)
            probs = scores.masked_fill(~self.mask(query_idx, key_idx, real), float("-inf")).float().softmax(-1)
            cache.observe_attention(self.layer_idx, probs)
            out = probs.to(v.dtype) @ v
        elif attention_mask is None and self.window is not None and S == T > self.window:
            out = local_global_attention(q, k, v, self.window, self.stride)  # no T x T matrix at all
        elif attention_mask is None and self.window is None and (S == T or T == 1):
            out = F.scaled_dot_product_attention(q, k, v, is_causal=T > 1)
        else:
            real = None if attention_mask is None else attention_mask[:, None, None, -S:]  # (B, 1, 1, S)
            allowed = self.mask(query_idx, torch.arange(S, device=x.device), real)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)
        return self.o_proj(out.transpose(1, 2).flatten(2))  # (B, T, D)


# ------------------------------------------------------------------------------------------------------------- MoE
def softmax_topk_gates(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """p = softmax(W_r x + b_r); experts TopK(p); gates g_i = p_i / sum_{j in TopK} p_j  (Shazeer et al.,
    arXiv 1701.06538, eq. 3-5, with GShard's softmax; Mixtral eq. 2). logits (N, E) -> p (N, E), g (N, K), idx (N, K)."""
    probs = logits.float().softmax(-1)
    top, idx = probs.topk(k, dim=-1)
    return probs, top / top.sum(-1, keepdim=True), idx


def switch_balance_loss(probs: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """L = E * sum_i f_i P_i: f_i the fraction of the N K assignments sent to expert i, P_i its mean router
    probability (Switch Transformer, arXiv 2101.03961, eq. 4-6, counting all K choices). 1 when balanced."""
    E = probs.shape[-1]
    f = F.one_hot(idx, E).float().mean((0, 1))
    return E * (f * probs.mean(0)).sum()


class Expert(nn.Module):
    """SwiGLU FFN (arXiv 2002.05202): (Swish(x W) * x V) W_2."""

    def __init__(self, config: MultimodalConfig):
        super().__init__()
        D, d_ff = config.hidden_size, config.expert_intermediate_size
        self.gate_proj, self.up_proj = nn.Linear(D, d_ff, bias=False), nn.Linear(D, d_ff, bias=False)
        self.down_proj = nn.Linear(d_ff, D, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class SparseMoE(nn.Module):
    """y = sum_{i in TopK} g_i E_i(x): each token runs through K of E experts."""

    def __init__(self, config: MultimodalConfig):
        super().__init__()
        self.k = config.num_experts_per_tok
        self.router = nn.Linear(config.hidden_size, config.num_experts, bias=True)  # W_r, b_r
        self.experts = nn.ModuleList(Expert(config) for _ in range(config.num_experts))
        # Assignments per expert summed over training forwards until a trainer reads and clears them (for MaxVio);
        # a plain attribute, so from_pretrained never sees it.
        self.load_since_update = None

    def forward(self, x):  # (B, T, D) -> (B, T, D), balance loss
        flat = x.reshape(-1, x.shape[-1])
        probs, gates, idx = softmax_topk_gates(self.router(flat), self.k)
        if self.training:
            load = torch.bincount(idx.flatten(), minlength=len(self.experts)).float()
            self.load_since_update = load if self.load_since_update is None else self.load_since_update + load
        out = torch.zeros_like(flat)
        for e, expert in enumerate(self.experts):
            token, slot = (idx == e).nonzero(as_tuple=True)  # tokens that chose e, and in which of their K slots
            if token.numel():
                out = out.index_add(0, token, expert(flat[token]) * gates[token, slot, None].to(x.dtype))
        return out.view_as(x), switch_balance_loss(probs, idx)


class Block(GradientCheckpointingLayer):
    """Pre-LN: h = h + Attn(Norm(h)); h = h + MoE(Norm(h))  (arXiv 2002.04745)."""

    def __init__(self, config: MultimodalConfig, layer_idx: int):
        super().__init__()
        self.attn_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, layer_idx)
        self.mlp_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = SparseMoE(config)

    def forward(self, h, rope, query_idx, attention_mask, cache=None):
        h = h + self.self_attn(self.attn_norm(h), rope, query_idx, attention_mask, cache=cache)
        out, aux = self.mlp(self.mlp_norm(h))
        return h + out, aux


# ----------------------------------------------------------------------------------------------------------- model
class MultimodalPreTrainedModel(PreTrainedModel):
    config_class = MultimodalConfig
    config: MultimodalConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules: ClassVar = ["Block"]
    _supports_sdpa = True


@dataclass
class MultimodalModelOutput(BaseModelOutputWithPast):
    aux_loss: torch.Tensor | None = None  # sum over layers of the Switch balance loss


@dataclass
class MultimodalCausalLMOutput(CausalLMOutputWithPast):
    aux_loss: torch.Tensor | None = None  # router_aux_loss_coef * that sum: the part of `loss` that is not the LM's


class MultimodalModel(MultimodalPreTrainedModel):
    def __init__(self, config: MultimodalConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        self.image_encoder = PatchEmbedding(config, config.patch_size)
        self.audio_encoder = AudioEncoder(config)
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_init()

    def media_features(self, pixel_values, input_values, input_values_mask, pixel_values_videos) -> dict:
        """{code: (n_slots, D)} encoder outputs in slot order, per modality present."""
        feats = {}
        if pixel_values is not None:
            feats[MODALITIES["image"]] = self.image_encoder(pixel_values).flatten(0, 1)
        if input_values is not None:
            z = self.audio_encoder(input_values)  # (N, T'max, D): clips padded to the longest
            lengths = input_values_mask.sum(-1).tolist() if input_values_mask is not None else \
                [input_values.shape[-1]] * len(input_values)
            feats[MODALITIES["audio"]] = torch.cat([z[i, :audio_tokens(int(n), self.config.hop_length)]
                                                    for i, n in enumerate(lengths)])
        if pixel_values_videos is not None:
            feats[MODALITIES["video"]] = encode_video(self.image_encoder, pixel_values_videos).flatten(0, 1)
        return feats

    def embed(self, input_ids, mm_token_type_ids=None, **media) -> torch.Tensor:
        """Text embeddings with each modality's slots replaced, in order, by its encoder outputs: (B, T, D)."""
        h = self.embed_tokens(input_ids)
        for code, z in self.media_features(**media).items():
            slots = (mm_token_type_ids == code)[..., None]  # (B, T, 1)
            if int(slots.sum()) != len(z):
                raise ValueError(f"{int(slots.sum())} slots of type {code} in mm_token_type_ids but the encoder gave "
                                 f"{len(z)} tokens: the processor and the model disagree on the token arithmetic")
            h = h.masked_scatter(slots, z.to(h.dtype))
        return h

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, cache=None, inputs_embeds=None,
                use_cache=None, mm_token_type_ids=None, pixel_values=None, input_values=None,
                input_values_mask=None, pixel_values_videos=None, **kwargs):
        c = self.config
        h = inputs_embeds if inputs_embeds is not None else self.embed(
            input_ids, mm_token_type_ids, pixel_values=pixel_values, input_values=input_values,
            input_values_mask=input_values_mask, pixel_values_videos=pixel_values_videos)  # (B, T, D)
        if use_cache is None:
            use_cache = c.use_cache and not self.training
        if use_cache and cache is None:
            cache = DynamicCache()
        cache = cache if use_cache else None
        past, T = (cache.get_seq_length() if cache is not None else 0), h.shape[1]  # tokens seen, not kept
        if position_ids is None:
            position_ids = positions_from_mask(attention_mask, past, T, h.device)
        rope = tuple(a.to(h.dtype) for a in rope_angles(position_ids, c.head_dim, c.rope_theta))
        query_idx = torch.arange(past, past + T, device=h.device)  # stream indices: what masks and caches count
        mask = None if attention_mask is None or bool(attention_mask.all()) else attention_mask.bool()
        aux = h.new_zeros((), dtype=torch.float32)
        for layer in self.layers:
            h, layer_aux = layer(h, rope, query_idx, mask, cache=cache)
            aux = aux + layer_aux
        return MultimodalModelOutput(last_hidden_state=self.norm(h), cache=cache, aux_loss=aux)


class MultimodalForCausalLM(MultimodalPreTrainedModel, GenerationMixin):
    _tied_weights_keys: ClassVar = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: MultimodalConfig):
        super().__init__(config)
        self.model = MultimodalModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, cache=None, inputs_embeds=None,
                labels=None, use_cache=None, logits_to_keep=0, mm_token_type_ids=None, pixel_values=None,
                input_values=None, input_values_mask=None, pixel_values_videos=None, **kwargs):
        out = self.model(input_ids, attention_mask=attention_mask, position_ids=position_ids, cache=cache,
                         inputs_embeds=inputs_embeds, use_cache=use_cache, mm_token_type_ids=mm_token_type_ids,
                         pixel_values=pixel_values, input_values=input_values, input_values_mask=input_values_mask,
                         pixel_values_videos=pixel_values_videos)
        h = out.last_hidden_state
        logits = self.lm_head(h[:, -logits_to_keep:] if logits_to_keep else h)  # (B, T', V)
        loss, aux = None, self.config.router_aux_loss_coef * out.aux_loss
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs) + aux
        return MultimodalCausalLMOutput(loss=loss, logits=logits, cache=out.cache, aux_loss=aux)


# ------------------------------------------------------------------------------------------------------- processor
class MultimodalProcessor:
    """Texts with media markers, and the media, -> model inputs. Each `<|image|>`, `<|audio|>` or `<|video|>` in a
    text takes the next item of that modality and becomes `<|image|>` + one slot per encoder token + `<|/image|>`.
    Slots hold the pad id (their embeddings are replaced) and their modality code in mm_token_type_ids.
    images: (3, H, W) arrays; audio: (samples,) arrays at config.sample_rate; videos: (frames, 3, H, W) arrays.
    save_pretrained writes the tokenizer and processor_config.json (the geometry the slot counts follow) beside the
    model, so from_pretrained(model_dir) gives back the processor the model was trained with."""

    CONFIG_FILE = "processor_config.json"
    GEOMETRY = ("image_size", "patch_size", "sample_rate", "n_fft", "hop_length")

    def __init__(self, tokenizer, config: MultimodalConfig):
        self.tokenizer, self.config = tokenizer, config
        self.marker = {m: tokenizer.convert_tokens_to_ids(f"<|{m}|>") for m in MODALITIES}
        self.closer = {m: tokenizer.convert_tokens_to_ids(f"<|/{m}|>") for m in MODALITIES}
        self.split = "(" + "|".join(f"<\\|{m}\\|>" for m in MODALITIES) + ")"

    def save_pretrained(self, directory) -> None:
        self.tokenizer.save_pretrained(directory)
        geometry = {name: getattr(self.config, name) for name in self.GEOMETRY}
        (Path(directory) / self.CONFIG_FILE).write_text(json.dumps(geometry, indent=2))

    @classmethod
    def from_pretrained(cls, directory) -> "MultimodalProcessor":
        from transformers import AutoTokenizer

        geometry = json.loads((Path(directory) / cls.CONFIG_FILE).read_text())
        return cls(AutoTokenizer.from_pretrained(directory), MultimodalConfig(**geometry))

    def slots(self, modality: str, item) -> int:
        c = self.config
        if modality == "image":
            return image_tokens(c.image_size, c.patch_size)
        if modality == "audio":
            return audio_tokens(len(item), c.hop_length)
        return video_tokens(len(item), c.image_size, c.patch_size)

    def __call__(self, texts: list[str], images=(), audio=(), videos=(), padding_side: str = "left") -> dict:
        media = {"image": iter(images), "audio": iter(audio), "video": iter(videos)}
        pad = self.tokenizer.pad_token_id
        rows = []
        for text in texts:
            ids, types = [], []
            for piece in re.split(self.split, text):
                modality = piece[2:-2] if piece in {f"<|{m}|>" for m in MODALITIES} else None
                if modality is None:
                    piece_ids = self.tokenizer(piece, add_special_tokens=False)["input_ids"] if piece else []
                    ids += piece_ids
                    types += [0] * len(piece_ids)
                    continue
                item = next(media[modality], None)
                if item is None:
                    raise ValueError(f"more <|{modality}|> markers in the texts than {modality} items were given")
                n = self.slots(modality, item)
                ids += [self.marker[modality], *[pad] * n, self.closer[modality]]
                types += [0, *[MODALITIES[modality]] * n, 0]
            rows.append((ids, types))
        for modality, rest in media.items():
            if next(rest, None) is not None:
                raise ValueError(f"more {modality} items than <|{modality}|> markers in the texts")
        width = max(len(ids) for ids, _ in rows)

        def padded(seq, value):
            fill = [value] * (width - len(seq))
            return fill + seq if padding_side == "left" else seq + fill

        batch = {"input_ids": torch.tensor([padded(ids, pad) for ids, _ in rows]),
                 "attention_mask": torch.tensor([padded([1] * len(ids), 0) for ids, _ in rows]),
                 "mm_token_type_ids": torch.tensor([padded(types, 0) for _, types in rows])}
        if len(images):
            batch["pixel_values"] = torch.as_tensor(np.stack(images))
        if len(audio):
            longest = max(len(a) for a in audio)
            batch["input_values"] = torch.stack([F.pad(torch.as_tensor(a), (0, longest - len(a))) for a in audio])
            batch["input_values_mask"] = torch.stack(
                [(torch.arange(longest) < len(a)).long() for a in audio])
        if len(videos):
            batch["pixel_values_videos"] = torch.as_tensor(np.stack(videos))
        return batch


# -------------------------------------------------------------------------------------------------------- builders
def multimodal_tiny(vocab_size: int = 2048) -> MultimodalConfig:
    """32 x 32 images in 4 patches, videos of 4 such frames (16 tokens), audio at one token per 40 ms.
    Trains on two CPU cores. 16 px patches, one per image position (centres 8 and 24 px), so each shape lies in one
    patch; with 8 px patches every position sat on a patch corner and the shape was split over four."""
    return MultimodalConfig(vocab_size=vocab_size, hidden_size=128, num_hidden_layers=4, num_attention_heads=4,
                            num_experts=4, num_experts_per_tok=2, expert_intermediate_size=256,
                            image_size=32, patch_size=16, video_frames=4, max_position_embeddings=1024)
