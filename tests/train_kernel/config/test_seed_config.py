"""The published 7B demo config loads unmodified, and every value is the one written there."""

from __future__ import annotations

import dataclasses
import json
import textwrap
from pathlib import Path

import pytest

from train_kernel.config import TrainConfig, field_docs, load_config, sections

from .conftest import SEED_CONFIG

SEED_RST = Path("/work/shared/seeds/7B_demo.rst")


@pytest.fixture(scope="module")
def seed() -> TrainConfig:
    return load_config(SEED_CONFIG)


def test_the_file_is_the_published_code_block():
    if not SEED_RST.is_file():
        pytest.skip("the seed document is not on this machine")
    text = SEED_RST.read_text(encoding="utf-8")
    start = text.index(".. code-block:: python\n\n") + len(".. code-block:: python\n\n")
    block = textwrap.dedent(text[start : text.index("\n启动训练")]).strip("\n") + "\n"
    assert SEED_CONFIG.read_text(encoding="utf-8") == block


def test_values_match_the_published_text(seed):
    assert seed.job_name == "7b_train"
    assert seed.constants["SEQ_LEN"] == 2048 and seed.constants["MLP_RATIO"] == 8 / 3
    assert seed.constants["LOAD_CKPT_FOLDER"] == "local:llm_ckpts/49"

    ckpt = seed.ckpt
    assert ckpt.enable_save_ckpt is False
    assert ckpt.save_ckpt_folder == "local:llm_ckpts"
    assert ckpt.load_optimizer is True
    assert ckpt.checkpoint_every == 50
    assert ckpt.async_upload is True
    assert ckpt.async_upload_tmp_folder == "/dev/shm/internlm_tmp_ckpt/"
    assert ckpt.snapshot_ckpt_folder == "local:llm_ckpts/snapshot"
    assert ckpt.oss_snapshot_freq == 25

    data = seed.data
    assert (data.seq_len, data.micro_num, data.micro_bsz, data.valid_micro_num) == (2048, 4, 2, 4)
    assert (data.valid_every, data.pack_sample_into_one, data.total_steps) == (50, False, 50000)
    assert (data.skip_batches, data.rampup_batch_size, data.min_length) == ("", "", 50)

    scaler = seed.grad_scaler
    assert (scaler.fp16.initial_scale, scaler.fp16.min_scale, scaler.fp16.growth_interval) == (2**16, 1, 1000)
    assert (scaler.growth_factor, scaler.backoff_factor, scaler.max_scale, scaler.hysteresis) == (
        2,
        0.5,
        2**24,
        2,
    )

    zero = seed.hybrid_zero_optimizer
    assert (zero.overlap_sync_grad, zero.overlap_sync_param) == (True, True)
    assert (zero.reduce_bucket_size, zero.clip_grad_norm) == (512 * 1024 * 1024, 1.0)

    assert seed.loss.label_smoothing == 0
    adam = seed.adam
    assert (adam.lr, adam.adam_beta1, adam.adam_beta2, adam.adam_beta2_c) == (1e-4, 0.9, 0.95, 0)
    assert (adam.adam_eps, adam.weight_decay) == (1e-8, 0.01)
    lr = seed.lr_scheduler
    assert (lr.total_steps, lr.init_steps, lr.warmup_ratio, lr.eta_min, lr.last_epoch) == (
        50000,
        0,
        0.01,
        1e-5,
        -1,
    )
    beta2 = seed.beta2_scheduler
    assert (beta2.init_beta2, beta2.c, beta2.cur_iter) == (0.95, 0, -1)

    model = seed.model
    assert model.checkpoint is False
    assert (model.num_attention_heads, model.hidden_size, model.num_layers, model.vocab_size) == (
        32,
        4096,
        32,
        103168,
    )
    assert model.mlp_ratio == 8 / 3 and model.mlp_hidden_size == 11008
    assert (model.embed_split_hidden, model.embed_grad_scale, model.parallel_output) == (True, 1, True)
    assert (model.apply_post_layer_norm, model.dtype, model.norm_type) == (False, "torch.float16", "rmsnorm")
    assert (model.layer_norm_epsilon, model.use_flash_attn, model.num_chunks) == (1e-5, True, 1)

    parallel = seed.parallel
    assert parallel.zero1 == 8
    assert (parallel.pipeline.size, parallel.pipeline.interleaved_overlap) == (1, True)
    assert parallel.sequence_parallel is False
    assert (seed.cudnn_deterministic, seed.cudnn_benchmark) == (False, False)


def test_defaults_where_the_seed_is_silent(seed):
    assert seed.parallel.tensor.size == 1
    assert seed.model_type == "INTERNLM"
    assert (seed.data.train_folder, seed.data.valid_folder, seed.data.num_worker) == (None, None, 4)
    assert seed.data.packed_length == 4096
    assert seed.data.skip_batch_indices == () and seed.data.rampup is None
    assert seed.data.micro_num_at(0) == 4
    assert (seed.ckpt.load_ckpt_folder, seed.ckpt.load_model_only_folder, seed.ckpt.load_info) == (
        None,
        None,
        None,
    )
    # InternLM's default: auto_resume on (resume from the latest checkpoint of save_ckpt_folder).
    assert (seed.ckpt.stop_file_path, seed.ckpt.auto_resume, seed.ckpt.load_ckpt_info) == (None, True, None)
    assert seed.run_dir == "runs/7b_train" and seed.seed == 1024
    assert (seed.metrics.mlflow_tracking_uri, seed.metrics.experiment) == (None, None)
    assert (seed.uploader.address, seed.uploader.spool) == (None, None)


def test_source_is_kept_and_to_json_is_flat_and_serialisable(seed):
    assert seed.source_path == SEED_CONFIG
    assert seed.source_text == SEED_CONFIG.read_text(encoding="utf-8")
    flat = seed.to_json()
    assert json.loads(json.dumps(flat)) == flat
    assert flat["data.seq_len"] == 2048 and flat["parallel.pipeline.size"] == 1
    assert flat["model.dtype"] == "torch.float16" and flat["job_name"] == "7b_train"
    assert all(not isinstance(value, (dict, tuple)) for value in flat.values())


def test_a_file_without_sections_gets_every_default(write_config):
    config = load_config(write_config("JOB_NAME = 'tiny'\n"))
    assert config.data.seq_len == 2048 and config.data.micro_num == 1 and config.data.valid_micro_num == 1
    assert config.ckpt.checkpoint_every == config.data.total_steps == config.lr_scheduler.total_steps == 50000
    assert config.ckpt.snapshot_ckpt_folder is None and config.ckpt.oss_snapshot_freq == 0
    # InternLM's defaults: saving on when there is a folder to save to, auto_resume on, no overlap.
    assert (config.ckpt.enable_save_ckpt, config.ckpt.auto_resume) == (False, True)
    assert config.hybrid_zero_optimizer.overlap_sync_grad is False
    assert config.hybrid_zero_optimizer.overlap_sync_param is False
    assert config.hybrid_zero_optimizer.reduce_bucket_size == 512 * 1024 * 1024
    assert config.parallel.zero1 == -1 and config.parallel.pipeline.size == 1
    assert config.grad_scaler.fp16.initial_scale == 2**16 and config.grad_scaler.max_scale == 2**24
    assert config.beta2_scheduler.init_beta2 == 0.95


def test_job_name_defaults_to_the_file_stem(write_config):
    config = load_config(write_config("data = dict(seq_len=16)\n", name="small_run.py"))
    assert config.job_name == "small_run" and config.run_dir == "runs/small_run"


def test_the_file_may_compute_import_and_define_helpers(write_config):
    config = load_config(
        write_config(
            """
            import os
            from math import ceil
            _PRIVATE = 3
            STEPS = ceil(9.5)

            def double(x):
                return 2 * x

            data = dict(total_steps=double(STEPS), seq_len=int(os.environ.get("NO_SUCH_VAR_X", "64")))
            lr_scheduler = dict(total_steps=data["total_steps"])
            model = dict(dtype="torch.bfloat16")
            model_type = "INTERNLM"
            run_dir = "/tmp/somewhere"
            seed = 7
            """
        )
    )
    assert (
        config.data.total_steps == 20 and config.lr_scheduler.total_steps == 20 and config.data.seq_len == 64
    )
    assert config.model.dtype == "torch.bfloat16" and config.model.torch_dtype.itemsize == 2
    assert config.run_dir == "/tmp/somewhere" and config.seed == 7
    assert "STEPS" in config.constants and "_PRIVATE" not in config.constants


def test_internlm_spellings_are_accepted(write_config):
    config = load_config(
        write_config(
            """
            import torch
            model = dict(dtype=torch.bfloat16, checkpoint=0.5)
            parallel = dict(zero1=dict(size=2, fsdp=False), pipeline=2, tensor=dict(size=1))
            hybrid_zero_optimizer = dict(zero_overlap_communication=False)
            ckpt = dict(load_model_only_folder="boto3:s3://bucket.10.1.1.1/internlm/49", load_given_ckpt=True)
            """
        )
    )
    assert config.model.dtype == "torch.bfloat16" and config.model.checkpoint == 0.5
    assert config.parallel.zero1 == 2 and config.parallel.pipeline.size == 2
    assert config.hybrid_zero_optimizer.overlap_sync_grad is False
    assert config.ckpt.auto_resume is False  # load_given_ckpt=True, InternLM's older spelling
    assert config.ckpt.load_info.content == ("model",)


def test_skip_batches_and_rampup_are_parsed(write_config):
    config = load_config(
        write_config('data = dict(micro_num=7, skip_batches="8, 3,5-6,3", rampup_batch_size="1 2 10")')
    )
    assert config.data.skip_batch_indices == (3, 5, 6, 8)
    assert config.data.skips(5) and not config.data.skips(4)
    assert [config.data.micro_num_at(step) for step in (0, 9, 10, 25, 30, 1000)] == [1, 1, 3, 5, 7, 7]
    assert config.data.rampup.ramp_steps(7) == 30


def test_every_field_has_a_docstring():
    classes = [TrainConfig] + [
        value
        for value in vars(sections).values()
        if isinstance(value, type) and dataclasses.is_dataclass(value) and issubclass(value, sections.Section)
    ]
    assert len(classes) > 10
    for cls in classes:
        docs = field_docs(cls)
        missing = [f.name for f in dataclasses.fields(cls) if not docs.get(f.name)]
        assert not missing, f"{cls.__name__}: no docstring for {missing}"
