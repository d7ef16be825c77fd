"""Shard the embedding tables of a MetaDLRM with torchrec.

The planner chooses placements under the sharding type the config allows; tables get a
fused optimizer from fbgemm (applied inside the backward of the lookup). Dense parts are
left unwrapped (see gmeta.parallel.dist). ``plan_report`` runs the same planner for a
cluster that is not there (``gmeta plan``): placements and the planner's per-rank memory
and cost estimates, without a process group.
"""

from __future__ import annotations

import logging
import os

import torch
import torch.distributed as dist
import torchrec.optim as trec_optim
from fbgemm_gpu.split_table_batched_embeddings_ops_training import WeightDecayMode
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
# The fused optimizers with a weight decay in fbgemm, and the mode they are given: row-wise
# Adagrad adds wd x row to the gradient (L2, like torch's Adagrad). fbgemm's Adam kernel takes
# no mode: its decay is always the decoupled form (row -= lr x wd x row, as AdamW), and
# ``weight_decay_mode`` is no argument of the torch Adam it is configured through (None).
# fbgemm's sgd and (full) adagrad have none.
WEIGHT_DECAY_MODES: dict[str, WeightDecayMode | None] = {"rowwise_adagrad": WeightDecayMode.L2, "adam": None}


def embedding_optimizer_kwargs(cfg: Config) -> dict:
    """The keyword arguments of the tables' fused optimizer (``optim.embedding_*``), as the
    optimizer class of ``EMBEDDING_OPTIMIZERS`` takes them: torchrec constructs it with them
    (``apply_optimizer_in_backward``), then hands them to fbgemm."""
    kwargs: dict = {"lr": cfg.optim.embedding_lr}
    wd = cfg.optim.embedding_weight_decay
    if wd:
        name = cfg.optim.embedding_optimizer
        if name not in WEIGHT_DECAY_MODES:
            raise ConfigError(f"optim.embedding_weight_decay: fbgemm's {name!r} has no weight "
                              f"decay; use optim.embedding_optimizer one of {sorted(WEIGHT_DECAY_MODES)}")
        kwargs["weight_decay"] = wd
        mode = WEIGHT_DECAY_MODES[name]
        if mode is not None:
            kwargs["weight_decay_mode"] = mode
    return kwargs


def table_sharding_types(model: MetaDLRM, cfg: Config) -> dict[str, str]:
    """Sharding type per table: a per-table override, else the default; and row-wise,
    whatever was asked, for a table larger than one process's memory budget."""
    s = cfg.sharding
    per_table = {t.name: t.sharding_type for t in s.tables}
    out: dict[str, str] = {}
    budget = s.memory_budget_mb * 2**20
    for f in model.features:
        if f.get("table"):  # reads the table of the feature it names: no table of its own
            continue
        kind = per_table.get(f["name"], s.sharding_type)
        table_bytes = f["num_embeddings"] * cfg.model.embedding_dim * 4
        if budget and table_bytes > budget and kind != "row_wise":
            log.info("table %s (%.1f MiB) exceeds sharding.memory_budget_mb=%s: sharded row-wise",
                     f["name"], table_bytes / 2**20, s.memory_budget_mb)
            kind = "row_wise"
        out[f["name"]] = kind
    return out


# What ``auto`` lets the planner choose from: the model-parallel kinds, whose gradients
# reach the owning shard through torchrec's all-to-all / reduce-scatter. Never
# data_parallel: a replicated table's gradients would need an all-reduce that nothing
# runs (gmeta does not wrap the model in DDP, see gmeta.parallel.dist).
AUTO_SHARDING_TYPES = ["table_wise", "row_wise", "column_wise"]


def device_memory(device: torch.device) -> int:
    """Bytes of memory of the job's GPUs: ``device``'s, or the smallest of every rank's when
    a process group runs (the planner places every rank's shards against one cap)."""
    total = torch.cuda.get_device_properties(device).total_memory
    if dist.is_initialized() and dist.get_world_size() > 1:
        least = torch.tensor([total], dtype=torch.int64, device=device)
        dist.all_reduce(least, op=dist.ReduceOp.MIN)
        total = int(least.item())  # once, before sharding
    return total


def host_memory_per_process(local_world: int) -> int:
    """Bytes of this machine's memory per process of the job on it."""
    import psutil

    return psutil.virtual_memory().total // local_world


def make_planner(model: MetaDLRM, cfg: Config, device_type: str, world: int, local_world: int,
                 batch_rows: int | None = None, hbm_cap: int | None = None,
                 ddr_cap: int | None = None) -> EmbeddingShardingPlanner:
    """Attach the fused embedding optimizer to ``model``'s tables and return torchrec's planner
    for ``world`` processes, ``local_world`` per machine, constrained by the config's sharding.
    ``hbm_cap`` / ``ddr_cap``: bytes of GPU / host memory per process (None: torchrec's
    defaults, 32 GiB and 128 GiB); torchrec ignores ``hbm_cap`` on the CPU, where the tables
    live in host memory."""
    if device_type == "cpu" and cfg.optim.embedding_optimizer in CUDA_ONLY_OPTIMIZERS:
        raise ConfigError(f"optim.embedding_optimizer: {cfg.optim.embedding_optimizer!r} has a fused kernel in "
                          "fbgemm on GPU only; on CPU use one of "
                          f"{sorted(set(EMBEDDING_OPTIMIZERS) - CUDA_ONLY_OPTIMIZERS)}")
    if world % local_world:
        raise ConfigError(f"world size {world} is not a multiple of the processes per node ({local_world})")
    opt_cls = EMBEDDING_OPTIMIZERS[cfg.optim.embedding_optimizer]
    apply_optimizer_in_backward(opt_cls, model.sparse_arch.parameters(), embedding_optimizer_kwargs(cfg))
    constraints = {f"t_{f}": ParameterConstraints(sharding_types=AUTO_SHARDING_TYPES if kind == "auto" else [kind])
                   for f, kind in table_sharding_types(model, cfg).items()}
    topology = Topology(world_size=world, compute_device=device_type, local_world_size=local_world, hbm_cap=hbm_cap,
                        ddr_cap=ddr_cap)
    extra = {"batch_size": batch_rows} if batch_rows else {}
    return EmbeddingShardingPlanner(topology=topology, constraints=constraints, **extra)


def shard_model(model: MetaDLRM, cfg: Config, device: torch.device) -> DistributedModelParallel:
    """Attach the fused embedding optimizer, plan, and shard ``model`` over the default group."""
    world = dist.get_world_size()
    # processes per machine as torchrun started them (intra-node links are faster)
    local = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    # the memory there is, not torchrec's defaults (32 GiB of GPU memory, 128 GiB of host memory)
    hbm = device_memory(device) if device.type == "cuda" else None
    planner = make_planner(model, cfg, device.type, world, local, hbm_cap=hbm, ddr_cap=host_memory_per_process(local))
    model.dense_to(device)  # every dense parameter on this process's device before DMP
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


def plan_report(cfg: Config, world: int, local_world: int, device_type: str, batch_rows: int | None = None) -> dict:
    """The sharding plan for ``world`` processes (``local_world`` per node) on ``device_type``,
    without running: per table its sharding type, kernel and shards; per rank the planner's
    storage (device memory for tables and optimizer state, host memory) and its estimated
    time of the embedding part of a step split into compute and communication, in
    milliseconds (torchrec's unit) for ``batch_rows`` rows per rank and step (the planner's
    default when None). The cluster's GPUs are taken to be this machine's GPU when it has
    one; else torchrec's default of 32 GiB stands in (``hbm_cap_from`` says which)."""
    from gmeta.models.dlrm import build_model

    model = build_model(cfg, device=torch.device("meta"))
    here = device_type == "cuda" and torch.cuda.is_available()
    hbm = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory if here else None
    planner = make_planner(model, cfg, device_type, world, local_world, batch_rows, hbm_cap=hbm)
    planner.plan(model, [EmbeddingCollectionSharder()])
    ranks = [{"rank": r, "node": r // local_world, "hbm_mib": 0.0, "ddr_mib": 0.0, "compute_ms": 0.0,
              "comms_ms": 0.0} for r in range(world)]
    tables = []
    for so in planner._best_plan:  # torchrec keeps the chosen ShardingOptions here (no public accessor)
        tables.append({"table": so.name[len("t_"):], "rows": so.tensor.shape[0], "dim": so.tensor.shape[1],
                       "sharding_type": so.sharding_type, "compute_kernel": so.compute_kernel,
                       "ranks": sorted({s.rank for s in so.shards})})
        for sh in so.shards:
            r = ranks[sh.rank]
            r["hbm_mib"] += sh.storage.hbm / 2**20
            r["ddr_mib"] += sh.storage.ddr / 2**20
            p = sh.perf
            r["compute_ms"] += p.fwd_compute + p.bwd_compute + p.prefetch_compute
            r["comms_ms"] += p.fwd_comms + p.bwd_comms + p.input_dist_comms
    t = planner._topology
    return {"world_size": world, "local_world_size": local_world, "nodes": world // local_world,
            "device": device_type, "batch_rows": planner._batch_size,
            "hbm_cap_mib": t.devices[0].storage.hbm / 2**20, "ddr_cap_mib": t.devices[0].storage.ddr / 2**20,
            "hbm_cap_from": ("this machine's GPU" if here else "torchrec's default: no GPU here")
            if device_type == "cuda" else "",
            "tables": tables, "ranks": ranks}


def format_plan(report: dict) -> str:
    """``plan_report`` as two plain-text tables (tables, then ranks)."""
    r = report
    lines = [f"sharding plan: {r['world_size']} processes = {r['nodes']} node(s) x {r['local_world_size']}, "
             f"{r['device']}, {r['batch_rows']} rows per rank and step"
             + (f"; {r['hbm_cap_mib'] / 1024:.1f} GiB of GPU memory per rank ({r['hbm_cap_from']})"
                if r["device"] == "cuda" else ""),
             "", f"{'table':<16} {'rows':>12} {'dim':>4}  {'sharding':<12} {'kernel':<10} ranks"]
    for t in r["tables"]:
        rk = t["ranks"]
        where = f"{rk[0]}" if len(rk) == 1 else f"{len(rk)} ranks ({rk[0]}..{rk[-1]})"
        lines.append(f"{t['table']:<16} {t['rows']:>12,} {t['dim']:>4}  {t['sharding_type']:<12} "
                     f"{t['compute_kernel']:<10} {where}")
    mem = "hbm_mib" if r["device"] == "cuda" else "ddr_mib"
    cap = r["hbm_cap_mib"] if r["device"] == "cuda" else r["ddr_cap_mib"]
    lines += ["", f"{'rank':>4} {'node':>4}  {'table memory MiB':>16} {'of cap':>7}  {'compute ms':>10} "
              f"{'comms ms':>9}  (planner's estimates per step)"]
    for k in r["ranks"]:
        lines.append(f"{k['rank']:>4} {k['node']:>4}  {k[mem]:>16,.1f} {100 * k[mem] / cap:>6.2f}%  "
                     f"{k['compute_ms']:>10.3f} {k['comms_ms']:>9.3f}")
    worst = max(r["ranks"], key=lambda k: k["compute_ms"] + k["comms_ms"])
    lines.append(f"slowest rank: {worst['rank']} ({worst['compute_ms'] + worst['comms_ms']:.3f} ms of "
                 "embedding compute and communication per step)")
    return "\n".join(lines)
