"""The step store: where each step's output lives and the one place that knows about cache keys and manifests.

    store/<step>/<key>/            a finished output; it holds manifest.json, written last
    store/<step>/<key>.partial/    work in progress; kept across a crash so a rerun can resume from its checkpoints
    store/<step>/.locks/<key>      an flock, so two runs of one key never build it at the same time

key = sha256(step name, canonical config, the output ids of its inputs, the code fingerprint, the bytes of every file
it reads). Inputs enter by their output id, a nonce minted when an output is completed: recomputing a deleted output
mints a new one, so everything after it recomputes too (DESIGN.md contract 3), while a run that reuses an output
leaves its dependants cached.
"""

import fcntl
import hashlib
import importlib
import importlib.metadata
import json
import os
import shutil
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from prefect.cache_policies import NO_CACHE
from prefect.states import Completed
from pydantic import BaseModel

# Our keys decide reuse. Prefect's own cache would key on the wrapper's source only and hand back records whose
# outputs may have been deleted; the steps tell Prefect they were reused by finishing in a state named Cached.
NO_PREFECT_CACHE = NO_CACHE
MANIFEST = "manifest.json"
ALWAYS_FINGERPRINTED = ("models", "tasks.store")  # every step's outputs depend on the backbones and on this file
LIBRARIES = ("torch", "transformers", "trl", "peft", "accelerate", "datasets", "prefect", "tokenizers")


class InputError(ValueError):
    """Bad input from the user (config, constitution, data files): reported in one line, exit code 2."""


class StepFailed(RuntimeError):
    """A step's work raised; the message names the step."""


@dataclass(frozen=True)
class StepRef:
    """What steps hand to each other: a reference to a finished output, never the objects in it."""

    step: str
    key: str
    path: str
    output_id: str
    metrics: dict = field(default_factory=dict)
    cached: bool = False
    seconds: float = 0.0

    @property
    def dir(self) -> Path:
        return Path(self.path)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def module_files(name: str) -> list[Path]:
    """The source files of a module, or of every module in a package."""
    module = importlib.import_module(name)
    origin = Path(module.__file__)
    if origin.name == "__init__.py":
        return sorted(origin.parent.rglob("*.py"))
    return [origin]


def code_fingerprint(modules: Sequence[str]) -> str:
    digest = hashlib.sha256()
    for name in sorted({*modules, *ALWAYS_FINGERPRINTED}):
        for path in module_files(name):
            digest.update(f"{name}:{path.name}\0".encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()


def step_key(step: str, config: BaseModel, inputs: Sequence[StepRef], code: str, files: dict[str, str]) -> str:
    canonical = {
        "step": step,
        "config": config.model_dump(mode="json"),
        "inputs": sorted((ref.step, ref.output_id) for ref in inputs),
        "code": code,
        "files": sorted(files.values()),  # contents, not paths: moving a file does not invalidate
    }
    return hashlib.sha256(json.dumps(canonical, sort_keys=True).encode()).hexdigest()[:16]


def library_versions() -> dict[str, str]:
    versions = {}
    for name in LIBRARIES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    return versions


class Store:
    def __init__(self, root: Path | str):
        self.root = Path(root).absolute()
        self.history: list[dict] = []  # what this process did, step by step, for the CLI's table

    def path(self, step: str, key: str) -> Path:
        return self.root / step / key

    def lookup(self, step: str, key: str) -> StepRef | None:
        """The finished output for this key, or None. A directory without a manifest does not exist for the cache."""
        manifest_path = self.path(step, key) / MANIFEST
        try:
            manifest = json.loads(manifest_path.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return None
        return StepRef(step, key, str(manifest_path.parent), manifest["output_id"], manifest["metrics"], cached=True)

    def run(
        self,
        step: str,
        config: BaseModel,
        *,
        work: Callable[[Path], dict],
        inputs: Sequence[StepRef] = (),
        files: Sequence[Path] = (),
        code: Sequence[str] = (),
    ) -> StepRef:
        """Reuse the output for this step's key, or build it: `work(dir)` fills dir and returns metrics."""
        started = time.time()
        file_hashes = {str(Path(p)): sha256_file(Path(p)) for p in files}
        fingerprint = code_fingerprint(code)
        key = step_key(step, config, inputs, fingerprint, file_hashes)
        with self._lock(step, key):
            ref = self.lookup(step, key)
            if ref is None:
                ref = self._build(step, key, config, inputs, file_hashes, fingerprint, work, started)
        ref = StepRef(**{**asdict(ref), "seconds": round(time.time() - started, 3)})
        self.history.append({"name": step, "state": "Cached" if ref.cached else "Completed", "key": key,
                             "path": ref.path, "metrics": ref.metrics, "seconds": ref.seconds})
        return ref

    def _build(self, step, key, config, inputs, file_hashes, fingerprint, work, started) -> StepRef:
        final = self.path(step, key)
        partial = final.with_name(key + ".partial")
        partial.mkdir(parents=True, exist_ok=True)  # an existing one is a crashed run's: its checkpoints resume
        try:
            metrics = work(partial)
        except InputError:
            raise
        except Exception as e:
            self.history.append({"name": step, "state": "Failed", "key": key, "path": str(partial),
                                 "metrics": {}, "seconds": round(time.time() - started, 3), "error": str(e)})
            raise StepFailed(f"step {step} failed: {e}") from e
        output_id = uuid.uuid4().hex
        manifest = {
            "step": step,
            "key": key,
            "output_id": output_id,
            "config": config.model_dump(mode="json"),
            "inputs": [{"step": r.step, "key": r.key, "output_id": r.output_id} for r in inputs],
            "files": file_hashes,
            "code_fingerprint": fingerprint,
            "libraries": library_versions(),
            "metrics": metrics,
            "timings": {"started": started, "finished": time.time(), "seconds": round(time.time() - started, 3)},
        }
        tmp = partial / (MANIFEST + ".tmp")
        tmp.write_text(json.dumps(manifest, indent=2, default=str))
        _fsync(tmp)
        tmp.rename(partial / MANIFEST)
        if final.exists():  # only possible if someone removed its manifest by hand: it is not an output
            shutil.rmtree(final)
        partial.rename(final)
        _fsync(final.parent)
        return StepRef(step, key, str(final), output_id, metrics, cached=False)

    def _lock(self, step: str, key: str):
        lock_dir = self.root / step / ".locks"
        lock_dir.mkdir(parents=True, exist_ok=True)
        return _FileLock(lock_dir / key)


class _FileLock:
    """flock: released by the kernel when the holder dies, so a killed run never leaves a stale lock."""

    def __init__(self, path: Path):
        self.path = path

    def __enter__(self):
        self.fd = os.open(self.path, os.O_CREAT | os.O_RDWR, 0o644)
        fcntl.flock(self.fd, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc):
        fcntl.flock(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def prefect_state(ref: StepRef):
    """The task's final state: `Cached` when the output was reused, so the Prefect UI shows it."""
    if ref.cached:
        return Completed(name="Cached", data=ref, message=f"reused {ref.path}")
    return Completed(data=ref, message=f"wrote {ref.path}")
