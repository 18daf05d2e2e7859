"""A sweep YAML (sweeps/configs/NAME.yaml) as validated dataclasses.

The sweep file says what to tune and how; it never repeats the experiment's config. Every
key is checked here (unknown ones are errors naming the nearest valid key), so a typo
fails before a study or a run directory exists.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from experiments.config import ConfigError

CONFIG_DIR = Path(__file__).parent / "configs"
PARAM_TYPES = ("float", "int", "categorical")
PRUNERS = ("median", "hyperband", "none")
SAMPLERS = ("tpe", "random")
PATH_SUFFIXES = ("path", "_dir")
MEAN_AUC = "probe_val/mean_auc"
TEST_GROUPS = ("probe_test/", "downstream_test/")  # metrics of TEST users: reported, never an objective
SWEEP_KEYS = ("n_trials", "storage", "study", "max_retries", "sweeps_dir")  # command-line keys that are not run-config keys


@dataclass
class Objective:
    metric: str = "probe_val/mean_auc"
    """probe_val/mean_auc (mean of probe_val/<t>/auc over the targets), probe_val/<target>/auc, or val/loss: VAL users only."""
    direction: str = "maximize"
    """maximize | minimize."""


@dataclass
class Param:
    type: str
    """float | int | categorical."""
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    choices: list | None = None
    """categorical: scalars, null, or lists (e.g. a field subset), passed to the run as written."""
    condition: dict[str, list] | None = None
    """{other_param: [values]}: sampled only when the earlier param took one of these values."""


@dataclass
class Sampler:
    name: str = "tpe"
    seed: int = 0
    n_startup_trials: int = 3
    """TPE: random trials before the model kicks in."""


@dataclass
class Pruner:
    name: str = "median"
    params: dict[str, Any] = field(default_factory=dict)
    """Keyword arguments of optuna's MedianPruner / HyperbandPruner."""


@dataclass
class SweepSpec:
    name: str
    """Study name (default: the file name); also the W&B group and the folder under outputs/sweeps/."""
    experiment: str
    """Experiment preset every trial runs (experiments/configs/experiment/NAME.yaml)."""
    objective: Objective = field(default_factory=Objective)
    space: dict[str, Param] = field(default_factory=dict)
    """Run-config key (e.g. model.hidden) -> its search range."""
    overrides: dict[str, Any] = field(default_factory=dict)
    """Fixed run-config keys for every trial (e.g. trainer.max_epochs: 8)."""
    sampler: Sampler = field(default_factory=Sampler)
    pruner: Pruner = field(default_factory=Pruner)
    n_trials: int = 20
    """Trials that must end COMPLETE or PRUNED (a trial that errored counts too, an interrupted one does not)."""
    max_retries: int = 2
    """How often an interrupted trial is re-run with the same parameters."""


def _check_keys(values: dict, cls: type, where: str) -> None:
    names = [f.name for f in fields(cls)]
    for key in values:
        if key not in names:
            near = difflib.get_close_matches(str(key), names, n=1)
            hint = f"; did you mean '{near[0]}'?" if near else f"; valid keys: {names}"
            raise ConfigError(f"{where}: unknown key '{key}'{hint}")


def _section(raw: Any, cls: type, where: str) -> Any:
    if raw is None:
        return cls()
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a mapping, got {raw!r}")
    _check_keys(raw, cls, where)
    return cls(**raw)


def _check_not_path(key: str, where: str) -> None:
    """Trials must not point runs at arbitrary files; path-valued keys are fixed in the experiment instead."""
    leaf = key.rsplit(".", 1)[-1]
    if leaf.endswith(PATH_SUFFIXES) or key.split(".", 1)[0] == "output_dir":
        raise ConfigError(f"{where}: '{key}' is path-valued; sweeps do not search or override paths (set it in the experiment)")


def parse_param(key: str, raw: Any, earlier: dict[str, Param], where: str) -> Param:
    where = f"{where}: space.{key}"
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a mapping with 'type', got {raw!r}")
    _check_keys(raw, Param, where)
    if "type" not in raw:
        raise ConfigError(f"{where}: missing 'type' (one of {PARAM_TYPES})")
    p = Param(**raw)
    if p.type not in PARAM_TYPES:
        raise ConfigError(f"{where}: type {p.type!r} is not one of {PARAM_TYPES}")
    if p.type == "categorical":
        if not p.choices or not isinstance(p.choices, list):
            raise ConfigError(f"{where}: categorical needs a non-empty 'choices' list")
        if p.low is not None or p.high is not None or p.log:
            raise ConfigError(f"{where}: categorical takes 'choices', not low/high/log")
        labels = [choice_label(c) for c in p.choices]
        if len(set(labels)) != len(labels):
            raise ConfigError(f"{where}: repeated choices {labels}")
    else:
        if p.low is None or p.high is None:
            raise ConfigError(f"{where}: {p.type} needs 'low' and 'high'")
        if p.choices is not None:
            raise ConfigError(f"{where}: {p.type} takes low/high, not 'choices'")
        if not p.low < p.high:
            raise ConfigError(f"{where}: low ({p.low}) must be below high ({p.high})")
        if p.log and p.low <= 0:
            raise ConfigError(f"{where}: log scale needs low > 0, got {p.low}")
        if p.log and p.step is not None:
            raise ConfigError(f"{where}: 'step' and 'log' cannot be combined (optuna)")
        if p.type == "int" and (int(p.low) != p.low or int(p.high) != p.high):
            raise ConfigError(f"{where}: int bounds must be whole numbers, got {p.low}..{p.high}")
    if p.condition is not None:
        if not isinstance(p.condition, dict) or not p.condition:
            raise ConfigError(f"{where}: condition must map an earlier parameter to its allowed values")
        for other, allowed in p.condition.items():
            if other not in earlier:
                raise ConfigError(f"{where}: condition names '{other}', which is not a parameter listed before it")
            if not isinstance(allowed, list):
                p.condition[other] = [allowed]
    return p


def choice_label(value: Any) -> Any:
    """What optuna stores for a categorical choice: scalars as they are, a list as its YAML flow text."""
    if isinstance(value, (list, dict)):
        return yaml.safe_dump(value, default_flow_style=True, width=10_000).strip()
    if value is not None and not isinstance(value, (bool, int, float, str)):
        raise ConfigError(f"categorical choice {value!r}: use a scalar, null or a list")
    return value


def parse_spec(raw: Any, name: str, where: str) -> SweepSpec:
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a mapping at the top level")
    _check_keys(raw, SweepSpec, where)
    if "experiment" not in raw:
        raise ConfigError(f"{where}: missing 'experiment' (an experiment preset every trial runs)")
    body = dict(raw)
    objective = _section(body.pop("objective", None), Objective, f"{where}: objective")
    if objective.direction not in ("maximize", "minimize"):
        raise ConfigError(f"{where}: objective.direction must be maximize or minimize, not {objective.direction!r}")
    m = str(objective.metric)
    if m.startswith(TEST_GROUPS):
        raise ConfigError(f"{where}: objective.metric {m!r}: TEST metrics are only reported, never selected on; use probe_val/...")
    if not (m in (MEAN_AUC, "val/loss") or (m.startswith("probe_val/") and m.endswith("/auc") and m.count("/") == 2)):
        raise ConfigError(f"{where}: objective.metric {m!r}: use {MEAN_AUC}, probe_val/<target>/auc or val/loss")
    sampler = _section(body.pop("sampler", None), Sampler, f"{where}: sampler")
    if sampler.name not in SAMPLERS:
        raise ConfigError(f"{where}: sampler.name {sampler.name!r} is not one of {SAMPLERS}")
    pruner = _section(body.pop("pruner", None), Pruner, f"{where}: pruner")
    if pruner.name not in PRUNERS:
        raise ConfigError(f"{where}: pruner.name {pruner.name!r} is not one of {PRUNERS}")
    space_raw = body.pop("space", None) or {}
    if not isinstance(space_raw, dict) or not space_raw:
        raise ConfigError(f"{where}: 'space' must map run-config keys to parameter ranges")
    space: dict[str, Param] = {}
    for key, value in space_raw.items():
        _check_not_path(str(key), f"{where}: space")
        space[str(key)] = parse_param(str(key), value, space, where)
    overrides = body.pop("overrides", None) or {}
    if not isinstance(overrides, dict):
        raise ConfigError(f"{where}: overrides must be a mapping of run-config keys to values")
    for key in overrides:
        if key in space:
            raise ConfigError(f"{where}: '{key}' is both searched (space) and fixed (overrides)")
    spec = SweepSpec(
        name=str(body.pop("name", name)), objective=objective, space=space, overrides=overrides,
        sampler=sampler, pruner=pruner, **body,
    )
    if not isinstance(spec.n_trials, int) or spec.n_trials < 1:
        raise ConfigError(f"{where}: n_trials must be a positive integer, got {spec.n_trials!r}")
    if not isinstance(spec.max_retries, int) or spec.max_retries < 0:
        raise ConfigError(f"{where}: max_retries must be an integer >= 0, got {spec.max_retries!r}")
    return spec


def presets() -> list[str]:
    return sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))


def load_spec(name: str) -> SweepSpec:
    """sweeps/configs/NAME.yaml, or a path to a sweep YAML file."""
    path = Path(name) if name.endswith((".yaml", ".yml")) else CONFIG_DIR / f"{name}.yaml"
    if not path.is_file():
        near = difflib.get_close_matches(name, presets(), n=1)
        hint = f"; did you mean {near[0]!r}?" if near else ""
        raise ConfigError(f"sweep={name}: no such sweep; choose from {presets()} or give a .yaml path{hint}")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: {err}") from None
    return parse_spec(raw, path.stem, str(path))
