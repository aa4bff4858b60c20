"""Every released InternLM configs/7B_sft.py loads unmodified and plans the seed's 7B model; InternLM's
defaults and checkpoint-loading rules; keys accepted without effect are warned about by name; keys
that would be silently wrong are errors naming the key."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from click.testing import CliRunner

from pack_stage.pack import PackConfig, pack
from tests.pack_stage.pack_fixtures import write_token_folder
from train_kernel.cli import main
from train_kernel.config import ConfigError, config_from_text, load_config
from train_kernel.plan import make_plan

from .conftest import SEED_CONFIG

# The seed (configs/7B_sft.py) is InternLM's 54f85a6 (v0.2.0) byte for byte: it stands for that version.
RELEASED = sorted([*(Path(__file__).parent / "internlm_configs").glob("7B_sft_*.py"), SEED_CONFIG])
SEED_PARAMETERS = 7_321_948_160
NEWEST = RELEASED[-1]


def test_every_distinct_version_is_here():
    commits = {path.stem.rsplit("_", 1)[1] for path in RELEASED if path != SEED_CONFIG}
    assert commits | {"54f85a6"} == {
        "fa7337b",
        "6b6295a",
        "54f85a6",
        "f6e007f",
        "7c99e01",
        "1ee31ff",
        "e354410",
    } | {
        "eba2b85",
        "5539f9d",
    }
    assert len(RELEASED) == 9 and RELEASED[-1].name.endswith("_5539f9d.py")


@pytest.mark.parametrize("path", RELEASED, ids=lambda p: p.stem)
def test_released_config_loads_and_plans_the_7b_model(path):
    config = load_config(path)
    assert config.job_name == "7b_train" and config.model.hidden_size == 4096
    assert make_plan(config).parameters == SEED_PARAMETERS


def test_plan_cli_on_the_seed_prints_the_parameter_count():
    result = CliRunner().invoke(main, ["plan", "--config", str(SEED_CONFIG)])
    assert result.exit_code == 0, result.output
    assert "7,321,948,160" in result.output


def test_newest_release_keys(caplog):
    with caplog.at_level(logging.WARNING, logger="train_kernel.config"):
        config = load_config(NEWEST)
    assert config.monitor.alert.enable_feishu_alert is False
    assert config.monitor.alert.alert_file_path == "llm_alter/7b_train_alert.log"
    assert config.monitor.tensorboard.queue_max_length == 10
    assert config.data.rampup_batch_size == "" and config.data.rampup is None
    assert config.parallel.zero1 == 8 and config.parallel.tensor.size == 1
    assert (config.data.empty_cache_and_diag_interval, config.data.diag_outlier_ratio) == (200, 1.1)
    ckpt = config.ckpt
    assert ckpt.load_ckpt_folder == "local:llm_ckpts/"
    assert ckpt.load_ckpt_info.path == "local:llm_ckpts/xxxx" and ckpt.load_ckpt_info.content == ("model",)
    # InternLM's rule: auto_resume=True resumes from save_ckpt_folder only; load_ckpt_info is not used.
    assert ckpt.auto_resume is True and ckpt.load_info is None
    text = caplog.text
    assert "monitor.alert" not in text  # sent (health/alerts.py): the alert file here
    assert "monitor.tensorboard: there is no TensorBoard writer" in text
    assert "ckpt.load_ckpt_info, ckpt.load_ckpt_folder: not used, ckpt.auto_resume is True (given)" in text


def test_rampup_none_of_the_november_release():
    config = load_config(next(p for p in RELEASED if "eba2b85" in p.name))
    assert config.data.rampup is None and config.data.micro_num_at(100) == 4


# -- InternLM's defaults --------------------------------------------------------------------------


def test_internlm_defaults_where_keys_are_missing():
    config = config_from_text("ckpt = dict(save_ckpt_folder='local:/tmp/x')\n")
    assert config.ckpt.enable_save_ckpt is True  # InternLM: saving on by default
    assert config.ckpt.auto_resume is True
    assert config.ckpt.oss_snapshot_freq == 0  # no snapshots unless asked
    assert config.ckpt.checkpoint_every == config.data.total_steps
    assert config.ckpt.async_upload is False
    zero = config.hybrid_zero_optimizer
    assert (zero.overlap_sync_grad, zero.overlap_sync_param) == (False, False)
    assert config.parallel.pipeline.interleaved_overlap is False and config.parallel.zero1 == -1
    assert (config.data.min_length, config.data.valid_every, config.data.micro_num) == (0, 0, 1)
    assert config.monitor.tensorboard.queue_max_length == 1
    assert config.monitor.alert.enable_feishu_alert is False
    assert config_from_text("").ckpt.enable_save_ckpt is False  # nowhere to save


@pytest.mark.parametrize(
    ("ckpt", "path", "content"),
    [
        ("auto_resume=False, load_ckpt_folder='local:/a'", "local:/a", ("all",)),
        ("auto_resume=False, load_ckpt_folder='local:/a', load_optimizer=False", "local:/a", None),
        ("auto_resume=False, load_model_only_folder='local:/m'", "local:/m", ("model",)),
        (
            "auto_resume=False, load_ckpt_folder='local:/a', "
            "load_ckpt_info=dict(path='local:/i', content=('model',), ckpt_type='internlm')",
            "local:/i",
            ("model",),
        ),
        ("load_given_ckpt=True, load_ckpt_folder='local:/a'", "local:/a", ("all",)),
        ("load_ckpt_folder='local:/a'", None, None),  # auto_resume (default) wins
        ("load_given_ckpt=False, load_ckpt_folder='local:/a'", None, None),
        ("auto_resume=True, load_ckpt_info=dict(path='local:/i', content=('model',))", None, None),
    ],
)
def test_what_a_start_loads_follows_internlm(ckpt, path, content):
    info = config_from_text(f"ckpt = dict({ckpt})\n").ckpt.load_info
    if path is None:
        assert info is None
    else:
        assert info.path == path
        if content is not None:
            assert info.content == content


# -- accepted keys without effect: a warning naming each ------------------------------------------


@pytest.mark.parametrize(
    ("text", "named"),
    [
        (
            "monitor = dict(alert=dict(enable_feishu_alert=False, feishu_alert_address='https://x'))",
            "monitor.alert.feishu_alert_address: not used, enable_feishu_alert is False",
        ),
        ("monitor = dict(alert=dict(enable_feishu_alert=True))", "no feishu_alert_address"),
        ("monitor = dict(tensorboard=dict(queue_max_length=4))", "monitor.tensorboard"),
        (
            "alert_address = 'https://a'\n"
            "monitor = dict(alert=dict(enable_feishu_alert=True, feishu_alert_address='https://x'))",
            "alert_address='https://a': not used",
        ),
        ("metric_dtype = 'bf16'", "metric_dtype='bf16'"),
        ("grad_profiling = dict(grad_norm_profiling=True, layers=['embedding'])", "grad_profiling"),
        ("data = dict(num_worker=4)", "data.num_worker=4"),
        (
            "data = dict(fixed_random_dataset_seqlen=False, train_folder='/no/such/pack')",
            "data.fixed_random_dataset_seqlen=False: no effect",
        ),
        ("parallel = dict(sequence_parallel=True)", "parallel.sequence_parallel=True"),
        ("model = dict(embed_split_hidden=True)", "model.embed_split_hidden=True"),
        ("model = dict(parallel_output=False)", "model.parallel_output=False"),
        ("parallel = dict(pipeline=dict(size=1, interleaved_overlap=True))", "interleaved_overlap=True"),
        (
            "ckpt = dict(auto_resume=False, load_ckpt_folder='local:/a', "
            "load_ckpt_info=dict(path='local:/b', content=('model',)))",
            "ckpt.load_ckpt_folder: not used, ckpt.load_ckpt_info is given",
        ),
        (
            "ckpt = dict(load_ckpt_folder='local:/a')",
            "ckpt.load_ckpt_folder: not used, ckpt.auto_resume is True",
        ),
        (
            "ckpt = dict(auto_resume=False, load_optimizer=False, load_ckpt_info=dict(path='local:/b'))",
            "ckpt.load_optimizer=False: not used",
        ),
    ],
)
def test_key_without_effect_is_warned_by_name(caplog, text, named):
    with caplog.at_level(logging.WARNING, logger="train_kernel.config"):
        config_from_text(text + "\n", source="cfg.py")
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(message.startswith("cfg.py: ") and named in message for message in warnings), warnings


def test_keys_with_their_effect_are_not_warned_about(caplog):
    text = (
        "metric_dtype = 'fp32'\nmodel = dict(dtype='torch.tf32')\ncudnn_deterministic = True\n"
        "ckpt = dict(auto_resume=False, load_ckpt_folder='local:/a')\n"
        "data = dict(num_worker=0)\n"
    )
    with caplog.at_level(logging.WARNING, logger="train_kernel.config"):
        config_from_text(text)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


# -- keys that cannot be applied: errors naming them ----------------------------------------------


@pytest.mark.parametrize(
    ("text", "key", "message"),
    [
        ("lr_scheduler = dict(last_epoch=10)", "lr_scheduler.last_epoch", "only -1 is supported"),
        ("beta2_scheduler = dict(cur_iter=3)", "beta2_scheduler.cur_iter", "only -1 is supported"),
        (
            "data = dict(fixed_random_dataset_seqlen=False)",
            "data.fixed_random_dataset_seqlen",
            "not supported",
        ),
        (
            "monitor = dict(alert=dict(enable_feishu_alrt=True))",
            "monitor.alert.enable_feishu_alrt",
            "unknown",
        ),
        ("grad_profiling = dict(interval_steps=0)", "grad_profiling.interval_steps", "must be >= 1"),
    ],
)
def test_unapplicable_values_are_errors_naming_the_key(text, key, message):
    with pytest.raises(ConfigError) as caught:
        config_from_text(text + "\n", source="cfg.py")
    assert caught.value.key == key and message in str(caught.value)
    assert str(caught.value).startswith("cfg.py: ")


@pytest.fixture(scope="module")
def packed(tmp_path_factory):
    """A real pack (pack_stage) made with min_length=3 and documents kept apart."""
    root = tmp_path_factory.mktemp("pack")
    tokens = write_token_folder(root / "tok", {"en/a.jsonl": [5, 1, 2, 9, 30, 7, 12] * 4})
    pack(PackConfig(tokens.path, root / "packed", seq_len=16, micro_bsz=2, min_length=3), progress=False)
    return root / "packed"


def test_config_agreeing_with_the_pack_loads(packed):
    config = config_from_text(
        f"data = dict(seq_len=16, micro_bsz=2, min_length=3, train_folder={str(packed)!r})"
    )
    assert config.data.min_length == 3


@pytest.mark.parametrize(
    ("setting", "key", "manifest_value"),
    [
        ("min_length=50", "data.min_length", "min_length=3"),
        (
            "min_length=3, pack_sample_into_one=True",
            "data.pack_sample_into_one",
            "pack_sample_into_one=False",
        ),
    ],
)
def test_config_disagreeing_with_the_pack_manifest_is_an_error(packed, setting, key, manifest_value):
    text = f"data = dict(seq_len=16, micro_bsz=2, {setting}, train_folder={str(packed)!r})\n"
    with pytest.raises(ConfigError) as caught:
        config_from_text(text, source="cfg.py")
    assert caught.value.key == key
    assert manifest_value in str(caught.value) and str(packed / "manifest.json") in str(caught.value)


def test_valid_folder_is_checked_too(packed, tmp_path):
    text = f"data = dict(min_length=0, valid_folder={str(packed)!r}, train_folder={str(tmp_path)!r})\n"
    with pytest.raises(ConfigError, match="min_length=3"):
        config_from_text(text)
