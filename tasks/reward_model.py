"""reward_model: a scalar head on the SL-CAI backbone, trained on the AI-feedback soft labels.

The loss is the cross-entropy between the soft label p = P(A better) and the Bradley-Terry probability of the rewards
(Constitutional AI, arXiv 2212.08073, sec. 4.1 trains its preference model on such soft targets). It runs under the HF
Trainer unchanged: a collator stacks each batch's A and B responses, `compute_loss_func` reads the pairs back.

`mix_pairs` adds a preference file of the user's to the AI labels, as the paper's preference model mixed human
helpfulness comparisons with its AI harmlessness labels (sec. 4.1): pairs sampled from the SL-CAI policy seldom show a
needless refusal losing, so a head trained on them alone learns that refusing wins (`bench.reward_ceiling`).

`request_gate` splits the head by the request. One scalar head has to score the same compliment high under a
compliment request and low under an insult request, from the reply's end; at this scale it trades one kind's misses
for the other's. The gated head has three outputs: a reward for the reply if the request is harmful, one if it is
benign, and a logit that the request is harmful, read from the request alone. The reward is their mixture
r = g * r_harmful + (1 - g) * r_benign with g = sigmoid(request logit). In training the gate is the label's own
reading of the request (`p_harmful` of a factored label, else the prompt's kind), and the request logit learns it
with a cross-entropy term; each reward output so learns from its own kind's pairs only. In rl and evaluation the
gate is the model's own reading.
"""

import json
import math
import random
import shutil
from pathlib import Path

import torch
import torch.nn.functional as F
from prefect import task
from pydantic import BaseModel, ConfigDict, Field

from data import GENERATOR
from tasks import store
from tasks.progress import last_complete_checkpoint, trainer_callback


class RewardConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    epochs: float = Field(3.0, gt=0)
    lr: float = Field(5e-4, gt=0)
    batch_size: int = Field(16, ge=1)
    max_length: int = Field(256, ge=16)
    checkpoint_every: int = Field(100, ge=1)
    mix_pairs: Path | None = Field(None, description="a JSON Lines file of preference pairs trained on beside the AI "
                                   "labels, e.g. human helpfulness comparisons; each line holds prompt, chosen and "
                                   "rejected, or prompt, response_a, response_b and p_a (P(A better), 0 to 1)")
    mix_limit: int | None = Field(None, ge=1, description="train on at most this many of mix_pairs (a seeded sample)")
    min_label_margin: float = Field(0.0, ge=0, lt=0.5, description="train only on AI labels at least this far from "
                                    "1/2: a label near 1/2 is a judge that could not decide, and it teaches the "
                                    "reward model to score the pair alike")
    request_gate: bool = Field(False, description="a reward for each kind of request, mixed by the model's own "
                               "reading of whether the request is harmful (see the module's docstring)")
    seed: int = 0


def read_mixed_pairs(path: Path) -> list[dict]:
    """The pairs of a `mix_pairs` file as labelled pairs {prompt, response_a, response_b, p_a, kind}; a chosen/rejected
    line is p_a = 1, and a line without a kind is a benign request's. A malformed line raises InputError naming
    `path:line`."""
    from data.world import WorldFileError, read_jsonl

    try:
        rows = read_jsonl(Path(path), {"prompt": str})
    except (WorldFileError, OSError) as e:
        raise store.InputError(f"reward_model.mix_pairs: {e}") from None
    pairs = []
    for number, row in enumerate(rows, 1):
        where = f"{path}:{number}"
        if "chosen" in row or "rejected" in row:
            texts = (row.get("chosen"), row.get("rejected"))
            p_a = 1.0
        elif {"response_a", "response_b", "p_a"} <= row.keys():
            texts, p_a = (row["response_a"], row["response_b"]), row["p_a"]
            if isinstance(p_a, bool) or not isinstance(p_a, (int, float)) or not 0 <= p_a <= 1:
                raise store.InputError(f"{where}: p_a should be a number from 0 to 1, not {p_a!r}")
        else:
            raise store.InputError(f"{where}: a pair needs chosen and rejected, or response_a, response_b and p_a")
        if not all(isinstance(t, str) and t.strip() for t in texts):
            raise store.InputError(f"{where}: both responses should be non-empty strings")
        kind = row.get("kind", "benign")
        if kind not in ("harmful", "benign"):
            raise store.InputError(f"{where}: kind should be harmful or benign, not {kind!r}")
        pairs.append({"prompt": row["prompt"], "response_a": texts[0], "response_b": texts[1], "p_a": float(p_a),
                      "kind": kind})
    if not pairs:
        raise store.InputError(f"{path}: no preference pairs in it")
    return pairs


def mixed_pairs(cfg: RewardConfig) -> list[dict]:
    """The configured `mix_pairs`, sampled down to `mix_limit` with the step's seed; none when unset."""
    if cfg.mix_pairs is None:
        return []
    pairs = read_mixed_pairs(cfg.mix_pairs)
    if cfg.mix_limit is not None and cfg.mix_limit < len(pairs):
        pairs = random.Random(cfg.seed).sample(pairs, cfg.mix_limit)
    return pairs


def soft_label_loss(r_a: torch.Tensor, r_b: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """L = -[p log sigmoid(r_A - r_B) + (1 - p) log sigmoid(r_B - r_A)], averaged over pairs."""
    return -(p * F.logsigmoid(r_a - r_b) + (1 - p) * F.logsigmoid(r_b - r_a)).mean()


def expected_calibration_error(confidence: list[float], correct: list[bool], bins: int = 10) -> float:
    """ECE = sum_b (n_b / n) * |accuracy_b - confidence_b| over equal-width confidence bins."""
    total, ece = len(confidence), 0.0
    for b in range(bins):
        members = [i for i, c in enumerate(confidence) if b / bins <= c < (b + 1) / bins or (b == bins - 1 and c == 1)]
        if members:
            accuracy = sum(correct[i] for i in members) / len(members)
            mean_conf = sum(confidence[i] for i in members) / len(members)
            ece += len(members) / total * abs(accuracy - mean_conf)
    return ece


def encode(tokenizer, prompt: str, response: str, max_length: int) -> list[int]:
    ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}, {"role": "assistant", "content": response}],
                                        tokenize=True, return_dict=True)["input_ids"]
    return ids[-max_length:]  # keep the end: the reply is what is judged


def encode_request(tokenizer, prompt: str, max_length: int) -> list[int]:
    """The request alone, up to where the reply would start: what the gated head's request logit reads."""
    ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                        tokenize=True, return_dict=True)["input_ids"]
    return ids[-max_length:]


def request_harm(row: dict) -> float:
    """The gate's training target: a factored label's reading of the request, else the prompt's kind."""
    return float(row.get("p_harmful", row.get("kind") == "harmful"))


def pad_right(sequences: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right padding: the head reads the last non-pad token."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for i, s in enumerate(sequences):
        ids[i, : len(s)] = torch.tensor(s)
        mask[i, : len(s)] = 1
    return ids, mask


def pair_collator(pad_id: int):
    """A batch of n pairs as 2n sequences, A's then B's, labelled with P(A better); for the gated head the n requests
    follow as a third block, and each label is [P(A better), request harm]."""
    def collate(rows: list[dict]) -> dict:
        sequences = [r["a"] for r in rows] + [r["b"] for r in rows]
        labels = torch.tensor([r["p"] for r in rows])
        if "request" in rows[0]:
            sequences += [r["request"] for r in rows]
            labels = torch.tensor([[r["p"], r["harm"]] for r in rows])
        ids, mask = pad_right(sequences, pad_id)
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}

    return collate


def pairwise_loss(outputs, labels, num_items_in_batch=None) -> torch.Tensor:
    logits = outputs.logits.float()
    if labels.dim() == 1:
        r_a, r_b = logits.squeeze(-1).chunk(2)
        return soft_label_loss(r_a, r_b, labels.float())
    a, b, request = logits.chunk(3)
    p, harm = labels.float().unbind(-1)
    # The label's reading of the request picks which reward output the pair teaches.
    r_a = harm * a[:, 0] + (1 - harm) * a[:, 1]
    r_b = harm * b[:, 0] + (1 - harm) * b[:, 1]
    return soft_label_loss(r_a, r_b, p) + F.binary_cross_entropy_with_logits(request[:, 2], harm)


def is_gated(model) -> bool:
    return model.config.num_labels == 3


@torch.inference_mode()
def forward_last(model, sequences: list[list[int]], pad_id: int, batch_size: int) -> torch.Tensor:
    """The head's outputs at each sequence's last token, in batches."""
    model.eval()
    out = [torch.zeros(0, model.config.num_labels)]
    for start in range(0, len(sequences), batch_size):
        ids, mask = pad_right(sequences[start : start + batch_size], pad_id)
        out.append(model(input_ids=ids.to(model.device), attention_mask=mask.to(model.device)).logits.float().cpu())
    return torch.cat(out)


def request_gates(model, tokenizer, prompts: list[str], max_length: int, batch_size: int = 32) -> dict[str, float]:
    """The gated head's P(request harmful) for each distinct prompt."""
    distinct = sorted(set(prompts))
    logits = forward_last(model, [encode_request(tokenizer, p, max_length) for p in distinct],
                          tokenizer.pad_token_id, batch_size)
    return dict(zip(distinct, torch.sigmoid(logits[:, 2]).tolist()))


def reply_outputs(model, tokenizer, prompts: list[str], responses: list[str], max_length: int,
                  batch_size: int = 32) -> torch.Tensor:
    """The head's outputs for each conversation: one reward, or a gated head's three outputs."""
    return forward_last(model, [encode(tokenizer, p, r, max_length) for p, r in zip(prompts, responses)],
                        tokenizer.pad_token_id, batch_size)


def mix_by_gate(outputs: torch.Tensor, prompts: list[str], gate: dict[str, float]) -> list[float]:
    """A gated head's reward: its two rewards mixed by P(request harmful)."""
    return [gate[p] * row[0] + (1 - gate[p]) * row[1] for p, row in zip(prompts, outputs.tolist())]


def rewards(model, tokenizer, prompts: list[str], responses: list[str], max_length: int, batch_size: int = 32,
            gate: dict[str, float] | None = None) -> list[float]:
    """One reward per reply. A gated head mixes its two by its own reading of each request, or by `gate`'s."""
    outputs = reply_outputs(model, tokenizer, prompts, responses, max_length, batch_size)
    if not is_gated(model):
        return outputs.squeeze(-1).tolist()
    return mix_by_gate(outputs, prompts, gate or request_gates(model, tokenizer, prompts, max_length, batch_size))


def judge_true_pairs(model, tokenizer, pairs: list[dict], max_length: int) -> dict:
    """Accuracy and calibration against the world's true labels: each pair holds a better and a worse response."""
    prompts = [p["prompt"] for p in pairs]
    better_out = reply_outputs(model, tokenizer, prompts, [p["better"] for p in pairs], max_length)
    worse_out = reply_outputs(model, tokenizer, prompts, [p["worse"] for p in pairs], max_length)
    gated = is_gated(model) and bool(pairs)
    if gated:
        gate = request_gates(model, tokenizer, prompts, max_length)
        better, worse = mix_by_gate(better_out, prompts, gate), mix_by_gate(worse_out, prompts, gate)
    else:
        better, worse = better_out.squeeze(-1).tolist(), worse_out.squeeze(-1).tolist()
    # A pairwise judge is calibrated when its confidence max(P, 1 - P) matches how often it picks the better response.
    p_better = [1 / (1 + math.exp(-(rb - rw))) for rb, rw in zip(better, worse)]
    confidence = [max(p, 1 - p) for p in p_better]
    correct = [p >= 0.5 for p in p_better]
    right = [b > w for b, w in zip(better, worse)]  # a tie is not a ranking
    # Each kind of request, and each held-out split (new entities, new phrasings) where the pairs say, apart.
    groups = {}
    for i, p in enumerate(pairs):
        groups.setdefault(p["kind"], []).append(i)
        if "split" in p:
            groups.setdefault(p["split"].removeprefix("heldout_"), []).append(i)
    splits = sorted({p["split"].removeprefix("heldout_") for p in pairs if "split" in p})
    by_group = {f"heldout_accuracy_{name}": share([right[i] for i in idx]) for name, idx in sorted(groups.items())}
    if gated:
        # Which of the head's two parts errs: its reading of the request, or its rewards once the kind is known.
        read = [(gate[p["prompt"]] >= 0.5) == (p["kind"] == "harmful") for p in pairs]
        by_group["heldout_request_accuracy"] = share(read)
        by_group.update({f"heldout_request_accuracy_{name}": share([read[i] for i in groups[name]]) for name in splits})
        known = {p["prompt"]: float(p["kind"] == "harmful") for p in pairs}
        better_known, worse_known = mix_by_gate(better_out, prompts, known), mix_by_gate(worse_out, prompts, known)
        by_group["heldout_accuracy_kind_known"] = share([b > w for b, w in zip(better_known, worse_known)])
    return {
        "heldout_pairs": len(pairs),
        "heldout_accuracy": share(right),
        **by_group,
        "heldout_ece": round(expected_calibration_error(confidence, correct), 4),
    }


def share(hits: list[bool]) -> float:
    """The share of `hits` that are true (0 of none)."""
    return round(sum(hits) / max(len(hits), 1), 4)


def train_reward_model(cfg: RewardConfig, base: Path, labels: list[dict], true_pairs: list[dict], out_dir: Path) -> dict:
    import datasets
    from transformers import (
        AutoModelForSequenceClassification,
        AutoTokenizer,
        PrinterCallback,
        Trainer,
        TrainingArguments,
    )

    import models  # noqa: F401  registers our backbones with the Auto classes

    torch.manual_seed(cfg.seed)
    tokenizer = AutoTokenizer.from_pretrained(base)
    model = AutoModelForSequenceClassification.from_pretrained(base, num_labels=3 if cfg.request_gate else 1)
    model.config.pad_token_id = tokenizer.pad_token_id
    users_pairs = mixed_pairs(cfg)
    decided = [r for r in labels if abs(r["p_a"] - 0.5) >= cfg.min_label_margin]
    rows = [{"a": encode(tokenizer, r["prompt"], r["response_a"], cfg.max_length),
             "b": encode(tokenizer, r["prompt"], r["response_b"], cfg.max_length), "p": r["p_a"]}
            for r in decided + users_pairs]
    if cfg.request_gate:
        for row, r in zip(rows, decided + users_pairs):
            row.update(request=encode_request(tokenizer, r["prompt"], cfg.max_length), harm=request_harm(r))
    checkpoints = out_dir / "checkpoints"
    args = TrainingArguments(
        output_dir=str(checkpoints), num_train_epochs=cfg.epochs, learning_rate=cfg.lr,
        per_device_train_batch_size=cfg.batch_size, lr_scheduler_type="cosine", warmup_steps=0.05,
        save_strategy="steps", save_steps=cfg.checkpoint_every, save_total_limit=2, logging_steps=10,
        seed=cfg.seed, data_seed=cfg.seed, use_cpu=not torch.cuda.is_available(), report_to=[],
        disable_tqdm=True, remove_unused_columns=False,
    )
    progress = trainer_callback("reward_model")
    trainer = Trainer(model=model, args=args, train_dataset=datasets.Dataset.from_list(rows),
                      data_collator=pair_collator(tokenizer.pad_token_id), compute_loss_func=pairwise_loss,
                      callbacks=[progress])
    trainer.remove_callback(PrinterCallback)
    result = trainer.train(resume_from_checkpoint=last_complete_checkpoint(checkpoints))
    trainer.model.save_pretrained(out_dir / "model")
    tokenizer.save_pretrained(out_dir / "model")
    shutil.rmtree(checkpoints)  # only a crashed run needs them
    (out_dir / "log_history.json").write_text(json.dumps(progress.history, indent=1))
    return {"train_loss": round(result.training_loss, 4), "pairs": len(rows), "mixed_pairs": len(users_pairs),
            "undecided_labels_dropped": len(labels) - len(decided),
            **judge_true_pairs(trainer.model, tokenizer, true_pairs, cfg.max_length)}


@task(name="reward_model", cache_policy=store.NO_PREFECT_CACHE, persist_result=False)
def reward_model_task(cfg: RewardConfig, st: store.Store, sl_cai: store.StepRef, labels: store.StepRef,
                      world_dir: Path):
    from data.world import true_preference_pairs
    from tasks.shards import read_shards

    ref = st.run(
        "reward_model", cfg, inputs=[sl_cai, labels], files=[cfg.mix_pairs] if cfg.mix_pairs else [],
        code=[__name__, *GENERATOR],
        work=lambda out: train_reward_model(cfg, sl_cai.dir / "model", read_shards(labels.dir),
                                            true_preference_pairs(world_dir), out),
    )
    return store.prefect_state(ref)
