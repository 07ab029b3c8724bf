"""A tiny random-weight Llama model made on the spot, so the real vLLM path can be tested offline.

Nothing can be downloaded where tokenspool's tests run (no model hub), yet the worker's vLLM engine
must be exercised on a real model folder through vLLM's real loading code. :func:`make_test_model`
writes such a folder in a second or two: a two-layer Llama with random weights and a word-level
tokenizer with a chat template. The model's output is meaningless, but it is made of readable words
(a byte-level tokenizer would print broken UTF-8 from random weights), every token is one word or mark
(with its leading space) so that structured output can spell JSON, the chat template renders tools and
tool calls Hermes-style and reasoning Qwen-style, and
the folder is byte-for-byte the same every time it is made, so tests and benchmarks are repeatable.

``make_test_model(directory, multimodal=True)`` writes the multimodal sibling: the same Llama (and
vocabulary, with ``<image>`` in place of the last made-up word) behind a tiny BLIP-2 vision tower and
Q-Former, so image content parts run through vLLM's real multimodal path. BLIP-2 because it is the smallest
vision-language architecture vLLM 0.32 serves on CPU without torchvision (which does not load beside vLLM's
CPU torch, so the CPU install goes without it): vLLM's LLaVA, PaliGemma, Qwen2-VL and Gemma 3 all import
``transformers``' Pixtral image processor, which needs it.

The module imports nothing heavy: ``torch``, ``transformers``, ``tokenizers`` and ``safetensors``
(all of which come with vLLM) are imported inside :func:`make_test_model`, so importing it costs
nothing where vLLM is not installed.
"""

from __future__ import annotations

import hashlib
import importlib
import itertools
import json
import random
from pathlib import Path
from typing import Any, Final

VOCAB_SIZE: Final = 2048
"""Tokens in the vocabulary; small enough that the tied embedding keeps the folder under 1 MB."""
HIDDEN_SIZE: Final = 128
INTERMEDIATE_SIZE: Final = 64
NUM_LAYERS: Final = 2
NUM_HEADS: Final = 2
NUM_KV_HEADS: Final = 1
HEAD_DIM: Final = 64
"""vLLM's CPU attention backend rejects small head sizes (16 fails); 64 works."""
MAX_POSITIONS: Final = 2048
INIT_STD: Final = 0.4
"""Far above a trained model's 0.02: with tiny weights the tied embedding makes greedy decoding repeat the
last token forever, while this scale gives varied greedy output, so continuation tests compare real sequences."""
WEIGHTS_SEED: Final = 20240601
VOCAB_SEED: Final = 7

UNK, BOS, EOS, PAD = "<unk>", "<s>", "</s>", "<pad>"
SPECIAL_TOKENS: Final = (UNK, BOS, EOS, PAD)
"""In id order 0..3, as in Llama's own vocabulary (unk 0, bos 1, eos 2)."""
TOOL_CALL_START, TOOL_CALL_END = "<tool_call>", "</tool_call>"
THINK_START, THINK_END = "<think>", "</think>"
MARKUP_TOKENS: Final = (TOOL_CALL_START, TOOL_CALL_END, THINK_START, THINK_END)
"""Hermes-style tool-call markers and Qwen-style reasoning markers (ids 4..7): plain added tokens, so they
stay in the text vLLM's tool parser (``--tool-call-parser hermes``) and reasoning parser
(``--reasoning-parser qwen3``) read."""

CHAT_TEMPLATE: Final = (
    "{{ bos_token }}"
    "{%- if tools %}system : tools :{% for tool in tools %} {{ tool.function | tojson }}{% endfor %} </s>\n{% endif %}"
    "{%- for message in messages %}"
    "{%- if message.role == 'assistant' and message.tool_calls %}assistant :"
    "{% if message.content %} {{ message.content }}{% endif %}"
    "{% for call in message.tool_calls %}<tool_call>"
    '{"name": {{ call.function.name | tojson }}, "arguments": '
    "{{ call.function.arguments if call.function.arguments is string else call.function.arguments | tojson }}}"
    "</tool_call>{% endfor %} </s>\n"
    "{%- else %}{{ message.role }} : {{ message.content if message.content is string else '' }} </s>\n"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}assistant :"
    "{% if enable_thinking is false %} <think> </think>{% elif enable_thinking is true %} <think>{% endif %}"
    "{% endif %}"
)
"""Each turn as ``role : content </s>``; tools listed in a system turn as their JSON; an assistant's tool
calls Hermes-style (``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``); then ``assistant :``
(closing an empty ``<think> </think>`` when ``enable_thinking`` is false, as Qwen3's template does, and opening
``<think>`` when it is true, as thinking models' templates do: random weights never write ``<think>`` themselves, and
vLLM's ``thinking_token_budget`` counts, and ends, only a reasoning the prompt opened)."""

IMAGE_TOKEN: Final = "<image>"
"""The multimodal model's image token (BLIP-2's, which vLLM looks up by this spelling); it takes the last
made-up word's id, so both models have the same vocabulary size and ids."""
IMAGE_SIZE: Final = 28
PATCH_SIZE: Final = 14
"""A 28 x 28 image in 14-pixel patches: four patches, the least work a vision tower can do."""
NUM_QUERY_TOKENS: Final = 4
"""Q-Former queries: each image becomes this many ``<image>`` tokens at the start of the prompt."""
VISION_HIDDEN_SIZE: Final = 128
"""Vision tower and Q-Former width: head size 64 with two heads, as for the language model."""

_PUNCTUATION: Final = tuple(".,!?;:'\"-()[]{}_/&%$#@*+=<>")
_DIGITS: Final = tuple("0123456789")
_LETTERS: Final = tuple("abcdefghijklmnopqrstuvwxyz")
"""Every letter is a token too, so a grammar engine never writes itself into a dead end: xgrammar allows any
token that is a prefix of what the grammar may say next, so without them ``"get_weathe"`` (`` "``, ``get``,
``_``, ``we``, ``at``, ``he``) would leave no token to finish ``weather`` with, and vLLM fails the request."""
_COMMON_WORDS_TEXT: Final = """
    a about after again all also always am an and any are as ask assistant at away back be because
    been before being best better big both but by call came can come could day did do does done down
    each end even every few find first for from get give go good great had has have he hello help helpful her
    here hi him his how i if in into is it its just keep kind know last let life like little long look
    made make man many may me more most much must my name need never new next no not now number of off
    old on once one only or other our out over own part people place please point put read really
    right said same say see she should show side since small so some something start still stop story
    system take tell than thank thanks that the their them then there these they thing think this those
    three through time to today too try two under up us use user very want was way we well were what
    when where which while who why will with word work world would write yes yet you your
    true false null tool tools arguments city weather unit celsius type object properties string
    parameters
    """
"""Everyday words (and JSON's), so that prompts people type tokenize mostly to known words rather than
``<unk>``."""
_ONSETS: Final = ("b", "d", "f", "g", "h", "k", "l", "m", "n", "p", "r", "s", "t", "v", "w", "z", "br", "st")
_VOWELS: Final = ("a", "e", "i", "o", "u")
_CODAS: Final = ("", "", "n", "r", "l", "s")
PRE_TOKENIZER_PATTERN: Final = r" ?[a-z]+| ?[0-9]| ?[^\sa-z0-9]|\s"
"""A piece is a word, a digit or a punctuation mark, each with the one space before it if any, or a lone
whitespace character: the vocabulary holds every piece as it is spelled, so decoding is concatenation."""


def build_vocabulary() -> list[str]:
    """The vocabulary in id order: special and markup tokens, whitespace, then punctuation, digits, letters and
    everyday words (each bare and with a leading space), then made-up words with a leading space.

    Every token is the text it decodes to, so text decodes by concatenation and a grammar engine
    (vLLM's structured output) can spell any JSON with it: ``{"city": "rome"}`` is ``{``, ``"``, ``city``,
    ``"``, ``:``, `` "``, ``rome``, ``"``, ``}``. The made-up words are two syllables (onset, vowel,
    optional coda) drawn in a seeded order, so the list is the same on every run and every platform
    (``random.Random`` with a fixed seed is stable), and random weights print pronounceable words such as
    `` tobar`` or `` stelu``.
    """
    pieces = [*_PUNCTUATION, *_DIGITS, *dict.fromkeys([*_LETTERS, *_COMMON_WORDS_TEXT.split()])]
    words: list[str] = [*SPECIAL_TOKENS, *MARKUP_TOKENS, "\n", " "]
    words += [spelled for piece in pieces for spelled in (piece, " " + piece)]
    seen = set(words)
    syllables = ["".join(parts) for parts in itertools.product(_ONSETS, _VOWELS, _CODAS)]
    syllables = list(dict.fromkeys(syllables))
    made_up = ["".join(pair) for pair in itertools.product(syllables, repeat=2)]
    random.Random(VOCAB_SEED).shuffle(made_up)
    for word in made_up:
        if len(words) == VOCAB_SIZE:
            break
        if " " + word not in seen:
            seen.add(" " + word)
            words.append(" " + word)
    if len(words) != VOCAB_SIZE:  # pragma: no cover - the syllable space is far larger than the vocabulary
        raise RuntimeError(f"built {len(words)} words, wanted {VOCAB_SIZE}")
    return words


def _write_json(path: Path, data: dict[str, Any]) -> None:
    """Write JSON with sorted keys and a trailing newline: identical bytes for identical content."""
    path.write_text(json.dumps(data, indent=2, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8")


def _write_tokenizer(directory: Path, vocabulary: list[str], added_tokens: tuple[str, ...] = MARKUP_TOKENS) -> None:
    """Write ``tokenizer.json``, ``tokenizer_config.json`` (with the chat template) and the special tokens map.

    The ``tokenizers`` pipeline: lowercase, split into words, digits and punctuation marks each with its
    leading space (:data:`PRE_TOKENIZER_PATTERN`), look each piece up whole (``<unk>`` otherwise), add
    ``<s>`` in front of a plain encode (as Llama does; the chat template writes its own ``<s>``), and decode
    by concatenation (``Fuse``): a token's text is its vocabulary entry, which is what a grammar engine
    assumes of a vocabulary it cannot classify as byte-level or byte-fallback.
    """
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    vocab = {word: index for index, word in enumerate(vocabulary)}
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    tokenizer.normalizer = normalizers.Lowercase()
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex(PRE_TOKENIZER_PATTERN), behavior="isolated")
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, vocab[BOS])]
    )
    tokenizer.decoder = decoders.Fuse()
    tokenizer.add_special_tokens(list(SPECIAL_TOKENS))
    tokenizer.add_tokens([AddedToken(token, normalized=False) for token in added_tokens])
    (directory / "tokenizer.json").write_text(tokenizer.to_str(pretty=True) + "\n", encoding="utf-8")

    added_tokens_decoder = {
        str(vocab[token]): {
            "content": token,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": token in SPECIAL_TOKENS,
        }
        for token in (*SPECIAL_TOKENS, *added_tokens)
    }
    _write_json(
        directory / "tokenizer_config.json",
        {
            "added_tokens_decoder": added_tokens_decoder,
            "bos_token": BOS,
            "eos_token": EOS,
            "unk_token": UNK,
            "pad_token": PAD,
            "chat_template": CHAT_TEMPLATE,
            "clean_up_tokenization_spaces": False,
            "model_max_length": MAX_POSITIONS,
            "tokenizer_class": "PreTrainedTokenizerFast",
        },
    )
    _write_json(
        directory / "special_tokens_map.json",
        {"bos_token": BOS, "eos_token": EOS, "unk_token": UNK, "pad_token": PAD},
    )


def _text_config(vocabulary: list[str]) -> Any:
    """The Llama config both models share (the multimodal one as its language model)."""
    from transformers import LlamaConfig

    ids = {word: index for index, word in enumerate(vocabulary)}
    config = LlamaConfig(
        vocab_size=len(vocabulary),
        hidden_size=HIDDEN_SIZE,
        intermediate_size=INTERMEDIATE_SIZE,
        num_hidden_layers=NUM_LAYERS,
        num_attention_heads=NUM_HEADS,
        num_key_value_heads=NUM_KV_HEADS,
        head_dim=HEAD_DIM,
        max_position_embeddings=MAX_POSITIONS,
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
        bos_token_id=ids[BOS],
        eos_token_id=ids[EOS],
        pad_token_id=ids[PAD],
        dtype="bfloat16",
    )
    config.architectures = ["LlamaForCausalLM"]
    return config


def _write_generation_config(directory: Path, vocabulary: list[str]) -> None:
    from transformers import GenerationConfig

    ids = {word: index for index, word in enumerate(vocabulary)}
    GenerationConfig(bos_token_id=ids[BOS], eos_token_id=ids[EOS], pad_token_id=ids[PAD]).save_pretrained(directory)


def _write_weights(directory: Path, model_class: Any, config: Any, tied_head: str) -> None:
    """Write ``model.safetensors``: random bfloat16 weights for ``model_class(config)``, ``tied_head`` left out.

    Weights are drawn tensor by tensor, in sorted name order, from one seeded ``torch.Generator``
    rather than by the model's own initialisers, so the bytes depend on nothing but the seed and the
    parameter names (not on global RNG state or on how a ``transformers`` release initialises). Norm
    weights are ones and biases zeros (Llama has no biases); the input embedding doubles as the output
    head (``tied_head``), which keeps the file around 0.8 MB.
    """
    import torch

    with torch.device("meta"):
        skeleton = model_class(config)
    shapes = {name: tuple(tensor.shape) for name, tensor in skeleton.state_dict().items()}
    shapes.pop(tied_head, None)
    generator = torch.Generator(device="cpu").manual_seed(WEIGHTS_SEED)
    tensors: dict[str, Any] = {}
    for name in sorted(shapes):
        shape = shapes[name]
        owner, _, kind = name.rpartition(".")
        if kind == "weight" and "norm" in owner.rpartition(".")[2].lower():
            value = torch.ones(shape, dtype=torch.float32)
        elif kind == "bias":
            value = torch.zeros(shape, dtype=torch.float32)
        else:
            value = torch.randn(shape, generator=generator, dtype=torch.float32) * INIT_STD
        tensors[name] = value.to(torch.bfloat16).contiguous()
    # safetensors comes with transformers; imported by name since it ships no type information.
    save_file = importlib.import_module("safetensors.torch").save_file
    save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})


def _write_model(directory: Path, vocabulary: list[str]) -> None:
    """Write the Llama's ``config.json``, ``generation_config.json`` and ``model.safetensors``."""
    from transformers import LlamaForCausalLM

    config = _text_config(vocabulary)
    config.save_pretrained(directory)
    _write_generation_config(directory, vocabulary)
    _write_weights(directory, LlamaForCausalLM, config, tied_head="lm_head.weight")


def _write_multimodal_model(directory: Path, vocabulary: list[str]) -> None:
    """Write a BLIP-2 (two-layer vision tower, one-layer Q-Former, the Llama as language model) and what its
    processor reads: ``preprocessor_config.json`` (a 28 x 28 BLIP image processor) and
    ``processor_config.json`` (the number of query tokens)."""
    from transformers import Blip2Config, Blip2ForConditionalGeneration, Blip2QFormerConfig, Blip2VisionConfig

    vision = Blip2VisionConfig(
        hidden_size=VISION_HIDDEN_SIZE,
        intermediate_size=INTERMEDIATE_SIZE,
        num_hidden_layers=NUM_LAYERS,
        num_attention_heads=NUM_HEADS,
        image_size=IMAGE_SIZE,
        patch_size=PATCH_SIZE,
    )
    qformer = Blip2QFormerConfig(
        hidden_size=VISION_HIDDEN_SIZE,
        intermediate_size=INTERMEDIATE_SIZE,
        num_hidden_layers=1,
        num_attention_heads=NUM_HEADS,
        encoder_hidden_size=VISION_HIDDEN_SIZE,
        vocab_size=2,  # the Q-Former's own word embedding is unused by BLIP-2 captioning
    )
    config = Blip2Config(
        vision_config=vision.to_dict(),
        qformer_config=qformer.to_dict(),
        text_config=_text_config(vocabulary).to_dict(),
        num_query_tokens=NUM_QUERY_TOKENS,
        image_token_index=vocabulary.index(IMAGE_TOKEN),
    )
    config.tie_word_embeddings = True  # the language model's head is its input embedding, as in the Llama
    config.architectures = ["Blip2ForConditionalGeneration"]
    config.save_pretrained(directory)
    _write_generation_config(directory, vocabulary)
    _write_weights(directory, Blip2ForConditionalGeneration, config, tied_head="language_model.lm_head.weight")
    _write_json(
        directory / "preprocessor_config.json",
        {
            "do_convert_rgb": True,
            "do_normalize": True,
            "do_rescale": True,
            "do_resize": True,
            "image_mean": [0.48145466, 0.4578275, 0.40821073],
            "image_processor_type": "BlipImageProcessor",
            "image_std": [0.26862954, 0.26130258, 0.27577711],
            "resample": 3,
            "rescale_factor": 1 / 255,
            "size": {"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        },
    )
    _write_json(
        directory / "processor_config.json",
        {"num_query_tokens": NUM_QUERY_TOKENS, "processor_class": "Blip2Processor"},
    )


def make_test_model(directory: Path, *, multimodal: bool = False) -> Path:
    """Write the test model into ``directory`` (created if missing) and return it.

    The folder holds a Llama config (hidden size 128, 2 layers, 2 heads, 1 KV head, head_dim 64,
    2048 positions), its generation config, random bfloat16 weights, and a 2048-word WordLevel
    tokenizer whose ``tokenizer_config.json`` carries a Jinja chat template. It is under 1 MB, needs no
    network, and the same bytes come out on every call; point vLLM (or ``transformers``) at it like
    any downloaded model.

    With ``multimodal``, the model is a BLIP-2 around that Llama (see the module's docstring): it takes
    image content parts, each a 28 x 28 image (larger ones are resized) seen as four ``<image>`` tokens
    put at the start of the prompt. The chat template is the same (vLLM passes a string-content template
    the text parts joined, and places the image tokens itself). About 1 MB too.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    vocabulary = build_vocabulary()
    if multimodal:
        vocabulary[-1] = IMAGE_TOKEN
        _write_tokenizer(directory, vocabulary, (*MARKUP_TOKENS, IMAGE_TOKEN))
        _write_multimodal_model(directory, vocabulary)
    else:
        _write_tokenizer(directory, vocabulary)
        _write_model(directory, vocabulary)
    return directory


def folder_digest(directory: Path) -> dict[str, str]:
    """SHA-256 of every file in ``directory`` by relative path: compare two of these to check determinism."""
    directory = Path(directory)
    return {
        str(path.relative_to(directory)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(directory.rglob("*"))
        if path.is_file()
    }
