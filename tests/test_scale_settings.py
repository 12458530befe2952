"""Settings that must hold when a run moves from one device to many: the global batch, and the evaluation that
DeepSpeed ZeRO-2 cannot run before training."""

from __future__ import annotations

import logging
from pathlib import Path
from types import SimpleNamespace

import pytest

from esc_evolve.config import DPOSettings, SFTSettings
from esc_evolve.errors import ConfigError
from esc_evolve.training.settings import (
    deepspeed_stage,
    eval_before_training_problem,
    gradient_accumulation,
    world_size,
)
from esc_evolve.training.sft import samples_per_step


@pytest.mark.parametrize("processes, steps", [(1, 8), (2, 4), (4, 2), (8, 1)])
def test_the_global_batch_stays_fixed_as_devices_change(processes: int, steps: int) -> None:
    settings = SFTSettings(per_device_batch_size=2, gradient_accumulation_steps=3, global_batch_size=16)
    assert gradient_accumulation(settings, processes) == steps
    assert settings.per_device_batch_size * processes * steps == 16
    assert samples_per_step(settings, processes) == 16


def test_without_a_global_batch_the_accumulation_is_the_configured_one() -> None:
    settings = DPOSettings(per_device_batch_size=4, gradient_accumulation_steps=4)
    assert [gradient_accumulation(settings, n) for n in (1, 8)] == [4, 4]
    assert samples_per_step(SFTSettings(per_device_batch_size=4, gradient_accumulation_steps=2), 8) == 64


def test_a_global_batch_that_does_not_divide_is_an_error() -> None:
    with pytest.raises(ConfigError, match=r"global_batch_size 16 .* 3 x 2 processes = 6"):
        gradient_accumulation(SFTSettings(per_device_batch_size=3, global_batch_size=16), 2)


def test_the_accumulation_is_logged(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="esc_evolve.training.settings"):
        gradient_accumulation(SFTSettings(per_device_batch_size=4, global_batch_size=32), 2)
    assert "global batch 32 = 4 per device x 2 processes x 4 accumulation steps" in caplog.text


def test_world_size_comes_from_the_launcher(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert world_size() == 1
    monkeypatch.setenv("WORLD_SIZE", "8")
    assert world_size() == 8


def _trainer(stage: int | None):
    if stage is None:
        return SimpleNamespace(is_deepspeed_enabled=False)
    plugin = SimpleNamespace(zero_stage=stage)
    return SimpleNamespace(
        is_deepspeed_enabled=True, accelerator=SimpleNamespace(state=SimpleNamespace(deepspeed_plugin=plugin))
    )


@pytest.mark.parametrize("stage, can_eval", [(None, True), (0, False), (1, False), (2, False), (3, True)])
def test_the_untrained_eval_is_skipped_where_zero_cannot_run_it(stage: int | None, can_eval: bool) -> None:
    assert deepspeed_stage(_trainer(stage)) == stage
    problem = eval_before_training_problem(deepspeed_stage(_trainer(stage)))
    assert (problem is None) == can_eval
    if problem:
        assert f"ZeRO-{stage}" in problem


@pytest.mark.parametrize("devices", [1, 2, 4, 8])
def test_the_paper_configs_keep_their_global_batch_on_1_to_8_gpus(devices: int) -> None:
    from esc_evolve.config import load_config

    config = load_config(Path(__file__).parents[1] / "configs" / "paper-llama3-8b.yaml")
    for settings, expected in ((config.sft, 64), (config.dpo, 32)):
        steps = gradient_accumulation(settings, devices)
        assert settings.per_device_batch_size * devices * steps == expected
