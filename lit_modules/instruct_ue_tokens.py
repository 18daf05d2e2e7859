"""InstructUE's `<USER>` token: the backbone tokenizer that holds it, and the embedding row it trains.

Apart from the module so the data side (experiments/build.py -> InstructDataModule) gets the
tokenizers without the model code; both fail with one line naming the model path.
"""

from __future__ import annotations

from typing import Any

import torch

from datamodules.user_inputs import USER_TOKEN
from lit_modules.lm import load_tokenizer, resolve_model_path


def llm_tokenizer(model_path: str) -> Any:
    """The backbone's tokenizer with `<USER>` added as a special token; a one-line error naming the path if it cannot be."""
    tok = load_tokenizer(model_path)
    try:
        tok.add_special_tokens({"additional_special_tokens": [USER_TOKEN]})
        ids = tok(USER_TOKEN, add_special_tokens=False)["input_ids"]
    except (ValueError, TypeError, AttributeError, KeyError) as err:
        raise ValueError(f"model.model_path {model_path!r}: its tokenizer cannot add {USER_TOKEN} ({err})") from None
    if len(ids) != 1 or ids[0] == tok.unk_token_id:
        raise ValueError(f"model.model_path {model_path!r}: its tokenizer cannot add {USER_TOKEN} as one token (got ids {ids})")
    return tok


def load_tokenizers(config: Any) -> tuple[Any, Any | None, int]:
    """(LLM tokenizer with <USER>, the encoder's tokenizer keeping the newest tokens or None, <USER>'s id) for a config."""
    tok = llm_tokenizer(config.model_path)
    enc = None
    if config.modality_encoders and config.use_sequence:
        from transformers import AutoTokenizer

        path = resolve_model_path(config.encoder_path, "model.encoder_path")
        enc = AutoTokenizer.from_pretrained(path, local_files_only=True, truncation_side="left")
    return tok, enc, tok.convert_tokens_to_ids(USER_TOKEN)


def add_user_row(model: Any, tok: Any, model_path: str) -> int:
    """Make room for `<USER>` in the input embeddings (new rows = the mean row); returns its id."""
    user_id = tok.convert_tokens_to_ids(USER_TOKEN)
    emb = model.get_input_embeddings()
    if emb is None:
        raise ValueError(f"model.model_path {model_path!r}: the backbone has no input embedding matrix for {USER_TOKEN}")
    rows = emb.weight.shape[0]
    if user_id >= rows:
        try:
            model.resize_token_embeddings(len(tok), mean_resizing=False)
        except (NotImplementedError, ValueError, AttributeError, RuntimeError) as err:
            raise ValueError(f"model.model_path {model_path!r}: the backbone has no room for {USER_TOKEN} ({err})") from None
        with torch.no_grad():
            weight = model.get_input_embeddings().weight
            weight[rows:] = weight[:rows].mean(0)
    return user_id
