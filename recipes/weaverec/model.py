"""The LLM side of WeaveRec in one import: base model, LoRA training, candidate scoring, generation.

The implementation is split by concern:

* :mod:`weaverec.prompts`  – prompt wording, chat-template tokenisation, answer masks (no torch needed)
* :mod:`recipe_common.llm` – base model resolution / GGUF conversion, tiny test models, loading for evaluation
  (shared with the other recipes)
* :mod:`weaverec.train`    – WeaveRec samples -> the shared LoRA training (:mod:`recipe_common.train`: accelerate,
  CPU, multi-GPU, multi-node)
* :mod:`weaverec.scoring`  – candidate log-likelihoods with a shared prompt KV cache, top-k generation, latency
"""

from __future__ import annotations

from recipe_common.llm import (
    SMOLLM2_SPEC,
    ModelInfo,
    build_tiny_tokenizer,
    convert_gguf,
    count_parameters,
    default_cache_dir,
    load_base_model,
    load_for_eval,
    load_tokenizer,
    model_info,
    resolve_base_model,
    tiny_llama,
)
from .prompts import SYSTEM_PROMPT, PromptConfig, PromptEncoder, parse_titles
from .scoring import (
    CandidateScores,
    LatencyStats,
    generate_topk,
    measure_scoring_latency,
    score_candidates,
    score_candidates_detailed,
    titles_to_candidate_indices,
)
from .train import ALL_PROJECTIONS, LoraTrainConfig, TrainResult, samples_fingerprint, train_lora

__all__ = [
    "ALL_PROJECTIONS",
    "SMOLLM2_SPEC",
    "SYSTEM_PROMPT",
    "CandidateScores",
    "LatencyStats",
    "LoraTrainConfig",
    "ModelInfo",
    "PromptConfig",
    "PromptEncoder",
    "TrainResult",
    "build_tiny_tokenizer",
    "convert_gguf",
    "count_parameters",
    "default_cache_dir",
    "generate_topk",
    "load_base_model",
    "load_for_eval",
    "load_tokenizer",
    "measure_scoring_latency",
    "model_info",
    "parse_titles",
    "resolve_base_model",
    "samples_fingerprint",
    "score_candidates",
    "score_candidates_detailed",
    "tiny_llama",
    "titles_to_candidate_indices",
    "train_lora",
]
