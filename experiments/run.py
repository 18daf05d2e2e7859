"""`python -m experiments.run [experiment=NAME] [key=value ...]`: train, embed, probe, report.

Heavy libraries (torch, lightning, wandb) are imported inside `run`, so `--help` and
config errors answer at once.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import logging
import os
import shlex
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from datamodules.atomic import atomic_write
from datamodules.encode import state_of
from experiments.config import ConfigError, DataConfig, compose, help_text, to_dataclass
from experiments.rundirs import RUN_DIR_ENV, launched_as_rank_zero, resume_dir

log = logging.getLogger("experiments.run")
TABLE_GROUPS = ("probe_test/", "downstream_test/")  # what tables report; *_val/ is for selection only
EVAL_GROUPS = ("probe_val", "probe_test", "downstream_val", "downstream_test", "baseline", "instructed", "tuned", "test", "qa", "qa_prefix")
METHOD_GROUPS = ("val/recall@", "val/ndcg@", "test/", "qa/", "qa_prefix/")  # a method's own metrics (run_metrics), printed under the table


@dataclass
class RunResult:
    run_dir: Path
    metrics: dict[str, float]  # what metrics.json holds
    rows: dict[str, dict[str, float]]  # table row name -> its evaluate() metrics
    wandb_summary: dict = field(default_factory=dict)  # read from the W&B run before it finished


def make_run_dir(cfg: DictConfig) -> Path:
    name = cfg.run_name or dt.datetime.now().strftime("%Y%m%d-%H%M%S-%f")
    run_dir = Path(cfg.output_dir) / cfg.experiment / name
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir


def write_embeddings(path: Path, user_ids, embeddings) -> None:
    import numpy as np
    import polars as pl

    frame = pl.DataFrame({"user_id": user_ids, "embedding": np.asarray(embeddings, dtype=np.float32)})
    atomic_write(path, frame.write_parquet)


def export_submission(prepared, embeddings, out: Path, embedder=None) -> int:
    """The challenge's submission for its relevant clients; a client without history gets the mean of the others.

    With `embedder` (an experiments.finished_run.EmbeddingRun of this run) the relevant clients are
    embedded by the trained model from ALL the source's events, through the path that embeds
    new data: the organisers' targets lie after the provided data, so the history cut that
    local validation needs (data.cutoff*) must not hide the last weeks from the submission.
    An ensemble (no model of its own) exports its vectors of the prepared users (history only).
    The relevant clients are the list preprocessing kept from the source (every user when
    the source has none). Returns how many relevant clients had no history (counted in metrics.json).
    """
    import numpy as np

    from datamodules.sources import recsys2025

    relevant = prepared.meta["relevant_users"]
    if embedder is not None:
        frame = embedder.embed(None, until=None, users=relevant)
        known_ids, known = frame["user_id"].to_numpy(), frame["embedding"].to_numpy()
    else:
        known_ids, known = prepared.store.user_ids, embeddings
    ids = relevant if relevant is not None else [str(u) for u in known_ids]
    index = {str(u): i for i, u in enumerate(known_ids)}
    rows = np.array([index.get(u, -1) for u in ids])
    vectors = np.where((rows >= 0)[:, None], known[np.maximum(rows, 0)], known.mean(axis=0))
    recsys2025.write_submission(out, ids, vectors)
    return int((rows < 0).sum())


TRAINER_RUN_KEYS = ("early_stopping_patience", "checkpoint_every_n_steps", "on_nonfinite")  # ours, not Trainer arguments


def fit_and_embed(
    cfg: DictConfig, datamodule, module, loggers: list, run_dir: Path,
    resume_from: Path | None = None, extra_callbacks: list | None = None,
) -> tuple:
    """Train with Lightning (continuing from `resume_from`, a last.ckpt, if given), then embed every user with the weights of the best val/loss epoch.

    extra_callbacks run after the built-in ones (a sweep's pruning callback reads the probe's probe_val results).
    Under DDP every rank runs this (only rank 0 writes checkpoints) and every rank returns all
    users' embeddings, gathered from the ranks' shards.
    """
    import lightning.pytorch as L
    import torch
    from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint

    from callbacks.nonfinite import NonFiniteGuard
    from callbacks.probe import LinearProbe
    from callbacks.resume import AtomicCheckpointIO, ResumeState
    from datamodules.targets import PROBE_KINDS
    from evaluation.embed import embed_all

    # best.ckpt only at validation ends (min val/loss); last.ckpt every N steps (or every epoch) for resume=true
    checkpoint = ModelCheckpoint(dirpath=run_dir / "checkpoints", filename="best", monitor="val/loss")
    last = ModelCheckpoint(dirpath=run_dir / "checkpoints", save_top_k=0, save_last=True, every_n_train_steps=cfg.trainer.checkpoint_every_n_steps)
    guard = NonFiniteGuard(cfg.trainer.on_nonfinite)
    callbacks = [ResumeState(run_dir / "checkpoints" / "last.ckpt"), guard, checkpoint, last]
    if cfg.trainer.early_stopping_patience is not None:
        callbacks.append(EarlyStopping(monitor="val/loss", patience=cfg.trainer.early_stopping_patience))
    if cfg.probe.every_n_epochs:  # probe_val curves during training; the final numbers come from evaluate()
        targets = [t for t in datamodule.data.targets if t.kind in PROBE_KINDS]
        callbacks.append(LinearProbe(
            targets, datamodule.predict_dataloader, cfg.probe.every_n_epochs, list(cfg.probe.split), cfg.probe.C, cfg.seed,
            cfg.probe.max_iter, at_fit_end=False,
        ))
    callbacks += extra_callbacks or []
    settings = {k: v for k, v in OmegaConf.to_container(cfg.trainer).items() if k not in TRAINER_RUN_KEYS}
    trainer = L.Trainer(
        **settings,
        logger=loggers or False,
        callbacks=callbacks,
        plugins=[AtomicCheckpointIO()],
        default_root_dir=str(run_dir),
        enable_model_summary=False,
        use_distributed_sampler=False,  # the datamodules shard their batches per rank themselves
    )
    started = time.perf_counter()
    with warnings.catch_warnings():
        if resume_from is not None:  # the checkpoints found there are this run's own
            warnings.filterwarnings("ignore", message="Checkpoint directory .* exists and is not empty")
        if resume_from is not None and hasattr(datamodule, "train_position"):  # ResumeState replays its sampler mid-epoch
            warnings.filterwarnings("ignore", message="You're resuming from a checkpoint that ended before the epoch ended")
        trainer.fit(module, datamodule=datamodule, ckpt_path=resume_from, weights_only=True)
    # the state after fit, whatever N was (rank 0 writes); the full state (loops, callbacks) that resume=true needs
    trainer.save_checkpoint(run_dir / "checkpoints" / "last.ckpt", weights_only=False)
    metrics = {"time/fit_seconds": time.perf_counter() - started, "epochs": trainer.current_epoch, "train/nonfinite_skipped": guard.skipped}
    if checkpoint.best_model_path:  # embed with the weights of the best val/loss epoch, as early stopping intends
        # rank 0 wrote the file (other ranks may be on other machines) and broadcasts its weights
        state = torch.load(checkpoint.best_model_path, map_location="cpu", weights_only=True)["state_dict"] if trainer.is_global_zero else None
        module.load_state_dict(trainer.strategy.broadcast(state))
        metrics["val/loss_best"] = float(checkpoint.best_model_score)
    for key in ("train/loss_epoch", "val/loss"):
        if key in trainer.callback_metrics:
            metrics[key] = float(trainer.callback_metrics[key])
    embeddings = embed_all(module, datamodule.predict_dataloader(), trainer.strategy)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        # The last collective is behind us (the gather above). Close the process group now: a rank that
        # exits while rank 0 still evaluates, with gloo's threads alive, sometimes aborted at interpreter
        # exit ("terminate called without an active exception", exit -6), failing the whole DDP run.
        torch.distributed.destroy_process_group()
    return embeddings, metrics, trainer.global_step


def run(cfg: DictConfig, command: str | None = None, extra_callbacks: list | None = None) -> RunResult | None:
    """Fit the configured method (or assemble an ensemble), embed every user, evaluate, write the run directory.

    With trainer.strategy=ddp Lightning starts this command again for every other rank; those
    ranks train and embed their shards, write nothing and return None.
    """
    import lightning.pytorch as L
    from safetensors.torch import save_model

    from datamodules.datamodule import EventDataModule
    from experiments.build import build_datamodule, build_module

    resumed = resume_dir(cfg)  # checked before any work: resume=true or a run directory
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    datamodule = EventDataModule(to_dataclass(cfg.data, DataConfig), seed=cfg.seed)
    prepared = datamodule.data  # bad data fails here, before a run directory exists
    if cfg.export_submission and cfg.data.source != "recsys2025":
        raise ConfigError(f"export_submission: the challenge's submission needs data.source=recsys2025, not {cfg.data.source!r}")
    method = OmegaConf.to_object(cfg.model)
    module, embeddings = None, None
    try:
        if method.inputs == "runs":
            from evaluation.evaluate import cutoff_epoch
            from experiments.ensemble import ensemble_embeddings

            data = OmegaConf.to_container(cfg.data, resolve=True)
            embeddings = ensemble_embeddings(OmegaConf.to_container(cfg.model), prepared, cutoff_epoch(prepared), cfg.seed, data=data, name=f"experiment {cfg.experiment!r}")
        else:
            check_accelerator(cfg.trainer.accelerator)  # before a run directory exists
            module = build_module(method, prepared)
            datamodule = build_datamodule(method, datamodule)
    except (ValueError, FileNotFoundError) as err:
        raise ConfigError(str(err)) from None

    writer = launched_as_rank_zero()  # under DDP only global rank 0 writes: run directory, loggers, files
    if writer:
        run_dir = resumed or make_run_dir(cfg)
        os.environ[RUN_DIR_ENV] = str(run_dir)  # the ranks Lightning's launcher starts on this node inherit it
        atomic_write(run_dir / "config.yaml", lambda p: OmegaConf.save(cfg, p, resolve=True))
        # what embedding new data needs of the preprocessing, so `python -m experiments.embed` works without the cache
        atomic_write(run_dir / "preprocess.json", lambda p: p.write_text(json.dumps(state_of(prepared.meta), indent=1)))
        if command and not resumed:  # reports cite the exact command behind each row
            atomic_write(run_dir / "command.txt", lambda p: p.write_text(command + "\n"))
        from experiments.loggers import build_loggers

        loggers = build_loggers(cfg, run_dir, resumed=resumed is not None)
    else:  # another rank: it names rank 0's directory (where known) but never creates or writes it
        run_dir, loggers = Path(os.environ.get(RUN_DIR_ENV) or Path(cfg.output_dir) / cfg.experiment / (cfg.run_name or "unnamed")), []
    metrics, step = {}, 0
    if module is not None and any(p.requires_grad for p in module.parameters()):
        last = resumed / "checkpoints" / "last.ckpt" if resumed else None
        embeddings, metrics, step = fit_and_embed(cfg, datamodule, module, loggers, run_dir, resume_from=last, extra_callbacks=extra_callbacks)
    elif module is not None:  # a frozen feature extractor, or a method fitted while built (iALS, LightFM): nothing for Lightning to fit
        from evaluation.embed import embed_all

        metrics["time/fit_seconds"] = getattr(module, "fit_seconds", 0.0)
        embeddings = embed_all(module, datamodule.predict_dataloader())
        metrics.update(module.embed_stats() if hasattr(module, "embed_stats") else {})  # e.g. how many events an LM read per user
    if not writer:  # another rank of a distributed run: rank 0 evaluates once and writes
        return None
    if module is not None and hasattr(module, "run_metrics"):  # the method's own held-out metrics (best weights): test/recall@K, qa/...
        metrics.update(module.run_metrics(datamodule))

    from evaluation.baselines import baseline_embeddings
    from evaluation.evaluate import evaluate

    scores: dict[str, dict] = {}  # row -> binary target -> TEST labels and probabilities (ROC curves)
    rows = {cfg.model.name: evaluate(cfg, prepared, embeddings, scores.setdefault(cfg.model.name, {}))}
    for name, features in baseline_embeddings(cfg.probe.baselines, prepared, embeddings.shape[1], cfg.seed).items():
        rows[f"baseline/{name}"] = evaluate(cfg, prepared, features, scores.setdefault(f"baseline/{name}", {}))
    for target, loader in (getattr(datamodule, "instructed_loaders", dict)() if module is not None else {}).items():
        from evaluation.embed import embed_all  # InstructUE: each target probed on its own instruction's embedding too

        vectors = embed_all(module, loader)
        write_embeddings(run_dir / f"embeddings_{target}.parquet", prepared.store.user_ids, vectors)
        only = dataclasses.replace(prepared, targets=[t for t in prepared.targets if t.name == target])
        rows.setdefault("instructed", {}).update(evaluate(cfg, only, vectors, scores.setdefault("instructed", {})))
    if module is not None and getattr(getattr(datamodule, "config", None), "tuned_targets", None):
        from lit_modules.instruct_tuning import tuned_embeddings  # InstructUE: instruction tokens tuned on each target's FIT users

        for target, vectors in tuned_embeddings(module, datamodule, cfg.seed, list(cfg.probe.split)).items():
            write_embeddings(run_dir / f"embeddings_{target}_tuned.parquet", prepared.store.user_ids, vectors)
            only = dataclasses.replace(prepared, targets=[t for t in prepared.targets if t.name == target])
            rows.setdefault("tuned", {}).update(evaluate(cfg, only, vectors, scores.setdefault("tuned", {})))
    metrics.update(rows[cfg.model.name])
    for name, row in rows.items():
        if name != cfg.model.name:
            metrics.update({f"{name}/{k}": v for k, v in row.items()})
    metrics.update({f"data/{k}": v for k, v in prepared.meta["counts"].items()})

    from experiments.loggers import log_metrics, log_report, summary_dict

    summary = {}
    for lg in loggers:  # training has ended: the evaluation is logged after it, then flushed
        log_metrics(lg, {k: v for k, v in metrics.items() if k.split("/")[0] in EVAL_GROUPS}, step)
        lg.save()
        if type(lg).__name__ == "WandbLogger":
            log_report(lg.experiment, rows, scores, embeddings, prepared.targets, cfg.model.name, run_dir / "plots", step)
            summary = summary_dict(lg.experiment)
            lg.experiment.finish()
    # metrics.json last: its presence marks a finished run (experiments.rundirs)
    write_embeddings(run_dir / "embeddings.parquet", prepared.store.user_ids, embeddings)
    if cfg.export_submission:
        embedder = None
        if module is not None:
            from experiments.finished_run import EmbeddingRun

            embedder = EmbeddingRun(run_dir, cfg, state_of(prepared.meta), module)
        metrics["data/relevant_clients_without_history"] = export_submission(prepared, embeddings, run_dir / "submission", embedder)
    if module is not None:
        # save_model drops the duplicates of tied weights (e.g. an LM head tied to its embeddings)
        atomic_write(run_dir / "model.safetensors", lambda p: save_model(module, str(p)))
    atomic_write(run_dir / "metrics.json", lambda p: p.write_text(json.dumps(metrics, indent=1, sort_keys=True)))
    return RunResult(run_dir, metrics, rows, summary)


def print_table(result: RunResult) -> None:
    """Rows: targets; columns: the method and the baselines; TEST users only. Probe: AUC / KS; downstream MLP: AUROC / score."""
    from rich.console import Console
    from rich.table import Table

    first = next(iter(result.rows.values()))
    keys = list(dict.fromkeys(k.rsplit("/", 1)[0] for k in first if k.startswith(TABLE_GROUPS)))  # probe_test/<t>, downstream_test/<t>
    table = Table(title="TEST users. Probe: AUC / KS; MLP: AUROC / score")
    table.add_column("target")
    for name in result.rows:
        table.add_column(name.removeprefix("baseline/"), justify="right")
    for key in keys:
        probe = key.startswith("probe_test/")
        a, b = ("auc", "ks") if probe else ("auroc", "score")
        cells = [f"{row.get(f'{key}/{a}', float('nan')):.3f} / {row.get(f'{key}/{b}', float('nan')):.3f}" for row in result.rows.values()]
        table.add_row(key.split("/", 1)[1] + ("" if probe else " (MLP)"), *cells)
    console = Console(width=max(100, 24 * (len(result.rows) + 1)))
    console.print(table)
    own = {k: v for k, v in result.metrics.items() if k.startswith(METHOD_GROUPS)}
    if own:  # next-item Recall/NDCG, UQABench QA accuracy: the method's own held-out metrics
        extra = Table(title="The method's own held-out metrics")
        extra.add_column("metric")
        extra.add_column(next(iter(result.rows)), justify="right")
        for k in sorted(own):
            extra.add_row(k, f"{own[k]:.0f}" if k.endswith(("users", "questions")) else f"{own[k]:.3f}")
        console.print(extra)


def check_accelerator(accelerator: str | None) -> None:
    """A GPU trainer on a machine without one is a config error, not Lightning's MisconfigurationException traceback."""
    import torch

    if accelerator in ("gpu", "cuda") and not torch.cuda.is_available() and not (accelerator == "gpu" and torch.backends.mps.is_available()):
        raise ConfigError(f"trainer.accelerator={accelerator}: this machine has no GPU that torch can use (torch.cuda.is_available() is False); run with trainer=cpu")


def quiet_libraries() -> None:
    """Our own INFO lines (dropped rows, cache builds) on stderr; library chatter and known deprecations off."""
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    for name in ("datamodules", "experiments", "callbacks", "evaluation", "lit_modules"):
        logging.getLogger(name).setLevel(logging.INFO)
        logging.getLogger(name).addHandler(handler)
    logging.getLogger("lightning.pytorch.utilities.rank_zero").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=".*LeafSpec.*")


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if any(a in ("-h", "--help", "help") for a in args):
        print(help_text())
        return 0
    quiet_libraries()
    try:
        cfg = compose(args)
        result = run(cfg, command=shlex.join(["python", "-m", "experiments.run", *args]))
        if result is None:  # a non-zero rank of a distributed run: rank 0 prints
            return 0
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        return 2
    except RuntimeError as err:
        from callbacks.nonfinite import NonFiniteError

        if not isinstance(err, NonFiniteError):
            raise
        print(f"training error: {err}", file=sys.stderr)
        return 3
    except ValueError as err:
        from datamodules.sources.base import DataError

        if not isinstance(err, DataError):
            raise
        print(f"data error: {err}", file=sys.stderr)
        return 2
    except SystemExit as stop:
        if type(stop).__name__ != "SIGTERMException":  # Lightning's, a SystemExit without a code: it would exit 0
            raise
        run_dir = os.environ.get(RUN_DIR_ENV, "the run directory")
        print(f"stopped by SIGTERM: {run_dir}/checkpoints/last.ckpt holds the last whole batch; "
              "the same command with resume=true continues it", file=sys.stderr)
        return 128 + 15
    print_table(result)
    print(f"run directory: {result.run_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
