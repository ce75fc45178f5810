"""import_policy: any local Hugging Face causal-LM directory as the policy to align, instead of the tiny world's backbone.

With `policy.model_dir` set, sft reads this step's output in place of pretrain_dense's, and the chain after it
(critique_revise ... rl, the evaluations) runs unchanged. The directory needs config.json, the weights, and a tokenizer
whose chat template marks the assistant's turns with {% generation %} (sft trains on assistant tokens only; TRL adds
the markers itself for the model families it knows).

The files enter the key by content, and the output holds hard links to them (copies across file systems), so a
checkpoint edited later is imported again on the next run and never changes an output already built.
"""

import os
import shutil
from pathlib import Path

from prefect import task
from pydantic import BaseModel, ConfigDict, Field

from tasks import store


class PolicyConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model_dir: Path | None = Field(None, description="a local Hugging Face causal-LM directory to align; "
                                                     "None: the tiny world's pretrained dense backbone")


def model_files(model_dir: Path) -> list[Path]:
    return sorted(p for p in model_dir.rglob("*") if p.is_file() and not p.name.startswith("."))


def check_policy(cfg: PolicyConfig) -> None:
    """A clear error naming policy.model_dir before any step starts: missing, not a causal LM, or no chat template."""
    from transformers import AutoConfig, AutoTokenizer
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    import models  # noqa: F401  our backbones are causal LMs too

    where = f"policy.model_dir {cfg.model_dir}"
    if not (cfg.model_dir / "config.json").is_file():
        raise store.InputError(f"{where}: no config.json there (expected a Hugging Face model directory)")
    model_type = AutoConfig.from_pretrained(cfg.model_dir).model_type
    if model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise store.InputError(f"{where}: model_type {model_type!r} is not a causal language model")
    try:
        tokenizer = AutoTokenizer.from_pretrained(cfg.model_dir)
    except (OSError, ValueError) as e:
        raise store.InputError(f"{where}: no tokenizer loads from it ({e})") from None
    if not tokenizer.chat_template:
        raise store.InputError(f"{where}: the tokenizer has no chat template")


def link_model(model_dir: Path, out_dir: Path) -> dict:
    target = out_dir / "model"
    shutil.rmtree(target, ignore_errors=True)  # a crashed run's half-linked folder
    total = 0
    for source in model_files(model_dir):
        destination = target / source.relative_to(model_dir)
        destination.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(source, destination)
        except OSError:  # another file system, or links not allowed: copy
            shutil.copy2(source, destination)
        total += source.stat().st_size
    return {"source": str(model_dir), "files": len(model_files(model_dir)), "bytes": total}


@task(name="import_policy", cache_policy=store.NO_PREFECT_CACHE, persist_result=False)
def import_policy_task(cfg: PolicyConfig, st: store.Store):
    ref = st.run("import_policy", cfg, files=model_files(cfg.model_dir), code=[__name__],
                 work=lambda out: link_model(cfg.model_dir, out))
    return store.prefect_state(ref)
