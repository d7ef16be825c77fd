"""Shard the embedding tables of a MetaDLRM with torchrec.

The planner chooses placements under the sharding type the config allows; tables get a
fused optimizer from fbgemm (applied inside the backward of the lookup). Dense parts are
left unwrapped (see gmeta.parallel.dist).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torchrec.optim as trec_optim
from torchrec.distributed.embedding import EmbeddingCollectionSharder
from torchrec.distributed.model_parallel import DistributedModelParallel
from torchrec.distributed.planner import EmbeddingShardingPlanner, Topology
from torchrec.distributed.planner.types import ParameterConstraints
from torchrec.distributed.types import ShardingEnv
from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward

from gmeta.config import Config
from gmeta.models.dlrm import MetaDLRM

# The fused optimizers fbgemm provides, by config name (optim.embedding_optimizer).
EMBEDDING_OPTIMIZERS = {
    "sgd": torch.optim.SGD,
    "adagrad": torch.optim.Adagrad,
    "rowwise_adagrad": trec_optim.RowWiseAdagrad,
    "adam": torch.optim.Adam,
}


def shard_model(model: MetaDLRM, cfg: Config, device: torch.device) -> DistributedModelParallel:
    """Attach the fused embedding optimizer, plan, and shard ``model`` over the default group."""
    opt_cls = EMBEDDING_OPTIMIZERS[cfg.optim.embedding_optimizer]
    apply_optimizer_in_backward(opt_cls, model.sparse_arch.parameters(), {"lr": cfg.optim.embedding_lr})
    world = dist.get_world_size()
    constraints = None
    if cfg.sharding.sharding_type != "auto":
        constraints = {
            f"t_{f['name']}": ParameterConstraints(sharding_types=[cfg.sharding.sharding_type])
            for f in model.features
        }
    topology = Topology(world_size=world, compute_device=device.type, local_world_size=world)
    planner = EmbeddingShardingPlanner(topology=topology, constraints=constraints)
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
