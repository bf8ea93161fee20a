"""Audio parts of multimodal rows (Gemma 4 E2B/E4B): WAV decoding, sources, bad audio by reason,
the tiny processor's audio tokens and labels, the model's audio inputs."""
from __future__ import annotations

import base64

import numpy as np
import pytest

from archtune.data import media, row_errors
from archtune.data.row_errors import RowError
from tests.audio_files import tone_wav


def _peak_hz(samples: np.ndarray, rate: int) -> float:
    spectrum = np.abs(np.fft.rfft(samples))
    return float(np.argmax(spectrum) * rate / len(samples))


@pytest.mark.parametrize("width", [1, 2, 3, 4])
@pytest.mark.parametrize("channels", [1, 2])
def test_decode_audio_reads_pcm_widths_and_channels(width, channels):
    wav = tone_wav(440, 0.25, 16_000, channels=channels, width=width, amplitude=0.5)
    x = media.decode_audio(wav, 16_000)
    assert x.dtype == np.float32 and x.shape == (4000,)
    assert abs(float(np.abs(x).max()) - 0.5) < 0.01  # scaled to [-1, 1], 8-bit unsigned centred
    assert abs(_peak_hz(x, 16_000) - 440) < 5


@pytest.mark.parametrize("rate", [8_000, 44_100])
def test_decode_audio_resamples_to_the_feature_extractors_rate(rate):
    x = media.decode_audio(tone_wav(1000, 0.5, rate), 16_000)
    assert x.shape == (8000,)
    assert abs(_peak_hz(x, 16_000) - 1000) < 3
    assert abs(float(np.abs(x[200:-200]).max()) - 0.5) < 0.02


def test_resample_cuts_what_the_lower_rate_cannot_hold():
    t = np.arange(16_000) / 16_000
    x = np.sin(2 * np.pi * 300 * t) + np.sin(2 * np.pi * 6000 * t)  # 6 kHz: above 8 kHz audio's Nyquist
    y = media.resample(x, 16_000, 8_000)
    spectrum = np.abs(np.fft.rfft(y)) / len(y)
    assert spectrum[300] > 0.4 and spectrum[2000] < 1e-6  # 6 kHz would alias to 2 kHz


def test_undecodable_audio_is_a_row_error_with_its_reason():
    for data in (b"RIFF but not really a wave file", b"", tone_wav(440, 0.0)):
        with pytest.raises(RowError) as err:
            media.decode_audio(data, 16_000)
        assert err.value.reason == row_errors.AUDIO_UNDECODABLE


def test_audio_sources_path_base64_bytes_and_audios_column(tmp_path):
    wav = tone_wav(440, 0.1)
    (tmp_path / "a.wav").write_bytes(wav)
    b64 = base64.b64encode(wav).decode()
    messages = [{"role": "user", "content": [
        {"type": "audio", "audio": "a.wav"}, {"type": "audio", "path": str(tmp_path / "a.wav")},
        {"type": "audio", "audio": f"data:audio/wav;base64,{b64}"}, {"type": "audio", "base64": b64},
        {"type": "audio", "audio": {"bytes": wav, "path": None}}, {"type": "audio"},
        {"type": "image", "image": {"bytes": b"png", "path": None}}, {"type": "text", "text": "?"}]},
        {"role": "assistant", "content": "ok"}]
    row = {"audios": [wav]}
    assert media.content_kinds(messages, row) == {"audio", "image"}
    out, got = media.extract_media(messages, row, base_dir=tmp_path)
    assert got.audios == [wav] * 6 and got.images == [b"png"]
    assert out[0]["content"][:7] == [{"type": "audio"}] * 6 + [{"type": "image"}]


@pytest.mark.parametrize("part, row, reason", [
    ({"type": "audio", "audio": "nope.wav"}, {}, row_errors.AUDIO_MISSING),
    ({"type": "audio", "url": "https://example.com/x.wav"}, {}, row_errors.AUDIO_MISSING),
    ({"type": "audio"}, {"audios": []}, row_errors.AUDIO_MISSING),
    ({"type": "audio", "base64": "%%%"}, {}, row_errors.AUDIO_UNDECODABLE),
])
def test_bad_audio_sources_are_row_errors_with_their_reason(tmp_path, part, row, reason):
    messages = [{"role": "user", "content": [part]}, {"role": "assistant", "content": "ok"}]
    with pytest.raises(RowError) as err:
        media.extract_media(messages, row, base_dir=tmp_path)
    assert err.value.reason == reason


@pytest.fixture(scope="module")
def e2b():
    from archtune.models.tiny import build_tiny_model, build_tiny_processor

    model, tokenizer = build_tiny_model("gemma4-e2b")
    proc = media.MediaProcessor(build_tiny_processor("gemma4-e2b", model.config), modalities=("image", "audio"))
    return model, tokenizer, proc


def _encode(proc, tokenizer, wav: bytes, answer: str = "high"):
    messages, got = media.extract_media(
        [{"role": "user", "content": [{"type": "audio", "audio": wav}, {"type": "text", "text": "Pitch?"}]}], {})
    messages.append({"role": "assistant", "content": answer})
    text = proc.processor.apply_chat_template(messages, tokenize=False)
    prompt = proc.processor.apply_chat_template(messages[:1], tokenize=False, add_generation_prompt=True)
    plain = tokenizer(text, add_special_tokens=False)["input_ids"]
    n_prompt = len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
    ids, labels, types = proc.encode(text, [], plain, [-100] * n_prompt + plain[n_prompt:], audios=got.audios)
    return ids, labels, types, plain[n_prompt:]


def test_audio_tokens_come_from_the_processor_and_never_carry_labels(e2b):
    model, tokenizer, proc = e2b
    audio_id = tokenizer.convert_tokens_to_ids("<audio_soft_token>")
    boa, eoa = (tokenizer.convert_tokens_to_ids(t) for t in ("<start_of_audio>", "<end_of_audio>"))
    collided = 0
    # Lengths from 0.10 s to 0.40 s in 10 ms steps: the number of audio tokens grows with the
    # length, and for some of them the feature extractor's frame mask is exactly as long as the
    # row's tokens (a per-token output it must not be mistaken for).
    for ms in range(100, 410, 10):
        wav = tone_wav(2000, ms / 1000)
        ids, labels, types, answer = _encode(proc, tokenizer, wav)
        samples = media.decode_audio(wav, 16_000)
        n = proc.processor._compute_audio_num_tokens(samples, 16_000)  # transformers' own count
        assert ids.count(audio_id) == n == sum(1 for t in types if t) and set(types) <= {0, 3}
        start = ids.index(boa)
        assert ids[start:start + n + 2] == [boa] + [audio_id] * n + [eoa]
        assert [i for i, lab in zip(ids, labels) if lab != -100] == answer  # token by token
        assert all(lab == -100 for lab, t in zip(labels, types) if t)
        features = proc.processor.feature_extractor([samples], sampling_rate=16_000)
        collided += len(features["input_features_mask"][0]) == len(ids)
    assert collided  # the case above was exercised


def test_the_model_gets_the_feature_extractors_inputs_and_hears_the_audio(e2b):
    import torch

    from archtune.data.collate import DataCollator

    model, tokenizer, proc = e2b
    rows = []
    for freq, secs in ((300, 0.3), (2500, 0.45)):
        ids, labels, types, _ = _encode(proc, tokenizer, tone_wav(freq, secs))
        rows.append({"input_ids": ids, "labels": labels, "token_types": types, "images": [],
                     "audios": [tone_wav(freq, secs)]})
    rows.append({"input_ids": rows[0]["input_ids"][:5], "labels": [-100, 1, 2, 3, 4], "token_types": [0] * 5,
                 "images": [], "audios": []})  # a text-only row in the same batch
    batch = DataCollator(tokenizer, drop_attention_mask=True, media=proc)(rows)
    assert set(batch) == {"input_ids", "labels", "attention_mask", "mm_token_type_ids", "input_features",
                          "input_features_mask"}
    assert batch["input_features"].shape[0] == 2 and batch["input_features"].shape[2] == 128
    direct = proc.processor.feature_extractor([media.decode_audio(r["audios"][0], 16_000) for r in rows[:2]],
                                              sampling_rate=16_000, return_tensors="pt")
    assert torch.equal(batch["input_features"], direct["input_features"])
    model.train()
    loss = model(**batch).loss
    loss.backward()
    tower = [p.grad for n, p in model.named_parameters() if n.startswith("model.audio_tower.")]
    assert tower and all(g is not None and torch.isfinite(g).all() for g in tower)
    assert any(g.abs().sum() > 0 for g in tower)  # the loss reaches the audio tower through its tokens
    model.zero_grad()
    with torch.no_grad():  # another sound changes the logits
        quiet = dict(batch, input_features=torch.zeros_like(batch["input_features"]))
        assert (model(**batch).logits - model(**quiet).logits).abs().max() > 1e-4
    model.eval()
