# Copyright 2026 The OpenChroma authors. Licensed under the Apache License, Version 2.0.
"""The one tiny-model builder: config, random model, tokenizer, processor and a saved checkpoint folder, built offline.

Used by the CLI and the server (when no weights are given), the tests, the benchmarks and the docs. The model is
random: it outputs noise and gibberish.

The tokenizer matches `ChromaConfig.tiny()`: ordinary tokens have ids 0..999 (the 256 byte-level symbols at their
byte values, then BPE merges learned deterministically from a small built-in English text, then unused filler
entries), and the Qwen2.5-Omni special block sits at ``real_id - 151643 + 1000`` (ids 1000..1023), in Qwen's order,
so that ``<|endoftext|>`` = 1000 (pad), ``<|im_start|>`` = 1001, ..., ``<|text_start|>`` = 1022,
``<|text_end|>`` = 1023.

Not a hub file (no hub file imports it): ``from openchroma.testing import save_tiny_checkpoint``.
"""

import collections

import torch

from tokenizers import Regex, pre_tokenizers
from transformers import Qwen2Tokenizer, WhisperFeatureExtractor
from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

from ..configuration_chroma import TINY_SPECIAL_TOKENS_REAL_IDS
from ..processing_chroma import CHAT_TEMPLATE, ChromaProcessor


QWEN_FIRST_SPECIAL_ID = 151643
TINY_FIRST_SPECIAL_ID = 1000  # = number of ordinary tokens

# Qwen2.5-Omni's added tokens from <|endoftext|> (151643) to <|file_sep|> (151664), then Chroma's two, in id order.
# `special=False` for the two tool-call tags, as in Qwen's tokenizer.
QWEN_OMNI_ADDED_TOKENS = [
    ("<|endoftext|>", True),
    ("<|im_start|>", True),
    ("<|im_end|>", True),
    ("<|AUDIO|>", True),
    ("<|audio_bos|>", True),
    ("<|audio_eos|>", True),
    ("<|box_end|>", True),
    ("<|quad_start|>", True),
    ("<|quad_end|>", True),
    ("<|vision_bos|>", True),
    ("<|vision_eos|>", True),
    ("<|vision_pad|>", True),
    ("<|IMAGE|>", True),
    ("<|VIDEO|>", True),
    ("<tool_call>", False),
    ("</tool_call>", False),
    ("<|fim_prefix|>", True),
    ("<|fim_middle|>", True),
    ("<|fim_suffix|>", True),
    ("<|fim_pad|>", True),
    ("<|repo_name|>", True),
    ("<|file_sep|>", True),
    ("<|text_start|>", True),
    ("<|text_end|>", True),
]

# Text the BPE merges are learned from (our own words; any English text would do).
_MERGE_CORPUS = """
Chroma is a spoken dialogue model. It listens to what you say, thinks about an answer, and speaks it back in the
voice of a short reference recording. The thinker reads the conversation and writes the text of the answer; the
backbone and the depth decoder turn that text into audio codes, one frame every eighty milliseconds; the codec
turns the codes into a waveform you can hear. Hello, how are you today? I am fine, thank you. What is the weather
like in the city this morning? It is sunny and warm, with a light wind from the west. Please tell me a story about
a small robot that wanted to learn how to sing. Once upon a time there was a little robot who lived in a quiet
house by the sea. Every evening the robot listened to the waves and tried to sing along with them. The first
song was not very good, but the robot kept trying, and one day the neighbours opened their windows to listen.
Can you explain how the model keeps the voice of the speaker? The reference audio is encoded into codes, and
those codes are placed before the answer, so the answer continues in the same voice. Thank you for listening.
One, two, three, four, five, six, seven, eight, nine, ten. The numbers are 12, 345 and 6789.
"""


def _bytes_to_unicode():
    """GPT-2's byte -> printable character table used by byte-level BPE (byte b is written as one character)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    characters = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            characters.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, characters)))


def _learn_merges(text, max_merges):
    """Plain BPE on the pre-tokenized words of `text`; ties broken by the pair's characters (deterministic)."""
    pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    words = collections.Counter(word for word, _ in pre_tokenizer.pre_tokenize_str(text))
    words = {tuple(word): count for word, count in words.items()}
    merges = []
    while len(merges) < max_merges:
        pairs = collections.Counter()
        for word, count in words.items():
            for pair in zip(word, word[1:]):
                pairs[pair] += count
        if not pairs:
            break
        best = min(pairs, key=lambda pair: (-pairs[pair], pair))
        if pairs[best] < 2:
            break
        merges.append(best)
        merged = {}
        for word, count in words.items():
            symbols, i = [], 0
            while i < len(word):
                if word[i : i + 2] == best:
                    symbols.append(best[0] + best[1])
                    i += 2
                else:
                    symbols.append(word[i])
                    i += 1
            merged[tuple(symbols)] = merged.get(tuple(symbols), 0) + count
        words = merged
    return merges


def build_tiny_tokenizer() -> Qwen2Tokenizer:
    """A Qwen2 byte-level BPE tokenizer with 1024 ids whose special tokens carry `ChromaConfig.tiny()`'s ids.

    Ids 0..255 are the byte symbols, then learned merges, then fillers up to 999 (never produced), then the 24
    Qwen2.5-Omni/Chroma special tokens at 1000..1023. The chat template is [`CHAT_TEMPLATE`].
    """
    byte_symbols = _bytes_to_unicode()
    vocab = {byte_symbols[byte]: byte for byte in range(256)}
    merges = _learn_merges(_MERGE_CORPUS, TINY_FIRST_SPECIAL_ID - len(vocab))
    for left, right in merges:
        vocab.setdefault(left + right, len(vocab))
    while len(vocab) < TINY_FIRST_SPECIAL_ID:
        vocab[f"<|tiny_unused_{len(vocab)}|>"] = len(vocab)
    for token, _ in QWEN_OMNI_ADDED_TOKENS:
        vocab[token] = len(vocab)

    special = [token for token, is_special in QWEN_OMNI_ADDED_TOKENS if is_special and token != "<|endoftext|>"]
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=merges, extra_special_tokens=special)
    tokenizer.add_tokens([token for token, is_special in QWEN_OMNI_ADDED_TOKENS if not is_special])
    tokenizer.chat_template = CHAT_TEMPLATE
    for token, real_id in TINY_SPECIAL_TOKENS_REAL_IDS.items():  # the contract with ChromaConfig.tiny()
        expected = real_id - QWEN_FIRST_SPECIAL_ID + TINY_FIRST_SPECIAL_ID
        if tokenizer.convert_tokens_to_ids(token) != expected:
            raise RuntimeError(f"{token} got id {tokenizer.convert_tokens_to_ids(token)}, expected {expected}")
    return tokenizer


def build_tiny_feature_extractor() -> WhisperFeatureExtractor:
    """Qwen2.5-Omni's audio front end: 128 mel bins, 16 kHz, hop 160, n_fft 400, clips up to 300 s."""
    return WhisperFeatureExtractor(
        feature_size=128,
        sampling_rate=16000,
        hop_length=160,
        n_fft=400,
        chunk_length=300,
        padding_value=0.0,
        return_attention_mask=True,
    )


def build_tiny_processor(**kwargs) -> ChromaProcessor:
    """A `ChromaProcessor` over the tiny tokenizer and the real feature-extractor settings (kwargs go to it)."""
    return ChromaProcessor(build_tiny_feature_extractor(), build_tiny_tokenizer(), **kwargs)


def save_tiny_processor(folder) -> ChromaProcessor:
    """Write the tiny processor (tokenizer, feature extractor, chat template, processing_chroma.py, auto_map) to
    `folder`, loadable with ``AutoProcessor.from_pretrained(folder, trust_remote_code=True)``."""
    processor = build_tiny_processor()
    processor.save_pretrained(folder)
    return processor


TINY_MODEL_SEED = 0  # the seed the CLI, the server and the docs build the tiny model with


def build_tiny_config(**overrides):
    """`ChromaConfig.tiny(**overrides)`: the sizes of the official random-weight fixtures, the tiny tokenizer's ids."""
    from ..configuration_chroma import ChromaConfig

    return ChromaConfig.tiny(**overrides)


def build_tiny_model(seed: int = TINY_MODEL_SEED, **config_overrides):
    """A tiny random `ChromaForConditionalGeneration`, float32, eval mode, the same weights for the same seed (the
    caller's RNG is left untouched). It outputs noise.

    Mimi's codebooks are buffers that a fresh model leaves at zero (every frame would encode to code 0 and every
    code decode to the same sound), so they are randomised here, as the official fixtures do.
    """
    from ..modeling_chroma import ChromaForConditionalGeneration

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = ChromaForConditionalGeneration(build_tiny_config(**config_overrides))
        randomize_codebooks(model.codec_model)
    return model.eval()


def randomize_codebooks(codec_model) -> None:
    """Give Mimi's codebooks random entries (a fresh MimiModel leaves them at zero), from the current torch RNG."""
    with torch.no_grad():
        for name, buffer in codec_model.named_buffers():
            if name.endswith("codebook.embed_sum"):
                buffer.normal_()
            elif name.endswith("codebook.cluster_usage"):
                buffer.uniform_(0.5, 1.5)
            elif name.endswith("codebook.initialized"):
                buffer.fill_(1.0)


def save_tiny_checkpoint(folder, seed: int = TINY_MODEL_SEED, **config_overrides):
    """Write a complete tiny checkpoint to `folder`: weights, config, generation config, tokenizer, feature
    extractor, chat template and the hub files with their auto_map, so that both
    ``AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)`` and
    ``AutoProcessor.from_pretrained(folder, trust_remote_code=True)`` load it (as they load the published
    checkpoint). Returns (model, processor)."""
    model = build_tiny_model(seed, **config_overrides)
    model.save_pretrained(folder)
    processor = save_tiny_processor(folder)
    return model, processor


__all__ = [
    "TINY_MODEL_SEED",
    "build_tiny_config",
    "build_tiny_feature_extractor",
    "build_tiny_model",
    "build_tiny_processor",
    "build_tiny_tokenizer",
    "randomize_codebooks",
    "save_tiny_checkpoint",
    "save_tiny_processor",
]
