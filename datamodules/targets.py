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
    """One probe target. labels[u] is the class of store row u (-1: no label for that user)."""

    name: str
    kind: str  # one of PROBE_KINDS or MULTILABEL
    labels: np.ndarray  # int64 [U]; multilabel: int8 [U, K] (one column per class)
    classes: list[str]  # class names; label k is classes[k] (binary: [negative, positive])


# Config kinds (data.targets[].kind): the only list; preprocessing and the config help refer to it.
STATIC_KINDS = ("binary", "above_median", "classes")  # from a labels table
FUTURE_KINDS = ("churn", "propensity", "propensity_top")  # from the window after the cutoff
KINDS = STATIC_KINDS + FUTURE_KINDS
MULTILABEL_KINDS = ("propensity_top",)  # config kinds whose labels are [U, K]
# Evaluation kinds (Target.kind): the linear probe takes PROBE_KINDS, the downstream MLP MULTILABEL.
PROBE_KINDS = ("binary", "multiclass")
MULTILABEL = "multilabel"


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


def future_labels(spec, future: pl.DataFrame, user_ids: pl.Series, event_type_field: str | None) -> tuple[pl.Series, list[str]]:
    """Labels computed from the events in the target window after the cutoff.

    spec.event_type restricts which window events count (e.g. only product_buy for the
    challenge's churn and propensity); spec.field must then be an event field.
    """
    if spec.event_type is not None:
        if event_type_field is None:
            raise DataError(f"data.targets.{spec.name}: event_type {spec.event_type!r} given, but the schema has no event_type field")
        counted = future.filter(pl.col(event_type_field).cast(pl.String) == spec.event_type)
    else:
        counted = future
    active = counted["user_id"].unique()
    if spec.kind == "churn":
        return (~user_ids.is_in(active.implode())).cast(pl.Int64), ["active", "churned"]
    if spec.field is None or spec.field not in future.columns:
        raise DataError(f"data.targets.{spec.name}: field {spec.field!r} is not an event field; fields are {future.columns}")
    values = counted.select("user_id", pl.col(spec.field).cast(pl.String).alias("value")).drop_nulls()
    if spec.kind == "propensity_top":
        top = values.group_by("value").agg(pl.col("user_id").n_unique().alias("n")).sort(["n", "value"], descending=[True, False])
        classes = top["value"].head(spec.top_k).to_list()
        if not classes:
            raise DataError(f"data.targets.{spec.name}: no {spec.field} values in the target window")
        rows = pl.DataFrame({"user_id": user_ids, "row": np.arange(len(user_ids))})
        hits = (
            values.filter(pl.col("value").is_in(classes))
            .join(rows, on="user_id")
            .select("row", pl.col("value").replace_strict(classes, range(len(classes)), return_dtype=pl.Int64).alias("col"))
        )
        matrix = np.zeros((len(user_ids), len(classes)), dtype=np.int8)
        matrix[hits["row"].to_numpy(), hits["col"].to_numpy()] = 1
        return pl.Series(spec.name, matrix, dtype=pl.Array(pl.Int8, len(classes))), classes
    if spec.value is None:
        raise DataError(f"data.targets.{spec.name}: a propensity target needs field and value")
    hits = values.filter(pl.col("value") == str(spec.value))["user_id"].unique()
    label = user_ids.is_in(hits.implode()).cast(pl.Int64)
    return label.set(~user_ids.is_in(active.implode()), None), ["no", str(spec.value)]
