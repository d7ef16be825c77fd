"""Each head of ``model.arch`` trained briefly on the debug data, once per test session, with
its model logged to MLflow by ``gmeta train`` (the serving checks of every head share them)."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from gmeta.config import load_config

ROOT = Path(__file__).resolve().parents[2]
DEBUG = ROOT / "configs" / "ads_cvr_debug.yaml"
ARCHS = ("dlrm", "dcn_v2", "deepfm", "wide_deep", "mmoe", "esmm")
TWO_LABEL_ARCHS = ("mmoe", "esmm")  # trained on click and conversion, as their configs are
STEPS = 4


def head_overrides(arch: str) -> list[str]:
    """The head and labels of configs/ads_cvr_<arch>.yaml (dlrm: ads_cvr.yaml), over the
    debug config's sizes (the experts' MLP sized down as the debug towers are)."""
    cfg = load_config(ROOT / "configs" / ("ads_cvr.yaml" if arch == "dlrm" else f"ads_cvr_{arch}.yaml"))
    m = cfg.model
    assert m.arch == arch
    out = [f"model.arch={arch}", f"model.cross_layers={m.cross_layers}", f"model.cross_rank={m.cross_rank}",
           f"model.cross_structure={m.cross_structure}"]
    if arch == "mmoe":
        out += [f"model.experts={m.experts}", "model.expert_arch=[16]"]
    if arch in TWO_LABEL_ARCHS:
        assert cfg.features.labels == ["label", "conversion"]
        out += [f"features.labels=[{', '.join(cfg.features.labels)}]",
                f"features.label_weights=[{', '.join(map(str, cfg.features.label_weights))}]"]
    return out


@dataclass
class TrainedHead:
    arch: str
    checkpoint: Path
    data: dict[str, Path]  # {"raw": dir, "shards": dir} it was trained on
    tracking_uri: str  # the SQLite store training logged its run and model to
    seconds: float  # gmeta train's wall time

    def model_uri(self) -> str:
        """The pyfunc model ``gmeta train`` logged (the one model of its experiment)."""
        import mlflow

        client = mlflow.MlflowClient(self.tracking_uri)
        (logged,) = client.search_logged_models([client.get_experiment_by_name(self.arch).experiment_id])
        return logged.model_uri


class HeadRuns:
    """``get(arch)``: that head trained (``STEPS`` meta-steps, one process, tracking into a
    SQLite store), on first use only."""

    def __init__(self, data_of, base: Path) -> None:
        self.data_of, self.base, self.runs = data_of, base, {}

    def __call__(self, arch: str) -> TrainedHead:
        from tests.support.cli import run_gmeta

        if arch not in self.runs:
            data = self.data_of(arch in TWO_LABEL_ARCHS)
            out = self.base / arch
            uri = f"sqlite:///{self.base / 'mlflow.db'}"
            t = time.perf_counter()
            p = run_gmeta(["train", "--config", DEBUG, "--nproc-per-node", "1", f"data.shards_dir={data['shards']}",
                           f"train.output_dir={out}", f"train.max_steps={STEPS}", "train.eval_at_end=false",
                           "tracking.enabled=true", f"tracking.uri={uri}", f"tracking.experiment={arch}",
                           "tracking.system_metrics_s=0", *head_overrides(arch)], cwd=self.base)
            assert p.returncode == 0, p.stderr[-4000:]
            self.runs[arch] = TrainedHead(arch, out / "checkpoint", data, uri, time.perf_counter() - t)
        return self.runs[arch]
