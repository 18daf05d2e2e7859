"""The collaborative-filtering blocks: iALS (fold-in against implicit's fitted item factors) and LightFM
(users from their features against lightfm's fitted user feature embeddings).

Every experiment preset is also smoke-run and re-embedded through experiments.embed in
tests/test_run.py; here what is particular to the methods.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from datamodules.config import DataConfig
from datamodules.preprocess import prepare
from datamodules.schema import FIRST_ID, MISSING, PAD
from datamodules.sequences import Collator
from experiments.build import build_module
from experiments.config import compose, to_dataclass
from lit_modules.ials import IALS, fit_als, fold_in
from lit_modules.ials_config import IALSConfig
from lit_modules.lightfm_block import fit_lightfm
from lit_modules.lightfm_block_config import LightFMConfig
from tests.helpers import with_pad_columns


def prepared_for(experiment: str, *args: str):
    cfg = compose([f"experiment={experiment}", *args])
    return OmegaConf.to_object(cfg.model), prepare(to_dataclass(cfg.data, DataConfig), cfg.seed)


@pytest.fixture(scope="module")
def ml100k_items(ml100k_cache):
    """(config, prepared data, module) of ials_item_ml100k: user x movie weighted by stars, fitted on the training users."""
    config, prepared = prepared_for("ials_item_ml100k", f"data.cache_dir={ml100k_cache}")
    return config, prepared, build_module(config, prepared)


def numpy_fold_in(cells: dict[int, float], y: np.ndarray, reg: float, alpha: float) -> np.ndarray:
    """implicit's user step written out for one user: cells = item -> summed weight."""
    a = y.T @ y + reg * np.eye(y.shape[1])
    b = np.zeros(y.shape[1])
    for i, w in cells.items():
        c = alpha * w
        if c > 0:
            b += c * y[i]
        a += (abs(c) - 1) * np.outer(y[i], y[i])
    return np.linalg.solve(a, b)


def test_fold_in_is_the_least_squares_user_step_with_repeats_negatives_and_pads():
    rng = np.random.default_rng(0)
    y = rng.normal(size=(12, 4))
    items = torch.tensor([[7, 5, 7, 9, 9, MISSING, PAD], [6, 6, 8, PAD, PAD, PAD, PAD]])
    weights = torch.tensor([[3.0, 1.0, 1.0, 2.0, -0.5, 4.0, 5.0], [1.0, -1.0, 2.0, 9.0, 9.0, 9.0, 9.0]])
    x = fold_in(items, weights, torch.from_numpy(y), 0.1, 2.0).numpy()
    np.testing.assert_allclose(x[0], numpy_fold_in({7: 4.0, 5: 1.0, 9: 1.5}, y, 0.1, 2.0), rtol=1e-10)
    np.testing.assert_allclose(x[1], numpy_fold_in({8: 2.0}, y, 0.1, 2.0), rtol=1e-10)  # item 6's +1 and -1 cancel: unobserved


def test_fold_in_of_training_users_is_implicits_own_user_step(ml100k_items):
    """The module's item factors are implicit's; fold-in equals implicit's exact recalculate_user, and
    stays close to the factors implicit stored (those came from its CG solve before the last item step)."""
    config, prepared, module = ml100k_items
    matrix = config.data_args(prepared)["user_items"]
    model = fit_als(matrix, config.factors, config.regularization, config.iterations, config.alpha, config.random_state)
    np.testing.assert_array_equal(module.item_factors.numpy(), model.item_factors)
    train = np.flatnonzero(~prepared.is_val)[:64]  # matrix rows 0..63 are these users
    x = module.embed(Collator(prepared.store)(train.tolist())).numpy()
    np.testing.assert_allclose(x, model.recalculate_user(np.arange(64), matrix[:64]), rtol=1e-4, atol=1e-4)
    stored = model.user_factors[:64]
    cosine = (x * stored).sum(1) / np.linalg.norm(x, axis=1) / np.linalg.norm(stored, axis=1)
    assert cosine.min() > 0.99


def test_embed_is_deterministic_and_ignores_padding_and_batch_mates(ml100k_items):
    config, prepared, module = ml100k_items
    again = build_module(config, prepared)
    torch.testing.assert_close(again.item_factors, module.item_factors, rtol=0, atol=0)
    collate = Collator(prepared.store)
    rows = [0, 5, 17, 40]
    batch = collate(rows)
    x = module.embed(batch)
    assert x.shape == (4, config.factors) and x.dtype == torch.float32
    torch.testing.assert_close(module.embed(batch), x, rtol=0, atol=0)
    torch.testing.assert_close(module.embed(with_pad_columns(batch)), x)
    alone = torch.cat([module.embed(collate([r])) for r in rows])
    torch.testing.assert_close(alone, x)


def test_rating_weights_reach_the_matrix(ml100k_items):
    """ials_item weights each rating by its stars: the matrix total is the sum of the training users' stars."""
    config, prepared, _ = ml100k_items
    matrix = config.data_args(prepared)["user_items"]
    store = prepared.store
    owner = np.repeat(np.arange(len(store)), store.lengths)
    stars = np.array([0.0] * FIRST_ID + [float(v) for v in prepared.vocabs["rating"]])[store.tokens["rating"]]
    assert matrix.shape[0] == (~prepared.is_val).sum()
    assert matrix.sum() == pytest.approx(stars[~prepared.is_val[owner]].sum())


@pytest.fixture(scope="module")
def recsys_categories(recsys_dir, tmp_path_factory):
    """(config, prepared data) of ials_category_recsys2025 on the small generated challenge layout."""
    return prepared_for("ials_category_recsys2025", f"data.path={recsys_dir}", f"data.cache_dir={tmp_path_factory.mktemp('cache')}")


def test_a_user_without_weighted_events_gets_the_zero_vector(recsys_categories):
    """iALS categories weighs buys and carts only: a user with page visits alone has b = 0, so x = 0."""
    config, prepared = recsys_categories
    module = build_module(config, prepared)
    store, types = prepared.store, prepared.vocabs["event_type"]
    weighted = [FIRST_ID + types.index(t) for t in ("product_buy", "add_to_cart")]
    owner = np.repeat(np.arange(len(store)), store.lengths)
    has = np.zeros(len(store), dtype=bool)
    has[owner[np.isin(store.tokens["event_type"], weighted)]] = True
    assert (~has).any() and has.any()
    x = module.embed(Collator(store)(np.arange(len(store)).tolist()))
    assert torch.all(x[~has] == 0)
    assert torch.all(x[has].norm(dim=1) > 0)


def test_rebuilt_without_data_it_has_the_shape_to_load_into(ml100k_items):
    """What experiments.embed.load_run builds: no users, so nothing fitted; the factors come from model.safetensors."""
    config, prepared, module = ml100k_items
    empty = build_module(config, type(prepared)(**{**vars(prepared), "store": empty_store_like(prepared), "is_val": np.zeros(0, bool)}))
    assert empty.item_factors.shape == module.item_factors.shape and not empty.item_factors.any()
    empty.load_state_dict(module.state_dict())
    batch = Collator(prepared.store)([3, 4])
    torch.testing.assert_close(empty.embed(batch), module.embed(batch), rtol=0, atol=0)


def empty_store_like(prepared):
    from datamodules.encode import state_of
    from experiments.finished_run import empty_store

    return empty_store(state_of(prepared.meta))


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"factors": 0}, "factors"),
        ({"alpha": 0.0}, "alpha"),
        ({"regularization": -1.0}, "regularization"),
        ({"weights": {"product_buy": 0}}, "weights"),
        ({"weights": {"product_buy": float("nan")}}, "weights"),
    ],
)
def test_bad_config_values_raise(overrides, match):
    with pytest.raises(ValueError, match=match):
        IALSConfig(**overrides)


def test_data_checks_name_the_key(ml100k_items):
    _, prepared, _ = ml100k_items
    with pytest.raises(ValueError, match=r"model.weights: \['6'\] are not values of the event type field 'rating'"):
        IALSConfig(field="item", weights={"5": 1, "6": 1}).data_args(prepared)
    with pytest.raises(ValueError, match="model.field: 'price'"):
        IALSConfig(field="price").data_args(prepared)


def test_a_codes_field_is_no_item_field(recsys_categories):
    with pytest.raises(ValueError, match="model.field: 'name' is a codes field"):
        IALSConfig(field="name").data_args(recsys_categories[1])


def test_module_checks_its_arguments():
    from scipy.sparse import csr_matrix

    with pytest.raises(ValueError, match="iterations"):
        IALS(3, None, [], csr_matrix((0, 3)), iterations=0)


@pytest.fixture(scope="module")
def recsys_lightfm(recsys_dir, tmp_path_factory):
    """(config, prepared data, module) of lightfm_recsys2025 (the paper's weights, name codes, query codes)."""
    config, prepared = prepared_for("lightfm_recsys2025", f"data.path={recsys_dir}", f"data.cache_dir={tmp_path_factory.mktemp('cache')}")
    return config, prepared, build_module(config, prepared)


def test_lightfm_embeds_training_users_as_lightfm_represents_them(recsys_lightfm):
    """The module's embeddings are lightfm's; embed from the batch equals get_user_representations of the training feature rows."""
    config, prepared, module = recsys_lightfm
    fit_data = config.data_args(prepared)["fit_data"]
    model = fit_lightfm(fit_data, config.factors, config.loss, config.learning_rate, config.item_alpha, config.user_alpha, config.epochs, config.random_state)
    np.testing.assert_array_equal(module.user_feature_embeddings.numpy(), model.user_embeddings)
    train = np.flatnonzero(~prepared.is_val)
    x = module.embed(Collator(prepared.store)(train.tolist())).numpy()
    _, expected = model.get_user_representations(fit_data["user_features"])
    np.testing.assert_allclose(x, expected, rtol=1e-5, atol=1e-6)


def test_lightfm_user_features_are_weighted_items_and_query_code_shares(recsys_lightfm):
    """One user by hand: item block = summed paper weights / their absolute sum; query block = mean one-hot of (position, code) / 16."""
    config, prepared, module = recsys_lightfm
    store, types = prepared.store, prepared.vocabs["event_type"]
    weight = {FIRST_ID + types.index(t): w for t, w in config.weights.items()}
    fit_data = config.data_args(prepared)["fit_data"]
    train = np.flatnonzero(~prepared.is_val)
    has_query = [(i, u) for i, u in enumerate(train) if (store.codes["query"][store.offsets[u] : store.offsets[u + 1], 0] > MISSING).any()]
    i, u = has_query[0]
    events = slice(store.offsets[u], store.offsets[u + 1])
    cells = np.zeros(module.hparams.n_items)
    for sku, kind in zip(store.tokens["sku"][events], store.tokens["event_type"][events]):
        if sku > MISSING:
            cells[sku] += weight.get(int(kind), 0.0)
    queries = store.codes["query"][events]
    queries = queries[queries[:, 0] > MISSING]
    vocab = store.vocab_sizes["query"]
    shares = np.zeros(16 * vocab)
    np.add.at(shares, (queries + vocab * np.arange(16)).ravel(), 1.0 / queries.size)
    row = fit_data["user_features"][i].toarray().ravel()
    np.testing.assert_allclose(row, np.concatenate([cells / max(np.abs(cells).sum(), 1e-38), shares]), rtol=1e-6, atol=1e-7)


def test_lightfm_embed_is_deterministic_and_ignores_padding_and_batch_mates(recsys_lightfm):
    config, prepared, module = recsys_lightfm
    torch.testing.assert_close(build_module(config, prepared).user_feature_embeddings, module.user_feature_embeddings, rtol=0, atol=0)
    collate = Collator(prepared.store)
    rows = [0, 9, 33, 70]
    batch = collate(rows)
    x = module.embed(batch)
    assert x.shape == (4, config.factors)
    padded = {**with_pad_columns(batch), "codes": {f: torch.nn.functional.pad(c, (0, 0, 0, 7)) for f, c in batch["codes"].items()}}
    torch.testing.assert_close(module.embed(padded), x)
    torch.testing.assert_close(torch.cat([module.embed(collate([r])) for r in rows]), x)


def test_lightfm_user_without_items_or_queries_gets_zeros_and_queries_alone_suffice(recsys_lightfm):
    """A new user who only visited pages has no feature at all: zeros. One with a search query alone: that query's codes."""
    _, prepared, module = recsys_lightfm
    batch = Collator(prepared.store)([0, 1])
    types = prepared.vocabs["event_type"]
    visit, search = FIRST_ID + types.index("page_visit"), FIRST_ID + types.index("search_query")
    batch["tokens"]["event_type"][:] = torch.tensor([[visit], [search]])
    batch["tokens"]["sku"][:] = MISSING
    batch["codes"]["query"][0] = MISSING
    batch["codes"]["query"][1] = FIRST_ID + torch.arange(16)
    x = module.embed(batch)
    assert torch.all(x[0] == 0)
    vocab = prepared.store.vocab_sizes["query"]
    first = module.hparams.n_items + vocab * torch.arange(16) + FIRST_ID + torch.arange(16)
    torch.testing.assert_close(x[1], module.user_feature_embeddings[first].mean(0))


def test_lightfm_rebuilt_without_data_has_the_shape_to_load_into(recsys_lightfm):
    config, prepared, module = recsys_lightfm
    empty = build_module(config, type(prepared)(**{**vars(prepared), "store": empty_store_like(prepared), "is_val": np.zeros(0, bool)}))
    assert empty.user_feature_embeddings.shape == module.user_feature_embeddings.shape and not empty.user_feature_embeddings.any()
    empty.load_state_dict(module.state_dict())
    batch = Collator(prepared.store)([3, 4])
    torch.testing.assert_close(empty.embed(batch), module.embed(batch), rtol=0, atol=0)


def test_lightfm_bad_values_raise(recsys_lightfm):
    with pytest.raises(ValueError, match="loss"):
        LightFMConfig(loss="warp-kos")
    with pytest.raises(ValueError, match="epochs"):
        LightFMConfig(epochs=0)
    with pytest.raises(ValueError, match="model.user_features: 'queries'"):
        LightFMConfig(user_features=["queries"]).data_args(recsys_lightfm[1])
