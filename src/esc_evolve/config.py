"""Typed configuration: one pydantic model per stage, composed into `ExperimentConfig`.

A config file is YAML. It may name a parent with `extends: other.yaml` (relative to the file), so that
paper configs read as short lists of overrides of one default. Unknown keys are errors, reported with the
key's dotted path, the file, and the closest valid spelling.

Defaults that differ from the libraries we build on (transformers, trl) are said in the field descriptions.
"""

from __future__ import annotations

import copy
import difflib
import logging
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from esc_evolve.errors import ConfigError

log = logging.getLogger(__name__)


def off_is_not_false(value: Any) -> Any:
    """YAML reads a bare `off` (in a file or a --set) as False: for a setting whose choices include 'off',
    take it as meant."""
    return "off" if value is False else value


DEFAULT_SYSTEM_PROMPT = (
    "You are a warm, attentive emotional supporter talking with someone who is going through a hard time. "
    "Listen closely, infer how they feel and what they need from what they say, and reply in a few natural "
    "sentences that fit this particular person. Never encourage self-harm; if someone may be in danger, "
    "gently urge them to contact local emergency services or a crisis line."
)


class StrictModel(BaseModel):
    """Base for every config section: unknown keys are errors, assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class RunSettings(StrictModel):
    """Where a run lives and how it is seeded."""

    name: str = "quickstart"
    output_dir: str = "runs"
    seed: int = 42
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    m0_from: str | None = Field(
        None,
        description="Start from another run's M0 instead of training one: a run directory (its m0/) or an M0 "
        "adapter folder, copied with its lineage by the sft stage (stages.json records the source). Ablations "
        "share one M0 this way. Relative to the directory you run from.",
    )
    stage_processes: Literal["auto", "always", "never"] = Field(
        "auto",
        description="Run each stage of `esc-evolve run` in its own process (docs/scale.md): 'auto' = when the model "
        "is on a CUDA device or generation.backend is vllm (a stage then starts with the whole GPU memory free); "
        "'always'; 'never' = every stage in the run's process, as on a CPU.",
    )
    accelerate_config: str | None = Field(
        None,
        description="accelerate config file (e.g. configs/accelerate/multi-gpu.yaml) for the training stages when "
        "stages run in their own processes and more than one CUDA device is visible: they start under "
        "`accelerate launch` with one process per visible device (null = plain DDP). Relative to the directory "
        "you run from.",
    )


class DataSettings(StrictModel):
    """Where conversations come from and how turn-level samples are cut from them (read by `data.load_split`,
    the one entry point every stage and command uses). The file format is detected from each file."""

    train_path: str = Field(
        "builtin:train",
        description="A file (ESConv .jsonl, raw ESConv.json/FailedESConv.json, MultiESC .jsonl), "
        "'builtin:train' / 'builtin:valid' / 'builtin:all' for the packaged sample conversations, "
        "or 'hf:thu-coai/esconv:train' for the Hugging Face hub (needs network).",
    )
    valid_path: str | None = Field("builtin:valid", description="Same forms as train_path; used for eval.")
    context_window: int = Field(
        10, ge=0, description="Merged turns of history kept before each supporter turn (0 = all)."
    )
    max_conversations: int | None = Field(
        None, ge=1, description="Use only the first N conversations of the training split."
    )
    skip_invalid: bool = Field(
        False, description="Skip malformed records (and log a count) instead of stopping with an error."
    )
    system_prompt: str = Field(DEFAULT_SYSTEM_PROMPT, description="System message of every chat prompt.")


class ModelSettings(StrictModel):
    """The backbone: an alias (default `smollm2-135m-instruct`), a Hugging Face id, or a local folder."""

    name: str = "smollm2-135m-instruct"
    revision: str | None = None
    device: Literal["auto", "cpu", "cuda", "mps"] = Field(
        "auto", description="'auto' = cuda if available, else mps, else cpu."
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto",
        description="'auto' = float32 for inference on CPU, bfloat16 on GPUs that support it, float16 on other "
        "GPUs. Training on a CPU with native bf16 (AVX512-BF16/AMX) loads the frozen backbone in bf16 (see sft).",
    )
    cache_dir: str | None = Field(
        None, description="Where converted backbones live; default $ESC_EVOLVE_CACHE or ~/.cache/esc-evolve."
    )
    trust_remote_code: bool = False
    attn_implementation: str | None = Field(None, description="e.g. 'sdpa', 'flash_attention_2'.")


class TransformersSettings(StrictModel):
    """The `transformers` generation backend (see docs/generation.md for what each buys on a CPU)."""

    merge_adapter: bool = Field(True, description="Fold a LoRA adapter into the weights before generating.")
    static_cache: bool | None = Field(
        None, description="Static KV cache (null = on CPU, where the dynamic one re-concatenates at each step)."
    )
    share_prefix_min: int = Field(16, ge=0, description="Shortest shared prompt prefix computed once per batch.")
    row_prefill: bool | None = Field(None, description="Prefill each prompt alone, without padding (null = on CPU).")


class VLLMSettings(StrictModel):
    """The `vllm` generation backend (extra `gpu`)."""

    tensor_parallel_size: int = Field(1, ge=1)
    gpu_memory_utilization: float = Field(0.9, gt=0.0, le=1.0)
    chunk_size: int = Field(
        1024,
        ge=1,
        description="Requests handed to vLLM per call by the pipeline (pairs: contexts per chunk): its scheduler "
        "batches continuously, so it needs many requests at once; `batch_size` is the transformers backend's.",
    )
    max_num_seqs: int | None = Field(
        None, ge=1, description="vLLM's max_num_seqs (sequences per step); null = its default."
    )
    engine_kwargs: dict[str, Any] = Field(
        default_factory=dict,
        description="Passed to vllm.LLM as they are, after esc-evolve's own arguments (e.g. max_model_len, "
        "enforce_eager, max_loras); a key here wins.",
    )


class OpenAISettings(StrictModel):
    """An OpenAI-compatible server. The API key is read from the environment variable `api_key_env` names, at
    run time, and never written anywhere."""

    base_url: str | list[str] | None = Field(
        None,
        description="e.g. http://127.0.0.1:8000/v1; default $OPENAI_BASE_URL. A list of servers holding the same "
        "models (a farm): each request goes to the one with the fewest requests in flight.",
    )
    model: str | None = Field(None, description="The served model's name; default model.name.")
    served_models: dict[str, str] = Field(
        default_factory=dict,
        description="The served name of each model of a run (base, m0, m1, ...), e.g. the LoRA names of a vLLM "
        "server started with --lora-modules m1=RUN/iter1/m1/served; 'base' defaults to `model`.",
    )
    api_key_env: str = "OPENAI_API_KEY"
    request_timeout: float = Field(120.0, gt=0.0)
    max_concurrency: int = Field(
        8, ge=1, description="Requests in flight at once (a thread pool); results come back in input order."
    )

    def over(self, base: OpenAISettings) -> OpenAISettings:
        """`base` (generation.openai) with the fields set explicitly here: a judge's or simulator's own endpoint
        block. Fields left unset are defaults, which must not override the generation endpoint."""
        return base.model_copy(update={name: getattr(self, name) for name in self.model_fields_set})


class GenerationSettings(StrictModel):
    """Decoding settings shared by evolve, evaluation and chat; each backend's own settings in its block."""

    backend: str = Field("transformers", description="A registered backend: transformers, vllm or openai.")
    batch_size: int = Field(16, ge=1)
    max_new_tokens: int = Field(96, ge=1)
    temperature: float = Field(0.0, ge=0.0, description="0 = greedy decoding.")
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    repetition_penalty: float = Field(1.0, gt=0.0)
    transformers: TransformersSettings = TransformersSettings()
    vllm: VLLMSettings = VLLMSettings()
    openai: OpenAISettings = OpenAISettings()


class LoraSettings(StrictModel):
    """peft LoraConfig fields. `target_modules: null` lets peft pick the backbone family's default."""

    r: int = Field(16, ge=1)
    alpha: int = Field(32, ge=1)
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="peft's default; dropout costs ~25% of a CPU step.")
    target_modules: list[str] | str | None = "all-linear"


class TrainerSettings(StrictModel):
    """What SFT and DPO share, one name per concept, every field honoured by both trainers.

    bf16 and gradient checkpointing are decided per device (`null` = auto): bf16 on GPUs that support it and on
    CPUs with native bf16 (AVX512-BF16/AMX), fp32 on other CPUs, where bf16 is emulated and slow; gradient
    checkpointing on GPUs only (on CPU it only recomputes). See docs/sft.md for the measurements.
    """

    learning_rate: float = Field(2e-4, gt=0)
    epochs: float = Field(1.0, gt=0)
    max_steps: int = Field(-1, description="-1 = run the epochs; otherwise stop after this many steps.")
    per_device_batch_size: int = Field(4, ge=1)
    gradient_accumulation_steps: int = Field(1, ge=1)
    global_batch_size: int | None = Field(
        None,
        ge=1,
        description="Samples per optimiser step over all devices, kept whatever the device count: gradient "
        "accumulation becomes global_batch_size / (per_device_batch_size x devices), which must divide. null = "
        "per_device_batch_size x gradient_accumulation_steps x devices (grows with the devices).",
    )
    max_length: int = Field(512, ge=16, description="Tokens of prompt + response; longer contexts lose old turns.")
    lr_scheduler: str = "cosine"
    warmup_ratio: float = Field(0.03, ge=0.0, lt=1.0)
    weight_decay: float = Field(0.0, ge=0.0)
    lora: LoraSettings = LoraSettings()
    bf16: bool | None = None
    gradient_checkpointing: bool | None = None
    num_threads: int | None = Field(
        None, ge=1, description="torch CPU threads per process; null = torch default. On a shared CPU, 1 can be faster."
    )
    logging_steps: int = Field(5, ge=1)
    save_steps: int = Field(50, ge=1)


class SFTSettings(TrainerSettings):
    """Phase 1, experience acquisition: LoRA SFT on ESC turns (gives M0). Batches are grouped by length."""

    replay_path: str | None = Field(None, description="Chat-format JSON-lines of general instruction data.")
    replay_ratio: float = Field(0.0, ge=0.0, le=1.0, description="Share of replay samples in the mix.")
    eval_fraction: float = Field(
        0.05,
        ge=0.0,
        lt=1.0,
        description="Held-out share of train for the eval loss; only when data.valid_path is null.",
    )
    max_train_samples: int | None = Field(None, ge=1)
    max_eval_samples: int | None = Field(64, ge=1, description="Cap of the eval slice (seeded random); null = all.")
    group_by_length: bool = Field(True, description="Batch samples of similar length (less padding).")
    merge_adapter: bool = Field(False, description="Also save M0 with the adapter merged into the weights.")


class DPOSettings(TrainerSettings):
    """DPO of M_t on its own pairs (gives M_{t+1}); the reference model is M_t.

    Differs from trl's DPOConfig defaults: learning rate 5e-5 (trl: 1e-6, meant for full fine-tuning; a fresh
    LoRA adapter needs more), bf16 and gradient checkpointing per device as in `sft`, reference log-probs
    precomputed once per iteration and pairs grouped by length (docs/evolve.md, "Speed").
    DPO rewards length; two documented counters: `loss_type: sigmoid_norm` (log-probs averaged over tokens)
    and `ld_alpha` (LD-DPO: down-weights the tokens of the longer response beyond the shared length).
    """

    learning_rate: float = Field(5e-5, gt=0)
    per_device_batch_size: int = Field(2, ge=1)
    gradient_accumulation_steps: int = Field(2, ge=1)
    warmup_ratio: float = Field(0.1, ge=0.0, lt=1.0)
    logging_steps: int = Field(2, ge=1)
    save_steps: int = Field(20, ge=1)
    beta: float = Field(0.1, gt=0)
    loss_type: Literal["sigmoid", "sigmoid_norm", "ipo", "robust", "hinge", "exo_pair", "bco_pair", "apo_zero"] = (
        "sigmoid"
    )
    rpo_alpha: float | None = Field(None, ge=0, description="Weight of an NLL term on the chosen side (RPO).")
    ld_alpha: float | None = Field(
        None, ge=0.0, le=1.0, description="LD-DPO length control: weight of tokens past the shorter response."
    )
    reference: Literal["current", "m0"] = Field(
        "current",
        description="The DPO reference: 'current' = M_t, the model being trained on (the method); 'm0' = M0 in "
        "every iteration (an ablation; the same as 'current' in iteration 1).",
    )
    precompute_ref_log_probs: bool = Field(
        True,
        description="Score every pair with the reference once, before training (trl's option), instead of in each "
        "step: the reference is fixed during an iteration, so the loss is the same and each later epoch skips a "
        "forward pass. Recomputed, identically, when a run resumes.",
    )
    group_by_length: bool = Field(True, description="Batch pairs of similar length (less padding).")


class ReflectionFilters(StrictModel):
    """Which self-refined pairs are kept for DPO."""

    min_edit_ratio: float = Field(
        0.15, ge=0.0, le=1.0, description="Minimum normalised edit distance between y and y'."
    )
    max_length_ratio: float = Field(2.5, ge=1.0, description="Longer side / shorter side, in words.")
    max_repetition: float = Field(
        0.5, ge=0.0, le=1.0, description="Max share of repeated word 3-grams in the chosen side."
    )
    role_check: Literal["both", "chosen", "off"] = Field(
        "both",
        description="Drop a pair whose supporter speaks as the seeker ('I'm feeling a bit down', 'what should I "
        "do?', the seeker's own words said back in the first person): on both sides (a pair that contrasts role "
        "errors teaches the role, not personalisation), on the chosen side only, or not at all.",
    )
    drop_shortened: bool = Field(
        False,
        description="Drop a pair whose y' is y made shorter: fewer words than y and fewer than `min_new_terms` "
        "content words that y does not have (DPO would learn 'shorter', not 'more personal').",
    )
    min_new_terms: int = Field(2, ge=1, description="Content words a shorter y' must add to y (drop_shortened).")
    require_reflection_use: bool = Field(
        False,
        description="Keep a pair only when y' uses something from the reflection that y does not: a content word "
        "of a parsed free-text field (situation, profile, need, critique) or the reflected emotion. Not applied "
        "without a reflection (evolve.reflection: none).",
    )

    _role_check_off = field_validator("role_check", mode="before")(off_is_not_false)


class EvolveSettings(StrictModel):
    """Phase 2, self-improvement: reflect, refine, build pairs, iterate."""

    iterations: int = Field(2, ge=0)
    contexts_per_iteration: int = Field(64, ge=1)
    principles_path: str | None = Field(None, description="Override of the packaged principles file.")
    new_contexts_each_iteration: bool = True
    reflection_max_new_tokens: int = Field(48, ge=1)
    reflection_samples: int = Field(
        1,
        ge=1,
        description="Self-consistency: k answers per reflection field, sampled at reflection_temperature when k > 1 "
        "(k = 1: one greedy answer). Labelled fields take the label most answers name, free-text fields the answer "
        "that agrees most with the others (docs/evolve.md).",
    )
    reflection_temperature: float = Field(0.7, gt=0.0, description="Sampling temperature of the k > 1 answers.")
    reflection_min_agreement: float = Field(
        0.5, ge=0.0, le=1.0, description="Share of the k answers that must name the winning label (k > 1)."
    )
    reflection_min_text_agreement: float = Field(
        0.0,
        ge=0.0,
        le=1.0,
        description="Minimum mean content-word overlap of the chosen free-text answer with the other k - 1 (0 = take "
        "the most central answer whatever its agreement).",
    )
    reflection_exemplars: int = Field(
        0,
        ge=0,
        description="Few-shot exemplars (evolve/exemplars.yaml, built-in training conversations) per field. Off by "
        "default: the 135M default backbone copies them (docs/evolve.md, 'Measured').",
    )
    exemplars_for_labels: bool = Field(
        False,
        description="Also show exemplars for closed labelled fields (emotion, intensity). Off: a 135M model answers "
        "the last exemplar's label for nearly every context (docs/evolve.md).",
    )
    situation_grounding: Literal["lexical", "embedding", "off"] = Field(
        "off",
        description="A `grounded` field (the situation) must name something the seeker said: 'lexical' = share at "
        "least grounding_min_terms content words with the seeker's turns; 'embedding' = cosine of the packaged "
        "MiniLM embedding with one seeker turn of at least grounding_min_similarity; 'off'. Ungrounded = generic.",
    )
    _grounding_off = field_validator("situation_grounding", mode="before")(off_is_not_false)
    grounding_min_terms: int = Field(1, ge=1)
    grounding_min_similarity: float = Field(0.5, ge=-1.0, le=1.0)
    generic_probes: int = Field(
        0,
        ge=0,
        description="Built-in training contexts (probes) M_t also reflects on in each iteration; a `distinct` field "
        "(profile, critique) that nearly repeats its answer for one of them is generic and carries no weight. "
        "0 = no such check.",
    )
    generic_similarity: float = Field(
        0.7, gt=0.0, le=1.0, description="Word-level similarity (1 - edit ratio) from which an answer repeats a probe."
    )
    refine_temperature: float = Field(
        0.7,
        ge=0.0,
        description="Sampling temperature of the refined reply y' (0 = greedy; greedy refinement mostly echoes "
        "the draft, see docs/evolve.md).",
    )
    refine_top_p: float = Field(0.9, gt=0.0, le=1.0)
    refinement_samples: int = Field(
        1,
        ge=1,
        description="Sampled refinements y' per context; the pair takes the best by the judge-free rule of "
        "evolve/selection.py: one that passes the pair filters, then the one using most of the reflection, then the "
        "one closest to y in length (docs/evolve.md). 1 = one y', the method as written.",
    )
    filters: ReflectionFilters = ReflectionFilters()
    reflection: Literal["generated", "oracle", "none"] = Field(
        "generated",
        description="Where the reflection that guides y' comes from: 'generated' by M_t (the method); 'oracle' = "
        "emotion and situation filled from the gold annotation, the other fields generated; 'none' = y' from a plain "
        "'improve your reply' prompt without reflection or principles (self-refinement alone).",
    )
    rejected_from: Literal["current", "m0"] = Field(
        "current",
        description="The rejected side y: M_t's own draft (the method), or M0's answer to the same context in every "
        "iteration ('m0', anchored rejected side).",
    )
    update: Literal["dpo", "sft"] = Field(
        "dpo",
        description="How M_t becomes M_t+1: 'dpo' on its (y', y) pairs (the method), or 'sft' on the human replies "
        "of the same contexts, no pairs generated (the data- and compute-matched SFT baseline; trained with the "
        "dpo section's trainer settings).",
    )
    match_steps_of: str | None = Field(
        None,
        description="With update 'sft': a run directory whose iterN.dpo step counts each iteration trains for (the "
        "compute match); null = the dpo schedule on all of the iteration's contexts.",
    )

    @model_validator(mode="after")
    def _ablations_fit_the_update(self) -> EvolveSettings:
        if self.update == "sft" and (self.reflection != "generated" or self.rejected_from != "current"):
            raise ValueError("evolve.reflection and evolve.rejected_from shape DPO pairs; update 'sft' makes none")
        if self.match_steps_of is not None and self.update != "sft":
            raise ValueError("evolve.match_steps_of applies to update 'sft' only")
        return self


class JudgeSettings(StrictModel):
    """The LLM judge of evaluation (see docs/evaluation.md): always greedy, never with an adapter."""

    backend: str = Field(
        "none",
        description="A registered judge backend: 'none' (judge metric skipped), 'local' (a local model) or "
        "'openai' (an OpenAI-compatible server).",
    )
    model: str | None = Field(
        None, description="local: a model id, alias or folder to judge with (default model.name, without adapter)."
    )
    openai: OpenAISettings | None = Field(
        None, description="openai: the server; fields left unset come from generation.openai."
    )
    max_new_tokens: int = Field(256, ge=1, description="Token budget of one judge answer.")
    pairs: list[tuple[str, str]] | None = Field(
        None, description="(A, B) pairs for the pairwise judge; None = each model vs its predecessor, last vs first."
    )
    max_contexts: int | None = Field(None, ge=1, description="Judge only the first N contexts (cost).")


class EvalSettings(StrictModel):
    """Evaluation on turn-level contexts of a split (see docs/evaluation.md for every metric's definition)."""

    split_path: str | None = Field(None, description="Defaults to data.valid_path.")
    max_contexts: int | None = Field(200, ge=1)
    context_seed: int | None = Field(
        None,
        description="Seed of the sample of eval.max_contexts contexts; null = run.seed. Set it in runs that differ "
        "only in run.seed, so that they answer the same contexts (esc-evolve compare needs that).",
    )
    models: list[str] = Field(
        default_factory=lambda: ["base", "m0", "m1", "m2", "human"],
        description="base, m0, m1, ..., human; 'mK+refine' = M_K answering through draft, reflection and "
        "refinement at answer time (evolve's prompts and settings; the inference-refine baseline).",
    )
    metrics: list[str] = Field(
        default_factory=lambda: [
            "bleu",
            "rouge_l",
            "distinct",
            "length",
            "strategy",
            "personalisation",
            "reflection",
            "unhelpful_proxy",
            "safety",
            "judge",
        ]
    )
    judge: JudgeSettings = JudgeSettings()
    bootstrap_samples: int = Field(1000, ge=10, description="Paired bootstrap resamples.")
    bootstrap_unit: Literal["context", "conversation"] = Field(
        "context",
        description="Resample contexts (i.i.d.) or whole conversations (cluster bootstrap: wider, more honest "
        "CIs when several contexts come from one conversation).",
    )
    ci_level: float = Field(0.95, gt=0.5, lt=1.0)
    situation_distractors: int = Field(9, ge=1, description="K other seekers' situations per context.")
    bias_pseudo_count: float = Field(
        0.1, ge=0.0, description="Added to every off-diagonal confusion cell before the Bradley-Terry fit."
    )
    unhelpful_threshold: int = Field(2, ge=1, le=4, description="Judge helpfulness <= this counts as unhelpful.")
    offtopic_threshold: float = Field(
        0.1, description="Cosine(response, last 3 context turns) below this = off-topic (judge-free proxy)."
    )
    repetition_threshold: float = Field(0.5, ge=0.0, le=1.0, description="Repeated word 3-gram share = loop.")
    headline: tuple[str, str] | None = Field(
        None, description="The comparison stated first in the report; None = last model vs m0 (or the first)."
    )
    n_examples: int = Field(6, ge=0, description="Contexts shown side by side in the report.")
    cache_dir: str | None = Field(None, description="Embeddings and classifier cache; default model.cache_dir.")
    strategy_train_path: str | None = Field(
        None, description="Labelled ESC data for the strategy classifier; default data.train_path."
    )
    strategy_valid_path: str | None = Field(
        None, description="Held-out labelled data for its accuracy; default data.valid_path."
    )


class CrisisResource(StrictModel):
    """One place a person at risk can reach now, shown by the safe reply."""

    name: str
    contact: str
    region: str = "international"
    categories: list[str] = Field(
        default_factory=list,
        description="Risk categories this resource is for (e.g. danger_from_others); empty = every risk.",
    )


DEFAULT_RESOURCES = [
    CrisisResource(
        name="Find A Helpline (free, confidential helplines by country)",
        contact="https://findahelpline.com",
        region="international",
    ),
    CrisisResource(name="988 Suicide & Crisis Lifeline", contact="call or text 988", region="US"),
    CrisisResource(name="Samaritans", contact="call 116 123 (free, any time)", region="UK and Ireland"),
    CrisisResource(
        name="National Domestic Violence Hotline",
        contact="call 1-800-799-7233 or text START to 88788",
        region="US",
        categories=["danger_from_others"],
    ),
]


class SafetySettings(StrictModel):
    """The safe reply given to a seeker at risk in chat and serving (docs/safety.md). A floor, not a clinical tool."""

    reply_on: list[Literal["urgent", "concern"]] = Field(
        default_factory=lambda: ["urgent"],
        description="Levels answered by the safe reply instead of the model; at other risk levels the model "
        "answers and its reply gets the resources appended when it gives none.",
    )
    emergency_note: str = Field(
        "If you are in immediate danger, call your local emergency number first "
        "(for example 911 in the US and Canada, 999 in the UK, 112 in the EU).",
        description="Said before any resource: a local emergency number comes first.",
    )
    resources: list[CrisisResource] = Field(
        default_factory=lambda: [r.model_copy() for r in DEFAULT_RESOURCES],
        description="Crisis lines for your users' region(s): name, contact, region, optional categories.",
    )


class ServeSettings(StrictModel):
    """`esc-evolve serve` and `esc-evolve chat` (docs/serving.md): limits, auth, batching, profile memory."""

    host: str = Field("127.0.0.1", description="Loopback by default; bind 0.0.0.0 only behind your own proxy.")
    port: int = Field(8000, ge=0, le=65535)
    api_key_env: str = Field(
        "ESC_EVOLVE_API_KEY", description="When this variable is set, every request needs 'Authorization: Bearer KEY'."
    )
    max_body_bytes: int = Field(64_000, ge=1024)
    max_messages: int = Field(64, ge=1, description="Messages per request.")
    max_chars_per_message: int = Field(4000, ge=1)
    max_tokens_cap: int = Field(512, ge=1, description="A request's max_tokens above this is refused.")
    max_temperature: float = Field(1.5, ge=0)
    batch_window_ms: float = Field(
        5.0, ge=0, description="Concurrent requests arriving within this window share a batch."
    )
    batch_max_wait_ms: float = Field(
        500.0,
        ge=0,
        description="How long the oldest queued request waits for requests that arrived and are still being checked "
        "(safety) before the engine starts without them.",
    )
    max_batch: int = Field(16, ge=1)
    store: bool = Field(True, description="Keep conversations and inferred profiles per seeker (local SQLite).")
    db_path: str | None = Field(None, description="Default: the user's data directory (esc-evolve/seekers.db).")
    use_profile: bool = Field(False, description="Generate with the stored profile in the system message.")
    profile_every: int = Field(3, ge=1, description="Infer the seeker's profile every K seeker turns (background).")


class SimulateSettings(StrictModel):
    """Simulated seekers playing role cards against each model (docs/simulation.md): the seeker simulator, the
    length of a dialogue and which cards. Scores use the eval section's bootstrap, CI level, distractors and
    strategy classifier."""

    backend: str = Field(
        "local",
        description="A registered simulator backend: 'local' (a local model, no adapter) or 'openai' (an "
        "OpenAI-compatible server: a strong simulator is one line away).",
    )
    model: str | None = Field(
        None, description="local: a model id, alias or folder to play the seekers (default model.name, no adapter)."
    )
    openai: OpenAISettings | None = Field(
        None, description="openai: the server; fields left unset come from generation.openai."
    )
    cards_path: str | None = Field(None, description="A role-card file (.yaml/.json/.jsonl); default the packaged.")
    max_cards: int | None = Field(None, ge=1, description="A seeded sample of N cards (file order kept); null = all.")
    turns: int = Field(8, ge=1, description="Supporter turns per dialogue (the seeker speaks first and after each).")
    max_new_tokens: int = Field(64, ge=1, description="Token budget of one seeker message.")
    rating_max_new_tokens: int = Field(64, ge=1, description="Token budget of the end rating and its reason.")
    temperature: float = Field(0.7, ge=0.0, description="Seeker sampling (seeded per card and turn); 0 = greedy.")
    top_p: float = Field(0.95, gt=0.0, le=1.0)
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto",
        description="local: the SIMULATOR's precision only (the models under test keep model.dtype). 'auto' = "
        "bfloat16 on a CPU with AMX, else model.dtype's choice (fp32 on other CPUs: with AVX512-BF16 alone, bf16 "
        "prefill was slower; docs/simulation.md).",
    )
    batch_size: int | None = Field(
        64,
        ge=1,
        description="Rows per batch of the local engines in a simulation, the models under test and the local "
        "simulator (a turn's requests are one call, cut into equal batches of at most this many, and of at most "
        "65,536 prompt + new token cells); null = generation.batch_size.",
    )
    reuse_prompt_cache: bool = Field(
        True,
        description="Local engines keep each dialogue's prompt keys and values from one turn to the next and "
        "compute only the new tokens (the next turn's prompt extends the last one); docs/simulation.md.",
    )
    in_run: bool = Field(False, description="Add the stage `eval.simulate` to `esc-evolve run` (after eval).")
    models: list[str] | None = Field(
        None, description="The run's models the stage simulates (m0, m1, ...); null = m0 and the newest."
    )


class ExperimentConfig(StrictModel):
    """The whole pipeline: data -> model -> SFT -> evolve x N (DPO) -> eval."""

    run: RunSettings = RunSettings()
    data: DataSettings = DataSettings()
    model: ModelSettings = ModelSettings()
    generation: GenerationSettings = GenerationSettings()
    sft: SFTSettings = SFTSettings()
    evolve: EvolveSettings = EvolveSettings()
    dpo: DPOSettings = DPOSettings()
    eval: EvalSettings = EvalSettings()
    safety: SafetySettings = SafetySettings()
    serve: ServeSettings = ServeSettings()
    simulate: SimulateSettings = SimulateSettings()


# ---------------------------------------------------------------------------------------------------------
# Keys renamed since configs were first written: old files keep working, and the log says what to rename.

RENAMED_KEYS: dict[str, str] = {
    "sft.max_seq_length": "sft.max_length",
    **{f"generation.{k}": f"generation.transformers.{k}" for k in TransformersSettings.model_fields},
    **{f"generation.{k}": f"generation.vllm.{k}" for k in VLLMSettings.model_fields},
    "generation.openai_base_url": "generation.openai.base_url",
    "generation.openai_model": "generation.openai.model",
    "generation.openai_api_key_env": "generation.openai.api_key_env",
    "generation.request_timeout": "generation.openai.request_timeout",
    "generation.max_concurrency": "generation.openai.max_concurrency",
    "eval.judge_backend": "eval.judge.backend",
    "eval.judge_url": "eval.judge.openai.base_url",
    "eval.judge_api_key_env": "eval.judge.openai.api_key_env",
    "eval.judge_max_new_tokens": "eval.judge.max_new_tokens",
    "eval.judge_pairs": "eval.judge.pairs",
    "eval.judge_max_contexts": "eval.judge.max_contexts",
}
# Keys that are gone: what to do instead.
REMOVED_KEYS: dict[str, str] = {
    "data.format": "the format is detected from each file; delete the key",
}


# ---------------------------------------------------------------------------------------------------------
# Loading


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> ExperimentConfig:
    """Read a YAML config (following `extends:`), apply `key.path=value` overrides, validate."""
    raw: dict[str, Any] = _read_yaml_chain(Path(path)) if path else {}
    for item in overrides or []:
        _apply_override(raw, item)
    return validate_config(raw, source=str(path) if path else "<defaults>")


def validate_config(raw: dict[str, Any], source: str) -> ExperimentConfig:
    raw = migrate_keys(raw, source)
    try:
        return ExperimentConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(_explain(exc, source)) from None


def migrate_keys(raw: dict[str, Any], source: str) -> dict[str, Any]:
    """A copy of `raw` with renamed keys moved to their new place (each said once in the log); a removed key is
    dropped with what to do instead. A key given under both its old and its new name is an error."""
    raw = copy.deepcopy(raw)
    for old, new in _renames(raw).items():
        value = _pop_path(raw, old)
        if value is _MISSING:
            continue
        if _get_path(raw, new) is not _MISSING:
            raise ConfigError(f"{source}: '{old}' and '{new}' are the same setting: keep only '{new}'")
        _set_path(raw, new, value)
        log.warning("%s: '%s' is now '%s'; rename it (the old name still works for now)", source, old, new)
    for old, advice in REMOVED_KEYS.items():
        if _pop_path(raw, old) is not _MISSING:
            log.warning("%s: '%s' is no longer a setting (%s)", source, old, advice)
    return raw


def _renames(raw: dict[str, Any]) -> dict[str, str]:
    # `eval.judge_model` named the local judge model or the served one, depending on the backend.
    backend = _get_path(raw, "eval.judge_backend")
    served = backend == "openai" or _get_path(raw, "eval.judge.backend") == "openai"
    return {**RENAMED_KEYS, "eval.judge_model": "eval.judge.openai.model" if served else "eval.judge.model"}


_MISSING = object()


def _get_path(raw: dict[str, Any], dotted: str) -> Any:
    node: Any = raw
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return _MISSING
        node = node[part]
    return node


def _pop_path(raw: dict[str, Any], dotted: str) -> Any:
    *parents, last = dotted.split(".")
    node = _get_path(raw, ".".join(parents)) if parents else raw
    if not isinstance(node, dict) or last not in node:
        return _MISSING
    return node.pop(last)


def _set_path(raw: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, last = dotted.split(".")
    node = raw
    for part in parents:
        child = node.get(part)
        if not isinstance(child, dict):
            child = node[part] = {}
        node = child
    node[last] = value


def dump_config(config: ExperimentConfig) -> str:
    """The resolved config as YAML (every field, defaults included), except `eval.judge.openai`, which keeps
    only the fields set: the others come from `generation.openai`, and must still do so when the file is read."""
    data = config.model_dump(mode="json")
    if config.eval.judge.openai is not None:
        data["eval"]["judge"]["openai"] = config.eval.judge.openai.model_dump(mode="json", exclude_unset=True)
    return yaml.safe_dump(data, sort_keys=False, allow_unicode=True)


def _read_yaml_chain(path: Path, seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    path = path.expanduser()
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    if path.resolve() in seen:
        raise ConfigError(f"{path}: 'extends' forms a cycle")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections (run, data, model, ...)")
    parent = data.pop("extends", None)
    if parent is None:
        return data
    base = _read_yaml_chain(path.parent / parent, (*seen, path.resolve()))
    return _deep_merge(base, data)


def _deep_merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _apply_override(raw: dict[str, Any], item: str) -> None:
    """Apply `sft.learning_rate=1e-4`; the value is parsed as YAML (numbers, booleans, lists, null)."""
    key, sep, text = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set expects KEY=VALUE (e.g. sft.learning_rate=1e-4), got {item!r}")
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        value = text
    parts = key.strip().split(".")
    node = raw
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"--set {key}: '{part}' is not a section")
        node = child
    node[parts[-1]] = value


def _explain(exc: ValidationError, source: str) -> str:
    lines = [f"{source}: invalid config"]
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"])
        if err["type"] == "extra_forbidden":
            lines.append(f"  unknown key '{loc}'{_suggest(err['loc'])}")
        else:
            lines.append(f"  {loc}: {err['msg']} (got {err.get('input')!r})")
    return "\n".join(lines)


def _suggest(loc: tuple[Any, ...]) -> str:
    """Find the closest valid key in the section that holds the unknown one."""
    model: type[BaseModel] = ExperimentConfig
    for part in loc[:-1]:
        field = model.model_fields.get(str(part))
        annotation = getattr(field, "annotation", None)
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return ""
        model = annotation
    close = difflib.get_close_matches(str(loc[-1]), list(model.model_fields), n=1)
    return f" (did you mean '{close[0]}'?)" if close else f" (valid keys: {', '.join(model.model_fields)})"
