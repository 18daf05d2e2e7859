"""UQABench's own Arrow files (the benchmark's `datas/` folder, as its `uqa_bench/dataset.py` reads them), one row per user.

    pretrain_data_{train,eval}.arrow   uni_seq_{item,cate,brand,shop,seller}_id        one id per interaction
                                       uni_seq_{title,cate,shop,brand,seller}_bpe_token_ids   token ids per interaction
    align_data_{train,eval}.arrow      the same columns + `text`: a JSON chat
                                       [{"role": "user", "content": Q}, {"role": "assistant", "content": A}]

Files are Arrow IPC (the benchmark opens them with `pyarrow.ipc.open_file`); the stream format
(Hugging Face datasets' `.arrow`) is read too. `data.path` is one file or a folder: a folder
means every `*.arrow` / `*.ipc` / `*.feather` file in it except those whose name starts with
`align` (an align file repeats a user's sequence once per question; read one by naming it).

Events: each interaction of a row is one event with the fields `item`, `cate`, `brand`, `shop`,
`seller` (categorical; the ids as strings) and `title` (text: the title's token ids joined by
spaces, so `datamodules.item_features.text_table` reads them as words: the item's text bag).
The other four `*_bpe_token_ids` columns are not read (the side ids carry the same values).
An id column may hold one id per interaction (List[int]) or, as the benchmark's own loader
reads it (`i[0]`), a one-element list per interaction (List[List[int]]); an empty inner list
is a missing value.

There is no user column: a user is a row, named `<file stem>:<row>` with the 1-based row of
its file (`pretrain_data_train:17`), the same name `read_align_questions` gives an align row.
There is no timestamp either: the order in the lists is time order, so the k-th of n
interactions (0-based) gets the synthetic time END - (n - 1 - k) days: one day per position,
every user's last interaction on END. Only the order and the distance from the end mean
anything; calendar features (weekday, hour) read from it mean nothing.

Bad input, each a one-line DataError naming file, column and row: a file that is not Arrow
IPC; a needed column absent; a column of the wrong type; a null list; a row whose lists differ
in length (one entry per interaction in each); an id cell with more than one id. A row with no
interaction (empty lists) is skipped and counted (`data/empty_histories`).
"""

from __future__ import annotations

import datetime as dt
import json
import re
from pathlib import Path

import polars as pl

from datamodules.config import DataConfig
from datamodules.schema import EventSchema, FieldSpec
from datamodules.sources.base import DataError, Source, SourceData, UserRange, first_row, require_columns

ID_FIELDS = ("item", "cate", "brand", "shop", "seller")
TOKEN_FIELDS = ("title", "cate", "shop", "brand", "seller")  # the layout's order of the *_bpe_token_ids columns


def id_column(name: str) -> str:
    return f"uni_seq_{name}_id"


def token_column(name: str) -> str:
    return f"uni_seq_{name}_bpe_token_ids"


LENGTH = id_column("item")  # the column whose list length is the row's number of interactions
TITLE = token_column("title")
TEXT = "text"  # align files: the JSON chat
READ = (*(id_column(f) for f in ID_FIELDS), TITLE)  # the columns the source needs
LAYOUT = (*(id_column(f) for f in ID_FIELDS), *(token_column(f) for f in TOKEN_FIELDS))  # every sequence column of the layout
SUFFIXES = (".arrow", ".ipc", ".feather")
ALIGN_PREFIX = "align"
END = dt.datetime(2024, 1, 1)  # every user's last interaction (synthetic time, see the module docstring)
CANDIDATES = re.compile(r"^\s*Candidates:\s*(.*?)\s*$", re.M)  # a question's candidate line (the generator's format)
CANDIDATE_SEPARATOR = " | "

SCHEMA = EventSchema(
    user="user_id",
    time="position",
    fields=[*(FieldSpec(f, "categorical", column=id_column(f)) for f in ID_FIELDS), FieldSpec("title", "text", column=TITLE)],
)


def user_name(path: Path) -> pl.Expr:
    """`<file stem>:<row>` from the 1-based `_row`."""
    return pl.concat_str([pl.lit(f"{path.stem}:"), pl.col("_row").cast(pl.String)])


def arrow_schema(path: Path) -> tuple[pl.Schema, str]:
    """The file's columns and types, and whether it is an IPC `file` or `stream`; neither: a DataError naming the file."""
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    try:
        return pl.Schema(pl.read_ipc_schema(path)), "file"
    except (pl.exceptions.ComputeError, OSError):
        pass
    try:
        return pl.read_ipc_stream(path, n_rows=0).collect_schema(), "stream"
    except (pl.exceptions.ComputeError, OSError) as err:
        raise DataError(f"{path}: cannot read as Arrow IPC (file or stream): {str(err).splitlines()[0]}") from None


def read_columns(path: Path, needed: dict[str, str], only: UserRange | None = None) -> pl.DataFrame:
    """The `needed` columns (column -> what it is for) of one Arrow file, with a 1-based `_row` and `user_id`; a missing
    column is an error. `only`: the rows of those users, kept while scanning (an IPC file; a stream is read whole first)."""
    schema, kind = arrow_schema(path)
    require_columns(path, list(schema.names()), needed)
    columns = list(needed)
    try:
        frame = pl.scan_ipc(path).select(columns) if kind == "file" else pl.read_ipc_stream(path, columns=columns).lazy()
        frame = frame.with_row_index("_row", offset=1).with_columns(user_name(path).alias("user_id"))
        if only is not None:
            frame = frame.filter(only.keeps("user_id"))
        return frame.collect()
    except (pl.exceptions.ComputeError, OSError) as err:
        raise DataError(f"{path}: cannot read as Arrow IPC: {str(err).splitlines()[0]}") from None


def _is_int_list(dtype: pl.DataType, depth: int) -> bool:
    for _ in range(depth):
        if not isinstance(dtype, pl.List):
            return False
        dtype = dtype.inner
    return dtype.is_integer()


def check_types(path: Path, frame: pl.DataFrame) -> None:
    """Id columns: List[int] or List[List[int]]; token columns: List[List[int]]."""
    for column in frame.columns:
        if column in ("_row", "user_id"):
            continue
        dtype = frame.schema[column]
        ok = _is_int_list(dtype, 2) if column.endswith("_bpe_token_ids") else _is_int_list(dtype, 1) or _is_int_list(dtype, 2)
        if not ok:
            want = "a list of token-id lists" if column.endswith("_bpe_token_ids") else "a list of ids (or of one-id lists)"
            raise DataError(f"{path}: column {column!r} has dtype {dtype}; expected {want} per user")


def check_rows(path: Path, frame: pl.DataFrame, columns: tuple[str, ...]) -> None:
    """No null list; every list of a row as long as its `LENGTH` list; at most one id per interaction in a nested id column."""
    lazy = frame.lazy()
    for column in columns:
        row = first_row(lazy, pl.col(column).is_null())
        if row is not None:
            raise DataError(f"{path}: column {column!r}, row {row}: null instead of a list (one entry per interaction)")
    n = pl.col(LENGTH).list.len()
    for column in columns:
        if column == LENGTH:
            continue
        row = first_row(lazy, pl.col(column).list.len() != n)
        if row is not None:
            got, want = frame.filter(pl.col("_row") == row).select(pl.col(column).list.len(), n).row(0)
            raise DataError(
                f"{path}: column {column!r}, row {row}: {got} entries where {LENGTH!r} has {want} (a row's lists hold one entry per interaction)"
            )
    for column in columns:
        if column.endswith("_id") and _is_int_list(frame.schema[column], 2):
            row = first_row(lazy, pl.col(column).list.eval(pl.element().list.len()).list.max() > 1)
            if row is not None:
                cell = frame.filter(pl.col("_row") == row)[column].to_list()[0]
                at = next(i for i, ids in enumerate(cell) if ids is not None and len(ids) > 1)
                raise DataError(f"{path}: column {column!r}, row {row}: interaction {at} has {len(cell[at])} ids {cell[at]}; expected one")


def read_events(path: Path, only: UserRange | None = None) -> tuple[pl.LazyFrame, int]:
    """One file -> the normalised event frame (see sources/base.py) and its number of empty histories (skipped)."""
    frame = read_columns(path, {c: "UQABench layout" for c in READ}, only)
    check_types(path, frame)
    check_rows(path, frame, READ)
    empty = int((frame[LENGTH].list.len() == 0).sum())
    frame = frame.filter(pl.col(LENGTH).list.len() > 0)
    n = pl.col(LENGTH).list.len()
    flat = {
        id_column(f): pl.col(id_column(f)).list.eval(pl.element().list.first()) if _is_int_list(frame.schema[id_column(f)], 2) else pl.col(id_column(f))
        for f in ID_FIELDS
    }
    events = (
        frame.lazy()
        .with_columns(pl.int_ranges(n - 1, -1, -1, dtype=pl.Int64).alias("_before_end"), *(e.alias(c) for c, e in flat.items()))
        .explode(["_before_end", *READ])
        .select(
            pl.col("_row"),
            pl.lit(str(path)).alias("_file"),
            pl.col("user_id"),
            (pl.lit(END) - pl.duration(days=pl.col("_before_end"))).cast(pl.Datetime("us")).alias("time"),
            *(pl.col(id_column(f)).cast(pl.String).alias(f) for f in ID_FIELDS),
            pl.col(TITLE).cast(pl.List(pl.String)).list.join(" ").alias("title"),
        )
    )
    return events, empty


def files(path: str | Path | None) -> list[Path]:
    """data.path's event files: the file itself, or a folder's Arrow files (sorted) without the align files. No parsing."""
    if not path:
        raise DataError("data.path: the uqabench source needs an Arrow file or a folder of them")
    path = Path(path).expanduser()
    if not path.is_dir():
        return [path]  # missing: "file not found" from the caller
    found = sorted(f for f in path.iterdir() if f.suffix.lower() in SUFFIXES and not f.name.startswith(ALIGN_PREFIX) and f.is_file())
    if not found:
        raise DataError(f"{path}: no Arrow files ({', '.join(SUFFIXES)}) other than align files; name an align file itself to read it")
    return found


def load(path: str | Path | None, only: UserRange | None = None) -> SourceData:
    paths = files(path)
    frames, empty = [], 0
    for f in paths:
        events, skipped = read_events(f, only)
        frames.append(events)
        empty += skipped
    counts = {"empty_histories": empty} if empty else {}
    return SourceData("uqabench", pl.concat(frames, how="vertical"), SCHEMA, None, paths, counts, column_types={"user": "row", "time": "position"})


def users(path: str | Path | None) -> pl.Series:
    """`<stem>:<row>` of every row with at least one interaction, from the item column's lengths alone."""
    parts = []
    for f in files(path):
        frame = read_columns(f, {LENGTH: "UQABench layout"})
        parts.append(frame.filter(pl.col(LENGTH).list.len().fill_null(0) > 0)["user_id"])
    return pl.concat(parts).unique()


SOURCE = Source(files=lambda cfg: files(cfg.path), load=lambda cfg, only=None: load(cfg.path, only), users=lambda cfg: users(cfg.path))


def read_align_questions(path: str | Path) -> pl.DataFrame:
    """An align file's question and answer per row: user_id (`<stem>:<row>`, as the source names the row's user), question,
    answer, candidates (the question's `Candidates: a | b | c` line split, empty without one), `_row`, `_file`.

    The chat may open with a system message; then one user message (the question) and one assistant
    message (the answer). Errors, one line naming file, column `text` and row: a null or non-string
    text, malformed JSON, another chat shape, an answer missing from the question's candidates.
    """
    path = Path(path).expanduser()
    frame = read_columns(path, {TEXT: "align file: the JSON chat of question and answer"})
    if frame.schema[TEXT] != pl.String:
        raise DataError(f"{path}: column {TEXT!r} has dtype {frame.schema[TEXT]}; expected a JSON string per row")
    rows = []
    for row, user, text in zip(frame["_row"].to_list(), frame["user_id"].to_list(), frame[TEXT].to_list()):
        where = f"{path}: column {TEXT!r}, row {row}"
        if text is None:
            raise DataError(f"{where}: null instead of a JSON chat")
        try:
            chat = json.loads(text)
        except json.JSONDecodeError as err:
            raise DataError(f"{where}: malformed JSON ({err.msg} at character {err.pos})") from None
        question, answer = _question_and_answer(chat, where)
        found = CANDIDATES.search(question)
        candidates = [c.strip() for c in found.group(1).split(CANDIDATE_SEPARATOR.strip())] if found else []
        if found and answer.strip() not in candidates:
            raise DataError(f"{where}: the answer {answer!r} is not among the question's candidates {candidates}")
        rows.append((user, question, answer, candidates, row))
    schema = {"user_id": pl.String, "question": pl.String, "answer": pl.String, "candidates": pl.List(pl.String), "_row": pl.Int64}
    return pl.DataFrame(rows, schema=schema, orient="row").with_columns(pl.lit(str(path)).alias("_file"))


def _question_and_answer(chat: object, where: str) -> tuple[str, str]:
    """[system?], user, assistant -> (question, answer); any other shape: a DataError at `where`."""
    shape = 'expected [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]'
    if not isinstance(chat, list) or not all(isinstance(m, dict) for m in chat):
        raise DataError(f"{where}: {shape}, got {type(chat).__name__}")
    if chat and chat[0].get("role") == "system":
        chat = chat[1:]
    roles = [m.get("role") for m in chat]
    if roles != ["user", "assistant"]:
        raise DataError(f"{where}: {shape}, got roles {roles}")
    contents = [m.get("content") for m in chat]
    if not all(isinstance(c, str) for c in contents):
        raise DataError(f"{where}: {shape}, got a content that is not a string")
    return contents[0], contents[1]
