"""Users as text: exact renderings, whole-event token budgets, padded and packed LM batches, the LLM rewrite cache."""

from __future__ import annotations

import datetime as dt
import json
import shutil

import polars as pl
import pytest
import torch
import yaml
from transformers import Qwen2Config, Qwen2ForCausalLM

from datamodules.preprocess import Prepared, prepare
from datamodules.text import FORMATS, Renderer, augment_formats, render_user
from datamodules.text_batches import IGNORE, TextBatchBuilder, UserTextDataset, block_causal_mask, count_tokens, fit_budget, fit_lines
from lit_modules.lm import MINILM, load_tokenizer
from lit_modules.rewrite import rewrite_with_llm
from tests.conftest import generic_config

# u1 is hand-made: a missing merchant and amount, a rare merchant (top_k=2 keeps grocery, travel),
# a missing description, characters each format must escape. u2 gives the budget tests many events.
U1 = [
    ("u1", "2024-01-01 09:05:00", "purchase", "grocery", 7.12, "milk | bread"),
    ("u1", "2024-01-02 10:00:00", "refund", None, None, 'said "hi" <b>'),
    ("u1", "2024-01-03 11:30:00", "purchase", "travel", 1200.0, None),
    ("u1", "2024-01-04 12:00:00", "purchase", "cinema", 0.005, "yes"),
]
U2 = [
    ("u2", (dt.datetime(2024, 2, 1) + dt.timedelta(hours=7 * i)).strftime("%Y-%m-%d %H:%M:%S"), "purchase",
     ["grocery", "travel"][i % 2], float(i), f"item number {i}")
    for i in range(40)
]  # fmt: skip

EXPECTED = {
    "plain": """fields: event type, timestamp, merchant, amount, description
event type: purchase; timestamp: 2024-01-01 09:05; merchant: grocery; amount: 7.12; description: milk | bread
event type: refund; timestamp: 2024-01-02 10:00; merchant: unknown; amount: unknown; description: said "hi" <b>
event type: purchase; timestamp: 2024-01-03 11:30; merchant: travel; amount: 1200; description: unknown
event type: purchase; timestamp: 2024-01-04 12:00; merchant: other; amount: 0.005; description: yes""",
    "json": """[
{"event type": "purchase", "timestamp": "2024-01-01 09:05", "merchant": "grocery", "amount": 7.12, "description": "milk | bread"},
{"event type": "refund", "timestamp": "2024-01-02 10:00", "merchant": "unknown", "amount": "unknown", "description": "said \\"hi\\" <b>"},
{"event type": "purchase", "timestamp": "2024-01-03 11:30", "merchant": "travel", "amount": 1200, "description": "unknown"},
{"event type": "purchase", "timestamp": "2024-01-04 12:00", "merchant": "other", "amount": 0.005, "description": "yes"}
]""",
    "markdown": """| event type | timestamp | merchant | amount | description |
| --- | --- | --- | --- | --- |
| purchase | 2024-01-01 09:05 | grocery | 7.12 | milk \\| bread |
| refund | 2024-01-02 10:00 | unknown | unknown | said "hi" <b> |
| purchase | 2024-01-03 11:30 | travel | 1200 | unknown |
| purchase | 2024-01-04 12:00 | other | 0.005 | yes |""",
    "yaml": """- event type: purchase
  timestamp: 2024-01-01 09:05
  merchant: grocery
  amount: 7.12
  description: milk | bread
- event type: refund
  timestamp: 2024-01-02 10:00
  merchant: unknown
  amount: unknown
  description: said "hi" <b>
- event type: purchase
  timestamp: 2024-01-03 11:30
  merchant: travel
  amount: 1200
  description: unknown
- event type: purchase
  timestamp: 2024-01-04 12:00
  merchant: other
  amount: 0.005
  description: "yes\"""",
    "html": """<table>
<tr><th>event type</th><th>timestamp</th><th>merchant</th><th>amount</th><th>description</th></tr>
<tr><td>purchase</td><td>2024-01-01 09:05</td><td>grocery</td><td>7.12</td><td>milk | bread</td></tr>
<tr><td>refund</td><td>2024-01-02 10:00</td><td>unknown</td><td>unknown</td><td>said "hi" &lt;b&gt;</td></tr>
<tr><td>purchase</td><td>2024-01-03 11:30</td><td>travel</td><td>1200</td><td>unknown</td></tr>
<tr><td>purchase</td><td>2024-01-04 12:00</td><td>other</td><td>0.005</td><td>yes</td></tr>
</table>""",
}


@pytest.fixture(autouse=True)
def one_thread():
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Prepared:
    tmp = tmp_path_factory.mktemp("text")
    columns = ["client", "ts", "event_type", "merchant", "amount", "description"]
    pl.DataFrame(U1 + U2, schema=columns, orient="row").write_csv(tmp / "events.csv")
    p = prepare(generic_config(tmp / "events.csv", None, tmp / "cache", top_k=2, val_fraction=0.0))
    assert p.store.user_ids.tolist() == ["u1", "u2"]
    return p


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(MINILM)


def tiny_qwen(vocab_size: int = 100, attn_implementation: str = "sdpa") -> Qwen2ForCausalLM:
    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
        intermediate_size=64, attn_implementation=attn_implementation,
    )  # fmt: skip
    return Qwen2ForCausalLM(config).eval()


# -------------------------------------------------------------------- rendering


@pytest.mark.parametrize("fmt", FORMATS)
def test_render_user_exact(prepared, fmt):
    assert render_user(prepared, 0, fmt) == EXPECTED[fmt]


def test_structured_formats_parse_to_the_same_records(prepared):
    records = json.loads(EXPECTED["json"])
    assert yaml.safe_load(EXPECTED["yaml"]) == records
    assert [r["amount"] for r in records] == [7.12, "unknown", 1200, 0.005]
    # any number of most recent events is still valid json/yaml with the same records
    renderer = Renderer(prepared)
    for n in range(5):
        assert json.loads(renderer.render(0, "json").text(n)) == records[4 - n :]
        assert yaml.safe_load(renderer.render(0, "yaml").text(n)) == records[4 - n :]


def test_most_recent_events_kept_and_encode_me_line_format(prepared):
    assert render_user(prepared, 0, "plain", max_events=2, header=False) == "\n".join(EXPECTED["plain"].split("\n")[-2:])
    assert render_user(prepared, 0, "markdown", max_events=1).split("\n")[-1] == EXPECTED["markdown"].split("\n")[-1]


def test_augment_formats_renders_every_format(prepared):
    assert augment_formats(prepared, 0) == EXPECTED


# -------------------------------------------------------------------- token budget


@pytest.mark.parametrize("fmt", FORMATS)
def test_fit_budget_keeps_whole_recent_events(prepared, tokenizer, fmt):
    rendered = Renderer(prepared).render(1, fmt)
    counts = [count_tokens(tokenizer, rendered.text(n)) for n in range(len(rendered) + 1)]
    for budget in [counts[1], counts[1] + 1, counts[7], counts[20] - 1, counts[-1], counts[-1] + 50]:
        text = fit_budget(rendered.text, len(rendered), tokenizer, budget)
        assert count_tokens(tokenizer, text) <= budget
        kept = next(n for n in range(len(rendered) + 1) if rendered.text(n) == text)  # whole events only
        assert kept == len(rendered) or counts[kept + 1] > budget  # and as many as fit
    with pytest.raises(ValueError, match="header alone"):
        fit_budget(rendered.text, len(rendered), tokenizer, counts[0] - 1)
    with pytest.raises(ValueError, match="not one event fits"):  # a header-only text would be the same for every user
        fit_budget(rendered.text, len(rendered), tokenizer, counts[1] - 1)


def test_dataset_items_fit_and_cover_users_times_formats(prepared, tokenizer):
    ds = UserTextDataset(prepared, [0, 1], tokenizer, max_tokens=200, formats=("plain", "json"))
    assert len(ds) == 4
    assert [it["index"] for it in ds] == [0, 0, 1, 1]
    for i in range(len(ds)):
        ids = ds[i]["input_ids"]
        assert len(ids) <= 200
        assert ids == tokenizer(ds.text(i))["input_ids"]
    assert ds.text(0) == EXPECTED["plain"]  # u1 fits whole
    assert ds.text(3).endswith(Renderer(prepared).render(1, "json").text(1).split("\n", 1)[1])  # u2 cut, newest kept


def test_fit_lines_keeps_recent_whole_lines_or_drops(tokenizer):
    lines = EXPECTED["plain"].split("\n")
    text = "\n" + EXPECTED["plain"] + "\n\n"  # surrounding whitespace is not content
    whole = count_tokens(tokenizer, EXPECTED["plain"])
    assert fit_lines(text, tokenizer, whole) == EXPECTED["plain"]
    assert fit_lines(text, tokenizer, whole - 1) == "\n".join(lines[1:])  # the oldest line goes first
    last_two = count_tokens(tokenizer, "\n".join(lines[-2:]))
    assert fit_lines(text, tokenizer, last_two + 1, extra_tokens=1) == "\n".join(lines[-2:])
    assert fit_lines(text, tokenizer, last_two) == "\n".join(lines[-2:])
    assert fit_lines(text, tokenizer, last_two, extra_tokens=1) == lines[-1]
    assert fit_lines(text, tokenizer, count_tokens(tokenizer, lines[-1]) - 1) is None  # not even the newest line fits
    assert fit_lines(" \n ", tokenizer, 100) is None


# -------------------------------------------------------------------- batches


ITEMS = [{"index": 7, "input_ids": [11, 12, 13]}, {"index": 3, "input_ids": [21]}, {"index": 5, "input_ids": [31, 32, 33, 34, 35]}]


def test_right_and_left_padding():
    right = TextBatchBuilder(pad_token_id=0)(ITEMS)
    assert right["index"].tolist() == [7, 3, 5]
    assert right["input_ids"].tolist() == [[11, 12, 13, 0, 0], [21, 0, 0, 0, 0], [31, 32, 33, 34, 35]]
    assert right["attention_mask"].tolist() == [[1, 1, 1, 0, 0], [1, 0, 0, 0, 0], [1, 1, 1, 1, 1]]
    assert right["labels"].tolist() == [[IGNORE, 12, 13, IGNORE, IGNORE], [IGNORE] * 5, [IGNORE, 32, 33, 34, 35]]
    left = TextBatchBuilder(pad_token_id=0, padding_side="left")(ITEMS)
    assert left["input_ids"].tolist() == [[0, 0, 11, 12, 13], [0, 0, 0, 0, 21], [31, 32, 33, 34, 35]]
    assert left["labels"].tolist() == [[IGNORE, IGNORE, IGNORE, 12, 13], [IGNORE] * 5, [IGNORE, 32, 33, 34, 35]]
    assert left["position_ids"].tolist() == [[0, 0, 0, 1, 2], [0, 0, 0, 0, 0], [0, 1, 2, 3, 4]]


def test_packed_batch_layout_and_labels():
    batch = TextBatchBuilder(pad_token_id=0, pack_length=6, block_mask=True)(ITEMS)
    # first fit decreasing: [5 tokens + 1 token], [3 tokens + 3 pads]
    assert batch["index"].tolist() == [5, 3, 7]
    assert batch["input_ids"].tolist() == [[31, 32, 33, 34, 35, 21], [11, 12, 13, 0, 0, 0]]
    assert batch["seq_idx"].tolist() == [[0, 0, 0, 0, 0, 1], [2, 2, 2, -1, -1, -1]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 4, 0], [0, 1, 2, 0, 1, 2]]
    # never a pad, never a document's first token (it would be predicted from the previous document)
    assert batch["labels"].tolist() == [[IGNORE, 32, 33, 34, 35, IGNORE], [IGNORE, 12, 13, IGNORE, IGNORE, IGNORE]]
    target = batch["labels"][:, 1:] != IGNORE
    assert (batch["seq_idx"][:, 1:][target] == batch["seq_idx"][:, :-1][target]).all()
    mask = batch["attention_mask"]
    assert mask.shape == (2, 1, 6, 6) and mask.dtype == torch.bool
    assert mask[0, 0, 5].tolist() == [False] * 5 + [True]  # the 1-token document sees only itself
    assert mask[0, 0, 4].tolist() == [True] * 5 + [False]
    with pytest.raises(ValueError, match="pack_length"):
        TextBatchBuilder(0, pack_length=4)(ITEMS)


def per_document_error(logits: torch.Tensor, batch: dict, docs: dict, model) -> float:
    """Largest |logit difference| between each packed document and the same document run alone."""
    err = 0.0
    for k, row in enumerate(batch["index"].tolist()):
        where = batch["seq_idx"] == k
        alone = model(input_ids=torch.tensor([docs[row]]), use_cache=False).logits[0]
        err = max(err, (logits[where] - alone).abs().max().item())
    return err


@pytest.mark.parametrize("how", ["position_ids", "block_mask"])
def test_packed_documents_do_not_see_each_other(how):
    model = tiny_qwen()
    gen = torch.Generator().manual_seed(0)
    docs = {i: torch.randint(5, 100, (n,), generator=gen).tolist() for i, n in enumerate([9, 4, 6, 1, 7, 3])}
    items = [{"index": i, "input_ids": d} for i, d in docs.items()]
    batch = TextBatchBuilder(0, pack_length=12, block_mask=how == "block_mask")(items)
    assert (batch["seq_idx"].amax(1) - batch["seq_idx"].clamp(min=0).amin(1) > 0).any()  # some row holds 2+ documents
    with torch.no_grad():
        if how == "position_ids":  # no 2-D mask and no cache: transformers splits documents at position resets
            logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
        else:
            inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids")}
            logits = model(**inputs, use_cache=False).logits
        assert per_document_error(logits, batch, docs, model) < 1e-5
        leaky = model(input_ids=batch["input_ids"], use_cache=False).logits  # plain causal attention crosses documents
        assert per_document_error(leaky, batch, docs, model) > 1e-3


def test_block_causal_mask_matches_definition():
    seq_idx = torch.tensor([[0, 0, 1, 1, 1, -1]])
    mask = block_causal_mask(seq_idx)[0, 0]
    for q in range(6):
        for k in range(6):
            assert mask[q, k] == (k <= q and seq_idx[0, q] == seq_idx[0, k])


# -------------------------------------------------------------------- LLM rewrite


def test_rewrite_cached_by_text_model_and_settings(tmp_path, tokenizer):
    model_dir = tmp_path / "tiny-qwen"
    tiny_qwen(vocab_size=len(tokenizer)).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    cache = tmp_path / "rewrites.parquet"
    texts = [EXPECTED["plain"], "event type: purchase; timestamp: 2024-01-01 09:05"]
    first = rewrite_with_llm(texts, str(model_dir), cache, formats=("json", "yaml"), max_new_tokens=4, batch_size=2)
    assert len(first) == 2 and all(len(r) == 2 and all(isinstance(t, str) for t in r) for r in first)
    assert pl.read_parquet(cache).height == 4

    shutil.rmtree(model_dir)  # a second call must not need the model at all
    assert rewrite_with_llm(texts[::-1], str(model_dir), cache, formats=("json", "yaml"), max_new_tokens=4) == first[::-1]
    assert rewrite_with_llm(texts, str(model_dir), cache, formats=("yaml",), max_new_tokens=4) == [[r[1]] for r in first]
    with pytest.raises(FileNotFoundError, match="model.rewriter_path"):  # other settings are another key: needs the (deleted) model
        rewrite_with_llm(texts, str(model_dir), cache, max_new_tokens=4, temperature=0.7)
    with pytest.raises(ValueError, match="model.rewrite_formats"):
        rewrite_with_llm(texts, str(model_dir), cache, formats=("xml",))
