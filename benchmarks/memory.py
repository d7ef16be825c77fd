"""Peak memory of the MAML step vs. tasks per meta-batch N and inner steps K, first vs.
second order (one process, configs/ads_cvr.yaml model). Each configuration runs in its own
process; the figure is the rise of its resident-set high-water mark over the state just
before the first step. Baseline for the ratio: first order, same N and K.

    python benchmarks/memory.py
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

from benchmarks.common import ROOT, emit, ensure_data

CHILD = textwrap.dedent("""
    import json, os, sys, torch, torch.distributed as dist
    from pathlib import Path
    from benchmarks.common import ensure_data
    from gmeta.io.reader import TaskReader
    from gmeta.models.dlrm import build_model
    from gmeta.parallel.dist import free_port
    from gmeta.parallel.maml import maml_loss
    from gmeta.parallel.sharding import shard_model

    def status(key):
        for line in open("/proc/self/status"):
            if line.startswith(key):
                return int(line.split()[1]) / 1024

    n, k, first_order = int(sys.argv[2]), int(sys.argv[3]), sys.argv[4] == "first"
    cfg, _, shards = ensure_data(Path(sys.argv[1]), 20000)
    os.environ.update(RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    dist.init_process_group("gloo", rank=0, world_size=1)
    torch.manual_seed(0)
    model = shard_model(build_model(cfg, device=torch.device("meta")), cfg, torch.device("cpu")).module
    batches = list(TaskReader(shards, "train", n, seed=0))[:3]
    m = cfg.meta
    base = status("VmRSS")
    for batch in batches:
        out = maml_loss(model.head, model.lookup(batch.sparse), batch, num_features=model.num_features, steps=k,
                        lr=m.inner_lr, emb_lr=m.embedding_inner_lr, adapt_dense=m.adapt_dense,
                        adapt_embeddings=m.adapt_embeddings, first_order=first_order, size_buckets=m.size_buckets)
        out.loss.backward()
        for p in model.head.parameters():
            p.grad = None
    print(json.dumps({"peak_mib": status("VmHWM") - base}))
""")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", default=str(Path(tempfile.gettempdir()) / "gmeta-bench"))
    args = ap.parse_args()
    ensure_data(Path(args.workdir), 20_000)
    results = {}
    for n in (8, 32, 128):
        for k in (1, 3):
            row = {}
            for order in ("first", "second"):
                proc = subprocess.run([sys.executable, "-c", CHILD, args.workdir, str(n), str(k), order],
                                      capture_output=True, text=True, cwd=ROOT)
                if proc.returncode:
                    raise SystemExit(proc.stderr[-3000:])
                row[order] = json.loads(proc.stdout.strip().splitlines()[-1])["peak_mib"]
            results[f"N{n}_K{k}"] = row
            print(f"N={n:4d} K={k}: peak +{row['first']:7.1f} MiB first order, +{row['second']:7.1f} MiB second "
                  f"order (ratio {row['second'] / max(row['first'], 1e-9):.2f}x)")
    emit("memory", results)


if __name__ == "__main__":
    main()
