"""evaluate: the world's graders on a model's greedy answers to held-out prompts, and held-out perplexity.

Runs after every step that yields a model. Splits are reported separately: held-out entities asked with training
phrasings, and held-out entities asked with held-out phrasings. The graders only judge; nothing they say feeds back
into training.
"""

import json
import math
import random
from pathlib import Path

import torch
from prefect import task
from pydantic import BaseModel, ConfigDict, Field

from data import GENERATOR
from tasks import store

HELDOUT_SPLITS = ("heldout_entity", "heldout_phrasing")


class EvaluateConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    prompts_per_split: int = Field(200, ge=1, description="held-out prompts per split and kind")
    max_new_tokens: int = Field(96, ge=1)
    perplexity_conversations: int = Field(200, ge=1)
    seed: int = 0


def sample_records(cfg: EvaluateConfig, prompts: list[dict]) -> list[dict]:
    rng = random.Random(cfg.seed)
    chosen = []
    for split in HELDOUT_SPLITS:
        for kind in ("harmful", "benign"):
            group = [p for p in prompts if p["split"] == split and p["kind"] == kind]
            chosen += rng.sample(group, min(cfg.prompts_per_split, len(group)))
    return chosen


@torch.inference_mode()
def perplexity(model, tokenizer, conversations: list[dict], max_length: int = 512) -> float:
    """exp(mean negative log-likelihood of the assistant tokens)."""
    total_nll, total_tokens = 0.0, 0
    for conversation in conversations:
        encoded = tokenizer.apply_chat_template(conversation["messages"], tokenize=True, return_dict=True,
                                                return_assistant_tokens_mask=True)
        ids = torch.tensor([encoded["input_ids"][:max_length]])
        mask = torch.tensor([encoded["assistant_masks"][:max_length]])
        logits = model(input_ids=ids).logits[:, :-1].float()
        targets, keep = ids[:, 1:], mask[:, 1:].bool()
        nll = torch.nn.functional.cross_entropy(logits[keep], targets[keep], reduction="sum")
        total_nll += nll.item()
        total_tokens += int(keep.sum())
    return math.exp(total_nll / max(total_tokens, 1))


def evaluate_model(cfg: EvaluateConfig, model_dir: Path, prompts: list[dict], conversations: list[dict],
                   out_dir: Path, chat: bool = True) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import models  # noqa: F401  registers our backbones with the Auto classes
    from data.graders import score
    from tasks.feedback import FeedbackConfig, open_feedback

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    rng = random.Random(cfg.seed)
    ppl_set = rng.sample(conversations, min(cfg.perplexity_conversations, len(conversations)))
    metrics = {"heldout_perplexity": round(perplexity(model, tokenizer, ppl_set), 4)}
    del model
    if chat:  # a pretrained backbone is not an assistant yet: only its perplexity means something
        records = sample_records(cfg, prompts)
        with open_feedback(FeedbackConfig(), policy_dir=model_dir) as policy:
            responses = policy.generate([r["prompt"] for r in records], max_new_tokens=cfg.max_new_tokens,
                                        temperature=0.0, seed=cfg.seed)
        with open(out_dir / "answers.jsonl", "w") as f:
            f.writelines(json.dumps({"id": record["id"], "split": record["split"], "response": response}) + "\n" for record, response in zip(records, responses))
        for split in HELDOUT_SPLITS:
            chosen = [(r, a) for r, a in zip(records, responses) if r["split"] == split]
            rates = score([r for r, _ in chosen], [a for _, a in chosen])
            metrics.update({f"{split}/{k}": round(v, 4) if isinstance(v, float) else v for k, v in rates.items()})
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    return metrics


@task(name="evaluate", cache_policy=store.NO_PREFECT_CACHE, persist_result=False)
def evaluate_task(cfg: EvaluateConfig, st: store.Store, model: store.StepRef, prompts_path: Path,
                  conversations_path: Path, chat: bool = True):
    from prefect.artifacts import create_table_artifact

    from data.world import read_conversations, read_prompts

    prompts, conversations = read_prompts(prompts_path), read_conversations(conversations_path)
    ref = st.run(
        f"evaluate_{model.step}", cfg, inputs=[model], files=[prompts_path, conversations_path],
        code=[__name__, "data.graders", *GENERATOR, "tasks.feedback"],
        work=lambda out: evaluate_model(cfg, model.dir / "model", prompts, conversations, out, chat=chat),
    )
    table = [{"metric": k, "value": v} for k, v in ref.metrics.items()]
    create_table_artifact(table, key=f"evaluate-{model.step.replace('_', '-')}",
                          description=f"held-out evaluation of {model.step}")
    return store.prefect_state(ref)
