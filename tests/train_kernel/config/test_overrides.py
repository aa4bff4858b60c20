"""`--set key=value` overrides: applied as if the file had been edited, unknown keys refused."""

from __future__ import annotations

import pytest

from train_kernel.config import ConfigError, load_config

from .conftest import SEED_CONFIG


def test_overrides_reach_the_values_the_file_derives_from_them():
    config = load_config(SEED_CONFIG, ["data.total_steps=100", "SEQ_LEN=4096", "JOB_NAME=x"])
    assert config.data.total_steps == 100
    assert config.lr_scheduler.total_steps == 100  # the file computes it from data["total_steps"]
    assert config.data.seq_len == 4096 and config.data.packed_length == 8192  # seq_len=SEQ_LEN
    assert config.job_name == "x" and config.run_dir == "runs/x"
    assert config.ckpt.checkpoint_every == 50  # untouched values stay


def test_values_are_python_literals_or_raw_strings():
    config = load_config(
        SEED_CONFIG,
        [
            "model.dtype=torch.bfloat16",  # not a literal: the raw string
            "model.checkpoint=True",
            "model.mlp_ratio=3",  # an int where a float is fine
            "adam.lr=3e-4",
            "data.skip_batches=3,5-8",
            "data.rampup_batch_size=1 1 2",
            "SAVE_CKPT_FOLDER='local:/tmp/ck'",  # the file derives save and snapshot folders from it
            "ckpt.load_ckpt_folder=None",
            "seed=7",
            "cudnn_deterministic=True",
        ],
    )
    assert config.model.dtype == "torch.bfloat16" and config.model.checkpoint is True
    assert config.model.mlp_ratio == 3.0 and config.adam.lr == 3e-4
    assert config.data.skip_batch_indices == (3, 5, 6, 7, 8)
    assert [config.data.micro_num_at(step) for step in range(8)] == [1, 1, 2, 2, 3, 3, 4, 4]
    assert (
        config.ckpt.save_ckpt_folder == "local:/tmp/ck"
        and config.ckpt.snapshot_ckpt_folder == "local:/tmp/ck/snapshot"
    )
    assert config.ckpt.load_ckpt_folder is None
    assert config.seed == 7 and config.cudnn_deterministic is True


def test_a_string_key_keeps_a_value_that_looks_like_a_tuple():
    assert load_config(SEED_CONFIG, ["data.skip_batches=3,5"]).data.skip_batch_indices == (3, 5)


def test_nested_keys_and_sections_the_file_does_not_write():
    config = load_config(
        SEED_CONFIG,
        [
            "parallel.pipeline.size=2",
            "parallel.tensor.size=1",
            "grad_scaler.fp16.initial_scale=1024",
            "metrics.experiment=demo",
            "uploader.address=127.0.0.1:7000",
            "ckpt.load_ckpt_info={'path': 'local:/ck/10', 'content': ['model']}",
            "ckpt.auto_resume=False",  # with InternLM's default True, load_ckpt_info is not used
        ],
    )
    assert config.parallel.pipeline.size == 2 and config.parallel.pipeline.interleaved_overlap is True
    assert config.grad_scaler.fp16.initial_scale == 1024 and config.grad_scaler.fp16.growth_interval == 1000
    assert config.metrics.experiment == "demo" and config.uploader.address == "127.0.0.1:7000"
    assert config.ckpt.load_info.path == "local:/ck/10" and config.ckpt.load_info.content == ("model",)


def test_the_override_wins_over_a_later_edit_in_the_file(write_config):
    path = write_config("data = dict(seq_len=8)\ndata['seq_len'] = 16\nparallel = dict(pipeline=1)\n")
    config = load_config(path, ["data.seq_len=32", "parallel.pipeline.size=1"])
    assert config.data.seq_len == 32


def test_the_file_is_left_unchanged():
    before = SEED_CONFIG.read_text(encoding="utf-8")
    load_config(SEED_CONFIG, ["data.total_steps=100"])
    assert SEED_CONFIG.read_text(encoding="utf-8") == before


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("data.sq_len=3", "override 'data.sq_len=3': data.sq_len: unknown key; did you mean seq_len?"),
        ("dta.seq_len=3", "override 'dta.seq_len=3': dta: unknown key; did you mean data?"),
        ("parallel.pipeline.sise=2", "parallel.pipeline.sise: unknown key; did you mean size?"),
        ("data.seq_len.x=1", "data.seq_len.x: data.seq_len is a value, not a section"),
        ("SEQ_LNE=3", "SEQ_LNE: the file defines no constant SEQ_LNE; did you mean SEQ_LEN?"),
        ("SEQ_LEN.x=3", "SEQ_LEN.x: an UPPERCASE constant has no sub-keys"),
        ("data.total_steps", "override 'data.total_steps': expected key=value"),
        ("=3", "expected key=value"),
        ("data..seq_len=3", "empty part in the dotted key"),
        ("data.total_steps=abc", "data.total_steps: expected int, got str 'abc'"),
        ("data.total_steps=0", "data.total_steps: must be >= 1"),
        ("model.dtype=torch.int4", "model.dtype: 'torch.int4' is not supported"),
        ("cudnn_benchmark=1", "cudnn_benchmark: expected True or False, got int 1"),
    ],
)
def test_bad_overrides_name_file_and_key(override, message):
    with pytest.raises(ConfigError) as caught:
        load_config(SEED_CONFIG, [override])
    text = str(caught.value)
    assert text.startswith(str(SEED_CONFIG)), text
    assert message in text, text


def test_an_override_into_a_value_that_is_not_a_dict(write_config):
    path = write_config("data = 'x'\n")
    with pytest.raises(
        ConfigError, match=r"data.seq_len: cannot set it: data is str in the file, not a dict"
    ):
        load_config(path, ["data.seq_len=8"])
