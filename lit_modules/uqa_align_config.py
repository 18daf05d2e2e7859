"""The `model.*` keys of UQAAlign (UQABench's alignment of a user encoder with an LLM, and its text baselines).

Torch-free, so `--help` and config errors answer without importing Lightning. Keys in `data_keys`
shape the question batches (they go to `datamodules.uqa_batches.UQADataModule`) or name the encoder
run (`data_args` resolves it); every other key (but `name`) is a constructor argument of
`lit_modules.uqa_align.UQAAlign`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from datamodules.uqa_questions import SUBTASKS
from lit_modules.lm import MINILM
from lit_modules.next_event_gpt_config import SCHEDULES

MODES = ("mean", "qformer", "text")  # adapters: masked mean (1 soft token), Q-Former (`queries` tokens); text: TextN baseline
LLM_STRATEGIES = ("frozen", "lora", "full")  # adapter only | adapter + LoRA | adapter + the whole LLM
DATA_KEYS = (
    "encoder_experiment", "output_dir", "text_events", "n_candidates", "held_out", "short_window", "subtasks",
    "max_prompt_tokens", "max_answer_tokens", "eval_batch_size",
)  # fmt: skip


def check_uqa_align(hp: Mapping[str, Any]) -> None:
    """Checks of the keys alone, shared by the config and the module's constructor; each error names its key."""
    if hp["mode"] not in MODES:
        raise ValueError(f"model.mode must be one of {MODES}, got {hp['mode']!r}")
    if hp["llm"] not in LLM_STRATEGIES:
        raise ValueError(f"model.llm must be one of {LLM_STRATEGIES}, got {hp['llm']!r}")
    if hp["schedule"] not in SCHEDULES:
        raise ValueError(f"model.schedule must be one of {SCHEDULES}, got {hp['schedule']!r}")
    for key in ("queries", "qformer_layers", "qformer_heads", "lora_r"):
        if hp[key] < 1:
            raise ValueError(f"model.{key} must be >= 1, got {hp[key]}")
    if hp["warmup_steps"] < 0:
        raise ValueError(f"model.warmup_steps must be >= 0, got {hp['warmup_steps']}")


@dataclass
class UQAAlignConfig:
    """UQABench alignment: a finished next_item_rec run's frozen encoder -> adapter -> soft prompt of an LLM answering personal questions; or TextN."""

    inputs: ClassVar[str] = "uqa"
    data_keys: ClassVar[tuple[str, ...]] = DATA_KEYS

    name: str = "uqa_align"
    """Method name (registry key)."""
    mode: str = "mean"
    """mean (linear to the LLM width + masked mean: 1 soft token) | qformer (`queries` learned queries cross-attending the encoder states) | text (TextN: the last `text_events` events as text, no encoder)."""
    encoder_experiment: str | None = "uqa_trm_ml100k"
    """The next_item_rec experiment whose newest finished run gives the frozen encoder (ignored in text mode)."""
    output_dir: str = "outputs"
    """Where the encoder experiment's runs are looked up."""
    model_path: str = MINILM
    """The LLM: local model folder (Qwen2.5-3B-Instruct in the paper; on a GPU) or package:NAME (CPU: all-MiniLM-L6-v2 as a causal decoder)."""
    llm: str = "frozen"
    """frozen (adapter only) | lora (adapter + LoRA adapters of the LLM, peft) | full (adapter + the whole LLM)."""
    lora_r: int = 8
    """LoRA rank."""
    lora_alpha: int = 16
    """LoRA alpha."""
    lora_dropout: float = 0.05
    """LoRA dropout."""
    lora_targets: list[str] | None = None
    """LoRA target modules (null: peft's default for the architecture)."""
    queries: int = 16
    """Q-Former: learned queries = soft tokens (the paper: 16)."""
    qformer_layers: int = 1
    """Q-Former: blocks of (self-attention over the queries, cross-attention over the encoder states, MLP)."""
    qformer_heads: int = 2
    """Q-Former: attention heads (must divide the encoder width)."""
    lr: float = 1e-4
    """AdamW learning rate (the paper: 1e-4)."""
    weight_decay: float = 0.0
    """Weight decay."""
    warmup_steps: int = 0
    """Linear warmup steps."""
    schedule: str = "constant"
    """constant | cosine (decay to 0 over the run)."""
    text_events: int = 20
    """Text mode: the last this many interactions (before the question's cut) rendered in the prompt (Text20 / Text50)."""
    n_candidates: int = 4
    """Candidate answers per question, the true one included."""
    held_out: int = 1
    """Last events that play the future in action-prediction questions."""
    short_window: int = 5
    """Last events short-term interest reads."""
    subtasks: list[str] = field(default_factory=lambda: list(SUBTASKS))
    """Sub-tasks asked (each at most once per user)."""
    max_prompt_tokens: int = 1024
    """Text mode: the rendered events keep their newest tokens so that the whole prompt fits (the LLM's positions bound it too)."""
    max_answer_tokens: int = 32
    """Answer tokens kept for teacher forcing."""
    eval_batch_size: int = 16
    """Questions per batch when scoring candidates (each question is one row per candidate)."""

    def __post_init__(self) -> None:
        check_uqa_align(asdict(self))
        unknown = sorted(set(self.subtasks) - set(SUBTASKS))
        if unknown:
            raise ValueError(f"model.subtasks: unknown {unknown}; known {list(SUBTASKS)}")
        for key in ("text_events", "n_candidates", "held_out", "short_window", "max_prompt_tokens", "max_answer_tokens", "eval_batch_size"):
            if getattr(self, key) < 1:
                raise ValueError(f"model.{key} must be >= 1, got {getattr(self, key)}")
        if self.n_candidates < 2:
            raise ValueError(f"model.n_candidates must be >= 2, got {self.n_candidates}")
        if self.mode != "text" and not self.encoder_experiment:
            raise ValueError(f"model.encoder_experiment: mode {self.mode!r} needs the next_item_rec experiment whose run gives the encoder")

    def data_args(self, data: Any) -> dict[str, Any]:
        """`encoder_run`: the newest finished run of `encoder_experiment`, checked to be made on this data (None in text mode)."""
        if self.mode == "text":
            return {"encoder_run": None}
        return {"encoder_run": str(encoder_run(self.encoder_experiment, self.output_dir, data.meta))}


def encoder_run(experiment: str, output_dir: str, meta: Mapping[str, Any]) -> Path:
    """The newest finished run of `experiment` under `output_dir`, refused (one line) when there is none, when it is
    not a next_item_rec run, or when its data differs: the history cutoff or the vocabulary of a field its encoder reads."""
    import yaml

    from experiments.rundirs import latest_run

    run = latest_run(output_dir, experiment)
    if run is None:
        raise ValueError(f"model.encoder_experiment: no finished run of experiment {experiment!r} under {output_dir}; run it first (python -m experiments.run experiment={experiment})")
    model = (yaml.safe_load((run / "config.yaml").read_text()) or {}).get("model") or {}
    if model.get("name") != "next_item_rec":
        raise ValueError(f"model.encoder_experiment: {run} is a {model.get('name')!r} run, not next_item_rec")
    state_file = run / "preprocess.json"
    if not state_file.is_file():
        raise ValueError(f"model.encoder_experiment: {run} has no preprocess.json; cannot check it was made on this data")
    state = json.loads(state_file.read_text())
    if state.get("cutoff") != meta.get("cutoff"):
        raise ValueError(f"model.encoder_experiment: {run} has history cutoff {state.get('cutoff')!r} but this data has {meta.get('cutoff')!r}; rerun it on this data")
    for f in [model.get("item_field", "item"), *(model.get("side_fields") or [])]:
        theirs, ours = state.get("vocabs", {}).get(f), meta.get("vocabs", {}).get(f)
        if theirs != ours:
            raise ValueError(f"model.encoder_experiment: {run} was made on other data: the vocabulary of field {f!r} differs from this data's; rerun it on this data")
    return run
