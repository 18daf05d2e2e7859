"""The `model.*` keys of InstructUEJoint (lit_modules/instruct_ue.py): defaults, docs, checks.

Torch-free. Keys in `data_keys` shape the inputs (UserQA triples, budgets, instructions) and go
to the InstructDataModule (datamodules/instruct_batches.py); the others are constructor
arguments, and the layout keys (modality_encoders, use_sequence, use_tabular, soft_tokens) are
read by both sides, so the batches and the module agree on where the soft tokens go.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

from lit_modules.lm import MINILM

POOLINGS = ("user_token", "mean")
DATA_KEYS = (
    "instruction", "instructions", "budget", "max_source_tokens", "max_answer_tokens",
    "questions_per_user", "predictive_fraction", "future_fraction", "min_past_events", "generator_path",
    "tuned_targets", "tune_tokens", "tune_steps", "tune_lr", "tune_temperature",
)  # fmt: skip


def check_instruct_ue(
    pooling: str, alpha_lm: float, alpha_cl: float, temperature: float, use_sequence: bool, use_tabular: bool, soft_tokens: int,
    betas: list[float],
) -> None:
    """Checks shared by the config and the module's constructor; errors name the key."""
    if pooling not in POOLINGS:
        raise ValueError(f"model.pooling must be one of {POOLINGS}, got {pooling!r}")
    if alpha_lm < 0 or alpha_cl < 0 or alpha_lm + alpha_cl == 0:
        raise ValueError(f"model.alpha_lm={alpha_lm}, model.alpha_cl={alpha_cl}: both >= 0 and not both 0")
    if temperature <= 0:
        raise ValueError(f"model.temperature must be > 0, got {temperature}")
    if not (use_sequence or use_tabular):
        raise ValueError("model.use_sequence and model.use_tabular are both false: the user would have no input")
    if soft_tokens < 1:
        raise ValueError(f"model.soft_tokens must be >= 1, got {soft_tokens}")
    if len(betas) != 2:
        raise ValueError(f"model.betas must be two numbers, got {list(betas)}")


@dataclass
class InstructUEConfig:
    """InstructUE (joint): sources through modality encoders into an LLM, user vector at <USER>; LM + masked InfoNCE loss on UserQA."""

    inputs: ClassVar[str] = "instruct"
    data_keys: ClassVar[tuple[str, ...]] = DATA_KEYS

    name: str = "instruct_ue"
    """Method name (registry key)."""
    model_path: str = MINILM
    """The LLM backbone: local model folder (the paper: Qwen2.5-0.5B-Instruct) or package:NAME (CPU: MiniLM as a causal decoder)."""
    encoder_path: str = MINILM
    """BERT-style modality encoder of every textual source (the paper: gte-base): local folder or package:NAME."""
    modality_encoders: bool = True
    """Sources through the encoder + adapters as soft tokens; false: every source as plain text through the LLM (text-only ablation)."""
    use_sequence: bool = True
    """Feed the textual event sources (false: the w/o-sequence ablation)."""
    use_tabular: bool = True
    """Feed the tabular block of aggregates (false: the w/o-tabular ablation)."""
    soft_tokens: int = 4
    """Soft tokens per source: its encoder states cut into this many consecutive chunks (older to newer), each mean-pooled, then the adapter."""
    train_encoder: bool = False
    """Fine-tune the modality encoder too (default: frozen, only its adapters train)."""
    lora: bool = True
    """Train LoRA adapters of the LLM (peft) plus the <USER> row; false: full fine-tuning."""
    lora_r: int = 8
    """LoRA rank."""
    lora_alpha: int = 16
    """LoRA alpha."""
    lora_dropout: float = 0.05
    """LoRA dropout."""
    lora_targets: list[str] | None = None
    """LoRA target modules (null: peft's default for the architecture)."""
    pooling: str = "user_token"
    """user_token: final-layer state at <USER> | mean: mean over the user and instruction tokens (the ablation)."""
    alpha_lm: float = 1.0
    """Weight of the next-token loss on the answer tokens (0: the w/o-NTP ablation)."""
    alpha_cl: float = 1.0
    """Weight of the contrastive loss (0: the w/o-contrastive ablation)."""
    temperature: float = 0.07
    """InfoNCE temperature tau."""
    margin: float = 0.1
    """A negative whose cosine exceeds the positive's + margin is masked out."""
    user_answer_negatives: bool = True
    """Negatives s(u_i, a_j): the user against other users' answers."""
    user_user_negatives: bool = True
    """Negatives s(u_i, u_j): the user against other users."""
    answer_answer_negatives: bool = True
    """Negatives s(a_i, a_j): the user's answer against other answers."""
    lr: float = 2e-4
    """AdamW learning rate (the paper: 2e-4, cosine)."""
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    """AdamW betas."""
    weight_decay: float = 0.0
    """AdamW weight decay (never on the embedding matrix)."""
    warmup_steps: int = 0
    """Linear warmup steps before the cosine decay."""
    attn_implementation: str | None = None
    """eager | sdpa | flash_attention_2 (null: transformers' default)."""
    encoder_cache: bool = True
    """Keep the frozen modality encoder's chunk means per distinct source text (filled once before training), so a step runs
    only the adapters and the LLM; false: the encoder reads every source of every batch (a trained encoder never caches)."""
    instruction: str = ""
    """The instruction of embeddings.parquet ("": the universal embedding)."""
    instructions: dict[str, str] = field(default_factory=dict)
    """Probe target -> its instruction: each target's embeddings also land in embeddings_<target>.parquet (and a probe row)."""
    budget: int = 64
    """Events kept per source, newest first (older ones are cut and counted)."""
    max_source_tokens: int = 256
    """Tokens of each source's text, newest kept (the encoder's input, or the LLM's in text-only mode; tabular: first kept)."""
    max_answer_tokens: int = 64
    """Tokens of each answer (its start kept)."""
    questions_per_user: int = 4
    """UserQA questions per user (plus the universal one)."""
    predictive_fraction: float = 0.5
    """UserQA: share of predictive questions."""
    future_fraction: float = 0.2
    """UserQA: share of each history that plays the future in predictive questions."""
    min_past_events: int = 3
    """UserQA: predictive questions only for users with at least this many events before the cut."""
    generator_path: str | None = None
    """UserQA: a causal LM (local folder or package:NAME) that rephrases every templated answer; null: templates only."""
    tuned_targets: list[str] = field(default_factory=list)
    """Probe targets of the instruction-tuned variant: learnable instruction tokens fitted on each target's FIT users
    (prototype loss, model frozen); the embeddings land in embeddings_<target>_tuned.parquet and a `tuned` probe row."""
    tune_tokens: int = 4
    """Instruction tuning: learnable tokens (started from the target's model.instructions text when it has one)."""
    tune_steps: int = 50
    """Instruction tuning: Adam steps over the FIT users' batches."""
    tune_lr: float = 1e-2
    """Instruction tuning: Adam learning rate of the tokens."""
    tune_temperature: float = 0.07
    """Instruction tuning: the prototype loss's temperature tau."""

    def __post_init__(self) -> None:
        check_instruct_ue(
            self.pooling, self.alpha_lm, self.alpha_cl, self.temperature, self.use_sequence, self.use_tabular, self.soft_tokens, self.betas
        )
        for key in ("budget", "max_source_tokens", "max_answer_tokens"):
            if getattr(self, key) < 1:
                raise ValueError(f"model.{key} must be >= 1, got {getattr(self, key)}")
        if self.tune_tokens < 1 or self.tune_steps < 0 or self.tune_temperature <= 0:
            raise ValueError("model.tune_tokens must be >= 1, model.tune_steps >= 0 and model.tune_temperature > 0")
        for target, text in self.instructions.items():
            if not str(text).strip():
                raise ValueError(f"model.instructions.{target}: empty instruction (the universal embedding is embeddings.parquet)")

    def data_args(self, prepared: Any) -> dict[str, Any]:
        """How many textual sources and tabular features the data gives (read from schema and vocabularies only)."""
        from datamodules.user_history import History, roles_for, tabular_names
        from datamodules.user_inputs import source_specs

        source = prepared.meta["source"]
        history = History(prepared.store, prepared.schema, prepared.vocabs, {}, roles_for(source, prepared.schema), source)
        return {"n_sources": len(source_specs(history)), "n_tabular": len(tabular_names(history))}
