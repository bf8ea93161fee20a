"""Why a row is dropped: the reasons, their fixes, and `RowError`, which formats, media decoding and
tokenization raise and the pipeline counts (or, with `strict_data`, reports as FILE:LINE).

A leaf of data/: every reader of rows imports it, it imports nothing of archtune.
"""
from __future__ import annotations

# Drop reasons, in the order they are reported. The first five are malformed rows.
BAD_JSON = "bad_json"            # a line that is not JSON, or JSON that is not an object
UNDECODABLE = "undecodable"      # bytes that are not UTF-8
MISSING_FIELD = "missing_field"  # a field the format needs is absent (or null)
WRONG_TYPE = "wrong_type"        # a field has the wrong type (e.g. output is a list)
EMPTY = "empty"                  # the answer (or text) is empty
TEMPLATE_ERROR = "template_error"  # the chat template refused the conversation (e.g. roles do not alternate)
NO_LABELS = "no_labels"          # nothing left to train on after masking
TOO_LONG = "too_long"            # longer than sequence_len (excess_length_strategy: drop)
IMAGE_MISSING = "image_missing"          # no such file, a remote URL, or fewer images than image parts
IMAGE_UNDECODABLE = "image_undecodable"  # bytes Pillow cannot read as an image
IMAGE_MODE = "image_mode"                # a pixel mode with no RGB conversion (e.g. 16-bit, float)
IMAGE_DROP_REASONS: tuple[str, ...] = (IMAGE_MISSING, IMAGE_UNDECODABLE, IMAGE_MODE)
AUDIO_MISSING = "audio_missing"          # no such file, a remote URL, or fewer audios than audio parts
AUDIO_UNDECODABLE = "audio_undecodable"  # not a PCM WAV file, or one without samples
AUDIO_DROP_REASONS: tuple[str, ...] = (AUDIO_MISSING, AUDIO_UNDECODABLE)
DROP_REASONS: tuple[str, ...] = (
    BAD_JSON, UNDECODABLE, MISSING_FIELD, WRONG_TYPE, EMPTY, TEMPLATE_ERROR, NO_LABELS, TOO_LONG,
    *IMAGE_DROP_REASONS, *AUDIO_DROP_REASONS)

FIXES: dict[str, str] = {
    BAD_JSON: "write one JSON object per line",
    UNDECODABLE: "save the file as UTF-8",
    MISSING_FIELD: "add the field, or map the format to your column names (field_instruction, "
                   "field_input, field_output, field_messages, message_property_mappings, field)",
    WRONG_TYPE: "make the field a string (messages: a list of {role, content} objects)",
    EMPTY: "remove the row or give it an answer",
    TEMPLATE_ERROR: "fix the conversation (e.g. roles alternate user/assistant) or set chat_template",
    NO_LABELS: "give the row a turn in roles_to_train (or set train_on_inputs: true)",
    TOO_LONG: "raise sequence_len or set excess_length_strategy: truncate (rows with images or audio are never "
              "truncated)",
    IMAGE_MISSING: "give every image part a readable local path, base64 data or bytes (remote URLs are not "
                   "fetched), and as many `images` as image parts",
    IMAGE_UNDECODABLE: "replace the file with a PNG/JPEG/WebP image Pillow can open",
    IMAGE_MODE: "save the image as 8-bit RGB, RGBA, grayscale or palette",
    AUDIO_MISSING: "give every audio part a readable local path, base64 data or bytes (remote URLs are not "
                   "fetched), and as many `audios` as audio parts",
    AUDIO_UNDECODABLE: "convert the audio to a PCM WAV file, e.g. `ffmpeg -i IN -ac 1 -ar 16000 OUT.wav`",
}


class RowError(Exception):
    """A malformed row: `reason` is one of DROP_REASONS, `detail` says what is wrong."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


__all__ = ["DROP_REASONS", "FIXES", "IMAGE_DROP_REASONS", "AUDIO_DROP_REASONS", "RowError"]
