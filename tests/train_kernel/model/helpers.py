"""Small models and packed batches shared by the model tests."""

from __future__ import annotations

import dataclasses

import torch

from train_kernel.model import InternLM, ModelConfig, build_model

SMALL = ModelConfig(
    num_layers=2,
    hidden_size=64,
    num_attention_heads=4,
    vocab_size=300,
    mlp_ratio=8 / 3,
    dtype="torch.float32",
    use_flash_attn=False,
)


def small_config(**overrides) -> ModelConfig:
    return dataclasses.replace(SMALL, **overrides)


def small_model(seed: int = 0, **overrides) -> InternLM:
    return build_model(small_config(**overrides), "cpu", seed=seed)


def packed_batch(
    rows: list[list[int]], vocab: int = 300, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """Rows of equal total length, each a list of document lengths. Returns input_ids [B, L],
    position_ids [B, L] (restarting per document), cu_seqlens of the flattened tokens, and the
    documents' token ids one by one."""
    gen = torch.Generator().manual_seed(seed)
    docs = [torch.randint(0, vocab, (n,), generator=gen) for row in rows for n in row]
    lengths = [n for row in rows for n in row]
    input_ids = torch.cat(docs).view(len(rows), -1)
    position_ids = torch.cat([torch.arange(n) for n in lengths]).view(len(rows), -1)
    cu_seqlens = torch.tensor([0] + lengths, dtype=torch.int64).cumsum(0).to(torch.int32)
    return input_ids, position_ids, cu_seqlens, docs


def run_single(model: InternLM, tokens: torch.Tensor) -> torch.Tensor:
    """Logits [L, vocab] of one unpacked sequence."""
    length = tokens.numel()
    cu = torch.tensor([0, length], dtype=torch.int32)
    return model(tokens.view(1, -1), torch.arange(length).view(1, -1), cu)[0]


def lively(model: InternLM, seed: int = 5) -> InternLM:
    """Redraws the weights at unit-variance scale (matrices N(0, 1/fan_in), biases and norm
    weights perturbed by 0.2). InternLM's init (std 0.006, zero biases, unit norms) makes a tiny
    model nearly linear with logits ~0.1, which would hide attention leaks or mapping mistakes."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=gen)
            if param.dim() == 2:
                param.copy_(noise / param.shape[1] ** 0.5)
            elif "norm" in name and name.endswith("weight"):
                param.copy_(1 + 0.2 * noise)
            else:
                param.copy_(0.2 * noise)
    return model
