"""Feedback: the model that answers, critiques, revises and judges (DESIGN.md contract 7).

One small interface: `generate(prompts)` samples replies to user messages, `option_logprobs(prompts, options)` gives
log P(option) as the first tokens of the reply. Backends: `hf`, a local Hugging Face model directory (by default the
policy itself, as in the paper's self-critique), and `openai`, any OpenAI-compatible chat-completions endpoint.
"""

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

from tasks.store import InputError


class FeedbackConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    backend: Literal["hf", "openai"] = "hf"
    model: Path | None = Field(None, description="hf: a local model directory; None uses the policy being aligned")
    base_url: str | None = Field(None, description="openai: e.g. http://127.0.0.1:8000/v1")
    model_name: str | None = Field(None, description="openai: the served model's name")
    api_key_env: str | None = Field(None, description="openai: NAME of the environment variable holding the key")
    timeout_s: float = Field(60.0, gt=0)
    max_retries: int = Field(4, ge=0)
    backoff_s: float = Field(1.0, ge=0)
    batch_size: int = Field(32, ge=1)

    @model_validator(mode="after")
    def _openai_needs_an_endpoint(self):
        if self.backend == "openai" and not (self.base_url and self.model_name):
            raise ValueError("the openai backend needs base_url and model_name")
        return self


class HFFeedback:
    """A local causal LM: batched generation with left padding, exact option log-probabilities."""

    def __init__(self, model_dir: Path, batch_size: int = 32):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        import models  # noqa: F401  registers our backbones with the Auto classes

        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.tokenizer.padding_side = "left"
        self.model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
        self.batch_size = batch_size

    def _chat(self, prompt: str, prefix: str = "") -> list[int]:
        ids = self.tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                                 tokenize=True, return_dict=True)["input_ids"]
        return ids + (self.tokenizer(prefix, add_special_tokens=False)["input_ids"] if prefix else [])

    def _left_pad(self, sequences: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        width = max(len(s) for s in sequences)
        ids = torch.full((len(sequences), width), self.tokenizer.pad_token_id)
        mask = torch.zeros((len(sequences), width), dtype=torch.long)
        for i, s in enumerate(sequences):
            ids[i, width - len(s) :] = torch.tensor(s)
            mask[i, width - len(s) :] = 1
        return ids, mask

    @torch.inference_mode()
    def generate(self, prompts: list[str], max_new_tokens: int = 64, temperature: float = 1.0,
                 seed: int = 0) -> list[str]:
        torch.manual_seed(seed)
        replies = []
        for start in range(0, len(prompts), self.batch_size):
            ids, mask = self._left_pad([self._chat(p) for p in prompts[start : start + self.batch_size]])
            sampling = {"do_sample": True, "temperature": temperature, "top_k": 0} if temperature > 0 else \
                {"do_sample": False}
            out = self.model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                                      pad_token_id=self.tokenizer.pad_token_id,
                                      eos_token_id=self.tokenizer.eos_token_id, **sampling)
            replies += self.tokenizer.batch_decode(out[:, ids.shape[1] :], skip_special_tokens=True)
        return [r.strip() for r in replies]

    @torch.inference_mode()
    def option_logprobs(self, prompts: list[str], options=("A", "B"), assistant_prefixes=None) -> list[list[float]]:
        """log P(option | prompt [+ prefix]) summed over the option's tokens, for every option."""
        prefixes = assistant_prefixes or [""] * len(prompts)
        option_ids = [self.tokenizer(o, add_special_tokens=False)["input_ids"] for o in options]
        rows, spans = [], []
        for prompt, prefix in zip(prompts, prefixes):
            context = self._chat(prompt, prefix)
            for ids in option_ids:
                rows.append(context + ids)
                spans.append(len(ids))
        scores = []
        for start in range(0, len(rows), self.batch_size):
            ids, mask = self._left_pad(rows[start : start + self.batch_size])
            positions = (mask.cumsum(-1) - 1).clamp(min=0)  # left padding must not shift the positions
            logp = self.model(input_ids=ids, attention_mask=mask, position_ids=positions).logits.float().log_softmax(-1)
            for i, n in enumerate(spans[start : start + self.batch_size]):
                targets = ids[i, -n:]
                scores.append(logp[i, -n - 1 : -1].gather(-1, targets[:, None]).sum().item())
        k = len(options)
        return [scores[i : i + k] for i in range(0, len(scores), k)]


@contextlib.contextmanager
def open_feedback(cfg: FeedbackConfig, policy_dir: Path) -> Iterator[HFFeedback]:
    if cfg.backend == "openai":
        raise InputError("feedback.backend=openai: the OpenAI-compatible backend is not implemented yet")
    backend = HFFeedback(cfg.model or policy_dir, batch_size=cfg.batch_size)
    try:
        yield backend
    finally:
        del backend
