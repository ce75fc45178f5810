"""Self-speculative greedy decoding with the MTP modules as drafters (DeepSeek-V3 sec. 2.2 and 5.4.3).

Each round the D MTP modules draft D tokens one after another, the main model scores the last accepted token and
the D drafts in one cached forward, and the longest prefix of drafts equal to the main model's own greedy choices is
kept, plus the main model's token after it. Every emitted token is the main model's argmax given the tokens before
it, so the output is plain greedy decoding's; only the number of main-model forwards changes: n new tokens take
n - accepted forwards (the prompt's included) instead of n. Drafts never run past max_new_tokens.

Nothing is computed twice: the hidden states of the verifying forward are what module 1 reads next round (drafting
needs no main-model forward of its own), rejected drafts leave the KV caches by a crop, and the prompt is encoded once.
Module k at position i reads h^{k-1}_i and token t_{i+k}, so it can commit (cache and keep) position i only once
t_{i+k} is verified: each round it runs on the positions since its last commit, keeps those up to n-1-k (n tokens
verified) and crops the k-1 after them, computed from drafted tokens.

Batch size 1: rows of a batch accept different numbers of drafts, so their caches would go ragged.
"""

import torch
from transformers.cache_utils import DynamicCache


@torch.inference_mode()
def greedy_decode(model, input_ids: torch.Tensor, max_new_tokens: int, eos_token_id: int | None = None):
    """Plain greedy decoding with the KV cache, one main-model forward per token: the reference and the baseline."""
    cache = DynamicCache()
    logits = model(input_ids, cache=cache, use_cache=True, logits_to_keep=1).logits
    seq, new = input_ids[0].tolist(), []
    while len(new) < max_new_tokens:
        new.append(int(logits[0, -1].argmax()))
        if new[-1] == eos_token_id or len(new) == max_new_tokens:
            break  # the last token needs no forward
        logits = model(torch.tensor([new[-1:]], device=input_ids.device), cache=cache, use_cache=True).logits
    return seq + new


@torch.inference_mode()
def speculative_decode(model, input_ids: torch.Tensor, max_new_tokens: int, eos_token_id: int | None = None):
    """Returns (token list, accepted drafts, proposed drafts). input_ids: (1, T)."""
    if input_ids.shape[0] != 1:
        raise ValueError(f"speculative decoding runs one sequence at a time; got a batch of {input_ids.shape[0]}")
    if max_new_tokens < 1:
        return input_ids[0].tolist(), 0, 0
    device, base, T = input_ids.device, model.model, input_ids.shape[1]
    first_mtp_layer = model.config.num_hidden_layers
    main_cache, mtp_cache = DynamicCache(), DynamicCache()
    cos, sin = base.rotary_emb(torch.arange(T + max_new_tokens, device=device)[None])  # every position, once

    h = base(input_ids, cache=main_cache, use_cache=True).last_hidden_state  # (1, T, D)
    seq = input_ids[0].tolist() + [int(model.lm_head(h[:, -1]).argmax())]
    # pending[k]: h^k at the final positions module k+1 has not committed yet. For k = 0 the prompt, then each
    # verifying forward's accepted positions; for k >= 1 the one position module k+1 restarts at.
    pending = [h] + [h[:, :0]] * (len(model.mtp) - 1)
    accepted = proposed = 0
    while len(seq) - T < max_new_tokens and seq[-1] != eos_token_id:
        n = len(seq)  # seq[n-1] is verified; the main model has run positions 0 .. n-2
        depth = min(len(model.mtp), T + max_new_tokens - n - 1)  # no drafts past max_new_tokens
        drafts, h_in = [], pending[0]
        for k, module in enumerate(model.mtp[:depth], start=1):
            start = n - 1 - h_in.shape[1]  # h_in: h^{k-1} at positions start .. n-2
            tokens = torch.tensor([(seq + drafts)[start + k : n - 1 + k]], device=device)  # t_{i+k}
            h_k, _ = module(h_in, base.embed_tokens(tokens), cos[:, start : n - 1], sin[:, start : n - 1],
                            cache=mtp_cache)  # (1, n-1-start, D)  # fmt: skip
            drafts.append(int(model.lm_head(module.norm(h_k[:, -1])).argmax()))
            mtp_cache.layers[first_mtp_layer + k - 1].crop(-(k - 1))  # crop(-0) is a no-op
            if k < depth:
                h_in = torch.cat([pending[k], h_k], 1)  # module k+1 starts one position before module k did
                final = n - k - start  # h_k's first `final` positions (up to n-1-k) came from verified tokens
                pending[k] = h_k[:, max(final - 1, 0) : max(final, 0)]
        h = base(torch.tensor([seq[-1:] + drafts], device=device), cache=main_cache,
                 use_cache=True).last_hidden_state  # (1, 1+depth, D)  # fmt: skip
        greedy = model.lm_head(h).argmax(-1)[0].tolist()
        a = 0
        while a < depth and drafts[a] == greedy[a]:
            a += 1
        main_cache.crop(-(depth - a))  # drop the rejected drafts' latents
        pending[0] = h[:, : a + 1]
        new = drafts[:a] + [greedy[a]]
        seq += new[: new.index(eos_token_id) + 1] if eos_token_id in new else new
        accepted, proposed = accepted + a, proposed + depth
    return seq, accepted, proposed
