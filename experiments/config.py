"""Run configuration: dataclass defaults, YAML presets, `key=value` overrides. OmegaConf only.

Composition, later wins:
  1. the dataclass defaults below;
  2. group presets configs/{data,model,trainer}/NAME.yaml, chosen by the experiment's `defaults:`
     or on the command line as `data=NAME`, `model=NAME`, `trainer=NAME`;
  3. the experiment file configs/experiment/NAME.yaml (chosen by `experiment=NAME`);
  4. `key=value` overrides (OmegaConf dotlist syntax).
Every key is checked against the dataclasses before merging: an unknown key is an error
naming it and the nearest valid key.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import inspect
import typing
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from datamodules.config import DataConfig
from evaluation.baselines import BASELINES
from evaluation.splits import DEFAULT_FRACTIONS, check_fractions
from experiments.overrides import dataclass_of, field_types, typed_dotlist
from lit_modules.registry import METHODS

CONFIG_DIR = Path(__file__).parent / "configs"
GROUPS = ("data", "model", "trainer")
DEFAULT_EXPERIMENT = "gru_ae_ml100k"
NONFINITE_MODES = ("error", "skip")  # callbacks.nonfinite.MODES, without importing torch here


class ConfigError(ValueError):
    """A config that cannot run; the message names the key."""


@dataclass
class TrainerConfig:
    """Lightning Trainer settings."""

    max_epochs: int = 10
    """Epochs of training."""
    accelerator: str = "cpu"
    """cpu | gpu | auto."""
    devices: Any = 1
    """Devices per node (int or 'auto')."""
    strategy: str = "auto"
    """auto | ddp | fsdp | ..."""
    num_nodes: int = 1
    """Machines."""
    precision: str = "32-true"
    """32-true | bf16-mixed | 16-mixed."""
    gradient_clip_val: float | None = None
    """Clip gradient norm to this value."""
    early_stopping_patience: int | None = 3
    """Stop after this many epochs without a better val/loss (null: never)."""
    fast_dev_run: bool = False
    """One batch of train and val, then the probe: a smoke test."""
    limit_train_batches: float = 1.0
    """Fraction (or count, if > 1) of train batches per epoch."""
    limit_val_batches: float = 1.0
    """Fraction (or count, if > 1) of val batches per epoch."""
    log_every_n_steps: int = 10
    """Logging interval in steps."""
    deterministic: bool = True
    """Deterministic algorithms (reproducible runs)."""
    checkpoint_every_n_steps: int | None = None
    """Also write checkpoints/last.ckpt every N optimizer steps, so resume=true loses at most N steps (null: every epoch)."""
    on_nonfinite: str = "error"
    """A NaN/inf loss or gradient: error (stop, naming step, users and loss parts; exit code 3) | skip (skip the batch, count it)."""


@dataclass
class DownstreamConfig:
    """The RecSys Challenge 2025 fixed MLP for multi-label targets (paper: width 2048, 3 blocks)."""

    width: int = 256
    """Hidden width W."""
    blocks: int = 3
    """Residual inverted-bottleneck blocks."""
    epochs: int = 3
    """Epochs; the best one on the VAL users is kept."""
    lr: float = 1e-3
    """AdamW learning rate."""
    batch_size: int = 128
    """Users per batch."""


@dataclass
class ProbeConfig:
    """Linear-probe evaluation of the embeddings."""

    split: list[float] = field(default_factory=lambda: list(DEFAULT_FRACTIONS))
    """Each target's users as [FIT, VAL, TEST] fractions (stratified, seeded): heads train on FIT, selection reads VAL, tables report TEST."""
    C: float | None = None
    """Inverse L2 strength of the logistic regression (null: chosen per target by 5-fold CV on the FIT users)."""
    max_iter: int = 1000
    """Logistic regression iterations."""
    every_n_epochs: int | None = None
    """Also probe (VAL users only) after every N-th validation epoch (null: only at the end)."""
    baselines: list[str] = field(default_factory=lambda: list(BASELINES))
    """Rows probed the same way for comparison: handcrafted, random."""
    downstream: DownstreamConfig = field(default_factory=DownstreamConfig)
    """The fixed downstream MLP used for multi-label (propensity) targets."""


def check_probe(probe: Any) -> None:
    """ConfigError naming the key for a bad probe.split or an unknown probe.baselines entry."""
    try:
        check_fractions(probe.split)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    unknown = [b for b in probe.baselines if b not in BASELINES]
    if unknown:
        raise ConfigError(f"probe.baselines: unknown baseline {unknown[0]!r}; choose from {BASELINES}")


@dataclass
class LoggerConfig:
    """Where metrics go. W&B runs offline unless WANDB_MODE=online is set."""

    wandb: bool = True
    """Log to Weights & Biases (offline files under the run directory by default)."""
    project: str = "event-embeddings"
    """W&B project."""
    entity: str | None = None
    """W&B entity (team)."""
    group: str | None = None
    """W&B group (sweeps set it to the study name)."""
    tags: list[str] = field(default_factory=list)
    """W&B tags."""
    csv: bool = True
    """Also write metrics to csv/metrics.csv in the run directory."""


@dataclass
class RunConfig:
    """One run: data, method, trainer, evaluation, logging."""

    experiment: str = DEFAULT_EXPERIMENT
    """Experiment preset (configs/experiment/NAME.yaml)."""
    seed: int = 0
    """Seed of everything: splits, init, batches."""
    run_name: str | None = None
    """Run directory name (default: a timestamp)."""
    output_dir: str = "outputs"
    """Runs land in output_dir/experiment/run_name/."""
    resume: Any = None
    """true: continue the newest unfinished run of this experiment from its checkpoints/last.ckpt; or a run directory."""
    export_submission: bool = False
    """recsys2025: also write submission/client_ids.npy + embeddings.npy (float16) for the relevant clients."""
    data: DataConfig = field(default_factory=DataConfig)
    """Data source and preprocessing."""
    model: Any = None
    """Method config: see the model keys below."""
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    """Lightning Trainer."""
    probe: ProbeConfig = field(default_factory=ProbeConfig)
    """Evaluation."""
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    """Loggers."""


def presets(group: str) -> list[str]:
    return sorted(p.stem for p in (CONFIG_DIR / group).glob("*.yaml"))


def load_yaml(group: str, name: str) -> dict:
    path = CONFIG_DIR / group / f"{name}.yaml"
    if not path.is_file():
        choices = presets(group)
        near = difflib.get_close_matches(name, choices, n=1)
        hint = f"; did you mean {near[0]!r}?" if near else ""
        raise ConfigError(f"{group}={name}: no such preset; choose from {choices}{hint}")
    try:
        loaded = OmegaConf.to_container(OmegaConf.load(path))
    except OmegaConfBaseException as err:
        raise ConfigError(f"{path}: {err}") from None
    if not isinstance(loaded, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    return loaded


def split_words(words: list[str], name_key: str, option_keys: Collection[str]) -> tuple[str | None, dict[str, str], list[str]]:
    """`key=value` words -> the value of `name_key`, the `option_keys` given, the rest (dotlist overrides).

    Shared by experiments.run and sweeps.run, so both command lines read words alike.
    """
    name, options, overrides = None, {}, []
    for word in words:
        if "=" not in word:
            raise ConfigError(f"{word!r}: expected key=value (see --help)")
        key, value = word.split("=", 1)
        if key == name_key:
            name = value
        elif key in option_keys:
            options[key] = value
        else:
            overrides.append(word)
    return name, options, overrides


def parse_args(args: list[str]) -> tuple[str | None, dict[str, str], list[str]]:
    """Split command-line words into the experiment choice, group choices and dotlist overrides."""
    return split_words(args, "experiment", GROUPS)


def check_keys(values: Any, cls: type, prefix: str) -> None:
    """Every key in `values` must be a field of `cls` (recursively); raise naming the nearest one."""
    if not isinstance(values, dict):
        return
    types = field_types(cls)
    for key, value in values.items():
        if key not in types:
            near = difflib.get_close_matches(str(key), list(types), n=1)
            hint = f"; did you mean '{prefix}{near[0]}'?" if near else f"; valid keys: {sorted(types)}"
            raise ConfigError(f"unknown config key '{prefix}{key}'{hint}")
        tp = types[key]
        inner = dataclass_of(tp)
        if inner is not None:
            check_keys(value, inner, f"{prefix}{key}.")
        elif typing.get_origin(tp) is list and isinstance(value, list):
            (item,) = typing.get_args(tp) or (Any,)
            inner = dataclass_of(item)
            if inner is not None:
                for i, elem in enumerate(value):
                    check_keys(elem, inner, f"{prefix}{key}.{i}.")


def missing_keys(values: Any, prefix: str = "") -> list[str]:
    """Keys left at OmegaConf's '???' (a preset's way of saying: you must set this)."""
    if isinstance(values, dict):
        return [k for key, v in values.items() for k in missing_keys(v, f"{prefix}{key}.")]
    return [prefix.rstrip(".")] if values == "???" else []


def model_choice(layers: list[dict], overrides: list[str]) -> str | None:
    """The method name the composed config will have: the last `model.name=` word, else the last layer's."""
    for word in reversed(overrides):
        if word.startswith("model.name="):
            return word.split("=", 1)[1]
    names = [(layer.get("model") or {}).get("name") for layer in layers if isinstance(layer.get("model"), dict)]
    names = [n for n in names if n]
    return names[-1] if names else None


def compose(args: list[str]) -> DictConfig:
    """The fully resolved, validated run config for these command-line words."""
    experiment, groups, overrides = parse_args(args)
    name = experiment or DEFAULT_EXPERIMENT
    body = load_yaml("experiment", name)
    chosen = dict(body.pop("defaults", None) or {})
    unknown = set(chosen) - set(GROUPS)
    if unknown:
        raise ConfigError(f"configs/experiment/{name}.yaml: defaults may only choose {GROUPS}, not {sorted(unknown)}")
    chosen.update(groups)
    layers = [{group: load_yaml(group, preset)} for group, preset in chosen.items()]
    layers.append(body)
    try:
        method = METHODS.get(model_choice(layers, overrides))
        layers.append(OmegaConf.to_container(typed_dotlist(overrides, RunConfig, method.config if method else None)))
        merged = OmegaConf.to_container(OmegaConf.merge(*[OmegaConf.create(x) for x in layers]))
    except OmegaConfBaseException as err:
        raise ConfigError(str(err).splitlines()[0]) from None
    except ValueError as err:
        raise ConfigError(str(err)) from None
    merged["experiment"] = name

    model = merged.pop("model", None) or {}
    check_keys(merged, RunConfig, "")
    model_name = model.get("name")
    if model_name not in METHODS:
        near = difflib.get_close_matches(str(model_name), list(METHODS), n=1)
        hint = f"; did you mean {near[0]!r}?" if near else ""
        raise ConfigError(f"model.name: {model_name!r} is not a registered method {sorted(METHODS)}{hint}")
    method_config = METHODS[model_name].config
    check_keys(model, method_config, "model.")
    missing = missing_keys({**merged, "model": model})
    if missing:
        raise ConfigError(f"required config key {missing[0]!r} has no value; set it with {missing[0]}=...")
    try:
        cfg = OmegaConf.merge(OmegaConf.structured(RunConfig), merged)
        cfg.model = OmegaConf.merge(OmegaConf.structured(method_config), model)
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", None)
        raise ConfigError((f"{key}: " if key else "") + str(err).splitlines()[0]) from None
    try:  # the method's own checks (its config's __post_init__)
        OmegaConf.to_object(cfg.model)
    except ValueError as err:
        raise ConfigError(f"model ({model_name}): {err}") from None
    if cfg.trainer.on_nonfinite not in NONFINITE_MODES:
        raise ConfigError(f"trainer.on_nonfinite: {cfg.trainer.on_nonfinite!r}; choose from {NONFINITE_MODES}")
    check_probe(cfg.probe)
    OmegaConf.set_readonly(cfg, True)
    return cfg


def check_path_within(path: str | Path, roots: list[str | Path], key: str) -> Path:
    """`path` resolved (user, `..`, symlinks); a ConfigError naming `key` unless it lies inside one of `roots`.

    For path values that do not come from the person running the command, e.g. sweep
    parameters: a sweep must not read or write outside the folders it was given.
    """
    resolved = Path(path).expanduser().resolve()
    allowed = [Path(r).expanduser().resolve() for r in roots]
    if not any(resolved == root or resolved.is_relative_to(root) for root in allowed):
        raise ConfigError(f"{key}: {path} resolves to {resolved}, outside the allowed folders {[str(r) for r in allowed]}")
    return resolved


def to_dataclass(cfg: DictConfig, cls: type) -> Any:
    """A section as its dataclass (lists of nested dataclasses included)."""
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(cls), cfg))


def attribute_docs(cls: type) -> dict[str, str]:
    """The string literal under each field of a dataclass: the source of --help."""
    tree = ast.parse(inspect.getsource(cls))
    body = tree.body[0].body
    docs = {}
    for node, nxt in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant):
            docs[node.target.id] = " ".join(str(nxt.value.value).split())
    return docs


def describe(cls: type, prefix: str = "") -> list[str]:
    lines = []
    docs = attribute_docs(cls)
    for f in dataclasses.fields(cls):
        tp = field_types(cls)[f.name]
        inner = dataclass_of(tp)
        if inner is not None and f.name != "model":
            lines += describe(inner, f"{prefix}{f.name}.")
            continue
        default = f.default if f.default is not dataclasses.MISSING else (f.default_factory() if f.default_factory is not dataclasses.MISSING else "")
        lines.append(f"  {prefix + f.name:<34} {str(default)[:28]:<28} {docs.get(f.name, '')}")
    return lines


def help_text() -> str:
    experiments = []
    for name in presets("experiment"):
        first = (CONFIG_DIR / "experiment" / f"{name}.yaml").read_text().splitlines()[0]
        experiments.append(f"  {name:<28} {first.lstrip('# ') if first.startswith('#') else ''}")
    out = [
        "usage: python -m experiments.run [experiment=NAME] [data=P] [model=P] [trainer=P] [key=value ...]",
        "",
        "Trains a method, embeds every user, probes the embeddings (ROC-AUC, KS) and writes",
        "outputs/<experiment>/<run>/ (config.yaml, metrics.json, embeddings.parquet, checkpoints/, wandb/).",
        "",
        f"experiments (default {DEFAULT_EXPERIMENT}):",
        *experiments,
        "",
        *[f"{g} presets: {', '.join(presets(g))}" for g in GROUPS],
        "",
        "keys (default, meaning):",
        *describe(RunConfig),
    ]
    for name, method in METHODS.items():
        out += ["", f"model keys of {name}:", *describe(method.config, "model.")]
    return "\n".join(out)
