"""UQABench's Arrow layout: the generator, the `uqabench` source, the align-file reader and their bad-input rules."""

from __future__ import annotations

import datetime as dt
import json
import shutil
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pytest

from datamodules.sources import uqabench
from datamodules.sources.base import DataError, UserRange
from datamodules.synthetic import generate_uqabench, main, write_arrow

USERS = 60
FILES = ("pretrain_data_train", "pretrain_data_eval", "align_data_train", "align_data_eval")


@pytest.fixture(scope="module")
def layout(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("uqabench")
    generate_uqabench(out, users=USERS, seed=3, items=500)
    return out


def arrow_table(path: Path) -> pa.Table:
    """The file as the benchmark's own loader opens it (pyarrow.ipc.open_file)."""
    with pa.memory_map(str(path), "r") as source:
        return pa.ipc.open_file(source).read_all()


def damaged(layout: Path, tmp_path: Path, change) -> Path:
    """A copy of pretrain_data_train.arrow with `change(frame) -> frame` applied, alone in a folder."""
    folder = tmp_path / "data"
    folder.mkdir()
    frame = pl.read_ipc(layout / "pretrain_data_train.arrow")
    write_arrow(change(frame), folder / "pretrain_data_train.arrow")
    return folder


def set_cell(frame: pl.DataFrame, column: str, row: int, value) -> pl.DataFrame:
    """`frame` with one cell (1-based row) replaced."""
    values = frame[column].to_list()
    values[row - 1] = value
    return frame.with_columns(pl.Series(column, values, dtype=frame.schema[column]))


def one_line_error(fn, *parts: str) -> str:
    with pytest.raises(DataError) as err:
        fn()
    message = str(err.value)
    assert "\n" not in message, message
    for part in parts:
        assert part in message, (part, message)
    return message


# The generator


def test_generator_writes_the_layout_deterministically(layout, tmp_path):
    assert sorted(p.stem for p in layout.iterdir()) == sorted(FILES)
    again = tmp_path / "again"
    main(["uqabench", "--users", str(USERS), "--seed", "3", "--items", "500", "--out", str(again)])
    for name in FILES:
        assert (layout / f"{name}.arrow").read_bytes() == (again / f"{name}.arrow").read_bytes(), name
    other = tmp_path / "other"
    generate_uqabench(other, users=USERS, seed=4, items=500)
    assert (other / "pretrain_data_train.arrow").read_bytes() != (layout / "pretrain_data_train.arrow").read_bytes()


def test_generated_files_have_the_benchmarks_columns_and_types(layout):
    nested = pa.list_(pa.list_(pa.int64()))
    pretrain = [arrow_table(layout / f"pretrain_data_{s}.arrow") for s in ("train", "eval")]
    assert sum(t.num_rows for t in pretrain) == USERS
    for table in pretrain:
        assert table.column_names == list(uqabench.LAYOUT)
        assert all(table.schema.field(c).type == nested for c in uqabench.LAYOUT)
        rows = table.to_pylist()
        for row in rows:
            assert len({len(row[c]) for c in uqabench.LAYOUT}) == 1 and len(row[uqabench.LENGTH]) >= 8
            assert all(len(ids) == 1 for c in uqabench.LAYOUT if c.endswith("_id") for ids in row[c])  # the loader's i[0]
    align = arrow_table(layout / "align_data_train.arrow")
    assert align.column_names == [*uqabench.LAYOUT, "text"] and align.schema.field("text").type == pa.string()
    assert align.num_rows == 2 * pretrain[0].num_rows  # two questions per user
    chat = json.loads(align["text"][0].as_py())
    assert [m["role"] for m in chat] == ["user", "assistant"]
    assert align[uqabench.LENGTH][0].as_py() == pretrain[0][uqabench.LENGTH][0].as_py()  # the user's own sequence


def test_flat_ids_option_writes_bare_ids(tmp_path):
    generate_uqabench(tmp_path, users=5, seed=0, items=100, flat_ids=True)
    table = arrow_table(tmp_path / "pretrain_data_train.arrow")
    assert table.schema.field("uni_seq_item_id").type == pa.list_(pa.int64())
    assert table.schema.field(uqabench.TITLE).type == pa.list_(pa.list_(pa.int64()))


# The source


def test_events_follow_the_lists_in_order(layout):
    data = uqabench.load(layout)
    assert [p.name for p in data.files] == ["pretrain_data_eval.arrow", "pretrain_data_train.arrow"]  # align files left out
    events = data.events.collect()
    table = arrow_table(layout / "pretrain_data_train.arrow").to_pylist()
    lengths = [len(r[uqabench.LENGTH]) for split in ("train", "eval") for r in arrow_table(layout / f"pretrain_data_{split}.arrow").to_pylist()]
    assert events.height == sum(lengths)
    for row in (1, 7, len(table)):
        user = events.filter(pl.col("user_id") == f"pretrain_data_train:{row}")
        raw = table[row - 1]
        n = len(raw[uqabench.LENGTH])
        assert user.height == n and (user["_row"] == row).all()
        for f in uqabench.ID_FIELDS:
            assert user[f].to_list() == [str(ids[0]) for ids in raw[uqabench.id_column(f)]], f
        assert user["title"].to_list() == [" ".join(map(str, t)) for t in raw[uqabench.TITLE]]
        times = user["time"].to_list()
        assert times[-1] == uqabench.END and all(b - a == dt.timedelta(days=1) for a, b in zip(times, times[1:]))
    assert set(events.columns) == {"_row", "_file", "user_id", "time", *uqabench.ID_FIELDS, "title"}
    assert data.counts == {}


def test_users_are_listed_without_events_and_match_them(layout):
    users = uqabench.users(layout)
    events = uqabench.load(layout).events.collect()
    assert sorted(users.to_list()) == sorted(events["user_id"].unique().to_list()) and users.len() == USERS


def test_a_user_range_is_applied_while_reading(layout):
    everyone = sorted(uqabench.users(layout).to_list())
    only = UserRange(everyone[5], everyone[14])
    events = uqabench.load(layout, only).events.collect()
    assert sorted(events["user_id"].unique().to_list()) == everyone[5:15]


def test_flat_and_nested_ids_read_the_same(tmp_path):
    generate_uqabench(tmp_path / "nested", users=20, seed=1, items=200)
    generate_uqabench(tmp_path / "flat", users=20, seed=1, items=200, flat_ids=True)
    nested, flat = (uqabench.load(tmp_path / k).events.collect().drop("_file") for k in ("nested", "flat"))
    assert nested.equals(flat)


def test_an_arrow_stream_and_a_single_file_are_read(layout, tmp_path):
    table = arrow_table(layout / "pretrain_data_eval.arrow")
    stream = tmp_path / "pretrain_data_eval.arrow"
    with pa.OSFile(str(stream), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    a = uqabench.load(stream).events.collect().drop("_file")
    b = uqabench.load(layout / "pretrain_data_eval.arrow").events.collect().drop("_file")
    assert a.equals(b)


def empty_row(row: int):
    def change(frame: pl.DataFrame) -> pl.DataFrame:
        for column in uqabench.LAYOUT:
            frame = set_cell(frame, column, row, [])
        return frame

    return change


def test_an_empty_history_is_skipped_and_counted(layout, tmp_path):
    folder = damaged(layout, tmp_path, empty_row(3))
    data = uqabench.load(folder)
    events = data.events.collect()
    assert data.counts == {"empty_histories": 1}
    assert "pretrain_data_train:3" not in events["user_id"].to_list() and "pretrain_data_train:4" in events["user_id"].to_list()
    assert "pretrain_data_train:3" not in uqabench.users(folder).to_list()


def test_an_empty_history_count_reaches_the_run_metrics(layout, tmp_path):
    from datamodules.config import DataConfig
    from datamodules.preprocess import prepare
    from experiments.config import compose, to_dataclass

    folder = damaged(layout, tmp_path, empty_row(2))
    cfg = compose(["experiment=uqa_trm_uqabench", f"data.path={folder}", f"data.cache_dir={tmp_path / 'cache'}"])
    prepared = prepare(to_dataclass(cfg.data, DataConfig), cfg.seed)
    assert prepared.meta["counts"]["empty_histories"] == 1


def test_missing_column_names_file_and_column(layout, tmp_path):
    folder = damaged(layout, tmp_path, lambda f: f.drop("uni_seq_brand_id"))
    one_line_error(lambda: uqabench.load(folder), "pretrain_data_train.arrow", "'uni_seq_brand_id'", "not found")


def test_unequal_lists_in_a_row_name_file_column_and_row(layout, tmp_path):
    folder = damaged(layout, tmp_path, lambda f: set_cell(f, "uni_seq_shop_id", 4, f["uni_seq_shop_id"][3].to_list()[:-1]))
    message = one_line_error(lambda: uqabench.load(folder), "pretrain_data_train.arrow", "'uni_seq_shop_id'", "row 4")
    assert "'uni_seq_item_id' has" in message


def test_unequal_title_tokens_name_file_column_and_row(layout, tmp_path):
    folder = damaged(layout, tmp_path, lambda f: set_cell(f, uqabench.TITLE, 2, f[uqabench.TITLE][1].to_list() + [[1, 2]]))
    one_line_error(lambda: uqabench.load(folder), "pretrain_data_train.arrow", f"{uqabench.TITLE!r}", "row 2")


def test_a_null_list_names_file_column_and_row(layout, tmp_path):
    folder = damaged(layout, tmp_path, lambda f: set_cell(f, "uni_seq_cate_id", 5, None))
    one_line_error(lambda: uqabench.load(folder), "pretrain_data_train.arrow", "'uni_seq_cate_id'", "row 5", "null")


def test_two_ids_for_one_interaction_name_file_column_and_row(layout, tmp_path):
    def two_ids(frame: pl.DataFrame) -> pl.DataFrame:
        cell = frame["uni_seq_seller_id"][5].to_list()
        cell[1] = [cell[1][0], 7]
        return set_cell(frame, "uni_seq_seller_id", 6, cell)

    folder = damaged(layout, tmp_path, two_ids)
    one_line_error(lambda: uqabench.load(folder), "pretrain_data_train.arrow", "'uni_seq_seller_id'", "row 6", "interaction 1")


def test_a_column_of_another_type_is_an_error(layout, tmp_path):
    folder = damaged(layout, tmp_path, lambda f: f.with_columns(pl.col("uni_seq_item_id").list.len().alias("uni_seq_item_id")))
    one_line_error(lambda: uqabench.load(folder), "pretrain_data_train.arrow", "'uni_seq_item_id'", "dtype")


def test_a_file_that_is_not_arrow_and_an_empty_folder(tmp_path):
    bad = tmp_path / "pretrain_data_train.arrow"
    bad.write_text("user,item\n1,2\n")
    one_line_error(lambda: uqabench.load(bad), "pretrain_data_train.arrow", "Arrow IPC")
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "align_data_train.arrow").write_bytes(b"")
    one_line_error(lambda: uqabench.files(empty), "no Arrow files")


# Align files


def test_align_questions_are_read_per_row(layout):
    questions = uqabench.read_align_questions(layout / "align_data_train.arrow")
    raw = [json.loads(t) for t in arrow_table(layout / "align_data_train.arrow")["text"].to_pylist()]
    assert questions.height == len(raw)
    assert questions["question"].to_list() == [c[0]["content"] for c in raw]
    assert questions["answer"].to_list() == [c[1]["content"] for c in raw]
    assert questions["user_id"][0] == "align_data_train:1" and questions["_row"].to_list() == list(range(1, len(raw) + 1))
    assert all(len(c) == 4 and a in c for c, a in zip(questions["candidates"].to_list(), questions["answer"].to_list()))
    events = uqabench.load(layout / "align_data_train.arrow").events.collect()  # an align file named alone: its rows' sequences
    assert set(questions["user_id"]) == set(events["user_id"])


def align_with(layout: Path, tmp_path: Path, row: int, text: str | None) -> Path:
    frame = pl.read_ipc(layout / "align_data_eval.arrow")
    path = tmp_path / "align_data_eval.arrow"
    write_arrow(set_cell(frame, "text", row, text), path)
    return path


def test_malformed_json_names_file_column_and_row(layout, tmp_path):
    path = align_with(layout, tmp_path, 3, '[{"role": "user", "content": "Q"}, {"role": "assistant"')
    one_line_error(lambda: uqabench.read_align_questions(path), "align_data_eval.arrow", "column 'text'", "row 3", "malformed JSON")


def test_a_chat_of_another_shape_names_the_row(layout, tmp_path):
    path = align_with(layout, tmp_path, 2, json.dumps([{"role": "assistant", "content": "A"}, {"role": "user", "content": "Q"}]))
    one_line_error(lambda: uqabench.read_align_questions(path), "column 'text'", "row 2", "roles ['assistant', 'user']")
    path = align_with(layout, tmp_path, 1, None)
    one_line_error(lambda: uqabench.read_align_questions(path), "column 'text'", "row 1", "null")


def test_a_system_message_is_allowed(layout, tmp_path):
    chat = [{"role": "system", "content": "S"}, {"role": "user", "content": "Q?"}, {"role": "assistant", "content": "A"}]
    questions = uqabench.read_align_questions(align_with(layout, tmp_path, 1, json.dumps(chat)))
    assert questions.row(0, named=True) | {"_file": None} == {
        "user_id": "align_data_eval:1", "question": "Q?", "answer": "A", "candidates": [], "_row": 1, "_file": None,
    }  # fmt: skip


def test_an_answer_missing_from_its_candidates_names_the_row(layout, tmp_path):
    chat = [{"role": "user", "content": "Which?\nCandidates: 1 | 2 | 3"}, {"role": "assistant", "content": "4"}]
    path = align_with(layout, tmp_path, 4, json.dumps(chat))
    one_line_error(lambda: uqabench.read_align_questions(path), "align_data_eval.arrow", "column 'text'", "row 4", "'4' is not among")


def test_an_align_file_without_text_is_an_error(layout):
    one_line_error(lambda: uqabench.read_align_questions(layout / "pretrain_data_eval.arrow"), "pretrain_data_eval.arrow", "'text'", "not found")


# Downstream: questions and the item input


@pytest.fixture(scope="module")
def prepared(layout, tmp_path_factory):
    from datamodules.config import DataConfig
    from datamodules.preprocess import prepare
    from experiments.config import compose, to_dataclass

    cfg = compose(["experiment=uqa_trm_uqabench", f"data.path={layout}", f"data.cache_dir={tmp_path_factory.mktemp('cache')}"])
    return prepare(to_dataclass(cfg.data, DataConfig), cfg.seed)


def test_build_questions_reads_items_and_categories(prepared):
    from datamodules.uqa_questions import SUBTASKS, build_questions
    from datamodules.user_history import History

    history = History.of(prepared)
    assert history.roles.item == "item" and history.roles.category == "cate" and history.roles.item_text is None
    questions = build_questions(history)
    assert {q.subtask for q in questions} == set(SUBTASKS)
    assert len(questions) >= 0.9 * len(SUBTASKS) * len(history)
    for q in questions:
        assert q.answer in q.candidates
        if q.subtask == "item_prediction":  # items by id: a value of the item vocabulary
            assert q.answer in prepared.vocabs["item"]
        assert "cate " not in q.question, q.question  # the field's name is not a word: questions say "category"
    assert any("category" in q.question for q in questions if q.subtask == "attribute_prediction")


def test_the_title_tokens_are_each_items_text_bag(prepared):
    from datamodules.item_features import side_table, text_table

    table = text_table(prepared, "item", "title", text_vocab=4096, text_len=16)
    items = np.flatnonzero(side_table(prepared, "item", ["cate"])[:, 0])  # items some training user has
    assert items.size and (table[items] > 0).sum(axis=1).min() >= 3  # at least the category's words
