"""UserQA triples and InstructUE's input format: exact answers on a hand-made 2-user MovieLens folder, every
question type and determinism on real ml100k and the recsys2025 fixture, the two leakage guarantees, delimiters and budgets."""

from __future__ import annotations

import dataclasses
import datetime as dt
import shutil
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from datamodules.config import DataConfig, TargetConfig
from datamodules.preprocess import Prepared, prepare
from datamodules.sources.ml100k import default_dir
from datamodules.user_history import History, tabular_features
from datamodules.user_inputs import INSTRUCTION_PREFIX, NO_EVENTS, USER_TOKEN, InputConfig, UserFormatter, close_tag, delimiters, open_tag
from datamodules.userqa import QUESTIONS, UserQAConfig, UserQADataset, build_userqa, question_kinds, user_triples

MONDAY = dt.datetime(2024, 1, 1, tzinfo=dt.timezone.utc)
ITEMS = [  # id, title, year, genres (the first is the primary genre)
    (1, "Alpha", 1995, "Drama"), (2, "Beta", 1990, "Drama Comedy"), (3, "Gamma", 1980, "Comedy"), (4, "Delta", 1985, "Action"),
    (5, "Epsilon", 1999, "Action Thriller"), (6, "Zeta", 1970, "Horror"), (7, "Eta", 1991, "Drama"), (8, "Theta", 1992, "Comedy"),
    (9, "Iota", 1993, "Comedy"), (10, "Kappa", 1994, "Comedy"),
]  # fmt: skip
# user, item, rating, hours after Monday 2024-01-01 00:00 UTC. User 1: Drama x3, Action x2, Horror; user 2: Comedy x4.
RATINGS = [
    (1, 1, 5, 10), (1, 2, 4, 11), (1, 7, 4, 7 * 24 + 10.5), (1, 4, 3, 7 * 24 + 20), (1, 5, 2, 8 * 24 + 10), (1, 6, 1, 9 * 24 + 10),
    (2, 3, 5, 5 * 24 + 19), (2, 8, 5, 5 * 24 + 20), (2, 9, 5, 12 * 24 + 19), (2, 10, 5, 12 * 24 + 21),
]  # fmt: skip
CUTOFF = "2024-02-01"
AFTER_CUTOFF = [(1, 3, 5, 40 * 24), (2, 1, 1, 41 * 24)]  # the future window: only targets read these
TINY_QA = UserQAConfig(questions_per_user=10, future_events=2, min_past_events=2)


def write_ml100k(folder: Path, ratings: list[tuple], genders: tuple[str, str] = ("M", "F")) -> Path:
    """A MovieLens folder in recbole's layout (the ml100k source reads it as it reads the real one)."""
    folder.mkdir(parents=True, exist_ok=True)
    stamp = [int((MONDAY + dt.timedelta(hours=h)).timestamp()) for *_, h in ratings]
    inter = [f"{u}\t{i}\t{r}\t{t}" for (u, i, r, _), t in zip(ratings, stamp)]
    (folder / "ml-100k.inter").write_text("\n".join(["user_id:token\titem_id:token\trating:float\ttimestamp:float", *inter]) + "\n")
    item = [f"{i}\t{title}\t{year}\t{g}" for i, title, year, g in ITEMS]
    (folder / "ml-100k.item").write_text("\n".join(["item_id:token\tmovie_title:token_seq\trelease_year:token\tclass:token_seq", *item]) + "\n")
    users = [f"{u}\t{30 + u}\t{g}\tother\t00000" for u, g in zip((1, 2), genders)]
    (folder / "ml-100k.user").write_text("\n".join(["user_id:token\tage:token\tgender:token\toccupation:token\tzip_code:token", *users]) + "\n")
    return folder


def ml100k_config(path: Path | None, cache: Path, cutoff: str) -> DataConfig:
    targets = [TargetConfig("gender", "binary", column="gender", positive="F"), TargetConfig("churn", "churn")]
    return DataConfig(source="ml100k", path=str(path) if path else None, cutoff=cutoff, window_days=30, val_fraction=0.0,
                      targets=targets, cache_dir=str(cache))  # fmt: skip


@pytest.fixture
def tiny(tmp_path) -> Prepared:
    return prepare(ml100k_config(write_ml100k(tmp_path / "ml", RATINGS + AFTER_CUTOFF), tmp_path / "cache", CUTOFF))


@pytest.fixture(scope="module")
def ml100k(ml100k_cache) -> Prepared:
    return prepare(ml100k_config(None, ml100k_cache, "1998-03-01"))


@pytest.fixture(scope="module")
def recsys(recsys_dir, tmp_path_factory) -> Prepared:
    cache = tmp_path_factory.mktemp("userqa_cache")
    return prepare(DataConfig(source="recsys2025", path=str(recsys_dir), cutoff_days_before_end=14, window_days=14, cache_dir=str(cache)))


def answers(triples) -> dict[tuple[str, str], tuple[str, int]]:
    return {(t.user_id, t.kind): (t.answer, t.end) for t in triples}


def test_answers_on_a_hand_made_pair_of_users(tiny):
    got = answers(build_userqa(History.of(tiny), TINY_QA))
    assert got[("1", "favourites")] == ("Mostly Drama (50%), then Action (33%) and Horror (17%), of 6 ratings.", 6)
    assert got[("1", "level")] == ("Moderate: 3.2 stars on average over 6 ratings, most often 4 stars.", 6)
    assert got[("1", "rhythm")] == ("Mostly on Mondays, in the morning; active on 4 of 10 days, about 1.5 ratings per active day.", 6)
    assert got[("1", "loyalty")] == ("Fairly loyal: 50% of their ratings are in genres they had met before (3 distinct).", 6)
    # Predictive: the last 2 events play the future; "so far" reads the first 4 only (all 6 average 3.2 stars, not 4).
    assert got[("1", "next_categories")] == ("Next: Action (50%) and Horror (50%) of 2 ratings; so far mostly Drama.", 4)
    assert got[("1", "next_items")] == ("Next they turn to Epsilon and Zeta (the first 2 of their next 2 ratings).", 4)
    assert got[("1", "next_level")] == ("Lower than usual: 1.5 stars on average next, against 4 stars so far.", 4)
    assert got[("2", "level")] == ("Generous: 5 stars on average over 4 ratings, most often 5 stars.", 4)
    assert got[("2", "rhythm")] == ("Mostly on Saturdays, in the evening; active on 2 of 8 days, about 2 ratings per active day.", 4)
    assert got[("2", "loyalty")] == ("Fairly loyal: 75% of their ratings are in genres they had met before (1 distinct).", 4)
    assert got[("2", "next_level")] == ("About the same as usual: 5 stars on average next, against 5 stars so far.", 2)
    summary = got[("1", "summary")][0]
    assert summary.startswith("Mostly Drama (50%)") and "3.2 stars" in summary


def test_tabular_block_and_ratings_source_of_a_hand_made_user(tiny):
    h = History.of(tiny)
    u = UserFormatter(h).user_input(0)
    tab = dict(zip(u.tabular_names, u.tabular))
    assert tab["rating_mean"] == pytest.approx(19 / 6) and tab["log1p_events"] == pytest.approx(np.log1p(6))
    assert tab["log1p_active_days"] == pytest.approx(np.log1p(4)) and tab["weekend_share"] == 0
    assert tab["share_genre_Drama"] == pytest.approx(0.5) and tab["repeat_genre_share"] == pytest.approx(0.5)
    lines = u.sources["ratings"].splitlines()
    assert lines[0] == "timestamp: 2024-01-01 10:00; title: Alpha; genres: Drama; rating: 5"
    assert lines[-1] == "timestamp: 2024-01-10 10:00; title: Zeta; genres: Horror; rating: 1"


def test_every_question_type_and_determinism_on_ml100k(ml100k):
    h = History.of(ml100k)
    assert question_kinds(h) == ["favourites", "level", "rhythm", "loyalty", "next_categories", "next_items", "next_level"]
    first, again = build_userqa(h, UserQAConfig(seed=0)), build_userqa(h, UserQAConfig(seed=0))
    assert first == again
    assert {t.kind for t in first} == {*question_kinds(h), "summary"}
    other = build_userqa(h, UserQAConfig(seed=1))
    assert [t.instruction for t in other] != [t.instruction for t in first]
    for t in first:  # every instruction is one of its type's phrasings; the universal one is empty
        if t.kind == "summary":
            assert t.instruction == "" and t.axis == "universal"
        else:
            words = {"cats": "genres", "events": "ratings", "level": "ratings"}
            assert t.instruction in [p.format(**words) for p in QUESTIONS[t.kind][1]]
        assert t.answer and t.answer == t.template_answer
    per_user = {}
    for t in first:
        per_user.setdefault(t.user_id, []).append(t)
    assert all(len(ts) == 5 for ts in per_user.values())  # 4 questions + the universal one


def test_every_question_type_on_recsys2025(recsys):
    h = History.of(recsys)
    kinds = question_kinds(h)
    assert kinds == ["favourites", "level", "rhythm", "loyalty", "next_categories", "next_level", "next_purchase", "next_activity"]
    triples = build_userqa(h, UserQAConfig(questions_per_user=8))
    assert {t.kind for t in triples} == {*kinds, "summary"}
    assert triples == build_userqa(h, UserQAConfig(questions_per_user=8))


def copy_ml100k(folder: Path) -> Path:
    folder.mkdir(parents=True)
    for ext in ("inter", "item", "user"):
        shutil.copy(default_dir() / f"ml-100k.{ext}", folder / f"ml-100k.{ext}")
    return folder


def test_future_window_and_labels_never_change_a_triple(tmp_path):
    """Leakage (a): events after the probe cutoff and the labels table are changed; targets move, no triple or input does."""
    cutoff = "1998-03-01"
    first = prepare(ml100k_config(copy_ml100k(tmp_path / "a"), tmp_path / "cache", cutoff))
    changed = copy_ml100k(tmp_path / "b")
    limit = int(dt.datetime.fromisoformat(cutoff).replace(tzinfo=dt.timezone.utc).timestamp())
    inter = pl.read_csv(changed / "ml-100k.inter", separator="\t")
    late = pl.col("timestamp:float") >= limit
    inter = inter.with_columns(pl.when(late).then(6 - pl.col("rating:float")).otherwise(pl.col("rating:float")).alias("rating:float"),
                               pl.when(late).then(pl.col("item_id:token") % 1682 + 1).otherwise(pl.col("item_id:token")).alias("item_id:token"))
    inter = inter.filter(~late | (pl.col("user_id:token") % 3 != 0))  # a third of the users lose their future events
    inter.write_csv(changed / "ml-100k.inter", separator="\t")
    users = pl.read_csv(changed / "ml-100k.user", separator="\t")
    users.with_columns(pl.col("gender:token").replace({"M": "F", "F": "M"}), pl.col("age:token") + 7).write_csv(changed / "ml-100k.user", separator="\t")
    second = prepare(ml100k_config(changed, tmp_path / "cache", cutoff))

    assert first.path != second.path  # rebuilt from the changed files
    for a, b in zip(first.targets, second.targets):
        assert not np.array_equal(a.labels, b.labels), a.name  # the labels and the future really differ
    cfg = UserQAConfig(seed=3)
    qa_first, qa_second = build_userqa(History.of(first), cfg), build_userqa(History.of(second), cfg)
    assert qa_first == qa_second
    inputs_first = UserQADataset(qa_first, UserFormatter(History.of(first)))
    inputs_second = UserQADataset(qa_second, UserFormatter(History.of(second)))
    for i in range(0, len(qa_first), 97):
        a, b = inputs_first[i], inputs_second[i]
        assert a.text() == b.text() and np.array_equal(a.tabular, b.tabular)


def with_changed_future(h: History, row: int, end: int) -> History:
    """`h` with the ratings and genres of row `row`'s events from `end` on replaced (a copy; `h` is unchanged)."""
    store = h.store
    tokens = {f: t.copy() for f, t in store.tokens.items()}
    lo, hi = int(store.offsets[row]) + end, int(store.offsets[row + 1])
    for f in ("rating", "genre"):
        ids = tokens[f][lo:hi]
        tokens[f][lo:hi] = np.where(ids == 5, 6, 5)  # the vocabulary's first value <-> its second
    return dataclasses.replace(h, store=dataclasses.replace(store, tokens=tokens), _names={}, _numbers={})


def test_predictive_answers_come_from_after_the_cut_and_inputs_stop_before_it(ml100k):
    """Leakage (b): changing a user's events after a predictive triple's cut changes its answer, never its input."""
    h = History.of(ml100k)
    cfg = UserQAConfig(predictive_fraction=1.0, questions_per_user=3)
    triples = [t for t in build_userqa(h, cfg) if t.axis == "predictive"]
    assert {t.kind for t in triples} == {"next_categories", "next_items", "next_level"}
    fmt = UserFormatter(h)
    checked = 0
    for t in triples[:60]:
        assert 0 < t.end < h.length(t.row)
        before = fmt.user_input(t.row, t.instruction, end=t.end)
        assert sum(before.n_events.values()) == t.end
        last = int(h.store.offsets[t.row]) + t.end - 1  # the last event before the cut is the last one shown
        assert before.sources["ratings"].splitlines()[-1].endswith(f"title: {h.texts['title'][last]}; genres: {h.texts['genres'][last]}; "
                                                                   f"rating: {h.names('rating')[h.store.tokens['rating'][last]]}")
        changed = with_changed_future(h, t.row, t.end)
        after = UserFormatter(changed).user_input(t.row, t.instruction, end=t.end)
        assert after.text() == before.text() and np.array_equal(after.tabular, before.tabular)
        if t.kind != "next_items":  # titles are not changed, so that answer stays
            redone = {x.kind: x.answer for x in user_triples(changed, t.row, cfg, question_kinds(changed))}
            checked += redone[t.kind] != t.answer
    assert checked > 10


def test_input_format_delimiters_instruction_and_user_token(recsys):
    h = History.of(recsys)
    fmt = UserFormatter(h)
    u = fmt.user_input(0, "What will this user do next?", "Mostly page visit next.")
    text = u.text()
    names = ["purchases", "cart", "page_visits", "searches", "tabular"]
    assert [n for n, _ in u.blocks()] == names
    positions = [text.index(open_tag(n)) for n in names]
    assert positions == sorted(positions) and text.startswith("<purchases>\n")
    for n, body in u.blocks():
        assert f"{open_tag(n)}\n{body}\n{close_tag(n)}" in text
    assert text.endswith(f"</tabular>\n{INSTRUCTION_PREFIX}What will this user do next?\n{USER_TOKEN}\nMostly page visit next.")
    assert u.prompt().endswith(USER_TOKEN) and u.prompt().count(USER_TOKEN) == 1
    universal = fmt.user_input(0)
    assert INSTRUCTION_PREFIX not in universal.text() and universal.text().endswith(f"</tabular>\n{USER_TOKEN}")
    assert delimiters(h)[-1] == USER_TOKEN and "</searches>" in delimiters(h)
    assert u.tabular.dtype == np.float32 and u.tabular.shape == (len(u.tabular_names),) and np.isfinite(u.tabular).all()
    assert np.array_equal(u.tabular, tabular_features(h, h.events(0)))
    cart = [line.split("; ")[1] for line in u.sources["cart"].splitlines() if u.sources["cart"] != NO_EVENTS]
    assert set(cart) <= {"event type: add_to_cart", "event type: remove_from_cart"}


def test_budget_keeps_the_newest_events_and_counts_the_cut(recsys):
    h = History.of(recsys)
    row = int(np.argmax(h.store.lengths))
    full = UserFormatter(h, InputConfig(budget=1000)).user_input(row)
    n = full.n_events["page_visits"]
    assert n > 5 and full.cut_events["page_visits"] == 0
    fmt = UserFormatter(h, InputConfig(budget=1000, budgets={"page_visits": 5}))
    cut = fmt.user_input(row)
    assert cut.sources["page_visits"].splitlines() == full.sources["page_visits"].splitlines()[-5:]
    assert cut.cut_events == {**full.cut_events, "page_visits": n - 5} and fmt.cut_counts["page_visits"] == n - 5
    fmt.user_input(row)
    assert fmt.cut_counts["page_visits"] == 2 * (n - 5)
    assert cut.sources["purchases"] == full.sources["purchases"]
    with pytest.raises(ValueError, match=r"inputs\.budgets\.visits: not a source of recsys2025"):
        UserFormatter(h, InputConfig(budgets={"visits": 5}))
    with pytest.raises(ValueError, match=r"inputs\.budget: 0 must be >= 1"):
        UserFormatter(h, InputConfig(budget=0))


@pytest.mark.parametrize(("key", "value"), [("future_fraction", 1.0), ("predictive_fraction", -0.1), ("questions_per_user", -1)])
def test_bad_config_names_its_key(key, value):
    with pytest.raises(ValueError, match=rf"userqa\.{key}:"):
        UserQAConfig(**{key: value})


def test_llm_synthesis_is_deterministic_and_keeps_the_template(tiny, tiny_causal_lm_dir):
    cfg = dataclasses.replace(TINY_QA, generator_path=str(tiny_causal_lm_dir), generator_max_new_tokens=8, generator_batch_size=4)
    h = History.of(tiny)
    first, again, plain = build_userqa(h, cfg), build_userqa(h, cfg), build_userqa(h, TINY_QA)
    assert first == again
    assert [t.template_answer for t in first] == [t.answer for t in plain]
    assert any(t.answer != t.template_answer for t in first) and all(t.answer for t in first)


def test_any_other_data_gets_one_events_source_and_the_questions_its_fields_answer(csv_data, tmp_path):
    from tests.conftest import generic_config

    h = History.of(prepare(generic_config(*csv_data, tmp_path / "cache", val_fraction=0.0)))
    assert (h.roles.category, h.roles.level, h.roles.event_type) == ("merchant", "amount", "event_type")
    assert "next_items" not in question_kinds(h) and "next_activity" in question_kinds(h)
    triples = build_userqa(h, UserQAConfig(questions_per_user=7, future_events=1, min_past_events=2))
    assert {t.kind for t in triples} == {*question_kinds(h), "summary"}
    u = UserFormatter(h).user_input(0)
    assert [n for n, _ in u.blocks()] == ["events", "tabular"] and u.sources["events"].count("\n") == h.length(0) - 1
