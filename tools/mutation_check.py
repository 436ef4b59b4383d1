"""Mutation check: plant known bugs in a copy of the tree and assert that the fast tests catch each one.

A test suite that passes proves little until it is seen failing on the bugs it exists to catch. Each
entry of `MUTATIONS` names a file, the exact text to replace (it must occur exactly once, so a
refactor that moves the code fails this check loudly instead of silently planting nothing), the
buggy replacement, and the pytest arguments to run, most targeted first. The tree is copied to a
temporary folder once; each mutation is applied there, the tests run with `-x` (a killed mutant stops
at its first failure) and without slow tests, and the file is restored before the next one.

    python tools/mutation_check.py            # run every mutation; exit 1 if any survives
    python tools/mutation_check.py --list     # what is planted where
    python tools/mutation_check.py --check    # only verify that every mutation still applies (fast)
    python tools/mutation_check.py --only rope-split qk-norm-swap
    python tools/mutation_check.py --baseline # first run every mutation's tests on the unmutated copy

To extend it, append a `Mutation`; the README lists the mutations (keep both in step).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("wanport", "parity", "jax_impl", "torch_ref", "weights", "kernels")
COPY_IGNORE = shutil.ignore_patterns(".git", ".venv", "__pycache__", ".pytest_cache", ".hypothesis", "*.egg-info", "results")
PER_MUTANT_TIMEOUT_S = 300


@dataclasses.dataclass(frozen=True)
class Mutation:
    name: str
    why: str  # the bug, in words
    file: str  # relative to the repository root
    edits: tuple[tuple[str, str], ...]  # (old, new): each old text must occur exactly once in the file
    tests: tuple[str, ...]  # pytest arguments, the most targeted test first


REAL_WIDTH_FP32 = "tests/test_dit_real_width.py::test_fp32_real_head_width"
FW_JOINT = "tests/test_fantasyworld_model.py::test_joint_forward_parity"

MUTATIONS: tuple[Mutation, ...] = (
    Mutation(
        "qk-norm-swap",
        "the weight map loads diffusers' norm_q into our norm_k and norm_k into norm_q",
        "weights/dit_map.py",
        (
            ('f"{b}.{wn}.norm_q", f"{b}.{fn}.norm_q"', 'f"{b}.{wn}.norm_q", f"{b}.{fn}.norm_k"'),
            ('f"{b}.{wn}.norm_k", f"{b}.{fn}.norm_k"', 'f"{b}.{wn}.norm_k", f"{b}.{fn}.norm_q"'),
        ),
        (REAL_WIDTH_FP32, "tests/test_dit_parity.py"),
    ),
    Mutation(
        "rope-split",
        "rotary channels split head_dim // 4 per spatial axis instead of 2 * (head_dim // 6) (equal at 16, not at 128)",
        "weights/configs/dit.py",
        (("hw = 2 * (self.attention_head_dim // 6)", "hw = self.attention_head_dim // 4"),),
        (REAL_WIDTH_FP32,),
    ),
    Mutation(
        "patch-kernel-hw-swap",
        "conv3d kernels (the DiT's patch embedding among them) with height and width axes swapped in both directions "
        "of the map (round trips stay exact)",
        "weights/entry.py",
        (('"conv3d": (2, 3, 4, 1, 0),', '"conv3d": (2, 4, 3, 1, 0),'),),
        (REAL_WIDTH_FP32, "tests/test_dit_parity.py"),
    ),
    Mutation(
        "i2v-mask-one-slot",
        "the first pixel frame marks one of latent frame 0's four mask slots instead of all four",
        "jax_impl/conditioning.py",
        (("np.concatenate([np.repeat(given[:1], t), given[1:]])", "np.concatenate([given[:1], np.zeros(t - 1, np.float32), given[1:]])"),),
        ("tests/test_i2v_condition.py",),
    ),
    Mutation(
        "shift-formula",
        "the flow shift applied inverted: sigma / (shift - (shift - 1) sigma) instead of shift sigma / (1 + (shift - 1) sigma)",
        "weights/configs/scheduler.py",
        (("return scale * sigma / (one + minus_one * sigma)", "return sigma / (scale - minus_one * sigma)"),),
        ("tests/test_schedulers.py",),
    ),
    Mutation(
        "denormalize-direction",
        "latents denormalised with the normalising formula ((z - mean) / std instead of z * std + mean) before decoding",
        "jax_impl/latents.py",
        (("return (z.astype(np.float32) * std + mean).astype(z.dtype)", "return ((z.astype(np.float32) - mean) / std).astype(z.dtype)"),),
        ("tests/test_vae_latents.py",),
    ),
    Mutation(
        "splash-key-mask-off-by-one",
        "Splash attention treats the first padded key as real (segment ids from <= kv_len)",
        "kernels/splash.py",
        (("jnp.where(jnp.arange(kv_pad) < kv_len, REAL, PADDING)", "jnp.where(jnp.arange(kv_pad) <= kv_len, REAL, PADDING)"),),
        ("tests/test_attention.py", "-k", "unmasked_key_padding or splash_cross_attention"),
    ),
    Mutation(
        "cross-attn-image-key-swap",
        "image keys in cross-attention computed with the text key projection and norm instead of k_img / norm_k_img",
        "jax_impl/dit.py",
        (("self._heads(self.norm_k_img(self.k_img(context_img)))", "self._heads(self.norm_k(self.k(context_img)))"),),
        ("tests/test_dit_real_width.py", "-k", "fp32 and wan2.1-i2v", "tests/test_dit_parity.py"),
    ),
    Mutation(
        "block-stack-ignores-start",
        "a sub-range of the stacked blocks starts at block 0 whatever its start (FantasyWorld's blocks 16..39)",
        "jax_impl/dit.py",
        (("stacked = jax.tree.map(lambda a: a[layers], stacked)", "stacked = jax.tree.map(lambda a: a[: layers.stop], stacked)"),),
        ("tests/test_dit_hooks.py", "-k", "sub_range"),
    ),
    Mutation(
        "ffn-mod-shift-scale-swap",
        "the attention half hands the feed-forward half its modulation as (scale, shift, gate)",
        "jax_impl/dit.py",
        (("return x, (shift_ff, scale_ff, gate_ff)", "return x, (scale_ff, shift_ff, gate_ff)"),),
        ("tests/test_dit_hooks.py", "-k", "halves"),
    ),
    Mutation(
        "rope-traced-offset",
        "rotary tables of a traced frame offset (the cache's block counter) start one frame late",
        "jax_impl/rope.py",
        (("jax.lax.dynamic_slice_in_dim(jnp.asarray(full), frame_offset, n, 0)", "jax.lax.dynamic_slice_in_dim(jnp.asarray(full), frame_offset + 1, n, 0)"),),
        ("tests/test_causal.py", "-k", "rope_offsets"),
    ),
    Mutation(
        "noise-one-stream",
        "every sample of a batch draws the same noise (the sample index is not folded into the key)",
        "jax_impl/noise.py",
        (("k = jax.random.fold_in(key, i)", "k = key"),),
        ("tests/test_noise.py",),
    ),
    Mutation(
        "first-frame-finalize-swap",
        "TI2V's first-frame condition keeps the sample on frame 0 and the image latent on the denoised frames",
        "jax_impl/conditioning.py",
        (("return (1 - self.denoise_mask) * self.latent + self.denoise_mask * latents",
          "return self.denoise_mask * self.latent + (1 - self.denoise_mask) * latents"),),
        ("tests/test_conditioning_types.py",),
    ),
    Mutation(
        "stage-condition-kind-lost",
        "the encode stage file records every condition as kind 'none' (read back as the wrong type)",
        "jax_impl/stages.py",
        (('return {"conditioning": self.condition.KIND}', 'return {"conditioning": "none"}'),),
        ("tests/test_conditioning_types.py",),
    ),
    Mutation(
        "time-embedding-sin-cos",
        "the sinusoidal timestep embedding puts sines first (Wan flips to cosines first)",
        "jax_impl/dit.py",
        (("jnp.concatenate([jnp.cos(angles), jnp.sin(angles)], axis=-1)", "jnp.concatenate([jnp.sin(angles), jnp.cos(angles)], axis=-1)"),),
        (REAL_WIDTH_FP32,),
    ),
    Mutation(
        "lora-rank-axis",
        "a LoRA pair's alpha / rank takes the rank from the input axis of down instead of its rows",
        "weights/lora.py",
        (("return self.alpha / (math.sqrt(self.rank) if self.rslora else self.rank)",
          "return self.alpha / (math.sqrt(self.rank) if self.rslora else self.down.shape[1])"),),
        ("tests/test_lora.py", "-k", "scale_alpha_and_rank or peft_layout"),
    ),
    Mutation(
        "distill-timesteps-unshifted",
        "explicit (LightX2V) timesteps used as noise levels without the flow shift",
        "jax_impl/schedulers.py",
        (("sig32 = (f32(cfg.shift) * u / (f32(1.0) + f32(cfg.shift - 1.0) * u)).astype(f32)", "sig32 = u"),),
        ("tests/test_schedulers.py", "-k", "explicit"),
    ),
    Mutation(
        "lora-merge-rounded-to-checkpoint-dtype",
        "LoRAs merged at load are rounded to the checkpoint's bf16 before a float32 model is built",
        "weights/lora_apply.py",
        (("    return LoraCheckpoint(checkpoint, scaled, dtype=dtype)", "    return LoraCheckpoint(checkpoint, scaled, dtype=None)"),),
        ("tests/test_lora_apply.py", "-k", "single_file"),
    ),
    Mutation(
        "checkpoint-hook-skipped",
        "the checkpoint engine reads a file's names as they are, without its weight map's canonical_keys hook",
        "weights/checkpoint.py",
        (("        view = self.map.file_keys(keys)\n", "        view = FileKeys.identity(keys)\n"),),
        ("tests/test_checkpoint_hooks.py",),
    ),
    Mutation(
        "dit-prefix-stripped-twice",
        "the DiT hook strips a known prefix again from names that already lost the file's prefix",
        "weights/dit_map.py",
        (("        return FileKeys({k[len(prefix):]: k for k in keys}, prefix=prefix)",
          "        again = lambda n: next((n[len(p):] for p in PREFIXES if n.startswith(p)), n)  # noqa: E731\n"
          "        return FileKeys({again(k[len(prefix):]): k for k in keys}, prefix=prefix)"),),
        ("tests/test_single_file.py", "-k", "prefix"),
    ),
    Mutation(
        "fw-base-components-kept",
        "FantasyWorld's hook sets nothing aside: the released file's pipe.text_encoder/image_encoder/vae tensors reach the key check",
        "weights/fantasyworld_map.py",
        (('BASE_COMPONENTS = ("pipe.text_encoder.", "pipe.image_encoder.", "pipe.vae.")', "BASE_COMPONENTS = ()"),),
        ("tests/test_convert_fantasyworld.py",),
    ),
    Mutation(
        "fw-adapter-after-output",
        "FantasyWorld's camera adapter shifts the cross-attention after its output projection instead of before",
        "jax_impl/fantasyworld/model.py",
        (("                shifted = adapter(out.reshape(*out.shape[:2], -1), camera)\n"
          "                return attn.output(shifted.reshape(out.shape))",
          "                return adapter(attn.output(out), camera)"),),
        (FW_JOINT,),
    ),
    Mutation(
        "fw-joint-order-swapped",
        "a FantasyWorld joint layer runs the Wan feed-forward half before the bidirectional attention",
        "jax_impl/fantasyworld/model.py",
        (("            x, g = bc(x, g, rope_video, rope_geo)\n            x = block.ffn_half(x, ffn_mod)",
          "            x = block.ffn_half(x, ffn_mod)\n            x, g = bc(x, g, rope_video, rope_geo)"),),
        (FW_JOINT,),
    ),
    Mutation(
        "fw-bicross-one-way",
        "FantasyWorld's bidirectional attention updates the video stream only (the geometry stream drops its update)",
        "jax_impl/fantasyworld/model.py",
        (("            x, g = bc(x, g, rope_video, rope_geo)", "            x, _ = bc(x, g, rope_video, rope_geo)"),),
        (FW_JOINT,),
    ),
    Mutation(
        "guidance-cut-off-by-one",
        "the default sampler keeps classifier-free guidance one step past --guidance-steps",
        "jax_impl/sampling.py",
        (("within = self.steps is None or i < self.steps", "within = self.steps is None or i <= self.steps"),),
        ("tests/test_fast_modes.py::test_default_run_is_the_plain_guided_loop",),
    ),
    Mutation(
        "cfg-reuse-full-scale",
        "CFG reuse adds scale * d_last to v_cond instead of (scale - 1) * d_last",
        "jax_impl/sampling.py",
        (("v = v_cond + (scale - 1.0) * carry.diff", "v = v_cond + scale * carry.diff"),),
        ("tests/test_fast_modes.py", "-k", "cfg_reuse_is"),
    ),
    Mutation(
        "step-cache-carry-overwritten",
        "a skipped step stores its rescaled prediction as the cache, so a second skip in a row rescales it again",
        "jax_impl/sampling.py",
        (("        v_uncond = carry.uncond * uncond_scale if guided else None\n",
          "        v_uncond = carry.uncond * uncond_scale if guided else None\n        carry = carry.replace(cond=v_cond)\n"),),
        ("tests/test_fast_modes.py", "-k", "skipped_steps_reuse"),
    ),
)


class MutationError(RuntimeError):
    """A mutation that cannot be planted (its text is gone or ambiguous): fix the entry, not the check."""


def mutate(text: str, m: Mutation) -> str:
    """`text` with `m`'s edits applied in order; each old text must occur exactly once when its turn comes."""
    for old, new in m.edits:
        n = text.count(old)
        if n != 1:
            found = "not found" if n == 0 else f"found {n} times"
            raise MutationError(
                f"mutation {m.name!r}: {old!r} {found} in {m.file}; the code moved, so update this entry in "
                f"tools/mutation_check.py (and the README list) so that it still plants the bug"
            )
        text = text.replace(old, new)
    return text


def check_all(root: Path = ROOT, mutations=MUTATIONS) -> None:
    """Raise MutationError unless every mutation applies to the tree at `root` and changes its file."""
    names = [m.name for m in mutations]
    if len(set(names)) != len(names):
        raise MutationError(f"duplicate mutation names in {names}")
    for m in mutations:
        original = (root / m.file).read_text(encoding="utf-8")
        if mutate(original, m) == original:
            raise MutationError(f"mutation {m.name!r} leaves {m.file} unchanged")


def _copy_tree(dst: Path) -> Path:
    tree = dst / "tree"
    shutil.copytree(ROOT, tree, ignore=COPY_IGNORE)
    return tree


def _env(tree: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(tree), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.setdefault("JAX_PLATFORMS", "cpu")
    return env


def _check_imports_from_copy(tree: Path) -> None:
    """The copy, not the editable install, must be what Python imports, or every mutant would 'survive'."""
    code = "import importlib; print('\\n'.join(importlib.import_module(p).__file__ for p in %r))" % (PACKAGES,)
    out = subprocess.run([sys.executable, "-c", code], cwd=tree, env=_env(tree), capture_output=True, text=True, check=True)
    outside = [line for line in out.stdout.split() if not Path(line).resolve().is_relative_to(tree.resolve())]
    if outside:
        raise RuntimeError(f"the copied tree is not what gets imported: {outside}")


@dataclasses.dataclass
class Result:
    mutation: Mutation
    verdict: str  # killed | SURVIVED | ERROR
    seconds: float
    detail: str


def _pytest(tree: Path, args) -> tuple[int | None, str, float]:
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", "-m", "not slow and not gpu", *args]
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=tree, env=_env(tree), capture_output=True, text=True, timeout=PER_MUTANT_TIMEOUT_S)
        rc, out = proc.returncode, proc.stdout + proc.stderr
    except subprocess.TimeoutExpired:
        rc, out = None, f"timed out after {PER_MUTANT_TIMEOUT_S} s"
    return rc, out, time.perf_counter() - start


def run_baseline(tree: Path, mutations) -> None:
    """Every mutation's tests must pass on the unmutated copy, or a 'kill' would mean nothing."""
    for m in mutations:
        rc, out, seconds = _pytest(tree, m.tests)
        print(f"baseline for {m.name}: {'passed' if rc == 0 else 'FAILED'} in {seconds:.0f} s", flush=True)
        if rc != 0:
            raise RuntimeError(f"the tests of {m.name!r} fail without the mutation:\n" + "\n".join(out.splitlines()[-15:]))


def run_one(tree: Path, m: Mutation) -> Result:
    path = tree / m.file
    original = path.read_text(encoding="utf-8")
    path.write_text(mutate(original, m), encoding="utf-8")
    try:
        rc, out, seconds = _pytest(tree, m.tests)
    finally:
        path.write_text(original, encoding="utf-8")
    failed = re.findall(r"^FAILED (\S+)", out, flags=re.M)
    if rc == 1 and failed:
        return Result(m, "killed", seconds, failed[0])
    if rc == 0:
        return Result(m, "SURVIVED", seconds, "every selected test passed")
    tail = "\n".join(out.strip().splitlines()[-15:])
    return Result(m, "ERROR", seconds, f"pytest exit code {rc} (not a test failure):\n{tail}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog="Exit code 0 when every planted bug is caught.")
    parser.add_argument("--list", action="store_true", help="print the mutations and exit")
    parser.add_argument("--check", action="store_true", help="only check that every mutation still applies")
    parser.add_argument("--only", nargs="+", metavar="NAME", help="run only these mutations")
    parser.add_argument("--baseline", action="store_true", help="first check that the tests pass without mutations")
    args = parser.parse_args(argv)
    if args.list:
        for m in MUTATIONS:
            print(f"{m.name:<28} {m.file:<26} {m.why}")
        return 0
    check_all()
    if args.check:
        print(f"all {len(MUTATIONS)} mutations apply")
        return 0
    chosen = MUTATIONS
    if args.only:
        unknown = sorted(set(args.only) - {m.name for m in MUTATIONS})
        if unknown:
            parser.error(f"unknown mutation(s) {unknown}; see --list")
        chosen = tuple(m for m in MUTATIONS if m.name in args.only)
    results = []
    with tempfile.TemporaryDirectory(prefix="wanport-mutants-") as tmp:
        tree = _copy_tree(Path(tmp))
        _check_imports_from_copy(tree)
        if args.baseline:
            run_baseline(tree, chosen)
        for i, m in enumerate(chosen, 1):
            print(f"[{i}/{len(chosen)}] {m.name} ({m.file}) ...", end=" ", flush=True)
            r = run_one(tree, m)
            print(f"{r.verdict} in {r.seconds:.0f} s: {r.detail.splitlines()[0]}", flush=True)
            if r.verdict == "ERROR":
                print(r.detail, flush=True)
            results.append(r)
    print(f"\n{'mutation':<28} {'verdict':<9} {'seconds':>7}  caught by")
    for r in results:
        print(f"{r.mutation.name:<28} {r.verdict:<9} {r.seconds:>7.0f}  {r.detail.splitlines()[0] if r.verdict == 'killed' else '-'}")
    bad = [r.mutation.name for r in results if r.verdict != "killed"]
    print(f"\n{len(results) - len(bad)}/{len(results)} mutants killed" + (f"; not killed: {', '.join(bad)}" if bad else ""))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
