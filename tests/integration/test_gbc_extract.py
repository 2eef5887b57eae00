"""GBC on the Ray stages, through the gbc selector: extract_features(kind="gbc") on a Ray Data actor
pool -> dense parquet -> weighted K-means on shard actors + parameter server.

Toy set (600 train samples), a tiny MLP (largest tensor 8 x 8 = 64 > proj_dim = 16, so one
tensor is projected), two snapshots written the way the training stage writes them. The
reference is the GBC extractor run in this process with the seed the actors derive.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from pivotal_ray.config import DataConfig, ExperimentConfig, FeatureConfig, ModelConfig, NoiseConfig, to_dict
from pivotal_ray.core.data import build_data
from pivotal_ray.core.featuretable import DenseFeatures, parquet_files
from pivotal_ray.core.gbc import GBCExtractor
from pivotal_ray.core.kmeans import select_pivotal
from pivotal_ray.core.models import build_model
from pivotal_ray.core.seeding import derive_seed, numpy_rng
from pivotal_ray.distributed.extract import load_features
from pivotal_ray.selectors import SELECTORS, RoundContext

from .snapshot_dirs import write_snapshots

pytestmark = pytest.mark.integration

SEED = 5
DATA_SPEC = {"data": to_dict(DataConfig(name="toy")), "noise": to_dict(NoiseConfig()), "seed": SEED}
MODEL_SPEC = to_dict(ModelConfig(name="mlp", hidden=8, depth=2))
FEATURES = to_dict(FeatureConfig(kind="gbc", num_layers=3, proj_dim=16, num_snapshots=2, stride=1))
EPOCHS = (2, 3)
BATCH = 300  # two blocks: one per extraction actor


@pytest.fixture(scope="module")
def bundle():
    return build_data(DATA_SPEC["data"], DATA_SPEC["noise"], SEED)


@pytest.fixture(scope="module")
def snapshots(tmp_path_factory, bundle) -> list[dict]:
    # best first: K = 2 chosen
    return write_snapshots(tmp_path_factory.mktemp("run"), model_spec=MODEL_SPEC, bundle=bundle, epochs=EPOCHS,
                           seed_base=200, val_accs=(0.6, 0.5))


def _reference(bundle, snapshots, ids_in_order: np.ndarray) -> np.ndarray:
    """In-process GBC: fit over the candidates in the actors' order and batch size; rows sorted by id."""
    split = bundle.train
    blocks = []
    for k, snap in enumerate(snapshots):
        model = build_model(MODEL_SPEC, bundle.num_classes, bundle.input_shape)
        model.load_state_dict(torch.load(Path(snap["path"]) / "model.pt", weights_only=True))
        ext = GBCExtractor(model=model, cfg=FeatureConfig(**FEATURES), seed=derive_seed(SEED, "features", "gbc", k))
        ext.fit((split.inputs(split.positions_of(ids_in_order[s:s + BATCH])),
                 torch.as_tensor(split.y_obs[split.positions_of(ids_in_order[s:s + BATCH])]))
                for s in range(0, ids_in_order.size, BATCH))
        sorted_ids = np.sort(ids_in_order)
        blocks.append(ext.extract(split.inputs(split.positions_of(sorted_ids)), None)["g"])
    return np.concatenate(blocks, axis=1)  # (n, K*W)


def test_gbc_selector_extracts_gbc_and_clusters_on_shard_actors(ray_session, tmp_path, bundle, snapshots) -> None:
    """The gbc selector on a round whose config says features.kind=rbc: it must extract GBC rows
    (dense table, documented schema, equal to the in-process extractor), and its distributed
    weighted K-means must pick what the in-memory run picks on the same table."""
    cfg = to_dict(ExperimentConfig(data=DataConfig(name="toy"), model=ModelConfig(name="mlp", hidden=8, depth=2),
                                   seed=SEED))
    cfg["features"].update({k: FEATURES[k] for k in ("num_layers", "proj_dim", "num_snapshots", "stride")},
                           batch_size=BATCH)
    cfg["ray"].update(kmeans_shards=2, extract_actors=2, extract_cpus=0.5)
    cfg["selection"].update(kmeans_max_iter=20)
    assert cfg["features"]["kind"] == "rbc"
    run = SimpleNamespace(best_epoch=EPOCHS[0], snapshots=snapshots,
                          extra={"history": [{"epoch": s["epoch"], "val_acc": s["val_acc"]} for s in snapshots]},
                          snapshot=lambda e: next(s for s in snapshots if s["epoch"] == e))
    meta = np.sort(numpy_rng(1, "meta").choice(bundle.train.sample_id, size=3, replace=False))
    ctx = RoundContext(cfg=cfg, bundle=bundle, meta_ids=meta, run=run, round=1, work_dir=tmp_path)
    picks = SELECTORS.get("gbc")(ctx, 4)
    assert ctx.timings["snapshot_epochs"] == list(EPOCHS)

    out = tmp_path / "features_gbc"
    assert json.loads((out / "features.json").read_text())["kind"] == "gbc"
    files = parquet_files(out)
    W = 3 * 16  # R blocks of B = min(64, proj_dim) floats
    assert pq.read_schema(files[0]).field("g").type == pa.list_(pa.float32(), W)
    table = pa.concat_tables([pq.read_table(f) for f in files])
    assert table.num_rows == 2 * 600
    np.testing.assert_array_equal(table.column("epoch").to_numpy(),
                                  np.asarray(EPOCHS)[table.column("snapshot").to_numpy()])
    feats = load_features(out)  # dispatches on the g column
    assert isinstance(feats, DenseFeatures) and feats.G.shape == (600, 2 * W)
    np.testing.assert_array_equal(feats.sample_id, bundle.train.sample_id)
    # both actors fitted on every candidate in the same order with the same seed: their rows agree
    # with one in-process extractor, so they drew the same tensors (tolerance: thread-count rounding)
    ref = _reference(bundle, snapshots, bundle.train.sample_id)
    np.testing.assert_allclose(feats.G, ref, rtol=1e-4, atol=1e-6)

    assert picks.sample_id.size == 4 and np.unique(picks.sample_id).size == 4
    assert not np.isin(picks.sample_id, meta).any()
    s = cfg["selection"]
    local = select_pivotal(feats, budget=4, meta_ids=meta, exclude_frac=s["exclude_frac"], weighted=True,
                           init=s["kmeans_init"], max_iter=s["kmeans_max_iter"], tol=s["kmeans_tol"],
                           seed=derive_seed(SEED, "kmeans", 1))
    np.testing.assert_array_equal(picks.sample_id, local.sample_id)
