"""Numbered shards for generation steps: each is written whole (temp file, then rename) and never redone.

A shard's randomness comes from (seed, shard number) alone, so a run killed at any moment and run again writes the
same records as a run that was never killed: no duplicates, nothing lost.
"""

import json
from collections.abc import Callable
from pathlib import Path

from tasks.progress import Progress


def run_shards(out_dir: Path, items: list, shard_size: int, work: Callable[[int, list], list[dict]],
               step: str) -> list[dict]:
    """Apply `work(shard_number, items)` to each shard of items not yet on disk; return every record in order."""
    shard_dir = out_dir / "shards"
    shard_dir.mkdir(parents=True, exist_ok=True)
    starts = range(0, len(items), shard_size)
    progress = Progress(step, len(items), unit="prompt")
    for number, start in enumerate(starts):
        path = shard_dir / f"shard-{number:05d}.jsonl"
        if not path.exists():
            records = work(number, items[start : start + shard_size])
            tmp = path.with_suffix(".tmp")
            tmp.write_text("".join(json.dumps(r) + "\n" for r in records))
            tmp.rename(path)
        progress(min(start + shard_size, len(items)), len(items))
    progress.close()
    return read_shards(out_dir)


def read_shards(out_dir: Path) -> list[dict]:
    """Every record of a finished generation step, in shard order."""
    records = []
    for path in sorted((Path(out_dir) / "shards").glob("shard-*.jsonl")):
        with open(path) as f:
            records.extend(json.loads(line) for line in f)
    return records


def shard_seed(seed: int, number: int) -> int:
    return seed * 1_000_003 + number
