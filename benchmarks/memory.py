"""Memory of the MAML step vs. tasks per meta-batch N and inner steps K, first vs. second
order (one process, configs/ads_cvr.yaml model). The figure is the autograd graph's saved
tensors when the meta-loss is ready for its backward (unique storages, counted through
``torch.autograd.graph.saved_tensors_hooks``), from the looked-up rows on: the activation
memory that grows with N and K and that second order multiplies. It is exact and
repeatable, where the resident set size of a CPU process mostly shows the allocator. The
sharded lookup itself stays outside the count: fbgemm's fused table kernel keeps
references to the whole tables and their optimizer state for its backward (about 220 MiB on
ads_cvr), which are the model's state, not memory the step adds. Baseline for the ratio: first order, same N, K.

    python benchmarks/memory.py
"""

from __future__ import annotations

import argparse
import os
import tempfile
import weakref
from pathlib import Path

import torch
import torch.distributed as dist

from benchmarks.common import emit, ensure_data
from gmeta.config import MetaConfig
from gmeta.io.reader import TaskReader
from gmeta.meta.maml import maml_loss
from gmeta.models.dlrm import build_model
from gmeta.parallel.dist import free_port
from gmeta.parallel.sharding import shard_model


def saved_bytes(fn) -> int:
    """Bytes of the distinct storages autograd saves for backward while ``fn()`` runs and
    still holds when it returns (the output is kept alive until counted, so the graph is
    whole). Tensors are held weakly and counted at the end: a tensor saved by a graph that
    ``fn`` itself dropped is freed, and its address may be reused by a later one, so keying
    by address while ``fn`` runs would let the two overwrite each other."""
    saved: list[weakref.ref] = []

    def pack(t: torch.Tensor):
        if t.device.type != "meta":
            saved.append(weakref.ref(t))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    storages = {}
    for ref in saved:
        t = ref()
        if t is not None:
            storage = t.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
    del out
    return sum(storages.values())


def step_saved_mib(model, batch, m: MetaConfig, steps: int, first_order: bool) -> float:
    """MiB the MAML step's graph saves for its backward, from the rows the (sharded) lookup
    returns to the meta-loss; the lookup runs outside the count (see the module docstring)."""
    rows = model.lookup(batch.layout)
    return saved_bytes(lambda: maml_loss(model.head, rows, batch, batch.layout, steps=steps, lr=m.inner_lr,
                                         emb_lr=m.embedding_inner_lr, adapt_dense=m.adapt_dense,
                                         adapt_embeddings=m.adapt_embeddings, first_order=first_order).loss) / 2**20


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", default=str(Path(tempfile.gettempdir()) / "gmeta-bench"))
    args = ap.parse_args()
    cfg, _, shards = ensure_data(Path(args.workdir), 20_000)
    os.environ.update(RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    dist.init_process_group("gloo", rank=0, world_size=1)
    torch.manual_seed(0)
    model = shard_model(build_model(cfg, device=torch.device("meta")), cfg, torch.device("cpu")).module
    m = cfg.meta
    results = {}
    for n in (8, 32, 128):
        batch = next(iter(TaskReader(shards, "train", n, seed=0, size_buckets=m.size_buckets)))
        for k in (1, 2, 4):
            row = {order: step_saved_mib(model, batch, m, k, order == "first") for order in ("first", "second")}
            results[f"N{n}_K{k}"] = row
            print(f"N={n:4d} K={k}: {row['first']:7.1f} MiB saved for backward first order, {row['second']:7.1f} MiB "
                  f"second order (ratio {row['second'] / row['first']:.2f}x), {batch.num_rows} rows")
    emit("memory", results)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
