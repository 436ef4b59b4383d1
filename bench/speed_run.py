"""Every whole-run speed number of the README in one command: DiT forwards, a kernel profile, whole A14B runs
and the fast modes, each stage a bench script in its own process, one results folder, one summary.

Stages (full-size configs, random bf16 weights; run in this order; `--list` prints them):
  whole_a14b_720p   bench/denoise.py, Wan2.2 I2V-A14B 720x1280x81, 40 steps, CFG 3.5 (about 17 min on an H100)
  whole_a14b_480p   bench/denoise.py at 480x832x81, with diffusers eager doing one guided step (about 6 min)
  dit_1.3b_480p     bench/dit.py, Wan2.1-1.3B forward, ours vs torch.compile
  dit_a14b_480p     bench/dit.py, A14B expert forward, ours vs torch.compile
  dit_a14b_720p     bench/dit.py, A14B expert forward at 720p, ours vs diffusers eager
  kernels_a14b_480p bench/gpu_profile.py dit-kernels: attention / matmul / other GPU time of the A14B forward
  fast_modes        bench/fast_modes.py, Wan2.1-1.3B 480p: step cache, CFG reuse, truncation vs the full run

Resumable: a stage whose JSON is already in --out, readable, and not marked failed or interrupted by the record
is skipped (`--redo` runs it again; a stage's old JSON is deleted before it runs), so a run cut short (a machine
lent for a limited time) goes on where it stopped; `speed_run.json` records, per stage, when and on
which GPU it ran, its exit code and wall time, and the summary table's numbers, rewritten after every stage.
A stage that fails or passes its time limit (its whole process group is killed) is recorded and the run goes
on; the exit code is 1 if any stage failed.

  python bench/speed_run.py                         # all stages, bench/results/speed_<date>/
  python bench/speed_run.py --only dit_a14b_480p    # one stage (comma list)
  python bench/speed_run.py --report --out DIR      # print the summary of a finished folder, run nothing
  python bench/speed_run.py --tiny --out /tmp/s     # CPU smoke run of every stage
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from bench.versions import versions  # noqa: E402  (after the path insert)


@dataclasses.dataclass(frozen=True)
class Stage:
    name: str
    what: str
    script: str  # under bench/
    args: tuple[str, ...]  # "{json}" and "{dir}" are replaced by the stage's JSON path and the output folder
    tiny_args: tuple[str, ...]
    timeout_s: int
    json_name: str = ""  # the stage's JSON file name under --out (default: <name>.json)

    @property
    def json_file(self) -> str:
        return self.json_name or f"{self.name}.json"


A14B = ("--preset", "wan2.2-i2v-a14b")
STAGES = (
    Stage("whole_a14b_720p", "whole Wan2.2 I2V-A14B run 720x1280x81, 40 steps, CFG 3.5", "denoise.py",
          (*A14B, "--size", "720x1280", "--layout", "batch2", "--iters", "1", "--json", "{json}"),
          ("--tiny", "--json", "{json}"), 1500),
    Stage("whole_a14b_480p", "whole Wan2.2 I2V-A14B run 480x832x81, 40 steps, CFG 3.5", "denoise.py",
          (*A14B, "--torch", "torch-eager", "--json", "{json}"), ("--tiny", "--json", "{json}"), 900),
    Stage("dit_1.3b_480p", "DiT forward Wan2.1-1.3B 480x832x81", "dit.py",
          ("--preset", "wan2.1-t2v-1.3b", "--impls", "jax,torch-compile", "--timeout", "500", "--json", "{json}"),
          ("--tiny", "--impls", "jax,torch-eager", "--json", "{json}"), 700),
    Stage("dit_a14b_480p", "DiT forward A14B expert 480x832x81", "dit.py",
          (*A14B, "--impls", "jax,torch-compile", "--timeout", "500", "--json", "{json}"),
          ("--tiny", "--impls", "jax,torch-eager", "--json", "{json}"), 900),
    Stage("dit_a14b_720p", "DiT forward A14B expert 720x1280x81", "dit.py",
          (*A14B, "--size", "720x1280", "--impls", "jax,torch-eager", "--warmup", "1", "--iters", "3",
           "--timeout", "400", "--json", "{json}"),
          ("--tiny", "--impls", "jax,torch-eager", "--json", "{json}"), 700),
    Stage("kernels_a14b_480p", "GPU time of the A14B forward by kernel kind", "gpu_profile.py",
          ("dit-kernels", "--out", "{dir}"), ("dit-kernels", "--tiny", "--out", "{dir}"), 400,
          "profile_dit-kernels_480x832.json"),
    Stage("fast_modes", "fast modes vs the full run, Wan2.1-1.3B 480x832x81, 40 steps", "fast_modes.py",
          ("--json", "{json}"), ("--tiny", "--json", "{json}"), 900),
)
RECORD = "speed_run.json"


def _write_json(path: str, obj) -> None:
    """Write through a temporary file and rename, so a reader never sees half a file."""
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, default=str)
    os.replace(tmp, path)


def _load(path: str):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError):
        return None


def gpu_identity() -> str:
    """Which accelerator ran a stage: nvidia-smi's name and UUID, else the host name (CPU runs)."""
    if shutil.which("nvidia-smi"):
        p = subprocess.run(["nvidia-smi", "--query-gpu=name,uuid", "--format=csv,noheader"], capture_output=True,
                           text=True)
        if p.returncode == 0 and p.stdout.strip():
            return p.stdout.strip().replace("\n", "; ")
    return f"cpu ({platform.node()})"


def _kill_group(proc: subprocess.Popen) -> None:
    """Kill a stage's whole process group (its bench script and that script's children) and reap it."""
    with contextlib.suppress(ProcessLookupError):  # already gone
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def run_stage(stage: Stage, out: str, tiny: bool, log_dir: str) -> dict:
    """Run one stage in its own process group with its time limit; its output goes to logs/<name>.log."""
    json_path = os.path.join(out, stage.json_file)
    args = [a.replace("{json}", json_path).replace("{dir}", out) for a in (stage.tiny_args if tiny else stage.args)]
    cmd = [sys.executable, os.path.join(HERE, stage.script), *args]
    rec = {"cmd": " ".join(cmd[1:]), "started": datetime.datetime.now().isoformat(timespec="seconds"),
           "gpu": gpu_identity(), "tiny": tiny}
    with contextlib.suppress(FileNotFoundError):
        os.remove(json_path)  # a leftover from an earlier run must not pass for this run's result
    t0 = time.perf_counter()
    with open(os.path.join(log_dir, f"{stage.name}.log"), "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            deadline = t0 + stage.timeout_s
            while proc.poll() is None:
                try:
                    proc.wait(timeout=min(60.0, max(0.1, deadline - time.perf_counter())))
                except subprocess.TimeoutExpired:
                    if time.perf_counter() >= deadline:
                        _kill_group(proc)
                        rec["timed_out"] = True
                    else:
                        print(f"  [{stage.name}] running, {time.perf_counter() - t0:.0f} s", flush=True)
        except KeyboardInterrupt:  # Ctrl-C, or SIGTERM / SIGHUP (see main): the stage's whole group goes too
            _kill_group(proc)
            raise
    rec["rc"] = proc.returncode
    rec["wall_s"] = round(time.perf_counter() - t0, 1)
    rec["ok"] = proc.returncode == 0 and _load(json_path) is not None and not rec.get("timed_out")
    return rec


# --- the summary: one row per number the README's speed table shows ------------------------------------------
def _gib(b) -> float | None:
    return None if b is None else round(b / 2**30, 1)


def _dit_rows(res: dict, label: str) -> list[dict]:
    rows = {r["impl"]: r for r in res.get("results", [])}
    ref_name = next((k for k in ("torch-compile", "torch-eager") if k in rows), None)
    ours, ref = rows.get("jax", {}), rows.get(ref_name, {})
    return [{"row": label, "ours_s": ours.get("median_s"), "ours_tflops": ours.get("tflops"),
             "ours_peak_gib": _gib(ours.get("peak_bytes")), "reference": ref_name, "reference_s": ref.get("median_s"),
             "reference_peak_gib": _gib(ref.get("peak_bytes")),
             "speedup": ref["median_s"] / ours["median_s"] if ours.get("median_s") and ref.get("median_s") else None,
             "error": ours.get("error") or ref.get("error")}]


def _whole_rows(res: dict, label: str) -> list[dict]:
    jx = res.get("results", {}).get("jax", {})
    if "sample_s" not in jx:
        return [{"row": label, "error": jx.get("error", "no result")}]
    best = jx["step"][jx["best_layout"]]["median_s"]
    eager = res["results"].get("torch-eager", {}).get("median_s")
    return [{"row": label, "sample_s": jx["sample_s"], "per_step_s": jx["sample_s"] / jx["steps"],
             "one_step_s": best, "reference": "diffusers eager, one guided step" if eager else None,
             "reference_s": eager, "speedup": eager / best if eager else None,
             "peak_denoise_gib": _gib(jx["peak_bytes_denoise"]), "peak_total_gib": _gib(jx["peak_bytes_total"]),
             "experts": "offloaded at the switch" if jx["offloaded"] else "both resident",
             "weights_gib": _gib(jx["model_bytes"]), "decode_s": jx["decode_s"]}]


def _kernel_rows(res: dict, label: str) -> list[dict]:
    classes = res.get("kernels", {}).get("classes", {})
    return [{"row": f"{label}: {name}", "ms": c["us"] / 1e3, "tflops": c.get("tflops"), "calls": c["calls"]}
            for name, c in sorted(classes.items(), key=lambda kv: -kv[1]["us"])] + \
        [{"row": f"{label}: whole forward", "ms": res.get("median_s", 0) * 1e3, "tflops": res.get("tflops")}]


def _fast_rows(res: dict, label: str) -> list[dict]:
    return [{"row": f"{label}: {r['mode']}", "denoise_s": r["denoise_s"], "speedup": r["speedup"],
             "model_evals": r["model_evals"], "latents_psnr": r["latents"]["psnr"],
             "frames_psnr": (r.get("frames") or {}).get("psnr"), "frames_ssim": (r.get("frames") or {}).get("ssim")}
            for r in res.get("rows", [])]


SUMMARY = {"whole_a14b_720p": _whole_rows, "whole_a14b_480p": _whole_rows, "dit_1.3b_480p": _dit_rows,
           "dit_a14b_480p": _dit_rows, "dit_a14b_720p": _dit_rows, "kernels_a14b_480p": _kernel_rows,
           "fast_modes": _fast_rows}


def summary(out: str) -> list[dict]:
    """The summary rows of every stage whose JSON is in `out` (a stage not run has one row saying so)."""
    rows = []
    for st in STAGES:
        res = _load(os.path.join(out, st.json_file))
        rows += SUMMARY[st.name](res, st.name) if res is not None else [{"row": st.name, "error": "not measured"}]
    return rows


def print_summary(rows: list[dict]) -> None:
    def fmt(v):
        if v is None:
            return "-"
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 100 else f"{v:.0f}"
        return str(v)

    for r in rows:
        rest = "  ".join(f"{k}={fmt(v)}" for k, v in r.items() if k != "row" and v is not None)
        print(f"{r['row']:<34} {rest}")


def _interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv=None) -> int:
    from jax_impl.runtime import configure_xla

    configure_xla()  # the stages inherit XLA_FLAGS
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", help="results folder (default bench/results/speed_<date>; with --tiny required)")
    ap.add_argument("--only", default="", help="comma list of stages to run (default all; see --list)")
    ap.add_argument("--redo", action="store_true", help="run stages whose JSON is already in --out again")
    ap.add_argument("--tiny", action="store_true", help="each stage's CPU smoke run (tiny presets)")
    ap.add_argument("--report", action="store_true", help="print the summary of --out and exit")
    ap.add_argument("--list", action="store_true", help="print the stages and exit")
    args = ap.parse_args(argv)
    names = [s.name for s in STAGES]
    if args.list:
        for s in STAGES:
            print(f"{s.name:<18} {s.what} (limit {s.timeout_s} s): bench/{s.script} {' '.join(s.args)}")
        return 0
    only = [x for x in args.only.split(",") if x]
    unknown = sorted(set(only) - set(names))
    if unknown:
        ap.error(f"--only: unknown stage(s) {unknown}; stages: {', '.join(names)}")
    if args.tiny and not args.out:
        ap.error("--tiny needs --out (tiny results do not belong in bench/results)")
    out = os.path.abspath(args.out or os.path.join(HERE, "results", f"speed_{datetime.date.today().isoformat()}"))
    if args.report:
        if not os.path.isdir(out):
            ap.error(f"--report: no folder {out}")
        print_summary(summary(out))
        return 0
    log_dir = os.path.join(out, "logs")
    os.makedirs(log_dir, exist_ok=True)
    # a stage runs in its own session: SIGTERM / SIGHUP stop it with us (as Ctrl-C does), not after us
    previous = {sig: signal.signal(sig, _interrupt) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        return _run(args, out, log_dir, only)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _run(args, out: str, log_dir: str, only: list[str]) -> int:
    """The stages of `main`, in order, with the record rewritten after each."""
    record_path = os.path.join(out, RECORD)
    record = _load(record_path) or {"stages": {}}
    record["versions"] = versions("jax", "jaxlib", "flax", "torch", "diffusers")
    failed = []
    for st in STAGES:
        if only and st.name not in only:
            continue
        earlier = record["stages"].get(st.name, {})
        if _load(os.path.join(out, st.json_file)) is not None and earlier.get("ok", True) and not args.redo:
            print(f"[{st.name}] done earlier ({st.json_file}); --redo runs it again", flush=True)
            continue
        print(f"[{st.name}] {st.what} (limit {st.timeout_s} s)", flush=True)
        try:
            rec = run_stage(st, out, args.tiny, log_dir)
        except KeyboardInterrupt:
            record["stages"][st.name] = {"interrupted": True, "ok": False}
            _write_json(record_path, record)
            print("interrupted", file=sys.stderr)
            return 130
        if not rec["ok"]:
            failed.append(st.name)
            why = f"passed its {st.timeout_s} s limit" if rec.get("timed_out") else f"exit code {rec['rc']}"
            print(f"[{st.name}] FAILED ({why}); see {os.path.join(log_dir, st.name + '.log')}", flush=True)
        else:
            print(f"[{st.name}] done in {rec['wall_s']:.0f} s", flush=True)
        record["stages"][st.name] = rec
        record["summary"] = summary(out)
        _write_json(record_path, record)
    rows = summary(out)
    record["summary"] = rows
    _write_json(record_path, record)
    print()
    print_summary(rows)
    if failed:
        print(f"\nfailed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
