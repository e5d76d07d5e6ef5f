#!/usr/bin/env python3
"""Rewrite a GGUF file with some tensor types dequantized to F32.

A development tool: it lets the runtime be tested on a model whose quantization
types it does not read yet, with the same weights to the last bit (dequantized
values are exact in F32). Metadata is copied unchanged; tensors whose type is in
--keep stay as they are (bytes copied), every other quantized tensor becomes F32.

    pip install gguf numpy
    scripts/dequantize-gguf.py models/gemma-3-270m-q4_k_m.gguf /tmp/gemma3-270m-f32.gguf

By default F32, F16, BF16, Q4_0, Q4_1 and Q8_0 are kept (the types sampo reads).
"""

import argparse
import sys

import numpy as np

try:
    import gguf
except ImportError:
    sys.exit("this script needs the gguf package: pip install gguf numpy")

DEFAULT_KEEP = "F32,F16,BF16,Q4_0,Q4_1,Q8_0"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("src")
    ap.add_argument("dst")
    ap.add_argument("--keep", default=DEFAULT_KEEP, help=f"types copied as they are (default {DEFAULT_KEEP})")
    args = ap.parse_args()
    keep = {gguf.GGMLQuantizationType[t.strip().upper()] for t in args.keep.split(",") if t.strip()}

    r = gguf.GGUFReader(args.src)
    arch = r.fields["general.architecture"].contents()
    w = gguf.GGUFWriter(args.dst, arch)
    for key, field in r.fields.items():
        # The writer emits these itself.
        if key.startswith("GGUF.") or key == "general.architecture":
            continue
        vtype = field.types[0]
        if vtype == gguf.GGUFValueType.ARRAY:
            w.add_key_value(key, field.contents(), vtype, sub_type=field.types[-1])
        else:
            w.add_key_value(key, field.contents(), vtype)

    converted = 0
    for t in r.tensors:
        # GGUF lists dims innermost first; numpy shapes are outermost first.
        shape = [int(d) for d in reversed(t.shape)]
        if t.tensor_type in keep:
            # Quantized data comes as rows of bytes; the writer derives the shape from them.
            w.add_tensor(t.name, t.data, raw_dtype=t.tensor_type)
        else:
            data = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32).reshape(shape)
            w.add_tensor(t.name, data)
            converted += 1
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    print(f"{args.dst}: {len(r.tensors)} tensors, {converted} dequantized to F32")


if __name__ == "__main__":
    main()
