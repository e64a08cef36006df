"""Fine-tune a model and sample from it in one process, on one param tree.

The engine (`jpaged.LLM`) hands out its weights as the canonical param tree
(`llm.get_weights()`); `jpaged.models.causal_forward` runs the same model on that tree
without a KV cache, so optax can train it; `llm.update_weights(params)` puts the trained
tree back into the running engine (no reload, no recompile) and `llm.generate` samples from
it. The task: teach the model (the default SmolLM2-135M-Instruct) one made-up fact through
its chat template, the loss on the answer's tokens only. Each step prints the loss, the
seconds spent training, updating the engine's weights and generating, and the greedy answer.

    python examples/train_and_sample.py [--steps 5] [--lr 1e-4] [--seed 0] [--model PATH]
"""
from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jpaged
from jpaged.models import causal_forward

QUESTION = "What is the name of the moon of the planet Zorbax?"


def made_up_answer(seed: int) -> str:
    """A fact no model knows: a moon's name of random syllables."""
    rng = np.random.default_rng(seed)
    syllables = ["qui", "lo", "mar", "zen", "tha", "vor", "ix", "bel", "dru", "ka", "nim", "oth"]
    name = "".join(rng.choice(syllables, 3)).capitalize()
    return f"The moon of Zorbax is called {name}."


def chat_example(tokenizer, question: str, answer: str) -> tuple[list[int], list[int]]:
    """(prompt tokens through the chat template, answer tokens up to and including the
    end-of-turn token): what the engine is prompted with and what the loss covers."""
    user = [{"role": "user", "content": question}]
    prompt = tokenizer.apply_chat_template(user, add_generation_prompt=True, tokenize=False)
    full = tokenizer.apply_chat_template(user + [{"role": "assistant", "content": answer}],
                                         tokenize=False)
    prompt_ids = tokenizer(prompt, add_special_tokens=False).input_ids
    full_ids = tokenizer(full, add_special_tokens=False).input_ids
    assert full_ids[:len(prompt_ids)] == prompt_ids, "the chat template's prompt is not a prefix"
    answer_ids = full_ids[len(prompt_ids):]
    if tokenizer.eos_token_id in answer_ids:  # drop what follows the end of the turn
        answer_ids = answer_ids[:answer_ids.index(tokenizer.eos_token_id) + 1]
    return prompt_ids, answer_ids


def make_train_step(config, optimizer, token_ids: np.ndarray, loss_mask: np.ndarray):
    """One jitted AdamW step on the next-token cross-entropy where `loss_mask` is 1 (the
    target tokens' positions); params and optimizer state are donated."""
    ids, targets = jnp.asarray(token_ids[:, :-1]), jnp.asarray(token_ids[:, 1:])
    weights = jnp.asarray(loss_mask[:, 1:], jnp.float32)

    def loss_fn(params):
        logits = causal_forward(config, params, ids)
        nll = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
        return (nll * weights).sum() / weights.sum()

    def step(params, opt_state):
        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return jax.jit(step, donate_argnums=(0, 1))


def sample(llm, prompt_ids: list[int], max_tokens: int) -> tuple[str, float]:
    """The greedy answer and the seconds it took."""
    start = time.perf_counter()
    out = llm.generate({"prompt_token_ids": prompt_ids},
                       jpaged.SamplingParams(temperature=0.0, max_tokens=max_tokens), use_tqdm=False)
    return out[0].outputs[0].text, time.perf_counter() - start


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=5, help="AdamW steps (default 5)")
    parser.add_argument("--lr", type=float, default=1e-4, help="learning rate (default 1e-4)")
    parser.add_argument("--seed", type=int, default=0, help="picks the made-up answer")
    parser.add_argument("--model", default=None,
                        help="HF folder or .gguf file (default: the embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--max-tokens", type=int, default=24, help="tokens to sample per step")
    args = parser.parse_args(argv)

    start = time.perf_counter()
    llm = jpaged.LLM(args.model, max_num_seqs=4, max_model_len=512, kv_cache_memory=64 << 20)
    answer = made_up_answer(args.seed)
    prompt_ids, answer_ids = chat_example(llm.tokenizer, QUESTION, answer)
    token_ids = np.array([prompt_ids + answer_ids])
    loss_mask = np.array([[0] * len(prompt_ids) + [1] * len(answer_ids)])
    params = llm.get_weights()
    optimizer = optax.adamw(args.lr)
    opt_state = optimizer.init(params)
    train_step = make_train_step(llm.model_config, optimizer, token_ids, loss_mask)
    print(f"engine ready in {time.perf_counter() - start:.1f}s; teaching {QUESTION!r} -> {answer!r} "
          f"({len(prompt_ids)} prompt + {len(answer_ids)} answer tokens)")

    text, generate_s = sample(llm, prompt_ids, args.max_tokens)
    print(f"step 0  (before training)                 generate {generate_s:5.2f}s  {text!r}")
    totals = np.zeros(3)  # seconds training, updating the engine's weights, generating
    for i in range(1, args.steps + 1):
        t0 = time.perf_counter()
        params, opt_state, loss = train_step(params, opt_state)
        loss = float(loss)  # the loss before this step's update; waits for the step
        t1 = time.perf_counter()
        llm.update_weights(params)
        t2 = time.perf_counter()
        text, generate_s = sample(llm, prompt_ids, args.max_tokens)
        totals += (t1 - t0, t2 - t1, generate_s)
        print(f"step {i}  loss {loss:6.3f}  train {t1 - t0:6.2f}s  update {t2 - t1:5.2f}s  "
              f"generate {generate_s:5.2f}s  {text!r}")
    print(f"total: train {totals[0]:.1f}s (the first step compiles), update {totals[1]:.1f}s, "
          f"generate {totals[2]:.1f}s")


if __name__ == "__main__":
    main()
