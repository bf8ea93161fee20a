"""Tokenize formatted rows and build their labels.

The full text of a row is tokenized once, with character offsets; a token gets a label
when its characters overlap a trained span of the formatted row (formats.py). So the
masked spans line up with the tokens the model actually sees, whatever the tokenizer
merges across a prompt/answer boundary (a token that straddles one is trained: it carries
answer text). Tokenizers without offsets (slow, Python ones) tokenize the spans one by one
instead.

bos is added once: as the tokenizer's own `add_special_tokens=True` would (probed once),
and not when the text already starts with it (chat templates that render `<bos>`). eos is
appended as an id (not as text) for the formats that end with one.
"""
from __future__ import annotations

import json
from dataclasses import dataclass

from archtune.config.schema import DatasetConfig
from archtune.data import formats, row_errors
from archtune.data.formats import FormatContext, Formatted
from archtune.data.row_errors import RowError
from archtune.errors import UserError

IGNORE_INDEX = -100


@dataclass(frozen=True)
class TokenizeSettings:
    """The config keys that shape tokens (the same ones the cache key covers)."""

    sequence_len: int
    excess_length_strategy: str = "drop"  # "drop" | "truncate"
    train_on_inputs: bool = False
    chat_template: str | None = None  # the plan's chat template (Jinja text); None: the tokenizer's own
    eot_tokens: tuple[str, ...] = ()  # eot_tokens: turn-end markers that get loss with their turn


def special_token_strings(tokenizer) -> tuple[str, ...]:
    names = set(getattr(tokenizer, "all_special_tokens", None) or ())
    for tok in (getattr(tokenizer, "added_tokens_decoder", None) or {}).values():
        if getattr(tok, "special", False):
            names.add(str(tok.content))
    return tuple(sorted(names, key=len, reverse=True))


def check_eot_tokens(tokenizer, tokens: list[str] | None) -> None:
    """Each of `eot_tokens` must be exactly one token of the tokenizer (Axolotl's rule)."""
    from archtune.models.load import eot_token_problem

    problem = eot_token_problem(tokenizer, tokens)
    if problem:
        raise UserError.single("eot_tokens", *problem)


def bos_to_add(tokenizer) -> int | None:
    """The bos id the tokenizer prepends with add_special_tokens=True, or None."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return None
    probe = tokenizer("a", add_special_tokens=True)["input_ids"]
    return bos if probe and probe[0] == bos else None


class RowEncoder:
    """Formats and tokenizes rows of one dataset entry (a datasets.map function)."""

    def __init__(self, tokenizer, ds: DatasetConfig, settings: TokenizeSettings, media=None,
                 media_refusal: str | None = None):
        """`media`: the model's processor (data/media.MediaProcessor) when this run trains on
        images, else None and `media_refusal` says why rows with images are refused."""
        self.tokenizer = tokenizer
        self.ds = ds
        self.settings = settings
        self.format = formats.get_format(ds.type)
        self.media = media
        # Rows with images render with the processor's chat template (the tokenizer's may not
        # render image parts), unless the config names one.
        template_owner = media.processor if media is not None and getattr(media.processor, "chat_template", None) \
            and settings.chat_template is None else tokenizer
        template = (formats.resolve_chat_template(settings.chat_template, template_owner)
                    if ds.type == "chat_template" else None)
        if template is None and template_owner is not tokenizer:
            template = template_owner.chat_template
        self.ctx = FormatContext(tokenizer=tokenizer, chat_template=template,
                                 special_tokens=tuple(sorted(set(special_token_strings(tokenizer)) | set(settings.eot_tokens),
                                                             key=len, reverse=True)),
                                 media=media)
        if media_refusal:
            self.ctx.media_refusal = media_refusal
        self.columns = OUTPUT_COLUMNS + (MEDIA_COLUMNS if media is not None else ())
        self.bos_id = bos_to_add(tokenizer)
        self.eos_id = getattr(tokenizer, "eos_token_id", None)
        self.eos_text = getattr(tokenizer, "eos_token", None)
        self.backend = _plain_backend(tokenizer)

    # -- rows

    def encode(self, row: dict) -> dict:
        """{input_ids, labels, length, _drop, _detail, _truncated, _realigned}; _drop is '' when kept."""
        return self.encode_many([row])[0]

    def encode_many(self, rows: list) -> list[dict]:
        """Encode rows; an item may also be a `_dropped(...)` result, passed through."""
        items: list = []
        for row in rows:
            if isinstance(row, _Dropped):
                items.append(row.result)
                continue
            try:
                fm = self.format(row, self.ds, self.ctx)
            except RowError as exc:
                items.append(_dropped(exc.reason, exc.detail))
                continue
            if not is_utf8(fm.text):  # a lone surrogate (JSON "\ud800"): the tokenizer cannot take it
                items.append(_dropped(row_errors.UNDECODABLE, "the text holds a lone UTF-16 surrogate"))
                continue
            items.append(fm)
        todo = [fm for fm in items if isinstance(fm, Formatted)]
        encoded = iter(self._tokenize_many(todo))
        out = []
        for fm in items:
            if not isinstance(fm, Formatted):
                out.append(fm)
                continue
            try:
                out.append(self._finish(fm, *next(encoded)))
            except RowError as exc:  # an image that does not decode
                out.append(_dropped(exc.reason, exc.detail, fm.realigned))
        if self.media is not None:
            for result in out:
                result.setdefault("images", [])
                result.setdefault("audios", [])
                result.setdefault("token_types", [0] * len(result["input_ids"]))
        return out

    def _finish(self, fm: Formatted, ids: list[int], ranges: list[tuple[int, int]]) -> dict:
        if self.bos_id is not None and (not ids or ids[0] != self.bos_id):
            ids.insert(0, self.bos_id)
            ranges = [(a + 1, b + 1) for a, b in ranges]
        if fm.add_eos and self.eos_id is not None:
            already = ids and ids[-1] == self.eos_id and self.eos_text and fm.text.endswith(self.eos_text)
            if not already:
                ids.append(self.eos_id)
                if fm.spans and fm.spans[-1][1] == len(fm.text):  # the answer runs to the end
                    ranges.append((len(ids) - 1, len(ids)))
        if self.settings.train_on_inputs:
            labels = list(ids)
        else:
            labels = [IGNORE_INDEX] * len(ids)
            for a, b in ranges:
                labels[a:b] = ids[a:b]
        extra = {}
        media = bool(fm.images or fm.audios)
        if media:
            # The processor's tokens: images and audios expanded, their tokens never labels (data/media.py).
            ids, labels, types = self.media.encode(fm.text, fm.images, ids, labels, audios=fm.audios)
            extra = {"images": fm.images, "audios": fm.audios, "token_types": types}
        if all(lab == IGNORE_INDEX for lab in labels):
            return _dropped(row_errors.NO_LABELS, "no tokens left to train on after masking", fm.realigned)
        truncated = False
        limit = self.settings.sequence_len
        if len(ids) > limit:
            if self.settings.excess_length_strategy != "truncate" or media:
                why = " (a row with images or audio is never truncated: its media tokens must stay whole)" \
                    if media else ""
                return _dropped(row_errors.TOO_LONG, f"{len(ids)} tokens > sequence_len {limit}{why}", fm.realigned)
            ids, labels, truncated = ids[:limit], labels[:limit], True
            if all(lab == IGNORE_INDEX for lab in labels):
                return _dropped(row_errors.TOO_LONG, f"{len(ids)} tokens > sequence_len {limit} and "
                                                  "truncating leaves nothing to train on", fm.realigned)
        return {"input_ids": ids, "labels": labels, "length": len(ids), "_drop": "", "_detail": "",
                "_truncated": truncated, "_realigned": fm.realigned, **extra}

    def _tokenize_many(self, fms: list[Formatted]) -> list[tuple[list[int], list[tuple[int, int]]]]:
        """(ids, trained token ranges) per formatted row, from one tokenization of its text."""
        if not fms:
            return []
        if self.backend is None:
            return [self._tokenize_pieces(fm) for fm in fms]
        out = []
        for fm, enc in zip(fms, self.backend.encode_batch([fm.text for fm in fms], add_special_tokens=False)):
            ranges = []
            n = len(enc.ids)
            for s, e in fm.spans:
                # first token ending after s .. first token starting at or after e: every token
                # that overlaps the span (a token straddling a boundary carries answer text).
                a = _first(n, lambda i: _chars(enc, i)[1] > s)
                b = _first(n, lambda i: _chars(enc, i)[0] >= e)
                if a < b:
                    ranges.append((a, b))
                    # The prompt's own tokens are then not a prefix of the row's tokens (e.g. a
                    # generation prompt ending in a space, merged into the answer's first word).
                    if _chars(enc, a)[0] < s or _chars(enc, b - 1)[1] > e:
                        fm.realigned = True
            out.append((list(enc.ids), ranges))
        return out

    def _tokenize_pieces(self, fm: Formatted) -> tuple[list[int], list[tuple[int, int]]]:
        """Tokenizers without offsets (slow, Python ones): tokenize span by span."""
        cuts = sorted({0, len(fm.text), *(p for span in fm.spans for p in span)})
        ids: list[int] = []
        ranges: list[tuple[int, int]] = []
        for a, b in zip(cuts, cuts[1:]):
            piece = self.tokenizer(fm.text[a:b], add_special_tokens=False)["input_ids"]
            if any(s <= a and b <= e for s, e in fm.spans):
                ranges.append((len(ids), len(ids) + len(piece)))
            ids.extend(piece)
        return ids, ranges

    # -- a datasets.map batch

    def __call__(self, batch: dict[str, list], indices: list[int], *, origin: str) -> dict[str, list]:
        from pathlib import Path

        from archtune.data.media import MediaRefused

        self.ctx.base_dir = Path(origin).parent  # relative image paths are read from the data file's directory
        if "_raw" in batch:
            srcs = batch["_src"]
            rows = [_Dropped(_dropped(err, detail or "")) if err else _parse_json(raw)
                    for raw, err, detail in zip(batch["_raw"], batch["_err"], batch["_detail"])]
        else:
            columns = [c for c in batch if not c.startswith("_")]
            srcs = [f"{origin}:row {idx + 1}" for idx in indices]
            rows = [{c: batch[c][j] for c in columns} for j in range(len(indices))]
        try:
            results = self.encode_many(rows)
        except MediaRefused:
            for src, row in zip(srcs, rows):  # name the first row refused
                try:
                    self.encode_many([row])
                except MediaRefused as exc:
                    raise UserError.single(src, str(exc), _REFUSAL_FIX) from None
            raise
        out: dict[str, list] = {k: [] for k in self.columns}
        for src, result in zip(srcs, results):
            result["_src"] = src
            for k in self.columns:
                out[k].append(result[k])
        return out


_REFUSAL_FIX = ("train a multimodal model whose processor archtune can load (processor files beside the weights, "
                "or processor_type) on these rows, remove their media, or set a chat_template that renders "
                "the model's image placeholder")


class _Dropped:
    """A row that failed before formatting (unreadable line): its result is known."""

    __slots__ = ("result",)

    def __init__(self, result: dict):
        self.result = result


def _parse_json(text: str):
    try:
        row = json.loads(text)
    except ValueError as exc:
        return _Dropped(_dropped(row_errors.BAD_JSON, f"invalid JSON: {exc}"))
    if not isinstance(row, dict):
        return _Dropped(_dropped(row_errors.BAD_JSON, f"JSON {type(row).__name__} where an object was expected"))
    return row


def _first(n: int, pred) -> int:
    """The smallest i in [0, n) with pred(i) true (pred is monotone), else n."""
    lo, hi = 0, n
    while lo < hi:
        mid = (lo + hi) // 2
        if pred(mid):
            hi = mid
        else:
            lo = mid + 1
    return lo


def _chars(enc, i: int) -> tuple[int, int]:
    return enc.token_to_chars(i) or enc.offsets[i]


def is_utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _plain_backend(tokenizer):
    """A copy of the fast tokenizer's Rust backend with no truncation or padding (what
    `tokenizer(text)` does by default), called directly: encode_batch runs in parallel
    threads and skips the per-call overhead of the Python wrapper. None for slow tokenizers."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or not getattr(tokenizer, "is_fast", True):
        return None
    from tokenizers import Tokenizer

    plain = Tokenizer.from_str(backend.to_str())
    plain.no_truncation()
    plain.no_padding()
    return plain


OUTPUT_COLUMNS = ("input_ids", "labels", "length", "_drop", "_detail", "_src", "_truncated", "_realigned")
# Added when the run trains on media: the encoded image and audio files, the processor's per-token type ids.
MEDIA_COLUMNS = ("images", "audios", "token_types")


def output_features(media: bool = False):
    from datasets import Features, List, Value

    features = {"input_ids": List(Value("int64")), "labels": List(Value("int64")),
                "length": Value("int64"), "_drop": Value("string"), "_detail": Value("string"),
                "_src": Value("string"), "_truncated": Value("bool"), "_realigned": Value("bool")}
    if media:
        features.update(images=List(Value("binary")), audios=List(Value("binary")), token_types=List(Value("int64")))
    return Features(features)


def _dropped(reason: str, detail: str, realigned: bool = False) -> dict:
    return {"input_ids": [], "labels": [], "length": 0, "_drop": reason, "_detail": detail,
            "_truncated": False, "_realigned": realigned}


def encode_prompt(dataset_cfg: DatasetConfig, tokenizer, prompt: str, *, chat_template: str | None = None,
                  input_text: str = "") -> list[int]:
    """Token ids of a generation prompt, exactly as training tokenized that prompt (one bos)."""
    text = formats.render_prompt(dataset_cfg, tokenizer, prompt, chat_template=chat_template, input_text=input_text)
    ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    bos = bos_to_add(tokenizer)
    if bos is not None and (not ids or ids[0] != bos):
        ids.insert(0, bos)
    return ids


def check_tokenizer(tokenizer, key: str = "base_model") -> None:
    """Refuse a tokenizer the pipeline cannot use (called once, before any row)."""
    if getattr(tokenizer, "eos_token_id", None) is None:
        raise UserError.single("special_tokens", f"the tokenizer of {key} has no eos token",
                               "set special_tokens: {eos_token: ...}")


__all__ = ["IGNORE_INDEX", "TokenizeSettings", "RowEncoder", "encode_prompt", "bos_to_add",
           "special_token_strings", "check_tokenizer"]
