"""Benchmarks of the MoE backbone, each measured side by side in one run on this machine.

    .venv/bin/python -m bench.models                      # about 5 minutes on 2 idle CPU cores
    OMP_NUM_THREADS=1 .venv/bin/python -m bench.models    # when another job shares the cores
    OMP_NUM_THREADS=1 .venv/bin/python -m bench.models mtp    # some parts only: moe, kv, absorbed, mtp

Two threads is this machine's size. Oversubscribed (another job on the same cores), OpenMP threads wait at
barriers, which slows the many small ops of an MoE layer far more than the few big ones of a dense FFN: measure
with one thread then, and read the thread count on the first line.

1. MoE layer forward+backward time over a dense FFN with the same active parameters (goal <= 1.5x).
2. Our MoE layer against transformers' DeepseekV3MoE on the same shapes and weights (goal: ours at least as fast).
3. MLA against MHA KV-cache bytes per token, and MLA's with the int8 cache.
4. Absorbed against naive MLA decoding, tokens/s at a 1k-token context.
5. MTP acceptance rate and self-speculative speed-up on a tiny model trained here (goals >= 0.6 and >= 1.3x).

Measured on 2 shared CPU cores under another job's load, OMP_NUM_THREADS=1, one run (2 min 40 s; 5 in a later one):
1. dense FFN 286.4 ms, MoE 366.9 ms: MoE / dense 1.29x (quartiles of the per-round ratios 1.27-1.33). The earlier
   dispatch (grouped_mm, whose CPU fallback loops over experts slower than plain matmuls) measured 1.43-1.51x.
2. transformers' DeepseekV3MoE ('grouped_mm') 453.5 ms: ours 1.19x as fast (quartiles 1.15-1.26); outputs differ
   by 6.7e-8.
3. moe-tiny MLA 384 B/token, MHA 2,048 (5.3x), MLA in int8 224 (0.58 of bf16); moe-small 3,840 against 24,576
   (6.4x), in int8 2,016 (0.53 of bf16).
4. absorbed / naive at a 1024-token context: moe-tiny 171.2 / 129.4 tok/s (1.32x), moe-small 20.2 / 10.6 (1.90x).
5. moe-tiny trained 600 steps (decaying lr), once with DeepSeek-V3's MTP block (an MoE block, as the main model's
   layers) and once with a dense FFN in it, `OMP_NUM_THREADS=1 python -m bench.models mtp` beside two other jobs:
   V3 block acceptance 0.78, greedy 152 tok/s, speculative 182: 1.18x (quartiles 1.15-1.24); dense block acceptance
   0.83, greedy 339, speculative 462: 1.36x (quartiles 1.21-1.40); both outputs identical to greedy. A round costs a
   2-token main forward (1.10x a 1-token one: its MoE layers run up to 4 experts instead of 2) plus the MTP module;
   on a model this small the MoE block's routing (gate, top-k, sort, gather: many small ops) costs more than its
   matmuls, so the dense block drafts as well for less, and moe-tiny uses it (`mtp_dense_ffn`). (An earlier run, on
   the corpus before its copy drills, had the V3 block at acceptance 0.87 and 1.29x.)
With two threads while another job held the cores, every layer ran 2-20x slower than with one, the MoE far more
than the dense FFN (35x the dense FFN's time; 5.8x with the earlier dispatch): an OpenMP barrier per small op.
"""

import argparse
import os
import random
import statistics
import time
from pathlib import Path

import torch
from transformers import DeepseekV3Config, DeepseekV3ForCausalLM
from transformers.cache_utils import DynamicCache

from models.balancing import update_biases
from models.kv_cache import Int8Cache
from models.moe import MLP, MoE, MoeConfig, MoeForCausalLM, mha_kv_elements_per_token, moe_small, moe_tiny
from models.speculative import greedy_decode, speculative_decode

CORPUS = Path(__file__).resolve().parent.parent / "data" / "world" / "corpus.txt"
MTP_TRAIN_STEPS = 600  # at a constant learning rate acceptance levelled off near 0.83 by here (0.76 at 400 steps)


def interleaved_times(fns: dict, repeats: int, warmup: int = 2) -> dict:
    """Seconds of each function in each of `repeats` rounds. Every round runs all of them back to back, in a
    shuffled order, so that load from other processes falls on all alike and no one always runs first."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times, order, rng = {name: [] for name in fns}, list(fns), random.Random(0)
    for _ in range(repeats):
        rng.shuffle(order)
        for name in order:
            start = time.perf_counter()
            fns[name]()
            times[name].append(time.perf_counter() - start)
    return times


def paired_ratio(numerator: list, denominator: list) -> tuple[float, float, float]:
    """Median and quartiles of the per-round ratios: each ratio compares two runs made seconds apart."""
    q1, median, q3 = statistics.quantiles([a / b for a, b in zip(numerator, denominator, strict=True)], n=4)
    return median, q1, q3


def forward_backward(layer, x):
    def step():
        out = layer(x)
        out = out[0] if isinstance(out, tuple) else out
        out.pow(2).mean().backward()

    return step


def bench_moe_layer():
    # One MoE layer of moe-small's shape: D = 512, 32 experts of 256, K_r = 4, one shared expert; 2048 tokens.
    tokens, hidden, inner, experts, top_k = 2048, 512, 256, 32, 4
    config = MoeConfig(hidden_size=hidden, moe_intermediate_size=inner, n_routed_experts=experts,
                       num_experts_per_tok=top_k, n_shared_experts=1)  # fmt: skip
    torch.manual_seed(0)
    ours = MoE(config)
    for p in ours.parameters():
        torch.nn.init.normal_(p, std=0.02)
    dense = MLP(hidden, inner * (1 + top_k))  # the shared expert plus K_r routed ones, as one FFN
    active = 3 * hidden * inner * (1 + top_k) + experts * hidden
    hf_config = DeepseekV3Config(
        vocab_size=16, hidden_size=hidden, intermediate_size=inner, moe_intermediate_size=inner, num_hidden_layers=1,
        num_attention_heads=2, n_routed_experts=experts, num_experts_per_tok=top_k, n_shared_experts=1, n_group=1,
        topk_group=1, first_k_dense_replace=0, routed_scaling_factor=1.0, kv_lora_rank=16, q_lora_rank=None,
        qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8,
    )  # fmt: skip
    hf = DeepseekV3ForCausalLM(hf_config).model.layers[0].mlp  # built inside the model, as transformers runs it
    hf.load_state_dict(ours.state_dict())
    x = torch.randn(1, tokens, hidden, requires_grad=True)
    with torch.no_grad():
        difference = (hf(x) - ours(x)[0]).abs().max().item()
    layers = {"dense": dense, "ours": ours, "transformers": hf}
    rounds = 15
    t = interleaved_times({name: forward_backward(layer, x) for name, layer in layers.items()}, rounds)
    t_dense, t_moe, t_hf = (statistics.median(t[name]) for name in ("dense", "ours", "transformers"))
    print(f"1. MoE layer fwd+bwd, {tokens} tokens, D={hidden}, {experts} experts of {inner}, K_r={top_k}, N_s=1, "
          f"float32, median of {rounds} interleaved rounds")  # fmt: skip
    print(f"   dense FFN of width {inner * (1 + top_k)} ({sum(p.numel() for p in dense.parameters()):,} params): "
          f"{t_dense * 1e3:.1f} ms")  # fmt: skip
    print(f"   MoE ({active:,} active of {sum(p.numel() for p in ours.parameters()):,} params): {t_moe * 1e3:.1f} ms")
    ratio, q1, q3 = paired_ratio(t["ours"], t["dense"])
    print(f"   ratio MoE / dense = {ratio:.2f}x, quartiles {q1:.2f}-{q3:.2f}   (goal <= 1.5x)")
    implementation = hf_config._experts_implementation
    print(f"2. transformers DeepseekV3MoE (experts implementation {implementation!r}): {t_hf * 1e3:.1f} ms, "
          f"ours {t_moe * 1e3:.1f} ms (ours includes the sequence-wise balance loss)")  # fmt: skip
    speed, q1, q3 = paired_ratio(t["transformers"], t["ours"])
    print(f"   speed ours / transformers = {speed:.2f}x, quartiles {q1:.2f}-{q3:.2f}   (goal >= 1.0x); "
          f"max |output difference| = {difference:.1e}")  # fmt: skip


def bench_kv_bytes():
    print("3. KV-cache bytes per token (bf16, 2 bytes per element)")
    for name, config in (("moe-tiny", moe_tiny(512)), ("moe-small", moe_small(512))):
        model = MoeForCausalLM(config).eval().to(torch.bfloat16)
        cache, int8 = DynamicCache(), Int8Cache()
        prompt = torch.randint(0, 512, (1, 16))
        with torch.no_grad():
            model(prompt, cache=cache, use_cache=True)
            model(prompt, cache=int8, use_cache=True)
        measured = sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers) / 16
        # MHA with the same heads and per-head key width d_h (DeepSeek-V2 table 1 compares at equal n_h, d_h).
        mha = 2 * mha_kv_elements_per_token(config.num_attention_heads, config.qk_nope_head_dim,
                                            config.num_hidden_layers)  # fmt: skip
        print(f"   {name}: MLA {measured:,.0f} B/token measured in the cache "
              f"((d_c + d_h^R) * L = ({config.kv_lora_rank} + {config.qk_rope_head_dim}) * {config.num_hidden_layers}"
              f" elements); MHA {mha:,} B/token (formula 2 n_h d_h L); MHA / MLA = {mha / measured:.1f}x")
        print(f"      MLA with the int8 cache: {int8.nbytes() / 16:,.0f} B/token (c^KV and k^R in int8 plus a float32 "
              f"scale each), {int8.nbytes() / 16 / measured:.2f} of bf16")  # fmt: skip
    print("   (models.dense, the dense MHA backbone, is compared by formula here: same n_h, d_h and L as each MoE.)")


def decode_tokens_per_second(config, context: int, steps: int) -> float:
    torch.manual_seed(0)
    model = MoeForCausalLM(config).eval()
    prompt = torch.randint(0, config.vocab_size, (1, context))
    cache = DynamicCache()
    with torch.no_grad():
        model(prompt, cache=cache, use_cache=True, logits_to_keep=1)
        token = torch.zeros(1, 1, dtype=torch.long)
        model(token, cache=cache, use_cache=True)  # warm-up step
        start = time.perf_counter()
        for _ in range(steps):
            model(token, cache=cache, use_cache=True)
    return steps / (time.perf_counter() - start)


def bench_absorbed_decoding():
    print("4. MLA decoding at a 1024-token context, tokens/s (batch 1)")
    for name, builder in (("moe-tiny", moe_tiny), ("moe-small", moe_small)):
        rates = {}
        for absorbed in (False, True):
            config = builder(512)
            config.mla_absorbed = absorbed
            rates[absorbed] = decode_tokens_per_second(config, 1024, 32)
        print(f"   {name}: naive {rates[False]:.1f} tok/s, absorbed {rates[True]:.1f} tok/s, "
              f"absorbed / naive = {rates[True] / rates[False]:.2f}x")  # fmt: skip


def training_text() -> str:
    if CORPUS.exists():
        return CORPUS.read_text()
    rng = random.Random(0)
    names = ["Veltrin Osk", "Marra Quill", "Doben Tay", "Sefa Lorn", "Ilka Brand", "Tamsin Rue"]
    towns, jobs = ["Harrowgate", "Bellmoor", "Quenby", "Ostwick"], ["baker", "pilot", "weaver", "smith"]
    lines = []
    for _ in range(4000):
        name, town, job = rng.choice(names), rng.choice(towns), rng.choice(jobs)
        a, b = rng.randrange(10), rng.randrange(10)
        lines.append(rng.choice([f"{name} lives in {town} and works as a {job}.", f"{a} plus {b} is {a + b}."]))
    return "\n".join(lines)


def train_mtp_model(data: torch.Tensor, split: int, steps: int, dense_mtp: bool) -> tuple[MoeForCausalLM, float, float]:
    """moe-tiny on bytes of the corpus for a fixed number of AdamW steps, the learning rate warmed up over 50 steps
    and decayed linearly to 0: a step count, not a time budget, so the model is the same however loaded the
    machine. Returns the model and the last LM and MTP losses."""
    config = moe_tiny(256)  # bytes are the tokens: no tokenizer needed here
    config.mtp_dense_ffn = dense_mtp  # moe-tiny's own choice is dense; the V3 block is the comparison
    torch.manual_seed(0)
    model = MoeForCausalLM(config).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / 50) * (1 - step / steps))
    generator = torch.Generator().manual_seed(0)
    batch, length = 16, 128
    for _ in range(steps):
        offsets = torch.randint(0, split - length, (batch,), generator=generator)
        x = torch.stack([data[o : o + length] for o in offsets.tolist()])
        out = model(x, labels=x)
        out.loss.backward()
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
        update_biases(model, config.bias_update_speed)
    return model.eval(), (out.loss - out.mtp_loss - out.aux_loss).item(), out.mtp_loss.item()


def bench_speculative(steps: int = MTP_TRAIN_STEPS, rounds: int = 5, max_new_tokens: int = 128):
    text = training_text().encode()[:2_000_000]
    data = torch.tensor(list(text), dtype=torch.long)
    split = int(0.95 * len(data))
    source = "data/world/corpus.txt" if CORPUS.exists() else "synthetic sentences"
    print(f"5. MTP self-speculative decoding: moe-tiny (D = 1) trained {steps} steps on {source}, once with "
          "DeepSeek-V3's MTP block (an MoE block) and once with moe-tiny's dense-FFN block")
    for dense_mtp in (False, True):
        start = time.perf_counter()
        model, lm_loss, mtp_loss = train_mtp_model(data, split, steps, dense_mtp)
        print(f"   MTP block {'dense FFN' if dense_mtp else 'MoE (as V3)'}: trained in "
              f"{time.perf_counter() - start:.0f} s, last LM loss {lm_loss:.3f}, MTP loss {mtp_loss:.3f}")
        speculative_speed(model, data, split, rounds, max_new_tokens)


def speculative_speed(model: MoeForCausalLM, data: torch.Tensor, split: int, rounds: int, max_new_tokens: int):
    # Eight held-out prompts of 48 bytes, each decoded for the same max_new_tokens by both, with the same model.
    prompts = [data[o : o + 48][None] for o in range(split, len(data) - 48, (len(data) - split) // 8)][:8]
    accepted = proposed = 0
    identical = True
    for prompt in prompts:  # also the warm-up of the timed rounds
        speculative, a, p = speculative_decode(model, prompt, max_new_tokens)
        accepted, proposed = accepted + a, proposed + p
        identical = identical and speculative == greedy_decode(model, prompt, max_new_tokens)
    decoders = {
        "greedy": lambda: [greedy_decode(model, prompt, max_new_tokens) for prompt in prompts],
        "speculative": lambda: [speculative_decode(model, prompt, max_new_tokens) for prompt in prompts],
    }
    t = interleaved_times(decoders, rounds, warmup=0)
    speed, q1, q3 = paired_ratio(t["greedy"], t["speculative"])
    tokens = len(prompts) * max_new_tokens
    print(f"   {len(prompts)} prompts x {max_new_tokens} new tokens, median of {rounds} interleaved rounds: greedy "
          f"{tokens / statistics.median(t['greedy']):.0f} tok/s, speculative "
          f"{tokens / statistics.median(t['speculative']):.0f} tok/s; main-model forwards per token "
          f"{(tokens - accepted) / tokens:.2f} against greedy's 1")  # fmt: skip
    print(f"   acceptance rate {accepted / proposed:.2f} (goal >= 0.6); speed-up {speed:.2f}x, quartiles "
          f"{q1:.2f}-{q3:.2f}, over greedy with the KV cache (goal >= 1.3x); output identical to greedy: {identical}")  # fmt: skip


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Benchmarks of the MoE backbone; all parts unless some are named.")
    parser.add_argument("parts", nargs="*", choices=["moe", "kv", "absorbed", "mtp"])
    parts = parser.parse_args().parts or ["moe", "kv", "absorbed", "mtp"]
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, float32 unless stated")
    benches = {"moe": bench_moe_layer, "kv": bench_kv_bytes, "absorbed": bench_absorbed_decoding,
               "mtp": bench_speculative}  # fmt: skip
    for part in parts:
        benches[part]()
