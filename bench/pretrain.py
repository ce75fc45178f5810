"""Pretraining throughput and MFU of the tiny dense and MoE presets and of a ~30M-parameter dense model, in float32
and bfloat16, against this machine's matmul peak measured in the same run (tasks.pretrain.measure_gemm_peak).
Goal: at least 35% of the fp32 peak at 30M parameters.

    .venv/bin/python -m bench.pretrain [--threads 2] [--steps 12]    # CPU: fp32 and bf16
    .venv/bin/python -m bench.pretrain --gpu --steps 30               # one GPU, bf16 (bench/gpu.sh)

MFU counts 6N + 6 L T (d_qk + d_v) FLOPs per token (tasks.pretrain.flops_per_token, PaLM appendix B) over the timed
steps (the first two warm up and are not timed). Tiny models are bound by per-operation overhead, not arithmetic.
"""

import argparse
import tempfile
import time
from pathlib import Path

import torch

from tasks.pretrain import PretrainConfig, measure_gemm_peak, pretrain
from tasks.tokenizer import TokenizerConfig, build_tokenizer

CORPUS = Path(__file__).resolve().parents[1] / "data" / "world" / "corpus.txt"

# (size, tokenizer vocabulary, seq_len, batch): the tiny presets as the pipeline trains them; 30M at its own vocab.
CPU_RUNS = [("dense-tiny", 2048, 128, 16), ("moe-tiny", 2048, 128, 16), ("dense-30m", 8192, 256, 8)]
# One GPU (bench/gpu.sh), bf16 only: GPT-2 small's shape and the one-GPU MoE. The BPE stops where the world corpus
# runs out of pairs to merge, below 32k, so the parameter counts printed are below the builders' nominal ones.
GPU_RUNS = [("dense-125m", 32_000, 1024, 16), ("moe-small", 32_000, 1024, 16)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--only", nargs="*", help="sizes to run (default: all)")
    parser.add_argument("--gpu", action="store_true", help="the one-GPU runs, bf16 only")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="alignflow-bench-pretrain-"))
    device = "cuda" if args.gpu else "cpu"
    dtypes = ("bfloat16",) if args.gpu else ("float32", "bfloat16")
    peaks = {dt: measure_gemm_peak(getattr(torch, dt), device, cache_dir=work) for dt in dtypes}
    where = torch.cuda.get_device_name() if args.gpu else f"{args.threads} thread(s)"
    print(f"matmul peak on {where}: " + ", ".join(f"{dt} {p / 1e12:.3f} TFLOP/s" for dt, p in peaks.items()),
          flush=True)
    rows = []
    for size, vocab, seq_len, batch in GPU_RUNS if args.gpu else CPU_RUNS:
        if args.only and size not in args.only:
            continue
        tokenizer = work / f"tokenizer-{vocab}"
        if not tokenizer.exists():
            build_tokenizer(TokenizerConfig(vocab_size=vocab), CORPUS, tokenizer)
        for dtype in dtypes:
            cfg = PretrainConfig(model=size, dtype=dtype, max_steps=args.steps, warmup_steps=1, seq_len=seq_len,
                                 batch_size=batch, checkpoint_every=10 * args.steps, log_every=args.steps)
            started = time.perf_counter()
            m = pretrain(cfg, tokenizer_dir=tokenizer, corpus=CORPUS, out_dir=work / f"{size}-{dtype}",
                         peak_cache=work)
            rows.append((size, m["parameters"], dtype, m["tokens_per_s"], m["flops_per_token"], m["mfu"]))
            print(f"{size} {dtype}: {m['tokens_per_s']:.0f} tokens/s, MFU {100 * m['mfu']:.1f}% "
                  f"({time.perf_counter() - started:.0f} s)", flush=True)
    print(f"\n{'model':>11} {'params':>7} {'dtype':>9} {'tokens/s':>9} {'GFLOP/token':>11} {'MFU':>6}")
    for size, params, dtype, tps, fpt, mfu in rows:
        print(f"{size:>11} {params / 1e6:>6.1f}M {dtype:>9} {tps:>9.0f} {fpt / 1e9:>11.3f} {100 * mfu:>5.1f}%")
    for size, dtype in (("dense-30m", "float32"), ("dense-125m", "bfloat16")):
        mfu = [r[-1] for r in rows if r[0] == size and r[2] == dtype]
        if mfu:
            print(f"{size} {dtype} MFU {100 * mfu[0]:.1f}% (goal >= 35%: {'met' if mfu[0] >= 0.35 else 'MISSED'})")


if __name__ == "__main__":
    main()
