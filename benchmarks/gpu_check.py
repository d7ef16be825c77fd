"""The GPU check: gmeta's CUDA path against its CPU path, host syncs in the training step,
evaluation and prediction on the GPU, and the GPU benchmarks. Each figure is printed as soon
as it is measured; one table closes the run. ``scripts/gpu_check.sh`` installs the CUDA
stack and runs this; ``--device cpu`` runs every part on the CPU (to test this script on a
machine without a GPU: the figures then say nothing about a GPU).

Parts:
  equal    3 training steps (MAML second and first order, ERM) with tables sharded on the
           GPU equal the same steps on the CPU, within ``TOL`` (TF32 off)
  sync     ``torch.cuda.set_sync_debug_mode("error")`` around the lookup and the training
           step of a pipelined loop, on batches whose layouts the reader built (as in
           training); the host syncs of torchrec's input_dist, counted apart
  serve    evaluation (AUC/GAUC) and ``gmeta predict`` scores on the GPU equal the CPU's
  bench    rows/s of full training steps (ERM, MAML first and second order) at N = 32 and
           256 on the ads_cvr model and on the Criteo-shaped model; the meta step against
           every contender of benchmarks/meta_step.py (the per-task torch.func loop,
           torch.func.vmap, ...) at N = 128 on both; the
           share of step time in host syncs and copies (profiler); the embedding all-to-all
           bytes per step, with the planner's estimate for 1, 2 and 4 nodes of 8 GPUs

    python -m benchmarks.gpu_check [--device cuda] [--parts equal sync serve bench] [--quick]
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch
import torch.distributed as dist

from benchmarks.common import ROOT, emit, ensure_data
from benchmarks.meta_step import alternated, criteo_batch, criteo_config, step_fns
from gmeta.config import Config, load_config
from gmeta.io.prepare import prepare
from gmeta.io.reader import TaskReader
from gmeta.io.synth import generate
from gmeta.layout import cell_widths, layout_of
from gmeta.models.dlrm import build_model
from gmeta.parallel.dist import DenseGradSync, free_port
from gmeta.parallel.pipeline import SparseDistPipeline
from gmeta.parallel.sharding import plan_report, shard_model
from gmeta.training.step import run_steps, train_step

DEBUG = ROOT / "configs" / "ads_cvr_debug.yaml"
TOL = 1e-4  # float32, kernels that sum in another order than the CPU's

ROWS: list[tuple[str, str, str, str]] = []  # (part, what, figure, target / verdict)


def report(part: str, what: str, figure: str, target: str = "") -> None:
    ROWS.append((part, what, figure, target))
    print(f"[{part}] {what}: {figure}" + (f"   ({target})" if target else ""), flush=True)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fns: dict, repeats: int, device: torch.device) -> dict[str, float]:
    """Median seconds per call, calls interleaved, the device drained around each."""
    return alternated(fns, repeats, drain=lambda: sync(device))


def debug_shards(work: Path) -> Path:
    cfg = load_config(DEBUG)
    raw, shards = work / "debug-raw", work / "debug-shards"
    if not (shards / "manifest.json").is_file():
        generate(cfg, raw)
        prepare(cfg, raw, shards)
    return shards


def _local(t):
    return t.local_shards()[0].tensor if hasattr(t, "local_shards") else t


def sharded(cfg: Config, device: torch.device, like=None):
    """A model sharded on ``device`` (one process), its Adam and gradient sync; with ``like``,
    its tables and dense weights copied from that model."""
    torch.manual_seed(0)
    model = shard_model(build_model(cfg, device=torch.device("meta")), cfg, device)
    if like is not None:
        src = like.state_dict()
        with torch.no_grad():
            for k, v in model.state_dict().items():
                _local(v).copy_(_local(src[k]))
    params = model.module.dense_parameters()
    return model, torch.optim.Adam(params, lr=1e-3, fused=True), DenseGradSync(params)


def batches_of(shards: Path, cfg: Config, device: torch.device, seed: int) -> TaskReader:
    """Meta-batches as training reads them: each with the layout the reader built for the
    config's size buckets (without one, the step would rebuild it on the host from the
    device's tensors, and the sync part would count those copies as torchrec's), pinned
    for a GPU."""
    return TaskReader(shards, "train", cfg.meta.tasks_per_batch, seed=seed, size_buckets=cfg.meta.size_buckets,
                      pin_memory=device.type == "cuda")


def part_equal(work: Path, device: torch.device) -> None:
    shards = debug_shards(work)
    batches = [b for _, b in zip(range(3), batches_of(shards, load_config(DEBUG, ["meta.tasks_per_batch=8"]),
                                                      device, seed=0))]
    for name, extra in (("MAML second order", []), ("MAML first order", ["meta.first_order=true"]),
                        ("ERM", ["meta.algorithm=erm"]), ("MAML, Meta-SGD", ["meta.meta_sgd=true"])):
        cfg = load_config(DEBUG, [*extra, "meta.tasks_per_batch=8"])
        cpu, cpu_opt, cpu_sync = sharded(cfg, torch.device("cpu"))
        dev, dev_opt, dev_sync = sharded(cfg, device, like=cpu)
        losses = []
        for b in batches:
            a = train_step(cpu, b, cfg, cpu_sync, cpu_opt)
            o = train_step(dev, b.to(device), cfg, dev_sync, dev_opt)
            losses.append(abs(float(a.loss) - float(o.loss)))
        sc, sd = cpu.state_dict(), dev.state_dict()
        diff = max(float((_local(sc[k]).float() - _local(sd[k]).float().cpu()).abs().max()) for k in sc)
        report("equal", f"{name}: 3 steps on {device.type} vs cpu, largest parameter difference",
               f"{diff:.2e} (loss {max(losses):.2e})", "PASS" if diff <= TOL else f"FAIL (tolerance {TOL})")


def part_sync(work: Path, device: torch.device) -> None:
    shards = debug_shards(work)
    for name, extra in (("MAML second order", []), ("ERM", ["meta.algorithm=erm"])):
        cfg = load_config(DEBUG, [*extra, "meta.tasks_per_batch=8"])
        model, opt, gsync = sharded(cfg, device)
        pipe = SparseDistPipeline(model.module, cfg.meta.size_buckets, device)
        it = iter(batches_of(shards, cfg, device, seed=1))
        pending = pipe.start(next(it))
        counted, failure = 0, ""
        for _ in range(4):
            with warnings.catch_warnings(record=True) as seen:
                warnings.simplefilter("always")
                if device.type == "cuda":
                    torch.cuda.set_sync_debug_mode("warn")
                nxt = pipe.start(next(it))
                if device.type == "cuda":
                    torch.cuda.set_sync_debug_mode(0)
            counted += sum("synchroniz" in str(w.message) for w in seen)
            try:
                if device.type == "cuda":
                    torch.cuda.set_sync_debug_mode("error")
                rows = pipe.lookup(pending)
                train_step(model, pending.batch, cfg, gsync, opt, rows=rows)
            except RuntimeError as e:
                failure = failure or str(e).splitlines()[0]
            finally:
                if device.type == "cuda":
                    torch.cuda.set_sync_debug_mode(0)
            pipe.wait_ids(nxt)
            pending = nxt
        report("sync", f"{name}: lookup + training step under set_sync_debug_mode('error'), 4 steps",
               "no host sync" if not failure else failure[:120], "PASS" if not failure else "FAIL")
        report("sync", f"{name}: host syncs in input_dist of the next batch (torchrec's split sizes)",
               f"{counted / 4:.1f} per step", "outside the step, on the side stream")


def _train_checkpoint(work: Path, device: torch.device) -> Path:
    shards = debug_shards(work)
    out = work / "serve-run"
    if not (out / "checkpoint" / "meta.json").is_file():
        # a job of its own: not a worker of this process's one-process group
        env = {k: v for k, v in os.environ.items()
               if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
        if device.type == "cpu":
            env["CUDA_VISIBLE_DEVICES"] = ""
        p = subprocess.run([sys.executable, "-m", "gmeta.cli", "train", "--config", str(DEBUG), "--nproc-per-node",
                            "1", f"data.shards_dir={shards}", f"train.output_dir={out}", "train.max_steps=30",
                            "train.eval_at_end=false", "tracking.enabled=false"], capture_output=True, text=True,
                           env=env, cwd=work)
        if p.returncode:
            raise RuntimeError(p.stderr[-3000:])
    return out / "checkpoint"


def part_serve(work: Path, device: torch.device) -> None:
    from gmeta.checkpoint import load_unsharded
    from gmeta.evaluation.evaluate import evaluate
    from gmeta.inference.predict import run_predict

    t = time.perf_counter()
    ckpt = _train_checkpoint(work, device)
    report("serve", f"gmeta train (1 process, 30 steps) on {device.type}", f"{time.perf_counter() - t:.1f} s")
    shards = debug_shards(work)
    res = {}
    for d in (torch.device("cpu"), device):
        model, cfg, _ = load_unsharded(ckpt, d)
        res[d.type] = evaluate(model, cfg, shards)
    a, b = res["cpu"], res[device.type]
    diff = max(abs(a[k] - b[k]) for k in ("maml_auc", "maml_gauc", "no_adapt_auc"))
    report("serve", f"evaluate on {device.type}: AUC / GAUC", f"{b['maml_auc']:.4f} / {b['maml_gauc']:.4f}, "
           f"largest difference to cpu {diff:.1e}", "PASS" if diff <= 1e-3 else "FAIL")
    scores = {}
    for role, d in (("reference", torch.device("cpu")), ("checked", device)):
        out = work / f"predict-{role}"
        shutil.rmtree(out, ignore_errors=True)
        s = run_predict(ckpt, out, shards_dir=str(shards), progress=False, device=d)
        scores[role] = pq.read_table(out).sort_by([("task_id", "ascending"), ("row", "ascending")])["score"]
        if role == "checked":
            report("serve", f"gmeta predict on {device.type}", f"{s['rows']} rows, {s['rows_per_s']:,.0f} rows/s")
        shutil.rmtree(out)
    diff = float(np.abs(scores["reference"].to_numpy() - scores["checked"].to_numpy()).max())
    report("serve", f"predict scores {device.type} vs cpu, largest difference", f"{diff:.1e}",
           "PASS" if diff <= 1e-3 else "FAIL")


def _variant(cfg: Config, **meta) -> Config:
    c = type(cfg)(**{**cfg.__dict__})
    c.meta = type(cfg.meta)(**{**cfg.meta.__dict__, **meta})
    return c


def _train_rows_per_s(label: str, cfg: Config, batch, device: torch.device, repeats: int) -> dict:
    model, opt, gsync = sharded(cfg, device)
    batch = batch.to(device)
    fns = {k: (lambda c=c: train_step(model, batch, c, gsync, opt)) for k, c in (
        ("erm", _variant(cfg, algorithm="erm")), ("first", _variant(cfg, first_order=True)),
        ("second", _variant(cfg, first_order=False)))}
    t = timed(fns, repeats, device)
    r = batch.num_rows
    res = {f"{k}_rows_per_s": r / v for k, v in t.items()}
    res.update(first_over_erm=t["erm"] / t["first"], second_over_erm=t["erm"] / t["second"])
    report("bench", f"{label}: full training step rows/s ERM / MAML first / second order",
           f"{r / t['erm']:,.0f} / {r / t['first']:,.0f} / {r / t['second']:,.0f} "
           f"(MAML/ERM {res['first_over_erm']:.2f} / {res['second_over_erm']:.2f})")
    return res


def _contenders(label: str, cfg: Config, batch, device: torch.device, repeats: int) -> dict:
    torch.manual_seed(0)
    model = build_model(cfg, device=device)  # places the tables only
    model.dense_to(device)
    batch = batch.to(device)
    layout = layout_of(batch, model.pooling, cfg.meta.size_buckets, model.cell_widths)
    with torch.no_grad():
        rows = model.lookup(layout)
    rows = rows.detach().requires_grad_(True)
    m = cfg.meta
    out = {}
    for first_order in (False, True):
        kw = dict(steps=m.inner_steps, lr=m.inner_lr, emb_lr=m.embedding_inner_lr, adapt_dense=m.adapt_dense,
                  adapt_embeddings=m.adapt_embeddings, first_order=first_order)
        fns = step_fns(model.head, rows, batch, layout, layout.num_cells, kw)
        t = timed(fns, repeats, device)  # every contender the meta-step benchmark races
        order = "first" if first_order else "second"
        n = batch.num_tasks
        res = {f"{k}_tasks_per_s": n / v for k, v in t.items()}
        res.update(over_loop=t["loop"] / t["gmeta"], over_vmap=t["vmap"] / t["gmeta"])
        out[order] = res
        report("bench", f"{label}: meta step ({order} order) tasks/s " + " / ".join(t),
               " / ".join(f"{n / v:,.0f}" for v in t.values())
               + f" (gmeta {res['over_loop']:.1f}x loop, {res['over_vmap']:.2f}x vmap)",
               "target: 20x loop, 3x vmap" if batch.num_tasks == 128 else "")
    return out


def _sync_share(label: str, cfg: Config, batches: list, device: torch.device) -> dict:
    """Share of the wall time of pipelined training steps that the host spends in
    synchronising calls and copies, from the profiler's CPU-side events."""
    from torch.profiler import ProfilerActivity, profile

    model, opt, gsync = sharded(cfg, device)
    pipe = SparseDistPipeline(model.module, cfg.meta.size_buckets, device)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])

    def steps():
        it = iter(batches)
        for _ in run_steps(model, cfg, gsync, opt, lambda: next(it, None), len(batches), pipe):
            pass
        sync(device)

    steps()  # warm-up
    t0 = time.perf_counter()
    with profile(activities=acts) as prof:
        steps()
    wall = time.perf_counter() - t0
    names = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "cudaMemcpy",
             "cudaMemcpyAsync", "aten::_local_scalar_dense", "aten::item")
    spent = {}
    for e in prof.key_averages():
        if e.key in names:
            spent[e.key] = e.cpu_time_total / 1e6
    # _local_scalar_dense contains its cudaMemcpyAsync: count the outermost only
    inner = spent.pop("cudaMemcpyAsync", 0.0) if "aten::_local_scalar_dense" in spent else 0.0
    share = sum(spent.values()) / wall
    report("bench", f"{label}: host time in syncs and copies, {len(batches)} pipelined steps",
           f"{100 * share:.1f}% of {wall:.3f} s (" + ", ".join(f"{k} {v * 1e3:.1f} ms" for k, v in spent.items())
           + (f"; copies inside item {inner * 1e3:.1f} ms" if inner else "") + ")")
    return {"share": share, "wall_s": wall, **{k: v for k, v in spent.items()}}


def _a2a_estimate(label: str, cfg: Config, batch, rows_per_rank: int) -> dict:
    feats = [dataclasses.asdict(f) for f in cfg.features.sparse]
    layout = layout_of(batch, [f["pooling"] for f in feats], cfg.meta.size_buckets, cell_widths(feats))
    nbytes = layout.num_unique * cfg.model.embedding_dim * 4
    ids = layout.num_unique * 8
    out = {"embedding_bytes_per_step": nbytes, "id_bytes_per_step": ids}
    report("bench", f"{label}: embedding all-to-all volume per rank and step (measured layout)",
           f"{nbytes / 2**20:.2f} MiB of rows each way + {ids / 2**20:.2f} MiB of ids, {layout.num_unique:,} distinct "
           "(feature, id) pairs")
    for nodes in (1, 2, 4):
        r = plan_report(cfg, 8 * nodes, 8, "cuda", rows_per_rank)
        worst = max(r["ranks"], key=lambda k: k["compute_ms"] + k["comms_ms"])
        out[f"plan_{nodes}x8"] = {"comms_ms": worst["comms_ms"], "compute_ms": worst["compute_ms"],
                                  "hbm_mib": worst["hbm_mib"]}
        report("bench", f"{label}: planner estimate, {nodes} node(s) x 8 GPUs (an estimate, not measured)",
               f"embedding compute {worst['compute_ms']:.3f} ms + communication {worst['comms_ms']:.3f} ms per step "
               f"on the slowest rank; {worst['hbm_mib']:.1f} MiB of tables")
    return out


def part_bench(work: Path, device: torch.device, quick: bool) -> dict:
    repeats = 3 if quick else 10
    out = {}
    num_tasks = 2_000 if quick else 20_000
    cfg, _, shards = ensure_data(work, num_tasks)
    sizes = (32,) if quick else (32, 256)
    for n in sizes:
        batch = next(iter(TaskReader(shards, "train", n, seed=0, size_buckets=cfg.meta.size_buckets)))
        c = _variant(cfg, tasks_per_batch=n)
        res = _train_rows_per_s(f"ads_cvr N={n}", c, batch, device, repeats)
        if n == 256:
            res["targets"] = {"erm_1M": res["erm_rows_per_s"] >= 1e6, "first_half": res["first_over_erm"] >= 0.5,
                              "second_third": res["second_over_erm"] >= 0.33}
            report("bench", "ads_cvr N=256 targets: ERM >= 1M rows/s, MAML/ERM >= 0.5 first / 0.33 second order",
                   f"{res['erm_rows_per_s'] / 1e6:.2f}M, {res['first_over_erm']:.2f}, {res['second_over_erm']:.2f}",
                   "PASS" if all(res["targets"].values()) else "MISSED")
        out[f"ads_cvr_N{n}_train"] = res
    n128 = 32 if quick else 128
    batch = next(iter(TaskReader(shards, "train", n128, seed=0, size_buckets=cfg.meta.size_buckets)))
    out[f"ads_cvr_N{n128}_contenders"] = _contenders(f"ads_cvr N={n128}", _variant(cfg, tasks_per_batch=n128), batch,
                                                     device, max(3, repeats // 2))
    reader = TaskReader(shards, "train", n128, seed=2, size_buckets=cfg.meta.size_buckets,
                        pin_memory=device.type == "cuda")
    few = [b for _, b in zip(range(3 if quick else 8), reader)]
    out["ads_cvr_sync_share"] = _sync_share(f"ads_cvr N={n128}", _variant(cfg, tasks_per_batch=n128), few, device)
    out["ads_cvr_a2a"] = _a2a_estimate(f"ads_cvr N={n128}", cfg, batch, batch.num_rows)
    ccfg = criteo_config()
    for n in ((16,) if quick else (32, 256)):
        cb = criteo_batch(ccfg, n, 20, 20, seed=0)
        out[f"criteo_N{n}_train"] = _train_rows_per_s(f"Criteo-shaped N={n}", _variant(ccfg, tasks_per_batch=n), cb,
                                                      device, repeats)
    n = 16 if quick else 128
    out[f"criteo_N{n}_contenders"] = _contenders(f"Criteo-shaped N={n}", _variant(ccfg, tasks_per_batch=n),
                                                 criteo_batch(ccfg, n, 20, 20, seed=0), device, max(3, repeats // 2))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cuda", "cpu"])
    ap.add_argument("--parts", nargs="+", default=["equal", "sync", "serve", "bench"],
                    choices=["equal", "sync", "serve", "bench"])
    ap.add_argument("--quick", action="store_true", help="small sizes and few repeats (testing this script)")
    ap.add_argument("--workdir", default=str(Path(tempfile.gettempdir()) / "gmeta-gpu-check"))
    args = ap.parse_args()
    from gmeta.logs import setup_logging

    setup_logging(False)  # torchrec's planner and fbgemm quiet, as under gmeta's commands
    device = torch.device(args.device, 0) if args.device == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        report("env", "device", f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}, "
               f"CUDA {torch.version.cuda}")
    else:
        report("env", "device", f"cpu, torch {torch.__version__} (no GPU: figures describe the CPU)")
    torch.set_num_threads(min(8, os.cpu_count() or 1))
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(free_port()))
    # one process group for both devices: gloo for the CPU reference, NCCL for the GPU
    dist.init_process_group("cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo", rank=0, world_size=1)
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    results: dict = {}
    failed = []
    for part in args.parts:
        t = time.perf_counter()
        try:
            if part == "equal":
                part_equal(work, device)
            elif part == "sync":
                part_sync(work, device)
            elif part == "serve":
                part_serve(work, device)
            else:
                results["bench"] = part_bench(work, device, args.quick)
        except Exception:  # one part failing must not cost the others their device time
            failed.append(part)
            report(part, "ERROR", traceback.format_exc().strip().splitlines()[-1][:200])
            traceback.print_exc()
        print(f"[{part}] done in {time.perf_counter() - t:.1f} s", flush=True)
    dist.destroy_process_group()
    print("\n| part | what | figure | target / verdict |\n|---|---|---|---|")
    for row in ROWS:
        print("| " + " | ".join(row) + " |")
    results["rows"] = ROWS
    emit("gpu_check", results)
    bad = failed or [r for r in ROWS if r[3].startswith("FAIL")]
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
