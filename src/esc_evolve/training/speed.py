"""Speed: score only the learned positions in trl's LM head, keep LoRA inputs in the autocast dtype, count
throughput, set torch threads."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from typing import Any

import torch
from transformers import TrainerCallback

log = logging.getLogger(__name__)


@contextmanager
def compact_lm_head_on_cpu() -> Iterator[None]:
    """Make trl's fused LM head score only the positions that have a label, on CPU too.

    trl projects hidden states through the LM head in tiles and, on Triton devices, only for positions whose
    label is not -100. Elsewhere it scores every position, so that tile shapes stay fixed for compiled (Neuron)
    graphs. Eager CPU has no such concern, and in ESC samples ~90% of the tokens are context: scoring them costs
    a third of a CPU step (the head is 28M of SmolLM2's 135M parameters, and its backward recomputes the tiles).
    trl has no option for this, so its device test is patched while the context is active (hand-written: remove
    when trl makes it configurable). The loss and gradients are unchanged (tests/test_sft.py checks this).
    """
    try:
        import trl.trainer.utils as trl_utils
    except ImportError:  # pragma: no cover - trl is a dependency
        yield
        return
    original = getattr(trl_utils, "_use_triton", None)
    if original is None:
        log.warning("trl no longer has trainer.utils._use_triton: LM head scores every position on CPU")
        yield
        return
    trl_utils._use_triton = lambda device: device.type == "cpu" or original(device)
    try:
        yield
    finally:
        trl_utils._use_triton = original


@contextmanager
def fast_paths(trainer: Any, runtime: Any) -> Iterator[None]:
    """What `train_sft` trains and evaluates under (the benchmark measures the same).

    Under mixed precision, peft casts each LoRA input to the adapter's fp32 dtype, and autocast casts it back to
    bf16 for the matmul: two copies of an activation per adapted layer (~9% of a CPU step). peft's own switch
    turns the first cast off; results are unchanged (autocast decides the matmul dtype either way).
    """
    from peft.helpers import disable_input_dtype_casting

    with ExitStack() as stack:
        stack.enter_context(compact_lm_head_on_cpu())
        stack.enter_context(disable_input_dtype_casting(trainer.model, active=runtime.bf16 or runtime.fp16))
        yield


def set_torch_threads(threads: int | None) -> int:
    """Apply `sft.num_threads` if set; return the thread count in use.

    On a CPU shared with other jobs, one thread per process can be several times faster than one per core:
    each parallel region waits for its slowest thread, and a thread that lost its core stalls them all.
    """
    if threads:
        torch.set_num_threads(threads)
    return torch.get_num_threads()


class ThroughputCallback(TrainerCallback):
    """Non-padding tokens/s and samples/s of this session (a resumed run counts from where it resumed).

    Adds `tokens_per_second` to each training log, so TensorBoard shows it next to loss, lr and grad norm.
    """

    def __init__(self) -> None:
        self.started = self.last_time = 0.0
        self.first_step = self.first_tokens = self.last_tokens = 0
        self.finished = 0.0
        self.steps = self.tokens = 0

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.started = self.last_time = time.perf_counter()
        self.first_step = state.global_step
        self.first_tokens = self.last_tokens = state.num_input_tokens_seen

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kwargs: Any) -> None:
        if logs is None or "loss" not in logs:
            return
        now = time.perf_counter()
        if now > self.last_time:
            logs["tokens_per_second"] = round(
                (state.num_input_tokens_seen - self.last_tokens) / (now - self.last_time), 2
            )
        self.last_time, self.last_tokens = now, state.num_input_tokens_seen

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.finished = time.perf_counter()
        self.steps = state.global_step - self.first_step
        self.tokens = state.num_input_tokens_seen - self.first_tokens

    def summary(self, samples_per_step: int) -> dict[str, Any]:
        seconds = max(self.finished - self.started, 1e-9)
        return {
            "session_steps": self.steps,
            "session_seconds": round(seconds, 2),
            "tokens_per_second": round(self.tokens / seconds, 2),
            "samples_per_second": round(self.steps * samples_per_step / seconds, 3),
            "session_tokens": self.tokens,
        }
