"""pretrain: next-token pretraining of a backbone on the world corpus, with exact resume.

One process trains in-process; `num_processes > 1` runs the same function under `accelerate launch` (one rank per
process, gloo on CPU). Checkpoints every N steps hold everything a bit-identical continuation needs: weights (with the
MoE routing biases, which are buffers), optimizer, scheduler, RNG states and the step, which fixes the data position.

MFU counts 6N + 12·L·d·T FLOPs per token (N: non-embedding parameters that a token passes through; the attention term
of PaLM, arXiv 2204.02311, appendix B) against the machine's matmul peak, measured once and kept.
"""

import json
import math
import os
import random
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from prefect import task
from pydantic import BaseModel, ConfigDict, Field

from tasks import store
from tasks.progress import Progress

PEAK_CACHE = Path.home() / ".cache" / "alignflow"


class PretrainConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str = Field("dense-tiny", description="a size name from models.SIZES")
    seq_len: int = Field(128, ge=8)
    batch_size: int = Field(16, ge=1)
    max_steps: int = Field(600, ge=1)
    lr: float = Field(3e-3, gt=0)
    warmup_steps: int = Field(30, ge=0)
    weight_decay: float = Field(0.01, ge=0)
    grad_clip: float = Field(1.0, gt=0)
    balancing: Literal["loss_free", "aux_loss", "none"] = Field("loss_free", description="MoE only")
    bias_gamma: float = Field(0.001, ge=0, description="loss-free balancing: bias update speed")
    aux_alpha: float = Field(0.01, ge=0, description="aux_loss balancing: sequence-wise balance loss weight")
    dtype: Literal["float32", "bfloat16"] = "float32"
    checkpoint_every: int = Field(100, ge=1)
    val_fraction: float = Field(0.02, gt=0, lt=0.5)
    num_processes: int = Field(1, ge=1)
    accelerate_config: Path | None = Field(None, description="an accelerate config file for multi-GPU or nodes")
    seed: int = 0


# ------------------------------------------------------------------------------------------------------------ data
def token_blocks(tokenizer, lines: list[str], seq_len: int) -> torch.Tensor:
    """Documents joined as <bos> doc <eos> ... and cut into rows of seq_len + 1 tokens (inputs and shifted labels)."""
    ids = []
    for encoded in tokenizer(lines, add_special_tokens=False)["input_ids"]:
        ids += [tokenizer.bos_token_id, *encoded, tokenizer.eos_token_id]
    rows = len(ids) // (seq_len + 1)
    return torch.tensor(ids[: rows * (seq_len + 1)]).view(rows, seq_len + 1)


def batch_rows(step: int, n_rows: int, batch_size: int, seed: int, rank: int = 0, world: int = 1) -> list[int]:
    """The rows of `step`'s batch on `rank`: a seeded permutation per epoch, so the step alone fixes the position."""
    per_step = batch_size * world
    epoch, offset = divmod(step * per_step, n_rows)
    order = torch.randperm(n_rows, generator=torch.Generator().manual_seed(seed * 7919 + epoch)).tolist()
    chosen = [order[(offset + i) % n_rows] for i in range(per_step)]
    return chosen[rank * batch_size : (rank + 1) * batch_size]


# ------------------------------------------------------------------------------------------------------------- MFU
def flops_per_token(non_embedding_params: int, n_layers: int, d_model: int, seq_len: int) -> float:
    """6N + 12 L d T: forward and backward matmuls of the weights, plus attention scores and values."""
    return 6 * non_embedding_params + 12 * n_layers * d_model * seq_len


def measure_gemm_peak(dtype: torch.dtype, device: str = "cpu", size: int = 2048) -> float:
    """FLOP/s of a large matmul on this machine, measured once per host, dtype and device and kept on disk."""
    key = f"peak-{socket.gethostname()}-{device}-{str(dtype).split('.')[-1]}-{torch.get_num_threads()}t.json"
    path = PEAK_CACHE / key
    if path.exists():
        return json.loads(path.read_text())["flops"]
    a = torch.randn(size, size, dtype=dtype, device=device)
    b = torch.randn(size, size, dtype=dtype, device=device)
    for _ in range(2):
        a @ b
    best = math.inf
    for _ in range(5):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        a @ b
        if device == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    flops = 2 * size**3 / best
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"flops": flops, "size": size}))
    return flops


def active_non_embedding_params(model) -> int:
    """Parameters a token passes through: routed experts count K of N, embeddings and MTP heads not at all."""
    config = model.config
    total = 0
    for name, p in model.named_parameters():
        if "embed" in name or "lm_head" in name or name.startswith("mtp"):
            continue
        if ".experts." in name and getattr(config, "n_routed_experts", 0):
            total += p.numel() * config.num_experts_per_tok // config.n_routed_experts
        else:
            total += p.numel()
    return total


# ------------------------------------------------------------------------------------------------------ checkpoints
def save_checkpoint(folder: Path, step: int, model, optimizer, scheduler, losses: list[float]) -> None:
    tmp = folder / f".step-{step}.tmp"
    tmp.mkdir(parents=True, exist_ok=True)
    torch.save({
        "step": step, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(), "losses": losses,
        "rng": {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()},
    }, tmp / "state.pt")
    tmp.rename(folder / f"step-{step}")  # a kill before this line leaves the previous checkpoint as the newest
    for old in sorted(folder.glob("step-*"), key=lambda p: int(p.name[5:]))[:-2]:
        shutil.rmtree(old)


def load_checkpoint(folder: Path, model, optimizer, scheduler) -> tuple[int, list[float]]:
    for stale in folder.glob(".step-*.tmp"):
        shutil.rmtree(stale)
    checkpoints = sorted(folder.glob("step-*"), key=lambda p: int(p.name[5:]))
    if not checkpoints:
        return 0, []
    state = torch.load(checkpoints[-1] / "state.pt", weights_only=False)
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["rng"]["torch"])
    random.setstate(state["rng"]["python"])
    np.random.set_state(state["rng"]["numpy"])
    return state["step"], state["losses"]


# --------------------------------------------------------------------------------------------------------- training
def build_model(cfg: PretrainConfig, tokenizer):
    import models

    if cfg.model not in models.SIZES:
        raise store.InputError(f"pretrain.model: unknown size {cfg.model!r} (sizes: {', '.join(models.SIZES)})")
    config = models.SIZES[cfg.model](vocab_size=len(tokenizer))
    config.pad_token_id, config.bos_token_id, config.eos_token_id = (
        tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id)
    if hasattr(config, "seq_aux_alpha"):  # the MoE: choose its balancing
        config.seq_aux_alpha = cfg.aux_alpha if cfg.balancing == "aux_loss" else 0.0
        config.bias_update_speed = cfg.bias_gamma if cfg.balancing == "loss_free" else 0.0
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_config(config)


def pretrain(cfg: PretrainConfig, *, tokenizer_dir: Path, corpus: Path, out_dir: Path, on_progress=None) -> dict:
    """Train, checkpointing into out_dir/checkpoints; save out_dir/model and the loss curve; return metrics."""
    if cfg.num_processes > 1 and "LOCAL_RANK" not in os.environ:
        return launch(cfg, tokenizer_dir=tokenizer_dir, corpus=corpus, out_dir=out_dir)
    from accelerate import Accelerator
    from transformers import AutoTokenizer, get_cosine_schedule_with_warmup

    from models.balancing import routing_stats, update_biases
    from tasks.tokenizer import read_corpus

    accelerator = Accelerator(cpu=not torch.cuda.is_available(),
                              mixed_precision="bf16" if cfg.dtype == "bfloat16" else "no")
    rank, world = accelerator.process_index, accelerator.num_processes
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    blocks = token_blocks(tokenizer, read_corpus(corpus), cfg.seq_len)
    n_val = max(1, int(len(blocks) * cfg.val_fraction))
    train_blocks, val_blocks = blocks[:-n_val], blocks[-n_val:]
    model = build_model(cfg, tokenizer)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.95))
    scheduler = get_cosine_schedule_with_warmup(optimizer, cfg.warmup_steps, cfg.max_steps)
    checkpoints = out_dir / "checkpoints"
    start, losses = load_checkpoint(checkpoints, model, optimizer, scheduler)
    model, optimizer = accelerator.prepare(model, optimizer)
    unwrapped = accelerator.unwrap_model(model)
    is_moe = hasattr(unwrapped.config, "n_routed_experts")
    progress = Progress(f"pretrain {cfg.model}", cfg.max_steps, unit="step") if rank == 0 else None
    moe_log, tokens, started = [], 0, time.perf_counter()
    model.train()
    for step in range(start, cfg.max_steps):
        rows = train_blocks[batch_rows(step, len(train_blocks), cfg.batch_size, cfg.seed, rank, world)]
        rows = rows.to(accelerator.device)
        loss = model(input_ids=rows[:, :-1], labels=rows[:, :-1]).loss
        if not torch.isfinite(loss):
            raise FloatingPointError(f"pretrain {cfg.model}: loss is {loss.item()} at step {step + 1}; the last good "
                                     f"checkpoint is kept in {checkpoints}")
        accelerator.backward(loss)
        accelerator.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if is_moe:
            violations = update_biases(unwrapped, unwrapped.config.bias_update_speed)
            moe_log.append({"step": step + 1, "max_vio": violations})
        losses.append(accelerator.reduce(loss.detach(), "mean").item())
        tokens += rows.numel() * world
        if progress is not None:
            progress(step + 1, cfg.max_steps, {"loss": losses[-1]})
        if on_progress is not None and rank == 0:
            on_progress(step + 1, cfg.max_steps, {"loss": losses[-1]})
        if (step + 1) % cfg.checkpoint_every == 0 and step + 1 < cfg.max_steps and accelerator.is_main_process:
            save_checkpoint(checkpoints, step + 1, unwrapped, optimizer, scheduler, losses)
        accelerator.wait_for_everyone()
    seconds = time.perf_counter() - started
    if progress is not None:
        progress.close()
    metrics = {"final_loss": round(float(np.mean(losses[-10:])), 4), "steps": cfg.max_steps}
    metrics["val_loss"] = round(validation_loss(unwrapped, val_blocks, accelerator.device), 4)
    if tokens:
        throughput = tokens / seconds
        peak = measure_gemm_peak(torch.bfloat16 if cfg.dtype == "bfloat16" else torch.float32,
                                 "cuda" if torch.cuda.is_available() else "cpu")
        per_token = flops_per_token(active_non_embedding_params(unwrapped), unwrapped.config.num_hidden_layers,
                                    unwrapped.config.hidden_size, cfg.seq_len)
        metrics.update({"tokens_per_s": round(throughput, 1), "mfu": round(throughput * per_token / peak, 4),
                        "peak_flops": round(peak)})
    if is_moe:
        stats = routing_stats(unwrapped)
        tail = [max(r["max_vio"]) for r in moe_log[-max(len(moe_log) // 5, 1) :] if r["max_vio"]]
        metrics.update({"max_vio_last20pct": round(float(np.mean(tail)), 4) if tail else None,
                        "expert_loads": stats["loads"],
                        "bias_norms": [round(g.e_score_correction_bias.norm().item(), 5)
                                       for g in unwrapped.modules() if hasattr(g, "e_score_correction_bias")]})
        from models.moe import mla_kv_elements_per_token

        c = unwrapped.config
        element = 2 if cfg.dtype == "bfloat16" else 4
        metrics["kv_bytes_per_token"] = element * mla_kv_elements_per_token(c.kv_lora_rank, c.qk_rope_head_dim,
                                                                            c.num_hidden_layers)
    if accelerator.is_main_process:
        unwrapped.save_pretrained(out_dir / "model")
        tokenizer.save_pretrained(out_dir / "model")
        write_curve(out_dir, losses, moe_log)
        (out_dir / "ranks").mkdir(exist_ok=True)
    accelerator.wait_for_everyone()
    (out_dir / "ranks" / f"rank-{rank}.json").write_text(json.dumps({"rank": rank, "world": world,
                                                                     "final_loss": losses[-1]}))
    if accelerator.is_main_process and checkpoints.exists():
        shutil.rmtree(checkpoints)
    return metrics


@torch.inference_mode()
def validation_loss(model, blocks: torch.Tensor, device, batch_size: int = 16) -> float:
    model.eval()
    total = 0.0
    for start in range(0, len(blocks), batch_size):
        rows = blocks[start : start + batch_size].to(device)
        total += model(input_ids=rows[:, :-1], labels=rows[:, :-1]).loss.item() * len(rows)
    model.train()
    return total / len(blocks)


def write_curve(out_dir: Path, losses: list[float], moe_log: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(out_dir / "loss.csv", "w") as f:
        f.write("step,loss,max_vio\n")
        for i, loss in enumerate(losses):
            vio = max(moe_log[i]["max_vio"]) if i < len(moe_log) and moe_log[i]["max_vio"] else ""
            f.write(f"{i + 1},{loss:.6f},{vio}\n")
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(range(1, len(losses) + 1), losses)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    fig.tight_layout()
    fig.savefig(out_dir / "loss.png", dpi=100)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------------- multi-process
def launch(cfg: PretrainConfig, *, tokenizer_dir: Path, corpus: Path, out_dir: Path) -> dict:
    """Run this module under `accelerate launch`, stream every rank's log lines, fail naming the rank that failed."""
    config_file = out_dir / "pretrain_config.json"
    config_file.write_text(cfg.model_dump_json())
    if cfg.accelerate_config:
        launcher = ["--config_file", str(cfg.accelerate_config)]
    else:  # --cpu would silently run one process: --multi_gpu with gloo gives real ranks on CPU
        launcher = ["--multi_gpu", "--num_processes", str(cfg.num_processes), "--num_machines", "1",
                    "--main_process_port", str(free_port())]
    command = [sys.executable, "-m", "accelerate.commands.launch", *launcher, "-m", "tasks.pretrain",
               "--config", str(config_file), "--tokenizer", str(tokenizer_dir), "--corpus", str(corpus),
               "--out", str(out_dir)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "" if torch.cuda.is_available() else "1",
           "PYTHONUNBUFFERED": "1"}
    import logging

    log = logging.getLogger("alignflow.pretrain")
    with subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as proc:
        tail = []
        for line in proc.stdout:
            log.info(line.rstrip())
            tail = (tail + [line.rstrip()])[-20:]
    if proc.returncode != 0:
        failed = next((line for line in reversed(tail) if "rank" in line.lower()), tail[-1] if tail else "")
        raise RuntimeError(f"accelerate launch exited {proc.returncode}: {failed}")
    return json.loads((out_dir / "metrics.json").read_text())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    import argparse

    parser = argparse.ArgumentParser(description="one rank of the pretrain step (run by accelerate launch)")
    parser.add_argument("--config", type=Path, required=True)
    parser.add_argument("--tokenizer", type=Path, required=True)
    parser.add_argument("--corpus", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    cfg = PretrainConfig.model_validate_json(args.config.read_text())
    metrics = pretrain(cfg, tokenizer_dir=args.tokenizer, corpus=args.corpus, out_dir=args.out)
    if int(os.environ.get("RANK", "0")) == 0:
        (args.out / "metrics.json").write_text(json.dumps(metrics))


@task(name="pretrain", cache_policy=store.NO_PREFECT_CACHE, persist_result=False)
def pretrain_task(step: str, cfg: PretrainConfig, st: store.Store, tokenizer: store.StepRef, corpus: Path):
    ref = st.run(step, cfg, inputs=[tokenizer], files=[corpus], code=[__name__],
                 work=lambda out: pretrain(cfg, tokenizer_dir=tokenizer.dir, corpus=corpus, out_dir=out))
    return store.prefect_state(ref)


if __name__ == "__main__":
    main()
