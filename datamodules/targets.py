"""Probe targets aligned with the rows of a SequenceStore, and the one list of target kinds.

The users' FIT/VAL/TEST split is not stored here: evaluation.splits draws it when evaluating.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import polars as pl

from datamodules.sources.base import DataError

@dataclass
class Target:
    """One probe target. labels[u] is the class of store row u (-1: no label for that user; multilabel: a row of -1).

    A multi-label target with `values` has no fixed classes: its heads use `multilabel_for(target,
    fit)`, the top_k values among the users they fit on, so evaluation users' labels never choose
    a class; `labels`/`classes` then hold the top_k over all labelled users, for description only.
    """

    name: str
    kind: str  # one of PROBE_KINDS or MULTILABEL
    labels: np.ndarray  # int64 [U]; multilabel: int8 [U, K] (one column per class)
    classes: list[str]  # class names; label k is classes[k] (binary: [negative, positive])
    values: pl.Series | None = None  # multilabel without fixed classes: each user's window values (List[String]; null: unlabelled)
    top_k: int = 0  # multilabel: how many classes multilabel_for chooses
    popularity: np.ndarray | None = None  # multilabel: the organisers' popularity of the fixed classes (None: from FIT labels)
    fit_labels: np.ndarray | None = None  # challenge protocol: the first window's labels, what heads fit on (labels: the second's, scored)


# Config kinds (data.targets[].kind): the only list; preprocessing and the config help refer to it.
STATIC_KINDS = ("binary", "above_median", "classes")  # from a labels table
FUTURE_KINDS = ("churn", "propensity", "propensity_top")  # from the window after the cutoff
KINDS = STATIC_KINDS + FUTURE_KINDS
MULTILABEL_KINDS = ("propensity_top",)  # config kinds whose labels are [U, K]
# Evaluation kinds (Target.kind): the linear probe takes PROBE_KINDS, the downstream MLP MULTILABEL.
PROBE_KINDS = ("binary", "multiclass")
MULTILABEL = "multilabel"
VALUES_SUFFIX = ".values"  # targets.parquet column of a propensity_top target's per-user window values
FIT_SUFFIX = ".fit"  # targets.parquet column of a future target's first-window labels (challenge protocol)


def evaluation_kind(config_kind: str, n_classes: int) -> str:
    """The Target.kind of a config kind: multilabel, binary (2 classes) or multiclass."""
    if config_kind in MULTILABEL_KINDS:
        return MULTILABEL
    return "binary" if n_classes == 2 else "multiclass"
TRUE_VALUES, FALSE_VALUES = {"1", "true", "True", "yes"}, {"0", "false", "False", "no"}


def static_labels(spec, labels: pl.DataFrame | None, user_ids: pl.Series) -> tuple[pl.Series, list[str]]:
    """Labels of a static target for the users in `user_ids` (null: unlabelled) and its class names."""

    column = spec.column or spec.name
    if labels is None:
        raise DataError(f"data.targets.{spec.name}: a {spec.kind} target needs a labels table (data.labels.path)")
    frame = pl.DataFrame({"user_id": user_ids}).join(labels, on="user_id", how="left", maintain_order="left")
    raw = frame[column]
    if spec.kind == "binary":
        text = raw.cast(pl.String)
        if spec.positive is not None:
            return (text == str(spec.positive)).cast(pl.Int64).set(raw.is_null(), None), ["other", str(spec.positive)]
        bad = text.is_not_null() & ~text.is_in(sorted(TRUE_VALUES | FALSE_VALUES))
        if bad.any():
            row = labels.filter(pl.col(column).cast(pl.String) == text.filter(bad)[0])["_row"][0]
            raise DataError(
                f"{labels['_file'][0]}: column {column!r}, row {row}: {text.filter(bad)[0]!r} is not 0/1 or true/false; "
                f"set targets.{spec.name}.positive to the positive value"
            )
        return text.is_in(sorted(TRUE_VALUES)).cast(pl.Int64).set(raw.is_null(), None), ["0", "1"]
    if spec.kind == "above_median":
        number = raw.cast(pl.Float64, strict=False)
        bad = number.is_null() & raw.is_not_null()
        if bad.any():
            value = raw.filter(bad)[0]
            row = labels.filter(pl.col(column) == value)["_row"][0]
            raise DataError(f"{labels['_file'][0]}: column {column!r}, row {row}: {value!r} is not a number")
        median = number.median()
        return (number > median).cast(pl.Int64), [f"<= {median:g}", f"> {median:g}"]
    if spec.kind == "classes":
        text = raw.cast(pl.String)
        counts = text.drop_nulls().value_counts(sort=True, name="n").sort(["n", column], descending=[True, False])
        keep = counts[column].head(spec.top_k).to_list()
        classes = keep + (["(other)"] if counts.height > len(keep) else [])
        index = {c: i for i, c in enumerate(classes)}
        return text.replace_strict(index, default=len(keep), return_dtype=pl.Int64).set(raw.is_null(), None), classes
    raise ValueError(f"not a static target kind: {spec.kind}")


def future_labels(
    spec, future: pl.DataFrame, user_ids: pl.Series, event_type_field: str | None,
    active: pl.Series | None = None, fixed_classes: list[str] | None = None,
) -> tuple[pl.Series, list[str], pl.Series | None]:
    """Labels computed from the events in the target window after the cutoff, their classes and (propensity_top) each user's values.

    spec.event_type restricts which window events count (e.g. only product_buy for the
    challenge's churn and propensity); spec.field must then be an event field. `active`
    (churn with spec.active_only): the users active in the history; the others get no label.
    `fixed_classes` (propensity_top): the organisers' classes, used instead of the window's top_k.
    """
    if spec.event_type is not None:
        if event_type_field is None:
            raise DataError(f"data.targets.{spec.name}: event_type {spec.event_type!r} given, but the schema has no event_type field")
        counted = future.filter(pl.col(event_type_field).cast(pl.String) == spec.event_type)
    else:
        counted = future
    in_window = counted["user_id"].unique()
    if spec.kind == "churn":
        label = (~user_ids.is_in(in_window.implode())).cast(pl.Int64)
        if active is not None:
            label = label.set(~user_ids.is_in(active.cast(pl.String).implode()), None)
        return label, ["active", "churned"], None
    if spec.field is None or spec.field not in future.columns:
        raise DataError(f"data.targets.{spec.name}: field {spec.field!r} is not an event field; fields are {future.columns}")
    values = counted.select("user_id", pl.col(spec.field).cast(pl.String).alias("value")).drop_nulls()
    if spec.kind == "propensity_top":
        per_user = values.group_by("user_id").agg(pl.col("value").unique().sort())
        lists = pl.DataFrame({"user_id": user_ids}).join(per_user, on="user_id", how="left", maintain_order="left")["value"]
        lists = lists.fill_null(pl.Series([[]], dtype=pl.List(pl.String)))
        classes = fixed_classes or top_values(lists, spec.top_k)
        if not classes:
            raise DataError(f"data.targets.{spec.name}: no {spec.field} values in the target window")
        matrix = label_matrix(lists, classes)
        return pl.Series(spec.name, matrix, dtype=pl.Array(pl.Int8, len(classes))), classes, None if fixed_classes else lists
    if spec.value is None:
        raise DataError(f"data.targets.{spec.name}: a propensity target needs field and value")
    hits = values.filter(pl.col("value") == str(spec.value))["user_id"].unique()
    label = user_ids.is_in(hits.implode()).cast(pl.Int64)
    return label.set(~user_ids.is_in(in_window.implode()), None), ["no", str(spec.value)], None


def top_values(lists: pl.Series, top_k: int) -> list[str]:
    """The top_k values held by most users of `lists` (List[String] per user), ties broken by value."""
    values = pl.DataFrame({"value": lists}).with_row_index("row").explode("value").drop_nulls("value")
    top = values.group_by("value").agg(pl.col("row").n_unique().alias("n")).sort(["n", "value"], descending=[True, False])
    return top["value"].head(top_k).to_list()


def label_matrix(lists: pl.Series, classes: list[str]) -> np.ndarray:
    """int8 [U, K]: 1 where user u's list holds classes[k]; a null list (unlabelled user) is a row of -1."""
    values = pl.DataFrame({"value": lists}).with_row_index("row").explode("value")
    hits = values.filter(pl.col("value").is_in(classes))
    matrix = np.zeros((len(lists), len(classes)), dtype=np.int8)
    cols = hits["value"].replace_strict(classes, range(len(classes)), return_dtype=pl.Int64).to_numpy()
    matrix[hits["row"].to_numpy(), cols] = 1
    matrix[lists.is_null().to_numpy()] = -1
    return matrix


def labelled_rows(labels: np.ndarray) -> np.ndarray:
    """bool [U]: the users with a label ([U] labels >= 0, or a [U, K] row without -1)."""
    labels = np.asarray(labels)
    return labels >= 0 if labels.ndim == 1 else (labels >= 0).all(axis=1)


def multilabel_for(target: Target, fit: np.ndarray) -> tuple[np.ndarray, list[str]]:
    """The [U, K] labels and classes a multi-label head uses: the fixed classes, or the top_k values among FIT users only."""
    if target.values is None:
        return target.labels, target.classes
    classes = top_values(target.values.filter(pl.Series(fit)), target.top_k)
    if not classes:
        raise ValueError(f"target {target.name!r}: the FIT users hold no value in the target window")
    return label_matrix(target.values, classes), classes


def only_users(label: pl.Series, user_ids: pl.Series, keep: list[str]) -> pl.Series:
    """`label` with every user outside `keep` unlabelled (null; a multi-label row of -1)."""
    outside = ~user_ids.is_in(pl.Series(keep, dtype=pl.String).implode())
    if isinstance(label.dtype, pl.Array):
        matrix = label.to_numpy().copy()
        matrix[outside.to_numpy()] = -1
        return pl.Series(label.name, matrix, dtype=label.dtype)
    return pl.select(pl.when(~outside).then(pl.lit(label))).to_series().alias(label.name)


def active_users(spec, past: pl.LazyFrame, event_type_field: str | None, listed: list[str] | None) -> pl.Series:
    """The churn population: the organisers' active clients `listed` when given, else users with >= 1 history event of spec.event_type."""
    if listed is not None:
        return pl.Series("user_id", listed, dtype=pl.String)
    if spec.event_type is not None:
        if event_type_field is None:
            raise DataError(f"data.targets.{spec.name}: event_type {spec.event_type!r} given, but the schema has no event_type field")
        past = past.filter(pl.col(event_type_field).cast(pl.String) == spec.event_type)
    return past.select(pl.col("user_id").unique()).collect().to_series()


def two_window_labels(
    spec, windows: tuple[pl.DataFrame, pl.DataFrame], user_ids: pl.Series, event_type_field: str | None,
    active: pl.Series | None, fixed_classes: list[str] | None, relevant: list[str] | None,
) -> tuple[pl.Series, pl.Series, list[str]]:
    """The challenge protocol's labels: (second window: scored, first window: fitted on, classes).

    propensity_top classes are the organisers' fixed ones, else the top_k values of the first window
    among the labelled (relevant) users: the side the heads fit on, never the scored window.
    """
    first, second = windows
    fit_label, names, values = future_labels(spec, first, user_ids, event_type_field, active, fixed_classes)
    if values is not None:
        if relevant is not None:
            values = only_users(values, user_ids, relevant)
        names = top_values(values, spec.top_k)
        if not names:
            raise DataError(f"data.targets.{spec.name}: no {spec.field} values in the first target window")
        fit_label = pl.Series(spec.name, label_matrix(values, names), dtype=pl.Array(pl.Int8, len(names)))
    label, _, _ = future_labels(spec, second, user_ids, event_type_field, active, names if spec.kind == "propensity_top" else None)
    if relevant is not None:
        fit_label = only_users(fit_label, user_ids, relevant)
    return label, fit_label, names
