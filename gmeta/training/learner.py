"""gmeta as a library: the meta step on batches you build yourself.

::

    from gmeta import MetaLearner, task_batch

    learner = MetaLearner("configs/ads_cvr.yaml", ["meta.inner_steps=1"])  # or checkpoint="run/checkpoint"
    # raw ids (integers or strings) in the sparse columns, hashed as gmeta prepare does
    batch = task_batch(df, task="campaign_id", query="is_query", label="label",
                       sparse=learner.sparse_names, dense=learner.dense_names, features=learner.features)
    out = learner.step(batch)         # one meta-update; out.loss, out.query_loss [N] (tensors)
    p = learner.predict(batch)        # query-row predictions after adapting on each task's support rows
    learner.save("my-checkpoint")     # a gmeta checkpoint: gmeta evaluate / predict / resume read it

It runs the same code as ``gmeta train``: tables sharded by torchrec with their fused
optimizer, the dense part with (fused) Adam, one backward per meta-batch. With no process
group yet it makes a one-process group itself (gloo on CPU, NCCL on GPU); started under
torchrun it joins the job's group and every rank must call ``step`` alike.

Raw ids go through the model's id hash (``learner.id_hash``, carried by
``learner.features`` into ``task_batch``): the one of its checkpoint, or for a new model
that of the shards in ``data.shards_dir`` if there are any (their id counts may set the
model's default rows), else the current one. ``save`` records it, so serving, ``gmeta
predict --input`` and a reloaded learner hash raw ids alike.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from gmeta import checkpoint as ckpt
from gmeta.config import Config, load_config
from gmeta.io.features import ID_HASH, id_hash_of
from gmeta.io.id_counts import known_ids
from gmeta.io.manifest import MANIFEST, load_manifest
from gmeta.meta.base import MetaOutput
from gmeta.models.dlrm import build_model
from gmeta.parallel.dist import DenseGradSync, broadcast_params, init_distributed
from gmeta.parallel.sharding import shard_model
from gmeta.scoring import inner_steps_for, predict_query
from gmeta.storage import location
from gmeta.training.step import meta_step, train_step
from gmeta.types import TaskBatch


class MetaLearner:
    """A gmeta model and its optimizers in this process (see the module docstring).

    config     a Config, a YAML path, or None for the defaults (ignored with ``checkpoint``)
    overrides  ``key=value`` strings applied to the config
    checkpoint a gmeta checkpoint directory to start from (weights, and the optimizer states
               when it is a training checkpoint)
    """

    def __init__(self, config: Config | str | Path | None = None, overrides: list[str] | tuple = (), *,
                 checkpoint: str | Path | None = None) -> None:
        self.env = init_distributed()
        if checkpoint is not None:
            meta = ckpt.read_meta(checkpoint)
            self.cfg = ckpt.config_of(checkpoint, meta)
            self.steps = int(meta.get("step", 0))
            self.id_hash = id_hash_of(meta, str(location(checkpoint) / ckpt.META))
        else:
            self.cfg = config if isinstance(config, Config) else load_config(config, list(overrides))
            self.steps = 0
            self.id_hash = _shards_id_hash(self.cfg)
        torch.manual_seed(self.cfg.train.seed)
        self.model = shard_model(build_model(self.cfg, device=torch.device("meta")), self.cfg, self.env.device)
        params = self.model.module.dense_parameters()
        o = self.cfg.optim
        self.dense_opt = torch.optim.Adam(params, lr=o.dense_lr, weight_decay=o.dense_weight_decay, fused=True)
        if checkpoint is None:
            broadcast_params(params)
            self.model.module.set_known_ids(known_ids(self.cfg))  # (none without features.sparse[].min_count)
        elif meta.get("training_state"):
            ckpt.load_training_state(checkpoint, self.model, self.dense_opt)
        else:  # weights only: the optimizers start afresh
            state = self.model.state_dict()
            ckpt.load_weights(state, checkpoint)
            self.model.load_state_dict(state)
        self.grad_sync = DenseGradSync(params)

    @property
    def features(self) -> list[dict]:
        """The sparse features (name, num_embeddings, pooling, ..., and the model's
        ``id_hash``), in the model's order: what ``task_batch`` needs to hash raw ids."""
        return [{**f, "id_hash": self.id_hash} for f in self.model.module.features]

    @property
    def sparse_names(self) -> list[str]:
        return [f["name"] for f in self.features]

    @property
    def dense_names(self) -> list[str]:
        return list(self.cfg.features.dense)

    def _on_device(self, batch: TaskBatch) -> TaskBatch:
        return batch.to(self.env.device, non_blocking=True)

    def step(self, batch: TaskBatch) -> MetaOutput:
        """One meta-update on ``batch`` (MAML, or ERM under meta.algorithm=erm). A loss that
        is not finite updates nothing (``out.skipped``, a device tensor)."""
        out = train_step(self.model, self._on_device(batch), self.cfg, self.grad_sync, self.dense_opt)
        self.steps += 1
        return out

    def loss(self, batch: TaskBatch) -> MetaOutput:
        """The meta-loss of ``batch`` without any update (its graph is kept: backward works)."""
        return meta_step(self.model, self._on_device(batch), self.cfg)

    def predict(self, batch: TaskBatch, steps: int | None = None) -> np.ndarray:
        """Predictions for the query rows (query-block order: task by task) after ``steps``
        inner steps (default: ``gmeta.scoring.inner_steps_for``, eval.inner_steps if set, else
        meta.inner_steps; 0: no adaptation) on each task's support rows."""
        k = inner_steps_for(self.cfg, steps)
        return predict_query(self.model, self.cfg, self._on_device(batch), k)

    def save(self, path: str | Path) -> Path:
        """A training checkpoint (weights and optimizer states) at ``path``."""
        meta = {"step": self.steps, "epoch": 0, "epoch_done": False, "algorithm": self.cfg.meta.algorithm,
                "id_hash": self.id_hash}
        return ckpt.save(self.model, self.cfg, path, meta, dense_opt=self.dense_opt)



def _shards_id_hash(cfg: Config) -> int:
    """The id hash of the shards at ``data.shards_dir`` (a new model trained beside them, or
    on their id counts, must hash as they did), or the current one where there are none."""
    from gmeta.io.partitions import is_partitioned

    path = location(cfg.data.shards_dir) / MANIFEST
    try:
        found = path.is_file() or is_partitioned(path.parent)
    except OSError:  # (an object store's denied access: no shards to match)
        found = False
    return id_hash_of(load_manifest(cfg.data.shards_dir, cfg.data.partitions), str(path)) if found else ID_HASH
