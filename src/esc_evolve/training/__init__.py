"""The two trainers of the method, each a function of (settings, inputs, output dir) that needs no run directory:
`train_sft` (phase 1: LoRA SFT of the backbone -> M0) and `train_dpo` (phase 2: DPO of M_t on its pairs -> M_t+1).
`settings.py` maps our settings onto trl/peft with device-aware defaults."""

from esc_evolve.training.dpo import NoPairsError, train_dpo
from esc_evolve.training.sft import train_sft, train_sft_on

__all__ = ["NoPairsError", "train_dpo", "train_sft", "train_sft_on"]
