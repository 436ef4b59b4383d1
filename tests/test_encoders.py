"""The Flax UMT5 and CLIP encoders against transformers: configs, buckets, layer-by-layer parity, loading,
tokenization and CLIP preprocessing, the pipeline-level encoders, and the JAX path running without torch."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from weights.configs.base import ConfigError
from weights.configs.encoders import ClipProcessorConfig, ClipVisionConfig, Umt5Config
from parity.encoders import model_parity, pipeline_parity, write_encoder
from weights.safetensors_io import CheckpointError, load_tensors, save_tensors

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = [
    "A cat walks on the beach &amp;amp; the   sunset",  # double-escaped HTML and runs of spaces: cleaned
    "low quality, blurry " * 200,  # > 512 tokens: truncated, eos kept
    "",  # eos only
]


def _images() -> list[Image.Image]:
    rng = np.random.default_rng(3)
    return [Image.fromarray(rng.integers(0, 256, (48, 80, 3), dtype=np.uint8)),
            Image.fromarray(rng.integers(0, 256, (90, 41, 4), dtype=np.uint8), "RGBA")]


def _images_if_comparable() -> list[Image.Image] | None:
    """The probe images, or None where torch_ref's CLIPImageProcessor is transformers 5's torchvision backend:
    that resizes with torch's bicubic, not PIL's (our preprocessing is the PIL path, see jax_impl.encoders.image)."""
    import importlib.util

    return None if importlib.util.find_spec("torchvision") else _images()


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """Perturbed tiny encoders (sharded and not) and a pipeline-shaped folder holding them."""
    from torch_ref.encoders import write_tiny_encoders

    root = tmp_path_factory.mktemp("enc")
    pipe = root / "pipe"
    pipe.mkdir()
    write_tiny_encoders(pipe, text_dim=32, image_dim=24)  # tokenizer and image processor as the pipelines have them
    for sub, model in (("text_encoder", "text-encoder"), ("image_encoder", "image-encoder")):
        shutil.rmtree(pipe / sub)
        write_encoder(model, "tiny", pipe / sub, seed=5)  # the same configs, every parameter perturbed
    return {
        "pipe": pipe,
        "odd_text": write_encoder("text-encoder", "odd", root / "odd_text", seed=1),
        "odd_image": write_encoder("image-encoder", "odd", root / "odd_image", seed=2),
        "sharded_text": write_encoder("text-encoder", "odd", root / "sharded_text", seed=1, max_shard_size="20KB"),
    }


# --- configs and buckets -----------------------------------------------------------------------------------
@pytest.mark.parametrize("buckets,distance", [(32, 128), (8, 32), (10, 20), (6, 7), (64, 256)])
def test_relative_position_buckets_equal_transformers(buckets, distance):
    import torch
    from transformers import UMT5Config
    from transformers.models.umt5.modeling_umt5 import UMT5Attention

    from jax_impl.encoders.umt5 import relative_position_buckets

    cfg = UMT5Config(relative_attention_num_buckets=buckets, relative_attention_max_distance=distance, d_model=8,
                     d_kv=2, num_heads=4)
    n = 700  # past max_distance on both sides, and the exact log-ratio positions (16, 32, 64 for 32/128)
    rel = torch.arange(n)[None, :] - torch.arange(n)[:, None]
    ref = UMT5Attention(cfg, has_relative_attention_bias=True)._relative_position_bucket(rel).numpy()
    ours = relative_position_buckets(n, n, buckets, distance)
    np.testing.assert_array_equal(ours, ref)
    # every bucket but buckets/2 (distance 0 after the query, which counts as 'before') is used
    assert set(np.unique(ours)) == set(range(buckets)) - {buckets // 2}


@pytest.mark.parametrize("raw", [
    {"feed_forward_proj": "gated-gelu"},
    {"feed_forward_proj": "gated-gelu", "dense_act_fn": "gelu"},  # an explicit dense_act_fn wins, as in transformers
    {"feed_forward_proj": "gated-silu"},
    {"feed_forward_proj": "gated-gelu", "d_model": 36, "num_heads": 3, "d_kv": 12, "layer_norm_epsilon": 1e-5},
])
def test_umt5_config_reads_like_transformers(raw):
    from transformers import UMT5Config

    ref = UMT5Config(**raw)
    ours = Umt5Config.from_dict(dict(raw, model_type="umt5", extra_key_transformers_writes=1))
    assert ours.dense_act_fn == ref.dense_act_fn
    assert (ours.d_model, ours.num_heads, ours.d_kv, ours.layer_norm_epsilon) == (
        ref.d_model, ref.num_heads, ref.d_kv, ref.layer_norm_epsilon)


@pytest.mark.parametrize("raw,message", [
    ({"model_type": "t5"}, "T5/mT5 share layer 0's bias"),
    ({"feed_forward_proj": "relu"}, "non-gated"),
    ({"dense_act_fn": "swishy"}, "not supported"),
    ({"is_decoder": True}, "encoder"),
    ({"d_model": "wide"}, "d_model='wide'"),
])
def test_umt5_config_refuses_what_it_cannot_compute(raw, message):
    with pytest.raises(ConfigError, match=message):
        Umt5Config.from_dict(raw)


def test_config_defaults_are_transformers_defaults():
    """A config.json lacking a key must mean what it means to transformers."""
    from transformers import CLIPVisionConfig, UMT5Config

    for ours, ref in ((Umt5Config(), UMT5Config()), (ClipVisionConfig(), CLIPVisionConfig())):
        assert {k: getattr(ref, k) for k in ours.__dataclass_fields__} == ours.__dict__
    assert Umt5Config.umt5_xxl().param_count() == 5_680_910_336  # UMT5-XXL encoder with Wan's 256384 vocabulary


def test_clip_configs():
    nested = {"model_type": "clip", "vision_config": {"model_type": "clip_vision_model", "hidden_size": 30,
                                                      "num_attention_heads": 3, "hidden_act": "gelu"}}
    assert ClipVisionConfig.from_dict(nested).hidden_size == 30
    with pytest.raises(ConfigError, match="clip_vision_model"):
        ClipVisionConfig.from_dict({"model_type": "siglip_vision_model"})
    with pytest.raises(ConfigError, match="divisible"):
        ClipVisionConfig.from_dict({"hidden_size": 30, "num_attention_heads": 4})
    cfg = ClipProcessorConfig.from_dict({"size": 256, "crop_size": 224})  # legacy int sizes
    assert (cfg.shortest_edge, cfg.crop_hw) == (256, (224, 224))
    with pytest.raises(ConfigError, match="CLIPImageProcessor"):
        ClipProcessorConfig.from_dict({"image_processor_type": "SiglipImageProcessor"})


def test_activation_tables_agree():
    from weights.configs.encoders import ACTIVATIONS as NAMES
    from jax_impl.layers import ACTIVATIONS

    assert set(NAMES) == set(ACTIVATIONS)


# --- layer-by-layer parity against transformers -------------------------------------------------------------
@pytest.mark.parametrize("model,key,batch,text_len", [
    ("text-encoder", "pipe", 2, 7),  # short: exact buckets only
    ("text-encoder", "odd_text", 3, 80),  # d_model 36, 3 heads, 10 buckets; past max_distance; padded rows
    ("image-encoder", "pipe", 2, None),
    ("image-encoder", "odd_image", 1, None),  # 3 heads, gelu, 46 px with 14 px patches (4 px no patch covers)
])
def test_layer_parity_fp32(folders, model, key, batch, text_len):
    report = model_parity(model, folders[key], batch=batch, text_len=text_len, seed=4)
    assert report.passed, report.table()
    names = [layer.name for layer in report.layers]
    assert "layers.1.output" in names and names[-1] in ("output", "penultimate")
    assert report.worst_rel_l2 < 1e-5


@pytest.mark.slow
@pytest.mark.parametrize("model,key", [("text-encoder", "odd_text"), ("image-encoder", "odd_image")])
def test_layer_parity_bf16_within_transformers_own_error(folders, model, key):
    report = model_parity(model, folders[key], dtype="bfloat16", batch=2, text_len=40)
    assert report.passed, report.table()
    assert all(layer.ref_rel_l2 is not None for layer in report.layers)


def test_bf16_keeps_wo_float32(folders):
    import jax.numpy as jnp

    from jax_impl.loading import load_umt5

    model = load_umt5(folders["odd_text"], dtype=jnp.bfloat16)
    assert model.layers.wo.value.dtype == jnp.float32  # transformers' _keep_in_fp32_modules = ["wo"]
    assert model.layers.wi_0.value.dtype == jnp.bfloat16 and model.embed.value.dtype == jnp.bfloat16


# --- loading -------------------------------------------------------------------------------------------------
def _umt5_output(folder, ids, mask):
    from jax_impl.loading import load_umt5

    return np.asarray(load_umt5(folder)(ids, mask))


def test_sharded_folder_loads_like_one_file(folders):
    shards = sorted(p.name for p in folders["sharded_text"].glob("*.safetensors"))
    assert len(shards) > 1 and (folders["sharded_text"] / "model.safetensors.index.json").is_file()
    ids, mask = np.array([[5, 9, 1, 0]]), np.array([[1, 1, 1, 0]])
    np.testing.assert_array_equal(_umt5_output(folders["sharded_text"], ids, mask),
                                  _umt5_output(folders["odd_text"], ids, mask))


def _rewrite(src: Path, dst: Path, edit) -> Path:
    """Copy a one-file model folder, passing its tensors through `edit(dict) -> dict`."""
    shutil.copytree(src, dst)
    tensors, meta = load_tensors(dst / "model.safetensors")
    save_tensors(dst / "model.safetensors", edit(tensors), meta)
    return dst


def test_tied_embedding_names(folders, tmp_path):
    """`encoder.embed_tokens.weight` alone is the embedding; next to `shared.weight` it is ignored (tied)."""
    src = folders["odd_text"]
    ids, mask = np.array([[5, 9, 1]]), np.array([[1, 1, 1]])
    ref = _umt5_output(src, ids, mask)
    only_alias = _rewrite(src, tmp_path / "a", lambda t: {("encoder.embed_tokens.weight" if k == "shared.weight" else k): v
                                                          for k, v in t.items()})
    np.testing.assert_array_equal(_umt5_output(only_alias, ids, mask), ref)
    both = _rewrite(src, tmp_path / "b", lambda t: t | {"encoder.embed_tokens.weight": np.zeros_like(t["shared.weight"])})
    np.testing.assert_array_equal(_umt5_output(both, ids, mask), ref)


def test_transformers4_clip_names(folders, tmp_path):
    """transformers 4 files: `vision_model.` prefix and the position_ids buffer."""
    from jax_impl.loading import load_clip_vision

    src = folders["odd_image"]
    old = _rewrite(src, tmp_path / "old", lambda t: {f"vision_model.{k}": v for k, v in t.items()}
                   | {"vision_model.embeddings.position_ids": np.arange(10, dtype=np.int64)[None]})
    px = np.random.default_rng(0).standard_normal((1, 46, 46, 3), dtype=np.float32)
    np.testing.assert_array_equal(np.asarray(load_clip_vision(old).penultimate(px)),
                                  np.asarray(load_clip_vision(src).penultimate(px)))


def test_loading_errors_name_the_problem(folders, tmp_path):
    from jax_impl.loading import load_clip_vision, load_umt5

    src = folders["odd_text"]
    missing = _rewrite(src, tmp_path / "m", lambda t: {k: v for k, v in t.items() if "block.1.layer.0.SelfAttention.q" not in k})
    with pytest.raises(CheckpointError, match=r"missing 1 tensor\(s\): encoder\.block\.1\.layer\.0\.SelfAttention\.q\.weight"):
        load_umt5(missing)
    bad = _rewrite(src, tmp_path / "s", lambda t: t | {"encoder.final_layer_norm.weight": np.ones(7, np.float32)})
    with pytest.raises(CheckpointError, match=r"final_layer_norm\.weight: checkpoint \[7\], config expects \[36\]"):
        load_umt5(bad)
    t5 = tmp_path / "t5"
    shutil.copytree(src, t5)
    cfg = json.loads((t5 / "config.json").read_text())
    (t5 / "config.json").write_text(json.dumps(cfg | {"model_type": "t5"}))
    with pytest.raises(CheckpointError, match="T5/mT5"):
        load_umt5(t5)
    with pytest.raises(CheckpointError, match="did you mean .*image_encoder"):
        load_clip_vision(folders["pipe"])
    with pytest.raises(CheckpointError, match="model_type is 'umt5', expected 'clip_vision_model'"):
        load_clip_vision(folders["pipe"] / "text_encoder")


# --- tokenization and preprocessing ---------------------------------------------------------------------------
def test_tokenize_pads_truncates_and_keeps_eos(folders):
    from jax_impl.encoders.text import load_tokenizer
    from weights.configs.prompt import tokenize

    ids, mask = tokenize(load_tokenizer(folders["pipe"]), PROMPTS)
    assert ids.shape == mask.shape == (3, 512) and ids.dtype == np.int32
    assert mask[1].all() and ids[1, -1] == 1  # truncated to 512 with eos last
    n = int(mask[0].sum())
    assert ids[0, n - 1] == 1 and not ids[0, n:].any() and not mask[0, n:].any()  # eos, then pad id 0
    assert mask[2].sum() == 1 and ids[2, 0] == 1


@pytest.mark.parametrize("shortest,crop", [(32, 32), (24, 32), (40, 30), (224, 224)])
def test_preprocess_equals_clip_image_processor(shortest, crop):
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    from jax_impl.encoders.image import preprocess

    proc = CLIPImageProcessorPil(size={"shortest_edge": shortest}, crop_size={"height": crop, "width": crop})
    cfg = ClipProcessorConfig.from_dict(proc.to_dict())
    rng = np.random.default_rng(shortest)
    images = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in
              ((480, 832), (832, 480), (20, 31), (1000, 7), (224, 224))]
    images += [Image.fromarray(rng.integers(0, 256, (37, 53, 4), dtype=np.uint8), "RGBA"), images[0].convert("L"),
               images[1].convert("P")]
    ref = proc(images=images, return_tensors="np")["pixel_values"].transpose(0, 2, 3, 1)
    ours = preprocess(images, cfg)
    assert ours.shape == ref.shape == (len(images), crop, crop, 3) and ours.dtype == np.float32
    np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-6)


# --- pipeline level -------------------------------------------------------------------------------------------
def test_pipeline_encoders_equal_torch_ref(folders):
    images = _images_if_comparable()
    report = pipeline_parity(folders["pipe"], PROMPTS, images)
    assert report.passed and len(report.layers) == (2 if images else 1), report.table()


def test_pipeline_encoders_on_tiny_checkpoint(tiny_ckpt):
    report = pipeline_parity(tiny_ckpt("tiny-wan2.1-i2v-14b"), PROMPTS[:1], (_images_if_comparable() or [])[:1])
    assert report.passed, report.table()


_NO_TORCH = """
import sys
for name in ("torch", "torchvision", "torchaudio"):
    sys.modules[name] = None  # import torch now raises ImportError, as on an install without it
import numpy as np
from PIL import Image
from jax_impl.encoders.image import JaxImageEncoder
from jax_impl.encoders.text import JaxTextEncoder
folder, out = sys.argv[1], sys.argv[2]
prompts = {prompts!r}
image = Image.open(folder + "/probe.png")
np.save(out + "/text.npy", JaxTextEncoder(folder)(prompts))
np.save(out + "/image.npy", JaxImageEncoder(folder)([image]))
loaded = sorted(m for m, mod in sys.modules.items() if mod is not None and m.split(".")[0] in ("torch", "torchvision"))
assert not loaded, loaded
"""


@pytest.mark.slow
def test_jax_encoders_run_without_torch(folders, tmp_path):
    from torch_ref.encoders import ImageEncoder, TextEncoder

    image = _images()[0]
    image.save(folders["pipe"] / "probe.png")
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT))
    p = subprocess.run([sys.executable, "-c", _NO_TORCH.format(prompts=PROMPTS), str(folders["pipe"]), str(tmp_path)],
                       capture_output=True, text=True, timeout=300, cwd=ROOT, env=env)
    assert p.returncode == 0, p.stderr[-3000:]
    text, img = np.load(tmp_path / "text.npy"), np.load(tmp_path / "image.npy")
    ref_text = TextEncoder(folders["pipe"])(PROMPTS)
    assert np.linalg.norm(text - ref_text) <= 1e-5 * np.linalg.norm(ref_text)
    if _images_if_comparable():
        ref_img = ImageEncoder(folders["pipe"])([image])
        assert np.linalg.norm(img - ref_img) <= 1e-5 * np.linalg.norm(ref_img)


# --- command line and bench -----------------------------------------------------------------------------------
def test_parity_command_for_encoders(tmp_path, capsys):
    from wanport.cli import main

    rc = main(["parity", "--model", "text-encoder", "--preset", "odd", "--batch", "2", "--text-len", "30",
               "--json", str(tmp_path / "t.json")])
    assert rc == 0 and json.loads((tmp_path / "t.json").read_text())["passed"]
    assert "parity PASSED" in capsys.readouterr().out
    assert main(["parity", "--model", "image-encoder", "--preset", "huge"]) == 2


@pytest.mark.slow
def test_encoder_bench_tiny_writes_json(tmp_path):
    out = tmp_path / "enc.json"
    p = subprocess.run([sys.executable, str(ROOT / "bench" / "encoders.py"), "--tiny", "--json", str(out)],
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout + p.stderr
    rows = json.loads(out.read_text())["results"]
    assert {(r["model"], r["impl"]) for r in rows} == {(m, i) for m in ("umt5", "clip") for i in ("jax", "torch")}
    assert all(r["median_s"] > 0 for r in rows)
