"""Data pipeline: the paper's parquet files, other sources, reports, prompt rendering, stream, batching."""

import json
import os
import time
from pathlib import Path

import numpy as np
import pytest

from realjax import data
from realjax.models.char_tokenizer import char_tokenizer

REPO = Path(__file__).resolve().parents[1]
PAPER_DATA = Path(os.environ.get("REALJAX_PAPER_DATA", REPO / ".." / "shared" / "data" / "paper"))
needs_paper_data = pytest.mark.skipif(
    not PAPER_DATA.is_dir(), reason=f"paper data not found at {PAPER_DATA} (set REALJAX_PAPER_DATA)")

# name -> (rows, python type of every ground truth after normalisation)
PAPER_SETS = {"aime": (30, str), "aime25": (30, str), "amc": (83, str), "math": (500, str),
              "minerva": (272, list), "olympiad_bench": (675, list), "dapo-math-17k": (17398, str)}


@pytest.fixture(scope="module")
def tokenizer():
    return char_tokenizer()


def _row(content="What is 1+1?", answer="2", **extra):
    return {"prompt": [{"role": "user", "content": content}], "reward_model": {"ground_truth": answer},
            **extra}


def _write_jsonl(path, records):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


# ----------------------------------------------------------------------------------------------------
# The paper's data
# ----------------------------------------------------------------------------------------------------
@needs_paper_data
@pytest.mark.parametrize("name", PAPER_SETS)
def test_paper_parquet_loads_and_normalises(name):
    rows, report = data.load_rows(str(PAPER_DATA / f"{name}.parquet"))
    n, gt_type = PAPER_SETS[name]
    assert (report.total, report.kept, report.dropped) == (n, n, 0), report.summary()
    assert all(isinstance(r["ground_truth"], gt_type) for r in rows)
    if gt_type is list:
        assert all(r["ground_truth"] and all(isinstance(g, str) for g in r["ground_truth"]) for r in rows)
    first = rows[0]
    assert first["messages"][0]["role"] == "user" and "\\boxed{}" in first["messages"][-1]["content"]
    assert isinstance(first["data_source"], str) and "extra_info" in first and "reward_model" not in first
    assert not any(k.startswith("__") for k in first)


@needs_paper_data
def test_paper_ground_truth_values():
    def gts(name):
        return [r["ground_truth"] for r in data.load_rows(str(PAPER_DATA / f"{name}.parquet"))[0]]

    assert gts("aime25")[0] == "70"  # int64 in the file
    assert gts("amc")[0] == "142"  # 142.0 in the file
    assert gts("minerva")[0] == ["9.6\n"]  # verbatim, list semantics kept
    assert gts("aime")[0] == "204"


@needs_paper_data
def test_paper_eval_sets_by_name_render(tokenizer):
    specs = ",".join(str(PAPER_DATA / f"{n}.parquet") for n in PAPER_SETS if n != "dapo-math-17k")
    loaded = data.load_many(specs)
    assert list(loaded) == [n for n in PAPER_SETS if n != "dapo-math-17k"]
    for rows, report in loaded.values():
        kept, full = data.render_prompts(rows, tokenizer, max_prompt_tokens=100_000, report=report)
        assert (full.total, full.kept) == (len(rows), len(rows)), full.summary()
        text = kept[0]["prompt_text"]
        assert text.startswith("<|im_start|>user\n") and text.endswith("<|im_end|>\n<|im_start|>assistant\n")
        assert kept[0]["prompt_ids"].dtype == np.int32 and kept[0]["prompt_ids"][0] == 1  # <|im_start|>
    # A tight limit drops prompts, and says how many.
    rows, report = loaded["math"]
    kept, full = data.render_prompts(rows, tokenizer, max_prompt_tokens=200, report=report)
    assert 0 < full.too_long < len(rows) and full.kept == len(kept) == len(rows) - full.too_long
    assert all(len(r["prompt_ids"]) <= 200 for r in kept)
    assert f"dropped {full.too_long} too long" in full.summary()


@needs_paper_data
def test_paper_train_set_renders(tokenizer):
    rows, report = data.load_rows(str(PAPER_DATA / "dapo-math-17k.parquet"))
    rows = rows[:1000]  # the char tokenizer is slow on all 17k; the schema is uniform
    kept, stage = data.render_prompts(rows, tokenizer, max_prompt_tokens=1024)
    assert stage.total == 1000 and stage.kept + stage.too_long == 1000 and stage.kept > 900


# ----------------------------------------------------------------------------------------------------
# Other sources
# ----------------------------------------------------------------------------------------------------
def test_jsonl_prompt_and_messages_forms(tmp_path):
    path = _write_jsonl(tmp_path / "mix.jsonl", [
        {"prompt": "2+2?", "answer": 4},
        {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "3*3?"}],
         "ground_truth": ["9", "nine"], "data_source": "toy", "id": 7},
        {"question": "Tom has 3 apples and eats one. How many are left?", "answer": "He has 3-1=2.\n#### 2"},
        {"problem": "Solve x+1=3.", "solution": "$x=\\boxed{2}$", "answer": "2", "level": 1},
    ])
    rows, report = data.load_rows(str(path))
    assert (report.total, report.kept) == (4, 4)
    user = {"role": "user", "content": "2+2?"}
    assert rows[0] == {"messages": [user], "ground_truth": "4", "data_source": ""}
    assert rows[1]["ground_truth"] == ["9", "nine"] and rows[1]["data_source"] == "toy" and rows[1]["id"] == 7
    assert rows[2]["ground_truth"] == "2"  # GSM8K "#### answer"
    assert rows[2]["messages"][0]["content"].endswith(" " + data.PAPER_INSTRUCTION)
    assert rows[3]["ground_truth"] == "2"  # the short answer wins over the worked solution
    assert rows[3]["solution"] == "$x=\\boxed{2}$" and rows[3]["level"] == 1  # extras kept
    plain, _ = data.load_rows(str(path), instruction=None)
    assert plain[2]["messages"][0]["content"] == "Tom has 3 apples and eats one. How many are left?"


def test_json_list_and_directory_of_files(tmp_path):
    (tmp_path / "list.json").write_text(json.dumps([_row(answer=1), _row(answer=2.5)]))
    assert [r["ground_truth"] for r in data.load_rows(str(tmp_path / "list.json"))[0]] == ["1", "2.5"]
    folder = tmp_path / "folder"
    (folder / "data").mkdir(parents=True)
    _write_jsonl(folder / "data" / "train-0.jsonl", [_row(answer=0), _row(answer=1)])
    _write_jsonl(folder / "data" / "train-1.jsonl", [_row(answer=2)])
    _write_jsonl(folder / "data" / "test.jsonl", [_row(answer=3)])
    (folder / "meta.json").write_text(json.dumps({"not": "rows"}))  # another kind: ignored
    assert [r["ground_truth"] for r in data.load_rows(str(folder))[0]] == ["0", "1", "2"]  # train* first
    assert [r["ground_truth"] for r in data.load_rows(f"{folder}:test")[0]] == ["3"]
    assert data.spec_name(f"{folder}:test") == "folder"
    with pytest.raises(data.DataError, match="no .* files named valid"):
        data.load_rows(f"{folder}:valid")
    evals = tmp_path / "evals"
    evals.mkdir()
    _write_jsonl(evals / "a.jsonl", [_row(answer="a")])
    _write_jsonl(evals / "b.jsonl", [_row(answer="b")])
    assert [r["ground_truth"] for r in data.load_rows(str(evals))[0]] == ["a", "b"]  # no split names: all


def test_save_to_disk_dataset_and_dataset_dict(tmp_path):
    datasets = pytest.importorskip("datasets")
    records = [_row(answer=str(i)) for i in range(5)]
    datasets.Dataset.from_list(records).save_to_disk(str(tmp_path / "single"))
    rows, report = data.load_rows(str(tmp_path / "single"))
    assert report.kept == 5 and rows[4]["ground_truth"] == "4"
    dd = datasets.DatasetDict({"test": datasets.Dataset.from_list(records[:2]),
                               "train": datasets.Dataset.from_list(records[2:])})
    dd.save_to_disk(str(tmp_path / "dict"))
    assert [r["ground_truth"] for r in data.load_rows(str(tmp_path / "dict"))[0]] == ["2", "3", "4"]
    assert [r["ground_truth"] for r in data.load_rows(f"{tmp_path / 'dict'}:test")[0]] == ["0", "1"]
    with pytest.raises(data.DataError, match="no split 'valid'.*available"):
        data.load_rows(f"{tmp_path / 'dict'}:valid")


def test_damaged_save_to_disk_dataset_is_one_line(tmp_path):
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_list([_row(answer=str(i)) for i in range(5)]).save_to_disk(str(tmp_path / "d"))
    for arrow in (tmp_path / "d").glob("*.arrow"):
        arrow.write_bytes(arrow.read_bytes()[:40])  # truncated
    with pytest.raises(data.DataError, match="not a readable saved HF dataset") as err:
        data.load_rows(str(tmp_path / "d"))
    assert "\n" not in str(err.value) and str(tmp_path / "d") in str(err.value)


def test_synthetic_spec():
    pytest.importorskip("realjax.rewards.synthetic", reason="realjax.rewards.synthetic not written yet")
    rows, report = data.load_rows("synthetic:arithmetic?n=50&seed=3&max_ops=2")
    assert report.kept == report.total == 50
    assert all(isinstance(r["ground_truth"], str) and r["messages"][0]["role"] == "user" for r in rows)
    again, _ = data.load_rows("synthetic:arithmetic?n=50&seed=3&max_ops=2")
    assert again == rows
    assert data.spec_name("synthetic:arithmetic?n=5") == "arithmetic"


def test_synthetic_spec_errors():
    with pytest.raises(data.DataError, match="unknown synthetic task 'chess'"):
        data.load_rows("synthetic:chess")
    with pytest.raises(data.DataError, match="unknown parameter 'size'.*min_ops"):
        data.load_rows("synthetic:arithmetic?size=3")
    with pytest.raises(data.DataError, match="n='ten' is not an integer"):
        data.load_rows("synthetic:arithmetic?n=ten")


def test_missing_path_and_unsupported_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.parquet"):
        data.load_rows(str(tmp_path / "nope.parquet"))
    with pytest.raises(FileNotFoundError, match="not/a/hub/name"):
        data.load_rows("not/a/hub/name")
    (tmp_path / "rows.csv").write_text("a,b\n")
    with pytest.raises(data.DataError, match="unsupported file type '.csv'"):
        data.load_rows(str(tmp_path / "rows.csv"))


def test_hub_name_offline_is_fast_and_clear(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.monotonic()
    with pytest.raises(data.DataError, match=r"'BytedTsinghua-SIA/DAPO-Math-17k': offline") as err:
        data.load_rows("BytedTsinghua-SIA/DAPO-Math-17k")
    assert time.monotonic() - start < 5 and "\n" not in str(err.value) and "save_to_disk" in str(err.value)
    with pytest.raises(data.DataError, match="empty data spec"):
        data.load_rows(" ")


def test_hub_name_unreachable_is_fast_and_clear(monkeypatch):
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # the discard port: refused at once
    start = time.monotonic()
    with pytest.raises(data.DataError, match="the hub is unreachable"):
        data.load_rows("someone/some-dataset:train")
    assert time.monotonic() - start < 5


# ----------------------------------------------------------------------------------------------------
# Malformed rows and the report
# ----------------------------------------------------------------------------------------------------
def test_malformed_rows_are_counted_by_reason(tmp_path):
    path = _write_jsonl(tmp_path / "bad.jsonl", [
        _row(),
        "{not json",
        "[1, 2]",
        {"answer": "3"},
        _row(content="   "),
        {"prompt": 5, "answer": "1"},
        {"prompt": [{"role": "robot", "content": "hi"}], "answer": "1"},
        {"prompt": [{"role": "system", "content": "sys"}], "answer": "1"},
        {"prompt": "hi"},
        _row(answer=""),
        _row(answer=True),
        _row(answer=float("nan")),
        _row(answer=[]),
        _row(answer=[["1"]]),
        _row(answer=[1, 2.0, "x"]),
    ])
    rows, report = data.load_rows(str(path))
    assert report.malformed == {"bad_json": 1, "not_a_mapping": 1, "no_prompt": 1, "empty_content": 1,
                                "bad_messages": 2, "no_user_message": 1, "no_ground_truth": 1,
                                "empty_ground_truth": 2, "bad_ground_truth": 3}
    assert (report.total, report.kept) == (15, 2) and report.total == report.kept + report.dropped
    assert rows[1]["ground_truth"] == ["1", "2", "x"]
    assert "kept 2/15 rows" in report.summary() and "bad_json=1" in report.summary()
    report.check(max_bad_fraction=0.9)
    with pytest.raises(data.DataError, match=r"86.7% of rows dropped, more than max_bad_fraction=0.5"):
        report.check(max_bad_fraction=0.5)


def test_report_check_and_chaining():
    with pytest.raises(data.DataError, match="no usable rows"):
        data.DataReport("empty").check(1.0)
    loaded = data.DataReport("x", total=10, kept=8, malformed={"no_prompt": 2})
    rendered = data.DataReport("x", total=8, kept=6, too_long=1, malformed={"no_prompt": 1})
    both = loaded.then(rendered)
    assert (both.total, both.kept, both.too_long, both.malformed) == (10, 6, 1, {"no_prompt": 3})
    both.check(0.4)
    with pytest.raises(data.DataError, match="40.0% of rows dropped"):
        both.check(0.3)


def test_a_jsonl_line_that_is_not_utf8_is_counted_like_bad_json(tmp_path):
    path = tmp_path / "mixed.jsonl"
    good = json.dumps(_row()).encode()
    path.write_bytes(good + b"\n" + b'{"prompt": "caf\xe9", "answer": "1"}\n' + b"{oops\n" + good + b"\n")
    rows, report = data.load_rows(str(path))
    assert (report.total, report.kept, report.malformed) == (4, 2, {"not_utf8": 1, "bad_json": 1})
    (tmp_path / "list.json").write_bytes(b'[{"prompt": "caf\xe9", "answer": "1"}]')
    with pytest.raises(data.DataError, match=r"list.json: not UTF-8 text \(byte 16: b'\\xe9'\)") as err:
        data.load_rows(str(tmp_path / "list.json"))
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("damage", ["empty", "truncated", "not_parquet"])
def test_a_broken_parquet_file_is_one_line_naming_it(tmp_path, damage):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "train.parquet"
    pq.write_table(pa.Table.from_pylist([{"problem": "1+1?", "answer": "2"}] * 50), path)
    whole = path.read_bytes()
    path.write_bytes({"empty": b"", "truncated": whole[: len(whole) // 2], "not_parquet": b"a,b\n1,2\n"}[damage])
    with pytest.raises(data.DataError, match=f"{path}: not a readable parquet file") as err:
        data.load_rows(str(path))
    assert "\n" not in str(err.value)
    with pytest.raises(data.DataError, match="train.parquet: not a readable parquet file"):
        data.load_rows(str(tmp_path))  # the same through a directory spec


def test_reports_name_the_limit_and_the_accepted_fields(tmp_path, tokenizer):
    rows = [data.normalise_row({"prompt": "x" * n, "answer": "1"}) for n in (5, 500)]
    _, report = data.render_prompts(rows, tokenizer, max_prompt_tokens=100)
    assert "dropped 1 too long (over 100 prompt tokens; raise data.max_prompt_tokens to keep them)" in report.summary()
    _, report = data.render_prompts(rows, tokenizer, max_prompt_tokens=100, limit_key="--max-prompt-tokens")
    assert "raise --max-prompt-tokens" in report.summary()
    path = _write_jsonl(tmp_path / "wrong_columns.jsonl", [{"query": "1+1?", "label": "2"}] * 3)
    _, report = data.load_rows(str(path))
    with pytest.raises(data.DataError) as err:
        report.check(1.0)
    message = str(err.value)
    assert "no usable rows" in message and "the rows have: query, label" in message and "\n" not in message
    for field in (*data.sources.PROMPT_FIELDS, *data.sources.ANSWER_FIELDS, "reward_model.ground_truth"):
        assert field in message


@pytest.mark.parametrize("value, expected", [
    (2025, "2025"), (np.int64(7), "7"), (142.0, "142"), (np.float64(-3.0), "-3"), (0.5, "0.5"),
    (1e-5, "1e-05"), ("\\frac{1}{2}", "\\frac{1}{2}"), (np.array(["a", "b"], dtype=object), ["a", "b"]),
    ((1, "2"), ["1", "2"]),
])
def test_normalise_ground_truth(value, expected):
    assert data.normalise_ground_truth(value) == expected


# ----------------------------------------------------------------------------------------------------
# Prompt rendering
# ----------------------------------------------------------------------------------------------------
def test_render_chat_template_and_raw_text(tokenizer):
    turns = [("system", "S"), ("user", "Q1"), ("assistant", "A"), ("user", "Q2")]
    messages = [{"role": role, "content": content} for role, content in turns]
    rows = [data.normalise_row({"messages": messages, "answer": "1"})]
    kept, report = data.render_prompts(rows, tokenizer, max_prompt_tokens=100)
    expected = ("<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nQ1<|im_end|>\n<|im_start|>assistant\nA"
                "<|im_end|>\n<|im_start|>user\nQ2<|im_end|>\n<|im_start|>assistant\n")
    assert kept[0]["prompt_text"] == expected and report.kept == 1
    assert tokenizer.decode(kept[0]["prompt_ids"]) == expected
    assert rows[0].keys() <= kept[0].keys() and "prompt_ids" not in rows[0]  # inputs untouched
    raw, _ = data.render_prompts(rows, tokenizer, max_prompt_tokens=100, chat_template=False)
    assert raw[0]["prompt_text"] == "Q1\n\nQ2" and list(raw[0]["prompt_ids"]) == tokenizer.encode("Q1\n\nQ2")


def test_render_limits_and_errors(tokenizer):
    rows = [data.normalise_row({"prompt": "x" * n, "answer": "1"}) for n in (5, 50, 500)]
    text = tokenizer.apply_chat_template(rows[1]["messages"], add_generation_prompt=True, tokenize=False)
    short = len(tokenizer(text, add_special_tokens=False)["input_ids"])
    kept, report = data.render_prompts(rows, tokenizer, max_prompt_tokens=short)
    assert [len(r["prompt_ids"]) for r in kept] == [short - 45, short] and report.too_long == 1
    with pytest.raises(ValueError, match="max_prompt_tokens must be positive"):
        data.render_prompts(rows, tokenizer, max_prompt_tokens=0)
    no_template = char_tokenizer()
    no_template.chat_template = None
    with pytest.raises(data.DataError, match="no chat template"):
        data.render_prompts(rows, no_template, max_prompt_tokens=10)


# ----------------------------------------------------------------------------------------------------
# Shuffled stream
# ----------------------------------------------------------------------------------------------------
def _ids(batch):
    return [r["i"] for r in batch]


ROWS = [{"i": i} for i in range(10)]


def test_stream_order_depends_on_seed_and_epoch_only():
    a, b = data.PromptStream(ROWS, seed=1), data.PromptStream(ROWS, seed=1)
    assert np.array_equal(a.order(0), b.order(0))
    assert np.array_equal(a.order(3), data.PromptStream(ROWS, seed=1).order(3))
    assert not np.array_equal(a.order(0), a.order(1))
    assert not np.array_equal(a.order(0), data.PromptStream(ROWS, seed=2).order(0))
    assert sorted(a.order(5)) == list(range(10))


def test_stream_drop_last_never_straddles_an_epoch():
    stream = data.PromptStream(ROWS, seed=0)
    batches = [_ids(stream.next_batch(4)) for _ in range(4)]
    assert batches[0] + batches[1] == list(stream.order(0)[:8])
    assert batches[2] + batches[3] == list(stream.order(1)[:8])  # rows 8, 9 of epoch 0 are skipped
    assert stream.state_dict() == {"epoch": 1, "index": 8}


def test_stream_resumes_exactly():
    stream = data.PromptStream(ROWS, seed=5)
    for _ in range(3):
        stream.next_batch(3)
    state = json.loads(json.dumps(stream.state_dict()))  # plain ints survive any checkpoint format
    expected = [_ids(stream.next_batch(3)) for _ in range(5)]
    resumed = data.PromptStream(ROWS, seed=5)
    resumed.load_state_dict(state)
    assert [_ids(resumed.next_batch(3)) for _ in range(5)] == expected
    with pytest.raises(ValueError, match="outside a dataset of 10 rows"):
        resumed.load_state_dict({"epoch": 0, "index": 11})


def test_stream_process_slices_partition_the_global_batch():
    single = data.PromptStream(ROWS, seed=3)
    shards = [data.PromptStream(ROWS, seed=3, process_index=p, process_count=2) for p in range(2)]
    for _ in range(6):  # crosses epochs
        global_batch = _ids(single.next_batch(4))
        slices = [_ids(s.next_batch(4)) for s in shards]
        assert slices[0] + slices[1] == global_batch and all(len(s) == 2 for s in slices)
    assert all(s.state_dict() == single.state_dict() for s in shards)


def test_stream_errors():
    with pytest.raises(ValueError, match="not a positive multiple of process_count=3"):
        data.PromptStream(ROWS, seed=0, process_index=0, process_count=3).next_batch(4)
    with pytest.raises(data.DataError, match="larger than the dataset"):
        data.PromptStream(ROWS, seed=0).next_batch(11)
    with pytest.raises(ValueError, match="process_index 2"):
        data.PromptStream(ROWS, seed=0, process_index=2, process_count=2)
    with pytest.raises(data.DataError, match="at least one row"):
        data.PromptStream([], seed=0)


# ----------------------------------------------------------------------------------------------------
# Batching
# ----------------------------------------------------------------------------------------------------
def test_batch_prompts_left_pads_to_a_bucket():
    ids, mask = data.batch_prompts([[5, 6, 7], [8], np.array([9, 10], np.int32)], pad_id=0)
    assert ids.shape == mask.shape == (3, 16) and ids.dtype == mask.dtype == np.int32
    assert ids[0, -3:].tolist() == [5, 6, 7] and ids[1, -1] == 8 and ids[2, -2:].tolist() == [9, 10]
    assert mask.sum(axis=1).tolist() == [3, 1, 2] and (ids[mask == 0] == 0).all()
    assert mask[:, -1].all()  # every prompt ends at the right edge
    assert mask[0].tolist() == [0] * 13 + [1] * 3


def test_bucket_lengths():
    assert [data.bucket_length(n) for n in (0, 1, 16, 17, 32, 33, 1000)] == [16, 16, 16, 32, 32, 64, 1024]
    assert data.batch_prompts([[1] * 20], pad_id=0, buckets=(8, 24, 64))[0].shape == (1, 24)
    with pytest.raises(data.DataError, match="longer than the largest bucket 8"):
        data.batch_prompts([[1] * 9], pad_id=0, buckets=(4, 8))
    with pytest.raises(data.DataError, match="at least one prompt"):
        data.batch_prompts([], pad_id=0)
