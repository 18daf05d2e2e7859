"""The method contract, checked for every registered method: registry, presets and constructors agree.

A config key whose default differs from the constructor's, a preset key the constructor
does not take, or a constructor argument no config key feeds fails here, not in a run.
"""

from __future__ import annotations

import dataclasses
import inspect

import pytest
import yaml

from experiments.build import constructor_args
from lit_modules.contract import EmbeddingMethod
from experiments.config import CONFIG_DIR, compose, presets
from lit_modules.registry import METHODS
from tests.helpers import data_args_for, experiment_source, unset_keys

TRAINED = [name for name, m in METHODS.items() if m.module is not None]


def config_keys(config: type) -> dict[str, dataclasses.Field]:
    """The config's keys that become constructor arguments: all but `name` and the DataModule's `data_keys`."""
    skip = {"name", *getattr(config, "data_keys", ())}
    return {f.name: f for f in dataclasses.fields(config) if f.name not in skip}


def default_of(f: dataclasses.Field):
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


def test_registry_presets_and_module_files_in_sync():
    used = {yaml.safe_load(p.read_text())["name"] for p in (CONFIG_DIR / "model").glob("*.yaml")}
    assert used == set(METHODS), "every registered method needs a model preset, and every preset a registered method"
    for name, method in METHODS.items():
        assert method.config().name == name
        assert method.config.inputs in ("events", "text", "instruct", "uqa", "runs")
        assert (method.module is None) == (method.config.inputs == "runs"), name
        if method.config.inputs in ("text", "instruct", "uqa"):
            assert set(method.config.data_keys) <= {f.name for f in dataclasses.fields(method.config)}


@pytest.mark.parametrize("name", TRAINED)
def test_config_keys_are_the_constructor_parameters_with_the_same_defaults(name):
    method = METHODS[name]
    cls = method.module_class()
    params = {k: p for k, p in inspect.signature(cls.__init__).parameters.items() if k != "self"}
    keys = config_keys(method.config)
    assert set(keys) <= set(params), f"config keys the constructor does not take: {sorted(set(keys) - set(params))}"
    for key, param in params.items():
        if key not in keys:  # only the data may supply it, so it has no default to disagree with
            assert param.default is inspect.Parameter.empty, f"{name}: {key!r} has a constructor default but no config key"
        elif param.default is not inspect.Parameter.empty:
            want, got = default_of(keys[key]), param.default
            if isinstance(want, list) and isinstance(got, tuple):
                got = list(got)
            assert want == got, f"{name}.{key}: config default {want!r}, constructor default {got!r}"


def experiments_by_model_preset() -> dict[str, str]:
    """An experiment for each model preset: the first committed one that names it (the data it was written for)."""
    out: dict[str, str] = {}
    for exp in presets("experiment"):
        raw = yaml.safe_load((CONFIG_DIR / "experiment" / f"{exp}.yaml").read_text())
        out.setdefault(raw["defaults"]["model"], exp)
    return out


def test_every_model_preset_has_data_to_build_on():
    assert set(experiments_by_model_preset()) == set(presets("model"))


@pytest.mark.parametrize("preset", [p for p in presets("model") if p != "ensemble"])
def test_every_model_preset_builds_and_reaches_the_module_unchanged(preset, csv_data, ml100k_cache, recsys_dir, tmp_path):
    """The preset's values are the module's hyperparameters (apart from fields the data resolves)."""
    from datamodules.config import DataConfig
    from datamodules.preprocess import prepare
    from experiments.config import to_dataclass
    from omegaconf import OmegaConf

    experiment = experiments_by_model_preset()[preset]
    data = data_args_for(experiment_source(experiment), csv_data, ml100k_cache, recsys_dir, tmp_path)
    raw = yaml.safe_load((CONFIG_DIR / "model" / f"{preset}.yaml").read_text())
    extra = []
    if raw.get("encoder_experiment"):  # UQAAlign reads a finished encoder run: a one-step one made here
        from experiments.run import run

        run(compose([f"experiment={raw['encoder_experiment']}", *data, "trainer.fast_dev_run=true", "logger.wandb=false", f"output_dir={tmp_path / 'out'}"]))
        extra = [f"model.output_dir={tmp_path / 'out'}"]
    cfg = compose([f"experiment={experiment}", f"model={preset}", *data, *(f"{k}=/dev/null" for k in unset_keys(raw, "model")), *extra])
    config = OmegaConf.to_object(cfg.model)
    prepared = prepare(to_dataclass(cfg.data, DataConfig), cfg.seed)
    kwargs = constructor_args(config, prepared)
    module = METHODS[config.name].module_class()(**kwargs)
    assert isinstance(module, EmbeddingMethod)
    resolved = set(getattr(config, "data_args", lambda _: {})(prepared))
    for key, value in raw.items():
        if key in config_keys(type(config)) and key not in resolved:
            got = module.hparams[key]
            assert (list(got) if isinstance(got, tuple) else got) == value, f"{preset}.{key}"


def test_the_worked_example_of_adding_a_method_runs(ml100k_cache, tmp_path, monkeypatch):
    """docs/adding_a_method.md's code, as printed there, registers, composes and trains one step: the doc cannot drift."""
    import re
    import sys

    import lightning.pytorch as L
    from omegaconf import OmegaConf

    from datamodules.config import DataConfig
    from datamodules.datamodule import EventDataModule
    from experiments.build import build_datamodule, build_module
    from experiments.config import to_dataclass

    doc = (CONFIG_DIR.parents[1] / "docs" / "adding_a_method.md").read_text()
    code = dict(zip(("config", "module", "registry"), re.findall(r"```python\n(.*?)```", doc, re.S)))
    package = tmp_path / "example"
    package.mkdir()
    (package / "mean_events_config.py").write_text(code["config"])
    (package / "mean_events.py").write_text(code["module"])
    monkeypatch.syspath_prepend(str(tmp_path))
    from example.mean_events_config import MeanEventsConfig  # noqa: E402

    line = code["registry"].strip().replace("lit_modules.mean_events", "example.mean_events")
    method = eval(line.split(": ", 1)[1].rstrip(","), {"Method": type(METHODS["gru_autoencoder"]), "MeanEventsConfig": MeanEventsConfig})
    monkeypatch.setitem(METHODS, "mean_events", method)
    test_config_keys_are_the_constructor_parameters_with_the_same_defaults("mean_events")

    preset = yaml.safe_load(re.findall(r"```yaml\n(.*?)```", doc, re.S)[0])
    config = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(MeanEventsConfig), {**preset, "dim": 8}))
    cfg = compose([f"data.cache_dir={ml100k_cache}"])
    events = EventDataModule(to_dataclass(cfg.data, DataConfig), seed=0)
    module = build_module(config, events.data)
    assert isinstance(module, EmbeddingMethod)
    trainer = L.Trainer(fast_dev_run=True, accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, datamodule=build_datamodule(config, events))
    assert "train/loss_last_event" in trainer.callback_metrics
    for name in ("example", "example.mean_events", "example.mean_events_config"):  # the next test's tmp_path is another folder
        sys.modules.pop(name, None)
