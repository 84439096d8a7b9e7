"""The safetensors reader/writer against the format's specification, byte by byte."""

import json
import struct

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import minillm as mm
from minillm.weights.safetensors import (
    SafetensorsError, bfloat16_to_float32, load_file, load_metadata, read_header, save_file,
)


def write_raw(path, header: dict, data: bytes, pad: int = 0, header_len=None):
    """A safetensors file built by hand: <u64 N> <N bytes of JSON (+ pad spaces)> <data>."""
    text = json.dumps(header).encode() + b" " * pad
    path.write_bytes(struct.pack("<Q", len(text) if header_len is None else header_len) + text + data)
    return path


def test_reads_a_hand_written_file(tmp_path):
    f32 = np.array([[1.5, -2.0, 3.25], [0.0, 1e-3, -7.0]], dtype="<f4")
    i64 = np.array([-3, 2**40], dtype="<i8")
    f16 = np.array([0.5, -65504.0], dtype="<f2")
    bf16_values = np.array([1.0, -2.5, 3.140625, -1e20], dtype=np.float32)
    bf16_bits = (bf16_values.view(np.uint32) >> 16).astype("<u2")        # exact for these values? checked below
    data = i64.tobytes() + f32.tobytes() + f16.tobytes() + bf16_bits.tobytes()
    o1, o2, o3 = 16, 16 + 24, 16 + 24 + 4
    header = {
        "__metadata__": {"format": "pt", "note": "hand made"},
        "weights": {"dtype": "F32", "shape": [2, 3], "data_offsets": [o1, o2]},
        "ids": {"dtype": "I64", "shape": [2], "data_offsets": [0, o1]},
        "half": {"dtype": "F16", "shape": [2], "data_offsets": [o2, o3]},
        "brain": {"dtype": "BF16", "shape": [2, 2], "data_offsets": [o3, o3 + 8]},
    }
    path = write_raw(tmp_path / "hand.safetensors", header, data, pad=5)
    tensors = load_file(path)
    assert set(tensors) == {"weights", "ids", "half", "brain"}
    np.testing.assert_array_equal(tensors["weights"], f32)
    assert tensors["weights"].dtype == np.float32 and tensors["weights"].flags.writeable
    np.testing.assert_array_equal(tensors["ids"], i64)
    np.testing.assert_array_equal(tensors["half"], f16)
    assert tensors["brain"].dtype == np.float32 and tensors["brain"].shape == (2, 2)
    # bf16 keeps the top 16 bits: the first three values are exact, -1e20 is truncated
    expected = (bf16_bits.astype(np.uint32) << 16).view(np.float32).reshape(2, 2)
    np.testing.assert_array_equal(tensors["brain"], expected)
    assert tensors["brain"].ravel()[:3].tolist() == [1.0, -2.5, 3.140625]
    assert load_metadata(path) == {"format": "pt", "note": "hand made"}
    assert list(load_file(path, names=["ids"])) == ["ids"]
    with pytest.raises(KeyError, match="nope"):
        load_file(path, names=["nope"])


def test_bfloat16_conversion():
    bits = np.array([0x0000, 0x3F80, 0xBF80, 0x4049, 0x7F80], dtype=np.uint16)
    assert bfloat16_to_float32(bits).tolist() == [0.0, 1.0, -1.0, 3.140625, np.inf]


def test_writer_layout_is_byte_exact(tmp_path):
    """Sorted by item size then name, header padded with spaces to 8 bytes, data little-endian."""
    a = np.array([0.5], dtype=np.float64)
    b = np.array([1, 2], dtype=np.int32)
    c = np.array([3.0], dtype=np.float32)
    save_file({"c": c, "b": b, "a": a}, tmp_path / "x.safetensors", metadata={"format": "pt"})
    header = {"__metadata__": {"format": "pt"},
              "a": {"dtype": "F64", "shape": [1], "data_offsets": [0, 8]},
              "b": {"dtype": "I32", "shape": [2], "data_offsets": [8, 16]},
              "c": {"dtype": "F32", "shape": [1], "data_offsets": [16, 20]}}
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    expected = (struct.pack("<Q", len(text)) + text + struct.pack("<d", 0.5) + struct.pack("<ii", 1, 2)
                + struct.pack("<f", 3.0))
    assert (tmp_path / "x.safetensors").read_bytes() == expected
    assert len(text) % 8 == 0


_DTYPES = [np.float32, np.float64, np.float16, np.int64, np.int32, np.int8, np.uint8, np.bool_]


@settings(max_examples=30, deadline=None)
@given(st.dictionaries(
    st.text(st.characters(codec="utf-8", exclude_categories=["Cs"]), min_size=1, max_size=12)
    .filter(lambda s: s != "__metadata__"),
    st.tuples(st.sampled_from(_DTYPES), st.lists(st.integers(0, 4), max_size=3)),
    max_size=6))
def test_round_trip(tmp_path_factory, spec):
    rng = np.random.default_rng(0)
    tensors = {name: (rng.standard_normal(shape) * 100).astype(dtype) for name, (dtype, shape) in spec.items()}
    path = tmp_path_factory.mktemp("st") / "rt.safetensors"
    save_file(tensors, path, metadata={"k": "v"})
    back = load_file(path)
    assert set(back) == set(tensors)
    for name, array in tensors.items():
        assert back[name].dtype == array.dtype and back[name].shape == array.shape
        np.testing.assert_array_equal(back[name], array)
    assert (read_header(path)[2] - 8) % 8 == 0          # the header is padded to 8 bytes


def test_writer_accepts_views_and_tensors(tmp_path):
    base = np.arange(12, dtype=np.float32).reshape(3, 4)
    tensors = {"t": base.T, "tensor": mm.Tensor(base), "scalar": np.float32(2.5) * np.ones(())}
    save_file(tensors, tmp_path / "v.safetensors")
    back = load_file(tmp_path / "v.safetensors")
    np.testing.assert_array_equal(back["t"], base.T)
    np.testing.assert_array_equal(back["tensor"], base)
    assert back["scalar"].shape == () and back["scalar"] == 2.5
    assert not (tmp_path / "v.safetensors.partial").exists()


def test_writer_rejects_bad_input(tmp_path):
    with pytest.raises(TypeError, match="complex"):
        save_file({"z": np.zeros(2, dtype=np.complex64)}, tmp_path / "z.safetensors")
    with pytest.raises(ValueError, match="__metadata__"):
        save_file({"__metadata__": np.zeros(2)}, tmp_path / "m.safetensors")
    with pytest.raises(TypeError, match="metadata"):
        save_file({"a": np.zeros(2)}, tmp_path / "m.safetensors", metadata={"n": 1})


def _entry(dtype="F32", shape=(2,), offsets=(0, 8)):
    return {"dtype": dtype, "shape": list(shape), "data_offsets": list(offsets)}


@pytest.mark.parametrize("header, data, message", [
    ({"a": _entry()}, b"\0" * 4, "truncated"),
    ({"a": _entry()}, b"\0" * 12, "trailing bytes"),
    ({"a": _entry(offsets=(0, 4))}, b"\0" * 4, "needs 8 bytes"),
    ({"a": _entry(dtype="F8_E4M3")}, b"\0" * 8, "unsupported dtype"),
    ({"a": _entry(shape=(-2,))}, b"\0" * 8, "bad shape"),
    ({"a": _entry(offsets=(8, 0))}, b"\0" * 8, "bad data_offsets"),
    ({"a": {"dtype": "F32", "shape": [2]}}, b"\0" * 8, "needs dtype, shape and data_offsets"),
    ({"a": _entry(), "b": _entry(offsets=(4, 12))}, b"\0" * 12, "overlaps"),
    ({"a": _entry(offsets=(4, 12))}, b"\0" * 12, "gap of 4 bytes"),
    ({"__metadata__": {"a": 1}}, b"", "__metadata__ must map strings"),
    ([1, 2], b"", "must be a JSON object"),
])
def test_corrupt_files_raise_clear_errors(tmp_path, header, data, message):
    path = write_raw(tmp_path / "bad.safetensors", header, data)
    with pytest.raises(SafetensorsError, match=message):
        load_file(path)


def test_corrupt_prefix_and_json(tmp_path):
    short = tmp_path / "short.safetensors"
    short.write_bytes(b"\x01\x02")
    with pytest.raises(SafetensorsError, match="too short"):
        load_file(short)
    past_end = write_raw(tmp_path / "long.safetensors", {}, b"", header_len=1000)
    with pytest.raises(SafetensorsError, match="runs past the end"):
        load_file(past_end)
    huge = tmp_path / "huge.safetensors"
    huge.write_bytes(struct.pack("<Q", 2**40) + b"{}")
    with pytest.raises(SafetensorsError, match="limit"):
        load_file(huge)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(struct.pack("<Q", 4) + b"{no}")
    with pytest.raises(SafetensorsError, match="not valid UTF-8 JSON"):
        load_file(garbage)
    assert issubclass(SafetensorsError, ValueError)     # the CLI reports it as one line
