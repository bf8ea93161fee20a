"""Files shipped inside the archtune package: its own small tokenizer.

The tokenizer (a 2048-token byte-level BPE trained by scripts/train_tokenizer.py on the
bundled example data) gives the embedded tiny models (`base_model: tiny:NAME`) their
vocabulary and special token ids. Its special tokens have fixed ids: SPECIAL_TOKENS[i] has
id i (`<pad>`=0, `<eos>`=1, `<bos>`=2, `<unk>`=3, ...). Encoding with
`add_special_tokens=True` prepends `<bos>`; the chat template is Gemma-style.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    from transformers import PreTrainedTokenizerFast

TOKENIZER_DIR: Path = Path(__file__).resolve().parent / "tokenizer"

# In id order: SPECIAL_TOKENS[i] has id i. Keep in sync with scripts/train_tokenizer.py.
SPECIAL_TOKENS: tuple[str, ...] = (
    "<pad>", "<eos>", "<bos>", "<unk>",
    "<start_of_turn>", "<end_of_turn>",
    "<image_soft_token>", "<audio_soft_token>", "<video_soft_token>",
    "<start_of_image>", "<end_of_image>", "<start_of_audio>", "<end_of_audio>",
    "<vision_start>", "<vision_end>",
)
VOCAB_SIZE: int = 2048


def load_tokenizer() -> "PreTrainedTokenizerFast":
    """archtune's bundled tokenizer, a new object on every call (not cached; loading takes
    a few milliseconds), so callers may change it (padding side, template) freely.

    Same as `AutoTokenizer.from_pretrained(TOKENIZER_DIR)`, except that `add_bos_token` is
    passed so that the attribute reads True (transformers 5 otherwise reports False for it,
    although the tokenizer's post-processor adds `<bos>` either way).
    """
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast.from_pretrained(str(TOKENIZER_DIR), add_bos_token=True)


__all__ = ["TOKENIZER_DIR", "SPECIAL_TOKENS", "VOCAB_SIZE", "load_tokenizer"]
