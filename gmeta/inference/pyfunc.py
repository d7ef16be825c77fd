"""The MLflow pyfunc model of a checkpoint (``mlflow.pyfunc.load_model(uri).predict(df)``):
adapts on the DataFrame's support rows and scores its query rows with gmeta.inference.serving; and
``log_model``, which logs it. Apart from gmeta.inference.serving (no mlflow import there: importing
mlflow takes most of a second, which every predict worker process would pay)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
from mlflow.pyfunc import PythonModel

from gmeta.config import Config
from gmeta.inference.serving import example_rows, score_rows
from gmeta.io.errors import PrepareError


class GMetaModel(PythonModel):
    """pyfunc: ``predict(df, params={"inner_steps": K})`` -> DataFrame with ``score``, or
    with several labels (``features.labels``) ``score_<name>`` per label (``score_rows``;
    model.arch esmm: pCTR and pCTCVR)."""

    def load_context(self, context) -> None:
        from gmeta.checkpoint import META, load_unsharded
        from gmeta.io.features import id_hash_of
        from gmeta.parallel.dist import default_device

        path = context.artifacts["checkpoint"]
        self.model, self.cfg, meta = load_unsharded(path, default_device())
        self.column_types = meta.get("input_columns")
        self.id_hash = id_hash_of(meta, f"{path}/{META}")  # ids hash as the tables were trained

    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None) -> pd.DataFrame:
        return score_rows(self.model, self.cfg, model_input, int((params or {}).get("inner_steps", -1)),
                          self.column_types, id_hash=self.id_hash)


def log_model(checkpoint: str | Path, cfg: Config, model=None) -> str:
    """Log the checkpoint as a pyfunc model ("model") of the active MLflow run; returns its URI.
    With ``model`` (the checkpoint's, loaded) the model gets a signature inferred from an
    example of input rows (every label column, ``example_rows``) and its scores."""
    import mlflow
    from mlflow.models import infer_signature

    from gmeta.io.manifest import load_manifest

    try:
        column_types = load_manifest(cfg.data.shards_dir, cfg.data.partitions).get("input_columns")
    except PrepareError:
        column_types = None
    example = example_rows(cfg, column_types)
    signature = None
    if model is not None:
        from gmeta.checkpoint import META, read_meta
        from gmeta.io.features import id_hash_of

        id_hash = id_hash_of(read_meta(checkpoint), f"{checkpoint}/{META}")
        out = score_rows(model, cfg, example, column_types=column_types, id_hash=id_hash)
        signature = infer_signature(example, out, params={"inner_steps": -1})
    info = mlflow.pyfunc.log_model(
        name="model", python_model=GMetaModel(), artifacts={"checkpoint": str(checkpoint)},
        code_paths=[str(Path(__file__).resolve().parents[1])], signature=signature,  # (the gmeta package)
        pip_requirements=_requirements())
    return info.model_uri


def _requirements() -> list[str]:
    """Pinned requirements of the model's environment (named explicitly: inferring them
    would load the model once more in a subprocess)."""
    from importlib.metadata import PackageNotFoundError, version

    out = []
    for pkg in ("torch", "fbgemm-gpu-cpu", "torchrec", "pyarrow", "pandas", "numpy", "scikit-learn", "mlflow",
                "pyyaml", "webdataset", "fsspec", "s3fs", "universal_pathlib"):
        try:
            out.append(f"{pkg}=={version(pkg)}")
        except PackageNotFoundError:
            pass
    return out
