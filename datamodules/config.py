"""The `data` section of a run config. Plain dataclasses: fast to import, their field docstrings are `--help`."""

from __future__ import annotations

from dataclasses import dataclass, field

from datamodules.schema import FieldSpec


@dataclass
class SchemaConfig:
    """Columns of a generic event file."""

    user: str = "user_id"
    """Column holding the user id."""
    time: str = "timestamp"
    """Column holding the event time."""
    time_format: str | None = None
    """epoch_s, epoch_ms, a strftime pattern such as %Y-%m-%d %H:%M:%S, or null for a datetime/ISO column."""
    fields: list[FieldSpec] = field(default_factory=list)
    """Event fields: name, kind (categorical|numeric|text|codes), column, top_k, n_buckets."""
    event_type: str | None = None
    """The categorical field that names the event kind, if any."""
    separator: str | None = None
    """CSV separator (default: ',' or tab for .tsv)."""


@dataclass
class LabelsConfig:
    """A table of per-user labels for static probe targets."""

    path: str | None = None
    """CSV/parquet file with one row per user."""
    user: str | None = None
    """Its user column (default: schema.user)."""


@dataclass
class TargetConfig:
    """One probe target."""

    name: str = "target"
    """Metric names: probe_val/<name>/auc (selection) and probe_test/<name>/auc (tables)."""
    kind: str = "binary"
    """binary | above_median | classes (static, from labels) or churn | propensity | propensity_top (future window)."""
    column: str | None = None
    """Labels column of a static target (default: name)."""
    positive: str | None = None
    """binary: the label value that is positive (default: labels must be 0/1 or true/false)."""
    top_k: int = 4
    """classes: keep the top_k most frequent classes, the rest become '(other)'; propensity_top: the top_k values."""
    field: str | None = None
    """propensity: the event field to look at in the target window."""
    value: str | None = None
    """propensity: positive when a window event has field == value (among users active in the window)."""
    event_type: str | None = None
    """Future targets: only window events of this event type count (e.g. product_buy)."""
    active_only: bool = False
    """churn: label only users with >= 1 history event of event_type (the challenge's active clients; target/active_clients.npy replaces that set when present); the others are unlabelled, neither churners nor not."""


@dataclass
class FeaturesConfig:
    """Handcrafted features over each user's whole pre-cutoff history, computed while preprocessing (datamodules/history_features.py)."""

    windows_days: list[int] = field(default_factory=lambda: [7, 30])
    """Count events per event type in the last N days before the cutoff (or the last event); the whole history is always counted."""
    amounts: list[str] = field(default_factory=list)
    """Categorical fields whose raw values are amounts (recsys2025: the price bucket): mean, std and quantiles like a numeric field's."""
    buy: str | None = None
    """The event type of a purchase (recsys2025: product_buy): amount statistics of bought items and cart abandonment."""
    cart: str | None = None
    """The event type of an add to cart (recsys2025: add_to_cart): amount statistics of carted items and cart abandonment."""
    item: str | None = None
    """The field naming the item (recsys2025: sku): a cart is abandoned when no buy of its item follows it."""


@dataclass
class DataConfig:
    """Where events come from and how they become sequences."""

    source: str = "ml100k"
    """ml100k | generic | recsys2025 | uqabench."""
    path: str | None = None
    """generic: an event file or a glob (events/*.parquet); ml100k: the ml-100k folder (default: recbole's); recsys2025: the challenge folder; uqabench: an Arrow file or a folder of them."""
    schema: SchemaConfig = field(default_factory=SchemaConfig)
    """generic: the event schema."""
    labels: LabelsConfig = field(default_factory=LabelsConfig)
    """generic: per-user labels."""
    targets: list[TargetConfig] = field(default_factory=list)
    """Probe targets."""
    cutoff: str | None = None
    """History ends here (ISO datetime); events after it only make future-window targets."""
    cutoff_quantile: float | None = None
    """Alternative to cutoff: this quantile of all event times."""
    cutoff_days_before_end: int | None = None
    """Alternative to cutoff: history ends this many days before the last event (the challenge: 14)."""
    window_days: int = 30
    """Length of the future target window after the cutoff."""
    protocol: str = "user_split"
    """How future targets are scored. user_split: one window after the cutoff; users split FIT/VAL/TEST per target (probe.split). challenge (the organisers'): two windows of window_days after the cutoff (default cutoff: 2 x window_days before the last event, at midnight); heads fit on every labelled user's first-window labels, VAL users' second-window labels select, TEST users' second-window labels are reported."""
    max_len: int = 128
    """Keep each user's last max_len events."""
    drop_duplicates: str = "exact"
    """exact: drop an event equal to an earlier one in user, time and every field (a file loaded twice, a logging retry); none: keep them (a transaction log where two equal purchases on one day are real). Counted either way (data/duplicate_events, data/duplicate_events_kept)."""
    event_types: list[str] | None = None
    """Keep only history events of these types (the schema's event_type field) before the last-max_len cut, e.g. [search_query] for a block that reads a user's last 90 searches; users with none drop out. Target windows still count every event."""
    top_k: int = 5000
    """Vocabulary size cap per categorical field (plus 5 reserved ids); also caps a schema field's own top_k."""
    field_top_k: dict[str, int | None] = field(default_factory=dict)
    """Per-field vocabulary cap, e.g. {url: 100000, category: null}: replaces top_k and the schema's top_k for that field (null: every value seen in training users)."""
    n_buckets: int = 100
    """Quantile buckets per numeric field."""
    features: FeaturesConfig = field(default_factory=FeaturesConfig)
    """Handcrafted features over the whole history (windows, amounts, cart abandonment)."""
    val_fraction: float = 0.1
    """Users held out for val/loss (chosen by a seeded hash of the user id)."""
    batch_size: int = 64
    """Users per batch."""
    bucket_by_length: bool = True
    """Batch users of similar length together (less padding)."""
    num_workers: int = 0
    """DataLoader worker processes."""
    cache_dir: str = ".cache/sequences"
    """Preprocessed sequences, keyed by a content hash of source files, schema and these settings."""
