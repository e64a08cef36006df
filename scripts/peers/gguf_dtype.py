"""Rewrite a GGUF file with every quantized tensor dequantized to F32 or BF16 (same
metadata, tokenizer and tensor names), for a like-for-like llama.cpp comparison with
jpaged's float32 and bfloat16 runs of the same weights.

    python scripts/peers/gguf_dtype.py OUT.gguf --type f32|bf16 [--gguf FILE]

Uses the `gguf` package (jpaged's own dependency). Tensors that are already float (norms)
are converted too; 1-D tensors stay F32, as llama.cpp's own converter keeps them.
"""
from __future__ import annotations

import argparse
import pathlib

import numpy as np


def rewrite(src: pathlib.Path, out: pathlib.Path, kind: str) -> pathlib.Path:
    import gguf
    from gguf import GGMLQuantizationType as Q

    reader = gguf.GGUFReader(str(src))
    arch = reader.fields["general.architecture"].contents()
    writer = gguf.GGUFWriter(str(out), arch)
    for name, field in reader.fields.items():
        if name.startswith("GGUF.") or name == "general.architecture":
            continue
        if name == "general.file_type":
            writer.add_uint32(name, {"f32": 0, "bf16": 32}[kind])  # LLAMA_FTYPE_ALL_F32 / MOSTLY_BF16
            continue
        value, vtype = field.contents(), field.types[0]
        sub = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(name, value, vtype, sub_type=sub)
    target = Q.BF16 if kind == "bf16" else Q.F32
    for t in reader.tensors:
        data = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)
        data = data.reshape([int(x) for x in reversed(t.shape)])  # GGUF lists dims fastest-first
        qtype = target if data.ndim > 1 else Q.F32
        # BF16 goes in as its bytes (uint8), from which the writer derives the shape.
        stored = gguf.quants.quantize(data, qtype).view(np.uint8) if qtype != Q.F32 else data
        writer.add_tensor(t.name, stored, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out", type=pathlib.Path)
    p.add_argument("--type", choices=["f32", "bf16"], required=True)
    p.add_argument("--gguf", type=pathlib.Path, default=None, help="default: jpaged's default model")
    args = p.parse_args(argv)
    if args.gguf is None:
        from jpaged.models.loader import default_model_path
        args.gguf = default_model_path()
    print(rewrite(args.gguf, args.out, args.type))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
