"""Unit-tier fixtures (no Ray)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from pivotal_ray.core.data import build_data
from pivotal_ray.core.models import build_model


@pytest.fixture
def predictions_here(monkeypatch) -> list[dict]:
    """extract_features replaced by what its actors do for kind="predictions", in this process
    (no Ray in the unit tier; tests/integration/test_extract.py runs the actors): the table and
    its features.json at output_path. Returns the calls' keyword arguments."""
    import pivotal_ray.distributed.extract as extract
    from pivotal_ray.core.baselines import PredictionExtractor

    calls: list[dict] = []

    def extract_here(**kw) -> str:
        calls.append(kw)
        assert kw["feature_spec"]["kind"] == "predictions"
        d = kw["data_spec"]
        bundle = build_data(d["data"], d["noise"], int(d["seed"]))  # as each actor rebuilds it
        split = bundle.train
        ids = np.asarray(kw["sample_ids"], dtype=np.int64)
        parts = []
        for k, snap in enumerate(kw["snapshots"]):
            model = build_model(kw["model_spec"], bundle.num_classes, bundle.input_shape)
            model.load_state_dict(torch.load(Path(snap["path"]) / "model.pt", weights_only=True))
            ext = PredictionExtractor(model=model.eval(), cfg=kw["feature_spec"], seed=0)
            parts.append(extract._to_arrow(ext.rows(sample_id=ids, snapshot=k, epoch=snap["epoch"],
                                                    x=split.inputs(split.positions_of(ids)), y=None)))
        out = Path(kw["output_path"])
        if out.exists():
            assert kw["overwrite"]
            shutil.rmtree(out)
        out.mkdir(parents=True)
        pq.write_table(pa.concat_tables(parts), out / "part-0.parquet")
        (out / "features.json").write_text(json.dumps({
            **extract.table_settings(kw["feature_spec"]), "snapshots": extract.snapshot_records(kw["snapshots"]),
            "num_samples": int(ids.size), "num_rows": int(ids.size) * len(kw["snapshots"]),
            "seed": int(d["seed"])}))
        return str(out)

    monkeypatch.setattr(extract, "extract_features", extract_here)
    return calls
