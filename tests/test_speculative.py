"""Self-speculative decoding: the output is plain greedy's token for token, on untrained models (drafts mostly
rejected) and on a model trained until its drafts are mostly accepted; the saving is a count of main-model forwards."""

from contextlib import contextmanager

import pytest
import torch

from models.moe import MoeForCausalLM, moe_tiny
from models.speculative import greedy_decode, speculative_decode

VOCAB = 32


def tiny(heads: int, dense_mtp: bool = False) -> MoeForCausalLM:
    config = moe_tiny(VOCAB)
    config.hidden_size, config.num_hidden_layers, config.intermediate_size = 64, 3, 128
    config.qk_nope_head_dim, config.v_head_dim, config.kv_lora_rank = 16, 16, 24
    config.num_mtp_modules, config.mtp_dense_ffn = heads, dense_mtp
    torch.manual_seed(0)
    return MoeForCausalLM(config)


@contextmanager
def counting_main_forwards(model):
    """A list that grows by one at each forward of the main model (model.model), however it is called."""
    calls = []
    handle = model.model.register_forward_hook(lambda *_: calls.append(1))
    try:
        yield calls
    finally:
        handle.remove()


def cyclic_batch(generator, batch: int, length: int) -> torch.Tensor:
    """Rows of t, t+s, t+2s, ... (mod VOCAB), each with its own step s in 1..3: the next token follows from the
    last two, so the main head and both MTP modules can learn it."""
    start = torch.randint(0, VOCAB, (batch, 1), generator=generator)
    step = torch.randint(1, 4, (batch, 1), generator=generator)
    return (start + step * torch.arange(length)) % VOCAB


@contextmanager
def recording_draft_states(model):
    """Per MTP module, the normed hidden state each of its drafts is read from (the input of the output head)."""
    states = [[] for _ in model.mtp]
    handles = [module.norm.register_forward_hook(lambda _m, _i, out, kept=kept: kept.append(out.reshape(-1)))
               for module, kept in zip(model.mtp, states, strict=True)]  # fmt: skip
    try:
        yield states
    finally:
        for handle in handles:
            handle.remove()


@torch.no_grad()
def drafts_without_caches(model, seq: list, depth: int, states: list) -> list:
    """The drafts recomputed from scratch: module k runs on h^{k-1} at every position 0 .. n-2 with t_{i+k}."""
    base, n = model.model, len(seq)
    h = base(torch.tensor([seq[:-1]]), use_cache=False).last_hidden_state  # (1, n-1, D)
    cos, sin = base.rotary_emb(torch.arange(n - 1)[None])
    drafts = []
    for k, module in enumerate(model.mtp[:depth], start=1):
        h, _ = module(h, base.embed_tokens(torch.tensor([(seq + drafts)[k : n - 1 + k]])), cos, sin)
        states[k - 1].append(module.norm(h[0, -1]))
        drafts.append(int(model.lm_head(states[k - 1][-1]).argmax()))
    return drafts


def assert_drafts_as_without_caches(model, prompt: torch.Tensor, max_new: int):
    """Decode speculatively, then replay the rounds along the (identical) greedy output with drafts recomputed
    from scratch: every draft's hidden state must match, so crops and carried hidden states lose nothing."""
    greedy = greedy_decode(model, prompt, max_new)
    with recording_draft_states(model) as cached:
        speculative, accepted, proposed = speculative_decode(model, prompt, max_new)
    assert speculative == greedy
    uncached = [[] for _ in model.mtp]
    end, n, replayed_accepted, replayed_proposed = len(greedy), prompt.shape[1] + 1, 0, 0
    while n < end:
        depth = min(len(model.mtp), end - n - 1)
        drafts = drafts_without_caches(model, greedy[:n], depth, uncached)
        a = 0
        while a < depth and drafts[a] == greedy[n + a]:
            a += 1
        n, replayed_accepted, replayed_proposed = n + a + 1, replayed_accepted + a, replayed_proposed + depth
    assert (accepted, proposed) == (replayed_accepted, replayed_proposed)
    for ours, reference in zip(cached, uncached, strict=True):
        assert len(ours) == len(reference)
        if ours:
            torch.testing.assert_close(torch.stack(ours), torch.stack(reference), atol=1e-5, rtol=1e-4)
    return accepted, proposed


@pytest.fixture(scope="module")
def trained():
    """D = 2 MTP modules trained on cyclic sequences (a few seconds on one core)."""
    model = tiny(heads=2).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    generator = torch.Generator().manual_seed(0)
    for _ in range(80):
        x = cyclic_batch(generator, 16, 24)
        model(x, labels=x).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return model.eval()


@pytest.mark.parametrize(("heads", "dense_mtp"), [(1, False), (2, False), (3, False), (2, True)])
def test_equals_greedy_untrained(heads, dense_mtp):
    model = tiny(heads, dense_mtp).eval()
    assert all(module.block.is_moe != dense_mtp for module in model.mtp)
    generator = torch.Generator().manual_seed(heads)
    for length in (1, 2, 7):  # prompts shorter than D too: the MTP modules then start with nothing to commit
        prompt = torch.randint(0, VOCAB, (1, length), generator=generator)
        accepted, proposed = assert_drafts_as_without_caches(model, prompt, 20)
        assert 0 <= accepted <= proposed
    assert greedy_decode(model, prompt, 20) == model.generate(prompt, max_new_tokens=20, do_sample=False)[0].tolist()


def test_equals_greedy_trained_with_accepted_and_rejected_drafts(trained):
    generator = torch.Generator().manual_seed(1)
    rates = []
    for _ in range(4):
        prompt = cyclic_batch(generator, 1, 6)
        prompt[0, 3] = (prompt[0, 3] + 7) % VOCAB  # a break in the pattern: some drafts after it are rejected
        for max_new in (1, 2, 5, 30):
            accepted, proposed = assert_drafts_as_without_caches(trained, prompt, max_new)
            assert proposed <= 2 * (max_new - 1)  # never drafts past max_new_tokens
        rates.append(accepted / proposed)
    assert min(rates) < 1.0 and max(rates) > 0.5  # both paths were taken


@pytest.mark.parametrize("max_new", [1, 17, 40])
def test_fewer_main_forwards_than_tokens(trained, max_new):
    prompt = cyclic_batch(torch.Generator().manual_seed(2), 1, 5)
    with counting_main_forwards(trained) as calls:
        greedy = greedy_decode(trained, prompt, max_new)
        greedy_forwards = len(calls)
        speculative, accepted, _ = speculative_decode(trained, prompt, max_new)
    assert speculative == greedy
    assert greedy_forwards == max_new  # the prompt's forward gives the first token; the last needs none
    # One forward for the prompt, then one per round, and a round emits its accepted drafts plus one token.
    assert len(calls) - greedy_forwards == max_new - accepted
    if max_new > 1:
        assert accepted > 0 and max_new - accepted < max_new


def test_stops_at_eos_like_greedy(trained):
    prompt = torch.tensor([[0, 1, 2, 3]])
    eos = greedy_decode(trained, prompt, 12)[-5]  # a token the continuation reaches, possibly inside a draft
    greedy = greedy_decode(trained, prompt, 12, eos_token_id=eos)
    assert greedy[-1] == eos and len(greedy) < 4 + 12
    assert speculative_decode(trained, prompt, 12, eos_token_id=eos)[0] == greedy


def test_a_batch_is_refused():
    with pytest.raises(ValueError, match="one sequence"):
        speculative_decode(tiny(1).eval(), torch.zeros(2, 4, dtype=torch.long), 4)
