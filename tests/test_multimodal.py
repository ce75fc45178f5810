"""The multimodal tiny world and backbone: rendering, held-out combinations, token arithmetic, the encoders against
their textbook formulations, the softmax-routed MoE, the processor's stream, save/load and generate()."""

import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

import models  # noqa: F401  (registers the Auto classes)
from data import multimodal as mm
from models.multimodal import (
    MODALITIES,
    MultimodalConfig,
    MultimodalForCausalLM,
    MultimodalProcessor,
    PatchEmbedding,
    SparseMoE,
    audio_frames,
    audio_tokens,
    image_tokens,
    log_mel_and_change,
    mel,
    mel_filterbank,
    multimodal_tiny,
    patchify,
    softmax_topk_gates,
    spectrogram,
    switch_balance_loss,
    video_tokens,
)


# ----------------------------------------------------------------------------------------------------- the world
def test_rendering_is_seeded_and_fast():
    a, b = mm.sample("train", 17), mm.sample("train", 17)
    assert np.array_equal(a["media"], b["media"]) and a["caption"] == b["caption"]
    assert not np.array_equal(mm.sample("train", 20)["media"], a["media"])
    assert mm.sample("train", 0)["media"].shape == (3, 32, 32)
    assert mm.sample("train", 1)["media"].shape in {(4000,), (8000,)}
    assert mm.sample("train", 2)["media"].shape == (4, 3, 32, 32)


def test_heldout_combinations_never_appear_in_training():
    for modality, (a, b, pairs) in mm.HELDOUT_PAIRS.items():
        train = mm.combinations(modality, "train")
        heldout = mm.combinations(modality, "heldout")
        assert heldout and not any((c[a], c[b]) in pairs for c in train)
        assert all((c[a], c[b]) in pairs for c in heldout)
        for name, values in mm.ATTRIBUTES[modality].items():  # every value is still taught
            assert {c[name] for c in train} == set(values)
    trained = [mm.training_sample(i) for i in range(600)]  # what pretraining and sft see
    for s in trained:
        a, b, pairs = mm.HELDOUT_PAIRS[s["modality"]]
        assert (s["attributes"][a], s["attributes"].get(b)) not in pairs
    isolated = [s for s in trained if len(s["attributes"]) < len(mm.ATTRIBUTES[s["modality"]])]
    assert 0.2 < len(isolated) / len(trained) < 0.4
    for s in isolated:  # the partner is neutral: never named in a question, an answer or the caption
        partner = mm.HELDOUT_PAIRS[s["modality"]][1]
        assert partner not in s["attributes"] and not any(q == mm.QUESTIONS[partner] for q, _ in s["qa"])
        assert not any(re.search(rf"\b{v}\b", s["caption"]) for v in mm.ATTRIBUTES[s["modality"]][partner])


def test_image_shows_its_colour_where_it_says():
    s = next(s for s in (mm.sample("train", i) for i in range(0, 90, 3))
             if s["attributes"]["size"] == "large")
    row, col = mm.POSITIONS[s["attributes"]["position"]]
    centre = s["media"][:, row - 1:row + 2, col - 1:col + 2].mean((1, 2))
    assert np.abs(centre - np.array(mm.COLOURS[s["attributes"]["colour"]])).max() < 0.2
    assert s["media"][:, 31 - row, 31 - col].max() < 0.2  # the opposite corner is background


def test_audio_spectrogram_peaks_at_the_pitch():
    for pitch, hz in mm.PITCHES.items():
        a = {"kind": "tone", "pitch": pitch, "length": "long", "loudness": "loud"}
        wave = torch.as_tensor(mm.render_audio(np.random.default_rng(0), a))
        spec = spectrogram(wave[None], n_fft=400, hop_length=160)[0]  # 40 Hz per bin
        assert spec.shape == (201, 51)
        assert abs(spec.mean(1).argmax().item() * 40 - hz) <= 0.05 * hz + 40
    chirp = {"kind": "chirp", "pitch": "medium", "length": "long", "loudness": "loud"}
    spec = spectrogram(torch.as_tensor(mm.render_audio(np.random.default_rng(0), chirp))[None], 400, 160)[0]
    assert spec[:, 45].argmax() > 1.6 * spec[:, 5].argmax()  # sweeps up towards an octave


def test_the_change_channel_is_zero_for_a_tone_and_not_for_a_chirp():
    change = {}
    for kind in mm.KINDS:
        a = {"kind": kind, "pitch": "medium", "length": "long", "loudness": "loud"}
        wave = torch.as_tensor(mm.render_audio(np.random.default_rng(0), a))[None]
        x = log_mel_and_change(wave, 400, 160, 40, 16_000)[0]  # (2, M, T)
        assert x.shape == (2, 40, 51)
        torch.testing.assert_close(x[1, :, :8], x[0, :, :8])  # before the lag the change is the spectrogram itself
        change[kind] = x[1, :, 10:-10].abs().mean()  # past the onset, before the fade: what is left is noise
    assert change["chirp"] > 4 * change["tone"]  # measured 0.29 against 0.047


def test_the_rim_is_white_in_every_colour():
    frames = [mm.render_frame(np.random.default_rng(0), "circle", c, (16.0, 16.0), 7.0) for c in mm.RGB]
    rims = [np.all(f == 1.0, axis=0) for f in frames]
    assert rims[0].sum() > 20 and all(np.array_equal(r, rims[0]) for r in rims)
    assert not np.array_equal(frames[0][:, 16, 16], frames[2][:, 16, 16])  # inside, the colour


def test_mel_filterbank_peaks_are_equally_spaced_in_mel():
    bank = mel_filterbank(400, 40, 16_000)  # (40 bands, 201 bins of 40 Hz)
    assert bank.shape == (40, 201) and (bank.sum(1) > 0).all()  # the narrowest band still covers a bin
    peaks_hz = bank.argmax(1).numpy() * 40.0
    spacing = np.diff(mel(peaks_hz))
    assert abs(spacing.mean() - mel(8000) / 41) < 2 and spacing.std() < 15  # bins quantize the peaks to 40 Hz
    for hz in (300, 2000):  # a tone lights the band whose peak is nearest to it
        tone = torch.sin(2 * torch.pi * hz * torch.arange(8000) / 16_000)
        band = (bank @ spectrogram(tone[None], 400, 160)[0]).mean(1).argmax()
        assert abs(peaks_hz[band] - hz) <= 0.5 * (peaks_hz[band + 1] - peaks_hz[band - 1])


def test_video_moves_in_its_direction():
    for direction, (dr, dc) in mm.DIRECTIONS.items():
        a = {"shape": "square", "colour": "red", "direction": direction}
        frames = mm.render_video(np.random.default_rng(1), a)
        centres = [np.argwhere(f[0] > 0.6).mean(0) for f in frames]  # the red channel's bright pixels
        step = (centres[-1] - centres[0]) / (len(frames) - 1)
        assert np.allclose(step, [5 * dr, 5 * dc], atol=1.0), direction


def test_answer_grading():
    assert mm.answer_is_right("a circle", "shape", "circle")
    assert not mm.answer_is_right("a circle or a square", "shape", "circle")
    assert not mm.answer_is_right("circles", "shape", "circle")
    assert mm.answer_is_right("top left", "position", "top left")
    assert not mm.answer_is_right("bottom left", "position", "top left")


# ------------------------------------------------------------------------------------------- token arithmetic
def test_token_counts_follow_the_arithmetic():
    assert image_tokens(224, 14) == 256
    assert audio_frames(16_000, 160) == 101  # one second, 10 ms hop: about 100 frames
    assert spectrogram(torch.zeros(1, 16_000), 400, 160).shape[-1] == 101
    assert audio_tokens(16_000, 160) == 26  # two stride-2 convolutions
    assert video_tokens(4, 32, 16) == 16
    config = multimodal_tiny(vocab_size=64)
    encoder = MultimodalForCausalLM(config).model.audio_encoder
    for samples in (4000, 8000, 16_000, 1234):
        assert encoder(torch.randn(1, samples)).shape[1] == audio_tokens(samples, 160)


def test_patch_embedding_equals_conv2d_with_stride_patch():
    config = MultimodalConfig(image_size=224, patch_size=14, hidden_size=64)
    embed = PatchEmbedding(config, 14)
    pixels = torch.randn(2, 3, 224, 224)
    conv = F.conv2d(pixels, embed.proj.weight.view(64, 3, 14, 14), embed.proj.bias, stride=14)  # (2, 64, 16, 16)
    linear = embed.proj(patchify(pixels, 14))  # (2, 256, 64)
    assert linear.shape == (2, 256, 64)
    torch.testing.assert_close(linear, conv.flatten(2).transpose(1, 2), atol=1e-4, rtol=1e-4)


# ---------------------------------------------------------------------------------------------------------- MoE
def test_softmax_router_gates_and_balance_loss():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    _probs, gates, idx = softmax_topk_gates(logits, 2)
    p = logits.softmax(-1)[0]
    assert idx.tolist() == [[0, 1]]
    torch.testing.assert_close(gates[0], torch.stack([p[0], p[1]]) / (p[0] + p[1]))
    uniform = torch.full((8, 4), 0.25)
    assert switch_balance_loss(uniform, torch.tensor([[0, 1], [2, 3]] * 4)).item() == pytest.approx(1.0)
    collapsed = torch.tensor([[1.0, 0, 0, 0]] * 8)
    assert switch_balance_loss(collapsed, torch.zeros(8, 1, dtype=torch.long)).item() == pytest.approx(4.0)


def test_moe_output_is_the_gated_sum_of_its_top_k_experts():
    torch.manual_seed(0)
    moe = SparseMoE(MultimodalConfig(hidden_size=16, expert_intermediate_size=8, num_experts=4,
                                     num_experts_per_tok=2))
    x = torch.randn(2, 5, 16)
    out, _ = moe(x)
    probs = (moe.router(x)).softmax(-1)
    every = torch.stack([e(x) for e in moe.experts], -2)  # (2, 5, E, 16)
    top, idx = probs.topk(2, -1)
    expected = (every.gather(-2, idx[..., None].expand(-1, -1, -1, 16)) * (top / top.sum(-1, keepdim=True))[..., None])
    torch.testing.assert_close(out, expected.sum(-2), atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------- model and stream
@pytest.fixture(scope="module")
def setup(tokenizer):
    config = MultimodalConfig(vocab_size=len(tokenizer), hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                              expert_intermediate_size=64, pad_token_id=tokenizer.pad_token_id,
                              bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    return MultimodalForCausalLM(config).eval(), MultimodalProcessor(tokenizer, config)


def test_processor_builds_the_stream(setup, tokenizer):
    _model, processor = setup
    samples = [mm.sample("train", i) for i in range(3)]  # image, audio, video
    texts = [mm.example_text(tokenizer, s["modality"], "qa", "What is it?") for s in samples]
    batch = processor(texts, **mm.media_lists(samples))
    types = batch["mm_token_type_ids"]
    assert (types == MODALITIES["image"]).sum() == 16
    assert (types == MODALITIES["audio"]).sum() == audio_tokens(len(samples[1]["media"]), 160)
    assert (types == MODALITIES["video"]).sum() == 4 * 16  # four frames, each an image
    ids = batch["input_ids"][0][batch["attention_mask"][0].bool()].tolist()
    open_, close = (tokenizer.convert_tokens_to_ids(t) for t in ("<|image|>", "<|/image|>"))
    assert ids[ids.index(open_) + 17] == close  # <|image|>, 16 slots, <|/image|>
    with pytest.raises(ValueError, match="more image items"):
        processor(["no marker"], images=[samples[0]["media"]])


def test_media_change_the_logits_after_their_span(setup, tokenizer):
    model, processor = setup
    s = mm.sample("train", 0)
    text = [mm.example_text(tokenizer, "image", "qa", "What colour is it?")]
    with torch.no_grad():
        a = model(**processor(text, images=[s["media"]])).logits
        b = model(**processor(text, images=[mm.sample("train", 3)["media"]])).logits
    assert (a[0, -1] - b[0, -1]).abs().max() > 1e-3
    assert torch.equal(a[0, :3], b[0, :3])  # before the span: causal, unchanged


def test_cached_decoding_and_left_padding_match_the_full_forward(setup, tokenizer):
    model, processor = setup
    samples = [mm.sample("train", i) for i in (1, 4)]  # two audio clips, of possibly different lengths
    texts = [mm.example_text(tokenizer, "audio", "qa", q) for q in ("How loud is it?", "Tone?")]
    batch = processor(texts, **mm.media_lists(samples), padding_side="left")
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=5, do_sample=False, min_new_tokens=5)
        for row in range(2):  # each row alone, no padding, no cache: the same greedy tokens
            alone = processor(texts[row:row + 1], audio=[samples[row]["media"]])
            ids = alone["input_ids"]
            for _ in range(5):
                logits = model(**{**alone, "input_ids": ids, "attention_mask": torch.ones_like(ids),
                                  "mm_token_type_ids": F.pad(alone["mm_token_type_ids"],
                                                             (0, ids.shape[1] - alone["input_ids"].shape[1]))},
                               use_cache=False).logits
                ids = torch.cat([ids, logits[:, -1:].argmax(-1)], 1)
            assert out[row, -5:].tolist() == ids[0, -5:].tolist()


def test_save_load_through_auto_classes(setup, tmp_path, tokenizer):
    model, processor = setup
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(loaded) is MultimodalForCausalLM
    samples = [mm.sample("train", i) for i in range(3)]  # every encoder: image, audio, video
    texts = [mm.example_text(tokenizer, s["modality"], "caption", answer=s["caption"]) for s in samples]
    batch = processor(texts, **mm.media_lists(samples))
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits, model(**batch).logits)


def test_processor_saves_and_loads_with_the_model(setup, tmp_path, tokenizer):
    model, _ = setup
    config = MultimodalConfig(**{**model.config.to_dict(), "image_size": 48, "patch_size": 12, "hop_length": 200})
    processor = MultimodalProcessor(tokenizer, config)
    MultimodalForCausalLM(config).save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    loaded = MultimodalProcessor.from_pretrained(tmp_path)
    image, clip = np.zeros((3, 48, 48), np.float32), np.zeros(4000, np.float32)
    texts = [mm.example_text(tokenizer, "image", "qa", "What colour is it?"), "<|audio|>How loud?"]
    a, b = processor(texts, images=[image], audio=[clip]), loaded(texts, images=[image], audio=[clip])
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (b["mm_token_type_ids"] == MODALITIES["image"]).sum() == 16  # (48 / 12)^2: the saved geometry, not 32/8
    assert (b["mm_token_type_ids"] == MODALITIES["audio"]).sum() == audio_tokens(4000, 200) == 6
    assert loaded.tokenizer.get_vocab() == tokenizer.get_vocab()
    assert loaded.tokenizer.chat_template == tokenizer.chat_template


def test_answer_only_labels_cover_the_answer_and_its_end_token(setup, tokenizer):
    _, processor = setup
    pairs = [mm.qa_pair("train", i) for i in range(6)]
    assert {s["modality"] for s, *_ in pairs} == {"image", "audio", "video"}
    batch = mm.answer_only_batch(processor, pairs)
    for row, (_s, attribute, question, answer) in enumerate(pairs):
        labelled = batch["labels"][row][batch["labels"][row] != -100].tolist()
        assert labelled == tokenizer(answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        assert mm.QUESTIONS[attribute] == question
    attributes = [mm.qa_pair("train", i)[1] for i in range(0, 300, 3)]  # images: each attribute asked about
    assert {a: attributes.count(a) > 15 for a in mm.ATTRIBUTES["image"]} == dict.fromkeys(mm.ATTRIBUTES["image"], True)


def test_training_steps_lower_the_loss_and_reach_every_part(setup):
    model, processor = setup
    torch.manual_seed(0)
    trained = MultimodalForCausalLM(model.config).train()
    optimizer = torch.optim.AdamW(trained.parameters(), lr=3e-3)
    batch = next(mm.multimodal_batches("train", processor, batch_size=6, steps=1))
    before = {n: p.detach().clone() for n, p in trained.named_parameters()}
    losses = []
    for _ in range(8):
        loss = trained(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0]
    unchanged = [n for n, p in trained.named_parameters() if torch.equal(p, before[n])]
    assert unchanged == []  # every encoder, expert and the router learned
