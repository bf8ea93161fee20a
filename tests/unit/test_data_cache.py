"""The preprocessing cache (hits, what changes its key, atomic writes) and the validation split."""
from __future__ import annotations

import json

import pytest

from archtune.assets import load_tokenizer
from archtune.config.schema import Config
from archtune.data import cache, prepare_data
from archtune.errors import UserError
from tests.data_plan import data_plan


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer()


def write_rows(path, n: int, start: int = 0) -> None:
    path.write_text("".join(json.dumps({"instruction": f"Count to {i}", "output": f"{i} {i + 1}"}) + "\n"
                            for i in range(start, start + n)))


def base_cfg(tmp_path, **kw) -> Config:
    data = tmp_path / "train.jsonl"
    if not data.exists():
        write_rows(data, 20)
    return Config(base_model="tiny:test", datasets=[{"path": str(data)}],
                  dataset_prepared_path=str(tmp_path / "prepared"), **kw)


def entries(tmp_path) -> list[str]:
    root = tmp_path / "prepared"
    return sorted(p.name for p in root.iterdir()) if root.exists() else []


def test_second_run_is_a_hit_with_the_same_rows_and_stats(tmp_path, tok):
    cfg = base_cfg(tmp_path, val_set_size=0.25)
    first = prepare_data(data_plan(cfg), tok, progress=False)
    second = prepare_data(data_plan(cfg), tok, progress=False)
    assert (first.stats["cache"], second.stats["cache"]) == ("miss", "hit")
    assert first.stats["cache_dir"] == second.stats["cache_dir"]
    strip = lambda s: {k: v for k, v in s.items() if k != "cache"}  # noqa: E731
    assert strip(first.stats) == strip(second.stats)
    assert first.train.to_dict() == second.train.to_dict() and first.eval.to_dict() == second.eval.to_dict()
    entry = tmp_path / "prepared" / entries(tmp_path)[0]
    assert {p.name for p in entry.iterdir()} == {"train", "eval", "stats.json", "key.json"}
    assert entries(tmp_path) == [entry.name] and len(entry.name) == 64  # no temporary left behind


# (config change, same key?) — only the keys that shape tokens matter
CONFIG_CHANGES = [
    ({"learning_rate": 1e-3, "output_dir": "elsewhere", "micro_batch_size": 4}, True),
    ({"sequence_len": 1024}, False),
    ({"seed": 7}, False),
    ({"val_set_size": 0.1}, False),
    ({"train_on_inputs": True}, False),
    ({"excess_length_strategy": "truncate"}, False),
    ({"strict_data": True}, False),
    ({"special_tokens": {"pad_token": "<pad>"}}, False),
    ({"chat_template": "{{ messages }}"}, False),
]


@pytest.mark.parametrize("change,same", CONFIG_CHANGES, ids=[",".join(c) for c, _ in CONFIG_CHANGES])
def test_which_config_keys_change_the_cache_key(tmp_path, tok, change, same):
    cfg = base_cfg(tmp_path)
    key, _ = cache.cache_key(cfg, tok, [])
    other, _ = cache.cache_key(cfg.model_copy(update=change), tok, [])
    assert (key == other) is same


def test_data_bytes_tokenizer_and_dataset_entries_change_the_key(tmp_path, tok):
    cfg = base_cfg(tmp_path)
    assert prepare_data(data_plan(cfg), tok, progress=False).stats["cache"] == "miss"
    data = tmp_path / "train.jsonl"
    data.write_bytes(data.read_bytes().replace(b"Count to 3", b"Count to 4"))  # one byte
    p = prepare_data(data_plan(cfg), tok, progress=False)
    assert p.stats["cache"] == "miss" and "Count to 4" in tok.decode(p.train[3]["input_ids"])
    assert prepare_data(data_plan(cfg), tok, progress=False).stats["cache"] == "hit"
    changed = load_tokenizer()
    changed.chat_template = changed.chat_template.replace("model", "assistant")
    assert prepare_data(data_plan(cfg), changed, progress=False).stats["cache"] == "miss"
    added = load_tokenizer()
    added.add_tokens(["<new_token>"])
    assert prepare_data(data_plan(cfg), added, progress=False).stats["cache"] == "miss"
    renamed = cfg.model_copy(update={"datasets": [cfg.datasets[0].model_copy(update={"field_output": "answer"})]})
    with pytest.raises(UserError):  # a new key: the rows are read again and none has "answer"
        prepare_data(data_plan(renamed), tok, progress=False)
    assert len(entries(tmp_path)) == 4


def test_a_crash_while_writing_leaves_no_entry(tmp_path, tok, monkeypatch):
    import archtune.data.pipeline as pipeline

    cfg = base_cfg(tmp_path, val_set_size=2)

    def crash(*a, **kw):
        raise RuntimeError("killed while writing")

    monkeypatch.setattr(pipeline, "_label_tokens", crash)  # runs after train/ and eval/ are on disk
    with pytest.raises(RuntimeError):
        prepare_data(data_plan(cfg), tok, progress=False)
    assert entries(tmp_path) == []
    monkeypatch.undo()
    assert prepare_data(data_plan(cfg), tok, progress=False).stats["cache"] == "miss"


def test_a_damaged_entry_is_rebuilt(tmp_path, tok):
    cfg = base_cfg(tmp_path)
    p = prepare_data(data_plan(cfg), tok, progress=False)
    entry = tmp_path / "prepared" / entries(tmp_path)[0]
    (entry / "stats.json").unlink()
    again = prepare_data(data_plan(cfg), tok, progress=False)
    assert again.stats["cache"] == "miss" and again.stats["cache_dir"] == p.stats["cache_dir"]
    assert (entry / "stats.json").is_file() and entries(tmp_path) == [entry.name]
    assert prepare_data(data_plan(cfg), tok, progress=False).stats["cache"] == "hit"


def test_commit_keeps_the_entry_another_process_finished_first(tmp_path, tok):
    cfg = base_cfg(tmp_path)
    p = prepare_data(data_plan(cfg), tok, progress=False)
    entry = tmp_path / "prepared" / entries(tmp_path)[0]
    late = tmp_path / "prepared" / ".tmp-late"
    late.mkdir()
    (late / "marker").write_text("x")
    cache.commit(late, entry)  # the same key finished twice: the first copy stays
    assert not late.exists() and not (entry / "marker").exists()
    assert prepare_data(data_plan(cfg), tok, progress=False).stats == {**p.stats, "cache": "hit"}


def test_validation_split_is_deterministic_under_seed(tmp_path, tok):
    def split(**kw):
        p = prepare_data(data_plan(base_cfg(tmp_path, **kw)), tok, progress=False)
        return [tok.decode(r) for r in p.train["input_ids"]], [tok.decode(r) for r in p.eval["input_ids"]], p.stats

    train, ev, stats = split(val_set_size=0.25, seed=1)
    assert (len(train), len(ev), stats["train_rows"], stats["eval_rows"]) == (15, 5, 15, 5)
    train2, ev2, _ = split(val_set_size=0.25, seed=2)
    assert ev2 != ev and sorted(train + ev) == sorted(train2 + ev2)
    assert not set(train) & set(ev)
    assert train == sorted(train, key=lambda t: int(t.split("Count to ")[1].split("\n")[0]))  # file order kept
    assert split(val_set_size=0.25, seed=1)[:2] == (train, ev)  # same seed (a cache hit)
    cache_free = tmp_path / "other"
    cache_free.mkdir()
    p = prepare_data(data_plan(base_cfg(tmp_path, val_set_size=0.25, seed=1).model_copy(
        update={"dataset_prepared_path": str(cache_free)})), tok, progress=False)
    assert p.stats["cache"] == "miss" and [tok.decode(r) for r in p.eval["input_ids"]] == ev  # recomputed
    assert len(split(val_set_size=3)[1]) == 3
    assert prepare_data(data_plan(base_cfg(tmp_path)), tok, progress=False).eval is None
    with pytest.raises(UserError) as err:
        prepare_data(data_plan(base_cfg(tmp_path, val_set_size=20)), tok, progress=False)
    assert err.value.problems[0].key == "val_set_size"


def test_test_datasets_are_the_eval_set(tmp_path, tok):
    held = tmp_path / "held.jsonl"
    write_rows(held, 4, start=100)
    p = prepare_data(data_plan(base_cfg(tmp_path, val_set_size=0.5, test_datasets=[{"path": str(held)}])), tok, progress=False)
    assert (p.stats["train_rows"], p.stats["eval_rows"], p.stats["rows_in"]) == (20, 4, 24)
    assert "Count to 100" in tok.decode(p.eval[0]["input_ids"])
    assert p.stats["tokens"] == p.stats["train_tokens"] + p.stats["eval_tokens"] == \
        sum(p.train["length"]) + sum(p.eval["length"])
