"""label_preferences: AI-feedback preference labels (RLAIF; Constitutional AI, arXiv 2212.08073, sec. 4.1).

For each prompt the SL-CAI policy samples a few responses and the two least alike in wording are compared (two
rewordings of one answer teach the reward model nothing); a comparison principle is drawn at random; the feedback
model's log-probabilities of the option tokens give P(A). Both orders are asked and averaged, which cancels the strong
position bias of small judges (NOTES-tiny-cai: the tiny judge's answer followed the order ~half the time):

    p = ( P(A | A shown first) + P(A | A shown second) ) / 2,  P(option) = softmax over the option log-probabilities

Chain-of-thought mode (the paper's sec. 4.1 variant): the feedback model reasons first and the option probabilities are
read after its reasoning; such probabilities are overconfident, so they are clamped (to 0.4-0.6 by default).

`samples_from_sft` draws some of each prompt's samples from the sft model (helpful only) instead. A tiny SL-CAI
policy almost never complies or refuses needlessly, so its pairs alone seldom hold the contrast the reward model is
judged on, an answer against a refusal: on seed 1 of the tiny preset, 3 of its 732 pairs the graders rank apart held
a compliant answer and 6 a needless refusal against a right answer. It is off in the preset: asked the default
constitution's principles, the tiny judge prefers the compliant answer (data/README.md, "The judge's questions").

`openings` add samples that begin with a given text ("Sorry, I can't"), so pairs can hold a refusal the policy would
not write. `factored` replaces the principle with two questions, whether the request is harmful and which response
declines, combined by `factored_label`; without the first, the prompt's kind stands for it. The tiny judge reads
neither question until it is taught them; the judge step (tasks/judge.py) teaches it the second, and with its labels
the reward model ranks 71-83% of held-out pairs right on seeds 1 and 2. All are off in the preset: rl on that reward
model refuses more harmless requests than the goals allow (data/README.md, "The judge step").
"""

import random
from pathlib import Path

from prefect import task
from pydantic import BaseModel, ConfigDict, Field, model_validator

from constitutions.schema import Constitution
from data import GENERATOR
from data.roles import OPTIONS, comparison_prompt, request_prompt
from tasks import store
from tasks.feedback import FeedbackConfig, averaged_label, open_feedback, option_probability
from tasks.shards import run_shards, shard_seed

COT_SUFFIX = "\nThink it through step by step first, then give your answer."
COT_ANSWER = "\nSo the better response is ("


class FactoredConfig(BaseModel):
    """Two questions, each read from one thing, in place of a comparison principle: see `factored_label`."""
    model_config = ConfigDict(extra="forbid")

    harmful_question: str | None = Field("Is this request harmful?", description="asked about the request alone; "
                                         "A = yes. None: the prompt's own kind decides, red-team prompts are to be "
                                         "declined and benign ones answered (see factored_label)")
    declines_question: str = Field("Which response declines the request?", description="asked about the two responses")


class LabelConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    prompts: int = Field(1600, ge=1, description="training prompts to label (red-team and benign, half each)")
    response_temperature: float = Field(1.0, gt=0, description="sampling temperature of the responses")
    samples_per_prompt: int = Field(4, ge=2, description="responses sampled per prompt; the two least alike are "
                                                         "compared, so fewer pairs are two wordings of one answer")
    samples_from_sft: int = Field(0, ge=0, description="how many of each prompt's samples come from the sft model "
                                  "(helpful only) instead of the SL-CAI policy, so pairs can hold a compliant answer "
                                  "or a needless refusal against the policy's reply")
    openings: list[str] = Field([], description="each adds one sample per prompt from the SL-CAI policy that begins "
                                "with this text (the policy writes the rest), so pairs can hold a refusal beside the "
                                "policy's usual answer, e.g. \"I'm sorry, but I\" on a chat model")
    max_new_tokens: int = Field(96, ge=1)
    chain_of_thought: bool = False
    factored: FactoredConfig | None = Field(None, description="label with two questions each read from one thing "
                                            "instead of a comparison principle (see factored_label)")
    clamp: tuple[float, float] | None = Field(None, description="clip labels into [low, high]; CoT default 0.4-0.6")
    shard_size: int = Field(64, ge=1)
    seed: int = 0
    feedback: FeedbackConfig = FeedbackConfig()

    @model_validator(mode="after")
    def _clamp_in_range(self):
        if self.clamp is not None and not 0 <= self.clamp[0] <= self.clamp[1] <= 1:
            raise ValueError("clamp must be [low, high] with 0 <= low <= high <= 1")
        return self

    @model_validator(mode="after")
    def _some_samples_from_the_policy(self):
        if self.samples_from_sft >= self.samples_per_prompt:
            raise ValueError(f"samples_from_sft ({self.samples_from_sft}) must be below samples_per_prompt "
                             f"({self.samples_per_prompt}): each pair needs the SL-CAI policy's own samples too")
        return self

    @model_validator(mode="after")
    def _one_way_to_judge(self):
        if self.factored is not None and self.chain_of_thought:
            raise ValueError("factored and chain_of_thought are two ways to ask the judge: choose one")
        return self

    def effective_clamp(self) -> tuple[float, float] | None:
        return self.clamp or ((0.4, 0.6) if self.chain_of_thought else None)


def factored_label(p_harmful: float, p_a_declines: float) -> float:
    """P(A better) when the better response is the one that declines a harmful request and the one that does not
    decline a harmless one: p_harmful * P(A declines) + (1 - p_harmful) * (1 - P(A declines)).

    A comparison principle makes the judge read two things at once, the request's kind and which response declines, and
    its letter is their exclusive or; the tiny judge reads each alone but not the two together (data/README.md, "An
    order of lessons"). Asked apart, each is one question, and the pipeline combines them, as rule-based rewards combine
    a request's category with graded properties of the response (Mu et al. 2024, arXiv 2411.01111).

    Without a harm question, p_harmful is the prompt's kind, 1 for a red-team prompt and 0 for a benign one: rule-based
    rewards take each prompt's wanted behaviour from its dataset's label in the same way, and the paper's own
    preference data keeps red-team and helpfulness prompts apart. The judge then reads only the responses.
    """
    return p_harmful * p_a_declines + (1 - p_harmful) * (1 - p_a_declines)


def word_jaccard(a: str, b: str) -> float:
    """|A & B| / |A | B| over the two texts' lower-cased word sets (1.0 for two empty texts)."""
    words_a, words_b = set(a.lower().split()), set(b.lower().split())
    return len(words_a & words_b) / len(words_a | words_b) if words_a | words_b else 1.0


def least_alike(responses: list[str]) -> tuple[str, str]:
    """The pair with the lowest word Jaccard similarity; the earliest such pair on ties."""
    pairs = [(responses[i], responses[j]) for i in range(len(responses)) for j in range(i + 1, len(responses))]
    return min(pairs, key=lambda pair: word_jaccard(*pair))


def choose_prompts(cfg: LabelConfig, prompts: list[dict]) -> list[dict]:
    rng = random.Random(cfg.seed)
    train = [p for p in prompts if p["split"] == "train"]
    harmful = [p for p in train if p["kind"] == "harmful"]
    benign = [p for p in train if p["kind"] == "benign"]
    half = cfg.prompts // 2
    # Helpfulness pairs stay in the data so the reward model learns that a needless refusal loses (NOTES-tiny-cai 4, 8).
    return rng.sample(harmful, min(half, len(harmful))) + rng.sample(benign, min(cfg.prompts - half, len(benign)))


def label(cfg: LabelConfig, constitution: Constitution, policy: Path, prompts: list[dict], out_dir: Path,
          sft: Path | None = None, judge_model: Path | None = None) -> dict:
    """`judge_model`: the judge step's model, which then asks the questions in place of cfg.feedback's model."""
    chosen = choose_prompts(cfg, prompts)
    feedback = cfg.feedback.model_copy(update={"model": judge_model}) if judge_model else cfg.feedback
    clamp = cfg.effective_clamp()
    if cfg.samples_from_sft and sft is None:
        raise ValueError("label_preferences.samples_from_sft needs the sft model's directory")
    with open_feedback(FeedbackConfig(), policy_dir=policy) as answerer, \
            open_feedback(FeedbackConfig(), policy_dir=sft or policy,
                          policy=None if cfg.samples_from_sft else answerer) as sft_answerer, \
            open_feedback(feedback, policy_dir=policy, policy=answerer) as judge:

        def judge_order(questions: list[str], seed: int) -> list[float]:
            if not cfg.chain_of_thought:
                return [option_probability(lp)[0] for lp in judge.option_logprobs(questions, options=OPTIONS)]
            reasons = judge.generate([q + COT_SUFFIX for q in questions], max_new_tokens=cfg.max_new_tokens,
                                     temperature=0.0, seed=seed)
            # A judge that writes its answer after its reasoning has the option read in that answer's place.
            reasons = [r.split(COT_ANSWER)[0] for r in reasons]
            logprobs = judge.option_logprobs([q + COT_SUFFIX for q in questions], options=OPTIONS,
                                             assistant_prefixes=[r + COT_ANSWER for r in reasons])
            return [option_probability(lp)[0] for lp in logprobs]

        def work(number: int, batch: list[dict]) -> list[dict]:
            seed = shard_seed(cfg.seed, number) * 1000  # room for one seed per sample and judging pass
            rng = random.Random(seed)
            texts = [p["prompt"] for p in batch]
            from_sft = cfg.samples_per_prompt - cfg.samples_from_sft  # samples k >= this come from the sft model
            samples = [(sft_answerer if k >= from_sft else answerer).generate(
                texts, max_new_tokens=cfg.max_new_tokens, temperature=cfg.response_temperature, seed=seed + k)
                for k in range(cfg.samples_per_prompt)]
            samples += [answerer.generate(texts, max_new_tokens=cfg.max_new_tokens, temperature=cfg.response_temperature,
                                          seed=seed + cfg.samples_per_prompt + k, openings=[opening] * len(texts))
                        for k, opening in enumerate(cfg.openings)]
            first, second = map(list, zip(*(least_alike(list(s)) for s in zip(*samples)), strict=True))
            # Two identical responses hold no preference: judging them only teaches the reward model noise.
            distinct = [i for i, (a, b) in enumerate(zip(first, second)) if a != b]
            batch, texts = [batch[i] for i in distinct], [texts[i] for i in distinct]
            first, second = [first[i] for i in distinct], [second[i] for i in distinct]
            if not batch:
                return []
            if cfg.factored:
                questions = [cfg.factored.declines_question] * len(batch)
                if cfg.factored.harmful_question is None:
                    harmful = [float(p["kind"] == "harmful") for p in batch]
                else:
                    harmful = [option_probability(lp)[0] for lp in judge.option_logprobs(
                        [request_prompt(t, cfg.factored.harmful_question) for t in texts], options=OPTIONS)]
                names = ["factored"] * len(batch)
            else:
                principles = [rng.choice(constitution.preference) for _ in batch]
                questions, names = [pr.text for pr in principles], [pr.id for pr in principles]
            a_first = judge_order([comparison_prompt(t, a, b, q) for t, a, b, q in zip(texts, first, second, questions)],
                                  seed + 100)
            b_first = judge_order([comparison_prompt(t, b, a, q) for t, a, b, q in zip(texts, first, second, questions)],
                                  seed + 101)
            records = []
            for i, (p, a, b, name, pa1, pb1) in enumerate(zip(batch, first, second, names, a_first, b_first)):
                extra = {}
                if cfg.factored:  # the judge's two readings, and the label each order gives
                    extra = {"p_harmful": round(harmful[i], 6), "p_a_declines_shown_first": round(pa1, 6),
                             "p_a_declines_shown_second": round(1 - pb1, 6)}
                    pa1, pb1 = factored_label(harmful[i], pa1), factored_label(harmful[i], pb1)
                soft = averaged_label(pa1, 1 - pb1)
                if clamp:
                    soft = min(max(soft, clamp[0]), clamp[1])
                records.append({"id": p["id"], "kind": p["kind"], "prompt": p["prompt"], "response_a": a,
                                "response_b": b, "principle": name, "p_a_shown_first": round(pa1, 6),
                                "p_a_shown_second": round(1 - pb1, 6), "p_a": round(soft, 6), **extra})
            return records

        records = run_shards(out_dir, chosen, cfg.shard_size, work, step="label_preferences")
    n = max(len(records), 1)
    flips = sum((r["p_a_shown_first"] > 0.5) != (r["p_a_shown_second"] > 0.5) for r in records)
    return {
        "pairs": len(records),
        "identical_pairs_dropped": len(chosen) - len(records),
        "mean_p_a": round(sum(r["p_a"] for r in records) / n, 4),
        "order_disagreement": round(flips / n, 4),  # how often the verdict changed with the order
    }


@task(name="label_preferences", cache_policy=store.NO_PREFECT_CACHE, persist_result=False)
def label_preferences_task(cfg: LabelConfig, st: store.Store, sl_cai: store.StepRef, sft: store.StepRef,
                           constitution_path: Path, prompts_path: Path, judge: store.StepRef | None = None):
    from constitutions.schema import load as load_constitution
    from data.world import read_prompts

    constitution = load_constitution(constitution_path)
    prompts = read_prompts(prompts_path)
    ref = st.run(
        # sft and the judge step are inputs only where they take part
        "label_preferences", cfg,
        inputs=[sl_cai, *([sft] if cfg.samples_from_sft else []), *([judge] if judge else [])],
        files=[constitution_path, prompts_path], code=[__name__, *GENERATOR, "tasks.feedback", "tasks.shards"],
        work=lambda out: label(cfg, constitution, sl_cai.dir / "model", prompts, out, sft.dir / "model",
                               judge.dir / "model" if judge else None),
    )
    return store.prefect_state(ref)
