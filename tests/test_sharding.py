"""The DiT sharded over simulated CPU devices (FSDP weights + token split) matches the unsharded model.

JAX fixes its device count when it starts, and the rest of the suite runs with one device in this
process, so the multi-device checks run in child processes with 8 simulated host devices; the child
prints one JSON line of measurements and the tests here assert on it.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from jax.sharding import PartitionSpec as P

from jax_impl.sharding import param_spec

ROOT = Path(__file__).resolve().parents[1]
DEVICES = 8
# Tiny models on a busy CPU: compile time dominates, and these flags cut it ~3x. Sharded and unsharded
# runs compile with the same flags, so the parity comparison is unaffected.
FAST_COMPILE = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"

CHILD = r"""
import json, re
import numpy as np, jax, jax.numpy as jnp
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P
from jax_impl.dit import WanTransformer
from weights.configs.presets import get_preset
from jax_impl import sharding as S
from kernels.context_parallel import SequenceSplit, split_attention
from parity.dit import make_inputs
from parity.metrics import rel_l2

assert jax.device_count() == 8, jax.devices()
res = {"parity": {}}

def random_model(cfg):
    # Random weights straight from numpy: building the model eagerly or compiling its init costs
    # seconds on a busy CPU; only shapes and finite values matter here.
    abstract = nnx.eval_shape(lambda: WanTransformer(cfg, attention_backend="xla", rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    rng = np.random.default_rng(0)
    fill = lambda a: jnp.asarray(rng.standard_normal(a.shape) * (min(0.3, a.shape[-2] ** -0.5) if a.ndim > 1 else 0.1), a.dtype)
    return nnx.merge(graphdef, jax.tree.map(fill, state))

def check(preset, frames, size, counts, hlo_for=None, **changes):
    cfg = get_preset(preset).transformer.replace(**changes)
    model = random_model(cfg)
    inp = make_inputs(cfg, frames=frames, height=size, width=size)
    ref = np.asarray(nnx.jit(lambda m, *a: m(*a))(model, inp.latents, inp.timestep, inp.text, inp.image))
    for n in counts:
        fwd = S.sharded_forward(model, S.make_mesh(n))
        if n == hlo_for:  # compile explicitly, keep the per-device program text, run the same executable
            rep = NamedSharding(fwd.mesh, P())
            args = tuple(None if a is None else jax.device_put(a, rep) for a in (inp.latents, inp.timestep, inp.text, inp.image))
            compiled = fwd.jitted.lower(fwd.state, args).compile()
            res["hlo"] = compiled.as_text()
            out = compiled(fwd.state, args)
        else:
            out = fwd(inp.latents, inp.timestep, inp.text, inp.image)
        res["parity"][f"{preset}/{n}/{frames}x{size}x{size}"] = rel_l2(np.asarray(out), ref)
    return model, fwd

# 3x3x3 = 27 tokens divide by no device count (padding); 3x4x4 = 48 tokens divide by 2, 4 and 8.
check("tiny-wan2.1-t2v-1.3b", 3, 6, (8, 2))
check("tiny-wan2.1-i2v-14b", 3, 6, (8,))
check("tiny-wan2.2-ti2v-5b", 3, 6, (8,))
model, fwd = check("tiny-wan2.1-t2v-1.3b", 3, 8, (4, 8), hlo_for=8, ffn_dim=80)  # 80: a width no other tensor has

# Parameters: split for real (local shard smaller than the global array), ~1/8 of the bytes each.
flat = dict(nnx.to_flat_state(fwd.state))
def info(path):
    a = flat[path][...]
    return {"global": list(a.shape), "local": list(S.local_shape(a)), "spec": str(a.sharding.spec)}
res["params"] = {".".join(map(str, k)): info(k) for k in flat if k[-1] == "kernel" or k[0] in ("patch_kernel",)}
leaves = jax.tree.leaves(fwd.state)
res["bytes_total"] = sum(a.nbytes for a in leaves)
res["bytes_device0"] = sum(s.data.nbytes for a in leaves for s in a.addressable_shards if s.device == jax.devices()[0])

# Activations, read from the per-device program of the 48-token forward on 8 devices: the
# feed-forward hidden state must be [1, 6, 80] (48 / 8 tokens), never [1, 48, 80]; no tensor of
# all 48 tokens at the model width 32 may appear either.
hlo = res.pop("hlo")
res["ffn_hidden_local"] = "f32[1,6,80]" in hlo
res["ffn_hidden_full"] = "f32[1,48,80]" in hlo
res["width_full"] = "f32[1,48,32]" in hlo
res["kv_all_gather_in_shard_map"] = bool(re.search(r"all-gather\(.*shard_map/all_gather", hlo))

# Split attention refuses a query length the devices do not divide, naming the fix.
q = jnp.zeros((1, 27, 2, 16))
try:
    split_attention(q, q, q, SequenceSplit(S.make_mesh(8), kv_len=27), backend="xla")
    res["indivisible_error"] = None
except ValueError as e:
    res["indivisible_error"] = str(e)

# create_sharded: parameters born split, equal to the same module built whole.
from jax_impl.layers import Dense
born = S.create_sharded(lambda: Dense(64, 128, rngs=nnx.Rngs(0)), S.make_mesh(8))
whole = Dense(64, 128, rngs=nnx.Rngs(0))
res["create_sharded_local"] = list(S.local_shape(born.kernel[...]))
res["create_sharded_equal"] = bool(np.array_equal(np.asarray(born.kernel[...]), np.asarray(whole.kernel[...])))
# shard_params: a model built whole (e.g. loaded from a checkpoint) split in place.
S.shard_params(model, S.make_mesh(4))
res["shard_params_local"] = list(S.local_shape(nnx.state(model)["blocks"]["ffn"]["fc1"]["kernel"][...]))
print("RESULT " + json.dumps(res))
"""


def _env() -> dict:
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={DEVICES} {FAST_COMPILE}", JAX_PLATFORMS="cpu")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env


@pytest.fixture(scope="module")
def child():
    p = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, timeout=300, env=_env(), cwd=ROOT)
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")]
    assert p.returncode == 0 and lines, p.stdout[-3000:] + p.stderr[-3000:]
    return json.loads(lines[0][7:])


def test_sharded_forward_matches_unsharded(child):
    parity = child["parity"]
    assert len(parity) == 6, parity
    for preset in ("tiny-wan2.1-t2v-1.3b", "tiny-wan2.1-i2v-14b", "tiny-wan2.2-ti2v-5b"):
        assert any(k.startswith(f"{preset}/8/") for k in parity)
    assert {k.split("/")[1] for k in parity} == {"2", "4", "8"}
    bad = {k: v for k, v in parity.items() if not v < 1e-5}
    assert not bad, bad


def test_parameters_are_split(child):
    params = child["params"]
    fc1 = params["blocks.ffn.fc1.kernel"]  # [layers, 32, 80]: split along the 80 outputs, layer axis whole
    assert fc1["global"] == [2, 32, 80] and fc1["local"] == [2, 32, 10], fc1
    split = [k for k, v in params.items() if v["local"] != v["global"]]
    assert len(split) >= 0.9 * len(params), params  # every kernel of the tiny model divides by 8
    # Each device holds little more than 1/8 of the bytes (small norms and biases stay replicated).
    assert child["bytes_device0"] < 0.3 * child["bytes_total"], child
    assert child["create_sharded_local"] == [64, 16]
    assert child["create_sharded_equal"]
    assert child["shard_params_local"] == [2, 32, 20]  # 80 outputs over 4 devices


def test_activations_are_split_over_tokens(child):
    assert child["ffn_hidden_local"], "no per-device [1, 6, ffn] feed-forward activation in the compiled program"
    assert not child["ffn_hidden_full"], "a device computes the whole token axis of the feed-forward"
    assert not child["width_full"], "a device holds all tokens at the model width"
    assert child["kv_all_gather_in_shard_map"]


def test_indivisible_attention_names_the_fix(child):
    msg = child["indivisible_error"]
    assert msg and "pad the token axis to 32" in msg


@pytest.mark.parametrize(
    "shape, stacked, spec",
    [
        ((40, 5120, 13824), True, P(None, None, "devices")),  # largest non-layer axis
        ((40, 5120, 5120), True, P(None, "devices", None)),  # ties: the earlier axis
        ((40, 5120), True, P(None, "devices")),
        ((1, 2, 2, 36, 5120), False, P(None, None, None, None, "devices")),
        ((1, 2, 2, 36, 30), False, P()),  # nothing divisible by 8
        ((40, 1, 6, 24), True, P()),  # 144 elements per layer: replicated
        ((13824,), False, P("devices")),  # 1-D above the threshold
    ],
)
def test_fsdp_rule(shape, stacked, spec):
    assert param_spec(shape, 8, stacked=stacked) == spec


def test_fsdp_rule_never_splits_the_layer_axis():
    assert param_spec((8, 100, 3), 8, stacked=True) == P()
    assert param_spec((8, 100, 3), 8, stacked=False, min_elements=1) == P("devices", None, None)


def test_scaling_bench_tiny(tmp_path):
    out = tmp_path / "scaling.json"
    p = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "scaling.py"), "--tiny", "--devices", "1,8", "--json", str(out)],
        capture_output=True, text=True, timeout=300, env=_env(), cwd=ROOT,
    )
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    data = json.loads(out.read_text())
    rows = {r["devices"]: r for r in data["results"]}
    assert set(rows) == {1, 8}
    for n, r in rows.items():
        assert r["step_s"] > 0 and r["forward_s"] > 0, r
        assert r["forward_rel_l2"] < 1e-5 and r["step_rel_l2"] < 1e-5, r
        assert r["param_bytes_per_device"] <= r["param_bytes_total"] / n * 1.5, r
    assert rows[1]["speedup"] == 1.0
    assert "scaling efficiency" in p.stdout
