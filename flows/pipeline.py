"""The pipeline, as a list of steps. Each step is a cached Prefect task from tasks/; no training code lives here."""

from prefect import flow

from flows.config import PipelineConfig
from tasks.store import Store
from tasks.tokenizer import read_corpus, tokenizer_task

# step -> the steps whose outputs it reads. `alignflow run STEP` runs STEP and everything it needs.
STEP_GRAPH: dict[str, tuple[str, ...]] = {
    "tokenizer": (),
}


def needed(steps: list[str] | None) -> set[str]:
    """The named steps and, transitively, the steps they read from; every step when none is named."""
    if not steps:
        return set(STEP_GRAPH)
    wanted, todo = set(), list(steps)
    while todo:
        step = todo.pop()
        if step not in wanted:
            wanted.add(step)
            todo.extend(STEP_GRAPH[step])
    return wanted


def check_inputs(cfg: PipelineConfig, steps: list[str] | None) -> None:
    """Read every input file the chosen steps will read, so bad input fails (exit 2) before any work starts."""
    run = needed(steps)
    if "tokenizer" in run:
        read_corpus(cfg.world.dir / "corpus.txt")


@flow(name="alignflow", validate_parameters=False, log_prints=True)
def pipeline(cfg: PipelineConfig, st: Store, steps: list[str] | None = None) -> list[dict]:
    run = needed(steps)
    world = cfg.world.dir
    if "tokenizer" in run:
        tokenizer_task(cfg.tokenizer, st, world / "corpus.txt")
    return st.history
