"""The pipeline's configuration: one pydantic model per step, composed here.

Defaults live in the step's model; a preset (configs/<name>.yaml or a path) carries only what differs; `--set
step.field=value` overrides last. Everything is validated before any work starts, and an error names the file and line
(preset) or the --set item that caused it.
"""

from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from tasks.critique_revise import CritiqueReviseConfig
from tasks.evaluate import EvaluateConfig
from tasks.evaluate_multimodal import MultimodalEvalConfig
from tasks.import_policy import PolicyConfig
from tasks.judge import JudgeConfig
from tasks.label_preferences import LabelConfig
from tasks.pretrain import PretrainConfig
from tasks.reward_model import RewardConfig
from tasks.rl import RLConfig
from tasks.sft import FinetuneConfig
from tasks.sft_multimodal import MultimodalSFTConfig
from tasks.sl_cai import SLCAIConfig
from tasks.store import InputError
from tasks.tokenizer import TokenizerConfig

ROOT = Path(__file__).resolve().parent.parent
PRESETS = ROOT / "configs"
MAX_PRESET_BYTES = 1 << 20


class WorldConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    dir: Path = Field(ROOT / "data" / "world", description="the tiny world's files (data/world.py writes them)")


class PipelineConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    seed: int | None = Field(None, description="seeds every step that does not set its own seed (repeat runs: 0, 1, 2)")
    world: WorldConfig = WorldConfig()
    policy: PolicyConfig = PolicyConfig()
    constitution: Path = Field(ROOT / "constitutions" / "default.yaml", description="critique and comparison principles")
    tokenizer: TokenizerConfig = TokenizerConfig()
    pretrain_dense: PretrainConfig = PretrainConfig(model="dense-tiny")
    pretrain_moe: PretrainConfig = PretrainConfig(model="moe-tiny")
    pretrain_multimodal: PretrainConfig = PretrainConfig(model="multimodal-tiny", batch_size=32, max_steps=1200)
    sft_multimodal: MultimodalSFTConfig = MultimodalSFTConfig()
    evaluate_multimodal: MultimodalEvalConfig = MultimodalEvalConfig()
    sft: FinetuneConfig = FinetuneConfig()
    critique_revise: CritiqueReviseConfig = CritiqueReviseConfig()
    sl_cai: SLCAIConfig = SLCAIConfig()
    label_preferences: LabelConfig = LabelConfig()
    judge: JudgeConfig = JudgeConfig()  # after label_preferences: its check reads it
    reward_model: RewardConfig = RewardConfig()
    rl: RLConfig = RLConfig()
    evaluate: EvaluateConfig = EvaluateConfig()

    @model_validator(mode="before")
    @classmethod
    def _sections_override_field_by_field(cls, values):
        """A preset or --set that names a section keeps the fields set above that it does not name (pretrain_moe's
        model), rather than falling back to the step config's own defaults (which train dense-tiny)."""
        if isinstance(values, dict):
            for name, field in cls.model_fields.items():
                given = values.get(name)
                if isinstance(given, dict) and isinstance(field.default, BaseModel):
                    values = {**values, name: {**field.default.model_dump(exclude_unset=True), **given}}
        return values

    @field_validator("judge")
    @classmethod
    def _judge_taught_what_it_is_asked(cls, judge, info):
        """The judge step teaches the declines question alone, to the model that label_preferences would load."""
        labels = info.data.get("label_preferences")
        if judge.steps and labels is not None:
            if labels.factored is None or labels.factored.harmful_question is not None:
                raise ValueError("judge.steps > 0 teaches the judge only which response declines: set "
                                 "label_preferences.factored.harmful_question to null (the prompt's kind decides)")
            if labels.feedback.backend != "hf" or labels.feedback.model is not None:
                raise ValueError("judge.steps > 0 makes the judge step's model the feedback model: leave "
                                 "label_preferences.feedback at the hf backend without a model")
        return judge

    @field_validator("rl")
    @classmethod
    def _kind_needs_a_gate(cls, rl, info):
        reward_model = info.data.get("reward_model")
        if rl.request_kind_from_prompts and reward_model is not None and not reward_model.request_gate:
            raise ValueError("rl.request_kind_from_prompts mixes a gated reward model's two rewards: set "
                             "reward_model.request_gate to true")
        return rl

    @model_validator(mode="after")
    def _seed_every_step(self):
        if self.seed is not None:
            for name in type(self).model_fields:
                section = getattr(self, name)
                if isinstance(section, BaseModel) and "seed" in type(section).model_fields \
                        and "seed" not in section.model_fields_set:
                    section.seed = self.seed
        return self


def preset_path(preset: str) -> Path:
    """A name from configs/ or a path to a YAML file."""
    if preset.endswith((".yaml", ".yml")) or "/" in preset:
        path = Path(preset)
    else:
        path = PRESETS / f"{preset}.yaml"
    if not path.is_file():
        names = ", ".join(sorted(p.stem for p in PRESETS.glob("*.yaml")))
        raise InputError(f"preset {preset!r} not found: {path} is not a file (presets: {names})")
    return path


def load_config(preset: str | None = "tiny", sets: list[str] = ()) -> PipelineConfig:
    values: dict = {}
    lines: dict[tuple, int] = {}
    path = None
    if preset:
        path = preset_path(preset)
        values, lines = read_yaml_mapping(path)
        validate(values, lambda loc: f"{path}:{_line_of(lines, loc)}: {_dotted(loc)}")
    for item in sets:
        _apply_set(values, item)
    return validate(values, lambda loc: _blame(loc, sets, path, lines))


def validate(values: dict, where) -> PipelineConfig:
    try:
        return PipelineConfig.model_validate(values)
    except ValidationError as e:
        first = e.errors()[0]
        message = "unknown field" if first["type"] == "extra_forbidden" else first["msg"]
        raise InputError(f"{where(first['loc'])}: {message}") from None


def read_yaml_mapping(path: Path) -> tuple[dict, dict[tuple, int]]:
    """Parse a YAML mapping safely, with the line of every key (for messages that point at the line)."""
    raw = path.read_bytes()
    if len(raw) > MAX_PRESET_BYTES:
        raise InputError(f"{path}:1: file is larger than {MAX_PRESET_BYTES} bytes")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise InputError(f"{path}:{line}: not UTF-8") from None
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        values = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = mark.line + 1 if mark else 1
        raise InputError(f"{path}:{line}: YAML error: {getattr(e, 'problem', None) or e}") from None
    if values is None:
        return {}, {}
    if not isinstance(values, dict):
        raise InputError(f"{path}:1: expected a mapping of step names to settings")
    return values, _key_lines(node)


def _key_lines(node, prefix=()) -> dict[tuple, int]:
    lines = {}
    if isinstance(node, yaml.MappingNode):
        for key, value in node.value:
            path = (*prefix, key.value)
            lines[path] = key.start_mark.line + 1
            lines.update(_key_lines(value, path))
    return lines


def _line_of(lines: dict[tuple, int], loc: tuple) -> int:
    loc = tuple(str(part) for part in loc)
    while loc and loc not in lines:
        loc = loc[:-1]
    return lines.get(loc, 1)


def _dotted(loc: tuple) -> str:
    return ".".join(str(part) for part in loc)


def _apply_set(values: dict, item: str) -> None:
    if "=" not in item or not item.split("=", 1)[0]:
        raise InputError(f"--set {item}: expected step.field=value (or a top-level field=value)")
    dotted, raw = item.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw else ""
    except yaml.YAMLError:
        value = raw
    *parents, leaf = dotted.split(".")
    node = values
    for part in parents:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise InputError(f"--set {item}: {part} is not a section")
        node = child
    node[leaf] = value


def _blame(loc: tuple, sets: list[str], path: Path | None, lines: dict) -> str:
    """Name the --set item that touched this field, else the preset line, else the field alone."""
    dotted = _dotted(loc)
    for item in reversed(sets):
        target = item.split("=", 1)[0]
        if dotted == target or dotted.startswith(target + ".") or target.startswith(dotted + "."):
            return f"--set {item}: {dotted}"
    if path is not None:
        return f"{path}:{_line_of(lines, loc)}: {dotted}"
    return dotted
