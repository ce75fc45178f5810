"""pretrain: next-token pretraining of a backbone, with exact resume: the text backbones on the world corpus, the
multimodal one on the world's rendered images, audio and videos with their captions and question/answer pairs.

The two differ only in their data (CorpusBlocks, RenderedWorld: a batch from the step number alone); one loop trains
both. One process trains in-process; `num_processes > 1` (or an accelerate config file) runs this same function under
`accelerate launch`, one rank per process (gloo on CPU). Checkpoints are `accelerator.save_state` folders written
under a temporary name and renamed: weights (with the MoE routing biases, which are buffers), optimizer, scheduler,
every rank's RNG states, and the step, which alone fixes the data position (batches are a seeded permutation).

MFU = achieved model FLOP/s / the machine's matmul peak, measured once per machine and kept (measure_gemm_peak).
"""

import hashlib
import json
import logging
import math
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from prefect import task
from pydantic import BaseModel, ConfigDict, Field, field_validator

from data.graders import COPY_FORMED, COPY_GAPS, copying
from tasks import store
from tasks.progress import Progress

PEAK_CACHE = Path.home() / ".cache" / "alignflow"
log = logging.getLogger("alignflow.pretrain")


class PretrainConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str = Field("dense-tiny", description="a size name from models.SIZES")
    seq_len: int = Field(128, ge=8)
    batch_size: int = Field(16, ge=1, description="sequences per rank per step")
    max_steps: int = Field(600, ge=1)
    lr: float = Field(3e-3, gt=0, le=1)
    warmup_steps: int = Field(30, ge=0)
    weight_decay: float = Field(0.01, ge=0)
    grad_clip: float = Field(1.0, gt=0)
    balancing: Literal["loss_free", "aux_loss", "none"] = Field("loss_free", description="DeepSeek MoE only (the "
                                                                "multimodal softmax router has its Switch loss)")
    bias_gamma: float = Field(0.001, ge=0, description="loss_free: bias update speed (DeepSeek-V3 sec. 4.2)")
    aux_alpha: float = Field(0.01, ge=0, description="aux_loss: weight of the sequence-wise balance loss")
    dtype: Literal["float32", "bfloat16"] = "float32"
    checkpoint_every: int = Field(100, ge=1)
    log_every: int = Field(50, ge=1)
    val_fraction: float = Field(0.02, gt=0, lt=0.5, description="of the corpus rows; for the multimodal backbone, "
                                "held-out batches as a fraction of max_steps")
    num_processes: int = Field(1, ge=1)
    accelerate_config: Path | None = Field(None, description="an accelerate config file (GPUs, nodes, FSDP); "
                                           "it sets the number of processes, not num_processes")
    seed: int = 0

    @field_validator("model")
    @classmethod
    def known_size(cls, name: str) -> str:
        import models

        if name not in models.SIZES:
            raise ValueError(f"unknown size {name!r}; sizes: {', '.join(models.SIZES)}")
        return name

    @field_validator("accelerate_config")
    @classmethod
    def config_exists(cls, path: Path | None) -> Path | None:
        if path is not None and not path.is_file():
            raise ValueError(f"no such file: {path}")
        return path


# ------------------------------------------------------------------------------------------------------------ data
def is_multimodal(cfg: PretrainConfig) -> bool:
    import models
    from models.multimodal import MultimodalConfig

    return isinstance(models.SIZES[cfg.model](), MultimodalConfig)


def token_blocks(tokenizer, lines: list[str], seq_len: int) -> torch.Tensor:
    """Documents joined as <bos> doc <eos> <bos> doc ... and cut into rows of seq_len tokens (the tail is dropped).
    A row is its own labels: the model's loss shifts them by one."""
    ids = []
    for encoded in tokenizer(lines, add_special_tokens=False)["input_ids"]:
        ids += [tokenizer.bos_token_id, *encoded, tokenizer.eos_token_id]
    rows = len(ids) // seq_len
    if rows < 2:
        raise store.InputError(f"the corpus holds {len(ids)} tokens: fewer than two rows of seq_len={seq_len}")
    return torch.tensor(ids[: rows * seq_len]).view(rows, seq_len)


def batch_rows(step: int, n_rows: int, batch_size: int, seed: int, rank: int = 0, world: int = 1) -> list[int]:
    """The rows of `step`'s batch on `rank`: one seeded permutation per epoch, so the step alone fixes the data
    position (nothing about the data needs checkpointing), and the ranks take disjoint slices of a global batch."""
    per_step = batch_size * world
    chosen = []
    for i in range(step * per_step + rank * batch_size, step * per_step + (rank + 1) * batch_size):
        epoch, offset = divmod(i, n_rows)
        order = torch.randperm(n_rows, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
        chosen.append(int(order[offset]))
    return chosen


class CorpusBlocks:
    """The world corpus as token_blocks rows, the last val_fraction of them held out."""

    def __init__(self, cfg: PretrainConfig, tokenizer, corpus: Path):
        from tasks.tokenizer import read_corpus

        self.cfg, self.tokenizer = cfg, tokenizer
        blocks = token_blocks(tokenizer, read_corpus(corpus), cfg.seq_len)
        n_val = max(1, int(len(blocks) * cfg.val_fraction))
        self.train, self.val = blocks[:-n_val], blocks[-n_val:]

    def batch(self, step: int, rank: int, world: int) -> dict:
        rows = self.train[batch_rows(step, len(self.train), self.cfg.batch_size, self.cfg.seed, rank, world)]
        return {"input_ids": rows, "labels": rows}

    def validation_batches(self):
        for start in range(0, len(self.val), self.cfg.batch_size):
            rows = self.val[start : start + self.cfg.batch_size]
            yield {"input_ids": rows, "labels": rows}

    def save(self, directory: Path) -> None:
        self.tokenizer.save_pretrained(directory)


class RenderedWorld:
    """The multimodal world (data/multimodal.py): global batch `step` is world batches step * world .. of the train
    split, one per rank, rendered on demand, so the step alone fixes the data position as in CorpusBlocks. The world
    is fixed by its own seed; cfg.seed changes the initial weights. Validation: the first val_fraction * max_steps
    batches of the held-out split (attribute combinations never trained on)."""

    def __init__(self, cfg: PretrainConfig, processor):
        self.cfg, self.processor = cfg, processor

    def batch(self, step: int, rank: int, world: int) -> dict:
        from data.multimodal import pretraining_batch

        return pretraining_batch("train", self.processor, step * world + rank, self.cfg.batch_size)

    def validation_batches(self):
        from data.multimodal import pretraining_batch

        for index in range(max(1, int(self.cfg.val_fraction * self.cfg.max_steps))):
            yield pretraining_batch("heldout", self.processor, index, self.cfg.batch_size)

    def save(self, directory: Path) -> None:
        self.processor.save_pretrained(directory)


# ------------------------------------------------------------------------------------------------------------- MFU
def flops_per_token(matmul_params: int, n_layers: int, qk_width: int, v_width: int, seq_len: int) -> float:
    """6 N + 6 L T (d_qk + d_v): training FLOPs per token (PaLM, arXiv 2204.02311, appendix B: 6N + 12 L H Q T).
    6N is forward (2N) and backward (4N) through the weights; attention adds Q.K^T and A.V, each 2 T d forward and
    twice that backward per layer. With d_qk = d_v = H Q it is PaLM's 12 L H Q T; MLA's query/key heads are wider
    than its value heads (d_h + d_h^R vs d_v), so they are counted apart. The causal mask is not discounted (as PaLM)."""
    return 6 * matmul_params + 6 * n_layers * seq_len * (qk_width + v_width)


def matmul_params(model) -> int:
    """N of flops_per_token: the weights a token is multiplied with. The input embedding is a lookup, not a matmul;
    the output projection is counted (even when tied to it) once per head that applies it (the MTP modules reuse it);
    a routed expert's weights count K_r / N_r (each token visits K_r of the N_r experts). The multimodal encoders
    are counted as if every token went through them: they are ~2% of its weights."""
    config = model.config
    n_experts = getattr(config, "n_routed_experts", None) or getattr(config, "num_experts", None)
    embedding, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    heads = 1 + len(getattr(model, "mtp", []))
    total = head.numel() * heads
    for name, p in model.named_parameters():
        if p is embedding or p is head:
            continue
        if ".experts." in name:
            total += p.numel() * config.num_experts_per_tok // n_experts
        else:
            total += p.numel()
    return total


def attention_widths(config) -> tuple[int, int]:
    """(d_qk, d_v) summed over heads, for the attention term of flops_per_token."""
    if hasattr(config, "kv_lora_rank"):  # MLA
        return (config.num_attention_heads * (config.qk_nope_head_dim + config.qk_rope_head_dim),
                config.num_attention_heads * config.v_head_dim)
    width = config.num_attention_heads * (getattr(config, "head_dim", None) or
                                          config.hidden_size // config.num_attention_heads)
    return width, width


def measure_gemm_peak(dtype: torch.dtype, device: str = "cpu", cache_dir: Path = PEAK_CACHE,
                      size: int = 2048) -> float:
    """The machine's dense matmul FLOP/s (2 n^3 per n x n product; best of several), measured once per host,
    device, dtype and thread count, and kept in a small JSON under cache_dir."""
    name = torch.cuda.get_device_name().replace(" ", "_") if device == "cuda" else f"{torch.get_num_threads()}t"
    path = cache_dir / f"peak-{socket.gethostname()}-{device}-{name}-{str(dtype).split('.')[-1]}.json"
    if path.exists():
        return json.loads(path.read_text())["flops"]
    size = 8192 if device == "cuda" else size  # a GPU needs a bigger product to reach its peak
    a = torch.randn(size, size, dtype=dtype, device=device)
    b = torch.randn(size, size, dtype=dtype, device=device)
    best = math.inf
    for i in range(8):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        a @ b
        if device == "cuda":
            torch.cuda.synchronize()
        if i >= 2:  # the first products warm caches and pick kernels
            best = min(best, time.perf_counter() - start)
    flops = 2 * size**3 / best
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"flops": flops, "size": size, "dtype": str(dtype), "device": device}))
    tmp.rename(path)
    return flops


# ------------------------------------------------------------------------------------------------------ checkpoints
class TrainState:
    """What the loop itself carries between steps; saved with each checkpoint through register_for_checkpointing."""

    def __init__(self):
        self.step, self.losses, self.moe = 0, [], []

    def state_dict(self) -> dict:
        return {"step": self.step, "losses": self.losses, "moe": self.moe}

    def load_state_dict(self, state: dict) -> None:
        self.step, self.losses, self.moe = state["step"], state["losses"], state["moe"]


def checkpoint_steps(folder: Path) -> list[int]:
    """Steps of the complete checkpoints, oldest first: only a renamed `step-<N>` folder is complete."""
    return sorted(int(p.name[5:]) for p in folder.glob("step-*")) if folder.is_dir() else []


def save_checkpoint(accelerator, folder: Path, step: int) -> None:
    """Every rank writes into `.step-<N>.tmp`; then rank 0 renames it, so a kill at any moment leaves the previous
    checkpoint as the newest complete one, and removes the older ones."""
    tmp = folder / f".step-{step}.tmp"
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        tmp.rename(folder / f"step-{step}")
        for old in checkpoint_steps(folder)[:-1]:
            shutil.rmtree(folder / f"step-{old}")
    accelerator.wait_for_everyone()


def resume(accelerator, folder: Path) -> int:
    """Load the newest complete checkpoint (model, optimizer, scheduler, RNG, TrainState); return its step."""
    steps = checkpoint_steps(folder)
    if not steps:
        return 0
    accelerator.load_state(str(folder / f"step-{steps[-1]}"))
    return steps[-1]


# --------------------------------------------------------------------------------------------------------- training
def build_model(cfg: PretrainConfig, tokenizer):
    """The backbone named by cfg.model, sized to the tokenizer, with the MoE's balancing chosen by cfg.balancing."""
    from transformers import AutoModelForCausalLM

    import models

    config = models.SIZES[cfg.model](vocab_size=len(tokenizer))
    config.pad_token_id, config.bos_token_id, config.eos_token_id = (
        tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id)
    if hasattr(config, "n_routed_experts"):
        config.seq_aux_alpha = cfg.aux_alpha if cfg.balancing == "aux_loss" else 0.0
        config.bias_update_speed = cfg.bias_gamma if cfg.balancing == "loss_free" else 0.0
    return AutoModelForCausalLM.from_config(config)


def lm_loss(out) -> torch.Tensor:
    """The next-token loss alone: the MoEs' training losses also hold their balance loss and MTP loss."""
    loss = out.loss
    for extra in (getattr(out, "aux_loss", None), getattr(out, "mtp_loss", None)):
        if extra is not None:
            loss = loss - extra
    return loss


def moe_layers(model) -> list:
    """The routing modules: DeepSeek's gates (models/moe.py) or the multimodal softmax routers."""
    from models.moe import Gate
    from models.multimodal import SparseMoE

    return [m for m in model.modules() if isinstance(m, (Gate, SparseMoE))]


def routing_bias(layer) -> torch.Tensor:
    """DeepSeek's expert-selection bias b_i, or the softmax router's b_r."""
    return layer.e_score_correction_bias if hasattr(layer, "e_score_correction_bias") else layer.router.bias


def routing_step(accelerator, model, layers: list) -> dict:
    """After an optimizer step: each MoE layer's expert loads over the global batch, its MaxVio and bias norm.
    DeepSeek gates first move their loss-free biases (update_biases all-reduces their loads in place)."""
    from models.balancing import max_violation, update_biases
    from models.moe import Gate

    loads = [layer.load_since_update for layer in layers]
    if isinstance(layers[0], Gate):
        update_biases(model, model.config.bias_update_speed)
    else:
        loads = [accelerator.reduce(load, "sum") for load in loads]
        for layer in layers:
            layer.load_since_update = None
    return {"loads": [load.tolist() for load in loads], "max_vio": [max_violation(load) for load in loads],
            "bias_norm": [routing_bias(layer).norm().item() for layer in layers]}


def pretrain(cfg: PretrainConfig, *, tokenizer_dir: Path, corpus: Path | None, out_dir: Path, on_progress=None,
             peak_cache: Path = PEAK_CACHE) -> dict:
    """Train, checkpointing into out_dir/checkpoints and resuming from the newest one; save out_dir/model (weights
    and tokenizer, or processor), loss.csv, loss.png and metrics.json; return the metrics. The multimodal backbone
    reads no corpus (corpus=None). on_progress(step, total, metrics) is called on rank 0 after every step."""
    if (cfg.num_processes > 1 or cfg.accelerate_config) and "LOCAL_RANK" not in os.environ:
        return launch(cfg, tokenizer_dir=tokenizer_dir, corpus=corpus, out_dir=out_dir, on_progress=on_progress)
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from transformers import AutoTokenizer, get_cosine_schedule_with_warmup

    from models.multimodal import MultimodalProcessor

    out_dir = Path(out_dir)
    # bf16 is autocast around the forward below (fp32 master weights), not Accelerator(mixed_precision=...): the
    # accelerator's state is one per process and refuses a second precision, and the pipeline trains several models.
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    rank, world = accelerator.process_index, accelerator.num_processes
    set_seed(cfg.seed)  # python, numpy and torch: the same initial weights on every rank
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    model = build_model(cfg, tokenizer)
    if is_multimodal(cfg):
        data = RenderedWorld(cfg, MultimodalProcessor(tokenizer, model.config))
    else:
        data = CorpusBlocks(cfg, tokenizer, corpus)
    # No weight decay on norms and biases (1-D), as GPT-2/3 and Llama.
    optimizer = torch.optim.AdamW([
        {"params": [p for p in model.parameters() if p.dim() >= 2], "weight_decay": cfg.weight_decay},
        {"params": [p for p in model.parameters() if p.dim() < 2], "weight_decay": 0.0},
    ], lr=cfg.lr, betas=(0.9, 0.95))
    scheduler = get_cosine_schedule_with_warmup(optimizer, cfg.warmup_steps, cfg.max_steps)
    # The scheduler is registered, not prepared: a prepared one steps num_processes times per optimizer step.
    model, optimizer = accelerator.prepare(model, optimizer)
    state = TrainState()
    accelerator.register_for_checkpointing(scheduler, state)
    checkpoints = out_dir / "checkpoints"
    if accelerator.is_main_process:
        checkpoints.mkdir(parents=True, exist_ok=True)
        for stale in checkpoints.glob(".step-*.tmp"):  # cut short by a kill: never complete
            shutil.rmtree(stale)
    accelerator.wait_for_everyone()
    start = resume(accelerator, checkpoints)
    log.info("rank %d of %d: training %s from step %d%s", rank, world, cfg.model, start,
             f" (resumed from {checkpoints})" if start else "")
    unwrapped = accelerator.unwrap_model(model)
    routers = moe_layers(unwrapped)
    progress = Progress(f"pretrain {cfg.model}", cfg.max_steps, unit="step") if rank == 0 else None
    step_seconds, step_shapes = [], []  # per step: seconds, and the (rows, positions) of this rank's batch
    model.train()
    for step in range(start, cfg.max_steps):
        began = time.perf_counter()
        batch = {k: v.to(accelerator.device) for k, v in data.batch(step, rank, world).items()}
        with torch.autocast(accelerator.device.type, torch.bfloat16, enabled=cfg.dtype == "bfloat16"):
            out = model(**batch)
        loss = out.loss
        if not torch.isfinite(loss):
            kept = checkpoint_steps(checkpoints)
            raise FloatingPointError(
                f"pretrain {cfg.model}: loss is {loss.item()} at step {step + 1}; stopped before updating the "
                f"weights. Last good checkpoint: {checkpoints / f'step-{kept[-1]}' if kept else 'none'}")
        accelerator.backward(loss)
        accelerator.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if routers:
            state.moe.append(routing_step(accelerator, unwrapped, routers))
        state.losses.append(accelerator.reduce(lm_loss(out).detach().float(), "mean").item())
        state.step = step + 1
        step_seconds.append(time.perf_counter() - began)
        step_shapes.append(tuple(batch["input_ids"].shape))
        shown = {"loss": state.losses[-1]}
        if state.moe:
            shown["max_vio"] = float(np.mean(state.moe[-1]["max_vio"]))
        if progress is not None:
            progress(state.step, cfg.max_steps, shown)
        if on_progress is not None and rank == 0:
            on_progress(state.step, cfg.max_steps, shown)
        if rank == 0 and (state.step % cfg.log_every == 0 or state.step == cfg.max_steps):
            log.info("pretrain %s step %d/%d %s", cfg.model, state.step, cfg.max_steps,
                     " ".join(f"{k}={v:.4f}" for k, v in shown.items()))
        if state.step % cfg.checkpoint_every == 0 and state.step < cfg.max_steps:
            save_checkpoint(accelerator, checkpoints, state.step)
    if progress is not None:
        progress.close()

    metrics = {"steps": cfg.max_steps, "final_loss": round(float(np.mean(state.losses[-10:])), 4),
               "val_loss": round(validation_loss(unwrapped, data.validation_batches(), accelerator.device), 4),
               "parameters": sum(p.numel() for p in unwrapped.parameters())}
    if not is_multimodal(cfg):
        metrics.update(copying(unwrapped, tokenizer))
        weakest = min(metrics[f"copy_accuracy_gap{gap}"] for gap in COPY_GAPS)
        if weakest < COPY_FORMED and rank == 0:
            log.warning("pretrain %s: the backbone copies new copy drills only %.2f of the time (at least %.2f once "
                        "the copying circuit has formed); sft needs the circuit to look values up (data/graders.py). "
                        "Pretrain longer (max_steps) or with another seed.", cfg.model, weakest, COPY_FORMED)
    skip = 2 if len(step_seconds) > 4 else 0  # the first steps warm up kernels
    timed, shapes = step_seconds[skip:], step_shapes[skip:]
    if timed:
        # Every position a batch computes counts, padding included; the multimodal batches vary in length.
        throughput = sum(rows * positions for rows, positions in shapes) * world / sum(timed)
        peak = measure_gemm_peak(torch.bfloat16 if cfg.dtype == "bfloat16" else torch.float32,
                                 accelerator.device.type, peak_cache)
        qk, v = attention_widths(unwrapped.config)
        seq_len = round(float(np.mean([positions for _, positions in shapes])))
        per_token = flops_per_token(matmul_params(unwrapped), unwrapped.config.num_hidden_layers, qk, v, seq_len)
        metrics.update({"tokens_per_s": round(throughput, 1), "flops_per_token": per_token,
                        "peak_flops": round(peak), "mfu": round(throughput * per_token / (peak * world), 4)})
    if routers:
        metrics.update(moe_metrics(state.moe, routers))
    c = unwrapped.config
    if hasattr(c, "kv_lora_rank"):  # MLA
        from models.moe import mla_kv_elements_per_token

        element = 2 if cfg.dtype == "bfloat16" else 4
        metrics["kv_bytes_per_token"] = element * mla_kv_elements_per_token(c.kv_lora_rank, c.qk_rope_head_dim,
                                                                            c.num_hidden_layers)
    if accelerator.is_main_process:
        unwrapped.save_pretrained(out_dir / "model")
        data.save(out_dir / "model")
        write_curve(out_dir, state.losses, state.moe)
        (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
        (out_dir / "ranks").mkdir(exist_ok=True)
    accelerator.wait_for_everyone()
    # Each rank leaves a marker with a digest of its weights: ranks that trained in step hold identical ones.
    (out_dir / "ranks" / f"rank-{rank}.json").write_text(json.dumps(
        {"rank": rank, "world": world, "weights_sha256": weights_digest(unwrapped), "last_loss": state.losses[-1]}))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        shutil.rmtree(checkpoints)  # the final model is saved; checkpoints only serve a rerun of an unfinished run
    accelerator.end_training()
    return metrics


def moe_metrics(history: list[dict], layers) -> dict:
    """Routing over the last 20% of steps: MaxVio (mean over MoE layers, then over steps), each layer's share of the
    assignments per expert, and each layer's final bias norm."""
    tail = history[-max(len(history) // 5, 1):]
    loads = np.sum([r["loads"] for r in tail], axis=0)  # (layers, experts)
    return {"max_vio_last20pct": round(float(np.mean([np.mean(r["max_vio"]) for r in tail])), 4),
            "expert_loads": np.round(loads / loads.sum(-1, keepdims=True), 4).tolist(),
            "bias_norms": [round(routing_bias(layer).norm().item(), 5) for layer in layers]}


@torch.inference_mode()
def validation_loss(model, batches, device) -> float:
    """Mean next-token cross-entropy over the held-out batches' labelled tokens (the LM loss only, for every
    backbone; -100 marks media slots and padding)."""
    model.eval()
    total, count = 0.0, 0
    for batch in batches:
        batch = {k: v.to(device) for k, v in batch.items()}
        labels = batch.pop("labels")[:, 1:]
        logits = model(**batch, use_cache=False).logits[:, :-1].float()
        total += F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100, reduction="sum").item()
        count += int((labels != -100).sum())
    model.train()
    return total / count


def weights_digest(model) -> str:
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def write_curve(out_dir: Path, losses: list[float], moe: list[dict]) -> None:
    """loss.csv (step, loss, and for the MoE each step's MaxVio and bias norm averaged over layers) and loss.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(out_dir / "loss.csv", "w") as f:
        f.write("step,loss,max_vio,bias_norm\n" if moe else "step,loss\n")
        for i, loss in enumerate(losses):
            extra = f",{np.mean(moe[i]['max_vio']):.6f},{np.mean(moe[i]['bias_norm']):.6f}" if moe else ""
            f.write(f"{i + 1},{loss!r}{extra}\n")
    fig, axes = plt.subplots(1, 2 if moe else 1, figsize=(10 if moe else 6, 3.5), squeeze=False)
    axes[0, 0].plot(range(1, len(losses) + 1), losses)
    axes[0, 0].set(xlabel="step", ylabel="training loss (next token)", yscale="log")
    if moe:
        axes[0, 1].plot(range(1, len(moe) + 1), [np.mean(r["max_vio"]) for r in moe])
        axes[0, 1].set(xlabel="step", ylabel="MaxVio (mean over MoE layers)")
    fig.tight_layout()
    fig.savefig(out_dir / "loss.png", dpi=100)
    plt.close(fig)


def publish(out_dir: Path, metrics: dict) -> None:
    """Inside a Prefect task run: the metrics and the loss curve (every ~100th step) as table artifacts."""
    from prefect.artifacts import create_table_artifact
    from prefect.context import TaskRunContext

    if TaskRunContext.get() is None:
        return
    flat = {k: v for k, v in metrics.items() if not isinstance(v, list)}
    create_table_artifact([{"metric": k, "value": v} for k, v in flat.items()], description="pretrain: metrics")
    lines = (out_dir / "loss.csv").read_text().splitlines()
    header, rows = lines[0].split(","), [line.split(",") for line in lines[1:]]
    keep = rows[:: max(len(rows) // 100, 1)] + rows[-1:]
    # out_dir is still the store's work directory here: it is renamed once the step completes, so no path.
    create_table_artifact([{h: float(v) if v else None for h, v in zip(header, r, strict=True)} for r in keep],
                          description="pretrain: loss curve (plotted in loss.png in the step's output directory)")


# ---------------------------------------------------------------------------------------------------- multi-process
def launch(cfg: PretrainConfig, *, tokenizer_dir: Path, corpus: Path | None, out_dir: Path, on_progress=None) -> dict:
    """Run `python -m tasks.pretrain` under `accelerate launch`, stream the ranks' log lines, and fail naming every
    rank that failed (each rank writes ranks/rank-<N>.error before it exits). Progress comes from rank 0's log
    lines, so every log_every steps."""
    out_dir = Path(out_dir)
    (out_dir / "ranks").mkdir(parents=True, exist_ok=True)
    for old in (out_dir / "ranks").glob("rank-*"):
        old.unlink()
    config_file = out_dir / "pretrain_config.json"
    config_file.write_text(cfg.model_dump_json())
    command = launch_command(cfg, config_file, tokenizer_dir=tokenizer_dir, corpus=corpus, out_dir=out_dir)
    # One thread per rank: ranks that each take every core run ~30x slower on a small machine.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    logger = run_logger()
    progress = Progress(f"pretrain {cfg.model} ({cfg.num_processes} processes)", cfg.max_steps, unit="step")
    with subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as proc:
        tail = []
        for line in proc.stdout:
            if not line.strip():
                continue
            logger.info(line.rstrip())
            tail = [*tail[-19:], line.rstrip()]
            if done := re.match(r"\[rank 0\] pretrain \S+ step (\d+)/\d+ loss=(\S+)", line):
                progress(int(done[1]), cfg.max_steps, {"loss": float(done[2])})
                if on_progress is not None:
                    on_progress(int(done[1]), cfg.max_steps, {"loss": float(done[2])})
    progress.close()
    errors = sorted((out_dir / "ranks").glob("rank-*.error"))
    if proc.returncode != 0 or errors:
        if errors:
            reasons = "; ".join(f"{e.stem}: {e.read_text().strip()}" for e in errors)
        else:
            reasons = "no rank reported an error; last lines:\n" + "\n".join(tail)
        raise RuntimeError(f"pretrain under accelerate launch exited {proc.returncode}: {reasons}")
    metrics = json.loads((out_dir / "metrics.json").read_text())
    publish(out_dir, metrics)
    return metrics


def launch_command(cfg: PretrainConfig, config_file: Path, *, tokenizer_dir: Path, corpus: Path | None,
                   out_dir: Path) -> list[str]:
    """accelerate launch of this module: with cfg.accelerate_config as it is (it sets the processes, machines and
    backend), else N local processes."""
    if cfg.accelerate_config:
        launcher = ["--config_file", str(cfg.accelerate_config)]
    else:  # --cpu would silently run one process; --multi_gpu without a GPU gives gloo ranks on the CPU
        launcher = ["--multi_gpu", "--num_processes", str(cfg.num_processes), "--num_machines", "1",
                    "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port())]
    return [sys.executable, "-m", "accelerate.commands.launch", *launcher, "-m", "tasks.pretrain",
            "--config", str(config_file), "--tokenizer", str(tokenizer_dir),
            *(["--corpus", str(corpus)] if corpus else []), "--out", str(out_dir)]


def run_logger():
    from prefect.exceptions import MissingContextError
    from prefect.logging import get_run_logger

    try:
        return get_run_logger()
    except MissingContextError:
        return log


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    """One rank (under accelerate launch) or a whole single-process run: python -m tasks.pretrain --config ..."""
    import argparse

    parser = argparse.ArgumentParser(description="the pretrain step's training function, from the command line")
    parser.add_argument("--config", type=Path, required=True, help="a JSON PretrainConfig")
    parser.add_argument("--tokenizer", type=Path, required=True)
    parser.add_argument("--corpus", type=Path, help="the text backbones' corpus")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    rank = int(os.environ.get("RANK", "0"))
    # Our own handler: Prefect has configured the root logger by now, and the launcher reads stdout line by line.
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter(f"[rank {rank}] %(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False
    if "OMP_NUM_THREADS" in os.environ:
        torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    cfg = PretrainConfig.model_validate_json(args.config.read_text())
    try:
        pretrain(cfg, tokenizer_dir=args.tokenizer, corpus=args.corpus, out_dir=args.out)
    except Exception as e:
        if "LOCAL_RANK" in os.environ:
            (args.out / "ranks").mkdir(parents=True, exist_ok=True)
            (args.out / "ranks" / f"rank-{rank}.error").write_text(f"{type(e).__name__}: {e}")
        raise


@task(name="pretrain", task_run_name="{step}", cache_policy=store.NO_PREFECT_CACHE, persist_result=False)
def pretrain_task(step: str, cfg: PretrainConfig, st: store.Store, tokenizer: store.StepRef, corpus: Path):
    """The text backbones read the corpus; the multimodal one reads the rendered world's code instead."""
    multimodal = is_multimodal(cfg)

    def work(out: Path) -> dict:
        metrics = pretrain(cfg, tokenizer_dir=tokenizer.dir, corpus=None if multimodal else corpus, out_dir=out)
        if not (cfg.num_processes > 1 or cfg.accelerate_config):  # launch() publishes its own
            publish(out, metrics)
        return metrics

    ref = st.run(step, cfg, inputs=[tokenizer], files=[] if multimodal else [corpus],
                 code=[__name__, "data.multimodal"] if multimodal else [__name__], work=work)
    return store.prefect_state(ref)


if __name__ == "__main__":
    main()
