"""The store's contracts (DESIGN.md 2-4), exercised on the plain API without Prefect."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from pydantic import BaseModel

from tasks.store import MANIFEST, StepFailed, Store


class Cfg(BaseModel):
    size: int = 1


def write_output(out: Path, text: str = "done") -> dict:
    (out / "result.txt").write_text(text)
    return {"chars": len(text)}


def test_second_run_reuses_and_does_no_work(tmp_path):
    st = Store(tmp_path)
    calls = []
    first = st.run("a", Cfg(), work=lambda out: calls.append(1) or write_output(out))
    second = st.run("a", Cfg(), work=lambda out: calls.append(1) or write_output(out))
    assert calls == [1]
    assert (first.cached, second.cached) == (False, True)
    assert (first.key, first.path, first.output_id) == (second.key, second.path, second.output_id)
    assert json.loads((first.dir / MANIFEST).read_text())["metrics"] == {"chars": 4}


def test_key_covers_config_inputs_and_file_contents(tmp_path):
    st = Store(tmp_path / "store")
    data = tmp_path / "data.txt"
    data.write_text("one")
    base = st.run("a", Cfg(), files=[data], work=write_output)
    assert st.run("a", Cfg(size=2), files=[data], work=write_output).key != base.key
    data.write_text("two")
    assert st.run("a", Cfg(), files=[data], work=write_output).key != base.key
    data.write_text("one")
    assert st.run("a", Cfg(), files=[data], work=write_output).cached
    down = st.run("b", Cfg(), inputs=[base], work=write_output)
    assert st.run("b", Cfg(), inputs=[st.lookup("a", base.key)], work=write_output).key == down.key


def test_deleted_output_recomputes_it_and_everything_after(tmp_path):
    st = Store(tmp_path)
    a = st.run("a", Cfg(), work=write_output)
    b = st.run("b", Cfg(), inputs=[a], work=write_output)
    os.system(f"rm -rf {a.path}")
    a2 = st.run("a", Cfg(), work=write_output)
    b2 = st.run("b", Cfg(), inputs=[a2], work=write_output)
    assert not a2.cached and Path(a2.path).is_dir()
    assert not b2.cached and b2.key != b.key


def test_directory_without_manifest_is_not_an_output(tmp_path):
    st = Store(tmp_path)
    a = st.run("a", Cfg(), work=write_output)
    (a.dir / MANIFEST).unlink()
    assert st.lookup("a", a.key) is None
    again = st.run("a", Cfg(), work=lambda out: write_output(out, "fresh"))
    assert not again.cached and (again.dir / "result.txt").read_text() == "fresh"


def test_failed_work_leaves_no_output_and_names_the_step(tmp_path):
    st = Store(tmp_path)

    def broken(out):
        (out / "half.txt").write_text("half")
        raise RuntimeError("disk on fire")

    with pytest.raises(StepFailed, match="step a failed: disk on fire"):
        st.run("a", Cfg(), work=broken)
    assert st.history[-1]["state"] == "Failed"
    assert not [p for p in (tmp_path / "a").iterdir() if not p.name.endswith((".partial", ".locks"))]


KILLABLE = textwrap.dedent("""
    import sys, time
    from pydantic import BaseModel
    from tasks.store import Store

    class Cfg(BaseModel):
        size: int = 1

    def work(out):
        for i in range(50):                      # a slow step that keeps its progress in its work dir
            shard = out / f"shard-{i:03d}.txt"
            if not shard.exists():
                tmp = shard.with_suffix(".tmp")
                tmp.write_text(str(i))
                tmp.rename(shard)
                time.sleep(0.01)
        return {"shards": len(list(out.glob("shard-*.txt")))}

    ref = Store(sys.argv[1]).run("slow", Cfg(), work=work)
    print(ref.metrics["shards"], ref.cached)
""")


def test_sigkill_at_any_moment_then_rerun_completes(tmp_path):
    root = tmp_path / "store"
    script = tmp_path / "killable.py"
    script.write_text(KILLABLE)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent.parent)}
    for delay in (0.05, 0.3, 0.6):  # kill during import, during work, near the end
        proc = subprocess.Popen([sys.executable, str(script), str(root)], env=env, stdout=subprocess.PIPE)
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        outputs = [p for p in (root / "slow").glob("*") if p.is_dir() and p.suffix != ".partial"] \
            if (root / "slow").exists() else []
        assert all((p / MANIFEST).exists() for p in outputs if p.name != ".locks")
    done = subprocess.run([sys.executable, str(script), str(root)], env=env, capture_output=True, text=True, check=True)
    assert done.stdout.split()[0] == "50"
    finals = [p for p in (root / "slow").iterdir() if p.name not in (".locks",)]
    assert len(finals) == 1 and (finals[0] / MANIFEST).exists()
