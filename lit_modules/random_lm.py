"""`python -m lit_modules.random_lm --out DIR`: the "no pretraining" comparator for LLM4ES on the CPU.

It saves the architecture and tokenizer of a local model (default: all-MiniLM-L6-v2 from its
package) with freshly initialised, seeded weights, as a causal decoder. Fine-tuning it through
the same LLM4ES path isolates what the pretrained weights are worth.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from lit_modules.lm import ENCODER_TYPES, MINILM, load_tokenizer, resolve_model_path


def save_random_causal_lm(out: str | Path, like: str = MINILM, seed: int = 0, **overrides: int) -> Path:
    """Save `like`'s architecture (config fields changed by `overrides`, e.g. num_hidden_layers) with random weights."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(resolve_model_path(like), local_files_only=True)
    if config.model_type in ENCODER_TYPES:
        config.is_decoder = True
    for key, value in overrides.items():
        setattr(config, key, value)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    out = Path(out)
    model.save_pretrained(out)
    load_tokenizer(like).save_pretrained(out)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m lit_modules.random_lm", description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="folder to write")
    parser.add_argument("--like", default=MINILM, help="model path whose architecture and tokenizer to copy")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    print(f"wrote {save_random_causal_lm(args.out, args.like, args.seed)}")


if __name__ == "__main__":
    main()
