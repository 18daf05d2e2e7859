"""Safe loading and no secrets: checkpoints weights_only, weights as safetensors, safe YAML, no keys in the repo or logged configs, sweep paths kept inside allowed roots."""

from __future__ import annotations

import ast
import os
import re
import subprocess
from pathlib import Path

import pytest
import yaml
from omegaconf import OmegaConf

from experiments.config import ConfigError, check_path_within

REPO = Path(__file__).resolve().parents[1]
WANDB_KEY = re.compile(r"(?<![0-9a-f])[0-9a-f]{40}(?![0-9a-f])")  # W&B API keys are 40 hex characters
HF_TOKEN = re.compile(r"hf_[A-Za-z0-9]{30,}")
TORCH_SAVE_ALLOWED = {"callbacks/resume.py"}  # Lightning training checkpoints (loaded back with weights_only=True)


def python_sources() -> list[Path]:
    files = subprocess.run(["git", "ls-files", "*.py"], cwd=REPO, capture_output=True, text=True, check=True).stdout.split()
    return [REPO / f for f in files if not f.startswith("tests/")]


def calls(tree: ast.AST, owner: str, name: str) -> list[ast.Call]:
    return [
        n for n in ast.walk(tree)
        if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute) and n.func.attr == name
        and isinstance(n.func.value, ast.Name) and n.func.value.id == owner
    ]  # fmt: skip


def keyword(call: ast.Call, name: str) -> object:
    for kw in call.keywords:
        if kw.arg == name and isinstance(kw.value, ast.Constant):
            return kw.value.value
    return None


def test_every_torch_load_is_weights_only_and_weights_are_not_pickled():
    sources = python_sources()
    assert len(sources) > 20
    loads = saves = 0
    for path in sources:
        tree = ast.parse(path.read_text())
        rel = str(path.relative_to(REPO))
        for call in calls(tree, "torch", "load"):
            loads += 1
            assert keyword(call, "weights_only") is True, f"{rel}:{call.lineno}: torch.load without weights_only=True"
        for call in calls(tree, "torch", "save"):
            saves += 1
            assert rel in TORCH_SAVE_ALLOWED, f"{rel}:{call.lineno}: torch.save; save weights with safetensors"
        for call in calls(tree, "np", "load"):
            assert keyword(call, "allow_pickle") is False, f"{rel}:{call.lineno}: np.load without allow_pickle=False"
        for call in calls(tree, "model", "save_pretrained"):
            assert keyword(call, "safe_serialization") in (None, True), f"{rel}:{call.lineno}: save_pretrained without safetensors"
        for owner in ("pickle", "yaml"):
            for name in ("load", "loads", "unsafe_load", "full_load"):
                assert not calls(tree, owner, name), f"{rel}: {owner}.{name}; use yaml.safe_load / OmegaConf.load"
    assert loads >= 1 and saves == 1


def test_run_loads_checkpoints_weights_only_and_saves_safetensors():
    source = (REPO / "experiments" / "run.py").read_text()
    assert "weights_only=True" in source.split("trainer.fit(")[1].split("\n")[0]  # resume: Lightning's load, weights_only
    assert "save_model(module" in source and "model.safetensors" in source


def test_yaml_is_read_with_a_safe_loader(tmp_path):
    from omegaconf._yaml import get_yaml_loader

    assert issubclass(get_yaml_loader(), (yaml.SafeLoader, getattr(yaml, "CSafeLoader", yaml.SafeLoader)))
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.yaml"
    evil.write_text(f"x: !!python/object/apply:os.system ['touch {marker}']\n")
    with pytest.raises(Exception, match="python/object"):
        OmegaConf.load(evil)
    with pytest.raises(yaml.YAMLError):
        yaml.safe_load(evil.read_text())
    assert not marker.exists()


def test_no_secrets_in_the_repository():
    files = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout.split()
    scanned = 0
    for f in files:
        path = REPO / f
        if not path.is_file() or path.stat().st_size > 5_000_000:
            continue
        text = path.read_bytes().decode("utf-8", errors="ignore")
        scanned += 1
        assert not WANDB_KEY.search(text), f"{f}: a 40-hex string (W&B API key pattern)"
        assert not HF_TOKEN.search(text), f"{f}: a Hugging Face token pattern"
    assert scanned > 50


def test_no_secrets_in_logged_configs(tmp_path, csv_data, monkeypatch):
    """A run with keys in its environment writes none of them to config.yaml, command.txt, metrics or the W&B run."""
    from experiments.run import main

    wandb_key, hf_token = "0123456789abcdef" * 2 + "01234567", "hf_" + "Ab1" * 12
    monkeypatch.setenv("WANDB_API_KEY", wandb_key)
    monkeypatch.setenv("HF_TOKEN", hf_token)
    events, labels = csv_data
    out = tmp_path / "out"
    code = main([
        "experiment=gru_ae_generic_csv", f"data.path={events}", f"data.labels.path={labels}", "data.schema.user=client",
        "data.schema.time=ts", "data.schema.fields=[{name: event_type}, {name: merchant}]", f"data.cache_dir={tmp_path / 'cache'}",
        f"output_dir={out}", "trainer.fast_dev_run=true", "probe.baselines=[]", "model.hidden=8", "model.emb_dim=4",
    ])  # fmt: skip
    assert code == 0
    logged = [p for p in out.rglob("*") if p.is_file() and p.suffix in (".yaml", ".json", ".txt", ".csv", ".wandb", ".log")]
    assert any(p.name == "config.yaml" for p in logged) and any(p.suffix == ".wandb" for p in logged)
    for p in logged:
        text = p.read_bytes().decode("utf-8", errors="ignore")
        assert wandb_key not in text and hf_token not in text, f"{p}: holds a key from the environment"
        assert not HF_TOKEN.search(text), p


def test_check_path_within(tmp_path):
    root = tmp_path / "data"
    (root / "sub").mkdir(parents=True)
    assert check_path_within(root / "sub" / "x.csv", [root], "data.path") == (root / "sub" / "x.csv").resolve()
    assert check_path_within(root, [root], "data.path") == root.resolve()
    with pytest.raises(ConfigError, match=r"data.path: .* outside the allowed folders"):
        check_path_within(root / ".." / "etc.csv", [root], "data.path")
    with pytest.raises(ConfigError, match="model.model_path"):
        check_path_within("/etc/passwd", [root, tmp_path / "models"], "model.model_path")
    os.symlink("/etc", root / "link")
    with pytest.raises(ConfigError, match="outside"):  # a symlink inside the root that points out of it
        check_path_within(root / "link" / "passwd", [root], "data.path")
    with pytest.raises(ConfigError, match="outside"):  # a sibling sharing the root's name as a prefix
        check_path_within(tmp_path / "data2" / "x", [root], "data.path")
