"""rl: KL-regularised policy optimisation of the SL-CAI policy against the reward model (the paper's RL-CAI stage).

TRL's GRPOTrainer with beta > 0: the loss carries beta * KL(policy || SL-CAI reference), the reference being the
saved SL-CAI model (TRL reloads it from the policy's directory). Departures from the paper: GRPO's group-relative
advantages in place of PPO with a value head (TRL 1.16 has no PPOTrainer); few steps, since at this scale RL adds
little after SL-CAI and costs over-refusal when pushed (NOTES-tiny-cai 8). The run stops with a message naming the
step when the KL passes its bound or the responses collapse or run to the length cap.
"""

import json
import random
import shutil
from pathlib import Path

import torch
from prefect import task
from pydantic import BaseModel, ConfigDict, Field

from tasks import store
from tasks.progress import last_complete_checkpoint, trainer_callback


class RLConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    steps: int = Field(30, ge=1)
    beta: float = Field(0.05, gt=0, description="KL penalty weight; > 0 is what makes this KL-regularised")
    lr: float = Field(2e-5, gt=0)
    num_generations: int = Field(8, ge=2, description="completions per prompt (GRPO's group)")
    prompts_per_step: int = Field(2, ge=1)
    max_completion_length: int = Field(64, ge=4)
    temperature: float = Field(1.0, gt=0)
    benign_share: float = Field(0.5, ge=0, le=1, description="share of benign prompts: keeps helpfulness rewarded")
    kl_bound: float = Field(1.0, gt=0, description="stop when the mean per-token KL passes this")
    min_mean_length: float = Field(3.0, ge=0, description="stop when the mean completion collapses below this")
    max_clipped_ratio: float = Field(0.9, gt=0, le=1, description="stop when this share of completions hits the cap")
    checkpoint_every: int = Field(10, ge=1)
    request_kind_from_prompts: bool = Field(False, description="a gated reward model mixes its rewards by each "
                                            "prompt's set (red-team or benign) instead of its own reading of the "
                                            "request, as factored labels without a harm question do")
    seed: int = 0


class RLDiverged(RuntimeError):
    """The policy left the region the KL penalty should hold it in, or its responses degenerated."""


def guard(cfg: RLConfig):
    from transformers import TrainerCallback

    class Guard(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            logs = logs or {}
            step = state.global_step
            if logs.get("kl", 0.0) > cfg.kl_bound:
                raise RLDiverged(f"rl step {step}: KL {logs['kl']:.3f} passed the bound {cfg.kl_bound} "
                                 f"(lower rl.lr or raise rl.beta)")
            length = logs.get("completions/mean_length")
            if length is not None and length < cfg.min_mean_length:
                raise RLDiverged(f"rl step {step}: mean response length collapsed to {length:.1f} tokens")
            clipped = logs.get("completions/clipped_ratio")
            if clipped is not None and clipped > cfg.max_clipped_ratio:
                raise RLDiverged(f"rl step {step}: {clipped:.0%} of responses ran to the length cap")

    return Guard()


def rl_prompts(cfg: RLConfig, prompts: list[dict]) -> list[dict]:
    rng = random.Random(cfg.seed)
    train = [p for p in prompts if p["split"] == "train"]
    harmful = [p for p in train if p["kind"] == "harmful"]
    benign = [p for p in train if p["kind"] == "benign"]
    total = cfg.steps * cfg.prompts_per_step
    n_benign = round(cfg.benign_share * total)
    chosen = rng.choices(harmful, k=total - n_benign) + rng.choices(benign, k=n_benign)
    rng.shuffle(chosen)
    return [{"prompt": [{"role": "user", "content": p["prompt"]}], "kind": p["kind"]} for p in chosen]


def reward_function(reward_model: Path, max_length: int, kind_from_prompts: bool = False):
    """The reward model as a TRL reward function. It reads each conversation as the reward model was trained to (the
    same template and the same cut to its max_length), and a gated head mixes its two rewards by its own reading of
    the request, or with `kind_from_prompts` by the prompt's kind (TRL passes the dataset's kind column): TRL's
    built-in path reads one scalar output only."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from tasks.reward_model import is_gated, rewards

    model = AutoModelForSequenceClassification.from_pretrained(reward_model)
    tokenizer = AutoTokenizer.from_pretrained(reward_model)

    if kind_from_prompts and not is_gated(model):
        raise ValueError(f"rl.request_kind_from_prompts needs a gated reward model; {reward_model} has one output "
                         f"(set reward_model.request_gate)")

    def reward_model_score(prompts, completions, kind, **kwargs) -> list[float]:
        requests = [p[-1]["content"] for p in prompts]
        gate = {r: float(k == "harmful") for r, k in zip(requests, kind)} if kind_from_prompts else None
        return rewards(model, tokenizer, requests, [c[-1]["content"] for c in completions], max_length, gate=gate)

    reward_model_score.model = model  # rl moves it to the trainer's device
    return reward_model_score


def train_rl(cfg: RLConfig, policy: Path, reward_model: Path, reward_max_length: int, prompts: list[dict],
             out_dir: Path) -> dict:
    import datasets
    from transformers import AutoTokenizer, PrinterCallback
    from trl import GRPOConfig, GRPOTrainer

    import models  # noqa: F401  registers our backbones with the Auto classes

    tokenizer = AutoTokenizer.from_pretrained(policy)
    reward = reward_function(reward_model, reward_max_length, cfg.request_kind_from_prompts)
    checkpoints = out_dir / "checkpoints"
    on_cpu = not torch.cuda.is_available()
    args = GRPOConfig(
        output_dir=str(checkpoints),
        max_steps=cfg.steps,
        learning_rate=cfg.lr,
        beta=cfg.beta,
        num_generations=cfg.num_generations,
        per_device_train_batch_size=cfg.prompts_per_step * cfg.num_generations,
        max_completion_length=cfg.max_completion_length,
        temperature=cfg.temperature,
        save_strategy="steps",
        save_steps=cfg.checkpoint_every,
        save_total_limit=2,
        logging_steps=1,
        seed=cfg.seed,
        data_seed=cfg.seed,
        use_cpu=on_cpu,
        bf16=False,
        activation_checkpointing=False,  # TRL turns it on by default: 2x slower on these tiny models
        report_to=[],
        disable_tqdm=True,
    )
    progress = trainer_callback("rl")
    trainer = GRPOTrainer(
        model=str(policy),  # a path: with beta > 0 TRL reloads the reference model from it
        reward_funcs=reward,
        args=args,
        train_dataset=datasets.Dataset.from_list(rl_prompts(cfg, prompts)),
        processing_class=tokenizer,
        callbacks=[progress, guard(cfg)],
    )
    trainer.remove_callback(PrinterCallback)
    reward.model.to(trainer.accelerator.device)
    trainer.train(resume_from_checkpoint=last_complete_checkpoint(checkpoints))
    trainer.model.save_pretrained(out_dir / "model")
    tokenizer.save_pretrained(out_dir / "model")
    shutil.rmtree(checkpoints)
    curve = [{k: h.get(k) for k in ("step", "reward", "kl", "completions/mean_length", "loss")}
             for h in progress.history if "reward" in h]
    (out_dir / "curve.json").write_text(json.dumps(curve, indent=1))
    first, last = curve[: max(len(curve) // 5, 1)], curve[-max(len(curve) // 5, 1) :]

    def mean(rows, key):
        values = [r[key] for r in rows if r.get(key) is not None]
        return round(sum(values) / len(values), 4) if values else None

    return {"steps": len(curve), "reward_first": mean(first, "reward"), "reward_last": mean(last, "reward"),
            "kl_last": mean(last, "kl"), "length_last": mean(last, "completions/mean_length"), "curve": curve}


def reward_max_length(reward: store.StepRef) -> int:
    """The cut the reward model was trained with, from its manifest: rl reads each conversation the same way."""
    return json.loads((reward.dir / store.MANIFEST).read_text())["config"]["max_length"]


@task(name="rl", cache_policy=store.NO_PREFECT_CACHE, persist_result=False)
def rl_task(cfg: RLConfig, st: store.Store, sl_cai: store.StepRef, reward: store.StepRef, prompts_path: Path):
    from prefect.artifacts import create_table_artifact

    from data.world import read_prompts

    prompts = read_prompts(prompts_path)
    ref = st.run(
        "rl", cfg, inputs=[sl_cai, reward], files=[prompts_path], code=[__name__],
        work=lambda out: train_rl(cfg, sl_cai.dir / "model", reward.dir / "model", reward_max_length(reward), prompts,
                                  out),
    )
    create_table_artifact(ref.metrics.get("curve", []), key="rl-curve", description="rl: reward, KL, length per step")
    return store.prefect_state(ref)
