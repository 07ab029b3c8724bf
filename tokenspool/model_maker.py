"""A tiny random-weight Llama model made on the spot, so the real vLLM path can be tested offline.

Nothing can be downloaded where tokenspool's tests run (no model hub), yet the worker's vLLM engine
must be exercised on a real model folder through vLLM's real loading code. :func:`make_test_model`
writes such a folder in a second or two: a two-layer Llama with random weights and a word-level
tokenizer with a chat template. The model's output is meaningless, but it is made of readable words
(a byte-level tokenizer would print broken UTF-8 from random weights), every token is one word, and
the folder is byte-for-byte the same every time it is made, so tests and benchmarks are repeatable.

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

CHAT_TEMPLATE: Final = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ message['role'] }} : {{ message['content'] }} {{ eos_token }} "
    "{% endfor %}"
    "{% if add_generation_prompt %}assistant :{% endif %}"
)
"""Each turn as ``role : content </s>``, then ``assistant :`` to prompt a reply (every piece is a word)."""

_PUNCTUATION: Final = tuple(".,!?;:'\"-()[]/&%$#@*+=<>")
_DIGITS: Final = tuple("0123456789")
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
    """
"""Everyday words, so that prompts people type tokenize mostly to known words rather than ``<unk>``."""
_ONSETS: Final = ("b", "d", "f", "g", "h", "k", "l", "m", "n", "p", "r", "s", "t", "v", "w", "z", "br", "st")
_VOWELS: Final = ("a", "e", "i", "o", "u")
_CODAS: Final = ("", "", "n", "r", "l", "s")


def build_vocabulary() -> list[str]:
    """The vocabulary in id order: special tokens, punctuation, digits, everyday words, then made-up words.

    The made-up words are two syllables (onset, vowel, optional coda) drawn in a seeded order, so the
    list is the same on every run and every platform (``random.Random`` with a fixed seed is stable),
    and random weights print pronounceable words such as ``tobar`` or ``stelu``.
    """
    words: list[str] = [*SPECIAL_TOKENS, *_PUNCTUATION, *_DIGITS, *_COMMON_WORDS_TEXT.split()]
    seen = set(words)
    syllables = ["".join(parts) for parts in itertools.product(_ONSETS, _VOWELS, _CODAS)]
    syllables = list(dict.fromkeys(syllables))
    made_up = ["".join(pair) for pair in itertools.product(syllables, repeat=2)]
    random.Random(VOCAB_SEED).shuffle(made_up)
    for word in made_up:
        if len(words) == VOCAB_SIZE:
            break
        if word not in seen:
            seen.add(word)
            words.append(word)
    if len(words) != VOCAB_SIZE:  # pragma: no cover - the syllable space is far larger than the vocabulary
        raise RuntimeError(f"built {len(words)} words, wanted {VOCAB_SIZE}")
    return words


def _write_json(path: Path, data: dict[str, Any]) -> None:
    """Write JSON with sorted keys and a trailing newline: identical bytes for identical content."""
    path.write_text(json.dumps(data, indent=2, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8")


def _write_tokenizer(directory: Path, vocabulary: list[str]) -> None:
    """Write ``tokenizer.json``, ``tokenizer_config.json`` (with the chat template) and the special tokens map.

    The ``tokenizers`` pipeline: lowercase, split on whitespace, punctuation and single digits, look each
    piece up as a whole word (``<unk>`` otherwise), add ``<s>`` in front of a plain encode (as Llama does;
    the chat template writes its own ``<s>``), and decode by joining words with spaces (the WordPiece
    decoder with no ``##`` continuations and no clean-up is exactly that, and vLLM's incremental
    detokenizer then yields each new word with its leading space).
    """
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    vocab = {word: index for index, word in enumerate(vocabulary)}
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    tokenizer.normalizer = normalizers.Lowercase()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Whitespace(), pre_tokenizers.Punctuation(), pre_tokenizers.Digits(individual_digits=True)]
    )
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, vocab[BOS])]
    )
    tokenizer.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    tokenizer.add_special_tokens(list(SPECIAL_TOKENS))
    (directory / "tokenizer.json").write_text(tokenizer.to_str(pretty=True) + "\n", encoding="utf-8")

    added_tokens_decoder = {
        str(vocab[token]): {
            "content": token,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": True,
        }
        for token in SPECIAL_TOKENS
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


def _write_model(directory: Path, vocabulary: list[str]) -> None:
    """Write ``config.json``, ``generation_config.json`` and ``model.safetensors`` (bfloat16, tied embeddings).

    Weights are drawn tensor by tensor, in sorted name order, from one seeded ``torch.Generator``
    rather than by the model's own initialisers, so the bytes depend on nothing but the seed and the
    parameter names (not on global RNG state or on how a ``transformers`` release initialises).
    They are stored as bfloat16 and the input embedding doubles as the output head, which keeps the
    file around 0.8 MB.
    """
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

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
    config.save_pretrained(directory)
    GenerationConfig(bos_token_id=ids[BOS], eos_token_id=ids[EOS], pad_token_id=ids[PAD]).save_pretrained(directory)

    with torch.device("meta"):
        skeleton = LlamaForCausalLM(config)
    shapes = {name: tuple(tensor.shape) for name, tensor in skeleton.state_dict().items()}
    shapes.pop("lm_head.weight", None)  # tied to model.embed_tokens.weight
    generator = torch.Generator(device="cpu").manual_seed(WEIGHTS_SEED)
    tensors: dict[str, Any] = {}
    for name in sorted(shapes):
        shape = shapes[name]
        if name.endswith("norm.weight"):
            value = torch.ones(shape, dtype=torch.float32)
        else:
            value = torch.randn(shape, generator=generator, dtype=torch.float32) * INIT_STD
        tensors[name] = value.to(torch.bfloat16).contiguous()
    # safetensors comes with transformers; imported by name since it ships no type information.
    save_file = importlib.import_module("safetensors.torch").save_file
    save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})


def make_test_model(directory: Path) -> Path:
    """Write the test model into ``directory`` (created if missing) and return it.

    The folder holds a Llama config (hidden size 128, 2 layers, 2 heads, 1 KV head, head_dim 64,
    2048 positions), its generation config, random bfloat16 weights, and a 2048-word WordLevel
    tokenizer whose ``tokenizer_config.json`` carries a Jinja chat template. It is under 1 MB, needs no
    network, and the same bytes come out on every call; point vLLM (or ``transformers``) at it like
    any downloaded model.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    vocabulary = build_vocabulary()
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
