"""Names of what an OpenAI request may ask of an engine beyond plain text generation.

The gateway names the features a request uses (``engine_features`` in its schemas); a worker
registers the ones its engine cannot honour (``WorkerInfo.unsupported``); the gateway refuses a request
that needs one with a 400 naming the engine, before anything is stored. vLLM honours them all; the
simulated engine none.
"""

from __future__ import annotations

from typing import Final

VLLM_GENERATION_FIELDS: Final = frozenset(
    {
        "logit_bias",
        "min_tokens",
        "bad_words",
        "allowed_token_ids",
        "echo",
        "best_of",
        "suffix",
        "use_beam_search",
        "length_penalty",
        "include_stop_str_in_output",
        "skip_special_tokens",
        "spaces_between_special_tokens",
        "add_generation_prompt",
        "continue_final_message",
        "add_special_tokens",
        "chat_template",
        "chat_template_kwargs",
        "documents",
        "reasoning_effort",
        "thinking_token_budget",
        "truncate_prompt_tokens",
        "prompt_logprobs",
        "logprob_token_ids",
        "return_token_ids",
        "return_tokens_as_token_ids",
        "mm_processor_kwargs",
        "vllm_xargs",
        "repetition_detection",
    }
)
"""vLLM request fields (``vllm.entrypoints.openai``'s protocol classes) that change what is generated or
returned; fields outside this set that vLLM does not know it ignores, and so does tokenspool."""

ENGINE_FEATURES: Final = VLLM_GENERATION_FIELDS | frozenset(
    {"n", "tools", "response_format", "structured_outputs", "media", "prompt_list", "prompt_token_ids"}
)
"""Every name the gateway may report for a request: what an engine that renders only plain text lacks
(``prompt_list``: a completion with several prompts; ``prompt_token_ids``: a prompt given as token ids)."""
