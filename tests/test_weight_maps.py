"""The full-size weight maps against the models they describe, for every full-size preset.

The converter's round trips prove a map invertible, not right: a name mapped wrongly both ways
round-trips bit-exact. Here each layout's names and shapes are compared with an independent source:
diffusers' own model built on the meta device (no memory), the original Wan repositories' layout
(`tests/wan_original_layout.py`, written from their model definitions) and our Flax model's abstract
parameters. The VAE map is checked against diffusers' AutoencoderKLWan in tests/test_vae_errors.py.
"""

import pytest
import torch
from diffusers import WanTransformer3DModel
from flax import nnx

from jax_impl.dit import WanTransformer
from weights.configs.presets import PRESETS, get_preset
from tests.wan_original_layout import PUBLISHED, wan_state_dict_shapes
from torch_ref.models import diffusers_kwargs
from weights.dit_map import dit_entries

FULL = [name for name in PRESETS if not name.startswith("tiny-")]


def _diff(ours: dict, ref: dict) -> str:
    missing = sorted(set(ref) - set(ours))[:5]
    extra = sorted(set(ours) - set(ref))[:5]
    shapes = [f"{k}: ours {ours[k]}, reference {ref[k]}" for k in ours if k in ref and ours[k] != ref[k]][:5]
    return f"map lacks {missing}; map has extra {extra}; shapes differ {shapes}"


def test_every_full_preset_has_a_published_layout():
    assert sorted(PUBLISHED) == sorted(FULL)


@pytest.mark.parametrize("name", FULL)
def test_diffusers_names_and_shapes_equal_diffusers_meta_model(name):
    cfg = get_preset(name).transformer
    with torch.device("meta"):
        model = WanTransformer3DModel(**diffusers_kwargs(cfg))
    ref = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    ours = {e.diffusers: e.shape for e in dit_entries(cfg)}
    assert ours == ref, _diff(ours, ref)


@pytest.mark.parametrize("name", FULL)
def test_wan_names_and_shapes_equal_original_wan_layout(name):
    ref = wan_state_dict_shapes(PUBLISHED[name])
    ours = {e.wan: e.shape for e in dit_entries(get_preset(name).transformer)}
    assert ours == ref, _diff(ours, ref)


@pytest.mark.parametrize("name", FULL)
def test_flax_names_and_shapes_equal_our_model(name):
    cfg = get_preset(name).transformer
    abstract = nnx.eval_shape(lambda: WanTransformer(cfg, rngs=nnx.Rngs(0)))
    ref = {}
    for path, var in nnx.to_flat_state(nnx.state(abstract, nnx.Param)):
        shape = tuple(var.get_value().shape)
        if path[0] == "blocks":  # stacked over layers; the checkpoint stores one tensor per layer
            rest = ".".join(map(str, path[1:]))
            ref.update({f"blocks.{i}.{rest}": shape[1:] for i in range(cfg.num_layers)})
        else:
            ref[".".join(map(str, path))] = shape
    ours = {e.flax: e.flax_shape() for e in dit_entries(cfg)}
    assert ours == ref, _diff(ours, ref)


@pytest.mark.parametrize("name", FULL)
def test_wan_names_translate_like_diffusers_single_file_loader(name):
    """Names matched one to one, not only as sets: diffusers' own original-Wan -> diffusers key renamer
    (the `from_single_file` path) must send each entry's wan name to that entry's diffusers name, so a
    swap between two same-shaped tensors (norm_q/norm_k, norm2/norm3) is caught too. The renamer only
    rewrites keys, so the diffusers names ride along as values: no tensors are needed."""
    from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers

    entries = dit_entries(get_preset(name).transformer)
    renamed = convert_wan_transformer_to_diffusers({e.wan: e.diffusers for e in entries})
    assert len(renamed) == len(entries)
    wrong = {got: want for got, want in renamed.items() if got != want}
    assert not wrong, f"{len(wrong)} names differ (diffusers' renamer -> our map): {list(wrong.items())[:5]}"
