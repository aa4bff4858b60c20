"""Dropout's random streams on real gloo ranks (parallel/dropout_rng.py), a tiny model with
drop_rate and attn_drop_rate 0.3, built and stepped by the trainer's own builder:

- tensor 2: the block's dropout on replicated activations is bitwise the same on both tensor ranks;
  the attention's dropout on each rank's heads draws different masks (with every head given the
  same projections, the heads' outputs differ only by their masks); after 3 training steps the
  replicated parameters (norms, biases) are bitwise equal on both ranks;
- tensor 2 with sequence parallel: the block's dropout on the token shards draws different masks;
- data parallel 2: the two replicas draw different masks;
- the random state a checkpoint saves (checkpoint/rng.py) is all a forward's masks depend on, and
  activation checkpointing's recompute draws the forward's masks (the same gradients).

Before dropout_rng every rank drew from one seed: the attention-head, token-shard and
data-parallel checks fail on that behaviour; the replicated checks pass on it and guard against
seeding the replicated region per tensor rank.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from tests.train_kernel.parallel.launch import run_ranks
from tests.train_kernel.train.tiny_config import tiny_config_text

DROP = 0.3
PARALLEL = {
    "tp2": "dict(zero1=1, tensor=2)",
    "tp2-sp": "dict(zero1=1, tensor=2, sequence_parallel=True)",
    "dp2": "dict(zero1=1)",
}


def _config_text(run_dir: Path, mode: str) -> str:
    text = tiny_config_text(run_dir, micro_num=2, total_steps=3)
    text = text.replace("num_layers=2", f"num_layers=2, drop_rate={DROP}, attn_drop_rate={DROP}")
    return text.replace("parallel = dict(zero1=1)", f"parallel = {PARALLEL[mode]}")


# --- the rank program -----------------------------------------------------------------------


def _gather(x: torch.Tensor, group) -> list[torch.Tensor]:
    import torch.distributed as dist

    parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, x.contiguous(), group=group)
    return parts


def _same_heads(model) -> None:
    """Every head's q, k and v rows (and biases) the same block: heads then differ only by their
    dropout masks. The same values on every rank (a fixed generator)."""
    generator = torch.Generator().manual_seed(11)
    for layer in model.layers.values():
        attention = layer.attention
        d, heads, kv = attention.head_dim, attention.num_heads, attention.kv_heads
        hidden = attention.Wqkv.weight.shape[1]
        blocks = [torch.randn(d, hidden, generator=generator) * 0.5 for _ in range(3)]
        rows = torch.cat([blocks[0]] * heads + [blocks[1]] * kv + [blocks[2]] * kv)
        with torch.no_grad():
            attention.Wqkv.weight.copy_(rows)
            attention.Wqkv.bias.zero_()


def _capture(model) -> tuple[dict, list]:
    """Hooks recording the block dropout's input and output and the attention heads' outputs
    (out_proj's input) of every layer."""
    seen: dict[str, list] = {"dropout_in": [], "dropout_out": [], "heads": []}
    handles = []
    for layer in model.layers.values():

        def dropout_hook(module, args, output):
            seen["dropout_in"].append(args[0].detach().clone())
            seen["dropout_out"].append(output.detach().clone())

        def heads_hook(module, args):
            seen["heads"].append(args[0].detach().clone())

        handles.append(layer.dropout.register_forward_hook(dropout_hook))
        handles.append(layer.attention.out_proj.register_forward_pre_hook(heads_hook))
    return seen, handles


def rank_program(mode: str, run_dir: str) -> dict:
    from train_kernel.checkpoint.rng import capture_rng, restore_rng
    from train_kernel.config import config_from_text
    from train_kernel.data.batches import to_micro_batches
    from train_kernel.parallel.process_groups import init_parallel
    from train_kernel.train.builder import build_run
    from train_kernel.train.token_metrics import TokenMetrics

    config = config_from_text(_config_text(Path(run_dir), mode))
    parallel = init_parallel(config.parallel)
    run = build_run(config, parallel=parallel, run_dir=Path(run_dir))
    model, optim = run.model, run.optim
    group = parallel.tensor_group if parallel.tp_size > 1 else parallel.data_group

    def batch(step: int):
        return to_micro_batches(run.data.train_rows.batch(run.data.sampler.next_batch(step).rows), run.device)

    def forward(micro) -> torch.Tensor:
        return model(
            micro.input_ids, micro.position_ids, micro.cu_seqlens, micro.max_seqlen, apply_head=False
        )

    out: dict = {}
    # 1. One training forward, the heads made equal: masks compared across the ranks.
    micro = batch(0)[0]
    saved = {n: p.detach().clone() for n, p in model.named_parameters()}
    _same_heads(model)
    seen, handles = _capture(model)
    model.train()
    forward(micro)
    model.eval()
    forward(micro)  # no dropout: heads' outputs equal across the ranks
    for handle in handles:
        handle.remove()
    layers = len(model.layers)
    train_heads, eval_heads = seen["heads"][:layers], seen["heads"][layers:]
    out["eval_heads_equal_across_ranks"] = all(torch.equal(*_gather(h, group)) for h in eval_heads)
    out["train_heads_equal_across_ranks"] = [torch.equal(*_gather(h, group)) for h in train_heads]
    dropped, masks_equal, outputs_equal = [], [], []
    for x, y in zip(seen["dropout_in"][: 2 * layers], seen["dropout_out"][: 2 * layers]):
        mask = (y == 0) & (x != 0)
        dropped.append(float(mask.float().mean()))
        masks_equal.append(torch.equal(*_gather(mask.to(torch.uint8), group)))
        outputs_equal.append(torch.equal(*_gather(y, group)))
    out["block_dropped_fraction"] = dropped
    out["block_masks_equal_across_ranks"] = masks_equal
    out["block_outputs_equal_across_ranks"] = outputs_equal
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.copy_(saved[n])

    # 2. A forward replayed from the random state a checkpoint saves draws the same masks.
    model.train()
    state = capture_rng()
    with torch.no_grad():
        first = forward(micro)
        restore_rng(state)
        again = forward(micro)
    out["replayed_from_saved_rng_equal"] = torch.equal(first, again)

    # 3. Activation checkpointing's recompute draws the masks of the forward: the gradients equal
    # those without recompute (a stream that advanced in the forward would give others).
    def gradients(recompute: bool) -> list[torch.Tensor]:
        model.zero_grad(set_to_none=True)
        model.num_checkpointed_layers = (lambda: len(model.layers)) if recompute else (lambda: 0)
        restore_rng(state)
        forward(micro).float().square().mean().backward()
        return [p.grad.clone() for p in model.parameters() if p.grad is not None]

    plain, recomputed = gradients(False), gradients(True)
    del model.num_checkpointed_layers
    model.zero_grad(set_to_none=True)
    out["recompute_gradients_equal"] = len(plain) > 0 and all(map(torch.equal, plain, recomputed))

    # 4. Three training steps: the replicated parameters stay bitwise equal on the tensor ranks.
    losses = []
    for step in range(3):
        model.train()
        metrics = TokenMetrics(run.data.train_rows.type_names)
        result = run.schedule.forward_backward(batch(step), 1.0, metrics)
        optim.optimizer.step(lr=optim.lr.lr_at(step), beta2=optim.beta2.beta2_at(step))
        losses.append(result.loss)
    replicated = [(n, p) for n, p in model.named_parameters() if not getattr(p, "tensor_sharded", False)]
    out["replicated_parameters"] = len(replicated)
    out["replicated_parameters_differing"] = [
        n for n, p in replicated if not torch.equal(*_gather(p.detach(), group))
    ]
    out["weights_moved"] = any(not torch.equal(saved[n], p.detach()) for n, p in replicated)
    out["losses"] = losses
    parallel.close(barrier=True)
    return out


# --- the tests --------------------------------------------------------------------------------


def _run(tmp_path: Path, mode: str) -> dict:
    module = "tests.train_kernel.parallel.test_tensor_dropout"
    results = run_ranks(["-m", module, mode, str(tmp_path / "run")], world_size=2, timeout=120)
    for result in results:
        assert result.returncode == 0, result.output[-4000:]
    line = next(line for line in results[0].output.splitlines() if line.startswith("RESULT "))
    return json.loads(line[len("RESULT ") :])


@pytest.mark.distributed
def test_tensor_ranks_share_replicated_masks_and_split_head_masks(tmp_path):
    out = _run(tmp_path, "tp2")
    # The block's dropout dropped something, on activations replicated over the tensor ranks:
    # the same mask and the same output, bitwise, on both ranks.
    assert all(0.1 < fraction < 0.5 for fraction in out["block_dropped_fraction"]), out
    assert all(out["block_masks_equal_across_ranks"]), out
    assert all(out["block_outputs_equal_across_ranks"]), out
    # Heads with equal projections give equal outputs without dropout and differ with it: each
    # tensor rank's heads drew their own masks (on one shared seed they were equal).
    assert out["eval_heads_equal_across_ranks"], out
    assert not any(out["train_heads_equal_across_ranks"]), out
    assert out["replayed_from_saved_rng_equal"], out
    assert out["recompute_gradients_equal"], out
    assert out["weights_moved"] and out["replicated_parameters"] > 0, out
    assert out["replicated_parameters_differing"] == [], out


@pytest.mark.distributed
def test_sequence_parallel_token_shards_draw_their_own_masks(tmp_path):
    out = _run(tmp_path, "tp2-sp")
    assert all(0.1 < fraction < 0.5 for fraction in out["block_dropped_fraction"]), out
    assert not any(out["block_masks_equal_across_ranks"]), out
    assert not any(out["train_heads_equal_across_ranks"]), out
    assert out["eval_heads_equal_across_ranks"], out
    assert out["replayed_from_saved_rng_equal"], out
    assert out["recompute_gradients_equal"], out
    assert out["weights_moved"] and out["replicated_parameters_differing"] == [], out


@pytest.mark.distributed
def test_data_parallel_replicas_draw_their_own_masks(tmp_path):
    out = _run(tmp_path, "dp2")
    assert all(0.1 < fraction < 0.5 for fraction in out["block_dropped_fraction"]), out
    assert not any(out["block_masks_equal_across_ranks"]), out
    assert out["replayed_from_saved_rng_equal"], out
    # Data parallel keeps the replicas equal through the gradient average, whatever the masks.
    assert out["replicated_parameters_differing"] == [], out


def test_rank_seeds_keep_one_process_and_differ_elsewhere():
    from train_kernel.parallel.dropout_rng import rank_seed

    assert rank_seed(1024, 0, 0) == 1024  # one process draws what it drew before
    seeds = {rank_seed(1024, d, p) for d in range(4) for p in range(4)}
    assert len(seeds) == 16


def test_split_dropout_forks_per_rank_and_leaves_the_ranks_in_step():
    from train_kernel.parallel.dropout_rng import TensorSplitDropout

    x = torch.ones(64, 64)

    def draw(rank: int) -> tuple[torch.Tensor, torch.Tensor]:
        torch.manual_seed(5)
        mask = TensorSplitDropout(0.5, rank)(x) == 0
        return mask, torch.get_rng_state()

    (mask0, after0), (mask0_again, _), (mask1, after1) = draw(0), draw(0), draw(1)
    assert torch.equal(mask0, mask0_again)  # a rank's stream is a function of the global state
    assert not torch.equal(mask0, mask1)  # another tensor rank: another mask
    assert torch.equal(after0, after1)  # the global stream advanced alike on both ranks
    torch.manual_seed(5)
    seeded = torch.get_rng_state()
    TensorSplitDropout(0.0, 0)(x)
    TensorSplitDropout(0.5, 0).eval()(x)
    assert torch.equal(torch.get_rng_state(), seeded)  # off or in eval: no draw at all


if __name__ == "__main__":
    print("RESULT " + json.dumps(rank_program(sys.argv[1], sys.argv[2])), flush=True)
