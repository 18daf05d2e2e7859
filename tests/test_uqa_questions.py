"""UQABench's personal QA: answers worked out by hand on test_userqa's 2-user MovieLens folder, candidates holding
the answer once, the match-feature and k < 4 filters, seeding, the held-out cut, and every sub-task on real ml100k."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from datamodules.config import DataConfig
from datamodules.preprocess import Prepared, prepare
from datamodules.user_history import History
from datamodules.uqa_questions import (
    GROUPS, ORDINALS, SUBTASKS, CandidateError, Question, UQAConfig, build_questions, check_candidates, user_questions,
)  # fmt: skip
from tests.test_userqa import AFTER_CUTOFF, CUTOFF, RATINGS, ml100k_config, with_changed_future, write_ml100k

# User 1 in time order: Alpha, Beta, Eta (Drama), Delta, Epsilon (Action), Zeta (Horror). User 2: Gamma, Theta, Iota, Kappa (Comedy).
TINY = UQAConfig(short_window=3, held_out=1, n_candidates=4)
LAST = {  # user -> (title, genre) of the last, second- and third-to-last movie
    "1": [("Zeta", "Horror"), ("Epsilon", "Action"), ("Delta", "Action")],
    "2": [("Kappa", "Comedy"), ("Iota", "Comedy"), ("Theta", "Comedy")],
}
COUNTS = {"1": {"Drama": 3, "Action": 2, "Horror": 1}, "2": {"Comedy": 4}}
DIRECT = re.compile(r"What is the (genre|title) of the (.+) movie in this user's history\?")
MATCH = re.compile(r"How many movies in this user's history have the genre (.+)\?")


def prepared(folder: Path, ratings: list[tuple]) -> Prepared:
    return prepare(ml100k_config(write_ml100k(folder / "ml", ratings), folder / "cache", CUTOFF))


@pytest.fixture
def tiny(tmp_path) -> History:
    return History.of(prepared(tmp_path, RATINGS + AFTER_CUTOFF))


@pytest.fixture(scope="module")
def ml100k(ml100k_cache) -> History:
    return History.of(prepare(ml100k_config(None, ml100k_cache, "1998-03-01")))


def by_task(questions: list[Question]) -> dict[tuple[str, str], Question]:
    return {(q.user_id, q.subtask): q for q in questions}


def assert_well_formed(q: Question, n_candidates: int) -> None:
    assert q.candidates.count(q.answer) == 1, q
    assert len(set(q.candidates)) == len(q.candidates) == n_candidates, q
    assert q.group == GROUPS[q.subtask]


def test_answers_on_a_hand_made_pair_of_users(tiny):
    questions = build_questions(tiny, TINY)
    got = {k: (q.answer, q.end) for k, q in by_task(questions).items()}
    assert got[("1", "item_prediction")] == ("Zeta", 5)  # the held-out last movie; the input stops before it
    assert got[("1", "attribute_prediction")] == ("Horror", 5)
    assert got[("1", "long_term_interest")] == ("Drama, Action, Horror", 6)
    assert got[("1", "short_term_interest")] == ("Action", 6)  # Delta, Epsilon, Zeta
    assert got[("1", "interest_trajectory")] == ("from Drama to Action", 6)  # Alpha, Beta, Eta -> Delta, Epsilon, Zeta
    assert got[("2", "item_prediction")] == ("Kappa", 3)
    assert got[("2", "attribute_prediction")] == ("Comedy", 3)
    assert got[("2", "short_term_interest")] == ("Comedy", 4)
    assert got[("2", "interest_trajectory")] == ("stayed with Comedy", 4)
    assert ("2", "long_term_interest") not in got  # one genre only: skipped, with its reason
    assert user_questions(tiny, 1, TINY)[1] == {"long_term_interest": "fewer than 3 known categories"}
    assert len(questions) == 13
    assert set(by_task(questions)[("1", "item_prediction")].candidates) <= {"Zeta", "Gamma", "Theta", "Iota", "Kappa"}  # none rated before
    for q in questions:
        assert_well_formed(q, 4)
    assert set(by_task(questions)[("1", "long_term_interest")].candidates[0].split(", ")) <= {"Comedy", "Drama", "Action", "Horror"}


def test_direct_and_match_features_over_seeds_hold_their_filters(tiny):
    """Over many seeds: every k < 4 and both fields are asked, each answered right; match feature asks only genres the user has."""
    direct, match = set(), set()
    for seed in range(40):
        for q in build_questions(tiny, UQAConfig(seed=seed, short_window=3, subtasks=("direct_feature", "match_feature"))):
            assert_well_formed(q, 4)
            if q.subtask == "direct_feature":
                field, ordinal = DIRECT.fullmatch(q.question).groups()
                k = ORDINALS.index(ordinal)  # only last, second- and third-to-last: k < 4
                assert q.answer == LAST[q.user_id][k][field == "genre"]
                direct.add((q.user_id, k, field))
            else:
                genre = MATCH.fullmatch(q.question).group(1)
                assert q.answer == str(COUNTS[q.user_id][genre]) and int(q.answer) > 0  # a genre the user lacks is never asked
                match.add((q.user_id, genre))
    assert direct == {(u, k, f) for u in ("1", "2") for k in range(3) for f in ("genre", "title")}
    assert match == {("1", "Drama"), ("1", "Action"), ("1", "Horror"), ("2", "Comedy")}


def test_short_histories_skip_what_they_cannot_support(tmp_path):
    h = History.of(prepared(tmp_path, [r for r in RATINGS if r[0] == 1] + [r for r in RATINGS if r[0] == 2][:2]))
    qs, skipped = user_questions(h, 1, UQAConfig(short_window=3, held_out=2))
    assert skipped == {
        "item_prediction": "no event before the held-out part", "attribute_prediction": "no event before the held-out part",
        "long_term_interest": "fewer than 3 known categories", "interest_trajectory": "no known category before the last items",
    }  # fmt: skip
    assert {q.subtask for q in qs} == {"direct_feature", "match_feature", "short_term_interest"}
    for seed in range(20):  # two events: only the last and second-to-last can be asked
        (q,) = user_questions(h, 1, UQAConfig(seed=seed, subtasks=("direct_feature",)))[0]
        assert DIRECT.fullmatch(q.question).group(2) in ORDINALS[:2]


def test_candidates_holding_the_answer_other_than_once_name_user_and_subtask():
    check_candidates("7", "item_prediction", "Zeta", ("Alpha", "Zeta", "Beta"))
    with pytest.raises(CandidateError, match=r"user 7, item_prediction: answer 'Zeta' occurs 0 times"):
        check_candidates("7", "item_prediction", "Zeta", ("Alpha", "Beta"))
    with pytest.raises(CandidateError, match=r"user 3, match_feature: answer '2' occurs 2 times"):
        check_candidates("3", "match_feature", "2", ("2", "1", "2"))


def test_config_rejects_unknown_subtasks_and_too_few_candidates():
    with pytest.raises(ValueError, match="unknown"):
        UQAConfig(subtasks=("direct_feature", "favourites"))
    with pytest.raises(ValueError, match="n_candidates"):
        UQAConfig(n_candidates=1)


def test_every_subtask_on_ml100k_deterministic_and_seeded_per_subtask(ml100k):
    cfg = UQAConfig(seed=0, n_candidates=6)
    first = build_questions(ml100k, cfg)
    assert first == build_questions(ml100k, cfg)
    assert {q.subtask for q in first} == set(SUBTASKS)
    assert {q.group for q in first} == {"sequence_understanding", "action_prediction", "interest_perception"}
    other = build_questions(ml100k, UQAConfig(seed=1, n_candidates=6))
    assert [q.candidates for q in other] != [q.candidates for q in first]
    only = build_questions(ml100k, UQAConfig(seed=0, n_candidates=6, subtasks=("item_prediction", "long_term_interest")))
    assert only == [q for q in first if q.subtask in ("item_prediction", "long_term_interest")]  # each sub-task draws alone
    genre = ml100k.store.tokens["genre"]
    for q in first:
        assert_well_formed(q, 6)
        idx = ml100k.events(q.row)
        if q.subtask == "match_feature":
            value = MATCH.fullmatch(q.question).group(1)
            assert int(q.answer) == int(np.sum(ml100k.names("genre")[genre[idx]] == value)) > 0
        elif q.subtask == "direct_feature":
            assert DIRECT.fullmatch(q.question).group(2) in ORDINALS
    per_user = {}
    for q in first:
        per_user.setdefault(q.user_id, []).append(q.subtask)
    assert max(len(s) for s in per_user.values()) == len(SUBTASKS) and all(len(set(s)) == len(s) for s in per_user.values())


def test_future_questions_read_only_the_held_out_part(ml100k):
    """Action prediction: the input ends before the held-out items, the answer is the first of them, and changing
    the held-out items' genres changes the attribute answer, never the cut."""
    cfg = UQAConfig(held_out=2, subtasks=("item_prediction", "attribute_prediction"))
    first = build_questions(ml100k, cfg)
    genre, titles = ml100k.store.tokens["genre"], ml100k.texts["title"]
    changed_answers = 0
    for q in first[:200]:
        n, at = ml100k.length(q.row), int(ml100k.store.offsets[q.row]) + q.end
        assert q.end == n - 2
        want = ml100k.names("genre")[genre[at]] if q.subtask == "attribute_prediction" else " ".join(str(titles[at]).split())
        assert q.answer == want
        if q.subtask == "item_prediction":  # ml100k users never rate a movie twice: no distractor is one they rated before the cut
            rated = {" ".join(str(t).split()) for t in titles[ml100k.events(q.row, q.end)]}
            assert not (rated - {q.answer}) & set(q.candidates)  # the answer may share a title with a rated movie (ml100k has such pairs)
        if q.subtask == "attribute_prediction" and genre[at] in (5, 6):
            (again,) = user_questions(with_changed_future(ml100k, q.row, q.end), q.row, cfg)[0][1:]
            assert again.end == q.end and again.question == q.question and again.answer != q.answer
            changed_answers += 1
    assert changed_answers > 10


def test_items_read_by_id_on_recsys2025(recsys_dir, tmp_path):
    """Without a title field: items go by id, direct feature asks the category only, events without a product are never an answer."""
    cfg = DataConfig(source="recsys2025", path=str(recsys_dir), cutoff_days_before_end=14, window_days=14, cache_dir=str(tmp_path))
    h = History.of(prepare(cfg))
    questions = build_questions(h, UQAConfig())
    assert {q.subtask for q in questions} == set(SUBTASKS)
    sku = h.names("sku")
    for q in questions:
        assert_well_formed(q, 4)
        assert not {"unknown", "other"} & set(q.candidates), q
        if q.subtask == "item_prediction":
            assert q.answer == sku[h.store.tokens["sku"][int(h.store.offsets[q.row]) + q.end]]
        if q.subtask == "direct_feature":
            assert q.question.startswith("What is the category of the ")
