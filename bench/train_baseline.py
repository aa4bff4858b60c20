"""bench_train's baseline, a user's obvious alternative: transformers' LlamaForCausalLM of the same
size (attention bias, untied head, SDPA attention) in the same dtype, torch.optim.AdamW, clipping.

`python -m bench.train_baseline SHAPE_JSON STEPS DTYPE` prints each step's seconds as JSON. Its own
process, so that nothing of the project is imported on this side.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable

import torch


def build_baseline(shape: dict, dtype: torch.dtype) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    hidden = shape["hidden"]
    mlp = 256 * ((int(hidden * 8 / 3) + 255) // 256)  # our SwiGLU width (mlp_ratio 8/3)
    config = LlamaConfig(
        hidden_size=hidden,
        intermediate_size=mlp,
        num_hidden_layers=shape["layers"],
        num_attention_heads=shape["heads"],
        num_key_value_heads=shape["heads"],
        vocab_size=shape["vocab"],
        max_position_embeddings=shape["seq_len"],
        attention_bias=True,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(dtype)
    model.config._attn_implementation = "sdpa"
    return model


def baseline_micro_batch(model: torch.nn.Module, shape: dict) -> Callable[[], None]:
    """One micro-batch's forward and backward, as a training step runs it."""

    def run() -> None:
        ids = torch.randint(0, shape["vocab"], (1, shape["seq_len"]))
        loss = model(input_ids=ids, labels=ids).loss / shape["micro_num"]
        loss.backward()

    return run


def time_steps(shape: dict, steps: int, dtype: torch.dtype) -> list[float]:
    model = build_baseline(shape, dtype)
    micro_batch = baseline_micro_batch(model, shape)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.01)
    times = []
    for _ in range(steps):
        started = time.perf_counter()
        for _ in range(shape["micro_num"]):
            micro_batch()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - started)
    return times


if __name__ == "__main__":
    print(json.dumps(time_steps(json.loads(sys.argv[1]), int(sys.argv[2]), getattr(torch, sys.argv[3]))))
