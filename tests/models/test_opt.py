"""Tests for models/opt.py (and OPT's part of models/config.py and models/loader.py): tiny
random OPT folders written by transformers load through `jpaged.LLM(folder)` and generate
transformers' greedy tokens, with its log-probabilities; a pre-norm model (unrolled layers,
packed weights and tied head) and a post-norm one with project_in/out (OPT-350M's shape,
under `scan_layers`); split over 2 CPU devices, too (attention heads split, the MLP kept
whole on each: `jpaged.runner.parallel` splits only the Llama MLP's `gate_up_proj`)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from jpaged import LLM, SamplingParams
from jpaged.models import ModelConfig, OPTForCausalLM, model_class
from jpaged.models import loader

from helpers import hf_greedy

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

VOCAB = 1024  # whole panels: the tied head packs (`jpaged.ops.matmul.packable`)
KINDS = {
    # kind: (OPTConfig fields, LLM arguments)
    "pre-norm": (dict(do_layer_norm_before=True, num_hidden_layers=3), dict(scan_layers=False)),
    "post-norm-proj": (dict(do_layer_norm_before=False, word_embed_proj_dim=32, num_hidden_layers=2),
                       dict(scan_layers=True)),
}
# Lengths 90 and 130 prefill in chunks of 64 tokens over several 16-token blocks; five
# prompts with four sequences at most: the last waits for a slot.
PROMPT_LENS = [3, 17, 40, 90, 130]
MAX_TOKENS = 16


def build_tiny_opt(path, **fields):
    """A random-weight OPT saved as an HF folder, with a word-level tokenizer that, like
    OPT's, starts every prompt with `</s>`. Every weight is random (norms and biases too)."""
    import tokenizers
    from tokenizers import models, pre_tokenizers, processors
    cfg = transformers.OPTConfig(vocab_size=VOCAB, hidden_size=64, ffn_dim=128, num_attention_heads=4,
                                 max_position_embeddings=256, pad_token_id=1, bos_token_id=2,
                                 eos_token_id=2, **fields)
    torch.manual_seed(0)
    model = transformers.OPTForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            is_scale = "layer_norm" in name and name.endswith("weight")
            p.normal_(1.0 if is_scale else 0.0, 0.15 if p.dim() > 1 else 0.1)
    model.save_pretrained(path, safe_serialization=True)
    vocab = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3, **{f"w{i}": i for i in range(4, VOCAB)}}
    tok = tokenizers.Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="</s> $A", special_tokens=[("</s>", 2)])
    transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="</s>", eos_token="</s>",
                                         pad_token="<pad>", unk_token="<unk>").save_pretrained(path)
    return model


@pytest.fixture(scope="module", params=list(KINDS))
def opt(request, tmp_path_factory):
    """(kind, the transformers model, the jpaged LLM over its folder)."""
    fields, llm_args = KINDS[request.param]
    path = tmp_path_factory.mktemp(request.param)
    hf = build_tiny_opt(path, **fields)
    llm = LLM(str(path), max_num_seqs=4, max_model_len=256, kv_cache_memory=4 << 20,
              max_num_batched_tokens=64, compilation_cache_dir="", **llm_args)
    return request.param, hf, llm


def test_greedy_tokens_and_logprobs_match_transformers(opt):
    kind, hf, llm = opt
    module = llm.runner.module
    assert isinstance(module, OPTForCausalLM)
    assert ("layers" in llm.params) == module.scan_layers == KINDS[kind][1]["scan_layers"]
    if module.packed_weights:  # the CPU's default where the C++ kernel builds
        assert llm.params["embed_tokens"]["embedding"].ndim == 3  # the tied head, in panels
    prompts = [[(7 * i + 3 * j) % (VOCAB - 4) + 4 for j in range(n)] for i, n in enumerate(PROMPT_LENS)]
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True, logprobs=5,
                            prompt_logprobs=2)
    outs = llm.generate(prompts, params, use_tqdm=False)
    for prompt, out in zip(prompts, outs):
        got = out.outputs[0]
        assert got.token_ids == hf_greedy(hf, prompt, MAX_TOKENS)
        # The top-5 log-probabilities at every generated position (and the prompt logprobs,
        # through the model's head on the step's hidden states), against one full forward.
        with torch.no_grad():
            logits = hf(input_ids=torch.tensor([prompt + got.token_ids])).logits[0]
        ref = torch.log_softmax(logits[:-1].double(), dim=-1).numpy()
        entries = out.prompt_logprobs[1:] + got.logprobs
        assert len(entries) == len(ref) and out.prompt_logprobs[0] is None
        for step, top in enumerate(entries):
            ids = list(top)
            np.testing.assert_allclose([top[i].logprob for i in ids], ref[step, ids], atol=2e-4,
                                       err_msg=f"{kind}, prompt of {len(prompt)}, position {step}")
    assert llm.block_manager.num_used_blocks == 0


def test_text_prompts_use_the_folders_tokenizer(opt):
    """The folder's tokenizer (BOS `</s>` first, as OPT's): tokens equal `generate`'s,
    which stops at EOS as jpaged does."""
    kind, hf, llm = opt
    texts = ["w5 w99 w400", "w7 " * 30 + "w1000"]
    outs = llm.generate(texts, SamplingParams(temperature=0.0, max_tokens=12), use_tqdm=False)
    tok = llm.tokenizer
    for text, out in zip(texts, outs):
        ids = tok(text).input_ids
        assert ids[0] == 2 and out.prompt_token_ids == ids
        with torch.no_grad():
            ref = hf.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                              max_new_tokens=12, do_sample=False, pad_token_id=1)[0, len(ids):].tolist()
        if ref and ref[-1] == 2:
            assert out.outputs[0].finish_reason == "stop"
        assert out.outputs[0].token_ids == ref


def test_config_from_opt_json():
    """facebook/opt-350m's config.json (post-norm, 512-wide embeddings) and opt-13b's."""
    opt_350m = dict(model_type="opt", vocab_size=50272, hidden_size=1024, ffn_dim=4096,
                    num_hidden_layers=24, num_attention_heads=16, max_position_embeddings=2048,
                    do_layer_norm_before=False, word_embed_proj_dim=512, activation_function="relu",
                    _remove_final_layer_norm=False, enable_bias=True, bos_token_id=2, eos_token_id=2)
    c = ModelConfig.from_hf_dict(opt_350m)
    assert (c.num_heads, c.num_kv_heads, c.head_dim, c.intermediate_size) == (16, 16, 64, 4096)
    assert (c.do_layer_norm_before, c.word_embed_proj_dim, c.tie_word_embeddings) == (False, 512, True)
    assert c.attention_bias and c.eos_token_ids == (2,) and model_class(c.model_type) is OPTForCausalLM
    c = ModelConfig.from_hf_dict({**opt_350m, "hidden_size": 5120, "ffn_dim": 20480, "num_hidden_layers": 40,
                                  "num_attention_heads": 40, "do_layer_norm_before": True,
                                  "word_embed_proj_dim": 5120})
    assert (c.head_dim, c.word_embed_proj_dim, c.do_layer_norm_before) == (128, None, True)


@pytest.mark.parametrize("field,value,message", [
    ("activation_function", "gelu", "unsupported activation_function 'gelu'"),
    ("layer_norm_elementwise_affine", False, "layer_norm_elementwise_affine=false"),
    ("_remove_final_layer_norm", True, "_remove_final_layer_norm=true"),
])
def test_unsupported_opt_variants_are_refused_by_name(tmp_path, field, value, message):
    cfg = transformers.OPTConfig(vocab_size=64, hidden_size=16, ffn_dim=32, num_hidden_layers=1,
                                 num_attention_heads=2).to_dict()
    (tmp_path / "config.json").write_text(json.dumps({**cfg, field: value}))
    with pytest.raises(ValueError, match=message):
        loader.load_config(tmp_path)


def test_checkpoint_missing_a_projection_is_refused(tmp_path):
    from safetensors.numpy import load_file, save_file
    build_tiny_opt(tmp_path, num_hidden_layers=1)
    tensors = load_file(tmp_path / "model.safetensors")
    del tensors["model.decoder.layers.0.fc2.bias"]
    save_file(tensors, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match=r"lacks tensor\(s\) model.decoder.layers.0.fc2.bias"):
        loader.load_params(tmp_path, loader.load_config(tmp_path))


TP_WORKER = textwrap.dedent("""
    import json, jpaged
    llm = jpaged.LLM({path!r}, tensor_parallel_size=2, max_num_seqs=4, max_model_len=256,
                     kv_cache_memory=4 << 20, max_num_batched_tokens=64, compilation_cache_dir="")
    outs = llm.generate({prompts!r}, jpaged.SamplingParams(temperature=0, max_tokens=12, ignore_eos=True),
                        use_tqdm=False)
    layer = llm.params["layers_0"]
    shards = lambda x: [s.data.shape for s in x.addressable_shards]
    print("RESULTS" + json.dumps(dict(tokens=[o.outputs[0].token_ids for o in outs],
                                      qkv_shards=shards(layer["qkv_proj"]["kernel"]),
                                      fc1_shards=shards(layer["fc1"]["kernel"]),
                                      fc2_shards=shards(layer["fc2"]["kernel"]))))
""")


def test_two_devices_give_transformers_tokens(tmp_path):
    hf = build_tiny_opt(tmp_path, **KINDS["pre-norm"][0])
    prompts = [[5, 6, 7], [(3 * j) % 1000 + 4 for j in range(70)]]
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu")
    # run from tmp_path: from the checkout's root, `import jpaged` would find its source tree
    proc = subprocess.run([sys.executable, "-c", TP_WORKER.format(path=str(tmp_path), prompts=prompts)],
                          env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(l for l in proc.stdout.splitlines() if l.startswith("RESULTS"))
    r = json.loads(line[len("RESULTS"):])
    assert r["qkv_shards"] == [[64, 96], [64, 96]]  # each device: its 2 heads' q, k and v
    assert r["fc1_shards"] == [[64, 64], [64, 64]]  # and half of the MLP's columns / rows
    assert r["fc2_shards"] == [[64, 64], [64, 64]]
    assert r["tokens"] == [hf_greedy(hf, p, 12) for p in prompts]
