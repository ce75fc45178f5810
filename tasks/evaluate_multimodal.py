"""evaluate_multimodal: attribute accuracy per modality on attribute combinations the model never saw.

Every attribute question about each held-out sample (data/multimodal.py: a blue circle, a high tone, a circle moving
up, ...) is answered by greedy generate() and graded by answer_is_right: the value named as whole words and no other
value of the attribute. The training split is measured the same way beside it, so the gap shows how much of what
was learned carries over to new combinations.
"""

import json
from pathlib import Path

from prefect import task
from pydantic import BaseModel, ConfigDict, Field

from tasks import store


class MultimodalEvalConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    heldout_samples: int = Field(300, ge=3, description="held-out samples, a third per modality, every attribute "
                                 "asked about each")
    train_samples: int = Field(90, ge=0, description="training-split samples measured the same way, for the gap")
    max_new_tokens: int = Field(8, ge=1)


def evaluate_multimodal(cfg: MultimodalEvalConfig, model_dir: Path, out_dir: Path) -> dict:
    """Write answers.jsonl (every question, answer and grade) and metrics.json; return the metrics:
    `heldout/<modality>` and `train/<modality>` accuracies, and `heldout/<modality>.<attribute>`."""
    import torch
    from transformers import AutoModelForCausalLM

    import models  # noqa: F401  registers our backbones with the Auto classes
    from data.multimodal import accuracy_by_modality, generated_answers
    from models.multimodal import MultimodalProcessor

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = AutoModelForCausalLM.from_pretrained(model_dir).to(device).eval()
    processor = MultimodalProcessor.from_pretrained(model_dir)
    metrics, answers = {}, []
    for split, n in (("heldout", cfg.heldout_samples), ("train", cfg.train_samples)):
        if not n:
            continue
        records = generated_answers(model, processor, split, n=n, batch_size=64, max_new_tokens=cfg.max_new_tokens)
        answers += [{"split": split, **r} for r in records]
        metrics.update({f"{split}/{m}": round(a, 4) for m, a in accuracy_by_modality(records).items()})
        if split == "heldout":
            by_attribute: dict[str, list[bool]] = {}
            for r in records:
                by_attribute.setdefault(f"heldout/{r['modality']}.{r['attribute']}", []).append(r["right"])
            metrics.update({k: round(sum(v) / len(v), 4) for k, v in by_attribute.items()})
    with open(out_dir / "answers.jsonl", "w") as f:
        f.writelines(json.dumps(a) + "\n" for a in answers)
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    return metrics


@task(name="evaluate_multimodal", cache_policy=store.NO_PREFECT_CACHE, persist_result=False)
def evaluate_multimodal_task(cfg: MultimodalEvalConfig, st: store.Store, model: store.StepRef):
    from prefect.artifacts import create_table_artifact

    ref = st.run("evaluate_multimodal", cfg, inputs=[model], code=[__name__, "data.multimodal"],
                 work=lambda out: evaluate_multimodal(cfg, model.dir / "model", out))
    create_table_artifact([{"metric": k, "value": v} for k, v in ref.metrics.items()], key="evaluate-multimodal",
                          description=f"attribute accuracy of {model.step} from generated answers: held-out "
                                      "attribute combinations and the training split")
    return store.prefect_state(ref)
