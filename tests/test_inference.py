"""karma.inference shortcuts of a frozen item tower: the on-disk catalog cache and the catalog
read from the history cache must equal running the tower."""

from __future__ import annotations

import torch

from karma.config import load_config
from karma.inference import catalog_from_history_cache, encode_catalog, refresh_history_cache
from karma.model import build_model

TEXTS = ["Toy Story (1995) Animation", "Heat (1995) Action Crime", "Casino (1995) Drama", "Babe"]


def _frozen_tower_model(tmp_path):
    cfg = load_config("configs/debug.yaml", [
        f"data.prepared_dir={tmp_path}/data", "model.lora=true", "model.train_item_tower=false",
        "model.history_source=cache", "model.item_ids=true",
    ])
    torch.manual_seed(0)
    model = build_model(cfg)
    model.init_item_ids(len(TEXTS), torch.tensor([True, True, True, False]))
    return model


def test_frozen_catalog_is_cached_on_disk_and_keyed_by_what_it_reads(tmp_path, tmp_karma_home):
    model = _frozen_tower_model(tmp_path)
    first = encode_catalog(model, TEXTS, batch_size=2, progress=False)
    files = list((tmp_karma_home / "catalog_cache").glob("*.pt"))
    assert len(files) == 1
    with torch.no_grad():
        model.item_id_emb.normal_()  # e_i changes, the frozen states do not
    again = encode_catalog(model, TEXTS, batch_size=2, progress=False)
    torch.testing.assert_close(again.item_hidden, first.item_hidden)
    assert not torch.allclose(again.item_emb, first.item_emb)
    assert len(list((tmp_karma_home / "catalog_cache").glob("*.pt"))) == 1  # a cache hit
    # the cached states equal a fresh pass of the tower
    files[0].unlink()
    fresh = encode_catalog(model, TEXTS, batch_size=2, progress=False)
    torch.testing.assert_close(fresh.item_hidden, again.item_hidden)
    torch.testing.assert_close(fresh.item_emb, again.item_emb)
    # another text, or another <ITEM> row, is another key
    encode_catalog(model, TEXTS[:3] + ["Babe (1995)"], batch_size=2, progress=False)
    with torch.no_grad():
        model.special_embeds.add_(0.1)
    encode_catalog(model, TEXTS, batch_size=2, progress=False)
    assert len(list((tmp_karma_home / "catalog_cache").glob("*.pt"))) == 3


def test_catalog_from_history_cache_equals_the_tower(tmp_path, tmp_karma_home):
    model = _frozen_tower_model(tmp_path)
    assert catalog_from_history_cache(model) is None  # no cache yet
    refresh_history_cache(model, TEXTS, batch_size=2)
    shortcut = catalog_from_history_cache(model)
    tower = encode_catalog(model, TEXTS, batch_size=2, progress=False)
    torch.testing.assert_close(shortcut.item_hidden, tower.item_hidden)
    torch.testing.assert_close(shortcut.item_emb, tower.item_emb)
    model.cfg.model.train_item_tower = True  # a trained tower's cache may be stale: no shortcut
    assert catalog_from_history_cache(model) is None


def test_without_a_query_another_users_history_gives_that_users_embedding(tmp_path):
    """evaluate's `other history` column reuses the own-history embeddings, permuted, when no
    example has a query; that shortcut is exact only if encode_users depends on nothing else
    (batch composition and length sorting included)."""
    from karma.evaluate import other_histories
    from karma.inference import encode_users

    model = _frozen_tower_model(tmp_path)
    catalog = encode_catalog(model, TEXTS, batch_size=2, progress=False)
    histories = [[0], [1, 2, 3], [3, 2], [0, 1, 2, 3, 1], [2]]
    perm = other_histories(histories)
    own = encode_users(model, histories, [""] * 5, catalog, batch_size=2)
    other = encode_users(model, [histories[j] for j in perm], [""] * 5, catalog, batch_size=3)
    torch.testing.assert_close(other, own[perm], atol=1e-5, rtol=1e-4)
