"""Probe metrics against sklearn/scipy, the FIT/VAL/TEST split, the probe on synthetic embeddings, the callback in a real Trainer."""

from __future__ import annotations

import csv

import lightning.pytorch as L
import numpy as np
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger
from scipy.stats import ks_2samp
from sklearn.metrics import roc_auc_score

from callbacks.probe import LinearProbe
from datamodules.sequences import Collator, LengthBucketBatchSampler, SequenceStore, UserIndexDataset
from datamodules.targets import Target
from evaluation.embed import embed_all
from evaluation.metrics import ks_statistic, macro_ovr, roc_auc
from evaluation.probe import CV_GRID, probe_embeddings
from evaluation.splits import FIT, TEST, UNLABELLED, VAL, check_fractions, user_split


# ---------------------------------------------------------------- metrics


@pytest.mark.parametrize("seed", range(5))
def test_binary_metrics_match_sklearn_and_scipy_with_ties(seed):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, 300)
    scores = rng.integers(0, 6, 300) + 0.5 * y  # few distinct values: many ties, some signal
    assert roc_auc(y, scores) == pytest.approx(roc_auc_score(y, scores), abs=1e-12)
    assert ks_statistic(y, scores) == pytest.approx(ks_2samp(scores[y == 1], scores[y == 0]).statistic, abs=1e-12)


def test_binary_metrics_known_values():
    y = np.array([0, 0, 1, 1])
    assert roc_auc(y, [0.1, 0.2, 0.3, 0.4]) == 1.0
    assert roc_auc(y, [0.4, 0.3, 0.2, 0.1]) == 0.0
    assert roc_auc(y, [0.5, 0.5, 0.5, 0.5]) == 0.5
    assert ks_statistic(y, [0.1, 0.2, 0.3, 0.4]) == 1.0
    assert ks_statistic(y, [0.5, 0.5, 0.5, 0.5]) == 0.0


@pytest.mark.parametrize("seed", range(3))
def test_macro_ovr_auc_matches_sklearn(seed):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 4, 400)
    logits = rng.normal(size=(400, 4)) + np.eye(4)[y] * 0.8
    logits = np.round(logits, 1)  # ties
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    want = roc_auc_score(y, probs, multi_class="ovr", average="macro")
    assert macro_ovr(y, probs, roc_auc) == pytest.approx(want, abs=1e-12)


def test_one_class_raises():
    with pytest.raises(ValueError, match="only one class"):
        roc_auc(np.ones(5), np.arange(5.0))
    with pytest.raises(ValueError, match="only one class"):
        ks_statistic(np.zeros(5), np.arange(5.0))
    with pytest.raises(ValueError, match="at least 2 classes"):
        macro_ovr(np.full(5, 2), np.full((5, 3), 1 / 3), roc_auc)


# ---------------------------------------------------------------- FIT/VAL/TEST split


def test_user_split_is_stratified_seeded_and_cut_at_the_fractions():
    rng = np.random.default_rng(0)
    labels = rng.integers(-1, 3, 1001)  # -1: unlabelled
    split = user_split(labels, seed=0, name="t", fractions=(0.5, 0.25, 0.25))
    assert (split[labels == -1] == UNLABELLED).all()
    for cls in (0, 1, 2):
        n = int((labels == cls).sum())
        counts = [int((split[labels == cls] == part).sum()) for part in (FIT, VAL, TEST)]
        assert counts == [round(0.5 * n), round(0.75 * n) - round(0.5 * n), n - round(0.75 * n)]
    assert (user_split(labels, 0, "t") == split).all()  # the default fractions, and seeded
    assert not (user_split(labels, 1, "t") == split).all()
    assert not (user_split(labels, 0, "other") == split).all()
    # new fractions move the cuts only: FIT stays when only VAL/TEST change
    moved = user_split(labels, 0, "t", (0.5, 0.1, 0.4))
    assert ((moved == FIT) == (split == FIT)).all() and (moved[split == TEST] == TEST).all()
    multilabel = user_split(rng.integers(0, 2, (40, 3)), 0, "m")
    assert [int((multilabel == p).sum()) for p in (FIT, VAL, TEST)] == [20, 10, 10]


@pytest.mark.parametrize("bad", [(0.5, 0.5), (0.5, 0.6, -0.1), (0.5, 0.25, 0.3), ("a", 0, 1)])
def test_bad_split_fractions_name_the_key(bad):
    with pytest.raises(ValueError, match=r"^probe\.split: expected three"):
        check_fractions(bad)


# ---------------------------------------------------------------- probe_embeddings


def make_target(name: str, labels: np.ndarray, kind: str, n_classes: int, seed: int = 0) -> Target:
    rng = np.random.default_rng(seed)
    labels = np.where(rng.random(len(labels)) < 0.1, -1, labels).astype(np.int64)  # some users unlabelled
    return Target(name=name, kind=kind, labels=labels, classes=[str(k) for k in range(n_classes)])


def test_probe_separable_vs_noise_and_keys():
    rng = np.random.default_rng(0)
    n = 2000
    yb = rng.integers(0, 2, n)
    ym = rng.integers(0, 3, n)
    binary, multi = make_target("churn", yb, "binary", 2), make_target("segment", ym, "multiclass", 3, seed=1)
    noise = rng.normal(size=(n, 8)).astype(np.float32)
    signal = noise.copy()
    signal[:, 0] += 4 * yb
    signal[:, 1:4] += 4 * np.eye(3)[ym]

    good = probe_embeddings(signal, [binary, multi])
    assert set(good) == {f"probe_{p}/{t}/{m}" for p in ("val", "test") for t in ("churn", "segment") for m in ("auc", "ks")}
    assert all(isinstance(v, float) for v in good.values())
    for part in ("val", "test"):
        assert good[f"probe_{part}/churn/auc"] > 0.9 and good[f"probe_{part}/segment/auc"] > 0.9
        assert good[f"probe_{part}/churn/ks"] > 0.7 and good[f"probe_{part}/segment/ks"] > 0.7

    chance = probe_embeddings(noise, [binary, multi], parts=("test",))
    assert set(chance) == {f"probe_test/{t}/{m}" for t in ("churn", "segment") for m in ("auc", "ks")}
    assert abs(chance["probe_test/churn/auc"] - 0.5) < 0.1
    assert abs(chance["probe_test/segment/auc"] - 0.5) < 0.1
    assert chance["probe_test/churn/ks"] < 0.2


def test_probe_uses_only_fit_rows_for_training():
    # Labels are readable from the embedding on VAL/TEST rows only if the probe was trained on FIT rows;
    # FIT rows carry the flipped relation, so leaking VAL or TEST into training would not give AUC near 0.
    rng = np.random.default_rng(0)
    n = 1000
    t = make_target("t", rng.integers(0, 2, n), "binary", 2)
    split = user_split(t.labels, 0, "t")
    x = rng.normal(size=(n, 2)).astype(np.float32)
    x[:, 0] += np.where(split == FIT, 3 * t.labels, 3 * (1 - t.labels))
    out = probe_embeddings(x, [t])
    assert out["probe_val/t/auc"] < 0.1 and out["probe_test/t/auc"] < 0.1


def test_val_only_probe_never_touches_test_users():
    # TEST users' embeddings are NaN: asking for VAL alone works (and gives the same VAL numbers), asking for TEST fails.
    rng = np.random.default_rng(1)
    n = 600
    t = make_target("t", rng.integers(0, 2, n), "binary", 2)
    x = rng.normal(size=(n, 4))
    x[:, 0] += t.labels
    both = probe_embeddings(x, [t])
    x[user_split(t.labels, 0, "t") == TEST] = np.nan
    assert probe_embeddings(x, [t], parts=("val",)) == {k: v for k, v in both.items() if k.startswith("probe_val/")}
    with pytest.raises(ValueError, match=r"'t'.*FIT/VAL/TEST users hold"):
        probe_embeddings(x, [t])
    with pytest.raises(ValueError, match="parts"):
        probe_embeddings(x, [t], parts=("eval",))


@pytest.mark.parametrize("C", [None, 0.05])
def test_probe_matches_sklearn_fit_on_fit_rows_only(C):
    # The reported AUCs equal a pipeline fitted by hand on FIT rows; with C=None that includes
    # choosing C by CV on FIT rows.
    from sklearn.linear_model import LogisticRegression, LogisticRegressionCV
    from sklearn.model_selection import StratifiedKFold
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    rng = np.random.default_rng(3)
    n = 600
    y = rng.integers(0, 2, n)
    x = rng.normal(size=(n, 20)).astype(np.float32)
    x[:, 0] += 0.8 * y
    t = make_target("t", y, "binary", 2)
    split = user_split(t.labels, 0, "t", (0.6, 0.2, 0.2))
    fit = split == FIT
    if C is None:
        folds = StratifiedKFold(5, shuffle=True, random_state=0)
        head = LogisticRegressionCV(Cs=CV_GRID, l1_ratios=(0.0,), cv=folds, scoring="roc_auc", max_iter=1000, random_state=0, use_legacy_attributes=False)
    else:
        head = LogisticRegression(C=C, max_iter=1000, random_state=0)
    model = make_pipeline(StandardScaler(), head).fit(x[fit], t.labels[fit])
    out = probe_embeddings(x, [t], (0.6, 0.2, 0.2), C=C)
    for part, code in (("val", VAL), ("test", TEST)):
        rows = split == code
        assert out[f"probe_{part}/t/auc"] == pytest.approx(roc_auc_score(t.labels[rows], model.predict_proba(x[rows])[:, 1]))


def test_probe_non_finite_raises_with_target_and_count():
    rng = np.random.default_rng(0)
    t = make_target("churn", rng.integers(0, 2, 200), "binary", 2)
    x = rng.normal(size=(200, 4))
    rows = np.flatnonzero(user_split(t.labels, 0, "churn") == FIT)[:3]
    x[rows, 1] = np.nan
    x[rows[0], 2] = np.inf
    with pytest.raises(ValueError, match=r"'churn'.* 4 non-finite"):
        probe_embeddings(x, [t])


# ---------------------------------------------------------------- embed_all


def make_store(n_users: int = 37, seed: int = 0) -> SequenceStore:
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, 9, n_users)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    n = int(offsets[-1])
    return SequenceStore(
        user_ids=np.arange(n_users),
        offsets=offsets,
        tokens={"a": rng.integers(5, 20, n).astype(np.int32)},
        values={"v": rng.normal(size=n).astype(np.float32)},
        times=np.sort(rng.integers(0, 10**7, n)).astype(np.int64),
        vocab_sizes={"a": 20},
    )


def shuffled_loader(store: SequenceStore, batch_size: int = 5, seed: int = 0) -> torch.utils.data.DataLoader:
    sampler = LengthBucketBatchSampler(store.lengths, batch_size=batch_size, shuffle=True, seed=seed, pool_batches=2)
    return torch.utils.data.DataLoader(
        UserIndexDataset(np.arange(len(store))), batch_sampler=sampler, collate_fn=Collator(store)
    )


class KnownEmbed(L.LightningModule):
    """embed(batch) = [index, length, token sum]: each row says which user it came from."""

    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(3, 3)
        self.calls: list[tuple[bool, bool]] = []
        self.order: list[np.ndarray] = []

    def embed(self, batch: dict) -> torch.Tensor:
        self.calls.append((self.training, torch.is_grad_enabled()))
        self.order.append(batch["index"].numpy())
        return torch.stack([batch["index"].float(), batch["lengths"].float(), batch["tokens"]["a"].sum(1).float()], 1)


def test_embed_all_places_rows_by_index():
    store = make_store()
    module = KnownEmbed()
    module.train()
    out = embed_all(module, shuffled_loader(store))

    seen = np.concatenate(module.order)
    assert not np.array_equal(seen, np.arange(len(store)))  # the batches really came shuffled
    token_sums = np.add.reduceat(store.tokens["a"].astype(np.int64), store.offsets[:-1])
    want = np.column_stack([np.arange(len(store)), store.lengths, token_sums]).astype(np.float32)
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out, want)
    assert all(c == (False, False) for c in module.calls)  # eval mode, no grad while embedding
    assert module.training  # training mode restored


def test_embed_all_rejects_missing_rows():
    store = make_store()
    rows = UserIndexDataset(np.arange(1, len(store)))  # row 0 missing
    loader = torch.utils.data.DataLoader(rows, batch_size=8, collate_fn=Collator(store))
    with pytest.raises(ValueError, match="exactly once"):
        embed_all(KnownEmbed(), loader)


# ---------------------------------------------------------------- LinearProbe in a Trainer


class TinyModel(L.LightningModule):
    """A trainable linear map of (log length, mean token id)."""

    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(2, 4)

    def embed(self, batch: dict) -> torch.Tensor:
        lengths = batch["lengths"].float()
        feats = torch.stack([lengths.log1p(), batch["tokens"]["a"].float().sum(1) / lengths], 1)
        return self.lin(feats)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        return self.embed(batch).pow(2).mean()

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self.log("val_loss", self.embed(batch).pow(2).mean(), batch_size=len(batch["index"]))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.01)


def run_probe_fit(tmp_path, every_n_epochs: int | None, max_epochs: int) -> tuple[LinearProbe, list[dict]]:
    store = make_store(n_users=200)
    target = make_target("long", (store.lengths > np.median(store.lengths)).astype(np.int64), "binary", 2)
    probe = LinearProbe([target], lambda: shuffled_loader(store, batch_size=32, seed=1), every_n_epochs=every_n_epochs)
    trainer = L.Trainer(
        max_epochs=max_epochs,
        accelerator="cpu",
        enable_progress_bar=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        logger=CSVLogger(tmp_path),
        log_every_n_steps=1,
        callbacks=[probe],
    )
    loader = shuffled_loader(store, batch_size=32)
    trainer.fit(TinyModel(), train_dataloaders=loader, val_dataloaders=shuffled_loader(store, batch_size=64))
    with open(trainer.logger.log_dir + "/metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    return probe, rows


def test_linear_probe_logs_val_only_at_fit_end(tmp_path):
    probe, rows = run_probe_fit(tmp_path, every_n_epochs=None, max_epochs=1)
    assert set(probe.results) == {"probe_val/long/auc", "probe_val/long/ks"}  # never TEST
    assert probe.embeddings is not None and probe.embeddings.shape == (200, 4)
    logged = [r for r in rows if r.get("probe_val/long/auc")]
    assert len(logged) == 1 and not any(k.startswith("probe_test/") for k in rows[0])
    assert float(logged[0]["probe_val/long/auc"]) == pytest.approx(probe.results["probe_val/long/auc"])
    assert float(logged[0]["probe_val/long/ks"]) == pytest.approx(probe.results["probe_val/long/ks"])
    assert probe.results["probe_val/long/auc"] > 0.9  # the label is a threshold on a feature the model sees


def test_linear_probe_every_n_epochs_skips_sanity_check(tmp_path):
    _, rows = run_probe_fit(tmp_path, every_n_epochs=1, max_epochs=2)
    logged = [r for r in rows if r.get("probe_val/long/auc")]
    assert len(logged) == 3  # end of validation epochs 0 and 1, then fit end; not the sanity check
