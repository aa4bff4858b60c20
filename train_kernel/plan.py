"""`train-kernel plan`: what a config costs before it runs — parameters, layout, ZeRO-1 partition,
memory per rank, FLOPs per step.

Parameter counts are analytic per component (so that pipeline stages and tensor slices can be counted)
and checked against the model built on the meta device.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch

from train_kernel.config import ConfigError, TrainConfig
from train_kernel.device_speed import DtypeChoice, choose_dtype, default_device
from train_kernel.flops import flops_per_step
from train_kernel.model import build_model
from train_kernel.model.config import ModelConfig
from train_kernel.parallel import ParallelLayout, partition_sizes, stage_layer_ranges

logger = logging.getLogger(__name__)

# fp32 master weights, their fp32 gradient (the unscaled copy AdamW steps on) and Adam's two
# moments, per element of a rank's ZeRO partition.
OPTIMIZER_BYTES_PER_ELEMENT = 4 + 4 + 4 + 4
# The loss upcasts the logits to fp32 (softmax and its gradient).
LOSS_BYTES_PER_LOGIT = 4


def _split(elements: int, parts: int) -> int:
    """One tensor-parallel slice of a split dimension (the first slices are the larger ones)."""
    return -(-elements // parts)


@dataclass(frozen=True)
class ParameterCounts:
    """Parameters of each component held by one tensor-parallel rank (all of them when tensor = 1).

    InternLM's layout: token embedding; per layer a fused qkv projection with bias, an output
    projection with bias (neither bias with model_type LLAMA2's no_bias), a SwiGLU MLP (w1 gate,
    w2 up: hidden -> mlp_hidden, w3 down) without biases and two norms; a final norm; an untied
    output head without bias. RMSNorm has a weight, LayerNorm also a bias.
    """

    embedding: int
    per_layer: int
    final_norm: int
    head: int

    def stage_total(self, layers: int, first: bool, last: bool) -> int:
        return (
            layers * self.per_layer
            + (self.embedding if first else 0)
            + (self.final_norm + self.head if last else 0)
        )


def analytic_parameter_counts(model: ModelConfig, tensor: int = 1) -> ParameterCounts:
    h, v, f = model.hidden_size, model.vocab_size, model.mlp_hidden_size
    norm = h if model.norm_type == "rmsnorm" else 2 * h
    if model.embed_split_hidden:
        embedding = v * _split(h, tensor)
    else:
        embedding = _split(v, tensor) * h
    qkv = model.qkv_size  # 3h, less with grouped-query attention
    attention = _split(qkv, tensor) * h + _split(h, tensor) * h
    if model.has_attention_bias:
        attention += _split(qkv, tensor) + h  # the row-parallel (out_proj) bias is whole
    mlp = 2 * _split(f, tensor) * h + h * _split(f, tensor)
    return ParameterCounts(
        embedding=embedding,
        per_layer=attention + mlp + 2 * norm,
        final_norm=norm,
        head=_split(v, tensor) * h,
    )


def analytic_parameter_count(model: ModelConfig) -> int:
    """All parameters of the model `model` describes, computed from its sizes (no model built)."""
    return analytic_parameter_counts(model).stage_total(model.num_layers, first=True, last=True)


def meta_parameter_count(model: ModelConfig) -> int:
    """Parameters of `train_kernel.model.build_model(model, device="meta")`, counted on the built model."""
    module = build_model(model, device="meta")
    return sum(parameter.numel() for parameter in module.parameters())


def dtype_bytes(model: ModelConfig) -> int:
    return torch.finfo(model.torch_dtype).bits // 8


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes one rank holds at the peak of a step (one pipeline stage, one tensor slice, one ZeRO rank).

    weights      = P * p                  P: the stage's parameters on this tensor rank, p: dtype bytes
    gradients    = P * p                  (the model dtype; reduced in buckets)
    optimizer    = Z * (4 + 4 + 4 + 4)    Z: this rank's ZeRO-1 partition of P (fp32 master weights, their
                                          fp32 gradient and Adam's two moments)
    activations  = A * in_flight          A: one micro-batch, see below; in_flight: micro-batches whose
                                          activations a stage holds at once (1 without pipeline; stage s
                                          of a 1F1B pipeline of size pp holds min(pp - s, micro_num))
    total        = the sum

    A, for T = packed_length = micro_bsz * seq_len tokens, hidden h, MLP hidden f, vocab V, tensor size
    t, sp = t with sequence parallel else 1:
      a layer that is not checkpointed keeps, per token, 4h/sp + 4h/t + 4f/t elements of dtype p:
          the inputs of both norms and of the qkv / w1+w2 projections (4h/sp), q, k, v and the attention
          output (4h/t; flash attention keeps no s^2 scores), and w1, w2, silu(w1) and their product (4f/t);
      a checkpointed layer keeps only its input (h/sp), and while one of them is recomputed in backward its
          full activations exist once more;
      the last stage adds the final norm and head inputs (2h/sp) and the logits, T * V/t in dtype p plus
          an fp32 copy for the loss.
    Not counted: the allocator's fragmentation, communication buffers, temporaries of single kernels,
    dropout masks (drop rates are 0 by default), the CUDA context (~0.5-1 GiB).
    """

    stage: int
    weights: int
    gradients: int
    optimizer: int
    activations_per_micro_batch: int
    in_flight_micro_batches: float

    @property
    def activations(self) -> int:
        return int(self.activations_per_micro_batch * self.in_flight_micro_batches)

    @property
    def total(self) -> int:
        return self.weights + self.gradients + self.optimizer + self.activations

    def to_json(self) -> dict[str, Any]:
        return {
            "weights": self.weights,
            "gradients": self.gradients,
            "optimizer": self.optimizer,
            "activations": self.activations,
            "total": self.total,
            "activations_per_micro_batch": self.activations_per_micro_batch,
            "in_flight_micro_batches": self.in_flight_micro_batches,
            "stage": self.stage,
        }


def _checkpointed(layers: int, checkpoint: bool | float) -> int:
    """Layers of a model chunk that recompute activations (the first ones, per chunk as InternLM does)."""
    if isinstance(checkpoint, bool):
        return layers if checkpoint else 0
    return int(layers * checkpoint)


def activation_bytes(config: TrainConfig, layout: ParallelLayout, stage: int) -> int:
    """A of MemoryEstimate: one micro-batch's activations on pipeline stage `stage`."""
    model = config.model
    tokens = config.data.packed_length
    h, f, v = model.hidden_size, model.mlp_hidden_size, model.vocab_size
    t = layout.tensor
    sp = t if config.parallel.sequence_parallel else 1
    p = dtype_bytes(model)
    full_layer = tokens * p * (4 * _split(h, sp) + 4 * _split(h, t) + 4 * _split(f, t))
    checkpointed_layer = tokens * p * _split(h, sp)
    total = 0
    any_checkpointed = False
    for start, end in stage_layer_ranges(model.num_layers, layout.pipeline, model.num_chunks)[stage]:
        layers = end - start
        recomputed = _checkpointed(layers, model.checkpoint)
        any_checkpointed |= recomputed > 0
        total += (layers - recomputed) * full_layer + recomputed * checkpointed_layer
    if any_checkpointed:
        total += full_layer
    if stage == layout.pipeline - 1:
        total += tokens * p * 2 * _split(h, sp) + tokens * _split(v, t) * (p + LOSS_BYTES_PER_LOGIT)
    return total


def in_flight_micro_batches(config: TrainConfig, layout: ParallelLayout, stage: int) -> float:
    """Micro-batches whose activations stage `stage` holds at the peak of a step."""
    pp, micro_num, chunks = layout.pipeline, config.data.micro_num, config.model.num_chunks
    if pp == 1:
        return 1.0
    if chunks == 1:  # 1F1B: stage s runs pp - s - 1 warm-up forwards before its first backward
        return float(min(pp - stage, micro_num))
    # Interleaved 1F1B: warm-up of (pp - s - 1) * 2 + (chunks - 1) * pp chunk-forwards, each holding
    # 1/chunks of the stage's activations.
    warmup = (pp - stage - 1) * 2 + (chunks - 1) * pp + 1
    return min(warmup, micro_num * chunks) / chunks


@dataclass(frozen=True)
class Communication:
    """Bytes one rank sends per optimizer step, by kind (ring algorithms: an all-reduce of S bytes
    over n ranks sends 2 (n-1)/n S, an all-gather or a reduce-scatter of S bytes (the whole
    tensor) (n-1)/n S; NCCL's, the bandwidth-optimal ones).

    tensor, per micro-batch of T tokens (hidden h, dtype bytes p, tensor size t, X = T h p):
      each layer: forward 2 all-reduces of X (attention and MLP outputs), backward 2 (their inputs'
      gradients); with sequence_parallel each all-reduce is an all-gather + a reduce-scatter, the
      same bytes; a checkpointed layer runs its forward ones again;
      embedding: a forward all-reduce (vocabulary split) or all-gather (embed_split_hidden) of X and
      its backward dual (a slice: nothing); head: the hidden states' gradient all-reduced (X), and the
      loss's per-token max / sums / argmax all-reduces (4 T fp32 values + T int64: 24 T bytes);
      sequence_parallel adds the final norm's output all-gathered for the head (backward: a slice),
      with embed_split_hidden the embedding's backward all-gather along the tokens, and the
      all-reduce of the replicated parameters' partial gradients (norms, out_proj's bias; fp32 or
      the model dtype: the parameters' bytes);
    data: the gradients all-reduced over the data-parallel group, 2 (d-1)/d P p per step;
    zero: the updated slices broadcast by their owners, (z-1)/z P p;
    pipeline: each micro-batch's activations sent forward and their gradients back, 2 X per stage
      boundary a rank sits on (1 for the first and last stage, 2 for the middle ones).
    On gloo the reduce-scatter is an all-reduce and a slice (twice its bytes; parallel/tensor_parallel.py).
    """

    tensor: int
    data: int
    zero: int
    pipeline: int

    @property
    def total(self) -> int:
        return self.tensor + self.data + self.zero + self.pipeline

    def to_json(self) -> dict[str, int]:
        return {
            "tensor": self.tensor,
            "data": self.data,
            "zero": self.zero,
            "pipeline": self.pipeline,
            "total": self.total,
        }


def _ring(size: int, ranks: int, all_reduce: bool) -> float:
    if ranks <= 1:
        return 0.0
    return (2.0 if all_reduce else 1.0) * (ranks - 1) / ranks * size


def tensor_bytes_per_micro_batch(config: TrainConfig, layout: ParallelLayout, stage: int) -> float:
    """Tensor-parallel bytes one rank of pipeline stage `stage` sends for one micro-batch."""
    t = layout.tensor
    if t == 1:
        return 0.0
    model = config.model
    tokens = config.data.packed_length
    x = tokens * model.hidden_size * dtype_bytes(model)
    layers = recomputed = 0
    for start, end in stage_layer_ranges(model.num_layers, layout.pipeline, model.num_chunks)[stage]:
        layers += end - start
        recomputed += _checkpointed(end - start, model.checkpoint)
    all_reduces = 4 * layers + 2 * recomputed  # forward 2 + backward 2 per layer (+ recomputed forward)
    total = all_reduces * _ring(x, t, all_reduce=True)
    sequence = config.parallel.sequence_parallel
    if sequence:
        norm = model.hidden_size * (1 if model.norm_type == "rmsnorm" else 2)
        replicated = layers * (2 * norm + model.hidden_size) + (norm if stage == layout.pipeline - 1 else 0)
        total += _ring(replicated * dtype_bytes(model), t, all_reduce=True)
    if stage == 0:
        total += _ring(x, t, all_reduce=not model.embed_split_hidden)
        if sequence and model.embed_split_hidden:
            total += _ring(x, t, all_reduce=False)
    if stage == layout.pipeline - 1:
        total += _ring(x, t, all_reduce=True) + _ring(24 * tokens, t, all_reduce=True)
        if sequence:
            total += _ring(x, t, all_reduce=False)
    return total


def communication_per_step(
    config: TrainConfig, layout: ParallelLayout, stage: int, stage_parameters: int
) -> Communication:
    """What one rank of stage `stage` (holding `stage_parameters` per tensor rank) sends in a step."""
    model = config.model
    micro = config.data.micro_num
    p = dtype_bytes(model)
    x = config.data.packed_length * model.hidden_size * p
    boundaries = 0 if layout.pipeline == 1 else (1 if stage in (0, layout.pipeline - 1) else 2)
    return Communication(
        tensor=int(micro * tensor_bytes_per_micro_batch(config, layout, stage)),
        data=int(_ring(stage_parameters * p, layout.data, all_reduce=True)),
        zero=int((layout.zero - 1) / layout.zero * stage_parameters * p),
        # Each boundary: the activations out (or in) forward, their gradient the other way; a rank
        # sends one of the two per boundary and micro-batch.
        pipeline=int(micro * boundaries * x),
    )


@dataclass(frozen=True)
class Plan:
    config: TrainConfig
    layout: ParallelLayout
    parameters: int
    parameter_source: str
    stage_parameters: list[int]
    stage_layers: list[list[tuple[int, int]]]
    zero_partition_elements: list[int]
    memory: MemoryEstimate
    flops_per_step: float
    dtype: DtypeChoice
    """The dtype a run of the config takes on this machine (model.dtype "auto" resolved here)."""
    communication: Communication | None = None
    """Bytes per step of the rank that sends the most (its stage's)."""

    @property
    def tokens_per_step(self) -> int:
        return self.config.data.packed_length * self.config.data.micro_num * self.layout.data

    @property
    def zero_max_over_mean(self) -> float:
        sizes = self.zero_partition_elements
        mean = sum(sizes) / len(sizes)
        return max(sizes) / mean if mean else 1.0

    def to_json(self) -> dict[str, Any]:
        layout = self.layout
        return {
            "parameters": self.parameters,
            "zero_partition_elements": self.zero_partition_elements,
            "memory_per_rank_bytes": self.memory.to_json(),
            "flops_per_step": self.flops_per_step,
            "communication_per_rank_bytes": self.communication.to_json() if self.communication else None,
            "dtype": {
                "requested": self.dtype.requested,
                "on_this_machine": self.dtype.name,
                "reason": self.dtype.reason,
                "warning": self.dtype.warning,
            },
            "parameter_source": self.parameter_source,
            "zero_partition_max_over_mean": self.zero_max_over_mean,
            "layout": {
                "world_size": layout.world_size,
                "data": layout.data,
                "pipeline": layout.pipeline,
                "tensor": layout.tensor,
                "zero1": layout.zero1,
                "zero": layout.zero,
            },
            "stage_parameters": self.stage_parameters,
            "stage_layers": [[list(chunk) for chunk in chunks] for chunks in self.stage_layers],
            "tokens_per_step": self.tokens_per_step,
            "job_name": self.config.job_name,
            "config": str(self.config.source_path) if self.config.source_path else None,
        }


def default_world_size(config: TrainConfig) -> int:
    """The smallest world the config's parallel sizes fit: tensor x pipeline x max(zero1, 1)."""
    parallel = config.parallel
    return parallel.tensor.size * parallel.pipeline.size * max(parallel.zero1, 1)


def make_plan(config: TrainConfig, world_size: int | None = None) -> Plan:
    """The plan of `config` on `world_size` ranks (default: default_world_size), in the dtype a run
    would take on this machine. Raises ConfigError (a LayoutError naming parallel.* or world_size)
    when the layout does not fit."""
    dtype = choose_dtype(config.model.dtype, default_device())
    config = config.with_model_dtype(dtype.name)
    if world_size is None:
        world_size = default_world_size(config)
    source = str(config.source_path) if config.source_path else None
    try:
        layout = ParallelLayout.from_config(config.parallel, world_size)
        stage_layers = stage_layer_ranges(config.model.num_layers, layout.pipeline, config.model.num_chunks)
    except ConfigError as error:
        raise error.within(source=source) from None
    model = config.model
    analytic = analytic_parameter_count(model)
    try:
        measured = meta_parameter_count(model)
    except (ValueError, TypeError, RuntimeError) as error:  # a plan is still useful without the model
        logger.warning("building the model on the meta device failed (%s); using the analytic count", error)
        measured = None
    if measured is not None and measured != analytic:
        logger.warning(
            "the model built on the meta device has %d parameters, the analytic count %d: stage and memory "
            "figures use the analytic count",
            measured,
            analytic,
        )
    counts = analytic_parameter_counts(model, layout.tensor)
    stage_parameters = [
        counts.stage_total(
            sum(end - start for start, end in chunks), first=stage == 0, last=stage == layout.pipeline - 1
        )
        for stage, chunks in enumerate(stage_layers)
    ]
    p = dtype_bytes(model)
    estimates = []
    for stage, elements in enumerate(stage_parameters):
        partition = max(partition_sizes(elements, layout.zero))
        estimates.append(
            MemoryEstimate(
                stage=stage,
                weights=elements * p,
                gradients=elements * p,
                optimizer=partition * OPTIMIZER_BYTES_PER_ELEMENT,
                activations_per_micro_batch=activation_bytes(config, layout, stage),
                in_flight_micro_batches=in_flight_micro_batches(config, layout, stage),
            )
        )
    communications = [
        communication_per_step(config, layout, stage, elements)
        for stage, elements in enumerate(stage_parameters)
    ]
    return Plan(
        communication=max(communications, key=lambda c: c.total),
        config=config,
        layout=layout,
        parameters=measured if measured is not None else analytic,
        parameter_source="meta-device model" if measured is not None else "analytic count",
        stage_parameters=stage_parameters,
        stage_layers=stage_layers,
        zero_partition_elements=partition_sizes(stage_parameters[0], layout.zero),
        memory=max(estimates, key=lambda estimate: estimate.total),
        flops_per_step=flops_per_step(config, layout.data),
        dtype=dtype,
    )


def _gib(size_bytes: int) -> str:
    return f"{size_bytes / 2**30:.2f} GiB"


def render(plan: Plan) -> str:
    """The plan as text for a terminal."""
    config, model, layout, memory = plan.config, plan.config.model, plan.layout, plan.memory
    data = config.data
    checkpoint = (
        "on"
        if model.checkpoint is True
        else "off"
        if model.checkpoint is False
        else f"{model.checkpoint:g} of layers"
    )
    lines = [
        ("config", f"{config.source_path or '<in code>'} (JOB_NAME {config.job_name})"),
        (
            "model",
            f"{model.model_type}{'' if model.has_attention_bias else ' (no attention biases)'}, "
            f"{model.num_layers} layers, hidden {model.hidden_size}, {model.num_attention_heads} heads, "
            f"MLP {model.mlp_hidden_size}, vocab {model.vocab_size}, {model.dtype}, "
            f"activation checkpointing {checkpoint}",
        ),
        ("dtype", plan.dtype.describe() + (f"; warning: {plan.dtype.warning}" if plan.dtype.warning else "")),
        ("parameters", f"{plan.parameters:,} ({plan.parameters / 1e9:.2f} B, {plan.parameter_source})"),
        ("layout", layout.describe()),
    ]
    for stage, (elements, chunks) in enumerate(zip(plan.stage_parameters, plan.stage_layers)):
        spans = ", ".join(f"{start}-{end - 1}" for start, end in chunks)
        extras = (" + embedding" if stage == 0 else "") + (
            " + norm, head" if stage == layout.pipeline - 1 else ""
        )
        slice_note = " per tensor rank" if layout.tensor > 1 else ""
        lines.append((f"stage {stage}", f"layers {spans}{extras}: {elements:,} parameters{slice_note}"))
    sizes = plan.zero_partition_elements
    lines.append(
        (
            "ZeRO-1",
            f"elements on the ranks of the first group: [{', '.join(f'{size:,}' for size in sizes)}]; "
            f"max/mean {plan.zero_max_over_mean:.4f}",
        )
    )
    lines.append(
        (
            "batch",
            f"micro_num {data.micro_num} x micro_bsz {data.micro_bsz} x seq_len {data.seq_len} "
            f"x data {layout.data} = {plan.tokens_per_step:,} tokens per step",
        )
    )
    in_flight = memory.in_flight_micro_batches
    lines.append(
        (
            "memory/rank",
            f"stage {memory.stage}: weights {_gib(memory.weights)}, gradients {_gib(memory.gradients)}, "
            f"optimizer {_gib(memory.optimizer)}, activations {_gib(memory.activations)} "
            f"({in_flight:g} micro-batch{'es' if in_flight != 1 else ''} of {data.packed_length:,} tokens), "
            f"total {_gib(memory.total)}",
        )
    )
    if plan.communication is not None:
        c = plan.communication
        lines.append(
            (
                "comm/rank",
                f"per step: tensor {_gib(c.tensor)}, data {_gib(c.data)}, ZeRO broadcast {_gib(c.zero)}, "
                f"pipeline {_gib(c.pipeline)}, total {_gib(c.total)}"
                + (
                    " (sequence parallel: same bytes, activations / t)"
                    if config.parallel.sequence_parallel
                    else ""
                ),
            )
        )
    lines.append(
        (
            "FLOPs/step",
            f"{plan.flops_per_step:.4e} (InternLM's Megatron formula; TFLOPS = FLOPs / (step s x "
            f"{layout.world_size} x 1e12))",
        )
    )
    width = max(len(label) for label, _ in lines)
    return "\n".join(f"{label:<{width}}  {text}" for label, text in lines)


def memory_fit_warning(plan: Plan, device_bytes: int) -> str | None:
    """A warning when the plan's per-rank estimate does not fit `device_bytes`, naming the settings
    that shrink it; None when it fits. The estimate leaves out the CUDA context, fragmentation and
    single kernels' temporaries (MemoryEstimate), so a run close to the limit may still not fit."""
    memory = plan.memory
    if memory.total <= device_bytes:
        return None
    config, layout = plan.config, plan.layout
    hints = []
    if layout.zero < layout.data:
        hints.append(
            f"optimizer {_gib(memory.optimizer)}: a larger parallel.zero1 (now {layout.zero}, at most the "
            f"data-parallel size {layout.data}) partitions it over more ranks"
        )
    else:
        hints.append(f"optimizer {_gib(memory.optimizer)}: more data-parallel ranks with zero1 partition it")
    if config.model.checkpoint is not True:
        hints.append(
            f"activations {_gib(memory.activations)}: model.checkpoint=True recomputes them in backward"
        )
    hints.append("parallel.pipeline.size splits the layers over more ranks")
    return (
        f"memory: the plan estimates {_gib(memory.total)} per rank (weights {_gib(memory.weights)}, "
        f"gradients {_gib(memory.gradients)}, optimizer {_gib(memory.optimizer)}, "
        f"activations {_gib(memory.activations)}) "
        f"and the device has {_gib(device_bytes)}; expect out-of-memory. " + "; ".join(hints)
    )


__all__ = [
    "Communication",
    "communication_per_step",
    "MemoryEstimate",
    "ParameterCounts",
    "Plan",
    "activation_bytes",
    "analytic_parameter_count",
    "analytic_parameter_counts",
    "default_world_size",
    "make_plan",
    "memory_fit_warning",
    "meta_parameter_count",
    "render",
]
