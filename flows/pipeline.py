"""The pipeline, as a list of steps. Each step is a cached Prefect task from tasks/; no training code lives here."""

from prefect import flow

from flows.config import PipelineConfig
from tasks.critique_revise import critique_revise_task
from tasks.evaluate import evaluate_task
from tasks.evaluate_multimodal import evaluate_multimodal_task
from tasks.label_preferences import label_preferences_task
from tasks.pretrain import pretrain_task
from tasks.reward_model import reward_model_task
from tasks.rl import rl_task
from tasks.sft import sft_task
from tasks.sft_multimodal import sft_multimodal_task
from tasks.sl_cai import sl_cai_task
from tasks.store import Store
from tasks.tokenizer import read_corpus, tokenizer_task

# step -> the steps whose outputs it reads. `alignflow run STEP` runs STEP and everything it needs.
STEP_GRAPH: dict[str, tuple[str, ...]] = {
    "tokenizer": (),
    "pretrain_dense": ("tokenizer",),
    "pretrain_moe": ("tokenizer",),
    "pretrain_multimodal": ("tokenizer",),
    "sft_multimodal": ("pretrain_multimodal",),
    "evaluate_multimodal": ("sft_multimodal",),
    "sft": ("pretrain_dense",),
    "evaluate_sft": ("sft",),
    "critique_revise": ("sft",),
    "sl_cai": ("sft", "critique_revise"),
    "evaluate_sl_cai": ("sl_cai",),
    "label_preferences": ("sl_cai",),
    "reward_model": ("sl_cai", "label_preferences"),
    "rl": ("sl_cai", "reward_model"),
    "evaluate_rl": ("rl",),
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


MULTIMODAL = ("pretrain_multimodal", "sft_multimodal", "evaluate_multimodal")  # they render their data: no files


def check_inputs(cfg: PipelineConfig, steps: list[str] | None) -> None:
    """Read every input file the chosen steps will read, so bad input fails (exit 2) before any work starts."""
    from constitutions.schema import load as load_constitution
    from data.world import WorldFileError, check_world
    from tasks.store import InputError

    run = needed(steps)
    if "tokenizer" in run:
        read_corpus(cfg.world.dir / "corpus.txt")
    if run - {"tokenizer", "pretrain_dense", "pretrain_moe", *MULTIMODAL}:
        try:
            check_world(cfg.world.dir)
        except (WorldFileError, FileNotFoundError) as e:
            raise InputError(str(e)) from None
    if run & {"critique_revise", "label_preferences"}:
        load_constitution(cfg.constitution)


@flow(name="alignflow", validate_parameters=False)
def pipeline(cfg: PipelineConfig, st: Store, steps: list[str] | None = None) -> list[dict]:
    run = needed(steps)  # a step in `run` always has its inputs in `run` too
    world = cfg.world.dir
    corpus, prompts = world / "corpus.txt", world / "prompts.jsonl"
    heldout = world / "heldout_conversations.jsonl"

    tokenizer = tokenizer_task(cfg.tokenizer, st, corpus) if "tokenizer" in run else None
    if "pretrain_moe" in run:
        pretrain_task("pretrain_moe", cfg.pretrain_moe, st, tokenizer, corpus)
    multimodal = pretrain_task("pretrain_multimodal", cfg.pretrain_multimodal, st, tokenizer, corpus) if "pretrain_multimodal" in run else None
    multimodal_sft = sft_multimodal_task(cfg.sft_multimodal, st, multimodal) if "sft_multimodal" in run else None
    if "evaluate_multimodal" in run:
        evaluate_multimodal_task(cfg.evaluate_multimodal, st, multimodal_sft)
    dense = pretrain_task("pretrain_dense", cfg.pretrain_dense, st, tokenizer, corpus) if "pretrain_dense" in run else None
    sft = sft_task(cfg.sft, st, dense, world) if "sft" in run else None
    if "evaluate_sft" in run:
        evaluate_task(cfg.evaluate, st, sft, prompts, heldout)
    traces = critique_revise_task(cfg.critique_revise, st, sft, cfg.constitution, prompts) if "critique_revise" in run else None
    sl_cai = sl_cai_task(cfg.sl_cai, st, sft, traces, world) if "sl_cai" in run else None
    if "evaluate_sl_cai" in run:
        evaluate_task(cfg.evaluate, st, sl_cai, prompts, heldout)
    labels = label_preferences_task(cfg.label_preferences, st, sl_cai, cfg.constitution, prompts) if "label_preferences" in run else None
    reward = reward_model_task(cfg.reward_model, st, sl_cai, labels, world) if "reward_model" in run else None
    policy = rl_task(cfg.rl, st, sl_cai, reward, prompts) if "rl" in run else None
    if "evaluate_rl" in run:
        evaluate_task(cfg.evaluate, st, policy, prompts, heldout)
    return st.history
