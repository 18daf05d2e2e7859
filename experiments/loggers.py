"""The run's loggers (W&B offline + CSV) and what every run puts on the W&B dashboard.

Every run logs the same structure: config keys `method`, `dataset`, `experiment`; per-epoch
`probe_val/*` metrics whose summary is their maximum; a table of the final evaluation (the
method and the baselines); a ROC curve per binary target on its TEST users; a 2-D PCA
projection of the embeddings. The images are also written to `<run>/plots/`. docs/wandb.md
says which panels to build from them. Heavy libraries are imported inside the functions.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from omegaconf import DictConfig, OmegaConf

from datamodules.atomic import atomic_write

if TYPE_CHECKING:
    from datamodules.targets import Target

STEP = "trainer/global_step"  # the x axis Lightning's WandbLogger defines for every metric ("*")
MAX_KEYS_PREFIX = "probe_val/"  # logged every N epochs by the probe callback: the summary keeps the best
MAX_POINTS = 5000  # users drawn in the projection; more only blurs the picture


def build_loggers(cfg: DictConfig, run_dir: Path, resumed: bool = False) -> list:
    """WandbLogger (offline unless WANDB_MODE says otherwise) and CSVLogger, as the config asks.

    A resumed run logs its CSV rows to a new `csv_resume<k>/` beside `csv/`: Lightning's CSVLogger
    deletes the metrics.csv it finds in its directory, which would lose the rows before the crash.
    """
    from lightning.pytorch.loggers import CSVLogger, WandbLogger

    loggers = []
    if cfg.logger.wandb:
        os.environ.setdefault("WANDB_MODE", "offline")
        wandb_logger = WandbLogger(
            project=cfg.logger.project,
            entity=cfg.logger.entity,
            group=cfg.logger.group,
            tags=list(cfg.logger.tags) or None,
            name=run_dir.name,
            save_dir=str(run_dir),
            offline=os.environ["WANDB_MODE"] == "offline",
            config={
                "method": cfg.model.name,
                "dataset": cfg.data.source,
                "experiment": cfg.experiment,
                **OmegaConf.to_container(cfg),
            },
        )
        # Lightning always passes wandb.init(anonymous=None), which wandb 0.31 warns about on every
        # run although the setting does nothing; not passing it is what wandb asks for.
        wandb_logger._wandb_init.pop("anonymous", None)
        loggers.append(wandb_logger)
    if cfg.logger.csv:
        loggers.append(CSVLogger(save_dir=str(run_dir), name="", version=csv_version(run_dir) if resumed else "csv"))
    return loggers


def csv_version(run_dir: Path) -> str:
    """The first `csv_resume<k>` directory name not yet in the run directory."""
    k = 1
    while (run_dir / f"csv_resume{k}").exists():
        k += 1
    return f"csv_resume{k}"


def log_metrics(logger: Any, metrics: dict[str, float], step: int) -> None:
    """logger.log_metrics(metrics, step), defining each probe_val/* key by its exact name on a W&B run first.

    The probe_val summary is the maximum over the run. A "probe_val/*" glob cannot promise that:
    wandb-core (0.31) picks among the globs matching a key in Go map order, i.e. at random, so a
    glob lost to Lightning's "*" in about a third of the runs and the summary kept the last
    value. An exactly named metric always takes precedence over globs.
    """
    if type(logger).__name__ == "WandbLogger":
        for key in metrics:
            if key.startswith(MAX_KEYS_PREFIX):
                logger.experiment.define_metric(key, step_metric=STEP, step_sync=True, summary="max")
    logger.log_metrics(metrics, step=step)


def summary_dict(run: Any) -> dict[str, Any]:
    """The run's summary as plain values (a `summary="max"` metric reads {"max": value})."""
    summary = run.summary
    return {k: dict(summary[k]) if hasattr(summary[k], "keys") else summary[k] for k in summary.keys()}


def evaluation_rows(rows: dict[str, dict[str, float]]) -> list[list]:
    """Table rows [row, evaluation, target, metric, value] from {row name: {"probe_test/<t>/<m>": value}}."""
    out = []
    for name, metrics in rows.items():
        for key, value in metrics.items():
            evaluation, target, metric = key.split("/")
            out.append([name.removeprefix("baseline/"), evaluation, target, metric, float(value)])
    return out


def _save(fig: Any, path: Path) -> Path:
    """Write a figure as PNG, atomically: no half-written image is ever left."""
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    return path


def plot_roc(target: str, curves: dict[str, tuple[np.ndarray, np.ndarray]], aucs: dict[str, float], path: Path) -> Path:
    """One ROC curve per row (method and baselines) on one target's TEST users."""
    from matplotlib.figure import Figure
    from sklearn.metrics import roc_curve

    fig = Figure(figsize=(4.5, 4.5))
    ax = fig.subplots()
    for name, (positive, prob) in curves.items():
        fpr, tpr, _ = roc_curve(positive, prob)
        ax.plot(fpr, tpr, label=f"{name.removeprefix('baseline/')} (AUC {aucs[name]:.3f})")
    ax.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=1)
    ax.set(xlabel="false positive rate", ylabel="true positive rate", title=f"ROC: {target} (TEST users)")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    return _save(fig, path)


def pca_2d(embeddings: np.ndarray) -> np.ndarray:
    """[U, 2]: the embeddings' first two principal components (a zero column if D == 1)."""
    x = np.asarray(embeddings, dtype=np.float64)
    x = x - x.mean(axis=0)
    _, _, vt = np.linalg.svd(x, full_matrices=False)
    out = x @ vt[:2].T
    return np.pad(out, ((0, 0), (0, 2 - out.shape[1])))


def plot_projection(embeddings: np.ndarray, targets: Sequence[Target], title: str, path: Path, seed: int = 0) -> Path:
    """PCA 2-D scatter of the embeddings, one panel per binary/multiclass target, points coloured by class."""
    from matplotlib.figure import Figure

    from datamodules.targets import PROBE_KINDS

    shown = [t for t in targets if t.kind in PROBE_KINDS] or [None]
    rng = np.random.default_rng(seed)
    keep = np.sort(rng.permutation(len(embeddings))[:MAX_POINTS])
    xy = pca_2d(embeddings[keep])
    fig = Figure(figsize=(4 * len(shown), 4))
    for ax, t in zip(np.atleast_1d(fig.subplots(1, len(shown))), shown):
        if t is None:
            ax.scatter(xy[:, 0], xy[:, 1], s=4, alpha=0.6)
        else:
            labels = t.labels[keep]
            for k, cls in enumerate(t.classes):
                mask = labels == k
                ax.scatter(xy[mask, 0], xy[mask, 1], s=4, alpha=0.6, label=str(cls))
            ax.legend(fontsize=7, markerscale=2, title=t.name, title_fontsize=8)
        ax.set(xlabel="PC 1", ylabel="PC 2")
    fig.suptitle(title)
    fig.tight_layout()
    return _save(fig, path)


def log_report(
    run: Any,
    rows: dict[str, dict[str, float]],
    scores: dict[str, dict[str, tuple[np.ndarray, np.ndarray]]],
    embeddings: np.ndarray,
    targets: Sequence[Target],
    method: str,
    out_dir: Path,
    step: int,
) -> dict[str, Path]:
    """Log the evaluation table, the ROC curves and the projection to `run`; return the PNGs written under out_dir.

    rows: {row name: evaluate() output}; scores: {row name: {binary target: (is positive, probability)}}.
    """
    import wandb

    out_dir.mkdir(parents=True, exist_ok=True)
    pngs = {}
    for t in targets:
        curves = {name: per_row[t.name] for name, per_row in scores.items() if t.name in per_row}
        if curves:
            aucs = {name: rows[name][f"probe_test/{t.name}/auc"] for name in curves}
            pngs[f"eval/roc/{t.name}"] = plot_roc(t.name, curves, aucs, out_dir / f"roc_{t.name}.png")
    pngs["eval/embedding_pca"] = plot_projection(embeddings, targets, f"{method}: PCA of the embeddings", out_dir / "embedding_pca.png")
    table = wandb.Table(columns=["row", "evaluation", "target", "metric", "value"], data=evaluation_rows(rows))
    run.log({"eval/table": table, **{k: wandb.Image(str(p)) for k, p in pngs.items()}, STEP: step})
    return pngs
