"""The pipeline, as a list of steps. Each step is a cached Prefect task from tasks/; no training code lives here."""

from prefect import flow

from flows.config import PipelineConfig
from tasks.critique_revise import critique_revise_task
from tasks.evaluate import evaluate_task
from tasks.evaluate_multimodal import evaluate_multimodal_task
from tasks.import_policy import import_policy_task
from tasks.judge import judge_task
from tasks.label_preferences import label_preferences_task
from tasks.pretrain import pretrain_task
from tasks.reward_model import reward_model_task
from tasks.rl import rl_task
from tasks.sft import sft_task
from tasks.sft_multimodal import sft_multimodal_task
from tasks.sl_cai import sl_cai_task
from tasks.store import InputError, Store
from tasks.tokenizer import read_corpus, tokenizer_task

# step -> the steps whose outputs it reads. `alignflow run STEP` runs STEP and everything it needs.
# sft starts from pretrain_dense, or from import_policy when policy.model_dir names a checkpoint (see step_graph).
STEP_GRAPH: dict[str, tuple[str, ...]] = {
    "import_policy": (),
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
    "judge": ("sl_cai",),
    "label_preferences": ("sl_cai", "sft", "judge"),  # sft answers too when label_preferences.samples_from_sft > 0
    "reward_model": ("sl_cai", "label_preferences"),
    "rl": ("sl_cai", "reward_model"),
    "evaluate_rl": ("rl",),
}


def step_graph(cfg: PipelineConfig) -> dict[str, tuple[str, ...]]:
    """STEP_GRAPH for this config: the policy comes from import_policy or from pretrain_dense, never both; the judge
    step is there only when judge.steps > 0."""
    graph = dict(STEP_GRAPH)
    if not cfg.judge.steps:
        del graph["judge"]
        graph["label_preferences"] = ("sl_cai", "sft")
    if cfg.policy.model_dir is not None:
        graph["sft"] = ("import_policy",)
        del graph["pretrain_dense"]
    else:
        del graph["import_policy"]
    return graph


def needed(cfg: PipelineConfig, steps: list[str] | None) -> set[str]:
    """The named steps and, transitively, the steps they read from; every step when none is named."""
    graph = step_graph(cfg)
    if not steps:
        return set(graph)
    unknown = [s for s in steps if s not in graph]
    if unknown:
        reason = "policy.model_dir is set" if unknown[0] in STEP_GRAPH else f"steps: {', '.join(graph)}"
        raise InputError(f"step {unknown[0]!r} is not in this run ({reason})")
    wanted, todo = set(), list(steps)
    while todo:
        step = todo.pop()
        if step not in wanted:
            wanted.add(step)
            todo.extend(graph[step])
    return wanted


MULTIMODAL = ("pretrain_multimodal", "sft_multimodal", "evaluate_multimodal")  # they render their data: no files


def check_inputs(cfg: PipelineConfig, steps: list[str] | None) -> None:
    """Read every input file the chosen steps will read, so bad input fails (exit 2) before any work starts."""
    from constitutions.schema import load as load_constitution
    from data.world import WorldFileError, check_world
    from tasks.import_policy import check_policy
    from tasks.reward_model import read_mixed_pairs

    run = needed(cfg, steps)
    if "import_policy" in run:
        check_policy(cfg.policy)
    if "tokenizer" in run:
        read_corpus(cfg.world.dir / "corpus.txt")
    if run - {"tokenizer", "pretrain_dense", "pretrain_moe", *MULTIMODAL}:
        try:
            check_world(cfg.world.dir)
        except (WorldFileError, FileNotFoundError) as e:
            raise InputError(str(e)) from None
    if run & {"critique_revise", "label_preferences"}:
        load_constitution(cfg.constitution)
    if "reward_model" in run and cfg.reward_model.mix_pairs is not None:
        read_mixed_pairs(cfg.reward_model.mix_pairs)


@flow(name="alignflow", validate_parameters=False)
def pipeline(cfg: PipelineConfig, st: Store, steps: list[str] | None = None) -> list[dict]:
    run = needed(cfg, steps)  # a step in `run` always has its inputs in `run` too
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
    base = None
    if "import_policy" in run:
        base = import_policy_task(cfg.policy, st)
    if "pretrain_dense" in run:
        base = pretrain_task("pretrain_dense", cfg.pretrain_dense, st, tokenizer, corpus)
    sft = sft_task(cfg.sft, st, base, world) if "sft" in run else None
    if "evaluate_sft" in run:
        evaluate_task(cfg.evaluate, st, sft, prompts, heldout)
    traces = critique_revise_task(cfg.critique_revise, st, sft, cfg.constitution, prompts) if "critique_revise" in run else None
    sl_cai = sl_cai_task(cfg.sl_cai, st, sft, traces, world) if "sl_cai" in run else None
    if "evaluate_sl_cai" in run:
        evaluate_task(cfg.evaluate, st, sl_cai, prompts, heldout)
    judge = None
    if "judge" in run:
        judge = judge_task(cfg.judge, st, sl_cai, world, cfg.label_preferences.factored.declines_question)
    labels = None
    if "label_preferences" in run:
        labels = label_preferences_task(cfg.label_preferences, st, sl_cai, sft, cfg.constitution, prompts, judge)
    reward = reward_model_task(cfg.reward_model, st, sl_cai, labels, world) if "reward_model" in run else None
    policy = rl_task(cfg.rl, st, sl_cai, reward, prompts) if "rl" in run else None
    if "evaluate_rl" in run:
        evaluate_task(cfg.evaluate, st, policy, prompts, heldout)
    return st.history
