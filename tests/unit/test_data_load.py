"""Reading data files: every malformed row is dropped and counted, or (strict_data) reported
as FILE:LINE; JSON, JSONL, Parquet, CSV, directories, hub ids; errors name the key."""
from __future__ import annotations

import json

import pytest

from archtune.assets import load_tokenizer
from archtune.config.schema import Config
from archtune.data import DROP_REASONS, prepare_data
from archtune.data.formats import ALPACA_SYSTEM_NO_INPUT as ALPACA_SYSTEM
from archtune.errors import UserError
from tests.data_plan import data_plan


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer()


def cfg_for(tmp_path, datasets, **kw) -> Config:
    return Config(base_model="tiny:test", datasets=datasets,
                  dataset_prepared_path=str(tmp_path / "prepared"), **kw)


def alpaca_row(i: int, **kw) -> dict:
    return {"instruction": f"Say {i}", "input": "", "output": f"The number {i}.", **kw}


def dropped(stats: dict) -> dict:
    return {k: v for k, v in stats["rows_dropped"].items() if v}


def write_broken_jsonl(path) -> None:
    """Nine lines, one blank: line -> what is wrong with it."""
    lines = [
        json.dumps(alpaca_row(1)).encode(),                           # 1 good
        b'{"instruction": "x", "output": "y"',                        # 2 bad_json
        b'{"instruction": "caf\xe9", "output": "y"}',                 # 3 undecodable (latin-1 byte)
        b"[1, 2, 3]",                                                 # 4 bad_json (not an object)
        json.dumps({"instruction": "no answer"}).encode(),            # 5 missing_field
        json.dumps({"instruction": "x", "output": ["a"]}).encode(),   # 6 wrong_type
        b"",                                                          # 7 blank: not a row
        json.dumps(alpaca_row(2, output="   ")).encode(),             # 8 empty
        json.dumps(alpaca_row(3)).encode(),                           # 9 good
    ]
    path.write_bytes(b"\n".join(lines) + b"\n")


def test_malformed_jsonl_rows_are_dropped_and_counted_by_reason(tmp_path, tok):
    data = tmp_path / "train.jsonl"
    write_broken_jsonl(data)
    p = prepare_data(data_plan(cfg_for(tmp_path, [{"path": str(data)}])), tok, progress=False)
    s = p.stats
    assert (s["rows_in"], s["rows_kept"], s["train_rows"], s["eval_rows"]) == (8, 2, 2, 0)
    assert dropped(s) == {"bad_json": 2, "undecodable": 1, "missing_field": 1, "wrong_type": 1, "empty": 1}
    assert set(s["rows_dropped"]) == set(DROP_REASONS)  # every reason is always reported
    assert [tok.decode(r) for r in p.train["input_ids"]] == [
        f"<bos>{ALPACA_SYSTEM}### Instruction:\nSay 1\n\n### Response:\nThe number 1.<eos>",
        f"<bos>{ALPACA_SYSTEM}### Instruction:\nSay 3\n\n### Response:\nThe number 3.<eos>"]
    assert s["tokens"] == sum(p.train["length"]) == sum(len(r) for r in p.train["input_ids"])
    assert s["label_tokens"] == sum(sum(x != -100 for x in r) for r in p.train["labels"])
    assert set(p.train.column_names) == {"input_ids", "labels", "length", "source"}
    assert all(src.startswith(f"{data}:") for src in p.train["source"])  # FILE:LINE of each row
    json.dumps(s)  # JSON-able


def test_strict_data_reports_every_malformed_row_as_file_and_line(tmp_path, tok):
    data = tmp_path / "train.jsonl"
    write_broken_jsonl(data)
    with pytest.raises(UserError) as err:
        prepare_data(data_plan(cfg_for(tmp_path, [{"path": str(data)}], strict_data=True)), tok, progress=False)
    got = [(p.key, p.message.split(":")[0]) for p in err.value.problems]
    assert got == [(f"{data}:2", "bad_json"), (f"{data}:3", "undecodable"), (f"{data}:4", "bad_json"),
                   (f"{data}:5", "missing_field"), (f"{data}:6", "wrong_type"), (f"{data}:8", "empty")]
    assert all(p.fix for p in err.value.problems)
    assert "'output' is a list" in err.value.problems[4].message
    assert not (tmp_path / "prepared").exists() or not any(
        d.name[0] != "." for d in (tmp_path / "prepared").iterdir())  # nothing cached


def test_strict_data_does_not_refuse_rows_that_are_only_too_long(tmp_path, tok):
    data = tmp_path / "train.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in [alpaca_row(1), alpaca_row(2, output="word " * 200)]))
    p = prepare_data(data_plan(cfg_for(tmp_path, [{"path": str(data)}], strict_data=True, sequence_len=64)), tok, progress=False)
    assert dropped(p.stats) == {"too_long": 1} and p.stats["train_rows"] == 1


def test_parquet_rows_are_named_by_row_number(tmp_path, tok):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    data = tmp_path / "train.parquet"
    pq.write_table(pa.table({"instruction": ["a", "b", None, "d"], "output": ["x", "", "z", "w"]}), data)
    p = prepare_data(data_plan(cfg_for(tmp_path, [{"path": str(data)}])), tok, progress=False)
    assert (p.stats["rows_in"], p.stats["train_rows"]) == (4, 2)
    assert dropped(p.stats) == {"empty": 1, "missing_field": 1}
    with pytest.raises(UserError) as err:
        prepare_data(data_plan(cfg_for(tmp_path, [{"path": str(data)}], strict_data=True)), tok, progress=False)
    assert [p.key for p in err.value.problems] == [f"{data}:row 2", f"{data}:row 3"]


def test_csv_cells_are_strings_and_rows_keep_their_first_line(tmp_path, tok):
    data = tmp_path / "train.csv"
    data.write_bytes(
        b"instruction,input,output\n"      # 1
        b"Hi,,Hello\n"                     # 2 good
        b'"two\nlines",,"42"\n'            # 3-4 good: a multi-line cell, a number stays text
        b"X,,\n"                           # 5 empty output
        b",,\n"                            # 6 blank record: not a row
        b"Y\n"                             # 7 missing output
        b"Z,,caf\xe9\n")                   # 8 not UTF-8
    cfg = cfg_for(tmp_path, [{"path": str(data)}])
    p = prepare_data(data_plan(cfg), tok, progress=False)
    assert dropped(p.stats) == {"empty": 1, "missing_field": 1, "undecodable": 1}
    assert tok.decode(p.train[1]["input_ids"]).endswith("### Response:\n42<eos>")
    with pytest.raises(UserError) as err:
        prepare_data(data_plan(cfg.model_copy(update={"strict_data": True})), tok, progress=False)
    assert [p.key for p in err.value.problems] == [f"{data}:5", f"{data}:7", f"{data}:8"]


def test_json_array_file_rows_and_their_lines(tmp_path, tok):
    data = tmp_path / "train.json"
    data.write_text(json.dumps([alpaca_row(1), {"instruction": "no output"}, alpaca_row(2)], indent=2))
    p = prepare_data(data_plan(cfg_for(tmp_path, [{"path": str(data)}])), tok, progress=False)
    assert p.stats["train_rows"] == 2 and dropped(p.stats) == {"missing_field": 1}
    with pytest.raises(UserError) as err:
        prepare_data(data_plan(cfg_for(tmp_path, [{"path": str(data)}], strict_data=True)), tok, progress=False)
    assert [p.key for p in err.value.problems] == [f"{data}:7"]  # the line the object starts on
    broken = tmp_path / "broken.json"
    broken.write_text('[\n  {"instruction": "a", "output": "b"},\n  {"instruction": "a" "output": "b"}\n]\n')
    with pytest.raises(UserError) as err:
        prepare_data(data_plan(cfg_for(tmp_path, [{"path": str(broken)}])), tok, progress=False)
    assert err.value.problems[0].key == f"{broken}:3" and "JSONL" in err.value.problems[0].fix


def test_jsonl_content_in_a_json_file_is_read_line_by_line(tmp_path, tok):
    data = tmp_path / "train.json"
    data.write_text(json.dumps(alpaca_row(1)) + "\n{oops\n" + json.dumps(alpaca_row(2)) + "\n")
    p = prepare_data(data_plan(cfg_for(tmp_path, [{"path": str(data)}])), tok, progress=False)
    assert p.stats["train_rows"] == 2 and dropped(p.stats) == {"bad_json": 1}


def test_directory_reads_the_split_and_data_files(tmp_path, tok):
    d = tmp_path / "data"
    d.mkdir()
    (d / "train.jsonl").write_text("\n".join(json.dumps(alpaca_row(i)) for i in range(3)))
    (d / "test.jsonl").write_text(json.dumps(alpaca_row(9)))
    (d / "README.md").write_text("not data")
    p = prepare_data(data_plan(cfg_for(tmp_path, [{"path": str(d)}])), tok, progress=False)
    assert p.stats["train_rows"] == 3
    p = prepare_data(data_plan(cfg_for(tmp_path, [{"path": str(d), "split": "test"}])), tok, progress=False)
    assert p.stats["train_rows"] == 1
    p = prepare_data(data_plan(cfg_for(tmp_path, [{"path": str(d), "data_files": ["test.jsonl", "train.jsonl"]}])),
                     tok, progress=False)
    assert p.stats["train_rows"] == 4
    assert "Say 9" in tok.decode(p.train[0]["input_ids"])  # in the order data_files names them
    with pytest.raises(UserError) as err:
        prepare_data(data_plan(cfg_for(tmp_path, [{"path": str(d), "split": "validation"}])), tok, progress=False)
    assert err.value.problems[0].key == "datasets.0.split"


def test_file_type_from_ds_type_and_errors_that_name_the_key(tmp_path, tok):
    odd = tmp_path / "rows.txt"
    odd.write_text(json.dumps(alpaca_row(1)))
    with pytest.raises(UserError) as err:
        prepare_data(data_plan(cfg_for(tmp_path, [{"path": str(odd)}])), tok, progress=False)
    assert err.value.problems[0].key == "datasets.0.ds_type"
    p = prepare_data(data_plan(cfg_for(tmp_path, [{"path": str(odd), "ds_type": "json"}])), tok, progress=False)
    assert p.stats["train_rows"] == 1
    good = {"path": str(odd), "ds_type": "json"}
    for missing in ("./nope.jsonl", str(tmp_path / "nope.jsonl"), "data/sub/dir"):
        with pytest.raises(UserError) as err:
            prepare_data(data_plan(cfg_for(tmp_path, [good, {"path": missing}])), tok, progress=False)
        assert err.value.problems[0].key == "datasets.1.path" and "does not exist" in err.value.problems[0].message
    with pytest.raises(UserError) as err:
        prepare_data(data_plan(cfg_for(tmp_path, [good], test_datasets=[{"path": "./nope.csv"}])), tok, progress=False)
    assert err.value.problems[0].key == "test_datasets.0.path"


def test_unreadable_file_is_a_user_error_naming_the_key(tmp_path, tok, monkeypatch):
    from archtune.data import cache

    data = tmp_path / "train.jsonl"
    data.write_text(json.dumps(alpaca_row(1)))

    def denied(path, *a, **kw):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(cache, "file_digest", denied)
    with pytest.raises(UserError) as err:
        prepare_data(data_plan(cfg_for(tmp_path, [{"path": str(data)}])), tok, progress=False)
    assert err.value.problems[0].key == "datasets.0.path" and "Permission denied" in err.value.problems[0].message


def test_no_usable_rows_is_an_error_with_the_reasons(tmp_path, tok):
    data = tmp_path / "train.jsonl"
    data.write_text('{"instruction": "x"}\nnot json\n')
    with pytest.raises(UserError) as err:
        prepare_data(data_plan(cfg_for(tmp_path, [{"path": str(data)}])), tok, progress=False)
    problem = err.value.problems[0]
    assert problem.key == "datasets" and "missing_field 1" in problem.message and "bad_json 1" in problem.message


def test_hub_id_is_loaded_with_name_and_split(tmp_path, tok, monkeypatch):
    import datasets

    calls = []

    def fake_load_dataset(path, name=None, split=None, data_files=None, **kw):
        calls.append((path, name, split, data_files))
        return datasets.Dataset.from_dict({"instruction": ["a", "b"], "output": ["x", ""]})

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    cfg = cfg_for(tmp_path, [{"path": "org/some-set", "name": "en", "split": "train[:10]"}])
    p = prepare_data(data_plan(cfg), tok, progress=False)
    assert calls == [("org/some-set", "en", "train[:10]", None)]
    assert (p.stats["train_rows"], dropped(p.stats)) == (1, {"empty": 1})
    assert prepare_data(data_plan(cfg), tok, progress=False).stats["cache"] == "hit"
    other = cfg_for(tmp_path, [{"path": "org/some-set", "name": "en", "split": "train[:20]"}])
    assert prepare_data(data_plan(other), tok, progress=False).stats["cache"] == "miss"

    def failing(*a, **kw):
        raise ConnectionError("no network")

    monkeypatch.setattr(datasets, "load_dataset", failing)
    with pytest.raises(UserError) as err:
        prepare_data(data_plan(cfg_for(tmp_path, [{"path": "org/other"}])), tok, progress=False)
    assert err.value.problems[0].key == "datasets.0.path" and "no network" in err.value.problems[0].message
