"""Benchmarks and sequence encoders by name.

A benchmark is a function `(scale, repeats, out_dir) -> Report`; `@benchmark("name")` registers it and
`python -m benchmarks.run name` runs it. Sequence encoders register with `@encoder("name")`
(a factory `(vocab_sizes, fields, max_len) -> module with embed(batch) and losses(batch)`),
and the inference and scaling benchmarks measure every registered encoder, so a new method
joins the harness by adding one factory.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# Modules whose import registers benchmarks and encoders (imported lazily by `load_all`).
MODULES = (
    "benchmarks.encoders",
    "benchmarks.preprocess",
    "benchmarks.loading",
    "benchmarks.training",
    "benchmarks.inference",
    "benchmarks.llm",
    "benchmarks.scaling",
    "benchmarks.embedding",
)


@dataclass
class Report:
    """What a benchmark hands back: parameters, one dict per table row, and targets met or missed."""

    parameters: dict[str, Any]
    rows: list[dict[str, Any]]
    targets: list[dict[str, Any]] = field(default_factory=list)  # {"target", "measured", "met"}
    notes: list[str] = field(default_factory=list)
    plots: list[str] = field(default_factory=list)


BENCHMARKS: dict[str, Callable[[float, int, Path], Report]] = {}
ENCODERS: dict[str, Callable[..., Any]] = {}


def registrar(table: dict[str, Callable[..., Any]], what: str, name: str) -> Callable:
    """A decorator that files a function under `name` in `table`; a name registered twice is an error."""

    def register(fn: Callable[..., Any]) -> Callable[..., Any]:
        if name in table:
            raise ValueError(f"{what} {name!r} registered twice")
        table[name] = fn
        return fn

    return register


def benchmark(name: str) -> Callable:
    return registrar(BENCHMARKS, "benchmark", name)


def encoder(name: str) -> Callable:
    return registrar(ENCODERS, "encoder", name)


def load_all() -> None:
    for module in MODULES:
        importlib.import_module(module)
