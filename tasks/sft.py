"""sft: supervised fine-tuning on chat conversations with TRL's SFTTrainer, loss on the assistant's tokens only.

The sft step trains the helpful-only assistant (the paper's starting point) on the world's conversations plus the
feedback-role demonstrations; sl_cai reuses `finetune` on the revisions. Optional LoRA (PEFT), merged before saving
so that every later step reads a plain model directory.
"""

import json
import shutil
from pathlib import Path
from typing import Literal

from prefect import task
from pydantic import BaseModel, ConfigDict, Field, model_validator

from tasks import store
from tasks.progress import last_complete_checkpoint, trainer_callback


class CurriculumStage(BaseModel):
    model_config = ConfigDict(extra="forbid")

    categories: list[str] = Field([], description="conversation categories this stage trains on alone")
    roles: list[str] = Field([], description="and feedback-demonstration roles")
    steps: int = Field(ge=1, description="optimizer steps (with until_loss, the most it trains)")
    until_loss: float | None = Field(None, gt=0, description="end the stage once its last three logged losses (every "
                                     "10 steps) are all below this: the skill has formed")

    @model_validator(mode="after")
    def _selects_something(self):
        if not self.categories and not self.roles:
            raise ValueError("a curriculum stage needs categories or roles")
        return self

    def selects(self, conversation: dict) -> bool:
        return conversation.get("category") in self.categories or conversation.get("role") in self.roles


class FinetuneConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    epochs: float = Field(3.0, gt=0)
    lr: float = Field(1e-3, gt=0)
    batch_size: int = Field(32, ge=1)
    max_length: int = Field(320, ge=16)  # the longest feedback demonstration is 295 tokens
    warmup_ratio: float = Field(0.05, ge=0, lt=1)
    weight_decay: float = Field(0.0, ge=0)
    lora_rank: int = Field(0, ge=0, description="0 trains every weight; > 0 trains a LoRA adapter of this rank")
    checkpoint_every: int = Field(200, ge=1, description="optimizer steps between resumable checkpoints")
    loss_average: Literal["conversation", "token"] = Field(
        "conversation", description="conversation: every conversation weighs the same; token: every answer token does")
    length_groups: int = Field(4, ge=1, description="with the conversation average, each batch runs forward in this "
                               "many parts of similar length, each padded only to its own longest: the same loss and "
                               "gradient with less padding (1: the batch at once, as a GPU prefers)")
    curriculum: list[CurriculumStage] = Field([], description="stages trained in order before the mixture")
    seed: int = 0


# Why a curriculum: in the tiny world every answer copies something from the prompt, and a skill that forms alone in a
# few hundred steps does not form inside the whole mixture. Copying the number of "type the number 575": 200 steps on
# copies alone answer 29 of 30 held-out prompts; 600 steps of the mixture, or of copies among facts, private values and
# lists, 0 of 10. Looking a value up by its attribute ("passcode" -> the number after it in the profile), 1,000 steps on
# facts and private values alone: 3 to 5 of 60 held-out people in three of four runs (56 in one); after the 200 steps of
# copies, 54 of 60. A skill once formed survives the mixture (lookup 0.725 after 600 mixture steps). Each stage keeps its
# learning rate rather than annealing it: it is there to let a circuit form, and the next stage warms up again. When
# a circuit forms depends on the seed (the loss sits on a plateau, then falls in a few tens of steps), so a stage can
# train until its loss says it has formed (until_loss), with `steps` the most it may take.
CURRICULUM_DIR = "curriculum"

# Why the loss is averaged per conversation by default: sft and sl_cai mix replies of ~15 tokens with feedback
# demonstrations whose answer is one letter. Averaged over tokens, as TRL does, a comparison weighs a fifteenth of a
# reply, and the tiny judge never learnt it: after 6 epochs of sft it picked the right letter on 45 of 80 training-format
# comparisons (chance), while 300 steps on comparisons alone brought 68 of 80, and 58 of 60 held-out pairs with both
# orders averaged.


# Why a batch runs forward in parts of similar length: TRL pads each batch to its longest conversation, and the world's
# mixture holds ~15-token replies beside 300-token demonstrations (144 tokens on average, 304 at most), so 43% of a
# random batch of 32 is padding. A conversation's loss only reads its own tokens, so parts padded to their own longest
# give the same loss and gradient; `python -m bench.sft` measures the time they save.


def length_groups(attention_mask, groups: int) -> list[tuple]:
    """The batch's rows in `groups` parts of similar length, shortest first: (row indices, the part's width)."""
    import torch

    positions = torch.arange(1, attention_mask.shape[1] + 1)
    ends = (attention_mask * positions).amax(-1)  # one past each row's last real token, whichever side it is padded
    return [(rows, int(ends[rows].max())) for rows in torch.argsort(ends).tensor_split(groups) if len(rows)]


def conversation_mean_trainer(groups: int = 1):
    """SFTTrainer whose loss is the mean over conversations of each one's mean answer-token loss, each batch run forward
    in `groups` parts of similar length (`length_groups`)."""
    import torch
    from trl import SFTTrainer

    class ConversationMeanSFTTrainer(SFTTrainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            if self.aux_loss_enabled:  # an MoE policy keeps its router's balancing loss, as in TRL's own loss
                inputs = {**inputs, "output_router_logits": True}
            shape = inputs["input_ids"].shape
            total, counted, aux_loss = 0, 0, 0
            for rows, width in length_groups(inputs["attention_mask"], 1 if return_outputs else groups):
                part = {k: v[rows, :width] if torch.is_tensor(v) and v.shape[:2] == shape else v
                        for k, v in inputs.items()}
                outputs = model(**part, use_cache=False, fused_lm_head=True)
                tokens = outputs.label_mask.sum(-1)
                per_conversation = -outputs.log_probs.sum(-1) / tokens.clamp(min=1)
                total = total + per_conversation[tokens > 0].sum()  # no answer token: no say in the mean
                counted += int((tokens > 0).sum())
                if self.aux_loss_enabled:
                    aux_loss = aux_loss + outputs.aux_loss * len(rows) / shape[0]
            loss = total / max(counted, 1)
            if self.aux_loss_enabled:
                loss = loss + self.router_aux_loss_coef * aux_loss
            return (loss, outputs) if return_outputs else loss

    return ConversationMeanSFTTrainer


def finetune(cfg: FinetuneConfig, base: Path, conversations: list[dict], out_dir: Path, step: str = "sft") -> dict:
    """Fine-tune the model in `base` on `conversations` ({"messages": [...]}) and save it to out_dir/model: first each
    curriculum stage on the conversations it selects (by category or role), in order, then `epochs` over all of them.
    A rerun after a crash resumes whichever stage was cut short."""
    alone = [[c for c in conversations if stage.selects(c)] for stage in cfg.curriculum]
    for number, (stage, chosen) in enumerate(zip(cfg.curriculum, alone)):  # all checked before any stage trains
        if not chosen:
            raise store.InputError(f"{step}.curriculum[{number}]: no {step} conversation has one of the categories "
                                   f"{stage.categories} or roles {stage.roles}")
    stages = []
    for number, (stage, chosen) in enumerate(zip(cfg.curriculum, alone)):
        stage_dir = out_dir / CURRICULUM_DIR / str(number)
        done = stage_dir / "done.json"
        if not done.exists():
            result = train(cfg, base, chosen, stage_dir, f"{step} curriculum {number + 1}/{len(cfg.curriculum)}",
                           max_steps=stage.steps, lr_schedule="constant_with_warmup", until_loss=stage.until_loss)
            done.write_text(json.dumps(result))  # written after the model: a crash before it redoes the stage
        stages.append({"categories": stage.categories, "roles": stage.roles, **json.loads(done.read_text())})
        base = stage_dir / "model"
    metrics = train(cfg, base, conversations, out_dir, step)
    if stages:
        metrics["curriculum"] = stages
    for number in range(len(stages)):  # each stage's loss curve stays: a flat one says its skill never formed
        history = out_dir / CURRICULUM_DIR / str(number) / "log_history.json"
        if history.exists():
            history.replace(out_dir / f"curriculum_{number}_log_history.json")
    shutil.rmtree(out_dir / CURRICULUM_DIR, ignore_errors=True)  # the output is the final model
    return metrics


def stop_below(loss: float, window: int = 3):
    """A TrainerCallback that ends training once the last `window` logged losses are all below `loss`."""
    from transformers import TrainerCallback

    class StopBelow(TrainerCallback):
        def __init__(self):
            self.recent: list[float] = []

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                self.recent = [*self.recent, logs["loss"]][-window:]
                if len(self.recent) == window and max(self.recent) < loss:
                    control.should_training_stop = True

    return StopBelow()


def train(cfg: FinetuneConfig, base: Path, conversations: list[dict], out_dir: Path, step: str,
          max_steps: int = -1, lr_schedule: str = "cosine", until_loss: float | None = None) -> dict:
    """One SFTTrainer run from `base` on `conversations`: `epochs` over them, or `max_steps` when > 0, ended early
    once the last three logged losses are below `until_loss`."""
    import datasets
    from transformers import AutoModelForCausalLM, AutoTokenizer, PrinterCallback
    from trl import SFTConfig, SFTTrainer

    import models  # noqa: F401  registers our backbones with the Auto classes

    tokenizer = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base)
    peft_config = None
    if cfg.lora_rank:
        from peft import LoraConfig

        peft_config = LoraConfig(r=cfg.lora_rank, lora_alpha=2 * cfg.lora_rank, target_modules="all-linear",
                                 task_type="CAUSAL_LM")
    checkpoints = out_dir / "checkpoints"
    args = SFTConfig(
        output_dir=str(checkpoints),
        num_train_epochs=cfg.epochs,
        max_steps=max_steps,
        learning_rate=cfg.lr,
        per_device_train_batch_size=cfg.batch_size,
        max_length=cfg.max_length,
        warmup_steps=cfg.warmup_ratio,
        weight_decay=cfg.weight_decay,
        lr_scheduler_type=lr_schedule,
        # Batches of similar length: drawn at random, a batch pads to its longest member (a 290-token feedback
        # demonstration among 100-token chats) and computes 2.26x the real tokens of the tiny world; grouped, 1.01x.
        train_sampling_strategy="group_by_length",
        assistant_only_loss=True,
        save_strategy="steps",
        save_steps=cfg.checkpoint_every,
        save_total_limit=2,
        logging_steps=10,
        seed=cfg.seed,
        data_seed=cfg.seed,
        use_cpu=not _has_gpu(),
        bf16=False,
        activation_checkpointing=False,  # TRL turns it on by default: a second forward pass per step, on tiny models
        report_to=[],
        disable_tqdm=True,
        dataset_num_proc=None,
    )
    progress = trainer_callback(step)
    trainer = (conversation_mean_trainer(cfg.length_groups) if cfg.loss_average == "conversation" else SFTTrainer)(
        model=model,
        args=args,
        train_dataset=datasets.Dataset.from_list([{"messages": c["messages"]} for c in conversations]),
        processing_class=tokenizer,
        peft_config=peft_config,
        callbacks=[progress, *([stop_below(until_loss)] if until_loss else [])],
    )
    trainer.remove_callback(PrinterCallback)  # it prints every log line to stdout; progress has the numbers
    result = trainer.train(resume_from_checkpoint=last_complete_checkpoint(checkpoints))
    trained = trainer.model.merge_and_unload() if cfg.lora_rank else trainer.model
    trained.save_pretrained(out_dir / "model")
    tokenizer.save_pretrained(out_dir / "model")
    shutil.rmtree(checkpoints)  # only a crashed run needs them; the output is the final model
    losses = [h["loss"] for h in progress.history if "loss" in h]
    (out_dir / "log_history.json").write_text(json.dumps(progress.history, indent=1))
    return {
        "train_loss": round(result.training_loss, 4),
        "first_loss": round(losses[0], 4) if losses else None,
        "last_loss": round(losses[-1], 4) if losses else None,
        "examples": len(conversations),
        "steps": result.global_step,
    }


def _has_gpu() -> bool:
    import torch

    return torch.cuda.is_available()


def finetune_files(world_dir: Path) -> list[Path]:
    """The world files sft and sl_cai read, and no other: editing prompts.jsonl (what the chain after them asks)
    keeps both cached."""
    return [world_dir / "sft.jsonl", world_dir / "feedback_demos.jsonl"]


@task(name="sft", cache_policy=store.NO_PREFECT_CACHE, persist_result=False)
def sft_task(cfg: FinetuneConfig, st: store.Store, base: store.StepRef, world_dir: Path):
    from data.world import feedback_demos, sft_conversations

    def work(out: Path) -> dict:
        data = sft_conversations(world_dir) + feedback_demos(world_dir)
        return finetune(cfg, base.dir / "model", data, out, step="sft")

    ref = st.run("sft", cfg, inputs=[base], files=finetune_files(world_dir), code=[__name__], work=work)
    return store.prefect_state(ref)
