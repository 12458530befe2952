"""Training stages. Phase 1 (experience acquisition): LoRA SFT with trl, giving M0 (`sft_stage`)."""

from esc_evolve.training.sft import run_sft, sft_stage

__all__ = ["run_sft", "sft_stage"]
