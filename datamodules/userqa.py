"""UserQA: (user, instruction, answer) triples mined from users' own histories, InstructUE's training data.

Two axes. Descriptive questions ask for stable traits of the history: favourite categories,
rating or spending level, activity rhythm, loyalty. Predictive questions ask what the user does
next: the last part of each user's history (`future_fraction`, or the last `future_events`)
plays the future and the answer is read from it; the triple's `end` stops the input before it,
and any "so far" in the answer reads only the events before `end`. One universal triple per
user (empty instruction, a profile summary as answer) trains the universal mode; a consumer
asks for it with the empty instruction (`datamodules.user_inputs.UNIVERSAL`).

No leakage by construction: the input is a `History` (the store and vocabularies: events
before the probe cutoff), never targets, labels or the future window.

Deterministic given the seed: each user's questions and phrasings come from a generator seeded
by (seed, crc32(user id)), so a user's triples do not depend on other users. With
`generator_path` set, a causal LM rephrases each templated answer (`synthesize`, greedy).
"""

from __future__ import annotations

import logging
import zlib
from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np

from datamodules.user_history import DAY_PARTS, WEEKDAYS, History, repeat_share, rhythm
from datamodules.user_inputs import UNIVERSAL, UserFormatter, UserInput

log = logging.getLogger(__name__)

DESCRIPTIVE, PREDICTIVE, UNIVERSAL_AXIS = "descriptive", "predictive", "universal"


@dataclass
class UserQAConfig:
    """How UserQA triples are made."""

    seed: int = 0
    """Seeds each user's choice of questions and phrasings (with the user id)."""
    questions_per_user: int = 4
    """Questions per user (fewer when the user's history cannot answer that many)."""
    predictive_fraction: float = 0.5
    """Share of a user's questions that are predictive (rounded); users too short for a cut get descriptive ones."""
    future_fraction: float = 0.2
    """Share of each user's history (its last events, at least one) that plays the future in predictive questions."""
    future_events: int = 0
    """When > 0: the last this many events play the future instead of future_fraction."""
    min_past_events: int = 3
    """Predictive questions only for users with at least this many events before the cut."""
    universal: bool = True
    """Add one universal triple per user: empty instruction, a profile summary as the answer."""
    generator_path: str | None = None
    """A causal LM (local folder or package:NAME) that rephrases every templated answer; null: templates only."""
    generator_max_new_tokens: int = 64
    """Longest rephrased answer, in tokens."""
    generator_batch_size: int = 8
    """Answers rephrased per generate call."""

    def __post_init__(self) -> None:
        if self.questions_per_user < 0:
            raise ValueError(f"userqa.questions_per_user: {self.questions_per_user} must be >= 0")
        if not 0 <= self.predictive_fraction <= 1:
            raise ValueError(f"userqa.predictive_fraction: {self.predictive_fraction} must be in [0, 1]")
        if not 0 < self.future_fraction < 1:
            raise ValueError(f"userqa.future_fraction: {self.future_fraction} must be in (0, 1)")
        if self.future_events < 0:
            raise ValueError(f"userqa.future_events: {self.future_events} must be >= 0 (0: use future_fraction)")
        if self.min_past_events < 1:
            raise ValueError(f"userqa.min_past_events: {self.min_past_events} must be >= 1")
        if self.generator_max_new_tokens < 1 or self.generator_batch_size < 1:
            raise ValueError("userqa.generator_max_new_tokens and userqa.generator_batch_size must be >= 1")


@dataclass(frozen=True)
class QATriple:
    """One question about one user. The model input is the user's first `end` events (`UserFormatter.user_input`)."""

    row: int  # store row
    user_id: str
    axis: str  # descriptive | predictive | universal
    kind: str  # question type, a key of QUESTIONS (or "summary")
    instruction: str  # UNIVERSAL ("") for the universal triple
    answer: str
    end: int  # events of the user's history the input reads; a predictive answer comes from events at end and later
    template_answer: str  # the templated answer (differs from `answer` only after LLM synthesis)


@dataclass(frozen=True)
class Level:
    """How a level field reads: its unit, thresholds for words, and what counts as 'about the same'."""

    unit: str  # format with {v}
    bounds: tuple[float, float]
    words: tuple[str, str, str]
    tolerance: float
    more: str = "higher"
    less: str = "lower"


LEVELS = {
    "rating": Level("{v} stars", (3.0, 3.75), ("Critical", "Moderate", "Generous"), 0.25),
    "price": Level("price bucket {v}/99", (33.0, 66.0), ("Budget", "Mid-range", "Premium"), 5.0, "pricier", "cheaper"),
}


def _pct(part: float, whole: float) -> str:
    return f"{round(100 * part / whole)}%"


def _num(v: float) -> str:
    return f"{v:.1f}".rstrip("0").rstrip(".")


def _and(items: list[str]) -> str:
    return items[0] if len(items) == 1 else f"{', '.join(items[:-1])} and {items[-1]}"


def _level(h: History) -> Level:
    return LEVELS.get(h.roles.level or "", Level("{v}", (float("-inf"), float("inf")), ("", "", ""), 0.0))


def _categories(h: History, idx: np.ndarray) -> tuple[list[tuple[str, int]], int]:
    """The categories among `idx` as (display name, count), most frequent first, and how many events carry a known one."""
    ranked = h.ranked(h.roles.category, idx)
    return [(f"{h.roles.category_prefix}{v}", c) for v, c in ranked], sum(c for _, c in ranked)


def _shares(named: list[tuple[str, int]], total: int, top: int) -> list[str]:
    return [f"{v} ({_pct(c, total)})" for v, c in named[:top]]


def favourites(h: History, idx: np.ndarray) -> str | None:
    named, total = _categories(h, idx)
    if not named:
        return None
    names = _shares(named, total, 3)
    rest = f", then {_and(names[1:])}" if len(names) > 1 else ""
    return f"Mostly {names[0]}{rest}, of {total} {h.roles.category_events_noun}."


def level(h: History, idx: np.ndarray) -> str | None:
    vals = h.level_values(idx)
    if vals.size == 0:
        return None
    lv, mean = _level(h), float(vals.mean())
    values, counts = np.unique(vals, return_counts=True)
    word = lv.words[int(np.searchsorted(lv.bounds, mean, side="right"))]
    head = f"{word}: " if word else ""
    mode = f", most often {lv.unit.format(v=_num(values[np.argmax(counts)]))}" if counts.max() > 1 else ""
    return f"{head}{lv.unit.format(v=_num(mean))} on average over {vals.size} {h.roles.category_events_noun}{mode}."


def activity(h: History, idx: np.ndarray) -> str | None:
    rh = rhythm(h.store.times[idx])
    day, part = WEEKDAYS[int(np.argmax(rh.weekdays))], DAY_PARTS[int(np.argmax(rh.parts))]
    per_day = f"about {_num(idx.size / rh.active_days)} {h.roles.events_noun} per active day"
    return f"Mostly on {day}s, in the {part}; active on {rh.active_days} of {rh.span_days} days, {per_day}."


def loyalty(h: History, idx: np.ndarray) -> str | None:
    r = h.roles
    share = repeat_share(h.store.tokens[r.category][idx])
    if not np.isfinite(share):
        return None
    word = "Very loyal" if share >= 0.8 else "Fairly loyal" if share >= 0.5 else "Exploratory"
    distinct = len(h.ranked(r.category, idx))
    text = f"{word}: {_pct(share, 1)} of their {r.category_events_noun} are in {r.category_noun} they had met before ({distinct} distinct)"
    items = repeat_share(h.store.tokens[r.item][idx]) if r.item_repeats else float("nan")
    return text + (f", and {_pct(items, 1)} are on a product they had met before." if np.isfinite(items) else ".")


def next_categories(h: History, past: np.ndarray, future: np.ndarray) -> str | None:
    (after, total), (before, _) = _categories(h, future), _categories(h, past)
    if not after or not before:
        return None
    return f"Next: {_and(_shares(after, total, 2))} of {total} {h.roles.category_events_noun}; so far mostly {before[0][0]}."


def next_items(h: History, past: np.ndarray, future: np.ndarray) -> str | None:
    titles = [" ".join(str(t).split()) for t in h.texts[h.roles.item_text][future[:3]] if t is not None]
    if not titles:
        return None
    return f"Next they turn to {_and(titles)} (the first {len(titles)} of their next {future.size} {h.roles.events_noun})."


def next_level(h: History, past: np.ndarray, future: np.ndarray) -> str | None:
    before, after = h.level_values(past), h.level_values(future)
    if before.size == 0 or after.size == 0:
        return None
    lv, b, a = _level(h), float(before.mean()), float(after.mean())
    word = "About the same as usual" if abs(a - b) <= lv.tolerance else f"{(lv.more if a > b else lv.less).capitalize()} than usual"
    return f"{word}: {lv.unit.format(v=_num(a))} on average next, against {lv.unit.format(v=_num(b))} so far."


def next_purchase(h: History, past: np.ndarray, future: np.ndarray) -> str | None:
    r = h.roles
    bought, before = h.of_types(future, (r.purchase,)), h.of_types(past, (r.purchase,))
    so_far = f"so far {before.size} purchases in {past.size} events"
    if bought.size == 0:
        return f"No: no purchase among their next {future.size} events; {so_far}."
    named, total = _categories(h, bought)
    where = f", mostly {_and(_shares(named, total, 2))}" if named else ""
    return f"Yes: {bought.size} purchases among their next {future.size} events{where}; {so_far}."


def next_activity(h: History, past: np.ndarray, future: np.ndarray) -> str | None:
    kind = h.roles.event_type
    ranked, before = h.ranked(kind, future), h.ranked(kind, past)
    if not ranked or not before:
        return None
    names = [f"{v.replace('_', ' ')} ({c} of {future.size})" for v, c in ranked[:2]]
    return f"Mostly {_and(names)} next; so far mostly {before[0][0].replace('_', ' ')}."


Answer = Callable[..., "str | None"]
# kind -> (axis, instruction phrasings, answer, the roles it needs). Phrasings take {cats} and {events}.
QUESTIONS: dict[str, tuple[str, tuple[str, ...], Answer, tuple[str, ...]]] = {
    "favourites": (DESCRIPTIVE, ("What are this user's favourite {cats}?", "Which {cats} does this user engage with most?",
                                 "Name the {cats} this user prefers."), favourites, ("category",)),
    "level": (DESCRIPTIVE, ("What level of {level} does this user show?", "Describe this user's typical {level}.",
                            "Is this user's {level} low, medium or high?"), level, ("level",)),
    "rhythm": (DESCRIPTIVE, ("When is this user active?", "Describe this user's activity rhythm.",
                             "On which days and at what time of day is this user active?"), activity, ()),
    "loyalty": (DESCRIPTIVE, ("How loyal is this user to what they already know?", "Does this user stick to familiar {cats} or explore?",
                              "How often does this user come back to the same {cats}?"), loyalty, ("category",)),
    "next_categories": (PREDICTIVE, ("Which {cats} will this user turn to next?", "Predict the {cats} of this user's next {events}.",
                                     "What {cats} will this user's coming {events} be in?"), next_categories, ("category",)),
    "next_items": (PREDICTIVE, ("Which titles will this user rate next?", "Predict the next movies this user will rate.",
                                "What will this user watch next?"), next_items, ("item_text",)),
    "next_level": (PREDICTIVE, ("Will this user's next {level} be higher or lower than usual?",
                                "How will this user's {level} change next?", "Predict this user's {level} in the coming {events}."),
                   next_level, ("level",)),
    "next_purchase": (PREDICTIVE, ("Will this user buy something next?", "Predict whether and what this user will buy next.",
                                   "Is a purchase coming from this user?"), next_purchase, ("purchase",)),
    "next_activity": (PREDICTIVE, ("What will this user do next?", "Which kinds of events will this user produce next?",
                                   "Predict this user's next actions."), next_activity, ("event_type",)),
}  # fmt: skip
LEVEL_NOUNS = {"rating": "ratings", "price": "spending"}


def question_kinds(h: History) -> list[str]:
    """The question types this dataset's fields can answer, in QUESTIONS order."""
    return [k for k, (_, _, _, needs) in QUESTIONS.items() if all(getattr(h.roles, n) for n in needs)]


def future_size(n: int, cfg: UserQAConfig) -> int:
    """Events at the end of an n-event history that play the future."""
    return cfg.future_events if cfg.future_events else max(1, round(n * cfg.future_fraction))


def user_triples(h: History, row: int, cfg: UserQAConfig, kinds: list[str]) -> list[QATriple]:
    """One user's triples: its descriptive and predictive questions (chosen and phrased by its own generator), then the universal one."""
    user = str(h.store.user_ids[row])
    rng = np.random.default_rng([cfg.seed, zlib.crc32(user.encode())])
    n = h.length(row)
    idx, end = h.events(row), n - future_size(n, cfg)
    level_noun = LEVEL_NOUNS.get(h.roles.level or "", str(h.roles.level).replace("_", " "))
    words = {"cats": h.roles.category_noun, "events": h.roles.events_noun, "level": level_noun}
    answers: dict[str, tuple[str, int]] = {}
    for kind in (kinds[i] for i in rng.permutation(len(kinds))):
        axis, _, answer, _ = QUESTIONS[kind]
        if axis == DESCRIPTIVE:
            text = answer(h, idx)
        else:
            text = answer(h, idx[:end], idx[end:]) if end >= cfg.min_past_events else None
        if text is not None:
            answers[kind] = (text, n if axis == DESCRIPTIVE else end)
    pred = [k for k in answers if QUESTIONS[k][0] == PREDICTIVE]
    desc = [k for k in answers if QUESTIONS[k][0] == DESCRIPTIVE]
    n_pred = min(len(pred), round(cfg.questions_per_user * cfg.predictive_fraction))
    chosen = pred[:n_pred] + desc[: cfg.questions_per_user - n_pred]
    chosen += pred[n_pred : n_pred + cfg.questions_per_user - len(chosen)]  # too few descriptive answers: more predictive
    out = []
    for kind in chosen:
        axis, phrasings, _, _ = QUESTIONS[kind]
        text, cut = answers[kind]
        out.append(QATriple(row, user, axis, kind, phrasings[rng.integers(len(phrasings))].format(**words), text, cut, text))
    if cfg.universal:
        summary = " ".join(a for a in (favourites(h, idx) if h.roles.category else None, level(h, idx), activity(h, idx)) if a)
        out.append(QATriple(row, user, UNIVERSAL_AXIS, "summary", UNIVERSAL, summary, n, summary))
    return out


def build_userqa(history: History, cfg: UserQAConfig | None = None) -> list[QATriple]:
    """Every user's triples, in store-row order; rephrased by the LLM when `cfg.generator_path` is set."""
    cfg = cfg or UserQAConfig()
    kinds = question_kinds(history)
    triples = [t for row in range(len(history)) for t in user_triples(history, row, cfg, kinds)]
    short = sum(1 for row in range(len(history)) if history.length(row) - future_size(history.length(row), cfg) < cfg.min_past_events)
    log.info("UserQA: %d triples for %d users (%d too short for predictive questions)", len(triples), len(history), short)
    if cfg.generator_path:
        triples = synthesize(triples, cfg.generator_path, cfg.generator_max_new_tokens, cfg.generator_batch_size)
    return triples


SYNTH_PROMPT = (
    "Rephrase the answer about a user in one or two fluent sentences. Keep every fact and every number.\n"
    "Question: {question}\nAnswer: {answer}\nRephrased answer:"
)


def synthesize(triples: list[QATriple], model_path: str, max_new_tokens: int = 64, batch_size: int = 8) -> list[QATriple]:
    """Each templated answer rephrased by the causal LM at `model_path`, greedy (deterministic); a blank generation keeps the template."""
    import torch

    from lit_modules.lm import load_causal_lm, load_tokenizer, resolve_model_path

    path = resolve_model_path(model_path, "userqa.generator_path")
    tok = load_tokenizer(path, padding_side="left")
    model = load_causal_lm(path, key="userqa.generator_path").eval()
    out, kept = [], 0
    for i in range(0, len(triples), batch_size):
        batch = triples[i : i + batch_size]
        prompts = [SYNTH_PROMPT.format(question=t.instruction or "Describe this user.", answer=t.template_answer) for t in batch]
        if tok.chat_template:
            chats = [[{"role": "user", "content": p}] for p in prompts]
            prompts = [tok.apply_chat_template(c, tokenize=False, add_generation_prompt=True) for c in chats]
        enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=not tok.chat_template)
        enc = {k: v for k, v in enc.items() if k in ("input_ids", "attention_mask")}
        with torch.no_grad():
            ids = model.generate(**enc, do_sample=False, max_new_tokens=max_new_tokens, pad_token_id=tok.pad_token_id)
        for t, text in zip(batch, tok.batch_decode(ids[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)):
            text = " ".join(text.split())
            kept += not text
            out.append(replace(t, answer=text or t.template_answer))
    log.info("UserQA: %d answers rephrased by %s (%d blank generations kept their template)", len(out) - kept, model_path, kept)
    return out


class UserQADataset:
    """Triples as `UserInput`s with their answers, each reading only its triple's first `end` events.

    Map-style (len + getitem), so a torch DataLoader takes it as it is; the formatter's
    `cut_counts` sum the budget cuts of every input built.
    """

    def __init__(self, triples: list[QATriple], formatter: UserFormatter):
        self.triples, self.formatter = triples, formatter

    def __len__(self) -> int:
        return len(self.triples)

    def __getitem__(self, i: int) -> UserInput:
        t = self.triples[i]
        return self.formatter.user_input(t.row, t.instruction, t.answer, t.end)
