"""prepare at scale: rows/s and peak memory on an input of at least 10M rows, preparing
in memory (one partition) vs. out of core under a memory cap (partitioned on disk).

    python benchmarks/prepare_scale.py [--tasks 210000] [--cap-mb 512]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

from benchmarks.common import ROOT, ads_config, emit
from gmeta.io.synth import generate

CHILD = textwrap.dedent("""
    import json, sys, time
    import pyarrow as pa
    from gmeta.config import load_config
    from gmeta.io.prepare import prepare

    def status_mb(key):  # VmHWM is this process's own peak (ru_maxrss carries the parent's)
        for line in open("/proc/self/status"):
            if line.startswith(key):
                return int(line.split()[1]) / 1024

    base = status_mb("VmRSS")
    cfg = load_config(sys.argv[1], sys.argv[4:])
    t0 = time.perf_counter()
    m = prepare(cfg, sys.argv[2], sys.argv[3])
    print(json.dumps({"seconds": time.perf_counter() - t0, "rows": m["input_rows"], "partitions": m["partitions"],
                      "tasks": m["input_tasks"], "import_rss_mb": base, "peak_rss_mb": status_mb("VmHWM"),
                      "arrow_peak_mb": pa.default_memory_pool().max_memory() / 2**20}))
""")


def run(cfg_path: str, raw: Path, out: Path, overrides: list[str]) -> dict:
    proc = subprocess.run([sys.executable, "-c", CHILD, cfg_path, str(raw), str(out), *overrides],
                          capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(proc.stderr[-4000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tasks", type=int, default=210_000)
    ap.add_argument("--cap-mb", type=int, default=512)
    ap.add_argument("--workdir", default=str(Path(tempfile.gettempdir()) / "gmeta-bench-prepare"))
    args = ap.parse_args()
    work = Path(args.workdir)
    raw = work / f"raw-{args.tasks}"
    cfg_path = str(ROOT / "configs" / "ads_cvr.yaml")
    if not (raw / "_synth.json").is_file():
        t0 = time.perf_counter()
        s = generate(ads_config([f"synth.num_tasks={args.tasks}", "synth.num_users=300000"]), raw)
        print(f"synth: {s['rows']} rows in {time.perf_counter() - t0:.0f}s "
              f"(peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB)")
    big = run(cfg_path, raw, work / "mem", ["data.prepare_memory_mb=100000"])
    small = run(cfg_path, raw, work / "ooc", [f"data.prepare_memory_mb={args.cap_mb}"])
    for name, r in (("in memory (1 partition)", big), (f"out of core, cap {args.cap_mb} MiB", small)):
        print(f"prepare {name:32s}: {r['rows'] / r['seconds']:10.0f} rows/s  ({r['rows']} rows, {r['tasks']} tasks, "
              f"{r['seconds']:.1f}s, {r['partitions']} partitions), peak RSS {r['peak_rss_mb']:.0f} MiB "
              f"(after imports {r['import_rss_mb']:.0f}), Arrow peak {r['arrow_peak_mb']:.0f} MiB")
    speed = small["rows"] / small["seconds"] / (big["rows"] / big["seconds"])
    memory = (small["peak_rss_mb"] - small["import_rss_mb"]) / (big["peak_rss_mb"] - big["import_rss_mb"])
    print(f"ratio out-of-core / in-memory: {speed:.2f}x rows/s, {memory:.2f}x peak memory above imports")
    emit("prepare_scale", {"in_memory": big, "out_of_core": small, "cap_mb": args.cap_mb})


if __name__ == "__main__":
    main()
