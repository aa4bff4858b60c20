"""The loss scaler's scale sequence for a given overflow pattern, as InternLM's."""

from __future__ import annotations

from train_kernel.optim.loss_scaler import DynamicLossScaler


def scales(scaler: DynamicLossScaler, overflows: str) -> list[float]:
    sequence = []
    for flag in overflows:
        scaler.update(flag == "x")
        sequence.append(scaler.scale)
    return sequence


def test_hysteresis_then_backoff_on_every_later_overflow():
    scaler = DynamicLossScaler(
        initial_scale=1024, growth_interval=3, hysteresis=2, min_scale=1, max_scale=4096
    )
    # x = overflow, . = clean step
    assert scales(scaler, "x.xx") == [1024, 1024, 512, 256]
    # growth after 3 clean steps resets the hysteresis counter
    assert scales(scaler, "...") == [256, 256, 512]
    assert scales(scaler, "x") == [512]  # first overflow after growth: tolerated again
    assert scales(scaler, "x") == [256]


def test_scale_bounds_and_growth_interval():
    scaler = DynamicLossScaler(
        initial_scale=4,
        growth_factor=2,
        backoff_factor=0.5,
        growth_interval=2,
        min_scale=2,
        max_scale=16,
        hysteresis=1,
    )
    assert scales(scaler, "xxx") == [2, 2, 2]
    assert scales(scaler, "........") == [2, 4, 4, 8, 8, 16, 16, 16]


def test_seed_defaults_and_state_round_trip():
    scaler = DynamicLossScaler()  # grad_scaler section of the seed config
    assert scaler.scale == 65536.0
    scaler.update(True)
    state = scaler.state_dict()
    other = DynamicLossScaler()
    other.load_state_dict(state)
    assert scales(other, "x") == scales(scaler, "x") == [32768.0]


def test_disabled_scaler_is_constant_one():
    scaler = DynamicLossScaler(enabled=False)
    assert scales(scaler, "x..x") == [1.0] * 4
