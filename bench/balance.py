"""Load balancing of the tiny MoE, three ways on the same budget: none, the sequence-wise auxiliary loss, and
auxiliary-loss-free bias balancing (Wang et al., arXiv 2408.15664). Prints MaxVio over the last 20% of steps and the
validation loss of each, and the ratios the goal is stated in:
loss-free MaxVio <= 0.5 x no balancing's, and validation loss within 1% of the auxiliary-loss run or better.

    .venv/bin/python -m bench.balance [--steps 300] [--gamma 0.001] [--threads 1]

gamma and alpha default to the step's config (PretrainConfig: gamma 0.001 as DeepSeek-V3 sec. 4.2, alpha 0.01).
Same seed, data order and initial weights for all three runs. Measured on 2 shared cores, 1 thread, 300 steps
(about 80 s per run): MaxVio none 1.714, aux 0.141, loss-free 0.228 (gamma 0.001) / 0.152 (gamma 0.01); validation
loss 1.2711, 1.2785, 1.2759 / 1.2821.
"""

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from tasks.pretrain import PretrainConfig, pretrain
from tasks.tokenizer import TokenizerConfig, build_tokenizer

CORPUS = Path(__file__).resolve().parents[1] / "data" / "world" / "corpus.txt"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--gamma", type=float, default=PretrainConfig().bias_gamma, help="loss-free bias speed")
    parser.add_argument("--alpha", type=float, default=PretrainConfig().aux_alpha, help="auxiliary loss weight")
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    work = Path(tempfile.mkdtemp(prefix="alignflow-balance-"))
    build_tokenizer(TokenizerConfig(), CORPUS, work / "tokenizer")
    results = {}
    for mode in ("none", "aux_loss", "loss_free"):
        cfg = PretrainConfig(model="moe-tiny", balancing=mode, bias_gamma=args.gamma, aux_alpha=args.alpha,
                             max_steps=args.steps, warmup_steps=max(args.steps // 20, 1), seq_len=args.seq_len,
                             batch_size=args.batch_size, checkpoint_every=10 * args.steps, log_every=args.steps)
        started = time.perf_counter()
        m = pretrain(cfg, tokenizer_dir=work / "tokenizer", corpus=CORPUS, out_dir=work / mode)
        results[mode] = {"max_vio_last20pct": m["max_vio_last20pct"], "val_loss": m["val_loss"],
                         "bias_norms": m["bias_norms"], "seconds": round(time.perf_counter() - started, 1)}
        print(f"{mode:>10}: MaxVio(last 20%) {m['max_vio_last20pct']:.3f}  val loss {m['val_loss']:.4f}  "
              f"({results[mode]['seconds']} s)", flush=True)

    vio_ratio = results["loss_free"]["max_vio_last20pct"] / results["none"]["max_vio_last20pct"]
    val_change = results["loss_free"]["val_loss"] / results["aux_loss"]["val_loss"] - 1
    print(f"\nmoe-tiny, {args.steps} steps x {args.batch_size} x {args.seq_len} tokens, gamma {args.gamma}, "
          f"alpha {args.alpha}, {args.threads} thread(s)")
    print(f"{'mode':>10} {'MaxVio':>8} {'val loss':>9}")
    for mode, r in results.items():
        print(f"{mode:>10} {r['max_vio_last20pct']:>8.3f} {r['val_loss']:>9.4f}")
    print(f"loss-free MaxVio / none MaxVio = {vio_ratio:.2f}   (goal <= 0.50: {'met' if vio_ratio <= 0.5 else 'MISSED'})")
    print(f"loss-free val loss vs aux-loss = {100 * val_change:+.2f}%  "
          f"(goal <= +1%: {'met' if val_change <= 0.01 else 'MISSED'})")
    if args.json:
        args.json.write_text(json.dumps({"args": vars(args) | {"json": str(args.json)}, "results": results,
                                         "vio_ratio": vio_ratio, "val_change": val_change}, indent=2))


if __name__ == "__main__":
    main()
