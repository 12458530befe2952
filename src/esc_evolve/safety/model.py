"""The risk classifier: the packaged MiniLM sentence encoder fine-tuned on the project's labelled messages.

Why this model: no maintained offline model or library detects self-harm and danger risk (public classifiers need
a hub download and are mostly trained on Reddit posts, not support-chat turns). A logistic regression over frozen
MiniLM embeddings was tried first and could not tell "I tried to end my life two years ago, I'm fine now" from a
present risk (benchmarks/README.md): frozen sentence embeddings encode the topic, not the stance. Fine-tuning the
whole encoder (22M parameters) with two heads, the level (none/concern/urgent) and the risk categories
(multi-label), learns negation, tense and figurative use from the hard negatives.

Training runs once per machine, at first use (about 2-4 minutes on 2 CPU cores), and is cached under the
esc-evolve cache folder, keyed by the data, the encoder and the recipe; the same seed gives the same model on CPU.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from esc_evolve.safety.dataset import LEVELS, RISK_CATEGORIES, RiskExample
from esc_evolve.storage import publish_folder, staging_folder

log = logging.getLogger(__name__)

RECIPE = {"epochs": 6, "batch_size": 16, "lr": 4e-5, "head_lr": 1e-3, "max_length": 128, "seed": 0, "version": 1}
# Recall over precision: a missed urgent message costs more than a safe reply to someone who is fine.
LEVEL_WEIGHTS = (1.0, 1.5, 1.5)


class RiskModel(torch.nn.Module):
    """MiniLM body, mean pooling, a level head and a category head."""

    def __init__(self, body: torch.nn.Module, tokenizer: object) -> None:
        super().__init__()
        self.body, self.tokenizer = body, tokenizer
        hidden = body.config.hidden_size
        self.level_head = torch.nn.Linear(hidden, len(LEVELS))
        self.category_head = torch.nn.Linear(hidden, len(RISK_CATEGORIES))

    def forward(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        batch = self.tokenizer(
            list(texts), padding=True, truncation=True, max_length=RECIPE["max_length"], return_tensors="pt"
        )
        hidden = self.body(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        return self.level_head(pooled), self.category_head(pooled)

    @torch.inference_mode()
    def predict(self, texts: Sequence[str], batch_size: int = 64) -> tuple[np.ndarray, np.ndarray]:
        """(n, 3) level probabilities and (n, 10) category probabilities."""
        self.eval()
        levels, categories = [], []
        for start in range(0, len(texts), batch_size):
            level_logits, category_logits = self(texts[start : start + batch_size])
            levels.append(level_logits.softmax(-1).numpy())
            categories.append(category_logits.sigmoid().numpy())
        if not levels:
            return np.zeros((0, len(LEVELS))), np.zeros((0, len(RISK_CATEGORIES)))
        return np.concatenate(levels), np.concatenate(categories)


def fine_tune(encoder_dir: Path, examples: Sequence[RiskExample], progress: bool = True) -> RiskModel:
    """Fine-tune the encoder on `examples` with the fixed RECIPE (deterministic on CPU for a given seed)."""
    from tqdm.auto import tqdm
    from transformers import AutoModel, AutoTokenizer

    torch.manual_seed(RECIPE["seed"])
    model = RiskModel(
        AutoModel.from_pretrained(str(encoder_dir), local_files_only=True),
        AutoTokenizer.from_pretrained(str(encoder_dir), local_files_only=True),
    )
    batches = _length_grouped_batches(examples, RECIPE["batch_size"], RECIPE["epochs"], RECIPE["seed"])
    optimizer = torch.optim.AdamW(
        [
            {"params": model.body.parameters(), "lr": RECIPE["lr"]},
            {"params": [*model.level_head.parameters(), *model.category_head.parameters()], "lr": RECIPE["head_lr"]},
        ],
        weight_decay=0.01,
    )
    total = len(batches)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min(1.0, (step + 1) / (0.1 * total)) * max(0.0, (total - step) / total)
    )
    model.train()
    for batch in tqdm(batches, desc="training the risk detector (once)", disable=not progress, unit="batch"):
        loss = _loss(model, [examples[i] for i in batch])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
    return model.eval()


def _loss(model: RiskModel, batch: list[RiskExample]) -> torch.Tensor:
    level_logits, category_logits = model([e.text for e in batch])
    levels = torch.tensor([LEVELS.index(e.level) for e in batch])
    loss = torch.nn.functional.cross_entropy(level_logits, levels, weight=torch.tensor(LEVEL_WEIGHTS))
    risky = torch.tensor([e.at_risk for e in batch])
    if risky.any():  # categories are learnt on at-risk messages only (a negative's type is not a risk category)
        targets = torch.tensor([[float(c in e.categories) for c in RISK_CATEGORIES] for e in batch])
        loss = loss + torch.nn.functional.binary_cross_entropy_with_logits(category_logits[risky], targets[risky])
    return loss


def _length_grouped_batches(examples: Sequence[RiskExample], size: int, epochs: int, seed: int) -> list[list[int]]:
    """Batches of similar length (less padding, faster on CPU), in a shuffled order, for every epoch."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(epochs):
        order = rng.permutation(len(examples))
        chunk = size * 8  # sort by length within windows of 8 batches, so an epoch stays shuffled
        for start in range(0, len(order), chunk):
            window = sorted(order[start : start + chunk], key=lambda i: len(examples[i].text))
            out += [window[i : i + size] for i in range(0, len(window), size)]
    return out


def save_model(model: RiskModel, target: Path, meta: dict) -> None:
    """Write the fine-tuned encoder, its heads and what it was trained on; the folder appears whole or not at all."""
    staging = staging_folder(target)
    staging.mkdir(parents=True)
    model.body.save_pretrained(staging)
    model.tokenizer.save_pretrained(staging)
    heads = {"level": model.level_head.state_dict(), "category": model.category_head.state_dict()}
    torch.save(heads, staging / "heads.pt")
    (staging / "risk_model.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    publish_folder(staging, target)


def load_model(folder: Path) -> RiskModel:
    from transformers import AutoModel, AutoTokenizer

    model = RiskModel(
        AutoModel.from_pretrained(str(folder), local_files_only=True),
        AutoTokenizer.from_pretrained(str(folder), local_files_only=True),
    )
    heads = torch.load(folder / "heads.pt", weights_only=True)
    model.level_head.load_state_dict(heads["level"])
    model.category_head.load_state_dict(heads["category"])
    return model.eval()
