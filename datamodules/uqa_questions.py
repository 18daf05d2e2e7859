"""UQABench's personal QA: seven templated sub-tasks per user, each question with candidate answers.

Read from a `History` (events before the probe cutoff, never targets or labels), so the
questions leak nothing of the future window. Sub-tasks and the paper's groups (its Table 2
column groups): sequence understanding = direct feature (the k-th last item's category or
title, k < 4) and match feature (how many items carry a given category; never asked with 0);
action prediction = item prediction and attribute prediction (the held-out next item and its
category); interest perception = long-term interest (top 3 categories), short-term interest
(top category of the last `short_window` items) and interest trajectory (top category of the
older part -> of the last `short_window` items).

Action-prediction questions are cut like UserQA's predictive ones: the last `held_out` events
play the future, the answer is the first of them and the question's `end` stops the input
before them. Every other question reads the whole history (`end` = its length).

Candidates hold the answer exactly once plus distractors drawn from the dataset's vocabulary
(category values, distinct item titles or ids, counts), shuffled. Where users never meet an item
twice (ml100k), item prediction offers no item the user met before the cut: such a distractor
would be trivially ruled out. Ties in "top" categories break by vocabulary order
(`History.ranked`). Deterministic: each (user, sub-task) draws from a generator seeded by (seed, crc32(user id), sub-task index), so choosing other sub-tasks or users changes
nothing else. A history that cannot support a sub-task (too short, unknown values, fewer than
3 categories, a vocabulary without distractors) skips it; `user_questions` names the skips and
`build_questions` logs their counts.
"""

from __future__ import annotations

import logging
import zlib
from collections import Counter
from collections.abc import Callable, Hashable
from dataclasses import dataclass

import numpy as np

from datamodules.schema import FIRST_ID
from datamodules.user_history import OTHER, UNKNOWN, History

log = logging.getLogger(__name__)

SUBTASKS = (
    "direct_feature", "match_feature", "item_prediction", "attribute_prediction",
    "long_term_interest", "short_term_interest", "interest_trajectory",
)  # fmt: skip
GROUPS = {
    "direct_feature": "sequence_understanding",
    "match_feature": "sequence_understanding",
    "item_prediction": "action_prediction",
    "attribute_prediction": "action_prediction",
    "long_term_interest": "interest_perception",
    "short_term_interest": "interest_perception",
    "interest_trajectory": "interest_perception",
}
ORDINALS = ("last", "second-to-last", "third-to-last")  # direct feature: k = 1, 2, 3 (k < 4)
ITEM_NOUNS = {"ml100k": "movie"}  # how an item reads in a question; any other source: "item"
TOP = 3  # long-term interest: the top this many categories
MAX_DRAWS = 200  # distractor draws per question before settling for fewer candidates


@dataclass
class UQAConfig:
    """Which UQABench questions are made and how."""

    seed: int = 0
    """Seeds every user's choices (with the user id and the sub-task)."""
    n_candidates: int = 4
    """Candidate answers per question, the true one included (fewer when the vocabulary cannot supply distractors)."""
    subtasks: tuple[str, ...] = SUBTASKS
    """The sub-tasks asked, each at most once per user."""
    held_out: int = 1
    """Last events of each history that play the future in action-prediction questions."""
    short_window: int = 5
    """Last events short-term interest reads; interest trajectory compares them with the events before."""

    def __post_init__(self) -> None:
        self.subtasks = tuple(self.subtasks)
        unknown = sorted(set(self.subtasks) - set(SUBTASKS))
        if unknown:
            raise ValueError(f"uqa.subtasks: unknown {unknown}; known {list(SUBTASKS)}")
        if self.n_candidates < 2:
            raise ValueError(f"uqa.n_candidates: {self.n_candidates} must be >= 2")
        if self.held_out < 1 or self.short_window < 1:
            raise ValueError(f"uqa.held_out ({self.held_out}) and uqa.short_window ({self.short_window}) must be >= 1")


@dataclass(frozen=True)
class Question:
    """One question about one user; the model input is the user's first `end` events."""

    row: int  # store row
    user_id: str
    subtask: str
    group: str
    question: str
    answer: str
    candidates: tuple[str, ...]  # holds `answer` exactly once
    end: int  # events of the history the input reads; action-prediction answers come from events at `end` and later


class CandidateError(ValueError):
    """A question's candidates do not hold its answer exactly once."""


def check_candidates(user_id: str, subtask: str, answer: str, candidates: tuple[str, ...]) -> None:
    """Raise naming the user and sub-task unless `answer` occurs exactly once among `candidates`."""
    hits = sum(c == answer for c in candidates)
    if hits != 1:
        raise CandidateError(f"uqa: user {user_id}, {subtask}: answer {answer!r} occurs {hits} times among {len(candidates)} candidates")


@dataclass
class Pools:
    """One dataset's distractor pools and item names, built once for all users (the title column is large)."""

    categories: list[str]  # the category vocabulary
    items: list[str]  # distinct item names, sorted
    names: np.ndarray | None  # readable item name of every store event; None without an item field

    @classmethod
    def of(cls, h: History) -> Pools:
        """Items read by their text (ml100k title) when the data has one, else by their id."""
        r, names = h.roles, None
        if r.item_text:
            names = np.array([" ".join(str(t).split()) if t is not None else "" for t in h.texts[r.item_text]], dtype=object)
        elif r.item:
            names = h.names(r.item)[h.store.tokens[r.item]]
        cats = [str(v) for v in h.names(r.category)[FIRST_ID:]] if r.category else []
        return cls(cats, sorted({str(n) for n in names if _known(str(n))}) if names is not None else [], names)


def _pick(rng: np.random.Generator, answer: str, taken: set, draw: Callable[[], tuple[Hashable, str]], n: int) -> tuple[str, ...] | None:
    """The answer and up to n - 1 distractors (distinct keys, none in `taken`), shuffled; None without a distractor."""
    seen, out = set(taken), [answer]
    for _ in range(MAX_DRAWS):
        if len(out) == n:
            break
        k, text = draw()
        if k not in seen:
            seen.add(k)
            out.append(text)
    if len(out) < 2:
        return None
    return tuple(out[i] for i in rng.permutation(len(out)))


def _from(rng: np.random.Generator, pool: list[str]) -> Callable[[], tuple[str, str]]:
    def draw() -> tuple[str, str]:
        v = pool[int(rng.integers(len(pool)))]
        return v, v

    return draw


def _trajectory(before: str, after: str) -> str:
    return f"stayed with {before}" if before == after else f"from {before} to {after}"


# question, answer, keys no distractor may have (the answer's at least), distractor draw, end
Made = tuple[str, str, set, Callable[[], tuple[Hashable, str]], int]


def _known(value: str) -> bool:
    return value not in ("", UNKNOWN, OTHER)


def _make(h: History, row: int, subtask: str, cfg: UQAConfig, rng: np.random.Generator, pools: Pools) -> Made | str:
    """One sub-task's question for one user, or the reason it is skipped."""
    r, n, names = h.roles, h.length(row), pools.names
    idx = h.events(row)
    item, cat, w = ITEM_NOUNS.get(h.source, "item"), r.category, cfg.short_window
    cat_word = r.category_word or cat
    cat_names = h.names(cat) if cat else None
    cats = (lambda ev: [str(v) for v in cat_names[h.store.tokens[cat][ev]]]) if cat else None

    if subtask in ("direct_feature", "match_feature", "attribute_prediction", "long_term_interest", "short_term_interest",
                   "interest_trajectory") and not (cat and pools.categories):  # fmt: skip
        return "no category field"
    if subtask == "item_prediction" and names is None:
        return "no item field"
    if subtask == "direct_feature":
        fields = [(cat_word, cats)]
        if r.item_text:  # the title is a feature of the item; a bare item id is not
            fields.append((r.item_text, lambda ev: [str(v) for v in names[ev]]))
        options = [(k, f, get) for f, get in fields for k in range(1, min(len(ORDINALS), n) + 1) if _known(get(idx[[-k]])[0])]
        if not options:
            return "no known value among the last items"
        k, f, get = options[int(rng.integers(len(options)))]
        answer = get(idx[[-k]])[0]
        pool = pools.categories if get is cats else pools.items
        return f"What is the {f} of the {ORDINALS[k - 1]} {item} in this user's history?", answer, {answer}, _from(rng, pool), n
    if subtask == "match_feature":
        ranked = h.ranked(cat, idx)  # only categories the user has: the answer is never 0
        if not ranked:
            return "no known category"
        value, count = ranked[int(rng.integers(len(ranked)))]
        top = max(n, cfg.n_candidates)

        def draw_count() -> tuple[int, str]:
            c = int(rng.integers(1, top + 1))
            return c, str(c)

        return f"How many {item}s in this user's history have the {cat_word} {value}?", str(count), {count}, draw_count, n
    if subtask in ("item_prediction", "attribute_prediction"):
        end = n - cfg.held_out
        if end < 1:
            return "no event before the held-out part"
        nxt = idx[[end]]
        if subtask == "item_prediction":
            answer = str(names[nxt][0])
            if not _known(answer):  # recsys2025: the next event may carry no product (a page visit, a search)
                return "the next event has no known item"
            seen = set() if r.item_repeats else {str(v) for v in names[idx[:end]]}  # no re-rating: a seen movie is no distractor
            return f"Which {item} will this user turn to next?", answer, {answer, *seen}, _from(rng, pools.items), end
        answer = cats(nxt)[0]
        if not _known(answer):
            return "the next item's category is unknown"
        return f"What {cat_word} will the next {item} this user turns to have?", answer, {answer}, _from(rng, pools.categories), end
    if subtask == "long_term_interest":
        ranked = h.ranked(cat, idx)
        if len(ranked) < TOP:
            return f"fewer than {TOP} known categories"
        top3 = [v for v, _ in ranked[:TOP]]

        def draw_set() -> tuple[frozenset, str]:
            vs = [pools.categories[i] for i in rng.choice(len(pools.categories), TOP, replace=False)]
            return frozenset(vs), ", ".join(vs)

        question = f"What are this user's {TOP} most frequent {r.category_noun}, most frequent first?"
        return question, ", ".join(top3), {frozenset(top3)}, draw_set, n
    recent = h.ranked(cat, idx[-w:])
    if not recent:
        return "no known category among the last items"
    if subtask == "short_term_interest":
        question = f"Which {cat_word} dominates this user's last {w} {item}s?"
        return question, recent[0][0], {recent[0][0]}, _from(rng, pools.categories), n
    older = h.ranked(cat, idx[:-w]) if n > w else []
    if not older:
        return "no known category before the last items"

    def draw_pair() -> tuple[tuple[str, str], str]:
        a, b = (pools.categories[int(rng.integers(len(pools.categories)))] for _ in range(2))
        return (a, b), _trajectory(a, b)

    question = f"How did this user's main {cat_word} change from their earlier {item}s to their last {w}?"
    return question, _trajectory(older[0][0], recent[0][0]), {(older[0][0], recent[0][0])}, draw_pair, n


def user_questions(
    h: History, row: int, cfg: UQAConfig, pools: Pools | None = None
) -> tuple[list[Question], dict[str, str]]:
    """One user's questions in `cfg.subtasks` order, and the skipped sub-tasks with their reasons."""
    pools = pools or Pools.of(h)
    user = str(h.store.user_ids[row])
    out, skipped = [], {}
    for subtask in cfg.subtasks:
        rng = np.random.default_rng([cfg.seed, zlib.crc32(user.encode()), SUBTASKS.index(subtask)])
        made = _make(h, row, subtask, cfg, rng, pools)
        if isinstance(made, str):
            skipped[subtask] = made
            continue
        question, answer, taken, draw, end = made
        candidates = _pick(rng, answer, taken, draw, cfg.n_candidates)
        if candidates is None:
            skipped[subtask] = "no distractor in the vocabulary"
            continue
        check_candidates(user, subtask, answer, candidates)
        out.append(Question(row, user, subtask, GROUPS[subtask], question, answer, candidates, end))
    return out, skipped


def build_questions(history: History, cfg: UQAConfig | None = None) -> list[Question]:
    """Every user's questions, in store-row order; skipped (user, sub-task) pairs are counted in the log."""
    cfg = cfg or UQAConfig()
    pools, questions, skips = Pools.of(history), [], Counter()
    for row in range(len(history)):
        qs, skipped = user_questions(history, row, cfg, pools)
        questions += qs
        skips.update(f"{s}: {why}" for s, why in skipped.items())
    log.info("UQA: %d questions for %d users; skipped %s", len(questions), len(history), dict(skips) or "none")
    return questions
