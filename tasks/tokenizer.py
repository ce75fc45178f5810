"""tokenizer: a byte-level BPE trained on the world corpus, saved as a PreTrainedTokenizerFast.

Byte-level so that no input is ever out of vocabulary; special tokens for the chat roles and for the spans of the
other modalities; a chat template whose `{% generation %}` markers let TRL train on assistant tokens only.
"""

import json
from pathlib import Path

from prefect import task
from pydantic import BaseModel, ConfigDict, Field
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from tasks import store

BOS, EOS, PAD = "<|bos|>", "<|end|>", "<|pad|>"
ROLES = ("system", "user", "assistant")
SPANS = ("image", "audio", "video")
SPECIAL_TOKENS = [PAD, BOS, EOS, *(f"<|{r}|>" for r in ROLES), *(f"<|{s}|>" for s in SPANS),
                  *(f"<|/{s}|>" for s in SPANS)]

# Every turn is `<|role|>content<|end|>`. The end token is also EOS, so generation stops where a turn would end.
# Only the assistant's content and its end token sit inside {% generation %}: that is what assistant-only loss trains.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}"
    "<|assistant|>{% generation %}{{ message['content'] }}<|end|>{% endgeneration %}"
    "{% else %}"
    "<|{{ message['role'] }}|>{{ message['content'] }}<|end|>"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


class TokenizerConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    vocab_size: int = Field(2048, ge=len(SPECIAL_TOKENS) + 256, le=1_000_000)  # + 256 byte symbols
    min_frequency: int = Field(2, ge=1)


def train_tokenizer(cfg: TokenizerConfig, lines: list[str]) -> PreTrainedTokenizerFast:
    """Train byte-level BPE on `lines` and wrap it as a transformers tokenizer with our chat template."""
    bpe = Tokenizer(models.BPE())
    # A space before the first word of every text and of every turn (the pre-tokenizer runs on each stretch between
    # special tokens), so a name is the same tokens in the prompt and at the start of the reply. Without it the
    # reply's "Tour" was 'T' while the profile's was 'ĠT', and copying the name broke at its first token.
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=cfg.vocab_size,
        min_frequency=cfg.min_frequency,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(lines, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        additional_special_tokens=SPECIAL_TOKENS[3:],
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def read_corpus(path: Path) -> list[str]:
    """The corpus is UTF-8 text, one document per line; a bad byte is reported with its line."""
    lines = []
    with open(path, "rb") as f:
        for number, raw in enumerate(f, 1):
            try:
                lines.append(raw.decode("utf-8").rstrip("\n"))
            except UnicodeDecodeError as e:
                raise store.InputError(f"{path}:{number}: not UTF-8 ({e.reason} at byte {e.start})") from None
    if not any(lines):
        raise store.InputError(f"{path}:1: the corpus is empty")
    return lines


def build_tokenizer(cfg: TokenizerConfig, corpus: Path, out_dir: Path) -> dict:
    """The step's work: train, save to out_dir, return metrics."""
    lines = read_corpus(corpus)
    tokenizer = train_tokenizer(cfg, lines)
    tokenizer.save_pretrained(out_dir)
    sample = "\n".join(lines[:2000])
    n_tokens = len(tokenizer(sample, add_special_tokens=False)["input_ids"])
    metrics = {
        "vocab_size": len(tokenizer),
        "bytes_per_token": round(len(sample.encode()) / max(n_tokens, 1), 3),
        "corpus_lines": len(lines),
    }
    (out_dir / "stats.json").write_text(json.dumps(metrics, indent=2))
    return metrics


@task(name="tokenizer", cache_policy=store.NO_PREFECT_CACHE, persist_result=False)
def tokenizer_task(cfg: TokenizerConfig, st: store.Store, corpus: Path):
    ref = st.run(
        "tokenizer", cfg, files=[corpus], code=[__name__],
        work=lambda out: build_tokenizer(cfg, corpus, out),
    )
    return store.prefect_state(ref)
