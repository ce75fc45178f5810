"""bench.cai reads `alignflow run --json` as the CLI writes it: the step records of the store's history."""

import json
import subprocess
from types import SimpleNamespace

from pydantic import BaseModel

from bench import cai
from tasks.store import Store


class Cfg(BaseModel):
    seed: int = 0


def fake_run_json(tmp_path, metrics_by_step: dict[str, dict]) -> str:
    """What `alignflow run --json` prints: the store's history of a run whose steps returned these metrics."""
    st = Store(tmp_path)
    for step, metrics in metrics_by_step.items():
        st.run(step, Cfg(), work=lambda out, m=metrics: m)
    return json.dumps({"flow_run_id": "x", "state": "Completed", "steps": st.history})


def stage_metrics(compliance: float, clean: float, helpfulness: float, over_refusal: float) -> dict:
    return {f"{split}/{name}": value for split in cai.SPLITS for name, value in
            (("compliance", compliance), ("clean_refusal_rate", clean), ("helpfulness", helpfulness),
             ("over_refusal", over_refusal))}


def test_run_seed_reads_the_clis_step_records_and_goals_judge_the_means(tmp_path, monkeypatch):
    stdout = fake_run_json(tmp_path, {
        "evaluate_sft": stage_metrics(0.7, 0.0, 0.40, 0.0),
        "evaluate_sl_cai": stage_metrics(0.05, 0.85, 0.38, 0.05),
        "evaluate_rl": stage_metrics(0.02, 0.90, 0.38, 0.04),
        "reward_model": {"heldout_accuracy": 0.92},
    })
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: SimpleNamespace(returncode=0, stdout=stdout))
    args = SimpleNamespace(preset="tiny", store=tmp_path, set=[])
    run = cai.run_seed(0, args)
    assert cai.value(run, "rl", "heldout_phrasing", "clean_refusal_rate") == 0.90
    assert all(met for _, met in cai.goals([run]))
    # a worse rl than sl_cai fails exactly the "no worse" goal, per split
    worse = {**run, "evaluate_rl": stage_metrics(0.02, 0.90, 0.38, 0.08)}
    failed = [check for check, met in cai.goals([run, worse]) if not met]
    assert failed == [f"{split}: rl no worse than sl_cai" for split in cai.SPLITS]
