"""TPU readiness without a TPU: the tiny presets compiled for a real v5p-8 topology on this CPU host.

libtpu compiles ahead of time for a named TPU topology (no TPU needed), so these tests prove that the
Splash kernel (a Mosaic TPU custom call) and the FSDP + context-parallel sharding lower for TPU, and that
XLA's memory numbers add up. They skip, with the reason, where libtpu is not installed (`.[tpu]`).
"""

from __future__ import annotations

import json
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_impl import tpu_compile as tc

NO_LIBTPU = tc.libtpu_available()
needs_libtpu = pytest.mark.skipif(NO_LIBTPU is not None, reason=f"TPU compile tests: {NO_LIBTPU}")

TINY = "tiny-hd128-wan2.2-i2v-a14b"  # head width 128, as Splash on TPU wants; 2 layers, 2 experts
SIZE = (128, 128, 9)  # latents 3 x 16 x 16 -> 192 tokens: 48 per device on 4 devices


def test_libtpu_is_there_where_required():
    """CI installs the tpu extra and sets WANPORT_REQUIRE_LIBTPU=1: there a missing libtpu is a failure, not
    a quiet skip of every TPU compile test."""
    import os

    if os.environ.get("WANPORT_REQUIRE_LIBTPU") == "1":
        assert NO_LIBTPU is None, NO_LIBTPU


def all_gathers(hlo: str) -> int:
    return len(re.findall(r"\ball-gather(?:-start)?\(", hlo))


@pytest.mark.parametrize("name,topology,chips,devices", [
    ("v5p-8", "v5p:2x2x1", 4, 4), ("v5p-16", "v5p:2x2x2", 8, 8), ("v5e-8", "v5e:2x4", 8, 8),
    ("v6e-8", "v6e:2x4", 8, 8), ("v5e-16", "v5e:4x4", 16, 16), ("v6e-16", "v6e:4x4", 16, 16),
    ("v5e-1", "v5e:1x1", 1, 1), ("v7x-8", "tpu7x:2x2x1", 4, 8), ("TPU7x-16", "tpu7x:2x2x2", 8, 16),
])
def test_target_names_map_to_topologies(name, topology, chips, devices):
    t = tc.parse_target(name)
    assert (t.topology, t.chips, t.devices) == (topology, chips, devices)


@pytest.mark.parametrize("name,hint", [("v5p-6", "v5p-8"), ("v5e-3", "v5e-4"), ("v9-8", "v5p"), ("tpu", "v5p-8")])
def test_bad_target_names_are_refused_with_the_choices(name, hint):
    with pytest.raises(ValueError, match=hint):
        tc.parse_target(name)


def test_splash_blocks_follow_the_target_generation():
    from kernels import splash

    assert splash.generation("TPU v5 lite") == "v5e" and splash.generation("TPU v5") == "v5p"
    assert splash.generation("TPU v6 lite") == "v6e" and splash.generation("TPU7x") == "v7x"
    assert splash.current_blocks() == (None, splash.DEFAULT_BLOCKS)  # CPU: interpret mode, default blocks
    with splash.compile_for("v6e"):
        assert splash.current_blocks() == ("v6e", splash.BLOCKS["v6e"])
    assert splash.current_blocks()[0] is None
    with pytest.raises(ValueError, match="v5p"):
        with splash.compile_for("v4"):
            pass


@pytest.fixture(scope="module")
def step():
    """The tiny A14B expert's guided step compiled for v5p-8 (4 devices), as `wanport compile` does it."""
    target, video = tc.parse_target("v5p-8"), tc.Video(TINY, *SIZE)
    program, compiled, param_bytes = tc.compile_denoise_step(target, video)
    return target, video, program, compiled.as_text(), param_bytes


@needs_libtpu
def test_step_runs_attention_in_the_splash_kernel_on_the_local_query_slice(step):
    target, video, program, hlo, _ = step
    calls = tc.splash_kernels(hlo)
    cfg = video.dit
    assert len(calls) == 2 * cfg.num_layers  # self- and text cross-attention in every layer
    # Output [batch 2 (CFG), heads, padded queries, head_dim]: this device's 48 queries padded to one
    # 128 block; without context parallelism all 192 would be there (padded to 256).
    local = -(-video.tokens // program.devices)
    for line in calls:
        m = re.search(r"bf16\[(\d+),(\d+),(\d+),(\d+)\]\{[^}]*\}\) custom-call", line)
        assert m, line[:200]
        b, h, q, d = map(int, m.groups())
        assert (b, h, d) == (2, cfg.num_attention_heads, cfg.attention_head_dim)
        assert q == -(-local // 128) * 128 < video.tokens
    assert program.attention_flops == tc.splash_flops(cfg, 2, video.tokens, 4, 512, 0, "v5p") > 0


@needs_libtpu
def test_step_is_sharded_over_the_topology(step):
    target, video, program, hlo, param_bytes = step
    assert program.devices == target.devices == 4
    assert all_gathers(hlo) > 0  # FSDP weights gathered per layer, K/V gathered for self-attention
    from flax import nnx

    from jax_impl.dit import WanTransformer

    model = nnx.eval_shape(lambda: WanTransformer(video.dit, dtype=jnp.bfloat16, rngs=nnx.Rngs(0)))
    total = sum(math.prod(a.shape) * jnp.dtype(a.dtype).itemsize for a in jax.tree.leaves(nnx.state(model)))
    assert param_bytes < 0.5 * total  # most parameters split 4 ways (small ones stay replicated)
    assert param_bytes <= program.argument_bytes < total


@needs_libtpu
def test_step_memory_numbers_are_positive_and_add_up(step):
    target, video, program, _, param_bytes = step
    for field in ("argument_bytes", "output_bytes", "temp_bytes", "code_bytes", "xla_flops", "xla_bytes_accessed"):
        assert getattr(program, field) > 0, field
    assert program.peak_bytes == (program.argument_bytes + program.output_bytes + program.temp_bytes
                                  - program.alias_bytes)
    assert program.fits(target) and 0 < program.roofline_s(target) < 1
    report = tc.Report(target, video, program, param_bytes, [], 0, False, None)
    (_, resident), (_, offloaded) = report.rows()
    assert resident.peak_bytes == offloaded.peak_bytes + param_bytes  # the idle expert stays on the device
    assert report.fits("resident") and report.fits("offloaded")


@needs_libtpu
@pytest.mark.slow
def test_checks_see_a_step_without_splash_or_sharding():
    """The two checks above are not vacuous: plain XLA attention on one device has no Splash call and no
    all-gather, and its device holds every parameter."""
    target, video = tc.parse_target("v5p-8"), tc.Video(TINY, *SIZE)
    program, compiled, param_bytes = tc.compile_denoise_step(target, video, attention="xla", devices=1)
    hlo = compiled.as_text()
    assert not tc.splash_kernels(hlo) and all_gathers(hlo) == 0
    assert program.devices == 1 and program.argument_bytes >= param_bytes


@needs_libtpu
def test_loop_trip_count_scales_xla_cost():
    """XLA's cost analysis counts a while-loop body once; `Program.flops` multiplies by the trip count."""
    mesh = tc.mesh_for(tc.parse_target("v5p-8"), 1)
    one = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    n, trips = 512, 7

    def f(x, ws):
        return jax.lax.scan(lambda x, w: (jnp.tanh(x @ w), None), x, ws)[0]

    args = (jax.ShapeDtypeStruct((n, n), jnp.bfloat16, sharding=one),
            jax.ShapeDtypeStruct((trips, n, n), jnp.bfloat16, sharding=one))
    compiled = jax.jit(f).lower(*args).compile()
    program = tc.analyse("scan", compiled, 1, 0.0)
    assert program.loop_trips == trips
    assert program.flops == pytest.approx(trips * 2 * n**3, rel=0.05)

    # Two loops (as v6e compiles add): the main one is named by its expected trip count, else it is an error.
    def g(x, ws, vs):
        x = jax.lax.scan(lambda x, w: (jnp.tanh(x @ w), None), x, ws)[0]
        return jax.lax.scan(lambda x, v: (jnp.sin(x @ v), None), x, vs)[0]

    two = jax.jit(g).lower(*args, jax.ShapeDtypeStruct((3, n, n), jnp.bfloat16, sharding=one)).compile().as_text()
    assert sorted(tc.loop_trip_counts(two)) == [3, trips]
    assert tc.loop_trips(two, (5, trips)) == trips
    with pytest.raises(ValueError, match="none of the expected"):
        tc.loop_trips(two)
    program = tc.analyse("two scans", jax.jit(g).lower(*args, jax.ShapeDtypeStruct((3, n, n), jnp.bfloat16,
                                                                                   sharding=one)).compile(),
                         1, 0.0, expected_trips=(trips,))
    assert program.loop_trips == trips and "[3]" in program.note


@needs_libtpu
@pytest.mark.slow
def test_vae_decode_chunk_steps_compile():
    target, video = tc.parse_target("v5p-8"), tc.Video("tiny-wan2.1-t2v-1.3b", 32, 32, 5)
    programs, est, weights, tiled = tc.compile_vae_decode(target, video)
    assert [p.name for p in programs] == ["vae decode first chunk", "vae decode steady chunk"]
    for p in programs:
        assert p.devices == 1 and p.argument_bytes >= weights and p.output_bytes > 0 and p.temp_bytes > 0
        assert p.xla_flops > 0 and p.fits(target)
    assert not tiled and est.steps == 2
    # peak = weights + the largest step beyond its weights + the result buffer (81 frames of 32x32x3 fp32)
    largest = max(p.peak_bytes for p in programs)
    assert est.peak_bytes + weights == largest + est.result_bytes
    assert est.result_bytes == 1 * 5 * 32 * 32 * 3 * 4


@needs_libtpu
def test_compile_command_prints_the_table_and_writes_json(tmp_path, capsys):
    from wanport.cli import main

    out = tmp_path / "report.json"
    rc = main(["compile", "--target", "v5p-8", "--preset", TINY, "--size", "128x128", "--frames", "9",
               "--no-vae", "--json", str(out)])
    assert rc == 0
    text = capsys.readouterr().out
    assert "v5p:2x2x1" in text and "both experts resident" in text and "ESTIMATE" in text
    report = json.loads(out.read_text())
    assert report["target"] == "v5p-8" and report["devices"] == 4 and report["tokens"] == 192
    assert report["splash_blocks"] == {"block_q": 512, "block_kv": 1024, "block_kv_compute": 512}
    assert [p["name"] for p in report["programs"]] == ["denoise step, both experts resident",
                                                       "denoise step, experts offloaded"]
    assert all(p["fits"] and p["peak_bytes"] > 0 for p in report["programs"])


def test_compile_command_refuses_bad_input_before_compiling(capsys):
    from wanport.cli import main

    assert main(["compile", "--target", "v5p-6", "--preset", TINY]) == 2
    assert "v5p-8" in capsys.readouterr().err
    assert main(["compile", "--target", "v5p-8", "--preset", TINY, "--size", "128x128", "--frames", "8"]) == 2
    assert "4k+1" in capsys.readouterr().err
    if NO_LIBTPU is None:  # without libtpu that is the error named first
        assert main(["compile", "--target", "v5p-8", "--preset", TINY, "--size", "128x128", "--frames", "9",
                     "--json", "/nonexistent-dir/r.json"]) == 2
        assert "does not exist" in capsys.readouterr().err


def test_compile_command_without_libtpu_names_the_fix(monkeypatch, capsys):
    from wanport.cli import main

    monkeypatch.setattr(tc, "libtpu_available", lambda: "libtpu is not installed: pip install -e '.[tpu]'")
    assert main(["compile", "--target", "v5p-8", "--preset", TINY, "--size", "128x128", "--frames", "9"]) == 2
    assert ".[tpu]" in capsys.readouterr().err


def test_roofline_takes_the_slower_of_compute_and_memory():
    t = tc.parse_target("v5e-8")
    p = tc.Program("x", 8, 1, 1, 1, 0, 1, xla_flops=197e12, xla_bytes_accessed=0.0, loop_trips=2,
                   attention_flops=197e12, compile_s=0.0)
    assert p.roofline_s(t) == pytest.approx(3.0)  # 2 x 197 TFLOP counted in the loop + 197 in Splash
    p.xla_bytes_accessed = 819e9 * 5
    assert p.roofline_s(t) == pytest.approx(10.0)
    assert np.isclose(t.hbm_per_device, 16 * 2**30)


def test_smallest_fitting_counts_a_compile_refused_for_memory_as_not_fitting():
    """XLA refuses at compile time a program that exceeds the HBM (RESOURCE_EXHAUSTED): the search records it
    and goes on to the next slice; any other error still stops it."""
    def fake(name, *a):
        if name == "v5p-8":
            raise RuntimeError("RESOURCE_EXHAUSTED: Ran out of memory on HBM")
        target = tc.parse_target(name)
        program = tc.Program("step", target.devices, 1, 1, 1, 0, 1, 1.0, 1.0, 1, 0.0, 0.0)
        return tc.Report(target, tc.Video(TINY, *SIZE), program, 1, [], 0, False, None, vae_compiled=False)

    found, tried = tc.smallest_fitting("v5p", TINY, *SIZE, compile=fake)
    assert tried[0]["target"] == "v5p-8" and "RESOURCE_EXHAUSTED" in tried[0]["compile_error"]
    assert found["resident"].target.name == found["offloaded"].target.name == "v5p-16"

    def broken(name, *a):
        raise RuntimeError("INTERNAL: something else")

    with pytest.raises(RuntimeError, match="INTERNAL"):
        tc.smallest_fitting("v5p", TINY, *SIZE, compile=broken)
