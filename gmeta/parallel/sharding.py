"""Shard the embedding tables of a MetaDLRM with torchrec.

The planner chooses placements under the sharding type the config allows; tables get a
fused optimizer from fbgemm (applied inside the backward of the lookup). Dense parts are
left unwrapped (see gmeta.parallel.dist).
"""

from __future__ import annotations

import logging
import os

import torch
import torch.distributed as dist
import torchrec.optim as trec_optim
from torchrec.distributed.embedding import EmbeddingCollectionSharder
from torchrec.distributed.model_parallel import DistributedModelParallel
from torchrec.distributed.planner import EmbeddingShardingPlanner, Topology
from torchrec.distributed.planner.types import ParameterConstraints
from torchrec.distributed.types import ShardingEnv
from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward

from gmeta.config import Config, ConfigError
from gmeta.models.dlrm import MetaDLRM

log = logging.getLogger(__name__)

# The fused optimizers fbgemm provides, by config name (optim.embedding_optimizer).
EMBEDDING_OPTIMIZERS = {
    "sgd": torch.optim.SGD,
    "adagrad": torch.optim.Adagrad,
    "rowwise_adagrad": trec_optim.RowWiseAdagrad,
    "adam": torch.optim.Adam,
}
# fbgemm's CPU kernels implement SGD and (row-wise) Adagrad; Adam is fused on GPU only.
CUDA_ONLY_OPTIMIZERS = {"adam"}


def table_sharding_types(model: MetaDLRM, cfg: Config) -> dict[str, str]:
    """Sharding type per table: a per-table override, else the default; and row-wise,
    whatever was asked, for a table larger than one process's memory budget."""
    s = cfg.sharding
    per_table = {t.name: t.sharding_type for t in s.tables}
    out = {}
    budget = s.memory_budget_mb * 2**20
    for f in model.features:
        kind = per_table.get(f["name"], s.sharding_type)
        table_bytes = f["num_embeddings"] * cfg.model.embedding_dim * 4
        if budget and table_bytes > budget and kind != "row_wise":
            log.info("table %s (%.1f MiB) exceeds sharding.memory_budget_mb=%s: sharded row-wise",
                     f["name"], table_bytes / 2**20, s.memory_budget_mb)
            kind = "row_wise"
        out[f["name"]] = kind
    return out


def shard_model(model: MetaDLRM, cfg: Config, device: torch.device) -> DistributedModelParallel:
    """Attach the fused embedding optimizer, plan, and shard ``model`` over the default group."""
    if device.type == "cpu" and cfg.optim.embedding_optimizer in CUDA_ONLY_OPTIMIZERS:
        raise ConfigError(f"optim.embedding_optimizer: {cfg.optim.embedding_optimizer!r} has a fused kernel in "
                          "fbgemm on GPU only; on CPU use one of "
                          f"{sorted(set(EMBEDDING_OPTIMIZERS) - CUDA_ONLY_OPTIMIZERS)}")
    opt_cls = EMBEDDING_OPTIMIZERS[cfg.optim.embedding_optimizer]
    apply_optimizer_in_backward(opt_cls, model.sparse_arch.parameters(), {"lr": cfg.optim.embedding_lr})
    world = dist.get_world_size()
    constraints = {}
    for f, kind in table_sharding_types(model, cfg).items():
        if kind != "auto":
            constraints[f"t_{f}"] = ParameterConstraints(sharding_types=[kind])
    # processes per machine as torchrun started them (intra-node links are faster)
    local = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    topology = Topology(world_size=world, compute_device=device.type, local_world_size=local)
    planner = EmbeddingShardingPlanner(topology=topology, constraints=constraints or None)
    sharders = [EmbeddingCollectionSharder()]
    pg = dist.GroupMember.WORLD
    plan = planner.collective_plan(model, sharders, pg)
    return DistributedModelParallel(
        model,
        env=ShardingEnv.from_process_group(pg),
        device=device,
        plan=plan,
        sharders=sharders,
        init_data_parallel=False,  # dense gradients are all-reduced explicitly
    )
