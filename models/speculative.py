"""Self-speculative greedy decoding with the MTP modules as drafters (DeepSeek-V3 sec. 2.2 and 5.4.3).

Each round the D MTP modules draft D tokens one after another, the main model scores the last accepted token and
the D drafts in one forward, and the longest prefix of drafts equal to the main model's own greedy choices is kept,
plus the main model's token after it. Every emitted token is the main model's argmax given the tokens before it,
so the output is plain greedy decoding's; only the number of main-model forwards changes. Batch size 1.

Module k at position i reads h^{k-1}_i and token t_{i+k}, so it can commit (cache and keep) position i only once
t_{i+k} is verified. Positions past that are computed each round from drafted tokens and dropped again.
"""

import torch
from transformers.cache_utils import DynamicCache


@torch.no_grad()
def greedy_decode(model, input_ids: torch.Tensor, max_new_tokens: int, eos_token_id: int | None = None):
    """Plain greedy decoding with the KV cache, one main-model forward per token: the reference and the baseline."""
    cache = DynamicCache()
    logits = model(input_ids, cache=cache, use_cache=True, logits_to_keep=1).logits
    seq = input_ids[0].tolist()
    for _ in range(max_new_tokens):
        seq.append(int(logits[0, -1].argmax()))
        if seq[-1] == eos_token_id:
            break
        logits = model(torch.tensor([seq[-1:]], device=input_ids.device), cache=cache, use_cache=True).logits
    return seq


@torch.no_grad()
def speculative_decode(model, input_ids: torch.Tensor, max_new_tokens: int, eos_token_id: int | None = None):
    """Returns (token list, accepted drafts, proposed drafts). input_ids: (1, T)."""
    device, base, heads = input_ids.device, model.model, len(model.mtp)
    first_mtp_layer = model.config.num_hidden_layers
    main_cache, mtp_cache = DynamicCache(), DynamicCache()

    def embed(tokens):
        return base.embed_tokens(torch.tensor([tokens], device=device))

    h = base(input_ids, cache=main_cache, use_cache=True).last_hidden_state  # (1, T, D)
    seq = input_ids[0].tolist()
    seq.append(int(model.lm_head(h[:, -1]).argmax()))
    committed = [h] + [h.new_zeros(1, 0, h.shape[-1]) for _ in range(heads)]  # h^k at its committed positions
    accepted = proposed = 0
    while len(seq) - input_ids.shape[1] < max_new_tokens and seq[-1] != eos_token_id:
        n = len(seq)  # main hidden states exist for positions 0 .. n-2; seq[n-1] is verified but not yet run
        drafts, h_prev = [], committed[0]
        for k, module in enumerate(model.mtp, start=1):
            start = committed[k].shape[1]
            cos, sin = base.rotary_emb(torch.arange(start, n - 1, device=device)[None])
            tokens = (seq + drafts)[start + k : n - 1 + k]  # t_{i+k} for i = start .. n-2
            h_k, _ = module(h_prev[:, start : n - 1], embed(tokens), cos, sin, cache=mtp_cache)  # (1, n-1-start, D)
            drafts.append(int(model.lm_head(module.norm(h_k[:, -1])).argmax()))
            h_prev = torch.cat([committed[k], h_k], 1)  # positions 0 .. n-2, the last k-1 from drafted tokens
            committed[k] = h_prev[:, : n - k]  # t_{i+k} is verified for i <= n-1-k
            mtp_cache.layers[first_mtp_layer + k - 1].crop(-(k - 1))  # crop(-0) is a no-op
        h = base(inputs_embeds=embed(seq[-1:] + drafts), cache=main_cache, use_cache=True).last_hidden_state  # (1, 1+heads, D)
        greedy = model.lm_head(h).argmax(-1)[0].tolist()
        a = 0
        while a < heads and drafts[a] == greedy[a]:
            a += 1
        seq += drafts[:a] + [greedy[a]]
        main_cache.crop(-(heads - a))  # drop the rejected drafts' latents
        committed[0] = torch.cat([committed[0], h[:, : a + 1]], 1)
        accepted, proposed = accepted + a, proposed + heads
    seq = seq[: input_ids.shape[1] + max_new_tokens]
    if eos_token_id in seq[input_ids.shape[1] :]:
        seq = seq[: seq.index(eos_token_id, input_ids.shape[1]) + 1]
    return seq, accepted, proposed
