"""sft_multimodal: fine-tune the pretrained multimodal backbone on the world's question/answer pairs, loss on the
answer only.

The HF Trainer, not TRL's SFTTrainer: SFTTrainer's vision path expects a transformers ProcessorMixin with an image
processor and its own message format, while ours is a small processor that also takes audio and video. The Trainer
gives the same checkpoints and resume (optimizer, scheduler, RNG, data position) as the text sft step. Examples are
rendered on demand from their index (data/multimodal.py:qa_pair), so the dataset is an index range.
"""

import json
import shutil
from pathlib import Path

import torch
from prefect import task
from pydantic import BaseModel, ConfigDict, Field

from tasks import store
from tasks.progress import last_complete_checkpoint, trainer_callback

# QA examples are drawn from train-split samples from this index on, past those pretraining renders at tiny sizes:
# the fine-tuning images, clips and videos are new ones (of the same training attribute combinations).
FIRST_EXAMPLE = 1_000_000


class MultimodalSFTConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    max_steps: int = Field(400, ge=1)
    lr: float = Field(1e-3, gt=0)
    batch_size: int = Field(32, ge=1)
    warmup_ratio: float = Field(0.05, ge=0, lt=1)
    weight_decay: float = Field(0.0, ge=0)
    checkpoint_every: int = Field(100, ge=1, description="optimizer steps between resumable checkpoints")
    seed: int = 0


class QAIndices(torch.utils.data.Dataset):
    """Example i is qa_pair("train", FIRST_EXAMPLE + i): only its index travels; the collator renders it."""

    def __init__(self, size: int):
        self.size = size

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, i: int) -> int:
        return FIRST_EXAMPLE + i


def finetune_multimodal(cfg: MultimodalSFTConfig, base: Path, out_dir: Path, on_step_end=None) -> dict:
    """Fine-tune the model in `base` (weights and processor) and save it to out_dir/model; resume from the newest
    complete checkpoint in out_dir/checkpoints. on_step_end(step) is called after every optimizer step."""
    from transformers import AutoModelForCausalLM, PrinterCallback, Trainer, TrainerCallback, TrainingArguments

    import models  # noqa: F401  registers our backbones with the Auto classes
    from data.multimodal import answer_only_batch, qa_pair
    from models.multimodal import MultimodalProcessor

    processor = MultimodalProcessor.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base)
    checkpoints = out_dir / "checkpoints"
    args = TrainingArguments(
        output_dir=str(checkpoints),
        max_steps=cfg.max_steps,
        learning_rate=cfg.lr,
        per_device_train_batch_size=cfg.batch_size,
        warmup_steps=cfg.warmup_ratio,
        weight_decay=cfg.weight_decay,
        lr_scheduler_type="cosine",
        save_strategy="steps",
        save_steps=cfg.checkpoint_every,
        save_total_limit=2,
        logging_steps=10,
        seed=cfg.seed,
        data_seed=cfg.seed,
        use_cpu=not torch.cuda.is_available(),
        bf16=False,
        report_to=[],
        disable_tqdm=True,
        remove_unused_columns=False,  # the items are indices; the collator turns them into model inputs
        dataloader_num_workers=0,
    )
    progress = trainer_callback("sft_multimodal")
    callbacks = [progress]
    if on_step_end is not None:
        class StepEnd(TrainerCallback):
            def on_step_end(self, args, state, control, **kwargs):
                on_step_end(state.global_step)

        callbacks.append(StepEnd())
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=QAIndices(cfg.max_steps * cfg.batch_size),
        data_collator=lambda indices: answer_only_batch(processor, [qa_pair("train", i) for i in indices]),
        callbacks=callbacks,
    )
    trainer.remove_callback(PrinterCallback)  # it prints every log line to stdout; progress has the numbers
    result = trainer.train(resume_from_checkpoint=last_complete_checkpoint(checkpoints))
    trainer.model.save_pretrained(out_dir / "model")
    processor.save_pretrained(out_dir / "model")
    shutil.rmtree(checkpoints)  # only a crashed run needs them; the output is the final model
    losses = [h["loss"] for h in progress.history if "loss" in h]
    (out_dir / "log_history.json").write_text(json.dumps(progress.history, indent=1))
    return {
        "train_loss": round(result.training_loss, 4),
        "first_loss": round(losses[0], 4) if losses else None,
        "last_loss": round(losses[-1], 4) if losses else None,
        "steps": result.global_step,
    }


@task(name="sft_multimodal", cache_policy=store.NO_PREFECT_CACHE, persist_result=False)
def sft_multimodal_task(cfg: MultimodalSFTConfig, st: store.Store, base: store.StepRef):
    ref = st.run("sft_multimodal", cfg, inputs=[base], code=[__name__, "data.multimodal"],
                 work=lambda out: finetune_multimodal(cfg, base.dir / "model", out))
    return store.prefect_state(ref)
