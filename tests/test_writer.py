"""ShardWriter: files grow as their bytes are written (no size set up front), in any order and
in pieces, and end at the planned size, loadable by safetensors."""

from __future__ import annotations

import numpy as np
import torch
from safetensors.torch import load_file

from moxkit.engine.writer import WRITE_BLOCK, OutputTensor, ShardWriter, layout


def test_out_of_order_pieces_make_the_planned_file(tmp_path):
    values = {
        "a": np.arange(3 * WRITE_BLOCK // 4 + 5, dtype=np.float32),  # several write blocks
        "b": np.arange(7, dtype=np.float16),
        "z": np.zeros(0, dtype=np.float16),  # empty, last in the file
    }
    codes = {np.float32: "F32", np.float16: "F16"}
    tensors = [OutputTensor(k, codes[v.dtype.type], v.shape, v.nbytes) for k, v in values.items()]
    (shard,) = layout([tensors], {"format": "pt"})
    path = tmp_path / "model.safetensors"
    writer = ShardWriter([shard], [path])
    try:
        writer.write("b", 0, memoryview(values["b"]).cast("B"))  # the end of the file first
        raw = memoryview(values["a"]).cast("B")
        half = len(raw) // 2
        writer.write("a", half, raw[half:])
        writer.write("a", 0, raw[:half])
    finally:
        writer.close()
    assert path.stat().st_size == shard.file_size
    loaded = load_file(path)
    for name, want in values.items():
        assert torch.equal(loaded[name], torch.from_numpy(want))
