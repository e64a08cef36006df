"""Write a Hugging Face model folder (config.json, safetensors, tokenizer) from a GGUF file,
for benchmark peers that load only HF folders (vLLM's CPU build).

    python scripts/peers/hf_folder.py OUT_DIR [--gguf FILE]   (default: jpaged's default model)

Runs in jpaged's environment with PyTorch (the `test` or `bench` extra). transformers
dequantizes the GGUF on load but cannot `save_pretrained` a GGUF-loaded model, so a plain
model is built from the same config without its `quantization_config` and the weights are
copied in. Weights are saved in float32; peers cast to the dtype they run.
"""
from __future__ import annotations

import argparse
import json
import pathlib


def write_hf_folder(gguf: pathlib.Path, out: pathlib.Path) -> pathlib.Path:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    loaded = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name,
                                                  dtype=torch.float32)
    config = AutoConfig.for_model(**{k: v for k, v in loaded.config.to_dict().items()
                                     if k != "quantization_config"})
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = plain.load_state_dict(loaded.state_dict(), strict=False)
    if unexpected or any("lm_head" not in k for k in missing):
        raise RuntimeError(f"weights do not match the config: missing {missing}, unexpected {unexpected}")
    plain.tie_weights()
    out.mkdir(parents=True, exist_ok=True)
    plain.save_pretrained(out)
    AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name).save_pretrained(out)
    (out / "jpaged_source.json").write_text(json.dumps({"gguf": str(gguf)}))
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out", type=pathlib.Path)
    p.add_argument("--gguf", type=pathlib.Path, default=None, help="default: jpaged's default model")
    args = p.parse_args(argv)
    if args.gguf is None:
        from jpaged.models.loader import default_model_path
        args.gguf = default_model_path()
    print(write_hf_folder(args.gguf, args.out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
