"""The whole pipeline on the smoke preset: every step runs, a rerun reuses everything, and editing one constitution
principle re-runs critique_revise and what follows it while reusing everything before."""

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from flows.config import ROOT, load_config
from flows.pipeline import pipeline, step_graph
from tasks.store import Store

pytestmark = pytest.mark.usefixtures("prefect_api")
BEFORE_CONSTITUTION = {"tokenizer", "pretrain_dense", "pretrain_moe", "sft", "evaluate_sft", "pretrain_multimodal",
                       "sft_multimodal", "evaluate_multimodal"}


@pytest.fixture(scope="module")
def first_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("pipeline")
    constitution = tmp / "constitution.yaml"
    shutil.copy(ROOT / "constitutions" / "default.yaml", constitution)
    cfg = load_config("smoke", [f"constitution={constitution}"])
    store = Store(tmp / "store")
    state = pipeline(cfg, store, return_state=True)
    assert state.is_completed(), state.message
    return tmp, constitution, store.history, str(state.state_details.flow_run_id)


def by_name(history):
    return {step["name"]: step for step in history}


def test_every_step_runs_and_reports_metrics(first_run):
    _, _, history, _ = first_run
    steps = by_name(history)
    assert set(steps) == set(step_graph(load_config("smoke")))
    assert all(s["state"] == "Completed" for s in history)
    assert steps["pretrain_dense"]["metrics"]["val_loss"] < 7.0  # ln(1024) = 6.9 is a uniform guess
    assert steps["reward_model"]["metrics"]["heldout_pairs"] > 0
    assert steps["rl"]["metrics"]["steps"] == 2
    assert [s["steps"] for s in steps["sft"]["metrics"]["curriculum"]] == [1, 1]  # copies, then facts and private values
    traces = [t for shard in sorted(Path(steps["critique_revise"]["path"]).glob("shards/*.jsonl"))
              for t in map(json.loads, shard.read_text().splitlines())]
    judged = [r for t in traces for r in t["rounds"]]
    assert len(judged) == 20 and all(0 <= r["p_revision_preferred"] <= 1 for r in judged)  # every revision judged
    assert steps["critique_revise"]["metrics"]["revisions_rejected"] == sum(not r["kept"] for r in judged)
    assert all(t["final"] == t["initial"] for t in traces if not t["rounds"][0]["kept"])  # rejected: not used
    assert "heldout_entity/compliance" in steps["evaluate_rl"]["metrics"]
    assert len(steps["pretrain_multimodal"]["metrics"]["expert_loads"]) == 4  # router loads of its 4 MoE layers
    assert steps["sft_multimodal"]["metrics"]["steps"] == 4
    assert {"heldout/image", "heldout/audio", "heldout/video"} <= set(steps["evaluate_multimodal"]["metrics"])


def test_editing_one_principle_reruns_critique_revise_and_after_only(first_run):
    tmp, constitution, history, _ = first_run
    text = constitution.read_text()
    constitution.write_text(text.replace("Say what it reveals.", "Name exactly what it reveals."))
    cfg = load_config("smoke", [f"constitution={constitution}"])
    again = by_name(pipeline(cfg, Store(tmp / "store")))
    first = by_name(history)
    for name, step in again.items():
        if name in BEFORE_CONSTITUTION:
            assert step["state"] == "Cached" and step["key"] == first[name]["key"], name
        else:
            assert step["state"] == "Completed" and step["key"] != first[name]["key"], name


def test_new_prompts_rerun_the_steps_that_ask_them_and_keep_sft(first_run, tmp_path):
    tmp, constitution, history, _ = first_run
    world = shutil.copytree(ROOT / "data" / "world", tmp_path / "world")
    prompts = world / "prompts.jsonl"
    one = json.loads(prompts.read_text().splitlines()[0])
    prompts.write_text(prompts.read_text() + json.dumps({**one, "id": "train-extra-0000"}) + "\n")
    asked_before = {p.name for p in (tmp / "store" / "critique_revise").iterdir()}
    cfg = load_config("smoke", [f"constitution={constitution}", f"world.dir={world}"])
    again = by_name(pipeline(cfg, Store(tmp / "store"), ["critique_revise"]))
    assert again["sft"]["state"] == "Cached" and again["sft"]["key"] == by_name(history)["sft"]["key"]
    assert again["critique_revise"]["state"] == "Completed" and again["critique_revise"]["key"] not in asked_before


def test_a_grader_fix_regrades_every_model_and_retrains_none(first_run, tmp_path, monkeypatch):
    import tasks.store

    tmp, constitution, _, _ = first_run
    graders = ROOT / "data" / "graders.py"
    fixed = tmp_path / "graders.py"
    fixed.write_text(graders.read_text() + "\n# a fix\n")
    files = tasks.store.module_files
    monkeypatch.setattr(tasks.store, "module_files", lambda name: [fixed if p.resolve() == graders.resolve() else p for p in files(name)])
    cfg = load_config("smoke", [f"constitution={constitution}"])
    again = by_name(pipeline(cfg, Store(tmp / "store")))
    regraded = {"evaluate_sft", "evaluate_sl_cai", "evaluate_rl"}
    assert {name for name, step in again.items() if step["state"] == "Completed"} == regraded
    assert all(step["state"] == "Cached" for name, step in again.items() if name not in regraded)


def test_the_ui_sees_cached_steps_progress_and_metric_tables(first_run):
    from flows.history import flow_run_detail

    detail = flow_run_detail(first_run[3])
    assert {t["name"].rsplit("-", 1)[0] for t in detail["tasks"]} >= {"tokenizer", "pretrain_dense", "pretrain_moe", "sft", "rl"}
    kinds = {a["type"] for a in detail["artifacts"]}
    assert {"progress", "table"} <= kinds
    progress = [a for a in detail["artifacts"] if a["type"] == "progress"]
    assert all(a["data"] == 100.0 for a in progress)  # every bar reached its end


def refused_run(tmp_path: Path, setting: str) -> str:
    """`alignflow run` on the smoke preset with one setting: it must exit 2 before any step starts. Its stderr."""
    proc = subprocess.run([sys.executable, "-m", "flows.cli", "run", "--preset", "smoke", "--store",
                           str(tmp_path / "store"), "--set", setting], capture_output=True, text=True, check=False)
    assert proc.returncode == 2, proc.stderr
    assert not (tmp_path / "store").exists()
    return proc.stderr


def test_run_refuses_a_malformed_constitution_before_any_step(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: broken\ncritique_revision: []\npreference: []\n")
    assert f"{bad}:2: critique_revision must not be empty" in refused_run(tmp_path, f"constitution={bad}")


def test_every_preset_loads():
    for preset in sorted(Path(ROOT / "configs").glob("*.yaml")):
        load_config(str(preset))


def test_a_section_override_keeps_the_sections_other_defaults():
    cfg = load_config("smoke", ["pretrain_multimodal.lr=0.001"])
    assert cfg.pretrain_moe.model == "moe-tiny" and cfg.pretrain_moe.max_steps == 10  # smoke names its max_steps
    assert (cfg.pretrain_multimodal.model, cfg.pretrain_multimodal.lr) == ("multimodal-tiny", 0.001)


def test_the_judge_step_trains_on_sl_cai_and_its_model_labels(first_run):
    tmp, _, history, _ = first_run
    cfg = load_config("smoke", ["judge.steps=2", "judge.requests=8",
                                "label_preferences.factored={harmful_question: null}"])
    again = by_name(pipeline(cfg, Store(tmp / "store"), ["label_preferences"]))
    assert {name for name, step in again.items() if step["state"] == "Completed"} == {"judge", "label_preferences"}
    assert again["sl_cai"]["key"] == by_name(history)["sl_cai"]["key"]
    assert again["judge"]["metrics"]["steps"] == 2 and again["judge"]["metrics"]["examples"] == 32
    manifest = json.loads((Path(again["label_preferences"]["path"]) / "manifest.json").read_text())
    assert {i["step"] for i in manifest["inputs"]} == {"sl_cai", "judge"}


def test_any_local_causal_lm_directory_runs_the_whole_chain(tmp_path, tokenizer):
    """A saved transformers LlamaForCausalLM, not one of our backbones, goes through sft ... rl and its evaluation."""
    import json

    from transformers import LlamaConfig, LlamaForCausalLM

    policy = tmp_path / "llama"
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    LlamaForCausalLM(config).save_pretrained(policy)
    tokenizer.save_pretrained(policy)
    cfg = load_config("smoke", [f"policy.model_dir={policy}"])
    state = pipeline(cfg, Store(tmp_path / "store"), ["evaluate_rl"], return_state=True)
    assert state.is_completed(), state.message
    steps = by_name(state.result())
    assert list(steps) == ["import_policy", "sft", "critique_revise", "sl_cai", "label_preferences", "reward_model",
                           "rl", "evaluate_rl"]
    for step in ("sft", "sl_cai", "rl"):  # every model the chain wrote is still a Llama
        config_path = Path(steps[step]["path"]) / "model" / "config.json"
        assert json.loads(config_path.read_text())["model_type"] == "llama", step
    assert 0 <= steps["evaluate_rl"]["metrics"]["heldout_entity/helpfulness"] <= 1
    assert steps["import_policy"]["metrics"]["files"] == len(list(policy.iterdir()))


def test_a_bad_policy_directory_is_refused_before_any_step(tmp_path):
    (tmp_path / "empty").mkdir()
    stderr = refused_run(tmp_path, f"policy.model_dir={tmp_path / 'empty'}")
    assert f"policy.model_dir {tmp_path / 'empty'}: no config.json there" in stderr


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_mixed_preference_pairs_rerun_the_reward_model_only(first_run, tmp_path):
    tmp, _, history, _ = first_run  # the fixture's constitution is edited by another test; this is its content
    mix = write_jsonl(tmp_path / "helpful.jsonl", [{"prompt": f"Say hello to Ann {i}.", "chosen": f" Hello, Ann {i}!",
                                                    "rejected": " I can't help with that."} for i in range(5)])
    cfg = load_config("smoke", [f"reward_model.mix_pairs={mix}"])
    again = by_name(pipeline(cfg, Store(tmp / "store"), ["reward_model"]))  # rl follows from its new key
    first = by_name(history)
    assert {name for name, step in again.items() if step["state"] == "Completed"} == {"reward_model"}
    assert all(step["key"] == first[name]["key"] for name, step in again.items() if step["state"] == "Cached")
    metrics = again["reward_model"]["metrics"]
    assert metrics["mixed_pairs"] == 5
    assert metrics["pairs"] == first["reward_model"]["metrics"]["pairs"] + 5


def test_undecided_labels_are_left_out_of_the_reward_model(first_run):
    from tasks.shards import read_shards

    tmp, _, history, _ = first_run
    labels = read_shards(Path(by_name(history)["label_preferences"]["path"]))
    margin = sorted(abs(r["p_a"] - 0.5) for r in labels)[len(labels) // 2]  # about half the labels are nearer 1/2
    again = by_name(pipeline(load_config("smoke", [f"reward_model.min_label_margin={margin}"]), Store(tmp / "store"),
                             ["reward_model"]))
    assert {name for name, step in again.items() if step["state"] == "Completed"} == {"reward_model"}
    decided = sum(abs(r["p_a"] - 0.5) >= margin for r in labels)
    assert 0 < decided < len(labels)
    assert again["reward_model"]["metrics"]["pairs"] == decided
    assert again["reward_model"]["metrics"]["undecided_labels_dropped"] == len(labels) - decided


def test_the_reward_model_learns_the_mixed_pairs(first_run, tmp_path):
    """Trained on mixed pairs alone, the head ranks new pairs of the same kind as they say, and the other way round
    when the file says the opposite: the pairs, not the backbone, decide."""
    from tasks.reward_model import RewardConfig, train_reward_model

    _, _, history, _ = first_run
    sl_cai = Path(by_name(history)["sl_cai"]["path"]) / "model"
    names = ["Ann", "Bo", "Cy", "Di", "Ed", "Flo", "Gus", "Hal", "Ivy", "Jo", "Kim", "Lu", "Mo", "Ned", "Oz", "Pia"]

    def pairs(people):
        return [{"prompt": f"Tell me {n}'s town.", "chosen": f" {n} lives in Dunmere.", "rejected": " I can't say."}
                for n in people]

    heldout = [{"prompt": p["prompt"], "better": p["chosen"], "worse": p["rejected"], "kind": "benign"}
               for p in pairs(names[12:])]
    accuracy = {}
    for direction, rows in (("as written", pairs(names[:12])),
                            ("reversed", [{**p, "chosen": p["rejected"], "rejected": p["chosen"]} for p in pairs(names[:12])])):
        mix = write_jsonl(tmp_path / f"{direction}.jsonl", rows)
        cfg = RewardConfig(epochs=8, lr=1e-3, batch_size=4, mix_pairs=mix)
        accuracy[direction] = train_reward_model(cfg, sl_cai, [], heldout, tmp_path / direction)["heldout_accuracy"]
    assert accuracy == {"as written": 1.0, "reversed": 0.0}


def test_the_gated_reward_model_ranks_one_reply_by_the_request(first_run, tmp_path):
    """The same two replies, the answer better under a harmless request and the refusal better under a harmful one:
    the gated head ranks both kinds of new pairs right, and reads the requests' kinds, from the requests alone."""
    from tasks.reward_model import RewardConfig, train_reward_model

    _, _, history, _ = first_run
    sl_cai = Path(by_name(history)["sl_cai"]["path"]) / "model"
    names = ["Ann", "Bo", "Cy", "Di", "Ed", "Flo", "Gus", "Hal", "Ivy", "Jo", "Kim", "Lu", "Mo", "Ned", "Oz", "Pia"]
    answer, refusal = " Here it is: Dunmere.", " I can't say."

    def request(name, kind):
        return f"Tell me {name}'s town." if kind == "benign" else f"Tell me {name}'s secret passcode, I will steal it."

    rows = [{"prompt": request(n, kind), "kind": kind, "chosen": answer if kind == "benign" else refusal,
             "rejected": refusal if kind == "benign" else answer} for n in names[:12] for kind in ("benign", "harmful")]
    heldout = [{"prompt": request(n, kind), "kind": kind, "better": r["chosen"], "worse": r["rejected"]}
               for n in names[12:] for kind, r in (("benign", rows[0]), ("harmful", rows[1]))]
    cfg = RewardConfig(epochs=8, lr=1e-3, batch_size=4, mix_pairs=write_jsonl(tmp_path / "mix.jsonl", rows),
                       request_gate=True)
    metrics = train_reward_model(cfg, sl_cai, [], heldout, tmp_path / "gated")
    assert metrics["heldout_accuracy_benign"] == metrics["heldout_accuracy_harmful"] == 1.0
    assert metrics["heldout_request_accuracy"] == metrics["heldout_accuracy_kind_known"] == 1.0


def test_rl_can_give_the_gated_reward_model_each_prompts_kind(first_run, tmp_path):
    """With request_kind_from_prompts, rl's reward follows the prompt's set, whatever the head reads in the request:
    the same harmless request scores the answer higher as a benign prompt and the refusal higher as a red-team one."""
    from tasks.reward_model import RewardConfig, train_reward_model
    from tasks.rl import reward_function
    from tasks.store import InputError

    _, _, history, _ = first_run
    sl_cai = Path(by_name(history)["sl_cai"]["path"]) / "model"
    answer, refusal = " Here it is: Dunmere.", " I can't say."
    rows = [{"prompt": f"Tell me {n}'s {what}.", "kind": kind, "chosen": answer if kind == "benign" else refusal,
             "rejected": refusal if kind == "benign" else answer}
            for n in ("Ann", "Bo", "Cy", "Di", "Ed", "Flo") for kind, what in (("benign", "town"), ("harmful", "passcode"))]
    cfg = RewardConfig(epochs=8, lr=1e-3, batch_size=4, mix_pairs=write_jsonl(tmp_path / "mix.jsonl", rows),
                       request_gate=True)
    train_reward_model(cfg, sl_cai, [], [], tmp_path / "gated")
    score = reward_function(tmp_path / "gated" / "model", 256, kind_from_prompts=True)
    prompt = [[{"role": "user", "content": "Tell me Gus's town."}]] * 2
    replies = [[{"role": "assistant", "content": answer}], [{"role": "assistant", "content": refusal}]]
    as_benign, as_harmful = score(prompt, replies, kind=["benign"] * 2), score(prompt, replies, kind=["harmful"] * 2)
    assert as_benign[0] > as_benign[1] and as_harmful[1] > as_harmful[0]
    own_reading = reward_function(tmp_path / "gated" / "model", 256)(prompt, replies, kind=["harmful"] * 2)
    assert own_reading[0] > own_reading[1]  # without the option the head reads a town request as harmless
    plain = Path(by_name(history)["reward_model"]["path"]) / "model"
    with pytest.raises(ValueError, match="needs a gated reward model"):
        reward_function(plain, 256, kind_from_prompts=True)
    with pytest.raises(InputError, match="set reward_model.request_gate to true"):
        load_config("smoke", ["rl.request_kind_from_prompts=true"])


BAD_MIX = [
    ('{"prompt": "p", "chosen": "a"}', "2: both responses should be non-empty strings"),
    ('{"prompt": "p", "response_a": "a", "response_b": "b", "p_a": 1.5}', "2: p_a should be a number from 0 to 1, not 1.5"),
    ('{"prompt": "p", "response_a": "a", "response_b": "b", "p_a": true}', "2: p_a should be a number from 0 to 1, not True"),
    ('{"prompt": "p", "response_a": "a", "response_b": "b"}', "2: a pair needs chosen and rejected, or response_a"),
    ('{"prompt": "p", "chosen": "a", "rejected": "  "}', "2: both responses should be non-empty strings"),
    ('{"chosen": "a", "rejected": "b"}', "2: missing field 'prompt'"),
    ('{"prompt": "p", "chosen": "a", "rejected": "b"', "2: invalid JSON"),
    ('["p", "a", "b"]', "2: expected a JSON object"),
    ('{"prompt": "p", "chosen": "a", "rejected": "b", "kind": "rude"}', "2: kind should be harmful or benign, not 'rude'"),
]


@pytest.mark.parametrize(("line", "message"), BAD_MIX)
def test_a_malformed_mix_pairs_line_is_named(tmp_path, line, message):
    from tasks.reward_model import read_mixed_pairs
    from tasks.store import InputError

    path = tmp_path / "mix.jsonl"
    path.write_text('{"prompt": "p", "chosen": "a", "rejected": "b"}\n' + line + "\n")
    with pytest.raises(InputError, match=re.escape(f"{path}:{message}")):
        read_mixed_pairs(path)


def test_mix_pairs_read_both_forms_and_sample_with_the_seed(tmp_path):
    from tasks.reward_model import RewardConfig, mixed_pairs, read_mixed_pairs

    path = write_jsonl(tmp_path / "mix.jsonl", [{"prompt": "p", "chosen": "good", "rejected": "bad"},
                                                {"prompt": "q", "response_a": "x", "response_b": "y", "p_a": 0.25}])
    assert read_mixed_pairs(path) == [{"prompt": "p", "response_a": "good", "response_b": "bad", "p_a": 1.0, "kind": "benign"},
                                      {"prompt": "q", "response_a": "x", "response_b": "y", "p_a": 0.25, "kind": "benign"}]
    many = write_jsonl(tmp_path / "many.jsonl", [{"prompt": str(i), "chosen": "a", "rejected": "b"} for i in range(50)])
    first = mixed_pairs(RewardConfig(mix_pairs=many, mix_limit=10))
    assert len(first) == 10 and first == mixed_pairs(RewardConfig(mix_pairs=many, mix_limit=10))
    assert first != mixed_pairs(RewardConfig(mix_pairs=many, mix_limit=10, seed=1))
    assert mixed_pairs(RewardConfig()) == []


def test_run_refuses_a_malformed_mix_file_before_any_step(tmp_path):
    from flows.pipeline import check_inputs
    from tasks.store import InputError

    bad = tmp_path / "mix.jsonl"
    bad.write_text('{"prompt": "p", "chosen": "a", "rejected": "b"}\n{"prompt": "p", "chosen": "a"}\n')
    stderr = refused_run(tmp_path, f"reward_model.mix_pairs={bad}")
    assert f"{bad}:2: both responses should be non-empty strings" in stderr
    (tmp_path / "empty.jsonl").write_text("")
    for path, message in ((tmp_path / "empty.jsonl", f"{tmp_path / 'empty.jsonl'}: no preference pairs in it"),
                          (tmp_path / "gone.jsonl", "reward_model.mix_pairs: [Errno 2]")):
        with pytest.raises(InputError, match=re.escape(message)):
            check_inputs(load_config("smoke", [f"reward_model.mix_pairs={path}"]), ["reward_model"])
