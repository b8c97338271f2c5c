"""Test helper: a float GGUF written from a quantized one, so llama.cpp's requantization can be exercised on a
real model without downloading an F16 file. (Requantizing it is not better than the original quantization: it
carries the original's error; tests check the path, not the quality.)"""

from __future__ import annotations

from pathlib import Path

import numpy as np


def dequantized_copy(src: Path, dst: Path) -> Path:
    """Write `src` with every quantized tensor as F16 (1-D tensors stay F32), all metadata kept."""
    import gguf

    reader = gguf.GGUFReader(str(src))
    arch = reader.fields["general.architecture"].contents()
    writer = gguf.GGUFWriter(str(dst), arch)
    for field in reader.fields.values():
        if field.name == gguf.Keys.General.ARCHITECTURE or field.name.startswith("GGUF."):
            continue
        value_type = field.types[0]
        sub_type = field.types[-1] if value_type == gguf.GGUFValueType.ARRAY else None
        value = field.contents()
        if field.name == "general.file_type":
            value = int(gguf.LlamaFileType.MOSTLY_F16)
        writer.add_key_value(field.name, value, value_type, sub_type=sub_type)
    for tensor in reader.tensors:
        data = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
        shape = [int(d) for d in reversed(tensor.shape)]  # GGUF lists dimensions innermost first
        data = np.asarray(data, dtype=np.float32).reshape(shape)
        if len(shape) >= 2:
            data = data.astype(np.float16)
        writer.add_tensor(tensor.name, data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return dst
