"""The `model.*` keys of NextEventGPT: defaults, docs (`--help`) and checks.

Torch-free, so `--help` and config errors answer without importing Lightning; the module
(lit_modules/next_event_gpt.py) takes exactly these keys as constructor arguments.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar

from datamodules.fields import check_time, check_value_fields, resolve_fields, with_time
from datamodules.schema import FIRST_ID

SCHEDULES = ("constant", "cosine")  # what lit_modules.contract.adamw_with_schedule does


def check_next_event_gpt(hp: Mapping[str, Any]) -> None:
    """Checks of the size, window and schedule keys, shared by the config and the module's constructor."""
    hidden, heads, layers = hp["hidden"], hp["heads"], hp["layers"]
    if hidden < 1 or heads < 1 or layers < 1:
        raise ValueError(f"hidden, heads and layers must be >= 1, got {hidden}, {heads}, {layers}")
    if hidden % heads:
        raise ValueError(f"hidden ({hidden}) must be divisible by heads ({heads})")
    if not 0.0 <= hp["dropout"] < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {hp['dropout']}")
    slice_min, slice_max, max_len = hp["slice_min"], hp["slice_max"], hp["max_len"]
    if slice_min < 2:
        raise ValueError(f"slice_min must be >= 2 (a window needs an event and its next), got {slice_min}")
    if slice_min > slice_max:
        raise ValueError(f"slice_min ({slice_min}) > slice_max ({slice_max})")
    if slice_max > max_len:
        raise ValueError(f"slice_max ({slice_max}) > max_len ({max_len}): windows would not fit the positions")
    if hp["sampled_negatives"] is not None and hp["sampled_negatives"] < 1:
        raise ValueError(f"sampled_negatives must be None or >= 1, got {hp['sampled_negatives']}")
    if hp["warmup_steps"] < 0:
        raise ValueError(f"warmup_steps must be >= 0, got {hp['warmup_steps']}")
    if hp["schedule"] not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {hp['schedule']!r}")
    check_time(hp["time"])
    event_types = hp["event_types"]
    if event_types is not None and (not event_types or len(set(event_types)) != len(event_types)):
        raise ValueError(f"event_types must be null or a non-empty list without duplicates, got {event_types}")


@dataclass
class NextEventGPTConfig:
    """GPT-2-style next-event model of "Encode Me If You Can" (next product / next url), trained from scratch."""

    inputs: ClassVar[str] = "events"

    name: str = "next_event_gpt"
    """Method name (registry key)."""
    fields: list[str] | None = None
    """Input token fields (null: every categorical and numeric field; 'event_type' means the schema's)."""
    time: str = "none"
    """Time index field added to the input: none | day | week."""
    value_fields: list[str] = field(default_factory=list)
    """Numeric fields whose raw value (signed log1p) is projected into the input."""
    event_types: list[str] | None = None
    """Values of the data's event_type field the model reads and predicts; other events are dropped from each sequence (null: all). Paper: next product = product_buy, add_to_cart, remove_from_cart; next url = page_visit."""
    predict_fields: list[str] | None = None
    """Token fields of the next event to predict by cross-entropy (null: the input fields)."""
    predict_values: list[str] = field(default_factory=list)
    """Numeric fields of the next event to predict by MAE."""
    hidden: int = 128
    """Transformer width = user embedding size."""
    layers: int = 4
    """Transformer blocks."""
    heads: int = 4
    """Attention heads."""
    dropout: float = 0.1
    """Dropout."""
    max_len: int = 65
    """Positions; validation and embeddings read the last max_len events."""
    slice_min: int = 33
    """Shortest random training window (paper: 33)."""
    slice_max: int = 65
    """Longest random training window (paper: 65); keep it = max_len so every position is trained."""
    sampled_negatives: int | None = None
    """Sampled softmax with this many negatives for larger vocabularies (paper's next url: 10000)."""
    lr: float = 1e-3
    """Learning rate (AdamW)."""
    weight_decay: float = 0.0
    """Weight decay."""
    warmup_steps: int = 0
    """Linear warmup steps."""
    schedule: str = "constant"
    """constant | cosine (decay to 0 over the run)."""

    def __post_init__(self) -> None:
        check_next_event_gpt(asdict(self))

    def data_args(self, data: Any) -> dict[str, Any]:
        """Constructor arguments that come from the data: resolved field names and their vocabulary sizes."""
        store = data.store
        fields = resolve_fields(self.fields, data.schema, store, self.time)
        targets = fields if self.predict_fields is None else self.predict_fields
        predict = resolve_fields(targets, data.schema, store, key="model.predict_fields")
        check_value_fields(self.value_fields, store, "model.value_fields")
        check_value_fields(self.predict_values, store, "model.predict_values")
        used = dict.fromkeys([*with_time(fields, self.time), *predict])
        args = {"fields": fields, "predict_fields": predict, "vocab_sizes": {f: store.vocab_sizes[f] for f in used}}
        return {**args, **self.event_type_args(data)}

    def event_type_args(self, data: Any) -> dict[str, Any]:
        """`event_types` as token ids of the schema's event_type field: batches hold ids, the config names."""
        if self.event_types is None:
            return {"event_type_field": None, "event_type_ids": None}
        field_name = data.schema.event_type
        if field_name is None:
            raise ValueError("model.event_types: the data schema has no event_type field to filter on")
        known = data.vocabs[field_name]
        unknown = [t for t in self.event_types if t not in known]
        if unknown:
            raise ValueError(f"model.event_types: {unknown} not event types of this data; known: {known}")
        return {"event_type_field": field_name, "event_type_ids": [FIRST_ID + known.index(t) for t in self.event_types]}
