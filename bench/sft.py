"""sft's batches run forward in parts of similar length (`sft.length_groups`) against the whole padded batch: seconds
per optimizer step on the world's sft mixture (conversations and feedback demonstrations) with dense-tiny, side by side
in one run. The parts give the batch's own loss and gradient (tests/test_sft.py), so the runs' losses agree to
rounding.

    .venv/bin/python -m bench.sft [--threads 1] [--steps 10] [--rounds 2] [--groups 1 2 4 8]

Measured on a quiet 2-core machine (--steps 8), the same train loss (6.6038) in every run:

    threads   whole     2 parts        4 parts        8 parts
    1         2.80 s    2.27 s 1.24x   1.99 s 1.41x   1.93 s 1.45x
    2         1.60 s    1.26 s 1.27x   1.12 s 1.42x   1.15 s 1.39x

4 parts, the default, is as fast as 8 on one thread and the fastest on two.
"""

import argparse
import random
import statistics
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoTokenizer

from data.world import feedback_demos, sft_conversations
from tasks.pretrain import PretrainConfig, build_model
from tasks.sft import FinetuneConfig, train
from tasks.tokenizer import TokenizerConfig, build_tokenizer

WORLD = Path(__file__).resolve().parents[1] / "data" / "world"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--steps", type=int, default=10, help="optimizer steps per run, batches of 32")
    parser.add_argument("--rounds", type=int, default=2, help="runs per setting, in alternating order")
    parser.add_argument("--groups", type=int, nargs="+", default=[1, 2, 4, 8])
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="alignflow-bench-sft-"))
    build_tokenizer(TokenizerConfig(vocab_size=2048), WORLD / "corpus.txt", work / "tokenizer")
    tokenizer = AutoTokenizer.from_pretrained(work / "tokenizer")
    torch.manual_seed(0)
    build_model(PretrainConfig(), tokenizer).save_pretrained(work / "base")
    tokenizer.save_pretrained(work / "base")
    cfg = FinetuneConfig(epochs=1, checkpoint_every=10**6)
    mixture = sft_conversations(WORLD) + feedback_demos(WORLD)
    conversations = random.Random(0).sample(mixture, args.steps * cfg.batch_size)

    seconds, losses = {g: [] for g in args.groups}, {}
    for round_ in range(args.rounds):
        for groups in args.groups if round_ % 2 == 0 else args.groups[::-1]:
            started = time.perf_counter()
            metrics = train(cfg.model_copy(update={"length_groups": groups}), work / "base", conversations,
                            work / f"groups-{groups}-{round_}", "bench sft")
            seconds[groups].append((time.perf_counter() - started) / metrics["steps"])
            losses[groups] = metrics["train_loss"]
    reference = statistics.median(seconds[args.groups[0]])
    print(f"dense-tiny, {args.threads} thread(s), {args.steps} steps of {cfg.batch_size}, median of {args.rounds} runs")
    print(f"{'length_groups':>13} {'s/step':>7} {'speed-up':>8} {'train loss':>10}")
    for groups in args.groups:
        median = statistics.median(seconds[groups])
        print(f"{groups:>13} {median:7.3f} {reference / median:7.2f}x {losses[groups]:10.4f}")


if __name__ == "__main__":
    main()
