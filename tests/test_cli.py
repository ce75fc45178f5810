"""`alignflow` as a user runs it: a subprocess against one Prefect test server, on a store in a temp dir."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import SMALL_TEXT

pytestmark = pytest.mark.usefixtures("prefect_api")


@pytest.fixture
def world(tmp_path) -> Path:
    """A world directory holding a small corpus: enough for the tokenizer step."""
    world = tmp_path / "world"
    world.mkdir()
    (world / "corpus.txt").write_text("\n".join(SMALL_TEXT * 20) + "\n")
    return world


def alignflow(*args, store: Path, world: Path | None = None, check=True) -> subprocess.CompletedProcess:
    command, rest = [sys.executable, "-m", "flows.cli", args[0], "--store", str(store)], list(args[1:])
    command += ["--set", "tokenizer.vocab_size=400"]  # the test's later --set items override this one
    if world is not None:
        command += ["--set", f"world.dir={world}"]
    command += rest
    proc = subprocess.run(command, check=False, capture_output=True, text=True, env=os.environ)
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}: {proc.stderr[-2000:]}")
    return proc


def steps_of(proc) -> dict:
    return {s["name"]: s for s in json.loads(proc.stdout)["steps"]}


def snapshot(root: Path) -> dict:
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in root.rglob("*")} if root.exists() else {}


def test_second_run_is_cached_and_does_no_work(tmp_path, world):
    store = tmp_path / "store"
    first = steps_of(alignflow("run", "tokenizer", "--json", store=store, world=world))["tokenizer"]
    before = snapshot(store / "tokenizer" / first["key"])
    second = steps_of(alignflow("run", "tokenizer", "--json", store=store, world=world))["tokenizer"]
    assert (first["state"], second["state"]) == ("Completed", "Cached")
    assert second["path"] == first["path"] and second["metrics"] == first["metrics"]
    assert snapshot(store / "tokenizer" / first["key"]) == before  # nothing rewritten


def test_set_changes_the_key_and_deleting_the_output_recomputes(tmp_path, world):
    store = tmp_path / "store"
    base = steps_of(alignflow("run", "tokenizer", "--json", store=store, world=world))["tokenizer"]
    bigger = steps_of(alignflow("run", "tokenizer", "--json", "--set", "tokenizer.vocab_size=450",
                                store=store, world=world))["tokenizer"]
    assert bigger["key"] != base["key"] and bigger["state"] == "Completed"
    shutil.rmtree(base["path"])
    again = steps_of(alignflow("run", "tokenizer", "--json", store=store, world=world))["tokenizer"]
    assert again["state"] == "Completed" and again["key"] == base["key"]
    assert (Path(again["path"]) / "manifest.json").exists()


def test_sigkill_during_the_step_then_rerun(tmp_path, world):
    (world / "corpus.txt").write_text("\n".join(f"{line} number {i}" for i, line in enumerate(SMALL_TEXT * 400)))
    store = tmp_path / "store"
    command = [sys.executable, "-m", "flows.cli", "run", "tokenizer", "--store", str(store),
               "--set", f"world.dir={world}", "--set", "tokenizer.vocab_size=2000"]
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    while not list((store / "tokenizer").glob("*.partial")) and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not [p for p in (store / "tokenizer").iterdir() if p.name not in (".locks",) and p.suffix != ".partial"]
    done = subprocess.run([*command, "--json"], capture_output=True, text=True, check=True)
    step = steps_of(done)["tokenizer"]
    assert step["state"] == "Completed" and (Path(step["path"]) / "tokenizer.json").exists()


def test_two_runs_at_once_share_one_output(tmp_path, world):
    store = tmp_path / "store"
    command = [sys.executable, "-m", "flows.cli", "run", "tokenizer", "--json", "--store", str(store),
               "--set", f"world.dir={world}", "--set", "tokenizer.vocab_size=400"]
    procs = [subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate() for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs[0][1][-1000:] + outs[1][1][-1000:]
    states = sorted(json.loads(out)["steps"][0]["state"] for out, _ in outs)
    assert states == ["Cached", "Completed"]
    outputs = [p for p in (store / "tokenizer").iterdir() if p.name != ".locks"]
    assert len(outputs) == 1 and (outputs[0] / "manifest.json").exists()


@pytest.mark.parametrize(
    ("args", "preset_text", "expected"),
    [
        (["--set", "tokenizer.vocab_sise=500"], None, "--set tokenizer.vocab_sise=500: tokenizer.vocab_sise: unknown field"),
        (["--set", "tokenizer.vocab_size=many"], None, "tokenizer.vocab_size: Input should be a valid integer"),
        (["--set", "nonsense"], None, "--set nonsense: expected step.field=value"),
        (["--set", "nonsense=1"], None, "--set nonsense=1: nonsense: unknown field"),
        ([], "tokenizer:\n  vocab_size: 500\n  min_frequency: often\n", "bad.yaml:3: tokenizer.min_frequency"),
        ([], "tokenizer:\n  vocab_size: [500\n", "bad.yaml:3: YAML error"),
        ([], "tokenizr:\n  vocab_size: 500\n", "bad.yaml:1: tokenizr: unknown field"),
        (["--preset", "no-such-preset"], None, "preset 'no-such-preset' not found"),
        (["no_such_step"], None, "unknown step 'no_such_step'"),
    ],
)
def test_bad_input_exits_2_naming_the_field_and_leaves_the_store_alone(tmp_path, world, args, preset_text, expected):
    store = tmp_path / "store"
    if preset_text is not None:
        (tmp_path / "bad.yaml").write_text(preset_text)
        args = [*args, "--preset", str(tmp_path / "bad.yaml")]
    proc = alignflow("run", *args, store=store, world=world, check=False)
    assert proc.returncode == 2, proc.stderr
    assert expected in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not store.exists()


def test_malformed_world_file_exits_2_with_file_and_line(tmp_path, world):
    store = tmp_path / "store"
    with open(world / "corpus.txt", "ab") as f:
        f.write(b"a fine line\nbroken \xff\xfe bytes\n")
    lines = (world / "corpus.txt").read_bytes().count(b"\n")
    proc = alignflow("run", "tokenizer", store=store, world=world, check=False)
    assert proc.returncode == 2
    assert f"corpus.txt:{lines}: not UTF-8" in proc.stderr
    assert not store.exists()


def test_runs_lists_the_flow_run_and_its_task_runs(tmp_path, world):
    store = tmp_path / "store"
    run_id = json.loads(alignflow("run", "tokenizer", "--json", store=store, world=world).stdout)["flow_run_id"]
    listed = json.loads(subprocess.run([sys.executable, "-m", "flows.cli", "runs", "--json", "--limit", "50"],
                                       capture_output=True, text=True, check=True).stdout)
    assert run_id in [r["id"] for r in listed]
    detail = json.loads(subprocess.run([sys.executable, "-m", "flows.cli", "runs", "show", run_id, "--json"],
                                       capture_output=True, text=True, check=True).stdout)
    assert [t["name"].rsplit("-", 1)[0] for t in detail["tasks"]] == ["tokenizer"]
    assert detail["state"] == "Completed"


def test_steps_and_config_show():
    steps = subprocess.run([sys.executable, "-m", "flows.cli", "steps"], capture_output=True, text=True, check=True)
    assert "sft" in steps.stdout and "critique_revise      <- sft" in steps.stdout
    shown = subprocess.run([sys.executable, "-m", "flows.cli", "config", "show", "--set", "sft.epochs=1.5"],
                           capture_output=True, text=True, check=True)
    import yaml

    resolved = yaml.safe_load(shown.stdout)
    assert resolved["sft"]["epochs"] == 1.5 and resolved["tokenizer"]["vocab_size"] == 2048


def test_top_level_seed_seeds_every_step_that_sets_none():
    from flows.config import load_config

    cfg = load_config("tiny", ["seed=2", "rl.seed=7"])
    assert (cfg.pretrain_dense.seed, cfg.sft.seed, cfg.critique_revise.seed, cfg.rl.seed) == (2, 2, 2, 7)
    assert load_config("tiny", []).sft.seed == 0
