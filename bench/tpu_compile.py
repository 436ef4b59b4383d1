"""The TPU compile matrix: what fits on which TPU slice, compiled for real TPU topologies on this host.

Runs `jax_impl.tpu_compile` (the library behind `wanport compile`) over
  * the table: Wan2.2 I2V-A14B at 720x1280x81 and 480x832x81 on v5p-8, v6e-8 and v5e-8 (--targets);
  * the smallest slice per generation on which the step fits with both A14B experts resident, and with the
    idle expert offloaded to host memory, plus the VAE decode (A14B 720p and 480p; Wan2.1-T2V-1.3B at
    480x832x81; Wan2.2-TI2V-5B at 704x1280x121, its native size);
and writes bench/results/tpu_compile_<date>.json (rewritten after every compile, so an interrupted run keeps
what it has) and a table. Memory and FLOPs are XLA's, from programs compiled by libtpu for those
topologies; times are roofline ESTIMATES; nothing runs on a TPU.

  python bench/tpu_compile.py                      # everything (about 1-2 hours on a 2-core CPU)
  python bench/tpu_compile.py --only table         # the table only
  python bench/tpu_compile.py --generations v5e,v6e --only smallest

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

TABLE_TARGETS = ["v5p-8", "v6e-8", "v5e-8"]
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
                             "tokens", "experts", "splash_blocks", "param_bytes_per_device", "vae_peak_bytes",
                             "vae_tiled", "fits_resident", "fits_offloaded", "estimate", "programs")}
    row.update(step_peak_offloaded_bytes=r.step.peak_bytes,
               step_peak_resident_bytes=r.step.peak_bytes + (r.param_bytes if r.video.experts == 2 else 0),
               step_flops_per_device=r.step.flops, step_compile_s=r.step.compile_s)
    return row


def _line(d: dict) -> str:
    """A table line from a `_row` dict (so a saved JSON prints the same table: --print)."""
    e, hbm = d["estimate"], d["hbm_per_device"]
    res, off, vae = d["step_peak_resident_bytes"], d["step_peak_offloaded_bytes"], d["vae_peak_bytes"]
    return (f"{d['preset']:<17} {d['size'] + 'x' + str(d['frames']):<13} {d['target']:<7} {d['devices']:>3} "
            f"{hbm / GIB:>5.0f} {res / GIB:>9.2f} {'yes' if res <= hbm else 'NO':>4} "
            f"{off / GIB:>9.2f} {'yes' if off <= hbm else 'NO':>4} {vae / GIB:>8.2f}{'t' if d['vae_tiled'] else ' '} "
            f"{'yes' if vae <= hbm else 'NO':>4} {d['step_flops_per_device'] / 1e12:>8.0f} {e['step_s']:>7.2f} "
            f"{e['denoise_s']:>7.0f} {d['step_compile_s']:>7.0f}")


def print_summary(out: dict) -> None:
    """The summary table and the smallest-slice lines of a results dict (fresh or loaded from JSON)."""
    print("\n" + HEADER)
    for d in out.get("all") or out["table"]:
        print(_line(d))
    print(LEGEND)
    if out.get("smallest"):
        print("\nsmallest slice that fits (step + VAE decode):")
        for s in out["smallest"]:
            print(f"  {s['preset']:<17} {s['size']:>9}x{s['frames']:<4} {s['generation']}: experts resident "
                  f"{s['smallest_resident'] or '-'}, offloaded {s['smallest_offloaded'] or '-'}"
                  f"{'' if s.get('complete', True) else ' (search cut off)'}")


HEADER = (f"{'preset':<17} {'video':<13} {'slice':<7} {'dev':>3} {'HBM':>5} {'resident':>9} {'fits':>4} "
          f"{'offload':>9} {'fits':>4} {'VAE GiB':>9} {'fits':>4} {'TFLOP/d':>8} {'est s':>7} {'est 40':>7} "
          f"{'compile':>7}")
LEGEND = ("GiB per device; resident: step peak with both A14B experts on the device; offload: the idle expert in "
          "host memory (one-expert models: the same); VAE: decode peak on one device (t: tiled); TFLOP/d: per "
          "device per guided step; est s / est 40: roofline ESTIMATE per step and for 40 steps, not measured")


def main(argv=None) -> int:
    global A14B, SIZES, SEARCH, TABLE_TARGETS
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", choices=["table", "smallest"], help="run one part only")
    ap.add_argument("--generations", default="v5e,v6e,v5p,v7x", help="generations searched (default all four)")
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
    TABLE_TARGETS = [t.strip() for t in args.targets.split(",") if t.strip()]
    if args.tiny:
        A14B, SIZES, TABLE_TARGETS = "tiny-hd128-wan2.2-i2v-a14b", {"tiny": (128, 128, 9)}, ["v5p-8"]
        SEARCH, args.generations = [(A14B, "tiny", 128, 128, 9)], "v5p"

    from jax_impl import tpu_compile as tc

    reason = tc.libtpu_available()
    if reason:
        ap.error(reason)
    path = args.json or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                     f"tpu_compile_{datetime.date.today().isoformat()}.json")
    out = {"date": datetime.date.today().isoformat(), "versions": _versions(), "host": "CPU only (no TPU)",
           "vae_dtype": args.vae_dtype, "dit_dtype": "bfloat16", "text_tokens": 512, "steps": 40,
           "chips": {g: {"peak_bf16_flops_per_chip": c.peak_bf16_flops, "hbm_bandwidth_per_chip": c.hbm_bandwidth,
                         "hbm_bytes_per_chip": c.hbm_bytes, "devices_per_chip": c.devices_per_chip,
                         "source": c.source} for g, c in tc.CHIPS.items()},
           "anchors": ANCHORS, "table": [], "smallest": [], "all": []}
    done: dict = {}
    t0 = time.perf_counter()

    def report(target: str, preset: str, h: int, w: int, f: int):
        key = (target, preset, h, w, f)
        if key not in done:
            t = time.perf_counter()
            done[key] = tc.compile_report(target, preset, h, w, f, vae_dtype=args.vae_dtype)
            out["all"].append(_row(done[key]))
            print(f"  compiled {preset} {h}x{w}x{f} for {target} in {time.perf_counter() - t:.0f} s "
                  f"(total {time.perf_counter() - t0:.0f} s)", flush=True)
        return done[key]

    def save() -> None:
        from weights.atomic import atomic_write

        with atomic_write(path, "w", encoding="utf-8") as fh:
            json.dump(out, fh, indent=2)

    if args.only in (None, "table"):
        for label, (h, w, f) in SIZES.items():
            for target in TABLE_TARGETS:
                r = report(target, A14B, h, w, f)
                out["table"].append(_row(r))
                print(tc.format_table(r), flush=True)
                save()
    if args.only in (None, "smallest"):
        gens = [g.strip() for g in args.generations.split(",") if g.strip()]
        for preset, label, h, w, f in SEARCH:
            for gen in gens:
                reports, tried = tc.smallest_fitting(gen, preset, h, w, f, max_chips=args.max_chips,
                                                     compile=report)
                found = {mode: r.target.name if r else None for mode, r in reports.items()}
                out["smallest"].append({"preset": preset, "size": f"{h}x{w}", "frames": f, "generation": gen,
                                        "smallest_resident": found["resident"],
                                        "smallest_offloaded": found["offloaded"], "tried": tried})
                print(f"{preset} {label} on {gen}: smallest with experts resident {found['resident']}, "
                      f"offloaded {found['offloaded']} (tried {', '.join(t['target'] for t in tried)})", flush=True)
                save()
    out["total_s"] = time.perf_counter() - t0
    save()
    print_summary(out)
    print(f"\nwrote {path}")
    return 0


def _versions() -> dict:
    import importlib.metadata as md

    out = {}
    for p in ("jax", "jaxlib", "flax", "libtpu"):
        try:
            out[p] = md.version(p)
        except md.PackageNotFoundError:
            pass
    return out


if __name__ == "__main__":
    sys.exit(main())
