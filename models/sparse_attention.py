"""Local + global sparse attention as a boolean mask over absolute positions.

The pattern is the fixed "local window plus strided global positions" of Child et al., Sparse Transformers
(arXiv 1904.10509, sec. 4.2), as listed among Gemini's efficiency options (arXiv 2507.06261): a query attends to the
`window` most recent keys (itself included) and to every key whose position is a multiple of `stride`, causally.

The mask is a function of positions, not of indices into a tensor, so it stays right whatever a KV cache keeps: a
selective cache that evicted keys passes the positions of the keys it kept. Any model that builds an SDPA mask can use
it; models/multimodal.py does.
"""

import torch
import torch.nn.functional as F


def local_global_mask(query_pos: torch.Tensor, key_pos: torch.Tensor, window: int, stride: int) -> torch.Tensor:
    """allowed[.., t, s] = k_s <= q_t  and  (q_t - k_s < window  or  k_s mod stride = 0)   (arXiv 1904.10509 sec. 4.2)

    query_pos: (..., T) and key_pos: (..., S) absolute positions, with broadcastable leading dims -> (..., T, S).
    window >= 1 counts the query itself; stride <= 0 means no global positions (a pure sliding window).
    With window >= the sequence length the mask is the plain causal one, so sparse attention equals dense attention.
    """
    if window < 1:
        raise ValueError(f"window must be at least 1 (the query itself); got {window}")
    q, k = query_pos[..., :, None], key_pos[..., None, :]
    local = (q - k) < window
    is_global = (k % stride == 0) if stride > 0 else torch.zeros_like(local)
    return (k <= q) & (local | is_global)


def allowed_fraction(length: int, window: int, stride: int) -> float:
    """Fraction of the causal (query, key) pairs the local+global pattern keeps over one sequence of `length`:
    about (window + length / (2 stride)) / (length / 2), the O(n sqrt n) of arXiv 1904.10509 when window = stride
    = sqrt(n). Counted exactly here, for the benchmark's report."""
    pos = torch.arange(length)
    return local_global_mask(pos, pos, window, stride).sum().item() / (length * (length + 1) / 2)


def local_global_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int, stride: int) -> torch.Tensor:
    """softmax(Q K^T / sqrt(d) + M) V with M = 0 where local_global_mask allows and -inf elsewhere, over a whole
    causal sequence (no cache), without ever forming the T x T score matrix.

    Queries go in blocks of `window`; block b's local keys are blocks b-1 and b (2w keys, which cover every key
    within the window of each query), and the global keys are positions 0, s, 2s, .. that lie outside the window
    (inside it they are local keys already). Scores take O(T (2w + T / s)) memory instead of O(T^2): with
    w = s = sqrt(T) that is the O(T sqrt T) of arXiv 1904.10509.
    q, k, v: (B, H, T, D) -> (B, H, T, D).
    """
    B, H, T, D = q.shape
    w, n_blocks = window, -(-T // window)
    pad = n_blocks * w - T
    q, k_pad, v_pad = (F.pad(x, (0, 0, 0, pad)).view(B, H, n_blocks, w, D) for x in (q, k, v))
    local_k = torch.cat([F.pad(k_pad, (0, 0, 0, 0, 1, 0))[:, :, :-1], k_pad], 3)  # (B, H, n, 2w, D): blocks b-1, b
    local_v = torch.cat([F.pad(v_pad, (0, 0, 0, 0, 1, 0))[:, :, :-1], v_pad], 3)
    q_pos = torch.arange(n_blocks * w, device=q.device).view(n_blocks, w, 1)  # (n, w, 1)
    local_pos = torch.cat([q_pos - w, q_pos], 1).view(n_blocks, 1, 2 * w)  # (n, 1, 2w)
    local_ok = (local_pos >= 0) & (local_pos <= q_pos) & (q_pos - local_pos < w)  # (n, w, 2w)
    g_pos = torch.arange(0, T, stride, device=q.device) if stride > 0 else q_pos.new_zeros(0)
    global_ok = (g_pos <= q_pos) & (q_pos - g_pos >= w)  # (n, w, G)
    scale = D**-0.5
    scores = torch.cat([
        torch.einsum("bhnqd,bhnkd->bhnqk", q, local_k).masked_fill(~local_ok, float("-inf")),
        torch.einsum("bhnqd,bhgd->bhnqg", q, k[:, :, g_pos]).masked_fill(~global_ok, float("-inf")),
    ], -1) * scale
    probs = scores.float().softmax(-1).to(q.dtype)  # every query sees itself: no all -inf row
    out = (torch.einsum("bhnqk,bhnkd->bhnqd", probs[..., : 2 * w], local_v)
           + torch.einsum("bhnqg,bhgd->bhnqd", probs[..., 2 * w:], v[:, :, g_pos]))
    return out.reshape(B, H, n_blocks * w, D)[:, :, :T]
