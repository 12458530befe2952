"""Write a randomly initialised model with a backbone's architecture and tokenizer, for throughput measurements.

Throughput does not depend on the weights' values, only on shapes (random weights rarely emit the end token, so
every request runs to its token budget). This lets the GPU check (benchmarks/gpu_check.sh) measure the default
backbone's shapes on a machine that cannot receive its 98 MB GGUF: only config.json and the tokenizer travel.

    python benchmarks/random_backbone.py CONFIG_JSON TOKENIZER_DIR OUT_DIR
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer


def main(config_json: Path, tokenizer_dir: Path, out: Path) -> None:
    torch.manual_seed(0)
    config = AutoConfig.from_pretrained(config_json)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(out)
    print(f"{out}: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, random weights")


if __name__ == "__main__":
    if len(sys.argv) != 4:
        sys.exit(__doc__)
    main(*(Path(a) for a in sys.argv[1:]))
