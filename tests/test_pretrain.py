"""The pretrain step's training function: config validation, data position, FLOP counts, exact resume after
SIGKILL (MoE and multimodal), the copying-circuit report, the NaN guard, and two gloo ranks under accelerate launch."""

import json
import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError
from safetensors.torch import load_file

from data.graders import COPY_FORMED, COPY_GAPS
from tasks.pretrain import (
    PretrainConfig,
    batch_rows,
    build_model,
    checkpoint_steps,
    flops_per_token,
    launch_command,
    matmul_params,
    pretrain,
    weights_digest,
)
from tests.conftest import SMALL_TEXT

ROOT = Path(__file__).resolve().parents[1]
TINY = {"seq_len": 32, "batch_size": 4, "warmup_steps": 1, "lr": 3e-3, "log_every": 1}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def inputs(tokenizer, tmp_path_factory):
    folder = tmp_path_factory.mktemp("inputs")
    tokenizer.save_pretrained(folder / "tokenizer")
    (folder / "corpus.txt").write_text("\n".join(SMALL_TEXT) + "\n")
    return folder / "tokenizer", folder / "corpus.txt"


def test_config_rejects_bad_values_naming_the_field():
    with pytest.raises(ValidationError, match="(?s)model.*unknown size 'dense-huge'"):
        PretrainConfig(model="dense-huge")
    with pytest.raises(ValidationError, match="(?s)checkpoint_every.*greater than or equal to 1"):
        PretrainConfig(checkpoint_every=0)
    with pytest.raises(ValidationError, match="(?s)accelerate_config.*no such file"):
        PretrainConfig(accelerate_config="/nonexistent/accelerate.yaml")
    with pytest.raises(ValidationError, match="balancing"):
        PretrainConfig(balancing="auxloss")
    with pytest.raises(ValidationError, match="(?s)learning_rate.*Extra inputs"):
        PretrainConfig(learning_rate=1e-3)


def test_batches_cover_each_epoch_once_and_ranks_split_the_global_batch():
    n_rows, batch = 10, 3
    first_epoch = [r for step in range(3) for r in batch_rows(step, n_rows, batch, seed=1)] + \
        batch_rows(3, n_rows, batch, seed=1)[:1]
    assert sorted(first_epoch) == list(range(10))  # 10 rows: steps 0-2 and the first row of step 3
    assert batch_rows(5, n_rows, batch, seed=1) != batch_rows(5, n_rows, batch, seed=2)
    global_batch = batch_rows(4, n_rows, 2 * batch, seed=1)
    assert batch_rows(4, n_rows, batch, 1, rank=0, world=2) + batch_rows(4, n_rows, batch, 1, rank=1, world=2) \
        == global_batch


def test_launch_command_runs_real_ranks_or_the_given_config(tmp_path):
    paths = {"tokenizer_dir": Path("tok"), "corpus": Path("c.txt"), "out_dir": Path("out")}
    command = launch_command(PretrainConfig(num_processes=3), Path("cfg.json"), **paths)
    assert "--cpu" not in command  # it would silently run a single process
    assert command[command.index("--num_processes") + 1] == "3" and "--multi_gpu" in command
    assert command[command.index("-m", 3):] == ["-m", "tasks.pretrain", "--config", "cfg.json", "--tokenizer", "tok",
                                                "--corpus", "c.txt", "--out", "out"]
    accelerate_yaml = tmp_path / "fsdp.yaml"
    accelerate_yaml.write_text("distributed_type: FSDP\nnum_processes: 8\n")
    command = launch_command(PretrainConfig(accelerate_config=accelerate_yaml), Path("cfg.json"), **paths)
    assert command[3:6] == ["--config_file", str(accelerate_yaml), "-m"] and "--num_processes" not in command


def test_flops_per_token_counts_weights_and_attention(tokenizer):
    # PaLM appendix B with N = 10, L = 2, T = 8, H*Q = 4: 6*10 + 12*2*4*8 = 828.
    assert flops_per_token(10, n_layers=2, qk_width=4, v_width=4, seq_len=8) == 828
    dense = build_model(PretrainConfig(model="dense-tiny"), tokenizer)
    total = sum(p.numel() for p in dense.parameters())
    assert dense.config.tie_word_embeddings  # the lookup is free, the tied output projection is counted once
    assert matmul_params(dense) == total
    moe = build_model(PretrainConfig(model="moe-tiny"), tokenizer)
    c = moe.config
    experts = sum(p.numel() for n, p in moe.named_parameters() if ".experts." in n)
    embed, head = moe.get_input_embeddings().weight.numel(), moe.get_output_embeddings().weight.numel()
    expected = sum(p.numel() for p in moe.parameters()) - embed - experts + experts * 2 // 8 + head * c.num_mtp_modules
    assert (c.num_experts_per_tok, c.n_routed_experts) == (2, 8)
    assert matmul_params(moe) == expected


RUNNER = """
import json, logging, os, signal, sys, torch
from pathlib import Path
logging.basicConfig(level=logging.INFO)
from tasks.pretrain import PretrainConfig, pretrain
torch.set_num_threads(1)
cfg, tok, corpus, out, kill_at = sys.argv[1:]
draws = open(Path(out).parent / (Path(out).name + ".draws"), "a")
def on_progress(step, total, metrics):
    # A draw from torch's global RNG after every step: equal sequences mean its state was restored on resume.
    draws.write(f"{step} {torch.rand(()).item()!r}\\n"); draws.flush()
    if step == int(kill_at):
        os.kill(os.getpid(), signal.SIGKILL)
pretrain(PretrainConfig.model_validate_json(cfg), tokenizer_dir=Path(tok), corpus=Path(corpus) if corpus else None,
         out_dir=Path(out), on_progress=on_progress)
"""


def run_steps(cfg: PretrainConfig, inputs, out: Path, kill_at: int = 0) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-c", RUNNER, cfg.model_dump_json(), *map(str, inputs), str(out),
                           str(kill_at)], check=False, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def test_sigkilled_run_resumes_to_the_same_losses_and_weights(inputs, tmp_path):
    """MoE: its routing biases, balancing state and MTP head must resume too. Killed at step 7, after the
    checkpoint of step 6, the rerun repeats step 7 and must end exactly where an unkilled run ends."""
    cfg = PretrainConfig(model="moe-tiny", max_steps=10, checkpoint_every=3, **TINY)
    whole = run_steps(cfg, inputs, tmp_path / "whole")
    assert whole.returncode == 0, whole.stderr[-3000:]
    killed = run_steps(cfg, inputs, tmp_path / "killed", kill_at=7)
    assert killed.returncode == -signal.SIGKILL
    assert checkpoint_steps(tmp_path / "killed" / "checkpoints") == [6]  # step 3's removed once 6 was complete
    assert not (tmp_path / "killed" / "model").exists()
    rerun = run_steps(cfg, inputs, tmp_path / "killed")
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "training moe-tiny from step 6 (resumed" in rerun.stderr

    def curve(name):
        return (tmp_path / name / "loss.csv").read_text().splitlines()

    assert len(curve("whole")) == 11 and curve("killed") == curve("whole")  # losses, MaxVio, bias norms per step
    whole_draws = (tmp_path / "whole.draws").read_text().splitlines()
    killed_draws = (tmp_path / "killed.draws").read_text().splitlines()
    assert killed_draws[:7] == whole_draws[:7] and killed_draws[7:] == whole_draws[6:]  # step 7 ran twice
    a, b = load_file(tmp_path / "whole/model/model.safetensors"), load_file(tmp_path / "killed/model/model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    biases = [k for k in a if k.endswith("e_score_correction_bias")]
    # three MoE layers (moe-tiny's MTP block is dense); loss-free balancing moved every bias
    assert len(biases) == 3 and all(a[k].abs().sum() > 0 for k in biases)
    assert not (tmp_path / "killed" / "checkpoints").exists()  # finished: only the model is kept

    metrics = json.loads((tmp_path / "whole" / "metrics.json").read_text())
    assert 0 < metrics["mfu"] < 1 and metrics["tokens_per_s"] > 0
    assert metrics["kv_bytes_per_token"] == 4 * (32 + 16) * 4  # fp32, (d_c + d_h^R) per layer, 4 layers
    loads = torch.tensor(metrics["expert_loads"])
    assert loads.shape == (3, 8) and torch.allclose(loads.sum(-1), torch.ones(3), atol=1e-3)  # 3 MoE layers
    assert (tmp_path / "whole" / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_multimodal_sigkilled_run_resumes_to_the_same_losses_and_weights(inputs, tmp_path):
    """The multimodal backbone through the same loop, on the rendered world (no corpus): killed at step 5, after the
    checkpoint of step 4, the rerun ends where an unkilled run ends, router loads and processor included."""
    from models.multimodal import MultimodalProcessor

    cfg = PretrainConfig(model="multimodal-tiny", max_steps=6, checkpoint_every=2, val_fraction=0.3, **TINY)
    no_corpus = (inputs[0], "")
    whole = run_steps(cfg, no_corpus, tmp_path / "whole")
    assert whole.returncode == 0, whole.stderr[-3000:]
    killed = run_steps(cfg, no_corpus, tmp_path / "killed", kill_at=5)
    assert killed.returncode == -signal.SIGKILL and checkpoint_steps(tmp_path / "killed" / "checkpoints") == [4]
    rerun = run_steps(cfg, no_corpus, tmp_path / "killed")
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "training multimodal-tiny from step 4 (resumed" in rerun.stderr

    def curve(name):
        return (tmp_path / name / "loss.csv").read_text().splitlines()

    assert curve("whole")[0] == "step,loss,max_vio,bias_norm" and len(curve("whole")) == 7
    assert curve("killed") == curve("whole")
    a, b = load_file(tmp_path / "whole/model/model.safetensors"), load_file(tmp_path / "killed/model/model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(k.startswith("model.audio_encoder.") for k in a) and any(".experts.3." in k for k in a)

    metrics = json.loads((tmp_path / "whole" / "metrics.json").read_text())
    assert 0 < metrics["mfu"] < 1 and metrics["tokens_per_s"] > 0
    assert metrics["val_loss"] < 8  # ln(400) = 6.0 is a uniform guess; 6 steps barely move it
    loads = torch.tensor(metrics["expert_loads"])
    assert loads.shape == (4, 4) and torch.allclose(loads.sum(-1), torch.ones(4), atol=1e-3)  # 4 layers x 4 experts
    assert 0 <= metrics["max_vio_last20pct"] < 3 and len(metrics["bias_norms"]) == 4
    processor = MultimodalProcessor.from_pretrained(tmp_path / "whole" / "model")
    assert processor.slots("image", None) == 4 and "kv_bytes_per_token" not in metrics  # 32 px in 16 px patches


def test_dense_with_tied_embeddings_resumes_exactly_after_a_crash(inputs, tmp_path, caplog):
    """In-process: an exception after the step-3 checkpoint, then a rerun in the same out_dir. The checkpoint's
    safetensors drop the tied output weight; it must come back tied to the embedding."""
    cfg = PretrainConfig(model="dense-tiny", max_steps=6, checkpoint_every=3, **TINY)

    class Crash(Exception):
        pass

    def crash_at_4(step, total, metrics):
        if step == 4:
            raise Crash

    with caplog.at_level(logging.WARNING, logger="alignflow.pretrain"):
        whole = pretrain(cfg, tokenizer_dir=inputs[0], corpus=inputs[1], out_dir=tmp_path / "whole")
    # Six steps form no copying circuit: the metrics say so and the log tells what to do.
    assert all(0 <= whole[f"copy_accuracy_gap{gap}"] < COPY_FORMED for gap in COPY_GAPS)
    assert "has formed); sft needs the circuit" in caplog.text and "Pretrain longer" in caplog.text
    with pytest.raises(Crash):
        pretrain(cfg, tokenizer_dir=inputs[0], corpus=inputs[1], out_dir=tmp_path / "crashed", on_progress=crash_at_4)
    assert checkpoint_steps(tmp_path / "crashed" / "checkpoints") == [3]
    seen = []
    pretrain(cfg, tokenizer_dir=inputs[0], corpus=inputs[1], out_dir=tmp_path / "crashed",
             on_progress=lambda step, total, metrics: seen.append(step))
    assert seen == [4, 5, 6]  # resumed, not retrained from scratch (which would give the same numbers)
    assert (tmp_path / "crashed/loss.csv").read_text() == (tmp_path / "whole/loss.csv").read_text()
    a, b = load_file(tmp_path / "whole/model/model.safetensors"), load_file(tmp_path / "crashed/model/model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_nan_loss_stops_naming_the_step_and_keeps_the_last_checkpoint(inputs, tmp_path, monkeypatch):
    import tasks.pretrain as module

    real_build = module.build_model

    def poisoned_build(cfg, tokenizer):
        model = real_build(cfg, tokenizer)
        calls = []

        def nan_from_fourth_training_forward(mod, args, kwargs, out):
            calls.append(1)
            if len(calls) >= 4:
                out.loss = out.loss * float("nan")
            return out

        model.register_forward_hook(nan_from_fourth_training_forward, with_kwargs=True)
        return model

    monkeypatch.setattr(module, "build_model", poisoned_build)
    seen = []
    cfg = PretrainConfig(model="dense-tiny", max_steps=8, checkpoint_every=2, **TINY)
    with pytest.raises(FloatingPointError, match=r"loss is nan at step 4; .*Last good checkpoint: .*step-2"):
        pretrain(cfg, tokenizer_dir=inputs[0], corpus=inputs[1], out_dir=tmp_path,
                 on_progress=lambda step, total, m: seen.append((step, total)))
    assert seen == [(1, 8), (2, 8), (3, 8)]
    assert checkpoint_steps(tmp_path / "checkpoints") == [2]
    assert not list((tmp_path / "checkpoints").glob(".*"))  # nothing half-written beside it
    weights = load_file(next((tmp_path / "checkpoints" / "step-2").glob("*.safetensors")))
    assert weights and all(torch.isfinite(w).all() for w in weights.values())
    assert not (tmp_path / "model").exists()


def test_two_gloo_ranks_train_the_same_weights(inputs, tmp_path, caplog, monkeypatch):
    import tasks.pretrain as module

    shown = []

    class Recorder:  # stands in for the bar and the Prefect progress artifact
        def __init__(self, step, total, unit):
            pass

        def __call__(self, done, total=None, metrics=None):
            shown.append(done)

        def close(self):
            pass

    monkeypatch.setattr(module, "Progress", Recorder)
    called = []
    cfg = PretrainConfig(model="dense-tiny", max_steps=4, checkpoint_every=2, num_processes=2, **TINY)
    with caplog.at_level("INFO", logger="alignflow.pretrain"):
        metrics = pretrain(cfg, tokenizer_dir=inputs[0], corpus=inputs[1], out_dir=tmp_path,
                           on_progress=lambda step, total, m: called.append((step, total, round(m["loss"], 4))))
    ranks = [json.loads((tmp_path / "ranks" / f"rank-{r}.json").read_text()) for r in (0, 1)]
    assert [(r["rank"], r["world"]) for r in ranks] == [(0, 2), (1, 2)]
    from transformers import AutoModelForCausalLM

    saved = AutoModelForCausalLM.from_pretrained(tmp_path / "model")
    assert ranks[0]["weights_sha256"] == ranks[1]["weights_sha256"] == weights_digest(saved)
    logged = caplog.text
    assert "[rank 0] rank 0 of 2: training dense-tiny" in logged and "[rank 1] rank 1 of 2: training" in logged
    assert "step 4/4" in logged  # rank 0's progress lines reached our logger
    assert shown == [1, 2, 3, 4]  # ... and drove the progress display (log_every=1) and the callback
    losses = [float(line.split(",")[1]) for line in (tmp_path / "loss.csv").read_text().splitlines()[1:]]
    assert called == [(s, 4, round(loss, 4)) for s, loss in enumerate(losses, 1)]
    assert metrics["steps"] == 4 and len((tmp_path / "loss.csv").read_text().splitlines()) == 5


def test_a_failing_rank_is_named(inputs, tmp_path):
    short = tmp_path / "short.txt"
    short.write_text("too short\n")
    cfg = PretrainConfig(model="dense-tiny", max_steps=4, num_processes=2, **TINY)
    with pytest.raises(RuntimeError, match=r"rank-0: InputError: the corpus holds \d+ tokens.*rank-1: InputError"):
        pretrain(cfg, tokenizer_dir=inputs[0], corpus=short, out_dir=tmp_path / "out")
