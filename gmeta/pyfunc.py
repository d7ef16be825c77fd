"""The MLflow pyfunc model of a checkpoint (``mlflow.pyfunc.load_model(uri).predict(df)``):
adapts on the DataFrame's support rows and scores its query rows with gmeta.serving."""

from __future__ import annotations

import pandas as pd
from mlflow.pyfunc import PythonModel

from gmeta.serving import score_rows


class GMetaModel(PythonModel):
    """pyfunc: ``predict(df, params={"inner_steps": K})`` -> DataFrame with ``score``."""

    def load_context(self, context) -> None:
        from gmeta.checkpoint import load_unsharded
        from gmeta.parallel.dist import default_device

        self.model, self.cfg, meta = load_unsharded(context.artifacts["checkpoint"], default_device())
        self.column_types = meta.get("input_columns")

    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None) -> pd.DataFrame:
        return score_rows(self.model, self.cfg, model_input, int((params or {}).get("inner_steps", -1)),
                          self.column_types)
