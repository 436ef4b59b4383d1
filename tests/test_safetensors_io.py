"""The safetensors reader refuses every malformed file with a CheckpointError naming file and tensor."""

from __future__ import annotations

import json
import struct

import ml_dtypes
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from weights.safetensors_io import (
    CheckpointError,
    CheckpointReader,
    SafetensorsFile,
    load_tensors,
    read_header,
    save_tensors,
)


def _tensors() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        "a.weight": rng.standard_normal((4, 3)).astype(np.float32),
        "b.bias": rng.standard_normal((5,)).astype(ml_dtypes.bfloat16),
        "c.empty": np.zeros((0, 3), np.float16),
        "d.ints": np.arange(6, dtype=np.int64).reshape(2, 3),
    }


def _raw_file(header: dict | bytes, data: bytes, length: int | None = None) -> bytes:
    blob = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(blob) if length is None else length) + blob + data


def test_roundtrip_bit_exact(tmp_path):
    t = _tensors()
    save_tensors(tmp_path / "x.safetensors", t, {"k": "v"})
    back, meta = load_tensors(tmp_path / "x.safetensors")
    assert meta == {"k": "v"}
    assert list(back) == list(t)
    for k in t:
        assert back[k].dtype == t[k].dtype and back[k].shape == t[k].shape
        assert back[k].tobytes() == t[k].tobytes()


def test_readable_by_the_reference_library(tmp_path):
    from safetensors.numpy import load_file

    t = {k: v for k, v in _tensors().items() if v.dtype != ml_dtypes.bfloat16}
    save_tensors(tmp_path / "x.safetensors", t)
    ref = load_file(str(tmp_path / "x.safetensors"))
    for k in t:
        np.testing.assert_array_equal(ref[k], t[k])


def test_view_is_not_a_copy_and_released(tmp_path):
    save_tensors(tmp_path / "x.safetensors", _tensors())
    f = SafetensorsFile(tmp_path / "x.safetensors")
    view = f.get("a.weight", copy=False)
    assert isinstance(view, np.memmap) and not view.flags.writeable
    np.testing.assert_array_equal(view, _tensors()["a.weight"])


@pytest.mark.parametrize(
    "header,data,length,needle",
    [
        ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 8, 10**9, "header length"),
        ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 8, 0, "header length"),
        (b"{not json", b"", None, "not valid JSON"),
        (b"[1, 2]", b"", None, "not a JSON object"),
        (b'{"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, "a": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}', b"\0" * 8, None, "duplicate"),
        ({"a": {"dtype": "Q7", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 8, None, "unknown dtype 'Q7'"),
        ({"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, b"\0" * 8, None, "needs 12 bytes"),
        ({"a": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}}, b"\0" * 8, None, "invalid shape"),
        ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [8, 0]}}, b"\0" * 8, None, "invalid data_offsets"),
        ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 4, None, "data section has 4"),
        ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, b"\0" * 12, None, "leaves a gap"),
        (
            {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}, "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}},
            b"\0" * 12,
            None,
            "overlaps",
        ),
        ({"a": {"dtype": "F32", "shape": [2]}}, b"\0" * 8, None, "malformed"),
        ({"__metadata__": {"x": 1}}, b"", None, "__metadata__"),
    ],
)
def test_bad_headers_are_named(tmp_path, header, data, length, needle):
    p = tmp_path / "bad.safetensors"
    p.write_bytes(_raw_file(header, data, length))
    with pytest.raises(CheckpointError) as e:
        read_header(p)
    assert needle in str(e.value)
    assert str(p) in str(e.value)


def test_short_file(tmp_path):
    p = tmp_path / "short.safetensors"
    p.write_bytes(b"\1\2\3")
    with pytest.raises(CheckpointError, match="too short"):
        SafetensorsFile(p)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_fuzz_corrupt_files_only_raise_checkpoint_error(tmp_path, data):
    """Random flips and truncations: either a clean CheckpointError or a file that still reads."""
    p = tmp_path / "x.safetensors"
    save_tensors(p, _tensors())
    raw = bytearray(p.read_bytes())
    kind = data.draw(st.sampled_from(["flip", "truncate", "append", "length"]))
    if kind == "flip":
        for _ in range(data.draw(st.integers(1, 4))):
            i = data.draw(st.integers(0, len(raw) - 1))
            raw[i] ^= data.draw(st.integers(1, 255))
    elif kind == "truncate":
        raw = raw[: data.draw(st.integers(0, len(raw) - 1))]
    elif kind == "append":
        raw += bytes(data.draw(st.integers(1, 64)))
    else:
        raw[:8] = struct.pack("<Q", data.draw(st.integers(0, 2**64 - 1)))
    if bytes(raw) == p.read_bytes():
        return  # e.g. the drawn header length happened to be the true one
    q = tmp_path / "y.safetensors"
    q.write_bytes(bytes(raw))
    try:
        f = SafetensorsFile(q)
        for k in f.keys():
            f.get(k)
    except CheckpointError as e:
        assert str(q) in str(e)
    else:
        assert kind == "flip"  # truncation, padding and a bad length must never read successfully


def _sharded(tmp_path):
    t = _tensors()
    save_tensors(tmp_path / "m-1.safetensors", {k: t[k] for k in ("a.weight", "b.bias")})
    save_tensors(tmp_path / "m-2.safetensors", {k: t[k] for k in ("c.empty", "d.ints")})
    wm = {"a.weight": "m-1.safetensors", "b.bias": "m-1.safetensors", "c.empty": "m-2.safetensors", "d.ints": "m-2.safetensors"}
    return wm


def test_sharded_reader(tmp_path):
    wm = _sharded(tmp_path)
    (tmp_path / "m.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": wm}))
    r = CheckpointReader(tmp_path)
    assert sorted(r.keys()) == sorted(wm)
    np.testing.assert_array_equal(r.get("d.ints"), _tensors()["d.ints"])


@pytest.mark.parametrize(
    "index,needle",
    [
        ("{bad", "not a valid shard index"),
        ('{"weight_map": [1]}', "weight_map must map"),
        ('{"weight_map": {"a.weight": "../m-1.safetensors"}}', "not a .safetensors file in this folder"),
        ('{"weight_map": {"a.weight": "gone.safetensors"}}', "missing"),
        ('{"weight_map": {"zzz": "m-1.safetensors"}}', "no such tensor"),
        ('{"weight_map": {"a.weight": "m-1.safetensors"}}', "does not list"),
    ],
)
def test_bad_index(tmp_path, index, needle):
    _sharded(tmp_path)
    (tmp_path / "m.safetensors.index.json").write_text(index)
    with pytest.raises(CheckpointError, match=needle.replace(".", r"\.").replace("[", r"\[")):
        CheckpointReader(tmp_path)
