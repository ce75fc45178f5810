"""Auxiliary-loss-free load balancing (Wang et al., arXiv 2408.15664; DeepSeek-V3 sec. 2.1.2) under the HF Trainer.

Each Gate adds up its expert loads over the training forwards of one optimizer step; after the step the callback
moves every bias by gamma towards balance and clears the counts. The bias only selects experts (models/moe.py:route),
so the gate values, and the gradient, never see it.
"""

import torch
import torch.distributed as dist
from transformers import TrainerCallback

from models.moe import Gate


def bias_update(bias: torch.Tensor, load: torch.Tensor, gamma: float) -> torch.Tensor:
    """b_i <- b_i + gamma * sign(mean_j load_j - load_i)  (arXiv 2408.15664 Alg. 1, DeepSeek-V3 sec. 2.1.2).
    An overloaded expert's bias goes down, an underloaded one's up; an exactly average one stays."""
    return bias + gamma * torch.sign(load.mean() - load)


def max_violation(load: torch.Tensor) -> float:
    """MaxVio = max_i load_i / mean_i load_i - 1  (arXiv 2408.15664 eq. 4); 0 is perfect balance."""
    return float(load.max() / load.mean() - 1)


def routing_stats(model) -> dict[str, list]:
    """Per MoE layer (MTP layers last), the expert loads of the last forward and their MaxVio."""
    loads = [gate.last_load for gate in model.modules() if isinstance(gate, Gate) and gate.last_load is not None]
    return {"loads": [load.tolist() for load in loads], "max_vio": [max_violation(load) for load in loads]}


@torch.no_grad()
def update_biases(model, gamma: float) -> list[float]:
    """Apply bias_update to every gate from the loads counted since the last call; returns each layer's MaxVio."""
    violations = []
    for gate in model.modules():
        if not isinstance(gate, Gate) or gate.load_since_update is None:
            continue
        load = gate.load_since_update
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(load)  # every rank applies the same update, from the global batch's loads
        bias = gate.e_score_correction_bias
        bias.copy_(bias_update(bias.float(), load, gamma))
        gate.load_since_update = None
        violations.append(max_violation(load))
    return violations


class LoadBalanceCallback(TrainerCallback):
    """Updates the routing biases after each optimizer step and logs the step's MaxVio (mean and max over layers)."""

    def __init__(self, gamma: float | None = None):
        self.gamma = gamma  # None: the model's config.bias_update_speed
        self.last_max_vio: list[float] = []

    def on_step_end(self, args, state, control, model=None, **kwargs):
        gamma = self.gamma if self.gamma is not None else model.config.bias_update_speed
        self.last_max_vio = update_biases(model, gamma)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is None or not self.last_max_vio:
            return
        stats = {"moe_max_vio_mean": sum(self.last_max_vio) / len(self.last_max_vio), "moe_max_vio_max": max(self.last_max_vio)}
        logs.update(stats)  # seen by the callbacks after this one
        # The Trainer copied `logs` into the history before calling us; the run history should hold MaxVio too.
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(stats)
