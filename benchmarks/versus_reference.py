"""This project against the authors' PyTorch Doc-to-LoRA, measured in one run on the same machine.

What it measures: the figures ``../shared/refrun/bench.py`` takes of the reference (SakanaAI/doc-to-lora,
CPU-patched, SmolLM2-135M-Instruct, fp32, 2 torch threads) and this project's figures for the same
measures, taken by ``internalize.py`` and ``train_step.py`` beside this file:

  * internalize latency (document -> adapter) at ``--lengths`` templated tokens (128 and 512), for
    (a) the main configuration and (b) the NIAH configuration. The reference's figure is
    ``internalize_grad`` (its hypernetwork runs with autograd on, as its ``internalize()`` does); its
    ``internalize_nograd`` figure gets a row of its own.
  * one meta-training step, 256 context + 64 student tokens, batch 1: (a) top-16 KL, (b) CE, with the
    peak resident memory.

Our side runs in float32 and, with ``--precisions=float32,bfloat16`` (the default), also in bfloat16.
Every measurement runs in a fresh process, as ``bench.py`` does, and takes the median of ``--repeats``
timed calls after a warm-up (ours: after the compiling first call). The two sides ALTERNATE: in each
of ``--rounds`` rounds, for each phase and configuration, the reference runs first, then ours, so
that load from other processes and the machine's hour-to-hour swings hit both sides alike. Beside
each figure sits the fp32 2048^3 matmul GFLOP/s measured at that moment (torch's, before and after the
reference's phase, from ``bench.py``; JAX's, at the end of each of our cases, from
``common.matmul_gflops``), so that a figure taken while the machine was slow can be recognised.

The table gives ratio = reference seconds / our seconds (> 1: we are faster), one per round (the two
figures of a round were taken minutes apart), and their median. Ratios are only meaningful within
one run: absolute seconds differ between machines and, on the same host, by +-30% from hour to hour.
Peak memory is not measured the same way on both sides (reference: RSS sampled during the timed
calls; ours: the process's maximum RSS, compile included) and is given for orientation only.

Set up the reference once (a venv under ``$REFRUN_ROOT``, default ``/tmp/refrun``; ~80 s)::

    REFRUN_MIRROR=<git dir of SakanaAI/doc-to-lora> bash ../shared/refrun/setup.sh

then, from the repository root::

    python benchmarks/versus_reference.py [--rounds=2] [--repeats=3] [--configs=main,niah] \\
        [--lengths=128,512] [--phases=internalize,train] [--precisions=float32,bfloat16] \\
        [--json_out=results/versus_reference.json] [--refrun_root=/tmp/refrun | --refrun_python=PATH] \\
        [--skip_reference]

The full default run takes roughly half an hour on 2 cores.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from importlib import metadata

from absl import app, flags

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)

_ROUNDS = flags.DEFINE_integer("rounds", 2, "Rounds of (reference, ours) per phase and configuration.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed calls per figure, on both sides (median reported).")
_CONFIGS = flags.DEFINE_list("configs", ["main", "niah"], "Configurations: main = (a), niah = (b).")
_LENGTHS = flags.DEFINE_list("lengths", ["128", "512"], "Internalize lengths in templated tokens.")
_PHASES = flags.DEFINE_list("phases", ["internalize", "train"], "Phases: internalize, train.")
_PRECISIONS = flags.DEFINE_list("precisions", ["float32", "bfloat16"], "Our precisions (float32, bfloat16).")
_REFRUN_ROOT = flags.DEFINE_string(
    "refrun_root", os.environ.get("REFRUN_ROOT", "/tmp/refrun"), "The reference's setup directory (setup.sh's REFRUN_ROOT).")
_REFRUN_PYTHON = flags.DEFINE_string("refrun_python", None, "The reference venv's python; default REFRUN_ROOT/venv/bin/python.")
_REFRUN_BENCH = flags.DEFINE_string(
    "refrun_bench", os.path.normpath(os.path.join(REPO, "..", "shared", "refrun", "bench.py")), "The reference's bench.py.")
_SKIP_REFERENCE = flags.DEFINE_bool("skip_reference", False, "Measure our side only (no ratios).")
_JSON_OUT = flags.DEFINE_string("json_out", None, "Write every raw figure, the date, the CPU and the commands here.")
_TIMEOUT = flags.DEFINE_integer("timeout_s", 3600, "Limit for each measuring process, in seconds.")

FLAG_HOLDERS = (_ROUNDS, _REPEATS, _CONFIGS, _LENGTHS, _PHASES, _PRECISIONS, _REFRUN_ROOT, _REFRUN_PYTHON, _REFRUN_BENCH,
                _SKIP_REFERENCE, _JSON_OUT, _TIMEOUT)
COMMANDS: list[list[str]] = []  # every measuring process's command, in the order they ran
REF_CFG = {"main": "a", "niah": "b"}
LOSS = {"main": "top_k_kl", "niah": "ce"}
REF_LOSS = {"main": "top-16 KL", "niah": "CE"}
SHORT = {"float32": "fp32", "bfloat16": "bf16"}


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def cpu_marks() -> tuple[float, float] | None:
    """(busy CPU seconds of the whole machine, CPU seconds of this process and its reaped children)."""
    try:
        with open("/proc/stat") as f:
            user, nice, system, _, _, irq, softirq, steal = map(int, f.readline().split()[1:9])
    except (OSError, ValueError):
        return None
    own = sum(r.ru_utime + r.ru_stime for r in (resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)))
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK"), own


def run_process(command: list[str], env: dict | None = None) -> dict:
    """Runs one measuring process; returns its command, wall time, exit status, stdout, stderr tail and the
    CPU cores that other processes (and hypervisor steal) used meanwhile."""
    COMMANDS.append(command)
    marks = cpu_marks()
    start = time.perf_counter()
    try:
        result = subprocess.run(command, check=False, capture_output=True, text=True, env=env, timeout=_TIMEOUT.value)
        rc, stdout, stderr = result.returncode, result.stdout, result.stderr
    except subprocess.TimeoutExpired as e:
        text = lambda x: x.decode(errors="replace") if isinstance(x, bytes) else (x or "")
        rc, stdout, stderr = "timeout", text(e.stdout), text(e.stderr)
    wall = time.perf_counter() - start
    end = cpu_marks()
    foreign = None
    if marks and end:
        foreign = round(max((end[0] - marks[0]) - (end[1] - marks[1]), 0.0) / max(wall, 1e-6), 2)
    return {"command": command, "wall_s": round(wall, 1), "rc": rc, "foreign_cores": foreign,
            "stdout": stdout, "stderr_tail": stderr[-3000:]}


def reference_block(python: str, config: str, phase: str, work_dir: str, tag: str) -> dict:
    """One bench.py invocation (one configuration, one phase; it runs its measurement in a child process)."""
    out = os.path.join(work_dir, f"ref_{tag}.jsonl")
    repeats = str(_REPEATS.value)
    command = [python, _REFRUN_BENCH.value, "--cfg", REF_CFG[config], "--phases", phase,
               "--sizes", ",".join(_LENGTHS.value), "--repeats", repeats, "--warmup", "1",
               "--train-repeats-a", repeats, "--json-out", out]
    env = dict(os.environ, REFRUN_ROOT=_REFRUN_ROOT.value)
    run = run_process(command, env)
    records = []
    if os.path.exists(out):
        with open(out) as f:
            records = [json.loads(line) for line in f if line.strip()]
    run.pop("stdout")
    run["records"] = records
    if run["rc"] != 0:
        log(f"  reference {config}/{phase} exited {run['rc']}: {run['stderr_tail'][-400:]}")
    return run


def ours_case(config: str, phase: str, precision: str, length: int | None) -> dict:
    """One case of internalize.py / train_step.py in its own process (their ``--case`` mode prints JSON)."""
    if phase == "internalize":
        command = [sys.executable, os.path.join(HERE, "internalize.py"), f"--case={config}:{length}"]
    else:
        command = [sys.executable, os.path.join(HERE, "train_step.py"), f"--case={config}:{LOSS[config]}"]
    command += [f"--repeats={_REPEATS.value}", f"--precision={precision}"]
    run = run_process(command, dict(os.environ, JAX_PLATFORMS="cpu"))  # as a CPU install runs: no TPU runtime loaded
    stdout = run.pop("stdout")
    run["result"] = None
    if run["rc"] == 0:
        try:
            run["result"] = json.loads(stdout.strip().splitlines()[-1])
        except (IndexError, json.JSONDecodeError):
            run["rc"] = "unparsable output"
    if run["rc"] != 0:
        log(f"  ours {config}/{phase}/{precision} failed ({run['rc']}): {run['stderr_tail'][-400:]}")
    return run


# --------------------------------------------------------------------------- figures and table
def figure_keys() -> list[tuple]:
    """(phase, config, tokens, reference figure name) for every row of the table."""
    keys = []
    for phase in _PHASES.value:
        for config in _CONFIGS.value:
            if phase == "internalize":
                for n in map(int, _LENGTHS.value):
                    keys.append((phase, config, n, "internalize_grad"))
                    if not _SKIP_REFERENCE.value:
                        keys.append((phase, config, n, "internalize_nograd"))
            else:
                keys.append((phase, config, 256, "train_step"))
    return keys


def reference_figure(block: dict, config: str, tokens: int, name: str) -> dict | None:
    for r in block["records"]:
        if r.get("figure") == name and r.get("cfg") == REF_CFG[config] and r.get("tokens", r.get("ctx_tokens")) == tokens:
            return {"s": r["median_s"], "peak_gb": r.get("peak_rss_gb"), "gflops": r.get("matmul_gflops_before_after"),
                    "foreign_cores": r.get("foreign_cores", block.get("foreign_cores")), "record": r}
    return None


def ours_figure(run: dict) -> dict | None:
    r = run.get("result")
    if not r:
        return None
    return {"s": r.get("latency_s", r.get("step_s")), "peak_gb": r.get("peak_rss_gb"), "gflops": r.get("matmul_gflops"),
            "params": r.get("params", r.get("hypernet_params")), "foreign_cores": run.get("foreign_cores")}


def collect(rounds: list[dict]) -> list[dict]:
    """One row per table line: per round the reference figure, our figure per precision, and the ratios."""
    rows = []
    for phase, config, tokens, ref_name in figure_keys():
        row = {"phase": phase, "config": config, "tokens": tokens, "reference_figure": ref_name, "rounds": []}
        for rnd in rounds:
            ref_block = rnd["reference"].get(f"{config}/{phase}")
            entry = {"reference": reference_figure(ref_block, config, tokens, ref_name) if ref_block else None, "ours": {}}
            for precision in _PRECISIONS.value:
                key = f"{config}/{phase}/{precision}" + (f"/{tokens}" if phase == "internalize" else "")
                run = rnd["ours"].get(key)
                ours = ours_figure(run) if run else None
                if ours and entry["reference"] and ours["s"]:
                    ours["ratio"] = entry["reference"]["s"] / ours["s"]
                entry["ours"][precision] = ours
            row["rounds"].append(entry)
        rows.append(row)
    return rows


def fmt_median(values: list, digits: int, suffix: str = "") -> str:
    """The median in bold, then every value when there are several; '–' without values."""
    values = [v for v in values if v is not None]
    if not values:
        return "–"
    text = f"**{statistics.median(values):.{digits}f}{suffix}**"
    return text + (f" ({', '.join(f'{v:.{digits}f}' for v in values)})" if len(values) > 1 else "")


def fmt_seconds(values: list) -> str:
    return fmt_median(values, 3)


def fmt_ratio(values: list) -> str:
    return fmt_median(values, 2, "x")


def fmt_list(values: list, digits: int = 0) -> str:
    values = [v for v in values if v is not None]
    return ", ".join(f"{v:.{digits}f}" for v in values) if values else "–"


def table(rows: list[dict]) -> str:
    precisions = _PRECISIONS.value
    header = ["measure", "cfg", "reference s"]
    for p in precisions:
        header += [f"ours {SHORT.get(p, p)} s", f"ratio {SHORT.get(p, p)}"]
    header += ["peak GB ref / " + " / ".join(SHORT.get(p, p) for p in precisions),
               "other load, cores: ref / " + " / ".join(SHORT.get(p, p) for p in precisions),
               "torch GFLOP/s (before/after, per round)"] + [f"JAX GFLOP/s {SHORT.get(p, p)} run" for p in precisions]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        if row["phase"] == "internalize":
            what = f"internalize {row['tokens']} tokens"
            what += " (ref as it runs it)" if row["reference_figure"] == "internalize_grad" else " (ref without autograd)"
        else:
            what = f"train step 256+64, {REF_LOSS[row['config']]}"
        refs = [e["reference"] for e in row["rounds"]]
        cells = [what, f"({REF_CFG[row['config']]}) {row['config']}", fmt_seconds([r and r["s"] for r in refs])]
        for p in precisions:
            ours = [e["ours"].get(p) for e in row["rounds"]]
            cells += [fmt_seconds([o and o["s"] for o in ours]), fmt_ratio([o and o.get("ratio") for o in ours])]
        peaks = [fmt_list([r and r["peak_gb"] for r in refs], 2)]
        peaks += [fmt_list([o and o["peak_gb"] for o in (e["ours"].get(p) for e in row["rounds"])], 2) for p in precisions]
        cells.append(" / ".join(peaks))
        loads = [fmt_list([r and r["foreign_cores"] for r in refs], 1)]
        loads += [fmt_list([o and o["foreign_cores"] for o in (e["ours"].get(p) for e in row["rounds"])], 1) for p in precisions]
        cells.append(" / ".join(loads))
        cells.append("; ".join("/".join(f"{g:.0f}" for g in r["gflops"]) for r in refs if r and r.get("gflops")) or "–")
        for p in precisions:
            cells.append(fmt_list([o and o["gflops"] for o in (e["ours"].get(p) for e in row["rounds"])]))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def parameter_notes(rounds: list[dict]) -> list[str]:
    notes = {}
    for rnd in rounds:
        for block in rnd["reference"].values():
            for r in block["records"]:
                if r.get("figure") == "hypernet_params":
                    notes[f"reference ({r['cfg']})"] = f"{r['value']:,}" + ("" if r["ok"] else f" (MISMATCH, want {r['expected']:,})")
        for key, run in rnd["ours"].items():
            params = (run.get("result") or {}).get("params") or (run.get("result") or {}).get("hypernet_params")
            if params:
                notes[f"ours {key.split('/')[0]}"] = f"{params:,}"
    return [f"{k}: {v}" for k, v in sorted(notes.items())]


# --------------------------------------------------------------------------- main
def main(argv):
    del argv
    python = _REFRUN_PYTHON.value or os.path.join(_REFRUN_ROOT.value, "venv", "bin", "python")
    if not _SKIP_REFERENCE.value:
        if not os.access(python, os.X_OK):
            sys.exit(f"versus_reference: no reference venv python at {python}; set it up with "
                     f"`REFRUN_MIRROR=<git dir of SakanaAI/doc-to-lora> bash {os.path.dirname(_REFRUN_BENCH.value)}/setup.sh` "
                     "(or pass --refrun_python / REFRUN_ROOT, or --skip_reference)")
        if not os.path.exists(_REFRUN_BENCH.value):
            sys.exit(f"versus_reference: {_REFRUN_BENCH.value} not found; pass --refrun_bench")
    for p in _PRECISIONS.value:
        if p not in SHORT:
            sys.exit(f"versus_reference: unknown precision {p!r} (float32, bfloat16)")
    for c in _CONFIGS.value:
        if c not in REF_CFG:
            sys.exit(f"versus_reference: unknown configuration {c!r} (main, niah)")

    started = time.time()
    meta = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "jax": version("jax"), "jaxlib": version("jaxlib"), "python": platform.python_version(),
        "reference_python": None if _SKIP_REFERENCE.value else python,
        "reference_bench": None if _SKIP_REFERENCE.value else _REFRUN_BENCH.value,
        "refrun_root": _REFRUN_ROOT.value,
        "flags": {h.name: h.value for h in FLAG_HOLDERS},
        "invocation": [sys.executable] + sys.argv,
    }
    log(f"{meta['cpu_model']}, {meta['cpu_count']} CPUs; {_ROUNDS.value} round(s), {_REPEATS.value} repeats; "
        f"reference {'skipped' if _SKIP_REFERENCE.value else python}")

    rounds = []
    with tempfile.TemporaryDirectory(prefix="versus_reference_") as work_dir:
        for index in range(_ROUNDS.value):
            rnd = {"round": index + 1, "reference": {}, "ours": {}, "order": []}
            for phase in _PHASES.value:
                for config in _CONFIGS.value:
                    if not _SKIP_REFERENCE.value:
                        log(f"round {index + 1}: reference {config}/{phase}")
                        block = reference_block(python, config, phase, work_dir, f"{index}_{config}_{phase}")
                        rnd["reference"][f"{config}/{phase}"] = block
                        rnd["order"].append(("reference", f"{config}/{phase}", block["wall_s"]))
                    lengths = [int(n) for n in _LENGTHS.value] if phase == "internalize" else [None]
                    for precision in _PRECISIONS.value:
                        for n in lengths:
                            key = f"{config}/{phase}/{precision}" + (f"/{n}" if n else "")
                            log(f"round {index + 1}: ours {key}")
                            run = ours_case(config, phase, precision, n)
                            rnd["ours"][key] = run
                            rnd["order"].append(("ours", key, run["wall_s"]))
            rounds.append(rnd)

    rows = collect(rounds)
    others = meta["flags"]
    print()
    print(f"{'Ours only (reference skipped)' if _SKIP_REFERENCE.value else 'Reference (PyTorch, fp32, 2 threads) vs ours (JAX)'}, {meta['cpu_model']}, {meta['cpu_count']} CPUs, "
          f"{meta['time_utc']}; {others['rounds']} round(s), median of {others['repeats']} per figure; "
          "ratio = reference s / ours s (> 1: ours faster), per round in parentheses.")
    print()
    print(table(rows))
    print()
    for note in parameter_notes(rounds):
        print(f"hypernet params, {note}")
    failures = [f"reference {k} rc={v['rc']}" for r in rounds for k, v in r["reference"].items() if v["rc"] != 0]
    failures += [f"ours {k} rc={v['rc']}" for r in rounds for k, v in r["ours"].items() if v["rc"] != 0]
    for f in failures:
        print(f"FAILED: {f}")
    print("Ratios hold only within this run; torch and JAX GFLOP/s show the machine's state at each figure, and "
          "'other load' the CPU cores other processes took meanwhile (near 0 on an idle machine; the reference's "
          "threads suffer more from it than ours, so a loaded run overstates the ratios).")
    if _JSON_OUT.value:
        os.makedirs(os.path.dirname(os.path.abspath(_JSON_OUT.value)), exist_ok=True)
        meta["wall_s"] = round(time.time() - started, 1)
        meta["commands"] = COMMANDS
        with open(_JSON_OUT.value, "w") as f:
            json.dump({"meta": meta, "rows": rows, "rounds": rounds}, f, indent=1, default=str)
        print(f"raw figures in {_JSON_OUT.value}")
    if failures:
        sys.exit(1)


if __name__ == "__main__":
    app.run(main)
