"""Image parts of multimodal rows: sources, bad images by reason, label alignment, tiny processors."""
from __future__ import annotations

import base64
import io

import pytest
from PIL import Image

from archtune.data import media, row_errors
from archtune.data.row_errors import RowError


def _png(color=(255, 0, 0), mode="RGB", size=(8, 8)) -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, color if mode == "RGB" else 7).save(buf, format="PNG")
    return buf.getvalue()


def _user(*parts):
    return [{"role": "user", "content": list(parts)}, {"role": "assistant", "content": "ok"}]


def test_image_sources_path_base64_bytes_struct_and_llava_column(tmp_path):
    png = _png()
    (tmp_path / "a.png").write_bytes(png)
    b64 = base64.b64encode(png).decode()
    messages = _user({"type": "image", "path": "a.png"}, {"type": "image", "base64": b64},
                     {"type": "image", "image": f"data:image/png;base64,{b64}"},
                     {"type": "image", "image": {"bytes": png, "path": None}},
                     {"type": "image"}, {"type": "text", "text": "?"})
    out, got = media.extract_media(messages, {"images": [png]}, base_dir=tmp_path)
    assert got.images == [png] * 5 and media.content_kinds(messages, {"images": [png]}) == {"image"}
    assert out[0]["content"][:5] == [{"type": "image"}] * 5
    # llava: `<image>` in a string content takes the next image of the `images` column
    out, got = media.extract_media([{"role": "user", "content": "<image>\nWhat?"}], {"images": [png]})
    assert out[0]["content"] == [{"type": "image"}, {"type": "text", "text": "\nWhat?"}] and got.images == [png]


@pytest.mark.parametrize("part, row, reason", [
    ({"type": "image", "path": "nope.png"}, {}, row_errors.IMAGE_MISSING),
    ({"type": "image", "url": "https://example.com/x.png"}, {}, row_errors.IMAGE_MISSING),
    ({"type": "image"}, {"images": []}, row_errors.IMAGE_MISSING),
    ({"type": "image", "base64": "%%%"}, {}, row_errors.IMAGE_UNDECODABLE),
])
def test_bad_image_sources_are_row_errors_with_their_reason(tmp_path, part, row, reason):
    with pytest.raises(RowError) as err:
        media.extract_media(_user(part), row, base_dir=tmp_path)
    assert err.value.reason == reason


def test_decode_image_reasons_and_resize():
    with pytest.raises(RowError) as err:
        media.decode_image(b"not an image at all")
    assert err.value.reason == row_errors.IMAGE_UNDECODABLE
    with pytest.raises(RowError) as err:
        media.decode_image(_png(mode="I;16"))
    assert err.value.reason == row_errors.IMAGE_MODE
    img = media.decode_image(_png(mode="L"), media.ImageSettings(size=(4, 6)))
    assert img.mode == "RGB" and img.size == (6, 4)


def test_align_labels_masks_every_inserted_token():
    plain = [2, 4, 9, 11, 12, 5, 4, 20, 21, 5]
    labels = [-100] * 7 + [20, 21, 5]
    expanded = [2, 4, 13, 9, 6, 6, 6, 10, 13, 11, 12, 5, 4, 20, 21, 5]
    got = media.align_labels(plain, labels, expanded)
    assert got == [-100] * 13 + [20, 21, 5]


def test_tiny_gemma3_processor_expands_images_and_labels_skip_them(tmp_path):
    import torch
    from transformers import AutoProcessor

    from archtune.models.tiny import build_tiny_model, build_tiny_processor, write_tiny_model

    model, tokenizer = build_tiny_model("gemma3")
    proc = media.MediaProcessor(build_tiny_processor("gemma3", model.config))
    messages, got = media.extract_media(_user({"type": "image", "image": _png()}, {"type": "text", "text": "Color?"}), {})
    messages[1] = {"role": "assistant", "content": "red"}
    text = proc.processor.apply_chat_template(messages, tokenize=False)
    prompt = proc.processor.apply_chat_template(messages[:1], tokenize=False, add_generation_prompt=True)
    plain = tokenizer(text, add_special_tokens=False)["input_ids"]
    n_prompt = len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
    plain_labels = [-100] * n_prompt + plain[n_prompt:]
    ids, labels, types = proc.encode(text, got.images, plain, plain_labels)
    soft = tokenizer.convert_tokens_to_ids("<image_soft_token>")
    assert ids.count(soft) == model.config.mm_tokens_per_image == sum(types)
    assert [i for i, lab in zip(ids, labels) if lab != -100] == plain[n_prompt:]
    assert proc.token_type_names == ("token_type_ids",)
    # the collator's image inputs are the processor's own
    direct = proc.processor(text=[text], images=[[media.decode_image(got.images[0])]], add_special_tokens=False,
                            return_tensors="pt")
    batch = proc.batch_inputs(got.images)
    assert set(batch) == {"pixel_values"} and torch.equal(batch["pixel_values"], direct["pixel_values"])
    # the image reaches the language model: another image changes the logits
    ids_t = torch.tensor([ids])
    other = proc.batch_inputs([_png((0, 0, 255))])
    with torch.no_grad():
        a = model(input_ids=ids_t, token_type_ids=torch.tensor([types]), **batch).logits
        b = model(input_ids=ids_t, token_type_ids=torch.tensor([types]), **other).logits
    assert (a - b).abs().max() == 0  # Gemma 3's projector starts at zero (transformers' init)
    # init-tiny writes the processor; AutoProcessor reads it back
    write_tiny_model("gemma3", tmp_path / "m")
    again = AutoProcessor.from_pretrained(tmp_path / "m")
    assert type(again) is type(proc.processor) and again.image_seq_length == model.config.mm_tokens_per_image
    assert again.chat_template == proc.processor.chat_template
