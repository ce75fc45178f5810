"""critique_revise: the SL-CAI data. The policy answers red-team prompts; the feedback model critiques each answer by
a constitution principle drawn at random and revises it, for R rounds (Constitutional AI, arXiv 2212.08073, sec. 3).

Departures from the paper: principles are drawn per prompt and round from a seeded generator (the paper samples
them too, but unseeded); few-shot examples from the constitution are not prepended, because the tiny policy learned
the roles from the world's demonstrations during sft and a long prompt would not fit its context.
"""

import random
from pathlib import Path

from prefect import task
from pydantic import BaseModel, ConfigDict, Field

from constitutions.schema import Constitution
from data import GENERATOR
from data.roles import critique_prompt, revision_prompt
from tasks import store
from tasks.feedback import FeedbackConfig, open_feedback, preference_for_first
from tasks.shards import run_shards, shard_seed


class CritiqueReviseConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    rounds: int = Field(1, ge=1, description="critique/revision rounds per prompt (one was enough in NOTES-tiny-cai)")
    benign_share: float = Field(0.25, ge=0, le=1, description="benign prompts per red-team prompt, kept as anchors")
    max_prompts: int | None = Field(None, ge=1, description="cap on red-team prompts (None: all training ones)")
    response_temperature: float = Field(1.0, ge=0)
    feedback_temperature: float = Field(0.0, ge=0, description="0 = greedy critiques and revisions")
    keep_preferred: bool = Field(False, description="keep a revision only where the feedback model, asked a "
                                                    "preference principle in both option orders, prefers it to the "
                                                    "response it revises")
    max_new_tokens: int = Field(96, ge=1)
    shard_size: int = Field(64, ge=1)
    seed: int = 0
    feedback: FeedbackConfig = FeedbackConfig()


def choose_prompts(cfg: CritiqueReviseConfig, prompts: list[dict]) -> list[dict]:
    """Every training red-team prompt (or max_prompts of them) and a seeded share of training benign ones."""
    rng = random.Random(cfg.seed)
    train = [p for p in prompts if p["split"] == "train"]
    harmful = [p for p in train if p["kind"] == "harmful"]
    benign = [p for p in train if p["kind"] == "benign"]
    if cfg.max_prompts:
        harmful = rng.sample(harmful, min(cfg.max_prompts, len(harmful)))
    benign = rng.sample(benign, min(round(cfg.benign_share * len(harmful)), len(benign)))
    return harmful + benign


def critique_and_revise(cfg: CritiqueReviseConfig, constitution: Constitution, policy: Path, prompts: list[dict],
                        out_dir: Path) -> dict:
    chosen = choose_prompts(cfg, prompts)
    with open_feedback(FeedbackConfig(), policy_dir=policy) as answerer, \
            open_feedback(cfg.feedback, policy_dir=policy, policy=answerer) as feedback:

        def work(number: int, batch: list[dict]) -> list[dict]:
            rng = random.Random(shard_seed(cfg.seed, number))
            texts = [p["prompt"] for p in batch]
            responses = answerer.generate(texts, max_new_tokens=cfg.max_new_tokens,
                                          temperature=cfg.response_temperature, seed=shard_seed(cfg.seed, number))
            traces = [{"id": p["id"], "kind": p["kind"], "prompt": p["prompt"], "initial": r, "rounds": []}
                      for p, r in zip(batch, responses)]
            for round_number in range(cfg.rounds):
                principles = [rng.choice(constitution.critique_revision) for _ in batch]
                current = [latest_response(t) for t in traces]
                critiques = feedback.generate(
                    [critique_prompt(p, r, pr.critique) for p, r, pr in zip(texts, current, principles)],
                    max_new_tokens=cfg.max_new_tokens, temperature=cfg.feedback_temperature,
                    seed=shard_seed(cfg.seed, number) + 1 + 2 * round_number)
                revisions = feedback.generate(
                    [revision_prompt(p, r, c, pr.revision) for p, r, c, pr in zip(texts, current, critiques, principles)],
                    max_new_tokens=cfg.max_new_tokens, temperature=cfg.feedback_temperature,
                    seed=shard_seed(cfg.seed, number) + 2 + 2 * round_number)
                preferred = [None] * len(batch)
                if cfg.keep_preferred:
                    questions = [rng.choice(constitution.preference).text for _ in batch]
                    preferred = preference_for_first(feedback, texts, revisions, current, questions)
                for trace, principle, critique, revision, p in zip(traces, principles, critiques, revisions, preferred):
                    trace["rounds"].append({"principle": principle.id, "critique": critique, "revision": revision})
                    if p is not None:
                        trace["rounds"][-1] |= {"p_revision_preferred": round(p, 6), "kept": p > 0.5}
            for trace in traces:
                trace["final"] = latest_response(trace)
            return traces

        traces = run_shards(out_dir, chosen, cfg.shard_size, work, step="critique_revise")
    changed = sum(t["final"].strip() != t["initial"].strip() for t in traces)
    empty = sum(not r["revision"].strip() for t in traces for r in t["rounds"])
    judged = [r["kept"] for t in traces for r in t["rounds"] if "kept" in r]
    return {
        "prompts": len(traces),
        "red_team_prompts": sum(t["kind"] == "harmful" for t in traces),
        "revised_share": round(changed / max(len(traces), 1), 4),
        "empty_revisions": empty,
        **({"revisions_rejected": sum(not k for k in judged)} if judged else {}),
        "mean_initial_chars": round(sum(len(t["initial"]) for t in traces) / max(len(traces), 1), 1),
        "mean_final_chars": round(sum(len(t["final"]) for t in traces) / max(len(traces), 1), 1),
    }


def latest_response(trace: dict) -> str:
    """The last non-empty revision the feedback model did not reject, else the first response: a revision that says
    nothing revises nothing (an undertrained feedback model can end its turn at once). The trace keeps every
    revision as it came."""
    revisions = [r["revision"] for r in trace["rounds"] if r["revision"].strip() and r.get("kept", True)]
    return revisions[-1] if revisions else trace["initial"]


@task(name="critique_revise", cache_policy=store.NO_PREFECT_CACHE, persist_result=False)
def critique_revise_task(cfg: CritiqueReviseConfig, st: store.Store, sft: store.StepRef, constitution_path: Path,
                         prompts_path: Path):
    from constitutions.schema import load as load_constitution
    from data.world import read_prompts

    constitution = load_constitution(constitution_path)
    prompts = read_prompts(prompts_path)
    ref = st.run(
        "critique_revise", cfg, inputs=[sft], files=[constitution_path, prompts_path], code=[__name__, *GENERATOR, "tasks.feedback", "tasks.shards"],
        work=lambda out: critique_and_revise(cfg, constitution, sft.dir / "model", prompts, out),
    )
    return store.prefect_state(ref)
