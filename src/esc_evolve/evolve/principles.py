"""The human-written principles that guide reflection and refinement (a versioned, editable YAML file)."""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from esc_evolve.data.vocabulary import VOCABULARIES, cue_error, vocabulary
from esc_evolve.errors import ConfigError

PACKAGED = "principles.yaml"


class ReflectionField(BaseModel):
    """One thing to infer about the seeker, generated on its own after `prefix`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    question: str
    prefix: str
    options: dict[str, list[str]] | None = Field(
        None,
        description="label -> cue words for the parser (a cue ending in `*` matches every word it begins), or the "
        f"name of a shared vocabulary in esc_evolve/data/vocabulary.yaml ({', '.join(VOCABULARIES)})",
    )
    open: bool = Field(
        False,
        description="The options are the usual answers, not the only ones: a clean answer naming none of them is "
        "kept as written (a seeker's goal such as 'to get their finances sorted out' is worth passing on).",
    )
    max_new_tokens: int = Field(24, ge=1)
    needs_draft: bool = Field(False, description="Shown the draft reply y (the critique is).")
    required: bool = Field(True, description="The reflection counts as parsed only if this field parsed.")
    check: Literal["grounded", "distinct"] | None = Field(
        None,
        description="What makes a parsed answer count beyond its form (evolve settings switch each on or off): "
        "'grounded' = it names something the seeker said, else it is generic and counts as unparsed (the "
        "situation); 'distinct' = it does not nearly repeat what M_t answers for unrelated built-in conversations "
        "(probes), else it is generic and carries no weight: not shown, not required (the critique).",
    )

    @field_validator("options", mode="before")
    @classmethod
    def _resolve_vocabulary(cls, options: object) -> object:
        """`options: emotions` names a shared vocabulary, so the parser and the metrics read the same cues."""
        return vocabulary(options) if isinstance(options, str) else options

    @field_validator("options")
    @classmethod
    def _cues_are_words(cls, options: dict[str, list[str]] | None) -> dict[str, list[str]] | None:
        for label, cues in (options or {}).items():
            for cue in (label, *cues):
                if error := cue_error(cue):
                    raise ValueError(f"cue {cue!r} of {label!r}: {error}")
        return options


class Guidelines(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    do: list[str]
    avoid: list[str]


class Principles(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    version: int | str
    name: str
    reflection_fields: list[ReflectionField] = Field(min_length=1)
    guidelines: Guidelines

    def guidelines_text(self) -> str:
        lines = ["Good support:"] + [f"- {item}" for item in self.guidelines.do]
        lines += ["Avoid:"] + [f"- {item}" for item in self.guidelines.avoid]
        return "\n".join(lines)

    def field(self, name: str) -> ReflectionField | None:
        return next((f for f in self.reflection_fields if f.name == name), None)


def load_principles(path: str | Path | None = None) -> Principles:
    """The packaged principles, or a user's file given by `evolve.principles_path`."""
    if path is None:
        text = resources.files("esc_evolve.evolve").joinpath(PACKAGED).read_text(encoding="utf-8")
        source = f"<package>/{PACKAGED}"
    else:
        file = Path(path).expanduser()
        if not file.is_file():
            raise ConfigError(f"principles file not found: {file}")
        text, source = file.read_text(encoding="utf-8"), str(file)
    try:
        return Principles.model_validate(yaml.safe_load(text))
    except (yaml.YAMLError, ValidationError) as exc:
        raise ConfigError(f"{source}: invalid principles file: {exc}") from None
