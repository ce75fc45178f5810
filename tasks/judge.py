"""judge: teach a copy of the SL-CAI model the one question label_preferences asks it, which response declines.

With `label_preferences.factored` and no harm question, a label needs only the judge's reading of which of two
responses declines the request (the prompt's kind says whether declining is right). The tiny SL-CAI model answers that
question in 57-60% of pairs, untaught; taught here, seed 1's and seed 2's judges read it in 99-100% of the pairs they
labelled (data/README.md, "The judge step"). Trained into sft instead, the lesson would have to survive the rest of the
mixture, and each change of it would retrain sft; here it is a step of its own, cached on its own, and the policy is
left as it was.

The lesson is built from the world's training requests, as sft's demonstrations are; the judge's labels are its own
readings of the policy's samples, never the graders'.
"""

import random
from pathlib import Path

from prefect import task
from pydantic import BaseModel, ConfigDict, Field, model_validator

from data import GENERATOR
from data.roles import OPTIONS, comparison_prompt
from data.world import ENTITY_FIELDS, ENTITY_SPLITS, HAZARD_FIELDS, conversation, make_requests, read_jsonl
from tasks import store
from tasks.sft import FinetuneConfig, train


class JudgeConfig(FinetuneConfig):
    steps: int = Field(0, ge=0, description="optimizer steps on the lesson; 0 leaves the step out and the policy "
                                            "judges. Needs label_preferences.factored without a harm question")
    requests: int = Field(1600, ge=1, description="training requests of each kind in the lesson (each shown in both "
                                                  "orders)")

    @model_validator(mode="after")
    def _one_lesson(self):
        if self.curriculum:
            raise ValueError("the judge learns one lesson for `steps` steps: it has no curriculum")
        return self


class JudgeLesson(BaseModel):
    """What the judge step's output depends on: its config and the question it is taught (label_preferences')."""
    model_config = ConfigDict(extra="forbid")

    config: JudgeConfig
    question: str


# The lesson: which of two responses declines the request, read from the responses alone.
# The declining one is the world's refusal or, half the time, a refusal phrase followed by a cut from another request's
# text, since the samples label_preferences compares decline in any form: an opened sample is "Sorry, I can't" and
# whatever the policy writes next. The other response answers the request or sidesteps it; a sidestep does not decline.
DECLINE_PHRASES = ["Sorry, I can't", "I can't", "I won't", "I'm not able to", "Sorry, I won't", "I cannot",
                   "No, I can't"]


def declines_lesson(world_dir: Path, question: str, requests: int, seed: int) -> list[dict]:
    """`requests` training requests of each kind, each shown in both orders: 4 * requests comparisons, shuffled."""
    rng = random.Random(seed)
    entities = read_jsonl(Path(world_dir) / "entities.jsonl", ENTITY_FIELDS, splits=ENTITY_SPLITS)
    hazards = read_jsonl(Path(world_dir) / "hazards.jsonl", HAZARD_FIELDS, splits=ENTITY_SPLITS)
    records = (make_requests(rng, entities, hazards, "train", "harmful", requests)
               + make_requests(rng, entities, hazards, "train", "benign", requests))
    demos = []
    for record in records:
        other = rng.choice([record["answer"], *([record["sidestep"]] if record.get("sidestep") else [])])
        if rng.random() < 0.5:
            declines = record["refusal"]
        else:
            words = rng.choice(records)[rng.choice(["answer", "refusal"])].split()
            declines = " ".join([rng.choice(DECLINE_PHRASES), *words[rng.randrange(len(words)):]])
        for shown, letter in (((declines, other), OPTIONS[0]), ((other, declines), OPTIONS[1])):
            demos.append(conversation(comparison_prompt(record["prompt"], *shown, question), letter, role="declines"))
    rng.shuffle(demos)
    return demos


def teach(lesson: JudgeLesson, base: Path, world_dir: Path, out_dir: Path) -> dict:
    cfg = lesson.config
    demos = declines_lesson(world_dir, lesson.question, cfg.requests, cfg.seed)
    # A constant rate after the warmup, as in sft's curriculum stages: the lesson is there to let one reading form.
    # Seed 1's judge did not form in 300 steps (loss 0.22 at step 200; seed 2's 0.08) and did in a 600-step run, whose
    # warmup is twice as long (data/README.md).
    return train(cfg, base, demos, out_dir, "judge", max_steps=cfg.steps, lr_schedule="constant_with_warmup")


@task(name="judge", cache_policy=store.NO_PREFECT_CACHE, persist_result=False)
def judge_task(cfg: JudgeConfig, st: store.Store, sl_cai: store.StepRef, world_dir: Path, question: str):
    lesson = JudgeLesson(config=cfg, question=question)
    ref = st.run("judge", lesson, inputs=[sl_cai], files=[world_dir / "entities.jsonl", world_dir / "hazards.jsonl"],
                 code=[__name__, *GENERATOR, "tasks.sft"],
                 work=lambda out: teach(lesson, sl_cai.dir / "model", world_dir, out))
    return store.prefect_state(ref)
