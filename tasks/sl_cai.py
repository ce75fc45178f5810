"""sl_cai: supervised learning on the revisions (Constitutional AI, arXiv 2212.08073, sec. 3).

Continues from the helpful sft model, as the paper fine-tunes its helpful model. The revisions are mixed with benign
conversations, so helpfulness is kept, and with a replay of the feedback-role demonstrations, so the model can still
judge when label_preferences asks it to (NOTES-tiny-cai 3: training SL-CAI from scratch gave perfect refusals and
17.5% helpfulness).
"""

import random
from pathlib import Path

from prefect import task
from pydantic import Field

from tasks import store
from tasks.sft import FinetuneConfig, finetune, finetune_files


class SLCAIConfig(FinetuneConfig):
    epochs: float = Field(2.0, gt=0)
    benign_per_revision: float = Field(1.0, ge=0, description="benign conversations mixed in per revision")
    demo_replay: float = Field(0.5, ge=0, description="feedback-role demonstrations mixed in per revision")


def sl_cai_conversations(cfg: SLCAIConfig, traces: list[dict], benign: list[dict], demos: list[dict]) -> list[dict]:
    rng = random.Random(cfg.seed)
    revised = [{"messages": [{"role": "user", "content": t["prompt"]}, {"role": "assistant", "content": t["final"]}]}
               for t in traces if t["final"].strip()]
    if not revised:
        raise store.InputError(f"critique_revise left no usable response: all {len(traces)} finals are empty")
    mix = revised
    mix += rng.sample(benign, min(round(cfg.benign_per_revision * len(revised)), len(benign)))
    mix += rng.sample(demos, min(round(cfg.demo_replay * len(revised)), len(demos)))
    rng.shuffle(mix)
    return mix


@task(name="sl_cai", cache_policy=store.NO_PREFECT_CACHE, persist_result=False)
def sl_cai_task(cfg: SLCAIConfig, st: store.Store, sft: store.StepRef, traces: store.StepRef, world_dir: Path):
    from data.world import benign_conversations, feedback_demos
    from tasks.shards import read_shards

    def work(out: Path) -> dict:
        data = sl_cai_conversations(cfg, read_shards(traces.dir), benign_conversations(world_dir),
                                    feedback_demos(world_dir))
        return finetune(cfg, sft.dir / "model", data, out, step="sl_cai")

    ref = st.run("sl_cai", cfg, inputs=[sft, traces], files=finetune_files(world_dir), code=[__name__, "tasks.sft"],
                 work=work)
    return store.prefect_state(ref)
