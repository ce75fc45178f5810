"""The tiny world, multimodal part: images, audio clips and videos rendered from attributes, with captions and
question/answer pairs, and held-out attribute combinations that no training example shows.

Read top to bottom: attributes and held-out combinations -> renderers (numpy only) -> samples (media, caption, QA)
-> model batches -> the held-out attribute accuracy measured on generated answers.

Nothing is written to disk: sample i of a split is rendered from (seed, split, i), in well under a millisecond, so
the same index always gives the same bytes and the whole set regenerates in seconds.

Held-out combinations: every attribute value is seen in training, but some pairs never are (a blue circle, a high
tone, a circle moving up). Answering about them needs each attribute read separately, which is what the >= 80%
held-out accuracy checks.

Isolated examples (training only): in training a held-out pair's attributes are perfectly anti-correlated (no circle
is ever blue), and a small model learns that shortcut rather than reading each attribute. Asked the shape of a blue
circle it named a shape it had seen in blue: measured held-out accuracy of image shape 0.00, video shape 0.03 and
audio kind 0.03, with colour, direction and pitch at 0.83-1.00. So a share of training samples shows an attribute
with its held-out partner made neutral (a grey shape, a shape that stands still, a tone or chirp at a pitch between
the named ones) and asks only about the attributes that have a named value. None is a held-out combination: grey,
standing still and the in-between pitches are values that no question or caption names.
"""

import itertools
import re

import numpy as np
import torch

SEED = 4321
IMAGE_SIZE = 32  # pixels per side
SAMPLE_RATE = 16_000  # Hz
VIDEO_FRAMES = 4

SHAPES = ("circle", "square", "triangle", "cross")
COLOURS = {"red": (0.9, 0.15, 0.1), "green": (0.1, 0.8, 0.2), "blue": (0.15, 0.3, 0.95), "yellow": (0.95, 0.85, 0.1)}
POSITIONS = {"top left": (8, 8), "top right": (8, 24), "bottom left": (24, 8), "bottom right": (24, 24)}  # (row, col)
SIZES = {"small": 4.0, "large": 7.5}  # radius in pixels
KINDS = ("tone", "chirp")  # a chirp sweeps up an octave over the clip
PITCHES = {"low": 300.0, "medium": 800.0, "high": 2000.0}  # Hz at the start of the clip
LENGTHS = {"short": 0.25, "long": 0.5}  # seconds
LOUDNESS = {"quiet": 0.1, "loud": 0.7}  # peak amplitude
DIRECTIONS = {"left": (0, -1), "right": (0, 1), "up": (-1, 0), "down": (1, 0)}  # (row, col) step
# The neutral values of isolated examples: renderable, never asked about.
NEUTRAL = {"colour": "grey", "direction": "still", "pitch": "in between"}
RGB = {**COLOURS, "grey": (0.7, 0.7, 0.7)}
MOTIONS = {**DIRECTIONS, "still": (0, 0)}
# In-between pitches up to a third of an octave from low and high: with only 500 and 1250 Hz, energy near 2 kHz came
# only from chirps and near 300-600 Hz mostly from tones, and the model named the kind from that frequency content
# (held-out kind 0.00-0.25: a high tone called a chirp, a low chirp a tone) instead of from the sweep.
PITCH_CHOICES = {**{name: (hz,) for name, hz in PITCHES.items()}, "in between": (400.0, 500.0, 1250.0, 1600.0)}  # Hz
ISOLATED_SHARE = 0.3  # of training samples

ATTRIBUTES = {
    "image": {"shape": SHAPES, "colour": tuple(COLOURS), "position": tuple(POSITIONS), "size": tuple(SIZES)},
    "audio": {"kind": KINDS, "pitch": tuple(PITCHES), "length": tuple(LENGTHS), "loudness": tuple(LOUDNESS)},
    "video": {"shape": SHAPES, "colour": tuple(COLOURS), "direction": tuple(DIRECTIONS)},
}
# Pairs that appear only in the held-out split: each value of each attribute still appears in training.
HELDOUT_PAIRS = {
    "image": ("shape", "colour", {("circle", "blue"), ("square", "yellow"), ("triangle", "red"), ("cross", "green")}),
    "audio": ("kind", "pitch", {("tone", "high"), ("chirp", "low")}),
    "video": ("shape", "direction", {("circle", "up"), ("square", "down"), ("triangle", "left"), ("cross", "right")}),
}
QUESTIONS = {
    "shape": "What shape is it?", "colour": "What colour is it?", "position": "Where is the shape?",
    "size": "How big is the shape?", "kind": "Is it a tone or a chirp?", "pitch": "How high is the pitch?",
    "length": "How long is the sound?", "loudness": "How loud is it?", "direction": "Which way does it move?",
}
SPLITS = ("train", "heldout")


def combinations(modality: str, split: str) -> list[dict]:
    """Every attribute combination of a modality that belongs to `split`."""
    names = list(ATTRIBUTES[modality])
    a, b, pairs = HELDOUT_PAIRS[modality]
    combos = [dict(zip(names, values)) for values in itertools.product(*ATTRIBUTES[modality].values())]
    return [c for c in combos if ((c[a], c[b]) in pairs) == (split == "heldout")]


# ------------------------------------------------------------------------------------------------------- renderers
def shape_mask(shape: str, centre: tuple[float, float], radius: float, size: int = IMAGE_SIZE) -> np.ndarray:
    """Boolean (size, size) mask of a shape centred at (row, col)."""
    rows, cols = np.mgrid[0:size, 0:size].astype(np.float32)
    dy, dx = rows - centre[0], cols - centre[1]
    if shape == "circle":
        return dx**2 + dy**2 <= radius**2
    if shape == "square":
        return (np.abs(dx) <= 0.8 * radius) & (np.abs(dy) <= 0.8 * radius)
    if shape == "triangle":  # apex up: half-width grows from 0 at the top to `radius` at the base
        return (dy >= -radius) & (dy <= radius) & (np.abs(dx) <= (dy + radius) / 2)
    if shape == "cross":
        bar = radius / 3
        return ((np.abs(dx) <= bar) & (np.abs(dy) <= radius)) | ((np.abs(dy) <= bar) & (np.abs(dx) <= radius))
    raise ValueError(f"unknown shape {shape!r}")


def render_frame(rng: np.random.Generator, shape: str, colour: str, centre, radius: float) -> np.ndarray:
    """(3, H, W) float32 in [0, 1]: a coloured shape with a white rim (its outermost pixels) on a dark noisy
    background. The rim draws the outline the same in every colour: with the colour filling the whole shape, a
    patch-embedding + MLP probe trained on the training combinations read the shape of held-out ones 0.30 (0.58-0.62
    with the rim), since a blue circle was nearer a blue square than a grey circle."""
    image = rng.uniform(0.0, 0.15, (3, IMAGE_SIZE, IMAGE_SIZE)).astype(np.float32)
    rgb = np.clip(np.array(RGB[colour]) + rng.normal(0, 0.05, 3), 0, 1).astype(np.float32)
    mask = shape_mask(shape, centre, radius)
    inner = mask.copy()  # the mask eroded by one pixel (4-neighbourhood)
    inner[1:] &= mask[:-1]
    inner[:-1] &= mask[1:]
    inner[:, 1:] &= mask[:, :-1]
    inner[:, :-1] &= mask[:, 1:]
    image[:, mask] = 1.0
    image[:, inner] = rgb[:, None]
    return image


def render_image(rng: np.random.Generator, a: dict) -> np.ndarray:
    row, col = POSITIONS[a["position"]]
    # +-1 px, not +-2: the shape then stays inside its 16 px patch, and a probe (patch embedding + MLP, 300 steps)
    # read the shape of held-out combinations 0.65-0.68 against 0.30 at +-2 px (training shapes 0.997 against 0.90).
    centre = (row + rng.uniform(-1, 1), col + rng.uniform(-1, 1))
    return render_frame(rng, a["shape"], a["colour"], centre, SIZES[a["size"]] * rng.uniform(0.9, 1.1))


def render_audio(rng: np.random.Generator, a: dict) -> np.ndarray:
    """(samples,) float32 at 16 kHz: a tone sin(2 pi f t), or a linear chirp f(t) = f0 (1 + t / L), whose phase is
    2 pi f0 (t + t^2 / 2L); amplitude from the loudness, 10 ms fades, faint noise."""
    choices = PITCH_CHOICES[a["pitch"]]
    seconds, f0 = LENGTHS[a["length"]], choices[rng.integers(len(choices))] * rng.uniform(0.95, 1.05)
    t = np.arange(int(seconds * SAMPLE_RATE)) / SAMPLE_RATE
    phase = 2 * np.pi * f0 * (t + t**2 / (2 * seconds) if a["kind"] == "chirp" else t)
    envelope = np.minimum(1.0, np.minimum(t, seconds - t) / 0.01)
    wave = LOUDNESS[a["loudness"]] * rng.uniform(0.9, 1.1) * envelope * np.sin(phase)
    return (wave + rng.normal(0, 0.005, t.shape)).astype(np.float32)


def render_video(rng: np.random.Generator, a: dict) -> np.ndarray:
    """(frames, 3, H, W) float32: a shape crossing the frame in its direction, 5 pixels per frame.
    The path lies on the 16 px patch grid: across a patch centre (8 or 24 px, +-1) and, along the motion, centred on
    the image (16 px, +-1), so the first and last frames show the shape inside one patch as images do. With the path
    anywhere in 10-22 px the shape mostly straddled patches: shapes were read 0.67 in training videos and 0.38 in
    held-out ones; on the grid 1.00 and 1.00 (and held-out images' shapes rose from 0.38 to 0.98: one encoder)."""
    step = np.array(MOTIONS[a["direction"]], dtype=np.float32) * 5.0
    centre = np.where(step != 0, 16.0, rng.choice([8.0, 24.0], 2)) + rng.uniform(-1, 1, 2)
    start = (centre - step * (VIDEO_FRAMES - 1) / 2).astype(np.float32)
    radius = 5.0 * rng.uniform(0.9, 1.1)
    return np.stack([render_frame(rng, a["shape"], a["colour"], start + f * step, radius)
                     for f in range(VIDEO_FRAMES)])


RENDER = {"image": render_image, "audio": render_audio, "video": render_video}


# --------------------------------------------------------------------------------------------------------- samples
def caption(modality: str, a: dict) -> str:
    if modality == "image":
        return f"A {a['size']} {a['colour']} {a['shape']} at the {a['position']}."
    if modality == "audio":
        pitch = "" if a["pitch"] == NEUTRAL["pitch"] else f" with a {a['pitch']} pitch"
        return f"A {a['length']} {a['loudness']} {a['kind']}{pitch}."
    motion = "standing still" if a["direction"] == NEUTRAL["direction"] else f"moving {a['direction']}"
    return f"A {a['colour']} {a['shape']} {motion}."


def render_sample(rng: np.random.Generator, modality: str, a: dict) -> dict:
    """Media and caption from the attributes, and a question/answer pair for each attribute with a named value;
    `attributes` holds only those."""
    named = {name: value for name, value in a.items() if value in ATTRIBUTES[modality][name]}
    return {"modality": modality, "attributes": named, "media": RENDER[modality](rng, a),
            "caption": caption(modality, a), "qa": [(QUESTIONS[name], value) for name, value in named.items()]}


def sample(split: str, index: int, seed: int = SEED) -> dict:
    """Sample `index` of a split: modality (cycling image, audio, video), attributes, media array, caption and one
    question/answer pair per attribute. The same (split, index, seed) always renders the same arrays."""
    rng = np.random.default_rng([seed, SPLITS.index(split), index])
    modality = ("image", "audio", "video")[index % 3]
    combos = combinations(modality, split)
    return render_sample(rng, modality, combos[rng.integers(len(combos))])


def training_sample(index: int, seed: int = SEED) -> dict:
    """Training sample `index`: sample("train", index), or (ISOLATED_SHARE of the time) an isolated example, a
    training combination with the second attribute of its held-out pair made neutral."""
    rng = np.random.default_rng([seed, 5, index])
    if rng.random() >= ISOLATED_SHARE:
        return sample("train", index, seed)
    modality = ("image", "audio", "video")[index % 3]
    combos = combinations(modality, "train")
    partner = HELDOUT_PAIRS[modality][1]
    return render_sample(rng, modality, {**combos[rng.integers(len(combos))], partner: NEUTRAL[partner]})


# --------------------------------------------------------------------------------------------------- model batches
def example_text(tokenizer, modality: str, kind: str, question: str = "", answer: str = "") -> str:
    """A caption: `<|bos|><|image|> A small red circle ...<|end|>`; a QA pair: the project's chat template with the
    media marker opening the user turn. The processor expands the marker into the span."""
    marker = f"<|{modality}|>"
    if kind == "caption":
        return f"{tokenizer.bos_token}{marker}{answer}{tokenizer.eos_token}"
    messages = [{"role": "user", "content": f"{marker}{question}"}]
    if answer:
        messages.append({"role": "assistant", "content": answer})
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=not answer)


def training_text(s: dict, tokenizer, rng: np.random.Generator) -> str:
    """One training text for a sample: its caption or one of its QA pairs, half and half."""
    if rng.random() < 0.5:
        return example_text(tokenizer, s["modality"], "caption", answer=s["caption"])
    question, answer = s["qa"][rng.integers(len(s["qa"]))]
    return example_text(tokenizer, s["modality"], "qa", question, answer)


def pretraining_batch(split: str, processor, index: int, batch_size: int, seed: int = SEED) -> dict:
    """Batch `index` of a split: samples index * batch_size .. as captions and QA pairs, modalities mixed, with
    next-token labels on the text (media slots and padding are -100). The index alone fixes the batch, so a resumed
    run continues where it stopped. `processor` is a models.multimodal.MultimodalProcessor."""
    rng = np.random.default_rng([seed, 7, index])
    pick = training_sample if split == "train" else lambda i, seed: sample(split, i, seed)
    samples = [pick(index * batch_size + i, seed) for i in range(batch_size)]
    texts = [training_text(s, processor.tokenizer, rng) for s in samples]
    batch = processor(texts, **media_lists(samples), padding_side="right")
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    batch["labels"] = labels.masked_fill(batch["mm_token_type_ids"] != 0, -100)
    return batch


def multimodal_batches(split: str, processor, batch_size: int, steps: int, seed: int = SEED, start: int = 0):
    """pretraining_batch for batches start .. start + steps - 1."""
    for index in range(start, start + steps):
        yield pretraining_batch(split, processor, index, batch_size, seed)


def qa_pair(split: str, index: int, seed: int = SEED) -> tuple[dict, str, str, str]:
    """Example `index` of the question/answer set: (sample, attribute, question, answer), one attribute of the sample
    drawn by the index, so every attribute is asked about equally often."""
    s = training_sample(index, seed) if split == "train" else sample(split, index, seed)
    attribute = list(s["attributes"])[np.random.default_rng([seed, 11, index]).integers(len(s["qa"]))]
    question, answer = dict(zip(s["attributes"], s["qa"]))[attribute]
    return s, attribute, question, answer


def answer_only_batch(processor, pairs: list[tuple[dict, str, str, str]]) -> dict:
    """QA pairs as chat turns with labels on the assistant's answer and its end token only (what the chat template
    puts inside {% generation %}): the prompt, media slots and padding are -100. The prompt's tokens are a prefix of
    the whole turn's, since the tokenizer splits at the special tokens that close the user turn and open the
    assistant's."""
    tokenizer = processor.tokenizer
    samples = [s for s, *_ in pairs]
    prompts = [example_text(tokenizer, s["modality"], "qa", q) for s, _, q, _ in pairs]
    whole = [example_text(tokenizer, s["modality"], "qa", q, a) for s, _, q, a in pairs]
    prompt_lengths = processor(prompts, **media_lists(samples), padding_side="right")["attention_mask"].sum(1)
    batch = processor(whole, **media_lists(samples), padding_side="right")
    positions = torch.arange(batch["input_ids"].shape[1])
    answer = (positions >= prompt_lengths[:, None]) & (batch["attention_mask"] == 1)
    batch["labels"] = batch["input_ids"].masked_fill(~answer, -100)
    return batch


def media_lists(samples: list[dict]) -> dict:
    """The processor's keyword arguments: each modality's arrays in order of appearance."""
    return {"images": [s["media"] for s in samples if s["modality"] == "image"],
            "audio": [s["media"] for s in samples if s["modality"] == "audio"],
            "videos": [s["media"] for s in samples if s["modality"] == "video"]}


# ------------------------------------------------------------------------------------------------------- accuracy
def answer_is_right(generated: str, attribute: str, value: str) -> bool:
    """Right when the generated answer names the value as whole words and names no other value of the attribute
    ("a circle" is right for circle; "a circle or a square" is not)."""
    def names(v):
        return re.search(rf"\b{re.escape(v)}\b", generated.lower()) is not None
    modality = next(m for m, attrs in ATTRIBUTES.items() if attribute in attrs)
    others = [v for v in ATTRIBUTES[modality][attribute] if v != value]
    return names(value) and not any(names(v) for v in others)


@torch.no_grad()
def generated_answers(model, processor, split: str = "heldout", n: int = 60, seed: int = SEED,
                      batch_size: int = 16, max_new_tokens: int = 8) -> list[dict]:
    """Greedy generate() on every attribute question about the first n samples of `split`, each answer judged by
    answer_is_right: [{"index", "modality", "attribute", "value", "answer", "right"}]."""
    tokenizer = processor.tokenizer
    rows = [(i, s, attr, q, v) for i, s in ((i, sample(split, i, seed)) for i in range(n))
            for attr, (q, v) in zip(s["attributes"], s["qa"])]
    records = []
    model.eval()
    for start in range(0, len(rows), batch_size):
        chunk = rows[start:start + batch_size]
        texts = [example_text(tokenizer, s["modality"], "qa", q) for _, s, _, q, _ in chunk]
        batch = processor(texts, **media_lists([s for _, s, *_ in chunk]), padding_side="left")
        batch = {k: v.to(model.device) for k, v in batch.items()}
        out = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False,
                             eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
        answers = tokenizer.batch_decode(out[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)
        records += [{"index": i, "modality": s["modality"], "attribute": attr, "value": v, "answer": answer,
                     "right": answer_is_right(answer, attr, v)} for (i, s, attr, _, v), answer in zip(chunk, answers)]
    return records


def accuracy_by_modality(records: list[dict]) -> dict[str, float]:
    """{modality: fraction of its questions answered right}."""
    return {m: float(np.mean([r["right"] for r in records if r["modality"] == m]))
            for m in ATTRIBUTES if any(r["modality"] == m for r in records)}

