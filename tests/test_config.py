"""Config composition: presets, overrides, unknown keys, --help without heavy imports."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from experiments.config import CONFIG_DIR, ConfigError, compose, presets
from lit_modules.registry import METHODS
from tests.helpers import experiment_section, unset_keys

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", presets("experiment"))
def test_every_experiment_composes(name):
    unset = unset_keys(experiment_section(name, "data"), "data") + unset_keys(experiment_section(name, "model"), "model")
    cfg = compose([f"experiment={name}", *(f"{key}=/dev/null" for key in unset)])  # what the user must name
    assert cfg.experiment == name and cfg.model.name in METHODS


@pytest.mark.parametrize("name", presets("model"))
def test_every_model_preset_names_a_registered_method(name):
    raw = yaml.safe_load((CONFIG_DIR / "model" / f"{name}.yaml").read_text())
    assert raw["name"] in METHODS
    cfg = compose([f"model={name}", *(f"{key}=/dev/null" for key in unset_keys(raw, "model"))])
    assert cfg.model.name == raw["name"]


def test_precedence_preset_then_experiment_then_cli():
    assert compose([]).trainer.max_epochs == yaml.safe_load((CONFIG_DIR / "trainer" / "cpu.yaml").read_text())["max_epochs"]
    assert compose(["trainer.max_epochs=3"]).trainer.max_epochs == 3
    assert compose(["model=gru_ae_all"]).model.time == "none"
    assert compose(["model=gru_ae_all", "model.hidden=8"]).model.hidden == 8


@pytest.mark.parametrize(
    "args, message",
    [
        (["model.hiden=3"], "unknown config key 'model.hiden'; did you mean 'model.hidden'?"),
        (["data.batchsize=3"], "did you mean 'data.batch_size'?"),
        (["trainr.max_epochs=3"], "did you mean 'trainer'?"),
        (["data.targets=[{name: a, knd: binary}]"], "unknown config key 'data.targets.0.knd'; did you mean 'data.targets.0.kind'?"),
        (["experiment=gru_ae_ml10k"], "did you mean 'gru_ae_ml100k'?"),
        (["model=gru_ae_al"], "did you mean 'gru_ae_all'?"),
        (["model.name=gru_autoencodr"], "did you mean 'gru_autoencoder'?"),
        (["trainer.max_epochs=abc"], "trainer.max_epochs"),
        (["experiment=gru_ae_generic_csv"], "'data.path' has no value"),
        (["max_epochs"], "expected key=value"),
    ],
)
def test_bad_configs_name_the_key(args, message):
    with pytest.raises(ConfigError) as info:
        compose(args)
    assert message in str(info.value)


def test_help_is_fast_and_imports_nothing_heavy():
    code = (
        "import sys, io, contextlib\n"
        "from experiments.run import main\n"
        "out = io.StringIO()\n"
        "with contextlib.redirect_stdout(out): rc = main(['--help'])\n"
        "heavy = [m for m in ('torch', 'lightning', 'wandb', 'transformers', 'sklearn') if m in sys.modules]\n"
        "print(rc, heavy, 'model.hidden' in out.getvalue(), 'gru_ae_ml100k' in out.getvalue())\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "0 [] True True"


def test_config_error_exit_code_and_message():
    result = subprocess.run([sys.executable, "-m", "experiments.run", "model.hiden=3"], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 2
    assert "config error: unknown config key 'model.hiden'; did you mean 'model.hidden'?" in result.stderr


@pytest.mark.parametrize(
    ("word", "key", "expected"),
    [
        ("run_name=off", "run_name", "off"),  # YAML would read a boolean
        ("run_name=yes", "run_name", "yes"),
        ("data.schema.time_format=%Y%m%d", "data.schema.time_format", "%Y%m%d"),  # YAML would fail on the %
        ("data.schema.time_format=null", "data.schema.time_format", None),  # an optional string can still be unset
        ("data.cutoff=1998-03-01", "data.cutoff", "1998-03-01"),  # not a YAML date
        ("data.max_len=64", "data.max_len", 64),
        ("data.event_types=[page_visit]", "data.event_types", ["page_visit"]),
        ("data.field_top_k.url=300", "data.field_top_k.url", 300),
        ("model.decoder_input=concat", "model.decoder_input", "concat"),  # a method key, typed by the method config
    ],
)
def test_command_line_values_follow_the_declared_type(word, key, expected):
    from omegaconf import OmegaConf

    cfg = compose(["experiment=gru_ae_ml100k", word])
    value = OmegaConf.select(cfg, key)
    assert (OmegaConf.to_container(value) if OmegaConf.is_config(value) else value) == expected


def test_a_value_that_is_not_yaml_says_how_to_quote_it():
    with pytest.raises(ConfigError, match=r"""data.max_len=%5: not a valid YAML value .*quote it inside the word, e.g. 'data.max_len="%5"'"""):
        compose(["data.max_len=%5"])


def test_embed_command_keeps_string_values():
    from experiments.embed import parse

    cfg = parse(["run=outputs/x/off", "out=yes", "until=2022-06-01"])
    assert (cfg.run, cfg.out, cfg.until) == ("outputs/x/off", "yes", "2022-06-01")
