"""Methods by name: each one's config dataclass and where its LightningModule lives.

A table and nothing else. Torch-free: the config classes are imported here, the module
class only when a run builds it (`Method.module_class`). tests/test_methods.py keeps this
table, the module classes and experiments/configs/model/*.yaml in sync.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

from experiments.ensemble import EnsembleConfig
from lit_modules.gru_autoencoder_config import GRUAutoencoderConfig
from lit_modules.ials_config import IALSConfig
from lit_modules.instruct_ue_config import InstructUEConfig
from lit_modules.lightfm_block_config import LightFMConfig
from lit_modules.llm4es_config import LLM4ESConfig, LMFeaturesConfig
from lit_modules.next_event_gpt_config import NextEventGPTConfig
from lit_modules.next_item_rec_config import NextItemRecConfig
from lit_modules.uqa_align_config import UQAAlignConfig


@dataclass(frozen=True)
class Method:
    config: type
    """The config dataclass: the `model.*` keys, their defaults and docs."""
    module: str | None
    """"package.module:Class" of the LightningModule; None when nothing trains (config.inputs == "runs")."""

    def module_class(self) -> type:
        module_name, cls_name = self.module.split(":")
        return getattr(importlib.import_module(module_name), cls_name)


METHODS: dict[str, Method] = {
    "gru_autoencoder": Method(GRUAutoencoderConfig, "lit_modules.gru_autoencoder:GRUAutoencoder"),
    "next_event_gpt": Method(NextEventGPTConfig, "lit_modules.next_event_gpt:NextEventGPT"),
    "next_item_rec": Method(NextItemRecConfig, "lit_modules.next_item_rec:NextItemRec"),
    "llm4es": Method(LLM4ESConfig, "lit_modules.llm4es:LLM4ESFinetune"),
    "lm_features": Method(LMFeaturesConfig, "lit_modules.llm4es:LMFeatureExtractor"),
    "ials": Method(IALSConfig, "lit_modules.ials:IALS"),
    "lightfm": Method(LightFMConfig, "lit_modules.lightfm_block:LightFMBlock"),
    "instruct_ue": Method(InstructUEConfig, "lit_modules.instruct_ue:InstructUEJoint"),
    "uqa_align": Method(UQAAlignConfig, "lit_modules.uqa_align:UQAAlign"),
    "ensemble": Method(EnsembleConfig, None),
}
