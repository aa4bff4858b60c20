"""The sections of an InternLM config file (`data = dict(...)`, `adam = dict(...)`, ...) as typed records.

Field names, defaults and meanings are InternLM's, so a published config maps onto them one to one.
Defaults that depend on another field of the same section are computed before construction
(`derived_fields`); those that depend on another section (lr_scheduler.total_steps,
ckpt.checkpoint_every, ...) by TrainConfig's. Nothing is set on a section after it is made.
"""

from __future__ import annotations

import bisect
import functools
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ckpt_uploader.uri import StorageURIError, parse_storage_uri
from train_kernel.config.errors import ConfigError, did_you_mean
from train_kernel.config.typecheck import Section

# Skipping more batches than this is surely a typo ("0-100000000"); it would also cost memory.
MAX_SKIPPED_BATCHES = 1_000_000
LOAD_CONTENTS = ("all", "model", "sampler", "optimizer", "scheduler")
# "internlm": this project's checkpoints or InternLM's model_tp*_pp*.pt folders; "hf_llama": a Hugging
# Face Llama folder; "llama": Meta's consolidated.*.pth (train_kernel.interop).
CKPT_TYPES = ("internlm", "hf_llama", "llama")


def _require(condition: bool, key: str, message: str) -> None:
    if not condition:
        raise ConfigError(message, key=key)


def check_storage_folder(value: str | None, key: str) -> None:
    """A checkpoint folder: exactly what the uploader accepts (ckpt_uploader.uri, the one parser):
    "local:/path", "boto3:s3://bucket[.endpoint]/prefix", "s3://bucket/prefix" or a plain path."""
    if value is None:
        return
    try:
        parse_storage_uri(value)
    except StorageURIError as error:
        raise ConfigError(str(error), key=key) from None


def parse_skip_batches(text: str) -> tuple[int, ...]:
    """InternLM's skip_batches syntax: "3,5-8" -> (3, 5, 6, 7, 8); "" -> (); ranges are inclusive."""
    if text.strip() == "":
        return ()
    indices: set[int] = set()
    for piece in text.split(","):
        piece = piece.strip()
        match = re.fullmatch(r"(\d+)(?:\s*-\s*(\d+))?", piece)
        if match is None:
            raise ConfigError(
                f"{text!r}: cannot read {piece!r}; expected batch indices and inclusive ranges like '3,5-8'",
                key="skip_batches",
            )
        start = int(match.group(1))
        end = int(match.group(2)) if match.group(2) is not None else start
        if end < start:
            raise ConfigError(f"{text!r}: range {piece!r} ends before it starts", key="skip_batches")
        if len(indices) + end - start + 1 > MAX_SKIPPED_BATCHES:
            raise ConfigError(f"{text!r}: skips more than {MAX_SKIPPED_BATCHES} batches", key="skip_batches")
        indices.update(range(start, end + 1))
    return tuple(sorted(indices))


@dataclass(frozen=True)
class BatchRampup:
    """Parsed rampup_batch_size: micro_num starts at start_bsz, grows by bsz_incre every incre_every steps."""

    start_bsz: int
    bsz_incre: int
    incre_every: int

    def micro_num_at(self, step: int, micro_num: int) -> int:
        """Micro-batches of step `step` (0-based batch count), capped at the configured micro_num."""
        return min(self.start_bsz + (step // self.incre_every) * self.bsz_incre, micro_num)

    def ramp_steps(self, micro_num: int) -> int:
        """Steps until micro_num is reached."""
        increments = -(-(micro_num - self.start_bsz) // self.bsz_incre)
        return increments * self.incre_every

    def micro_nums(self, micro_num: int) -> list[int]:
        """Every micro_num a step takes, from start_bsz up to micro_num."""
        steps = range(0, self.ramp_steps(micro_num) + 1, self.incre_every)
        return sorted({self.micro_num_at(step, micro_num) for step in steps})


def parse_rampup(text: str, micro_num: int) -> BatchRampup | None:
    """InternLM's rampup_batch_size: "start_bsz bsz_incre incre_every" (micro-batches); "" = no ramp-up."""
    if text.strip() == "":
        return None
    parts = text.split()
    if len(parts) != 3 or not all(re.fullmatch(r"\d+", part) for part in parts):
        raise ConfigError(
            f"{text!r}: expected three integers 'start_bsz bsz_incre incre_every', e.g. '1 1 100'",
            key="rampup_batch_size",
        )
    start_bsz, bsz_incre, incre_every = (int(part) for part in parts)
    key = "rampup_batch_size"
    _require(
        start_bsz >= 1 and bsz_incre >= 1 and incre_every >= 1, key, f"{text!r}: every number must be >= 1"
    )
    _require(start_bsz <= micro_num, key, f"{text!r}: start_bsz {start_bsz} is above micro_num {micro_num}")
    _require(
        (micro_num - start_bsz) % bsz_incre == 0,
        key,
        f"{text!r}: micro_num {micro_num} - start_bsz {start_bsz} is not a multiple of bsz_incre {bsz_incre}",
    )
    return BatchRampup(start_bsz, bsz_incre, incre_every)


@dataclass(frozen=True)
class DataConfig(Section):
    """`data = dict(...)`: sequence geometry, batch size, steps, and where the packed data is."""

    seq_len: int = 2048
    """Tokens per sequence (the SEQ_LEN of InternLM configs). Attention cost grows with seq_len^2 per
    sequence; activation memory with micro_bsz * seq_len."""
    micro_num: int = 1
    """Micro-batches per optimizer step on each data-parallel rank (gradient accumulation steps).
    Global batch = micro_num * micro_bsz * data-parallel size sequences. More means larger batches at
    the same memory, but a longer step."""
    micro_bsz: int = 1
    """Sequences packed into one micro-batch: packed_length = micro_bsz * seq_len tokens per forward.
    Larger fills the accelerator better but needs proportionally more activation memory."""
    valid_micro_num: int | None = None
    """Micro-batches per validation step; default: micro_num."""
    valid_every: int = 0
    """Validate every this many steps; 0 = never."""
    pack_sample_into_one: bool = False
    """Treat a packed row as one sequence (attention crosses document boundaries; InternLM's
    PackedDatasetWithoutCuSeqlen) instead of keeping documents apart with cu_seqlens. Done by
    pack_stage; it must equal the packed manifest's value (an error names both otherwise)."""
    total_steps: int = 50000
    """Optimizer steps of the run."""
    skip_batches: str = ""
    """Batch indices (0-based steps) whose data is skipped, e.g. "3,5-8" (inclusive ranges), to step over
    data that made the loss spike. Parsed into skip_batch_indices."""
    rampup_batch_size: str = ""
    """Batch-size ramp-up "start_bsz bsz_incre incre_every": micro_num starts at start_bsz and grows by
    bsz_incre every incre_every steps up to micro_num; "" (or None, as InternLM's later configs write)
    = constant. Small early batches are cheaper but noisier."""
    min_length: int = 0
    """Documents shorter than this many tokens are dropped. Done by pack_stage; it must equal the
    min_length of the packed manifest of train_folder / valid_folder (an error names both otherwise)."""
    train_folder: str | None = None
    """pack_stage output folder (holding its manifest.json) whose train split is read, or a folder of
    InternLM's *.bin / *.bin.meta files (packed once into a cache, reused by later runs); None = random
    tokens (InternLM's dummy dataset), for throughput tests."""
    valid_folder: str | None = None
    """pack_stage output folder whose valid split is read (default: train_folder), or an InternLM folder
    of *.bin files, validated per folder of them as val/<name>_loss, _acc, _plex."""
    num_worker: int = 4
    """InternLM's DataLoader worker processes per rank. Not used here: the packed rows are memory-mapped
    and read in the training process (a value > 0 given in the file is warned about)."""
    empty_cache_and_diag_interval: int = 50
    """Every this many steps empty the allocator cache and check for slow ranks (InternLM); 0 = never.
    Rank 0 logs every rank's step time and names the stragglers (train_kernel.health)."""
    diag_outlier_ratio: float = 1.1
    """A rank whose step time exceeds the median by this factor is reported as slow (>= 1)."""
    fixed_random_dataset_seqlen: bool = True
    """Random-token data (no train_folder): every document is seq_len long. False (random lengths)
    is not supported: an error when the random data is used, a warning when train_folder is set."""
    packed_length: int | None = None
    """Derived, tokens per micro-batch = micro_bsz * seq_len; a value given in the file is ignored
    (InternLM does the same, with a warning)."""

    @functools.cached_property
    def skip_batch_indices(self) -> tuple[int, ...]:
        """skip_batches as a sorted tuple of batch indices."""
        return parse_skip_batches(self.skip_batches)

    @functools.cached_property
    def rampup(self) -> BatchRampup | None:
        """rampup_batch_size parsed; None = constant micro_num."""
        return parse_rampup(self.rampup_batch_size, self.micro_num)

    @classmethod
    def prepare_raw(cls, raw: dict[str, Any]) -> dict[str, Any]:
        if "rampup_batch_size" in raw and raw["rampup_batch_size"] is None:
            raw["rampup_batch_size"] = ""  # InternLM's later configs write None for "no ramp-up"
        return raw

    def derived_fields(self) -> dict[str, Any]:
        derived: dict[str, Any] = {"packed_length": self.micro_bsz * self.seq_len}
        if self.valid_micro_num is None:
            derived["valid_micro_num"] = self.micro_num
        if self.valid_folder is None:
            derived["valid_folder"] = self.train_folder
        return derived

    def check(self) -> None:
        for name in ("seq_len", "micro_num", "micro_bsz", "total_steps"):
            _require(getattr(self, name) >= 1, name, f"must be >= 1, got {getattr(self, name)}")
        _require(self.valid_micro_num >= 1, "valid_micro_num", f"must be >= 1, got {self.valid_micro_num}")
        for name in ("valid_every", "min_length", "num_worker", "empty_cache_and_diag_interval"):
            _require(getattr(self, name) >= 0, name, f"must be >= 0, got {getattr(self, name)}")
        _require(
            self.diag_outlier_ratio >= 1, "diag_outlier_ratio", f"must be >= 1, got {self.diag_outlier_ratio}"
        )
        _require(
            self.fixed_random_dataset_seqlen or self.train_folder is not None,
            "fixed_random_dataset_seqlen",
            "False (random document lengths) is not supported: the random data (no train_folder) has "
            "documents of seq_len tokens; remove the key or set it True",
        )
        _ = self.skip_batch_indices, self.rampup  # parsed now: a bad value is an error of the config

    def skips(self, batch_index: int) -> bool:
        """Whether the batch of this step is in skip_batches."""
        position = bisect.bisect_left(self.skip_batch_indices, batch_index)
        return position < len(self.skip_batch_indices) and self.skip_batch_indices[position] == batch_index

    def micro_num_at(self, step: int) -> int:
        """Micro-batches of step `step`, following the ramp-up if there is one."""
        return self.rampup.micro_num_at(step, self.micro_num) if self.rampup else self.micro_num


@dataclass(frozen=True)
class Fp16ScalerConfig(Section):
    """`grad_scaler = dict(fp16=dict(...))`: the dynamic loss scale of fp16 training."""

    initial_scale: float = 2**16
    """Loss scale at the start. Too high costs a few skipped steps (overflow); too low loses small
    gradients."""
    min_scale: float | None = 1
    """The scale never drops below this; None = no floor."""
    growth_interval: int = 1000
    """Steps without overflow after which the scale grows by growth_factor."""

    def check(self) -> None:
        _require(self.initial_scale > 0, "initial_scale", f"must be > 0, got {self.initial_scale}")
        if self.min_scale is not None:
            _require(self.min_scale > 0, "min_scale", f"must be > 0, got {self.min_scale}")
            _require(
                self.min_scale <= self.initial_scale,
                "min_scale",
                f"{self.min_scale} is above initial_scale {self.initial_scale}",
            )
        _require(self.growth_interval >= 1, "growth_interval", f"must be >= 1, got {self.growth_interval}")


@dataclass(frozen=True)
class GradScalerConfig(Section):
    """`grad_scaler = dict(...)`: how the fp16 loss scale moves (unused with bf16/fp32)."""

    fp16: Fp16ScalerConfig = field(default_factory=Fp16ScalerConfig)
    """Initial/minimum scale and growth interval."""
    growth_factor: float = 2
    """Multiplier of the scale after growth_interval clean steps (> 1)."""
    backoff_factor: float = 0.5
    """Multiplier of the scale after hysteresis overflows (in (0, 1))."""
    max_scale: float | None = 2**24
    """The scale never grows above this; None = no ceiling."""
    hysteresis: int = 2
    """Overflowing steps tolerated before the scale backs off."""

    def check(self) -> None:
        _require(self.growth_factor > 1, "growth_factor", f"must be > 1, got {self.growth_factor}")
        _require(
            0 < self.backoff_factor < 1, "backoff_factor", f"must be in (0, 1), got {self.backoff_factor}"
        )
        if self.max_scale is not None:
            _require(
                self.max_scale >= self.fp16.initial_scale,
                "max_scale",
                f"{self.max_scale} is below fp16.initial_scale {self.fp16.initial_scale}",
            )
        _require(self.hysteresis >= 1, "hysteresis", f"must be >= 1, got {self.hysteresis}")


@dataclass(frozen=True)
class HybridZeroOptimizerConfig(Section):
    """`hybrid_zero_optimizer = dict(...)`: InternLM's ZeRO-1 optimizer wrapper."""

    overlap_sync_grad: bool = False
    """Reduce gradient buckets while backward still runs. Faster; costs the bucket memory.
    Default False, as InternLM's (its configs set it True)."""
    overlap_sync_param: bool = False
    """Broadcast updated parameter slices overlapped with the next forward. Faster; costs memory.
    Default False, as InternLM's (its configs set it True)."""
    reduce_bucket_size: int = 512 * 1024 * 1024
    """Gradient elements gathered before a reduce is launched. Larger buckets mean fewer, more efficient
    collectives but more memory held and less overlap."""
    clip_grad_norm: float = 1.0
    """Clip the global gradient norm to this; 0 = no clipping."""
    zero_overlap_communication: bool | None = None
    """Old InternLM name of overlap_sync_grad; when given it sets overlap_sync_grad."""

    @classmethod
    def prepare_raw(cls, raw: dict[str, Any]) -> dict[str, Any]:
        if isinstance(raw.get("zero_overlap_communication"), bool):
            raw["overlap_sync_grad"] = raw["zero_overlap_communication"]
        return raw

    def check(self) -> None:
        _require(
            self.reduce_bucket_size >= 1, "reduce_bucket_size", f"must be >= 1, got {self.reduce_bucket_size}"
        )
        _require(self.clip_grad_norm >= 0, "clip_grad_norm", f"must be >= 0, got {self.clip_grad_norm}")


@dataclass(frozen=True)
class LossConfig(Section):
    """`loss = dict(...)`: the cross-entropy loss."""

    label_smoothing: float = 0.0
    """Probability mass spread uniformly over the vocabulary, in [0, 1); 0 = plain cross-entropy."""

    def check(self) -> None:
        _require(
            0 <= self.label_smoothing < 1, "label_smoothing", f"must be in [0, 1), got {self.label_smoothing}"
        )


@dataclass(frozen=True)
class AdamConfig(Section):
    """`adam = dict(...)`: AdamW hyper-parameters."""

    lr: float = 1e-4
    """Peak learning rate (after warm-up)."""
    adam_beta1: float = 0.9
    """Decay of the first moment, in [0, 1)."""
    adam_beta2: float = 0.95
    """Decay of the second moment, in [0, 1). Lower (0.95) reacts faster to gradient spikes than 0.999."""
    adam_beta2_c: float = 0.0
    """InternLM's beta2 schedule constant (beta2_scheduler.c); 0 = constant beta2."""
    adam_eps: float = 1e-8
    """Added to the denominator for stability (> 0)."""
    weight_decay: float = 0.01
    """Decoupled weight decay (AdamW), >= 0."""

    def check(self) -> None:
        _require(self.lr > 0, "lr", f"must be > 0, got {self.lr}")
        _require(0 <= self.adam_beta1 < 1, "adam_beta1", f"must be in [0, 1), got {self.adam_beta1}")
        _require(0 <= self.adam_beta2 < 1, "adam_beta2", f"must be in [0, 1), got {self.adam_beta2}")
        _require(self.adam_beta2_c >= 0, "adam_beta2_c", f"must be >= 0, got {self.adam_beta2_c}")
        _require(self.adam_eps > 0, "adam_eps", f"must be > 0, got {self.adam_eps}")
        _require(self.weight_decay >= 0, "weight_decay", f"must be >= 0, got {self.weight_decay}")


@dataclass(frozen=True)
class LrSchedulerConfig(Section):
    """`lr_scheduler = dict(...)`: linear warm-up, then cosine decay (InternLM's
    FineTuneCosineAnnealingWarmupLR)."""

    total_steps: int | None = None
    """Steps of the schedule; default: data.total_steps (a different value is allowed, with a warning)."""
    init_steps: int = 0
    """InternLM's optimizer warm-up steps (steps already taken when the schedule starts)."""
    warmup_ratio: float = 0.01
    """Fraction of total_steps spent warming up linearly to adam.lr, in [0, 1]."""
    eta_min: float = 1e-5
    """Learning rate at the end of the cosine decay."""
    last_epoch: int = -1
    """Index of the last step taken, as in torch's schedulers; only -1 (a fresh schedule) is
    accepted: the schedule follows the run's step count, which a resumed checkpoint restores."""

    def check(self) -> None:
        if self.total_steps is not None:
            _require(self.total_steps >= 1, "total_steps", f"must be >= 1, got {self.total_steps}")
        _require(self.init_steps >= 0, "init_steps", f"must be >= 0, got {self.init_steps}")
        _require(0 <= self.warmup_ratio <= 1, "warmup_ratio", f"must be in [0, 1], got {self.warmup_ratio}")
        _require(self.eta_min >= 0, "eta_min", f"must be >= 0, got {self.eta_min}")
        _require(
            self.last_epoch == -1,
            "last_epoch",
            f"{self.last_epoch}: only -1 is supported (the schedule follows the run's step count; "
            "resume from a checkpoint to continue a schedule)",
        )


@dataclass(frozen=True)
class Beta2SchedulerConfig(Section):
    """`beta2_scheduler = dict(...)`: InternLM's schedule of Adam's beta2."""

    init_beta2: float | None = None
    """beta2 at the start, in [0, 1); default: adam.adam_beta2."""
    c: float | None = None
    """Schedule constant (>= 0; 0 = beta2 stays init_beta2); default: adam.adam_beta2_c."""
    cur_iter: int = -1
    """Index of the last step taken; only -1 (a fresh schedule) is accepted: beta2 follows the run's
    step count, which a resumed checkpoint restores."""

    def check(self) -> None:
        if self.init_beta2 is not None:
            _require(0 <= self.init_beta2 < 1, "init_beta2", f"must be in [0, 1), got {self.init_beta2}")
        if self.c is not None:
            _require(self.c >= 0, "c", f"must be >= 0, got {self.c}")
        _require(
            self.cur_iter == -1,
            "cur_iter",
            f"{self.cur_iter}: only -1 is supported (beta2 follows the run's step count; resume from a "
            "checkpoint to continue a schedule)",
        )


@dataclass(frozen=True)
class PipelineConfig(Section):
    """`parallel = dict(pipeline=dict(...))` (or `pipeline=<size>`)."""

    size: int = 1
    """Pipeline stages; the layers are split evenly over them. More stages fit bigger models per GPU but
    add pipeline bubbles (idle time) unless micro_num is much larger than size."""
    interleaved_overlap: bool = False
    """Overlap communication in the interleaved schedule (InternLM requires it when model.num_chunks > 1)."""
    schedule: str | None = None
    """The schedule of a training step, run by PyTorch's pipelining engine (torch.distributed.pipelining):
    "1F1B", "Interleaved1F1B" (needs model.num_chunks > 1) or "InterleavedZeroBubble" (needs
    model.num_chunks > 1; computes weight gradients apart to fill the bubble); None: 1F1B, or
    Interleaved1F1B when model.num_chunks > 1, unless micro_num is below the pipeline size or ramps
    up (PyTorch's schedules need a fixed micro_num >= size): then the project's own. "InternLM":
    the project's own 1F1B / interleaved schedules (InternLM's order), which run any micro_num."""

    @classmethod
    def from_shorthand(cls, value: Any) -> PipelineConfig | None:
        if isinstance(value, int) and not isinstance(value, bool):
            return cls(size=value)
        return None

    def check(self) -> None:
        _require(self.size >= 1, "size", f"must be >= 1, got {self.size}")
        choices = ("1F1B", "Interleaved1F1B", "InterleavedZeroBubble", "InternLM")
        _require(
            self.schedule is None or self.schedule in choices,
            "schedule",
            f"must be one of {', '.join(choices)} (None: by model.num_chunks), got {self.schedule!r}",
        )


@dataclass(frozen=True)
class TensorConfig(Section):
    """`parallel = dict(tensor=dict(...))` (or `tensor=<size>`)."""

    size: int = 1
    """Tensor-parallel ranks (usually at most the GPUs of one node): each holds 1/size of every matrix."""

    @classmethod
    def from_shorthand(cls, value: Any) -> TensorConfig | None:
        if isinstance(value, int) and not isinstance(value, bool):
            return cls(size=value)
        return None

    def check(self) -> None:
        _require(self.size >= 1, "size", f"must be >= 1, got {self.size}")


@dataclass(frozen=True)
class ParallelConfig(Section):
    """`parallel = dict(...)`: world = data x pipeline x tensor; ZeRO-1 inside data parallel."""

    zero1: int = -1
    """ZeRO-1 group size: <= 0 = the whole data-parallel group; 1 = off (every rank keeps the full
    optimizer state); k > 1 = groups of k data-parallel ranks (must divide the data-parallel size).
    Larger groups save optimizer memory but spread the parameter broadcast wider (across nodes)."""
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)
    """Pipeline size (int) or dict(size=..., interleaved_overlap=...)."""
    tensor: TensorConfig = field(default_factory=TensorConfig)
    """Tensor-parallel size (int) or dict(size=...)."""
    sequence_parallel: bool = False
    """With tensor parallel, also split the norm/dropout activations along the sequence (the packed
    row's tokens; data.seq_len must divide by the tensor size). With tensor size 1: a warning."""

    @classmethod
    def prepare_raw(cls, raw: dict[str, Any]) -> dict[str, Any]:
        if "zero1" in raw:
            raw["zero1"] = _zero1_size(raw["zero1"])
        return raw


def _zero1_size(value: Any) -> Any:
    """InternEvo's spelling zero1=dict(size=k, fsdp=False) -> k; anything else is left to the type check."""
    if isinstance(value, Mapping):
        unknown = set(value) - {"size", "fsdp"}
        if unknown:
            raise ConfigError(
                f"unknown key{did_you_mean(sorted(unknown)[0], ('size', 'fsdp'))}",
                key=f"zero1.{sorted(unknown)[0]}",
            )
        if value.get("fsdp", False) is not False:
            raise ConfigError("FSDP is not supported; use zero1=<size>", key="zero1.fsdp")
        return value.get("size", -1)
    return value


@dataclass(frozen=True)
class LoadCkptInfo(Section):
    """`ckpt = dict(load_ckpt_info=dict(...))`: which checkpoint to start from and what to take from it."""

    path: str
    """Checkpoint folder: "local:<path>", "boto3:s3://<bucket>/<prefix>" or a plain path."""
    content: tuple[str, ...] = ("all",)
    """What to load: ("all",) or some of "model", "sampler", "optimizer", "scheduler"."""
    ckpt_type: str = "internlm"
    """Checkpoint format: "internlm" (this project's layout, or InternLM's model_tp*_pp*.pt folder),
    "hf_llama" (Hugging Face Llama folder) or "llama" (Meta's consolidated.*.pth); the last two and
    InternLM's folders hold weights only (content=("model",))."""

    def check(self) -> None:
        check_storage_folder(self.path, "path")
        _require(len(self.content) >= 1, "content", "must name at least one of " + ", ".join(LOAD_CONTENTS))
        for item in self.content:
            _require(item in LOAD_CONTENTS, "content", f"{item!r} is not one of " + ", ".join(LOAD_CONTENTS))
        _require(
            "all" not in self.content or len(self.content) == 1,
            "content",
            "'all' cannot be combined with other parts",
        )
        _require(self.ckpt_type in CKPT_TYPES, "ckpt_type", f"{self.ckpt_type!r} is not one of {CKPT_TYPES}")


@dataclass(frozen=True)
class CkptConfig(Section):
    """`ckpt = dict(...)`: saving, snapshots, resuming."""

    enable_save_ckpt: bool | None = None
    """Save checkpoints every checkpoint_every steps (and at the end). Default: True when
    save_ckpt_folder is given (InternLM's default is True; InternLM refuses it without a folder, here
    nothing is saved then)."""
    save_ckpt_folder: str | None = None
    """Where checkpoints go: "local:<path>", "boto3:s3://<bucket>/<prefix>" or a plain path."""
    load_ckpt_folder: str | None = None
    """Resume from this checkpoint: weights, optimizer (if load_optimizer), sampler, scheduler, context.
    InternLM's older key: not used when load_ckpt_info is given or auto_resume is on (a warning says
    so)."""
    load_model_only_folder: str | None = None
    """Start from these weights only (fresh optimizer, data and schedule). Older key, as
    load_ckpt_folder."""
    load_optimizer: bool = True
    """When resuming from load_ckpt_folder, also load the optimizer states."""
    checkpoint_every: int | None = None
    """Steps between checkpoints; default: data.total_steps. Frequent saves lose less work on a crash
    but cost I/O time (less with async_upload)."""
    async_upload: bool = False
    """Write checkpoints to async_upload_tmp_folder and let the uploader copy them to save_ckpt_folder
    (S3 or a local folder) in the background: training waits only for the copy into memory.
    (InternLM does this for boto3 folders only.)"""
    async_upload_tmp_folder: str | None = "/dev/shm/internlm_tmp_ckpt/"
    """Local staging folder of async uploads (RAM disk by default: needs room for one checkpoint).
    It must belong to the user and be writable by no one else (created 0700). InternLM's default,
    shared by every user of a node, stages in /dev/shm/internlm_tmp_ckpt-<uid>/ instead (unless a
    standalone uploader is configured, which serves the folder exactly as written)."""
    snapshot_ckpt_folder: str | None = None
    """Folder of the two alternating snapshot checkpoints; default: save_ckpt_folder + "/snapshot"."""
    oss_snapshot_freq: int | None = None
    """Steps between snapshots (cheap, overwritten in turn); 0 = none. Default: none, as InternLM's."""
    stop_file_path: str | None = None
    """A file polled during training: a step number written in it makes the run save and stop there."""
    auto_resume: bool | None = None
    """Resume from the latest complete checkpoint in save_ckpt_folder (snapshots included), or start
    from scratch when there is none; load_ckpt_info / load_ckpt_folder are then not used (InternLM's
    rule; a warning names them). Default: True (InternLM's), or `not load_given_ckpt` when that older
    key is given. Set False to start from load_ckpt_info."""
    load_given_ckpt: bool | None = None
    """InternLM's older switch: True = load the given checkpoint (auto_resume False)."""
    load_ckpt_info: LoadCkptInfo | None = None
    """dict(path=..., content=("all",) | subset of model/sampler/optimizer/scheduler, ckpt_type="internlm");
    the newer InternLM form of load_ckpt_folder / load_model_only_folder, which it overrides. Used
    only with auto_resume=False."""

    def derived_fields(self) -> dict[str, Any]:
        derived: dict[str, Any] = {}
        if self.snapshot_ckpt_folder is None and self.save_ckpt_folder is not None:
            derived["snapshot_ckpt_folder"] = self.save_ckpt_folder.rstrip("/") + "/snapshot"
        if self.enable_save_ckpt is None:
            derived["enable_save_ckpt"] = self.save_ckpt_folder is not None
        if self.auto_resume is None:
            derived["auto_resume"] = True if self.load_given_ckpt is None else not self.load_given_ckpt
        return derived

    def check(self) -> None:
        for name in (
            "save_ckpt_folder",
            "load_ckpt_folder",
            "load_model_only_folder",
            "snapshot_ckpt_folder",
        ):
            check_storage_folder(getattr(self, name), name)
        if self.enable_save_ckpt:
            _require(
                self.save_ckpt_folder is not None, "save_ckpt_folder", "required when enable_save_ckpt=True"
            )
        _require(
            self.load_ckpt_folder is None or self.load_model_only_folder is None,
            "load_model_only_folder",
            "cannot be set together with load_ckpt_folder (choose resume or weights-only start)",
        )
        if self.checkpoint_every is not None:
            _require(
                self.checkpoint_every >= 1, "checkpoint_every", f"must be >= 1, got {self.checkpoint_every}"
            )
        if self.oss_snapshot_freq is not None:
            _require(
                self.oss_snapshot_freq >= 0,
                "oss_snapshot_freq",
                f"must be >= 0, got {self.oss_snapshot_freq}",
            )

    @property
    def load_info(self) -> LoadCkptInfo | None:
        """What to load at start besides auto_resume's latest checkpoint, whichever way the config
        said it (None = start from scratch). InternLM's rules: auto_resume wins over every other
        key; load_ckpt_info over load_ckpt_folder / load_model_only_folder."""
        if self.auto_resume:
            return None
        if self.load_ckpt_info is not None:
            return self.load_ckpt_info
        if self.load_ckpt_folder is not None:
            if self.load_optimizer:
                return LoadCkptInfo(path=self.load_ckpt_folder, content=("all",))
            return LoadCkptInfo(path=self.load_ckpt_folder, content=("model", "sampler", "scheduler"))
        if self.load_model_only_folder is not None:
            return LoadCkptInfo(path=self.load_model_only_folder, content=("model",))
        return None


@dataclass(frozen=True)
class MetricsConfig(Section):
    """`metrics = dict(...)` (ours): where metrics go besides runs/<JOB_NAME>/metrics.jsonl."""

    mlflow_tracking_uri: str | None = None
    """MLflow tracking server URI; None = no MLflow."""
    experiment: str | None = None
    """MLflow experiment name; default chosen by the metrics service."""


@dataclass(frozen=True)
class UploaderConfig(Section):
    """`uploader = dict(...)` (ours): the checkpoint uploader service."""

    address: str | None = None
    """ZeroMQ endpoint of a running ckpt-uploader ("tcp://host:port" or "host:port"); None = with
    ckpt.async_upload the trainer starts a private uploader itself."""
    server_public_key: str | None = None
    """CURVE: the uploader's public key (its server.key file from `ckpt-uploader keygen`, or the
    40-character Z85 key itself); switches encryption and authentication on. Needs address."""
    client_secret_key_file: str | None = None
    """CURVE: this trainer's key pair file (client.key_secret from keygen; never the key itself in
    the config, which is copied into every checkpoint). Default: a fresh key pair per start, which an
    uploader accepts only when its authorized/ folder is empty."""
    spool: str | None = None
    """The uploader's spool folder, where the trainer writes checkpoints for it; default:
    ckpt.async_upload_tmp_folder. A standalone uploader must be serving this same folder."""
    spool_quota_gb: float | None = None
    """Room the trainer may use in the spool; default: the free space of its file system. When the
    next checkpoint does not fit, the trainer waits for the oldest upload to finish."""
    exit_wait_s: float = 3600.0
    """How long the end of a run (also a stop by SIGTERM / SIGINT, after its last checkpoint) waits
    for checkpoint uploads still in flight. What is unfinished then is reported in the log and is
    not lost: it stays in the spool and the uploader's journal, and the next uploader started on
    them (the next run's own, or a standalone one) finishes it."""

    retry_mode: str = "standard"
    """botocore's retry mode for every S3 call of the trainer and its private uploader: "standard"
    (exponential backoff with jitter) or "adaptive" (also slows down when S3 throttles)."""
    retry_attempts: int = 10
    """Attempts per S3 call, the first included (botocore backs off up to 20 s between them)."""
    outage_deadline_s: float = 86400.0
    """How long the private uploader keeps retrying a checkpoint while S3 stays unreachable or
    failing; the checkpoint waits in the spool meanwhile, training goes on. After it the upload is
    reported failed (the files stay in the spool)."""

    def check(self) -> None:
        _require(
            self.server_public_key is None or self.address is not None,
            "server_public_key",
            "needs uploader.address (CURVE protects a standalone uploader; the private one is on loopback)",
        )
        _require(
            self.client_secret_key_file is None or self.server_public_key is not None,
            "client_secret_key_file",
            "needs uploader.server_public_key",
        )
        _require(self.exit_wait_s >= 0, "exit_wait_s", f"must be >= 0 seconds, got {self.exit_wait_s}")
        _require(
            self.retry_mode in ("standard", "adaptive"),
            "retry_mode",
            f"must be 'standard' or 'adaptive', got {self.retry_mode!r}",
        )
        _require(self.retry_attempts >= 1, "retry_attempts", f"must be >= 1, got {self.retry_attempts}")
        _require(
            self.outage_deadline_s >= 0,
            "outage_deadline_s",
            f"must be >= 0 seconds, got {self.outage_deadline_s}",
        )
