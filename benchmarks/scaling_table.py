"""Prints the markdown table of TPU compile reports (``launch.compile_tpu --out``) in a directory.

    python benchmarks/scaling_table.py results/scaling
"""

import json
import sys
from pathlib import Path

STEPS = 80_000
MFU = 0.4


def row(report: dict) -> str:
    memory = report["memory_per_device_bytes"]
    used = memory.get("total")
    used_text = f"{used / 1e9:.1f}" if used is not None else "?"
    if "arguments" not in memory and used is not None:
        used_text = f"> {used / 1e9:.1f} (temporaries alone)"
    hbm = report["chip"]["hbm_bytes"] / 1e9
    mesh = ", ".join(f"{k} {v}" for k, v in report["mesh"].items() if v > 1) or "1 device"
    batch = report["batch"]
    flops = report["flops_per_step"]["analytic"]
    at_peak = report["estimate"]["step_seconds_at_peak"]
    days = STEPS * at_peak / MFU / 86400
    recipe = f"{report['estimate']['steps']:,}: {report['estimate']['steps'] * at_peak / MFU / 3600:.1f} h"
    config = Path(report["config"]).stem
    return (
        f"| {config} | {report['topology']} | {mesh} | {batch['rows_per_micro_batch']} x {batch['micro_batches']} "
        f"| {used_text} / {hbm:.1f} | {'yes' if report['fits'] else '**no**'} | {flops / 1e12:,.0f} "
        f"| {at_peak:.2f} | {at_peak / MFU:.2f} | {days:.1f} | {recipe} |"
    )


def main(directory: str) -> None:
    reports = [json.loads(p.read_text()) for p in sorted(Path(directory).glob("*.json"))]
    order = {"v5e:2x2": 0, "v5p:2x2x1": 1, "v4:2x2x2": 2, "v5e:4x4": 3}
    reports.sort(key=lambda r: (Path(r["config"]).stem, order.get(r["topology"], 9), r["devices"]))
    print(
        "| config | topology | mesh | rows x micro-batches | GB per chip / HBM | fits | TFLOP per step "
        f"| step at peak (s) | step at {MFU:.0%} MFU (s) | {STEPS // 1000}k steps at {MFU:.0%} MFU (days) "
        f"| the recipe's steps at {MFU:.0%} MFU |"
    )
    print("|---|---|---|---|---|---|---:|---:|---:|---:|---:|")
    for report in reports:
        print(row(report))


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "results/scaling")
