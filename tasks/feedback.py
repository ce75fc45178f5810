"""Feedback: the model that answers, critiques, revises and judges (DESIGN.md contract 7).

One small interface, two backends with the same two methods:
    generate(prompts, max_new_tokens, temperature, seed) -> the assistant's replies to user messages
    option_logprobs(prompts, options, assistant_prefixes) -> log P(option) as the first tokens of each reply
`hf` runs a local Hugging Face causal LM (by default the policy itself, as in the paper's self-critique); `openai`
calls any OpenAI-compatible chat-completions endpoint (vLLM, TGI, llama.cpp, Ollama, or tasks/openai_server.py).
The endpoint's key is read from the environment variable the config names; it is never in the config, so never in a
manifest, an artifact or a log.
"""

import contextlib
import json
import logging
import math
import os
import re
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from http.client import HTTPException
from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from data.roles import OPTIONS, comparison_prompt
from tasks.store import InputError

log = logging.getLogger(__name__)

TOP_LOGPROBS = 20  # the most first-token alternatives the OpenAI API returns


class FeedbackError(RuntimeError):
    """The feedback endpoint failed: a refused request, or no answer after every retry."""


class FeedbackConfig(BaseModel):
    # hide_input_in_errors: a key pasted into api_key_env by mistake must not be echoed by the validation error
    model_config = ConfigDict(extra="forbid", hide_input_in_errors=True)

    backend: Literal["hf", "openai"] = "hf"
    model: Path | None = Field(None, description="hf: a local model directory; None uses the policy being aligned")
    base_url: str | None = Field(None, description="openai: the endpoint, e.g. http://127.0.0.1:8000/v1")
    model_name: str | None = Field(None, description="openai: the served model's name")
    api_key_env: str | None = Field(None, description="openai: NAME of the environment variable holding the key")
    timeout_s: float = Field(60.0, gt=0, description="openai: per request")
    max_retries: int = Field(4, ge=0, description="openai: retries after a connection error, timeout, 429 or 5xx")
    backoff_s: float = Field(1.0, ge=0, description="openai: the first retry's wait; it doubles with each retry")
    batch_size: int = Field(32, ge=1, description="hf: sequences per forward pass; openai: requests in flight")

    @field_validator("api_key_env")
    @classmethod
    def _a_name_not_a_key(cls, name):
        if name is not None and not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
            raise ValueError("api_key_env takes the NAME of an environment variable (letters, digits, _), not a key")
        return name

    @model_validator(mode="after")
    def _openai_needs_an_endpoint(self):
        if self.backend == "openai":
            for name in ("base_url", "model_name"):
                if not getattr(self, name):
                    raise ValueError(f"backend=openai needs {name}")
        return self


def api_key(cfg: FeedbackConfig) -> str | None:
    """The key from the environment; None when the endpoint needs none. Call it before work starts to fail early."""
    if cfg.api_key_env is None:
        return None
    key = os.environ.get(cfg.api_key_env)
    if not key:
        raise InputError(f"feedback.api_key_env: the environment variable {cfg.api_key_env} is not set")
    return key


def sampling_kwargs(temperature: float) -> dict:
    """generate() arguments for plain sampling at `temperature` (0 = greedy).

    A checkpoint's generation_config may ask for top-k, top-p or a repetition penalty; they are overridden so that
    both backends (and tasks/openai_server.py) draw from the same distribution, softmax(logits / temperature).
    """
    if temperature == 0:
        return {"do_sample": False, "repetition_penalty": 1.0}
    return {"do_sample": True, "temperature": temperature, "top_k": 0, "top_p": 1.0, "repetition_penalty": 1.0}


def option_logprob(top: Sequence[tuple[str, float]], option: str) -> float:
    """log P(option) read off the top-k first tokens an OpenAI-compatible endpoint returns.

    Present:  log sum_{t in top, text(t) = option} p_t   (two token ids may decode to the same text, and " A" is the
              option A: many tokenizers give a reply's first word its leading space, ours included).
    Absent:   every token outside the top k has p <= min_top p_t, and together they hold 1 - sum_top p_t, so
              log P(option) <= min(min_top log p_t, log(1 - sum_top p_t)).
    An absent option gets this upper bound rather than -inf: a judge whose two options both fall outside its top 20
    is uncertain, and the bound turns that into a soft label near 1/2 instead of NaN or a false certainty.
    """
    hits = [lp for token, lp in top if token.strip() == option.strip()]
    if hits:
        peak = max(hits)
        return peak + math.log(sum(math.exp(lp - peak) for lp in hits))
    rest = 1.0 - sum(math.exp(lp) for _, lp in top)
    return min(min(lp for _, lp in top), math.log(rest) if rest > 0 else -math.inf)


def option_probability(logprobs: list[float]) -> list[float]:
    """softmax over the option tokens' log-probabilities: the judge's choice renormalised to the options."""
    top = max(logprobs)
    weights = [math.exp(lp - top) for lp in logprobs]
    return [w / sum(weights) for w in weights]


def averaged_label(p_a_first: float, p_a_second: float) -> float:
    """p = (P(A | A first) + P(A | A second)) / 2: the position-debiased soft label."""
    return (p_a_first + p_a_second) / 2


def preference_for_first(judge, prompts: list[str], first: list[str], second: list[str],
                         questions: list[str]) -> list[float]:
    """P(first response better) per prompt: the judge asked with first as option A, then as option B, averaged."""
    as_a = judge.option_logprobs([comparison_prompt(p, f, s, q) for p, f, s, q in zip(prompts, first, second, questions)],
                                 options=OPTIONS)
    as_b = judge.option_logprobs([comparison_prompt(p, s, f, q) for p, f, s, q in zip(prompts, first, second, questions)],
                                 options=OPTIONS)
    return [averaged_label(option_probability(a)[0], option_probability(b)[1]) for a, b in zip(as_a, as_b)]


def left_pad(sequences: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for i, s in enumerate(sequences):
        ids[i, width - len(s) :] = torch.tensor(s)
        mask[i, width - len(s) :] = 1
    return ids, mask


class HFFeedback:
    """A local causal LM: batched generation with left padding and a KV cache, exact option log-probabilities."""

    def __init__(self, model_dir: Path, batch_size: int = 32):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        import models  # noqa: F401  registers our backbones with the Auto classes

        if not (Path(model_dir) / "config.json").is_file():
            raise InputError(f"feedback.model: {model_dir} is not a Hugging Face model directory (no config.json)")
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
        self.batch_size = batch_size
        # Many checkpoints ship without a pad token; any id works, the attention mask hides it.
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else \
            self.tokenizer.eos_token_id

    def chat_ids(self, prompt: str, prefix: str = "") -> list[int]:
        """The prompt as one user turn, the assistant's turn opened, and the start of the reply if given."""
        ids = self.tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                                 tokenize=True, return_dict=True)["input_ids"]
        return list(ids) + (self.tokenizer(prefix, add_special_tokens=False)["input_ids"] if prefix else [])

    def continuation_ids(self, prefix: str, option: str) -> list[int]:
        """The option's tokens where it follows the prefix in one text, as the reply a model learnt from was tokenized.

        Alone, an option may tokenize otherwise: ours gives a text's first word its leading space, so "B" alone is
        " B", while in "... is (B)" it is "B". Reading " B" after "(" asks for a token no demonstration ever had there.
        Where the prefix's own last tokens would merge with the option, the option is tokenized alone.
        """
        alone = self.tokenizer(option, add_special_tokens=False)["input_ids"]
        if not prefix:
            return alone
        before = self.tokenizer(prefix, add_special_tokens=False)["input_ids"]
        joint = self.tokenizer(prefix + option, add_special_tokens=False)["input_ids"]
        return joint[len(before):] if joint[:len(before)] == before and len(joint) > len(before) else alone

    def _batches(self, rows: list[list[int]]) -> Iterator[list[int]]:
        """Indices of rows in batches of similar lengths, so little of each batch is padding."""
        order = sorted(range(len(rows)), key=lambda i: len(rows[i]))
        for start in range(0, len(order), self.batch_size):
            yield order[start : start + self.batch_size]

    @torch.inference_mode()
    def generate(self, prompts: list[str], max_new_tokens: int = 64, temperature: float = 1.0,
                 seed: int = 0, openings: list[str] | None = None) -> list[str]:
        """Replies sampled at `temperature` (0 = greedy), ending at EOS, without special tokens. A reply given an
        opening starts with it: the model writes the rest, and the opening is part of the returned text.

        The same prompts, seed and batch_size give the same replies; the global RNG is left as it was.
        """
        openings = openings or [""] * len(prompts)
        rows = [self.chat_ids(p, o) for p, o in zip(prompts, openings, strict=True)]
        replies = [""] * len(prompts)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            for batch in self._batches(rows):
                ids, mask = left_pad([rows[i] for i in batch], self.pad_id)
                out = self.model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                                          eos_token_id=self.tokenizer.eos_token_id, pad_token_id=self.pad_id,
                                          **sampling_kwargs(temperature))
                texts = self.tokenizer.batch_decode(out[:, ids.shape[1] :], skip_special_tokens=True)
                for i, text in zip(batch, texts):
                    replies[i] = (openings[i] + text).strip()
        return replies

    @torch.inference_mode()
    def option_logprobs(self, prompts: list[str], options: Sequence[str] = ("A", "B"),
                        assistant_prefixes: list[str] | None = None) -> list[list[float]]:
        """log P(option | prompt, prefix) = sum_j log P(o_j | context, o_<j) over the option's tokens o_1..o_n.

        The row fed for an option is the context and o_1..o_(n-1): its last n positions predict o_1..o_n. Options of
        one token therefore share one row per prompt, and only the last positions' logits are computed.
        """
        prefixes = assistant_prefixes or [""] * len(prompts)
        rows, where = [], {}  # distinct rows, and each row's index in `rows`
        scored = []  # per (prompt, option): its row and its token ids
        for prompt, prefix in zip(prompts, prefixes, strict=True):
            context = self.chat_ids(prompt, prefix)
            for ids in (self.continuation_ids(prefix, o) for o in options):
                row = tuple(context + ids[:-1])
                if row not in where:
                    where[row] = len(rows)
                    rows.append(list(row))
                scored.append((where[row], ids))
        logp = [None] * len(rows)  # per row: (n_max, V) log-probabilities of its last positions
        keep = max(len(ids) for _, ids in scored)
        for batch in self._batches(rows):
            ids, mask = left_pad([rows[i] for i in batch], self.pad_id)
            positions = (mask.cumsum(-1) - 1).clamp(min=0)  # left padding must not shift the positions
            logits = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, logits_to_keep=keep).logits
            for b, i in enumerate(batch):
                logp[i] = logits[b, -keep:].float().log_softmax(-1)  # a model may ignore logits_to_keep: count from the end
        scores = [logp[r][keep - len(ids) :].gather(-1, torch.tensor(ids)[:, None]).sum().item() for r, ids in scored]
        k = len(options)
        return [scores[i : i + k] for i in range(0, len(scores), k)]


class OpenAIFeedback:
    """An OpenAI-compatible chat-completions endpoint, one request per prompt, `batch_size` in flight."""

    def __init__(self, cfg: FeedbackConfig, key: str | None):
        self.cfg = cfg
        self.url = cfg.base_url.rstrip("/") + "/chat/completions"
        self._key = key
        self._headers = {"Content-Type": "application/json"} | ({"Authorization": f"Bearer {key}"} if key else {})

    def _redact(self, text: str) -> str:
        return text.replace(self._key, "[api key]") if self._key else text

    def post(self, body: dict) -> dict:
        """One request, retried with exponential backoff (backoff_s * 2^attempt) on connection errors, timeouts,
        429 and 5xx; any other status fails at once with the server's own message."""
        data = json.dumps({"model": self.cfg.model_name, **body}).encode()
        for attempt in range(self.cfg.max_retries + 1):
            request = urllib.request.Request(self.url, data=data, headers=self._headers, method="POST")
            try:
                with urllib.request.urlopen(request, timeout=self.cfg.timeout_s) as response:
                    return json.load(response)
            except urllib.error.HTTPError as e:
                message = self._redact(server_message(e.read()))
                if e.code != 429 and e.code < 500:
                    raise FeedbackError(f"{self.url} answered {e.code}: {message}") from None
                problem = f"HTTP {e.code}: {message}"
            except (urllib.error.URLError, TimeoutError, ConnectionError, HTTPException) as e:
                problem = str(getattr(e, "reason", e)) or type(e).__name__
            if attempt == self.cfg.max_retries:
                raise FeedbackError(f"{self.url}: no answer after {attempt + 1} attempts; last: {problem}")
            delay = self.cfg.backoff_s * 2**attempt
            log.warning("feedback: %s (attempt %d of %d); retrying in %.2f s", problem, attempt + 1,
                        self.cfg.max_retries + 1, delay)
            time.sleep(delay)

    def _each(self, work: Callable[[int], object], n: int) -> list:
        """work(i) for i < n with batch_size requests in flight, in order; the first failure cancels the rest."""
        with ThreadPoolExecutor(min(self.cfg.batch_size, max(n, 1))) as pool:
            futures = [pool.submit(work, i) for i in range(n)]
            try:
                return [f.result() for f in futures]
            except BaseException:
                for f in futures:
                    f.cancel()
                raise

    def generate(self, prompts: list[str], max_new_tokens: int = 64, temperature: float = 1.0,
                 seed: int = 0) -> list[str]:
        """Replies sampled at `temperature` (0 = greedy); prompt i is sent with seed + i, so a rerun draws the same
        replies on servers that honour `seed` (vLLM does)."""

        def one(i: int) -> str:
            reply = self.post({"messages": [{"role": "user", "content": prompts[i]}], "max_tokens": max_new_tokens,
                               "temperature": temperature, "seed": seed + i, "n": 1})
            return (reply["choices"][0]["message"]["content"] or "").strip()

        return self._each(one, len(prompts))

    def option_logprobs(self, prompts: list[str], options: Sequence[str] = ("A", "B"),
                        assistant_prefixes: list[str] | None = None) -> list[list[float]]:
        """log P(option) of the first token of the reply, from the endpoint's top 20 (see `option_logprob`).

        Only the first token is visible, so each option must be a single token of the served model's tokenizer.
        A prefix is sent as a final assistant message that the server continues (vLLM's continue_final_message).
        """
        prefixes = assistant_prefixes or [None] * len(prompts)
        if len(prefixes) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(prefixes)} assistant prefixes")

        def one(i: int) -> tuple[list[float], int]:
            messages = [{"role": "user", "content": prompts[i]}]
            body = {"max_tokens": 1, "temperature": 0.0, "logprobs": True, "top_logprobs": TOP_LOGPROBS}
            if prefixes[i] is not None:
                messages.append({"role": "assistant", "content": prefixes[i]})
                body |= {"continue_final_message": True, "add_generation_prompt": False}
            reply = self.post({"messages": messages, **body})
            top = [(t["token"], t["logprob"]) for t in reply["choices"][0]["logprobs"]["content"][0]["top_logprobs"]]
            scores = [option_logprob(top, o) for o in options]
            return scores, sum(o not in {t for t, _ in top} for o in options)

        results = self._each(one, len(prompts))
        absent = sum(n for _, n in results)
        if absent:
            log.warning("feedback: %d of %d option scores were outside the endpoint's top %d; each got its upper bound",
                        absent, len(prompts) * len(options), TOP_LOGPROBS)
        return [scores for scores, _ in results]


def server_message(body: bytes) -> str:
    """The error text of an OpenAI-style error body {"error": {"message": ...}}, else the body itself."""
    text = body.decode("utf-8", errors="replace").strip()
    with contextlib.suppress(ValueError, KeyError, TypeError):
        error = json.loads(text)["error"]
        return str(error["message"] if isinstance(error, dict) else error)
    return text[:500] or "(empty body)"


@contextlib.contextmanager
def open_feedback(cfg: FeedbackConfig, policy_dir: Path,
                  policy: HFFeedback | None = None) -> Iterator[HFFeedback | OpenAIFeedback]:
    """The configured backend; `hf` without a model is the policy at policy_dir (`policy`, when already loaded)."""
    if cfg.backend == "hf" and cfg.model is None and policy is not None:
        yield policy  # the paper's self-critique: one model answers and judges, loaded once
    elif cfg.backend == "openai":
        yield OpenAIFeedback(cfg, api_key(cfg))
    else:
        yield HFFeedback(cfg.model or policy_dir, batch_size=cfg.batch_size)
