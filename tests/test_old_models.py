"""What gmeta wrote before its package was laid out by role still works: an MLflow model
whose pickled class bears the old module name (``gmeta.pyfunc.GMetaModel``) loads and
scores in a process that has imported the current gmeta, as it scores under the new name."""

from __future__ import annotations

import pickle
import shutil
from pathlib import Path

import cloudpickle
import mlflow
import numpy as np
import pandas as pd

from gmeta.checkpoint import load_unsharded
from gmeta.inference.pyfunc import GMetaModel
from gmeta.inference.serving import assign_roles


def test_the_old_module_name_of_the_model_class_is_the_current_class():
    assert pickle.loads(b"cgmeta.pyfunc\nGMetaModel\n.") is GMetaModel


def test_a_model_logged_under_the_old_module_name_scores_as_the_current_one(trained_head, tmp_path):
    run = trained_head("dlrm")
    mlflow.set_tracking_uri(run.tracking_uri)
    new_dir = Path(mlflow.artifacts.download_artifacts(run.model_uri(), dst_path=str(tmp_path / "new")))
    # the same model, its class pickled under the name a model logged before the move has
    python_model = mlflow.pyfunc.load_model(str(new_dir)).unwrap_python_model()
    assert type(python_model) is GMetaModel
    old_dir = tmp_path / "old"
    shutil.copytree(new_dir, old_dir)
    GMetaModel.__module__ = "gmeta.pyfunc"
    try:
        blob = cloudpickle.dumps(python_model)
    finally:
        GMetaModel.__module__ = "gmeta.inference.pyfunc"
    assert b"gmeta.pyfunc" in blob and b"gmeta.inference.pyfunc" not in blob
    (pkl,) = old_dir.glob("**/python_model.pkl")
    pkl.write_bytes(blob)

    _, cfg, _ = load_unsharded(run.checkpoint)
    raw = pd.read_parquet(run.data["raw"])
    keys = sorted(raw["campaign_id"].unique())[:6]
    rows = assign_roles(raw[raw["campaign_id"].isin(keys)].reset_index(drop=True), cfg)
    rows.loc[rows["role"] == "query", "label"] = np.nan
    new = mlflow.pyfunc.load_model(str(new_dir)).predict(rows, params={"inner_steps": 2})
    old = mlflow.pyfunc.load_model(str(old_dir))
    assert type(old.unwrap_python_model()) is GMetaModel
    pd.testing.assert_frame_equal(old.predict(rows, params={"inner_steps": 2}), new)
    query = (rows["role"] == "query").to_numpy()
    assert query.any() and new["score"].notna().to_numpy().tolist() == query.tolist()  # a score per query row
