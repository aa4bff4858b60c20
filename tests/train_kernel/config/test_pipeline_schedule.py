"""parallel.pipeline.schedule: which engine and schedule a pipeline step runs, and the configs that
cannot run PyTorch's schedules (a micro_num below the pipeline size, a ramp-up)."""

from __future__ import annotations

import pytest

from tests.train_kernel.train.tiny_config import tiny_config_text
from train_kernel.config import ConfigError, config_from_text


def _config(tmp_path, micro_num: int = 4, chunks: int = 1, schedule: str | None = None, extra: str = ""):
    text = tiny_config_text(tmp_path, micro_num=micro_num).replace(
        "num_layers=2", f"num_layers=4, num_chunks={chunks}"
    )
    pipeline = f"dict(size=2, interleaved_overlap=True, schedule={schedule!r})"
    return config_from_text(
        text.replace("parallel = dict(zero1=1)", f"parallel = dict(zero1=1, pipeline={pipeline})") + extra
    )


@pytest.mark.parametrize(
    "micro_num, chunks, schedule, expected",
    [
        (4, 1, None, "1F1B"),
        (4, 2, None, "Interleaved1F1B"),
        (4, 2, "InterleavedZeroBubble", "InterleavedZeroBubble"),
        (4, 1, "InternLM", None),
        (1, 1, None, None),  # below the pipeline size: the project's own 1F1B runs it
    ],
)
def test_the_schedule_a_pipeline_step_runs(tmp_path, micro_num, chunks, schedule, expected):
    assert _config(tmp_path, micro_num, chunks, schedule).pipeline_engine_schedule() == expected


def test_a_ramp_up_runs_the_projects_schedule(tmp_path):
    config = _config(tmp_path, extra="\ndata['rampup_batch_size'] = '2 2 1'\n")
    assert config.pipeline_engine_schedule() is None


@pytest.mark.parametrize(
    "micro_num, chunks, schedule, message",
    [
        (1, 1, "1F1B", "needs a fixed data.micro_num >= the pipeline size 2"),
        (4, 1, "Interleaved1F1B", "needs model.num_chunks > 1"),
        (4, 2, "1F1B", "needs model.num_chunks = 1"),
        (4, 1, "GPipe", "must be one of"),
    ],
)
def test_schedules_that_cannot_run_are_config_errors(tmp_path, micro_num, chunks, schedule, message):
    with pytest.raises(ConfigError, match="schedule") as error:
        _config(tmp_path, micro_num, chunks, schedule)
    assert message in str(error.value)
