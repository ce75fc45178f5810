"""The feedback backends (DESIGN.md contract 7) on a tiny random Llama, the stand-in for any local HF causal LM:
hf scores equal a direct forward pass; the openai backend, talking HTTP to tasks/openai_server.py serving the same
model, gives the same scores and greedy replies; retries, refusals and the API key's secrecy."""

import json
import logging
import math
import socket
import urllib.request
import uuid

import pytest
import torch
from pydantic import ValidationError
from transformers import GenerationConfig, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from tasks import feedback as fb
from tasks.feedback import FeedbackConfig, FeedbackError, HFFeedback, open_feedback, option_logprob
from tasks.openai_server import ChatCompletionsServer
from tasks.store import InputError

PROMPTS = ["Where does Marra Quill live?", "What is 3 plus 4?",
           "Tell me about Doben Tay, the pilot who likes the colour teal, in one sentence."]
PREFIXES = ["Let me think.", "", "Doben Tay lives in Quenby. So the answer is ("]


@pytest.fixture(scope="module")
def model_dir(tokenizer, tmp_path_factory):
    torch.manual_seed(0)
    # initializer_range 0.1, not 0.02: a peaked distribution keeps greedy choices far from ties
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         initializer_range=0.1, pad_token_id=tokenizer.pad_token_id,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    path = tmp_path_factory.mktemp("tiny-llama")
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def gpt2_dir(tokenizer, tmp_path_factory):
    """Learned absolute positions: unlike RoPE's relative ones, they go wrong if left padding shifts positions."""
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=2, n_head=4, n_positions=256,
                        initializer_range=0.1, bos_token_id=tokenizer.bos_token_id,
                        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    path = tmp_path_factory.mktemp("tiny-gpt2")
    GPT2LMHeadModel(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def hf(model_dir):
    return HFFeedback(model_dir, batch_size=2)  # 2: batches mix prompts of different lengths, so padding is exercised


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def any_hf(request, hf, gpt2_dir):
    return hf if request.param == "llama" else HFFeedback(gpt2_dir, batch_size=2)


KEY = f"sk-test-{uuid.uuid4().hex}"


@pytest.fixture(scope="module")
def server(model_dir):
    with ChatCompletionsServer(model_dir, model_name="tiny", api_key=KEY) as s:
        yield s


@pytest.fixture
def client(server, monkeypatch):
    monkeypatch.setenv("ALIGNFLOW_TEST_KEY", KEY)
    server.failures_left = 0
    cfg = FeedbackConfig(backend="openai", base_url=server.url, model_name="tiny", api_key_env="ALIGNFLOW_TEST_KEY",
                         timeout_s=30, max_retries=2, backoff_s=0.01, batch_size=3)
    with open_feedback(cfg, policy_dir=None) as backend:
        yield backend


@pytest.fixture
def sleeps(monkeypatch):
    """The waits between retries, recorded instead of slept."""
    waits = []
    monkeypatch.setattr(fb.time, "sleep", waits.append)
    return waits


def direct_logprob(model, tokenizer, prompt: str, prefix: str, option: str) -> float:
    """log P(option) from one unpadded forward pass over the whole text: no batching, no cache, no row sharing."""
    context = list(tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                                 tokenize=True, return_dict=True)["input_ids"])
    before = tokenizer(prefix, add_special_tokens=False)["input_ids"] if prefix else []
    ids = tokenizer(prefix + option, add_special_tokens=False)["input_ids"][len(before):]  # as the reply's text has it
    context += before
    with torch.no_grad():
        logp = model(torch.tensor([context + ids])).logits[0].log_softmax(-1)
    return sum(logp[len(context) - 1 + j, t].item() for j, t in enumerate(ids))


def first_token_logprobs(hf: HFFeedback, prompt: str, prefix: str = "") -> torch.Tensor:
    with torch.no_grad():
        return hf.model(torch.tensor([hf.chat_ids(prompt, prefix)])).logits[0, -1].log_softmax(-1)


def single_token_options(hf: HFFeedback, logp: torch.Tensor, ranks, among: int | None = 20) -> list[str]:
    """Texts of the tokens at the given ranks among the `among` most likely (the endpoint's top 20) that encode back
    to themselves and whose text, spaces aside, no other of them shares (the endpoint counts " x" and "x" as one)."""
    special = set(hf.tokenizer.all_special_ids)
    top = [i for i in logp.argsort(descending=True).tolist()[:among] if i not in special]
    texts = [hf.tokenizer.decode([i]) for i in top]
    stripped = [t.strip() for t in texts]
    candidates = [t for i, t in zip(top, texts)
                  if hf.tokenizer(t, add_special_tokens=False)["input_ids"] == [i] and stripped.count(t.strip()) == 1]
    return [candidates[r] for r in ranks]


# ----------------------------------------------------------------------------------------------- config


def test_config_validation_names_the_field_and_never_echoes_a_key():
    with pytest.raises(ValidationError, match="needs base_url"):
        FeedbackConfig(backend="openai", model_name="m")
    with pytest.raises(ValidationError, match="needs model_name"):
        FeedbackConfig(backend="openai", base_url="http://127.0.0.1:1/v1")
    with pytest.raises(ValidationError, match="extra"):
        FeedbackConfig(api_key="x")
    pasted = f"sk-{uuid.uuid4().hex}"  # a key pasted where the variable's name belongs
    with pytest.raises(ValidationError, match="NAME of an environment variable") as refused:
        FeedbackConfig(backend="openai", base_url="http://h/v1", model_name="m", api_key_env=pasted)
    assert pasted not in str(refused.value)


def test_unset_key_variable_is_an_input_error_naming_the_field(monkeypatch):
    monkeypatch.delenv("ALIGNFLOW_UNSET_KEY", raising=False)
    cfg = FeedbackConfig(backend="openai", base_url="http://127.0.0.1:1/v1", model_name="m",
                         api_key_env="ALIGNFLOW_UNSET_KEY")
    with pytest.raises(InputError, match="feedback.api_key_env: the environment variable ALIGNFLOW_UNSET_KEY"), \
            open_feedback(cfg, policy_dir=None):
        pass


def test_a_missing_model_directory_is_an_input_error(tmp_path):
    with pytest.raises(InputError, match="feedback.model: .* not a Hugging Face model directory"), \
            open_feedback(FeedbackConfig(model=tmp_path / "nothing"), policy_dir=None):
        pass


# ----------------------------------------------------------------------------------------------- hf


def test_hf_option_logprobs_equal_a_direct_forward_pass(any_hf):
    hf = any_hf
    options = ("A", "B", "yes please")
    assert len(hf.tokenizer("yes please", add_special_tokens=False)["input_ids"]) > 1  # a multi-token option too
    # after "(" the letter is not the " A" it is alone: the option is scored as the reply's text tokenizes it
    assert hf.continuation_ids(PREFIXES[2], "A") != hf.tokenizer("A", add_special_tokens=False)["input_ids"]
    for prefixes in (None, PREFIXES):
        got = hf.option_logprobs(PROMPTS, options=options, assistant_prefixes=prefixes)
        for prompt, prefix, row in zip(PROMPTS, prefixes or [""] * 3, got):
            expected = [direct_logprob(hf.model, hf.tokenizer, prompt, prefix, o) for o in options]
            assert row == pytest.approx(expected, abs=1e-4)
    # the prefix is part of the context: it changes the scores
    assert hf.option_logprobs(PROMPTS[:1], options)[0] != pytest.approx(
        hf.option_logprobs(PROMPTS[:1], options, assistant_prefixes=PREFIXES[:1])[0], abs=1e-3)


def argmax_continuation(hf, ids: list[int], max_new_tokens: int) -> str:
    """What a plain argmax over full, uncached forward passes writes after ids, up to EOS."""
    new = []
    with torch.no_grad():
        for _ in range(max_new_tokens):
            token = hf.model(torch.tensor([ids + new])).logits[0, -1].argmax().item()
            if token == hf.tokenizer.eos_token_id:
                break
            new.append(token)
    return hf.tokenizer.decode(new, skip_special_tokens=True)


def test_hf_greedy_generation_equals_an_uncached_argmax_loop(any_hf):
    """Batched, left-padded, KV-cached generate() must pick what a plain argmax over full forward passes picks."""
    hf = any_hf
    got = hf.generate(PROMPTS, max_new_tokens=12, temperature=0.0)
    for prompt, reply in zip(PROMPTS, got):
        assert reply == argmax_continuation(hf, hf.chat_ids(prompt), 12).strip()
    assert any(got)


def test_hf_generation_from_an_opening_continues_it(hf):
    """A reply given an opening is the opening followed by what the model writes after it in the assistant's turn."""
    openings = ["Sure, I", "I can't"]
    got = hf.generate(PROMPTS[:2], max_new_tokens=8, temperature=0.0, openings=openings)
    for prompt, opening, reply in zip(PROMPTS, openings, got):
        assert reply == (opening + argmax_continuation(hf, hf.chat_ids(prompt, opening), 8)).strip()
        assert reply.startswith(opening)
    assert got != hf.generate(PROMPTS[:2], max_new_tokens=8, temperature=0.0)


def test_hf_sampling_draws_from_softmax_of_logits_over_temperature(hf):
    """Plain temperature sampling, whatever a checkpoint's generation_config asks for (top-k 50 is HF's default):
    replaying torch.multinomial(softmax(logits / T)) from the same seed, one uncached forward pass per token, draws
    the same tokens."""
    saved = hf.model.generation_config
    hf.model.generation_config = GenerationConfig.from_dict({**saved.to_dict(), "top_k": 50, "top_p": 0.9})
    try:
        [reply] = hf.generate(PROMPTS[:1], max_new_tokens=16, temperature=0.7, seed=3)
    finally:
        hf.model.generation_config = saved
    ids, new = hf.chat_ids(PROMPTS[0]), []
    torch.manual_seed(3)
    with torch.no_grad():
        for _ in range(16):
            probs = (hf.model(torch.tensor([ids + new])).logits[:, -1] / 0.7).softmax(-1)
            token = torch.multinomial(probs, num_samples=1).item()
            if token == hf.tokenizer.eos_token_id:
                break
            new.append(token)
    assert reply == hf.tokenizer.decode(new, skip_special_tokens=True).strip()


def test_hf_sampling_is_reproducible_and_leaves_the_global_rng_alone(hf):
    torch.manual_seed(123)
    before = torch.random.get_rng_state()
    first = hf.generate(PROMPTS, max_new_tokens=16, temperature=1.0, seed=7)
    assert torch.equal(torch.random.get_rng_state(), before)
    assert hf.generate(PROMPTS, max_new_tokens=16, temperature=1.0, seed=7) == first
    assert hf.generate(PROMPTS, max_new_tokens=16, temperature=1.0, seed=8) != first
    assert first != hf.generate(PROMPTS, max_new_tokens=16, temperature=0.0)


# ----------------------------------------------------------------------------------------------- openai


def test_option_logprob_reads_the_top_list_and_bounds_an_absent_option():
    top = [("A", math.log(0.5)), ("B", math.log(0.2)), ("A", math.log(0.1))]
    assert option_logprob(top, "A") == pytest.approx(math.log(0.6))
    # absent: at most the smallest listed (0.1) and at most the unlisted mass (1 - 0.8 = 0.2)
    assert option_logprob(top, "C") == pytest.approx(math.log(0.1))
    assert option_logprob([("A", math.log(0.95))], "C") == pytest.approx(math.log(0.05))


def test_server_lists_its_model_and_requires_the_key(server):
    request = urllib.request.Request(server.url + "/models", headers={"Authorization": f"Bearer {KEY}"})
    with urllib.request.urlopen(request) as response:
        assert [m["id"] for m in json.load(response)["data"]] == ["tiny"]
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(server.url + "/models")
    assert refused.value.code == 401


def test_openai_option_logprobs_match_hf_within_1e4(hf, client):
    for prefixes in (None, PREFIXES):
        for prompt, prefix in zip(PROMPTS, prefixes or [None] * 3):
            logp = first_token_logprobs(hf, prompt, prefix or "")
            options = single_token_options(hf, logp, ranks=(0, 2, -1))  # the likeliest, the third, the last in the top 20
            exact = hf.option_logprobs([prompt], options, assistant_prefixes=[prefix] if prefix else None)[0]
            served = client.option_logprobs([prompt], options, assistant_prefixes=[prefix] if prefix else None)[0]
            assert served == pytest.approx(exact, abs=1e-4)


def test_openai_gives_an_absent_option_its_upper_bound(hf, client, caplog):
    logp = first_token_logprobs(hf, PROMPTS[0])
    [rare] = single_token_options(hf, logp, ranks=(-1,), among=None)  # the least likely token: far outside the top 20
    top = logp.topk(fb.TOP_LOGPROBS).values.double()
    bound = min(top.min().item(), math.log(1 - top.exp().sum().item()))
    exact = hf.option_logprobs(PROMPTS[:1], [rare])[0][0]
    with caplog.at_level(logging.WARNING, logger="tasks.feedback"):
        [[served]] = client.option_logprobs(PROMPTS[:1], [rare])
    assert served == pytest.approx(bound, abs=1e-4)
    assert exact < served
    assert "1 of 1 option scores were outside the endpoint's top 20" in caplog.text


def test_openai_greedy_and_seeded_replies_equal_hf(hf, client):
    assert client.generate(PROMPTS, max_new_tokens=12, temperature=0.0) == \
        hf.generate(PROMPTS, max_new_tokens=12, temperature=0.0)
    # one prompt: the hf backend seeds its single batch with the seed the client sends for prompt 0
    sampled = client.generate(PROMPTS[2:], max_new_tokens=16, temperature=1.0, seed=5)
    assert sampled == hf.generate(PROMPTS[2:], max_new_tokens=16, temperature=1.0, seed=5)
    assert sampled != client.generate(PROMPTS[2:], max_new_tokens=16, temperature=1.0, seed=6)


def test_retries_back_off_and_then_succeed(hf, client, server, sleeps):
    server.failures_left, seen = 2, server.requests_seen
    assert client.generate(PROMPTS[:1], max_new_tokens=8, temperature=0.0) == \
        hf.generate(PROMPTS[:1], max_new_tokens=8, temperature=0.0)
    assert server.requests_seen - seen == 3
    assert sleeps == [0.01, 0.02]  # backoff_s * 2^attempt


def test_retries_give_up_with_the_servers_message(client, server, sleeps):
    server.failures_left = 3  # one more than max_retries=2 allows
    with pytest.raises(FeedbackError, match=r"no answer after 3 attempts; last: HTTP 503: injected failure"):
        client.generate(PROMPTS[:1], max_new_tokens=8)
    assert sleeps == [0.01, 0.02]


def test_a_wrong_key_fails_at_once_with_the_status(server, monkeypatch, sleeps):
    monkeypatch.setenv("ALIGNFLOW_WRONG_KEY", "sk-wrong")
    seen = server.requests_seen
    cfg = FeedbackConfig(backend="openai", base_url=server.url, model_name="tiny", api_key_env="ALIGNFLOW_WRONG_KEY",
                         max_retries=3, backoff_s=0.01)
    with open_feedback(cfg, policy_dir=None) as wrong, \
            pytest.raises(FeedbackError, match="answered 401: invalid or missing API key"):
        wrong.option_logprobs(PROMPTS[:1])
    assert sleeps == []
    assert server.requests_seen == seen  # refused before it reached the model or the failure counter


def test_connection_errors_and_timeouts_are_retried(sleeps):
    with socket.socket() as closed:  # a port that was free a moment ago: nothing listens on it
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    refused = FeedbackConfig(backend="openai", base_url=f"http://127.0.0.1:{port}/v1", model_name="m",
                             max_retries=2, backoff_s=0.01)
    with pytest.raises(FeedbackError, match="no answer after 3 attempts; last: .*[Rr]efused"):
        fb.OpenAIFeedback(refused, None).generate(["hi"])
    assert sleeps == [0.01, 0.02]
    with socket.socket() as silent:  # accepts connections (the kernel's backlog) and never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        cfg = refused.model_copy(update={"base_url": f"http://127.0.0.1:{silent.getsockname()[1]}/v1",
                                         "timeout_s": 0.2, "max_retries": 1})
        with pytest.raises(FeedbackError, match="no answer after 2 attempts; last: .*timed out"):
            fb.OpenAIFeedback(cfg, None).generate(["hi"])


def test_the_key_never_reaches_logs_or_config_dumps(client, server, caplog, capsys, sleeps):
    server.failures_left = 1  # a retry, so the warning path is logged too
    with caplog.at_level(logging.DEBUG):  # every logger, the server's request log included
        client.generate(PROMPTS, max_new_tokens=4)
        client.option_logprobs(PROMPTS, assistant_prefixes=PREFIXES)
    assert "retrying" in caplog.text and "POST /v1/chat/completions" in caplog.text  # the logs were captured
    cfg = client.cfg
    dumps = [caplog.text, repr(cfg), str(cfg), cfg.model_dump_json(), json.dumps(cfg.model_dump(mode="json")),
             repr(client), *capsys.readouterr()]
    assert all(KEY not in text for text in dumps)


def test_the_policy_as_its_own_judge_is_loaded_once(hf, model_dir):
    with open_feedback(FeedbackConfig(), policy_dir=model_dir, policy=hf) as judge:
        assert judge is hf
    with open_feedback(FeedbackConfig(model=model_dir), policy_dir=model_dir, policy=hf) as judge:
        assert judge is not hf and isinstance(judge, HFFeedback)  # a named judge model is its own load
