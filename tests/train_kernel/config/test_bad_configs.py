"""Every bad config is refused with one ConfigError naming the file, the dotted key and what is wrong."""

from __future__ import annotations

import dataclasses
import logging

import pytest

from train_kernel.config import (
    CkptConfig,
    ConfigError,
    DataConfig,
    HybridZeroOptimizerConfig,
    ModelConfig,
    ParallelConfig,
    TrainConfig,
    load_config,
)

INTERLEAVED = (
    "model = dict(num_layers=4, num_chunks=2)\n"
    "parallel = dict(pipeline=dict(size=2, interleaved_overlap=True))"
)
CASES = [
    # (config text, dotted key, words of the message)
    ("dat = dict(seq_len=8)", "dat", "unknown key; did you mean data?"),
    ("lr_schedular = dict()", "lr_schedular", "did you mean lr_scheduler?"),
    ("Seq_Len = 3", "Seq_Len", "unknown key"),
    ("data = dict(sq_len=1)", "data.sq_len", "unknown key; did you mean seq_len?"),
    ("model = dict(hidden=64)", "model.hidden", "did you mean hidden_size?"),
    ("parallel = dict(pipeline=dict(sise=2))", "parallel.pipeline.sise", "did you mean size?"),
    (
        "grad_scaler = dict(fp16=dict(initial_scal=8))",
        "grad_scaler.fp16.initial_scal",
        "did you mean initial_scale?",
    ),
    ("data = dict(seq_len=True)", "data.seq_len", "expected int, got bool True"),
    ("data = dict(seq_len=1.5)", "data.seq_len", "expected int, got float 1.5"),
    ("data = dict(micro_num='4')", "data.micro_num", "expected int, got str '4'"),
    ("data = dict(pack_sample_into_one=1)", "data.pack_sample_into_one", "expected True or False"),
    ("adam = dict(lr='1e-4')", "adam.lr", "expected float (or int), got str"),
    ("data = [1, 2]", "data", "expected dict("),
    ("data = dict(seq_len=0)", "data.seq_len", "must be >= 1, got 0"),
    ("data = dict(micro_num=0)", "data.micro_num", "must be >= 1"),
    ("model = dict(dtype='torch.int8')", "model.dtype", "'torch.int8' is not supported"),
    ("model = dict(dtype=16)", "model.dtype", "expected str"),
    (
        "model = dict(hidden_size=100, num_attention_heads=3)",
        "model.num_attention_heads",
        "do not divide hidden_size 100",
    ),
    ("model = dict(norm_type='batchnorm')", "model.norm_type", "'batchnorm' is not one of"),
    ("model = dict(checkpoint=1.5)", "model.checkpoint", "fraction of layers in [0, 1]"),
    ("model = dict(checkpoint='yes')", "model.checkpoint", "expected bool or float"),
    ("model = dict(num_chunks=0)", "model.num_chunks", "must be >= 1"),
    ("model = dict(num_layers=6, num_chunks=4)", "model.num_chunks", "4 chunks do not divide num_layers 6"),
    ("model = dict(num_chunks=2)", "parallel.pipeline.interleaved_overlap", "must be True"),
    (
        f"{INTERLEAVED}\ndata = dict(micro_num=3)",
        "data.micro_num",
        "3 with model.num_chunks 2: the interleaved schedule needs a multiple of the pipeline size 2",
    ),
    (
        f"{INTERLEAVED}\ndata = dict(micro_num=4, rampup_batch_size='1 1 2')",
        "data.rampup_batch_size",
        "'1 1 2': a ramp-up step of 1 with model.num_chunks 2: the interleaved schedule needs a multiple",
    ),
    ("lr_scheduler = dict(warmup_ratio=1.5)", "lr_scheduler.warmup_ratio", "must be in [0, 1]"),
    ("adam = dict(adam_beta2=1.0)", "adam.adam_beta2", "must be in [0, 1)"),
    ("beta2_scheduler = dict(init_beta2=-0.1)", "beta2_scheduler.init_beta2", "must be in [0, 1)"),
    ("parallel = dict(zero1=2.0)", "parallel.zero1", "expected int"),
    ("parallel = dict(zero1=True)", "parallel.zero1", "expected int, got bool"),
    ("parallel = dict(pipeline=0)", "parallel.pipeline.size", "must be >= 1, got 0"),
    ("parallel = dict(tensor='2')", "parallel.tensor", "expected an int or dict(size), got str '2'"),
    ("parallel = dict(zero1=dict(size=2, fsdp=True))", "parallel.zero1.fsdp", "FSDP is not supported"),
    (
        "model = dict(num_layers=2)\nparallel = dict(pipeline=4)",
        "parallel.pipeline.size",
        "more than num_layers 2",
    ),
    ("data = dict(skip_batches='3,x')", "data.skip_batches", "cannot read 'x'"),
    ("data = dict(skip_batches='3,,5')", "data.skip_batches", "cannot read ''"),
    ("data = dict(skip_batches='8-5')", "data.skip_batches", "ends before it starts"),
    ("data = dict(skip_batches='0-100000000')", "data.skip_batches", "skips more than"),
    ("data = dict(skip_batches=[3, 5])", "data.skip_batches", "expected str"),
    (
        "data = dict(micro_num=4, rampup_batch_size='1 2')",
        "data.rampup_batch_size",
        "expected three integers",
    ),
    (
        "data = dict(micro_num=4, rampup_batch_size='a b c')",
        "data.rampup_batch_size",
        "expected three integers",
    ),
    ("data = dict(micro_num=4, rampup_batch_size='0 1 1')", "data.rampup_batch_size", "must be >= 1"),
    ("data = dict(micro_num=4, rampup_batch_size='8 1 1')", "data.rampup_batch_size", "above micro_num 4"),
    (
        "data = dict(micro_num=4, rampup_batch_size='2 3 10')",
        "data.rampup_batch_size",
        "not a multiple of bsz_incre 3",
    ),
    # Storage URIs: the uploader's parser (ckpt_uploader.uri) and its words, under the config's key.
    (
        "ckpt = dict(load_ckpt_folder='oss2:bucket/x')",
        "ckpt.load_ckpt_folder",
        "'oss2:bucket/x': unknown scheme",
    ),
    (
        "ckpt = dict(save_ckpt_folder='boto3:bucket/x')",
        "ckpt.save_ckpt_folder",
        "expected 's3://bucket/prefix'",
    ),
    ("ckpt = dict(save_ckpt_folder='local:')", "ckpt.save_ckpt_folder", "no folder after 'local:'"),
    (
        "ckpt = dict(save_ckpt_folder='s3://bk/x/../y')",
        "ckpt.save_ckpt_folder",
        "may not hold empty, '.' or '..'",
    ),
    ("ckpt = dict(snapshot_ckpt_folder='')", "ckpt.snapshot_ckpt_folder", "empty storage URI"),
    (
        "ckpt = dict(load_ckpt_info=dict(path='boto3:s3://Bad_Bucket!/x'))",
        "ckpt.load_ckpt_info.path",
        "is not a valid bucket name",
    ),
    ("ckpt = dict(enable_save_ckpt=True)", "ckpt.save_ckpt_folder", "required when enable_save_ckpt=True"),
    (
        "ckpt = dict(load_ckpt_folder='a', load_model_only_folder='b')",
        "ckpt.load_model_only_folder",
        "cannot be set",
    ),
    ("ckpt = dict(checkpoint_every=0)", "ckpt.checkpoint_every", "must be >= 1"),
    (
        "ckpt = dict(load_ckpt_info=dict(path='local:a', content=('all', 'model')))",
        "ckpt.load_ckpt_info.content",
        "'all' cannot",
    ),
    (
        "ckpt = dict(load_ckpt_info=dict(path='local:a', content=('weights',)))",
        "ckpt.load_ckpt_info.content",
        "'weights'",
    ),
    (
        "ckpt = dict(load_ckpt_info=dict(path='local:a', ckpt_type='hf'))",
        "ckpt.load_ckpt_info.ckpt_type",
        "'hf'",
    ),
    (
        "ckpt = dict(load_ckpt_info=dict(content=('model',)))",
        "ckpt.load_ckpt_info.path",
        "required, but not given",
    ),
    ("model_type = 'LLAMA'", "model_type", "'LLAMA' is not one of"),
    ("JOB_NAME = 3", "JOB_NAME", "expected a string"),
    ("JOB_NAME = 'a/b'", "JOB_NAME", "must not contain '/'"),
    ("metrics = dict(mlflow_uri='http://x')", "metrics.mlflow_uri", "did you mean mlflow_tracking_uri?"),
    ("grad_scaler = dict(backoff_factor=2)", "grad_scaler.backoff_factor", "must be in (0, 1)"),
    ("loss = dict(label_smoothing=1)", "loss.label_smoothing", "must be in [0, 1)"),
]


@pytest.mark.parametrize(
    ("text", "key", "words"), CASES, ids=[case[1] + ":" + case[2][:20] for case in CASES]
)
def test_bad_config_names_file_and_key(write_config, text, key, words):
    path = write_config(text + "\n", name="bad.py")
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    message = str(caught.value)
    assert message.startswith(f"{path}: {key}: "), message
    assert words in message, message
    assert caught.value.key == key and caught.value.source == str(path)


def test_a_crashing_file_names_the_line(write_config):
    path = write_config("data = dict()\nSTEPS = 10\nX = STEPS / 0\n", name="crash.py")
    with pytest.raises(ConfigError, match=r"crash\.py:3: ZeroDivisionError: division by zero"):
        load_config(path)


def test_a_crash_inside_a_helper_names_the_line_of_the_helper(write_config):
    path = write_config("def f():\n    return {}['x']\n\ndata = f()\n", name="crash.py")
    with pytest.raises(ConfigError, match=r"crash\.py:2: KeyError: 'x'"):
        load_config(path)


def test_a_syntax_error_names_the_line(write_config):
    path = write_config("data = dict(\nseq_len=8,\n", name="broken.py")
    with pytest.raises(ConfigError, match=r"broken\.py:1: syntax error"):
        load_config(path)


def test_a_missing_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match=r"nope\.py: no such config file"):
        load_config(tmp_path / "nope.py")


def test_sections_built_in_code_are_checked_too():
    with pytest.raises(ConfigError, match=r"^seq_len: must be >= 1"):
        DataConfig(seq_len=0)
    with pytest.raises(ConfigError, match=r"^micro_bsz: expected int, got bool"):
        DataConfig(micro_bsz=True)
    assert ParallelConfig(pipeline=2, tensor=1).pipeline.size == 2
    assert DataConfig(diag_outlier_ratio=2).diag_outlier_ratio == 2.0


def test_sections_built_in_code_are_made_with_their_derived_values():
    # Alternative spellings and defaults that depend on other fields are computed before the frozen
    # section is made, in code and in dataclasses.replace as from a file.
    assert ParallelConfig(zero1=dict(size=2)).zero1 == 2
    assert HybridZeroOptimizerConfig(zero_overlap_communication=False).overlap_sync_grad is False
    data = DataConfig(seq_len=8, micro_bsz=2, micro_num=3, train_folder="packed")
    assert (data.packed_length, data.valid_micro_num, data.valid_folder) == (16, 3, "packed")
    assert dataclasses.replace(data, micro_bsz=4).packed_length == 32
    ckpt = CkptConfig(save_ckpt_folder="local:/c/")
    assert ckpt.snapshot_ckpt_folder == "local:/c/snapshot"
    with pytest.raises(ConfigError, match=r"^skip_batches: '3-1': range '3-1' ends before it starts"):
        DataConfig(skip_batches="3-1")
    with pytest.raises(ConfigError, match=r"^sq_len: unknown key; did you mean seq_len\?"):
        DataConfig(sq_len=8)
    with pytest.raises(ConfigError, match="^model.num_attention_heads: 3 heads do not divide hidden_size 64"):
        TrainConfig(model=ModelConfig(hidden_size=64, num_attention_heads=3))


def test_the_model_and_the_schedule_use_the_configs_rules():
    from train_kernel.model import InternLM
    from train_kernel.parallel.interleaved_schedule import check_interleaved

    with pytest.raises(ConfigError) as caught:
        InternLM(ModelConfig(hidden_size=64, num_attention_heads=3, vocab_size=16), device="meta")
    assert caught.value.key == "model.num_attention_heads" and "do not divide hidden_size 64" in str(
        caught.value
    )
    with pytest.raises(ConfigError) as caught:
        InternLM(ModelConfig(hidden_size=64, num_attention_heads=4, norm_type="batchnorm"), device="meta")
    assert caught.value.key == "model.norm_type"
    with pytest.raises(ConfigError) as caught:
        check_interleaved(2, 2, 3)
    assert caught.value.key == "data.micro_num"


def test_lr_schedule_shorter_than_the_run_is_allowed_with_a_warning(write_config, caplog):
    path = write_config("data = dict(total_steps=100)\nlr_scheduler = dict(total_steps=80)\n", name="warn.py")
    with caplog.at_level(logging.WARNING, logger="train_kernel.config.train_config"):
        config = load_config(path)
    assert config.lr_scheduler.total_steps == 80
    assert "warn.py: lr_scheduler.total_steps = 80 differs from data.total_steps = 100" in caplog.text


def test_every_storage_uri_the_uploader_accepts_is_a_valid_folder(write_config):
    from ckpt_uploader.uri import parse_storage_uri

    for uri in (
        "s3://bucket/prefix",
        "boto3:s3://bucket/prefix",
        "boto3:s3://ckpts.10.1.2.3:9000/p",
        "local:x",
        "/x",
    ):
        parse_storage_uri(uri)  # the uploader takes it...
        path = write_config(
            f"ckpt = dict(enable_save_ckpt=True, save_ckpt_folder={uri!r}, async_upload=True)\n"
        )
        assert load_config(path).ckpt.save_ckpt_folder == uri  # ...and so does the config
    assert load_config(path).ckpt.snapshot_ckpt_folder == "/x/snapshot"


def test_async_upload_to_a_local_folder_is_accepted_quietly(write_config, caplog):
    # The uploader copies to local folders too (unlike InternLM, which saves them synchronously).
    path = write_config(
        "ckpt = dict(enable_save_ckpt=True, save_ckpt_folder='local:/x', async_upload=True)\n"
    )
    with caplog.at_level(logging.WARNING, logger="train_kernel.config.train_config"):
        config = load_config(path)
    assert config.ckpt.async_upload is True
    assert "async_upload" not in caplog.text
