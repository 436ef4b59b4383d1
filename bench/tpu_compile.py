"""The TPU compile matrix: what fits on which TPU slice, compiled for real TPU topologies on this host.

Runs `jax_impl.tpu_compile` (the library behind `wanport compile`) in phases, cheapest first:
  * table: the guided denoising step of Wan2.2 I2V-A14B at 720x1280x81 and 480x832x81 on v5p-8, v6e-8 and
    v5e-8 (--targets);
  * search-a14b / search-others: per generation, the smallest slice on which the step fits with both A14B
    experts resident, and with the idle expert offloaded to host memory (A14B 720p and 480p;
    Wan2.1-T2V-1.3B at 480x832x81; Wan2.2-TI2V-5B at 704x1280x121, its native size);
  * vae / vae-others: the VAE decode, once per generation and video (it runs on one device, whatever the
    slice), merged into the rows above. It is the slow part (minutes per compile).
Writes bench/results/tpu_compile_<date>.json (rewritten after every compile, so an interrupted run keeps what
it has: `phases_done` says how far it got) and prints the tables. Memory and FLOPs are XLA's, from programs
compiled by libtpu for those topologies; times are roofline ESTIMATES; nothing runs on a TPU.

  python bench/tpu_compile.py                                  # everything (hours on a 2-core CPU)
  python bench/tpu_compile.py --phases table,vae               # the A14B table with its VAE decode
  python bench/tpu_compile.py --print bench/results/tpu_compile_2026-11-25.json

Needs libtpu: pip install -e '.[tpu]'.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.versions import versions  # noqa: E402  (after the path insert)

TABLE_TARGETS = ["v5p-8", "v6e-8", "v5e-8"]
PHASES = ["table", "search-a14b", "vae", "search-others", "vae-others"]
A14B = "wan2.2-i2v-a14b"
SIZES = {"720p": (720, 1280, 81), "480p": (480, 832, 81)}
SEARCH = [  # (preset, label, height, width, frames)
    (A14B, "720p", 720, 1280, 81),
    (A14B, "480p", 480, 832, 81),
    ("wan2.1-t2v-1.3b", "480p", 480, 832, 81),
    ("wan2.2-ti2v-5b", "704p", 704, 1280, 121),
]
# Published anchors (README "TPU"): whole 40-step transformer time, 720x1280x81 with guidance.
ANCHORS = [
    {"what": "Wan2.2 I2V-A14B, torchax port, 40 steps 720p", "target": "v5p-8", "seconds": 180},
    {"what": "maxdiffusion Wan2.2, 40 steps 720p", "target": "v7x-8", "seconds": 194},
]
GIB = 2**30


def _row(r) -> dict:
    """One report as JSON, with the step's summary numbers on top (what `_line` prints)."""
    d = r.as_dict()
    row = {k: d[k] for k in ("target", "topology", "chips", "devices", "hbm_per_device", "preset", "size", "frames",
                             "tokens", "experts", "splash_blocks", "param_bytes_per_device", "vae_compiled",
                             "vae_peak_bytes", "vae_tiled", "fits_resident", "fits_offloaded", "estimate", "programs")}
    row.update(step_peak_offloaded_bytes=r.step.peak_bytes,
               step_peak_resident_bytes=r.step.peak_bytes + (r.param_bytes if r.video.experts == 2 else 0),
               step_flops_per_device=r.step.flops, step_compile_s=r.step.compile_s)
    return row


def _line(d: dict) -> str:
    """A table line from a `_row` dict (so a saved JSON prints the same table: --print)."""
    e, hbm = d["estimate"], d["hbm_per_device"]
    res, off, vae = d["step_peak_resident_bytes"], d["step_peak_offloaded_bytes"], d["vae_peak_bytes"]
    vae_cols = (f"{vae / GIB:>8.2f}{'t' if d['vae_tiled'] else ' '} {'yes' if vae <= hbm else 'NO':>4}"
                if d.get("vae_compiled", vae > 0) else f"{'-':>9} {'-':>4}")
    step = d["programs"][0]  # the denoising step (arguments hold one expert's parameter shard)
    return (f"{d['preset']:<17} {d['size'] + 'x' + str(d['frames']):<13} {d['target']:<7} {d['devices']:>3} "
            f"{hbm / GIB:>5.0f} {step['argument_bytes'] / GIB:>6.2f} {step['temp_bytes'] / GIB:>6.2f} "
            f"{step['output_bytes'] / GIB:>5.2f} {res / GIB:>9.2f} {'yes' if res <= hbm else 'NO':>4} "
            f"{off / GIB:>9.2f} {'yes' if off <= hbm else 'NO':>4} {vae_cols} "
            f"{d['step_flops_per_device'] / 1e12:>8.0f} {e['step_s']:>7.2f} "
            f"{e['denoise_s']:>7.0f} {d['step_compile_s']:>7.0f}")


HEADER = (f"{'preset':<17} {'video':<13} {'slice':<7} {'dev':>3} {'HBM':>5} {'arg':>6} {'temp':>6} {'out':>5} "
          f"{'resident':>9} {'fits':>4} "
          f"{'offload':>9} {'fits':>4} {'VAE GiB':>9} {'fits':>4} {'TFLOP/d':>8} {'est s':>7} {'est 40':>7} "
          f"{'compile':>7}")
LEGEND = ("GiB per device; arg/temp/out: XLA's argument (one expert's parameter shard + inputs), temporary "
          "and output bytes of the step; resident: step peak with both A14B experts on the device; offload: the idle expert in "
          "host memory (one-expert models: the same); VAE: decode peak on one device (t: tiled; -: not compiled); "
          "TFLOP/d: per device per guided step; est s / est 40: roofline ESTIMATE per step and for 40 steps, "
          "not measured; compile: seconds to compile the step on this host")


def print_summary(out: dict) -> None:
    """The summary table and the smallest-slice lines of a results dict (fresh or loaded from JSON)."""
    print("\n" + HEADER)
    for d in out.get("all") or out["table"]:
        print(_line(d))
    print(LEGEND)
    if out.get("smallest"):
        print("\nsmallest slice on which the denoising step fits, per generation (VAE decode: one device):")
        for s in out["smallest"]:
            v = s.get("vae_peak_bytes")
            vae = "not compiled" if v is None else f"{v / GIB:.1f} GiB{' tiled' if s['vae_tiled'] else ''}, " \
                f"{'fits' if s['vae_fits'] else 'does NOT fit'}"
            print(f"  {s['preset']:<17} {s['size']:>9}x{s['frames']:<4} {s['generation']}: experts resident "
                  f"{s['smallest_resident'] or '-'}, offloaded {s['smallest_offloaded'] or '-'}; VAE decode {vae}")
    missing = [p for p in out.get("phases_asked", []) if p not in out.get("phases_done", [])]
    if missing:
        print(f"\nNOT finished (run cut off): phases {', '.join(missing)}")


def main(argv=None) -> int:
    global A14B, SIZES, SEARCH, TABLE_TARGETS
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--phases", default=",".join(PHASES),
                    help="what to compile, in this order (default %(default)s): table = the A14B denoising steps "
                         "on --targets; search-a14b / search-others = the smallest slice per generation for the "
                         "step; vae = the VAE decode per generation (one device) for the table's videos; "
                         "vae-others = the same for the other presets' videos")
    ap.add_argument("--generations", default="v5e,v6e,v5p", help="generations searched (default %(default)s)")
    ap.add_argument("--max-chips", type=int, default=64, help="largest slice tried in the search (chips)")
    ap.add_argument("--vae-dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--json", help="output (default bench/results/tpu_compile_<date>.json)")
    ap.add_argument("--targets", default=",".join(TABLE_TARGETS), help="slices of the table (default %(default)s)")
    ap.add_argument("--tiny", action="store_true", help="smoke run: tiny presets, small videos, v5p only")
    ap.add_argument("--print", metavar="JSON", dest="print_json", help="print the tables of a saved result and exit")
    args = ap.parse_args(argv)
    if args.print_json:
        with open(args.print_json, encoding="utf-8") as fh:
            print_summary(json.load(fh))
        return 0
    phases = [p.strip() for p in args.phases.split(",") if p.strip()]
    unknown = set(phases) - set(PHASES)
    if unknown:
        ap.error(f"unknown phases {sorted(unknown)}; choose from {','.join(PHASES)}")
    TABLE_TARGETS = [t.strip() for t in args.targets.split(",") if t.strip()]
    if args.tiny:
        A14B, SIZES, TABLE_TARGETS = "tiny-hd128-wan2.2-i2v-a14b", {"tiny": (128, 128, 9)}, ["v5p-8"]
        SEARCH, args.generations = [(A14B, "tiny", 128, 128, 9)], "v5p"

    from jax_impl import tpu_compile as tc

    reason = tc.libtpu_available()
    if reason:
        ap.error(reason)
    for t in TABLE_TARGETS:
        tc.parse_target(t)
    gens = [g.strip() for g in args.generations.split(",") if g.strip()]
    path = args.json or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                     f"tpu_compile_{datetime.date.today().isoformat()}.json")
    out = {"date": datetime.date.today().isoformat(), "versions": versions("jax", "jaxlib", "flax", "libtpu"), "host": "CPU only (no TPU)",
           "vae_dtype": args.vae_dtype, "dit_dtype": "bfloat16", "text_tokens": 512, "steps": 40,
           "phases_asked": phases, "phases_done": [],
           "chips": {g: {"peak_bf16_flops_per_chip": c.peak_bf16_flops, "hbm_bandwidth_per_chip": c.hbm_bandwidth,
                         "hbm_bytes_per_chip": c.hbm_bytes, "devices_per_chip": c.devices_per_chip,
                         "source": c.source} for g, c in tc.CHIPS.items()},
           "anchors": ANCHORS, "table": [], "smallest": [], "all": []}
    steps: dict = {}  # (target, preset, h, w, f) -> Report without VAE
    vaes: dict = {}  # (generation, preset, h, w, f) -> (programs, peak bytes, tiled)
    searches: list = []
    t0 = time.perf_counter()

    def step(target: str, preset: str, h: int, w: int, f: int):
        key = (target, preset, h, w, f)
        if key not in steps:
            t = time.perf_counter()
            steps[key] = tc.compile_report(target, preset, h, w, f, vae=False)
            print(f"  compiled the {preset} {h}x{w}x{f} step for {target} in {time.perf_counter() - t:.0f} s "
                  f"(total {time.perf_counter() - t0:.0f} s)", flush=True)
            save()
        return steps[key]

    def vae(gen: str, preset: str, h: int, w: int, f: int) -> None:
        key = (gen, preset, h, w, f)
        if key not in vaes:
            t = time.perf_counter()
            target = tc.parse_target(tc.target_names(gen)[0])
            programs, est, weights, tiled = tc.compile_vae_decode(target, tc.Video(preset, h, w, f),
                                                                  dtype=args.vae_dtype)
            vaes[key] = (programs, est.peak_bytes + weights, tiled)
            print(f"  compiled the {preset} {h}x{w}x{f} VAE decode for {gen} in {time.perf_counter() - t:.0f} s: "
                  f"{(est.peak_bytes + weights) / GIB:.2f} GiB{' tiled' if tiled else ''} "
                  f"(total {time.perf_counter() - t0:.0f} s)", flush=True)
            save()

    def merged(r):
        v = vaes.get((r.target.chip.generation, r.video.preset, r.video.height, r.video.width, r.video.frames))
        return r.with_vae(*v) if v else r

    def save() -> None:
        from weights.atomic import atomic_write

        out["all"] = [_row(merged(r)) for r in steps.values()]
        out["table"] = [_row(merged(steps[(t, A14B, h, w, f)])) for h, w, f in SIZES.values() for t in TABLE_TARGETS
                        if (t, A14B, h, w, f) in steps]
        out["smallest"] = []
        for (preset, h, w, f, gen), (found, tried) in searches:
            v = vaes.get((gen, preset, h, w, f))
            out["smallest"].append({
                "preset": preset, "size": f"{h}x{w}", "frames": f, "generation": gen,
                "smallest_resident": found["resident"].target.name if found["resident"] else None,
                "smallest_offloaded": found["offloaded"].target.name if found["offloaded"] else None,
                "vae_peak_bytes": v[1] if v else None, "vae_tiled": v[2] if v else None,
                "vae_fits": (v[1] <= tc.CHIPS[gen].hbm_bytes // tc.CHIPS[gen].devices_per_chip) if v else None,
                "tried": tried})
        out["total_s"] = time.perf_counter() - t0
        with atomic_write(path, "w", encoding="utf-8") as fh:
            json.dump(out, fh, indent=2)

    table_gens = list(dict.fromkeys(tc.parse_target(t).chip.generation for t in TABLE_TARGETS))
    for phase in phases:
        print(f"phase {phase}", flush=True)
        if phase == "table":
            for h, w, f in SIZES.values():
                for target in TABLE_TARGETS:
                    print(tc.format_table(step(target, A14B, h, w, f)), flush=True)
        elif phase in ("search-a14b", "search-others"):
            for preset, label, h, w, f in SEARCH:
                if (preset == A14B) != (phase == "search-a14b"):
                    continue
                for gen in gens:
                    found, tried = tc.smallest_fitting(gen, preset, h, w, f, max_chips=args.max_chips, compile=step)
                    searches.append(((preset, h, w, f, gen), (found, tried)))
                    save()
                    print(f"{preset} {label} on {gen}: the step fits with experts resident from "
                          f"{found['resident'].target.name if found['resident'] else '-'}, offloaded from "
                          f"{found['offloaded'].target.name if found['offloaded'] else '-'}", flush=True)
        elif phase == "vae":
            for h, w, f in SIZES.values():
                for gen in table_gens:
                    vae(gen, A14B, h, w, f)
        elif phase == "vae-others":
            for preset, label, h, w, f in SEARCH:
                for gen in gens:
                    vae(gen, preset, h, w, f)
        out["phases_done"].append(phase)
        save()
    print_summary(out)
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
