"""The multimodal backbone's efficiency options, side by side in one run:

1. attention at long sequence lengths: dense causal (torch's fused SDPA), the local+global pattern as a masked dense
   SDPA, and the blockwise local+global kernel; time per call and the bytes of the largest tensor each path makes
   (scores or mask; measured peak allocation when run on CUDA);
2. the int8 KV cache against the full cache on a briefly trained multimodal-tiny: bytes per token (bf16 baseline)
   and held-out perplexity through each cache (goal: within 1%).

Held-out attribute accuracy is measured by the pipeline (`alignflow run evaluate_multimodal`, README).

    .venv/bin/python -m bench.multimodal [--steps 600] [--lengths 1024 2048 4096] [--save DIR]

Measured on 2 shared CPU cores, `--steps 1500`, one run (train ~160 s), with 16 px patches and the audio encoder's
change channel (README):
- attention, T = 1024 / 2048 / 4096 (w = s = 32 / 64 / 64): sparse/dense-causal time 0.85 / 0.63 / 0.47; score
  bytes 0.094 / 0.078 / 0.047 of dense. The masked dense SDPA of the same pattern is 1.9-3.1x slower than dense causal.
  Under heavy CPU contention the timings swing by 10x; the byte ratios do not.
- int8 cache (per-token scales): 1152 vs 2048 bytes/token (0.562 of bf16), held-out perplexity 1.3177 vs 1.3178
  (-0.005%); group 8: 0.750 of bf16, -0.003%.
"""

import argparse
import math
import time
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from transformers import DynamicCache

from data import multimodal as mm
from models.kv_cache import Int8Cache
from models.multimodal import MultimodalForCausalLM, MultimodalProcessor, multimodal_tiny
from models.sparse_attention import local_global_attention, local_global_mask
from tasks.tokenizer import TokenizerConfig, train_tokenizer


# ------------------------------------------------------------------------------------------------------- attention
def timed(fn, device, repeats: int = 3) -> tuple[float, int | None]:
    """Best wall time of `repeats` calls, and the peak bytes allocated on CUDA (None on the CPU)."""
    fn()
    best = math.inf
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return best, torch.cuda.max_memory_allocated() if device.type == "cuda" else None


def attention_bench(lengths: list[int], device, heads: int = 4, head_dim: int = 32) -> None:
    print("== attention: dense causal vs local+global (window = stride = sqrt-ish of T), batch 1, "
          f"{heads} heads x {head_dim}, {device.type}")
    print(f"{'T':>6} {'window':>6} {'dense ms':>9} {'masked ms':>10} {'sparse ms':>10} {'sparse/dense':>12} "
          f"{'dense scores MB':>15} {'sparse scores MB':>16} {'ratio':>6}")
    for T in lengths:
        w = s = 2 ** round(math.log2(math.sqrt(T)))
        q, k, v = torch.randn(3, 1, heads, T, head_dim, device=device).unbind(0)
        pos = torch.arange(T, device=device)
        mask = local_global_mask(pos, pos, w, s)
        dense_t, dense_mem = timed(partial(F.scaled_dot_product_attention, q, k, v, is_causal=True), device)
        masked_t, _ = timed(partial(F.scaled_dot_product_attention, q, k, v, attn_mask=mask), device)
        sparse_t, sparse_mem = timed(partial(local_global_attention, q, k, v, w, s), device)
        # The T x T float32 scores a dense attention forms when it must return or mask them, against the blockwise
        # kernel's T x (2w + T/s): the memory that grows with T. On CUDA the measured peaks are printed too.
        dense_bytes = heads * T * T * 4
        sparse_bytes = heads * T * (2 * w + math.ceil(T / s)) * 4
        print(f"{T:>6} {w:>6} {dense_t * 1e3:>9.2f} {masked_t * 1e3:>10.2f} {sparse_t * 1e3:>10.2f} "
              f"{sparse_t / dense_t:>12.2f} {dense_bytes / 2**20:>15.1f} {sparse_bytes / 2**20:>16.2f} "
              f"{sparse_bytes / dense_bytes:>6.3f}")
        if dense_mem is not None:
            print(f"{'':>6} measured CUDA peak: dense {dense_mem / 2**20:.1f} MB, sparse {sparse_mem / 2**20:.1f} MB")


# ----------------------------------------------------------------------------------------------------- training
def make_tokenizer():
    lines = []
    for i in range(600):
        s = mm.sample("train", i)
        lines.append(s["caption"])
        lines += [f"{q} {a}" for q, a in s["qa"]]
    return train_tokenizer(TokenizerConfig(vocab_size=512, min_frequency=1), lines)


def train(steps: int, batch_size: int, lr: float, device, log_every: int = 50):
    tokenizer = make_tokenizer()
    config = multimodal_tiny(vocab_size=len(tokenizer))
    config.pad_token_id, config.bos_token_id = tokenizer.pad_token_id, tokenizer.bos_token_id
    config.eos_token_id = tokenizer.eos_token_id
    torch.manual_seed(0)
    model = MultimodalForCausalLM(config).to(device)
    processor = MultimodalProcessor(tokenizer, config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    warmup = max(1, steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda t: min(1, (t + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(t, steps) / steps)))
    model.train()
    start, losses = time.perf_counter(), []
    for step, batch in enumerate(mm.multimodal_batches("train", processor, batch_size, steps)):
        loss = model(**{k: v.to(device) for k, v in batch.items()}).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
        losses.append(loss.item())
        if (step + 1) % log_every == 0:
            print(f"  step {step + 1}: loss {np.mean(losses[-log_every:]):.3f} "
                  f"({time.perf_counter() - start:.0f} s)", flush=True)
    return model.eval(), processor


# --------------------------------------------------------------------------------------------------- int8 cache
@torch.no_grad()
def nll_through_cache(model, batch, make_cache, chunk: int) -> tuple[float, int, int]:
    """Sum of next-token NLL over the label tokens, the sequence fed `chunk` tokens at a time through a cache, so
    every chunk attends to cached (possibly quantized) keys. Returns (nll sum, tokens, cache bytes)."""
    embeds = model.model.embed(batch["input_ids"], batch["mm_token_type_ids"], pixel_values=batch.get("pixel_values"),
                               input_values=batch.get("input_values"),
                               input_values_mask=batch.get("input_values_mask"),
                               pixel_values_videos=batch.get("pixel_values_videos"))
    cache, logits = make_cache(), []
    T = embeds.shape[1]
    for start in range(0, T, chunk):
        end = min(T, start + chunk)
        out = model(inputs_embeds=embeds[:, start:end], attention_mask=batch["attention_mask"][:, :end],
                    cache=cache, use_cache=True)
        cache = out.cache
        logits.append(out.logits)
    logits = torch.cat(logits, 1)[:, :-1]
    labels = batch["labels"][:, 1:]
    nll = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=-100, reduction="sum")
    return nll.item(), int((labels != -100).sum()), cache


def cache_bench(model, processor, device, batches: int, chunk: int = 8) -> None:
    print(f"== KV cache on held-out captions and QA ({batches} batches of 32, fed {chunk} tokens at a time)")
    totals = {"full": [0.0, 0], "int8": [0.0, 0], "int8 group 8": [0.0, 0]}
    makers = {"full": DynamicCache, "int8": Int8Cache, "int8 group 8": lambda: Int8Cache(group_size=8)}
    bytes_per_token = {}
    for batch in mm.multimodal_batches("heldout", processor, 32, batches, seed=99):
        batch = {k: v.to(device) for k, v in batch.items()}
        for name, make in makers.items():
            nll, n, cache = nll_through_cache(model, batch, make, chunk)
            totals[name][0] += nll
            totals[name][1] += n
            stored = batch["input_ids"].numel()  # every position, padding included, is cached
            if name == "full":  # the same elements at 2 bytes each: bf16
                elements = sum(layer.keys.numel() + layer.values.numel() for layer in cache.layers)
                bytes_per_token[name] = elements * 2 / stored
            else:
                bytes_per_token[name] = cache.nbytes() / stored
    ppl = {name: math.exp(nll / n) for name, (nll, n) in totals.items()}
    for name in makers:
        print(f"  {name:>13}: {bytes_per_token[name]:7.1f} bytes/token ({bytes_per_token[name] / bytes_per_token['full']:.3f}"
              f" of bf16), held-out perplexity {ppl[name]:.4f} ({(ppl[name] / ppl['full'] - 1) * 100:+.3f}%)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096])
    parser.add_argument("--save", type=Path, help="save the trained model and tokenizer here")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    device = torch.device(args.device)

    attention_bench(args.lengths, device)
    print(f"== training multimodal-tiny: {args.steps} steps of {args.batch_size} captions/QA, lr {args.lr}")
    model, processor = train(args.steps, args.batch_size, args.lr, device)
    if args.save:
        model.save_pretrained(args.save)
        processor.save_pretrained(args.save)
    cache_bench(model, processor, device, batches=4)


if __name__ == "__main__":
    main()
