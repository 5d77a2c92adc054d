# Copyright 2026 The OpenChroma authors. Licensed under the Apache License, Version 2.0.
"""Fine-tune Chroma's speech generator (backbone + depth decoder) on spoken answers in a reference voice.

    python -m openchroma.training --model FlashLabs/Chroma-4B --data train.jsonl --output-dir out \\
        --mixed-precision bf16 --learning-rate 1e-5 --max-steps 2000
    accelerate launch -m openchroma.training ...        # several GPUs (DDP): see docs/finetuning.md

The dataset is JSONL, one example per line (format: docs/finetuning.md and `read_examples`). The thinker and the
Mimi codec stay frozen: the collator runs them without gradients to build, for every example, exactly the backbone
sequence `ChromaGenerator` feeds at inference when the thinker says the answer's text and the depth decoder picks
the answer's audio codes::

    [E(text_start), E(transcript)..., E(text_end), frame(ref_1)..frame(ref_F), 0, h_0, E(t_1)]
    then for s = 1 .. T+1:  frame(a_{s-1})  [+ h_j, E(t_{j+1}) when s <= T, s % 2 == 0, the text is not finished]

with a_0..a_{T-1} the answer's Mimi frames, a_T an EOS frame (every codebook = codebook_eos_token_id) so that the
model learns to stop, t_1..t_N the answer's text ids followed by <|im_end|>, and h_j the thinker's post-norm hidden
state at t_j's position (h_0 at the last prompt position) from one teacher-forced thinker pass over prompt + answer.
Labels hold the frame at every answer/EOS frame slot and -100 elsewhere; the model's forward shifts them by one, so
each slot that ends an inference step is trained to predict the frame that step samples.

Not a hub file: none of configuration_/modeling_/generation_/processing_chroma.py imports it, so it may use
accelerate, peft (optional, for --lora-rank) and tqdm.
"""

import argparse
import json
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import soundfile as sf
import torch

from ..generation_chroma import ChromaGenerator
from ..modeling_chroma import ChromaForConditionalGeneration
from ..processing_chroma import load_audio


logger = logging.getLogger("openchroma.finetune")

REQUIRED_FIELDS = ("messages", "answer_text", "answer_audio", "reference_audio", "reference_text")
ROLES = ("system", "user", "assistant")

# What each slot of a training sequence holds (`slot_types` in the collator's output).
SLOT_PAD = 0  # right padding (attention 0)
SLOT_TEXT = 1  # E(text_start), E(transcript id), E(text_end)
SLOT_REFERENCE_FRAME = 2  # frame embedding of a reference-voice frame
SLOT_REFERENCE_END = 3  # the all-zero vector closing the reference audio
SLOT_THINKER_HIDDEN = 4  # h_j, the thinker's post-norm hidden state
SLOT_ANSWER_TOKEN = 5  # E(t_j), an answer text id (the last one fed is <|im_end|> unless the audio ends first)
SLOT_ANSWER_FRAME = 6  # frame embedding of an answer frame (labelled)
SLOT_EOS_FRAME = 7  # frame embedding of the appended EOS frame (labelled)
FRAME_SLOTS = (SLOT_REFERENCE_FRAME, SLOT_ANSWER_FRAME, SLOT_EOS_FRAME)

# Parts of the speech generator that train unless frozen with --freeze (the thinker and the codec never train).
TRAINABLE_PARTS = {
    "backbone-layers": ("backbone.model.",),
    "codebook0-head": ("backbone.codebook0_head.",),
    "audio-embedding": ("backbone.audio_embedding.", "decoder.audio_embedding."),  # one tied table
    "decoder-projection": ("decoder.projection.",),
    "decoder-layers": ("decoder.model.",),
    "decoder-heads": ("decoder.codebook_head.",),
}
PART_GROUPS = {
    "backbone": ("backbone-layers", "codebook0-head"),
    "decoder": ("decoder-projection", "decoder-layers", "decoder-heads"),
}
# LoRA adapters go on the Llama linears of the backbone and depth decoder layers (names inside `model.backbone` /
# `model.decoder`; the thinker's same-named linears are never touched).
LORA_TARGETS = r"model\.layers\.\d+\.(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)"


# ----------------------------------------------------------------------------------------------------------------------
# Dataset
# ----------------------------------------------------------------------------------------------------------------------


@dataclass
class FinetuneExample:
    """One validated JSONL line; audio paths are absolute."""

    where: str  # "train.jsonl:12", for error messages
    messages: list
    answer_text: str
    answer_audio: str
    reference_audio: str
    reference_text: str


def read_examples(path, check_audio=True):
    """Parse and validate a JSONL dataset. -> list of `FinetuneExample`.

    Every line is one JSON object::

        {"messages": [{"role": "system", "content": "..."},                       # optional
                      {"role": "user", "content": [{"type": "audio", "audio": "q.wav"},
                                                   {"type": "text", "text": "..."}]}],
         "answer_text": "...", "answer_audio": "a.wav",
         "reference_audio": "voice.wav", "reference_text": "transcript of voice.wav"}

    Paths are relative to the JSONL file (absolute ones are kept). Message content is a string or a list of
    text/audio items; the last message is the user's. Blank lines are skipped; other keys are ignored.
    With `check_audio`, every audio file must be readable (header check, or a full decode where soundfile
    cannot tell). Raises ValueError naming the file and line for any problem.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"Dataset file not found: {str(path)!r}")
    base = path.resolve().parent
    examples = []
    with open(path, encoding="utf-8") as file:
        for number, line in enumerate(file, start=1):
            if line.strip():
                examples.append(_parse_line(line, f"{path.name}:{number}", base, check_audio))
    if not examples:
        raise ValueError(f"{path}: no examples (the file is empty)")
    return examples


def _parse_line(line, where, base, check_audio):
    try:
        record = json.loads(line)
    except json.JSONDecodeError as error:
        raise ValueError(f"{where}: not valid JSON ({error})") from None
    if not isinstance(record, dict):
        raise ValueError(f"{where}: each line must be a JSON object, got {type(record).__name__}")
    missing = [name for name in REQUIRED_FIELDS if name not in record]
    if missing:
        raise ValueError(f"{where}: missing field(s) {', '.join(missing)} (required: {', '.join(REQUIRED_FIELDS)})")
    for name in ("answer_text", "reference_text"):
        if not isinstance(record[name], str) or not record[name].strip():
            raise ValueError(f"{where}: {name} must be a non-empty string")

    def audio_path(value, name):
        if not isinstance(value, str) or not value:
            raise ValueError(f"{where}: {name} must be a path (string) relative to the JSONL file")
        resolved = Path(value) if os.path.isabs(value) else base / value
        if not resolved.is_file():
            raise ValueError(f"{where}: {name} file not found: {str(resolved)!r}")
        if check_audio:
            _check_readable(resolved, f"{where}: {name}")
        return str(resolved)

    messages = _parse_messages(record["messages"], where, audio_path)
    return FinetuneExample(
        where=where,
        messages=messages,
        answer_text=record["answer_text"].strip(),
        answer_audio=audio_path(record["answer_audio"], "answer_audio"),
        reference_audio=audio_path(record["reference_audio"], "reference_audio"),
        reference_text=record["reference_text"].strip(),
    )


def _parse_messages(messages, where, audio_path):
    if not isinstance(messages, list) or not messages:
        raise ValueError(f"{where}: messages must be a non-empty list of {{'role', 'content'}} objects")
    parsed = []
    for index, message in enumerate(messages):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise ValueError(f"{where}: messages[{index}] must be an object with 'role' and 'content'")
        role, content = message["role"], message["content"]
        if role not in ROLES:
            raise ValueError(f"{where}: messages[{index}] has role {role!r}; expected one of {', '.join(ROLES)}")
        if role == "system" and index != 0:
            raise ValueError(f"{where}: only the first message may be a system message")
        if isinstance(content, str):
            parsed.append({"role": role, "content": content})
            continue
        if not isinstance(content, list) or not content:
            raise ValueError(f"{where}: messages[{index}].content must be a string or a non-empty list of items")
        items = []
        for item in content:
            kind = item.get("type") if isinstance(item, dict) else None
            if kind == "text" and isinstance(item.get("text"), str):
                items.append({"type": "text", "text": item["text"]})
            elif kind == "audio":
                items.append({"type": "audio", "audio": audio_path(item.get("audio"), f"messages[{index}] audio")})
            else:
                raise ValueError(
                    f"{where}: messages[{index}] has an invalid item {item!r:.80}; use "
                    "{'type': 'text', 'text': str} or {'type': 'audio', 'audio': path}"
                )
        parsed.append({"role": role, "content": items})
    if parsed[-1]["role"] != "user":
        raise ValueError(f"{where}: the last message must be the user's (the answer is the assistant's next turn)")
    return parsed


def _check_readable(path, what):
    try:
        info = sf.info(str(path))
        if info.frames == 0:
            raise ValueError(f"{what}: {str(path)!r} holds no samples")
        return
    except ValueError:
        raise
    except Exception:  # not a libsndfile format: a full decode tells (librosa/audioread)
        pass
    try:
        load_audio(str(path), 16000)
    except ValueError as error:
        raise ValueError(f"{what}: unreadable audio {str(path)!r} ({error})") from None


class ChromaFinetuneDataset(torch.utils.data.Dataset):
    """The examples of a JSONL file; items carry decoded audio (safe to load in DataLoader workers).

    An item is a dict: ``index``, ``where``, ``messages`` (user audio as ``(waveform, rate)`` at the thinker's rate),
    ``answer_text``, ``answer_audio`` and ``reference_audio`` (float32 [T] at the codec's 24 kHz), ``reference_text``.
    """

    def __init__(self, path, thinker_sampling_rate=16000, codec_sampling_rate=24000, check_audio=True):
        self.examples = read_examples(path, check_audio=check_audio)
        self.thinker_sampling_rate = thinker_sampling_rate
        self.codec_sampling_rate = codec_sampling_rate

    def __len__(self):
        return len(self.examples)

    def __getitem__(self, index):
        example = self.examples[index]

        def load(source, rate, what):
            try:
                return load_audio(source, rate)
            except ValueError as error:
                raise ValueError(f"{example.where}: {what}: {error}") from None

        messages = []
        for message in example.messages:
            content = message["content"]
            if not isinstance(content, str):
                content = [
                    {"type": "audio", "audio": (load(item["audio"], self.thinker_sampling_rate, "user audio"),
                                                self.thinker_sampling_rate)} if item["type"] == "audio" else item
                    for item in content
                ]
            messages.append({"role": message["role"], "content": content})
        answer = load(example.answer_audio, self.codec_sampling_rate, "answer_audio")
        reference = load(example.reference_audio, self.codec_sampling_rate, "reference_audio")
        return {
            "index": index, "where": example.where, "messages": messages, "answer_text": example.answer_text,
            "answer_audio": answer, "reference_audio": reference, "reference_text": example.reference_text,
        }


# ----------------------------------------------------------------------------------------------------------------------
# Collator: the backbone sequence of generation, teacher-forced
# ----------------------------------------------------------------------------------------------------------------------


class ChromaDataCollator:
    """Dataset items -> a training batch for `ChromaForConditionalGeneration.forward`.

    Runs the frozen thinker (one teacher-forced pass over prompt + answer ids) and Mimi (reference and answer audio)
    under `torch.no_grad()` with both in eval mode. Returns, right-padded to the longest row:

        inputs_embeds [B, L, D]  backbone inputs, laid out exactly as `ChromaGenerator` builds them
        attention_mask [B, L]    1 = real slot, 0 = padding
        labels [B, L, K]         the frame at answer/EOS frame slots (and reference frames if asked), -100 elsewhere
        audio_codes [B, L, K]    the frame at every frame slot (reference too), -100 elsewhere; lets the training
                                 step re-embed frames with gradients into the audio table (`training_loss`)
        slot_types [B, L]        SLOT_* constant of every slot

    Args:
        model: the `ChromaForConditionalGeneration` being trained (its thinker, codec and embeddings are used).
        processor: a `ChromaProcessor` with the model's tokenizer.
        label_reference_frames: also train codebook prediction on the reference voice's frames (default off: only
            the frames generation samples are targets).
        max_length: longest allowed sequence (default: the backbone's max_position_embeddings).
        cache: keep every built row (CPU) by dataset index; valid while the thinker and codec are frozen (frame
            embeddings are recomputed from `audio_codes` by the training step anyway).
        dataset: the `ChromaFinetuneDataset`, to accept indices instead of items (with `cache`, a cached example is
            then never decoded again).
    """

    def __init__(self, model, processor, label_reference_frames=False, max_length=None, cache=False, dataset=None):
        self.model = model
        self.dataset = dataset
        self.processor = processor
        self.config = model.config
        self.label_reference_frames = label_reference_frames
        self.max_length = max_length or self.config.backbone_config.max_position_embeddings
        self.cache = {} if cache else None
        self._warned = set()  # examples already reported for text longer than their audio
        im_end = processor.tokenizer.convert_tokens_to_ids("<|im_end|>")
        if im_end != self.config.im_end_token_id:
            raise ValueError(
                f"The processor's <|im_end|> id {im_end} differs from the model's im_end_token_id "
                f"{self.config.im_end_token_id}: tokenizer and model do not belong together"
            )

    @property
    def device(self):
        return self.model.backbone_device_dtype()[0]

    @torch.no_grad()
    def __call__(self, items):
        """items: dataset items, or dataset indices (ints) when the collator holds the dataset; then only the
        examples missing from the cache are loaded and decoded."""
        self.model.thinker.eval()
        self.model.codec_model.eval()
        rows, todo = [None] * len(items), []
        for i, item in enumerate(items):
            index = item if isinstance(item, int) else item["index"]
            if self.cache is not None and index in self.cache:
                rows[i] = self.cache[index]
            else:
                todo.append((i, self.dataset[item] if isinstance(item, int) else item))
        if todo:
            for (i, item), row in zip(todo, self.build_rows([item for _, item in todo])):
                rows[i] = row
                if self.cache is not None:
                    self.cache[item["index"]] = {k: v.cpu() for k, v in row.items()}
        return self.pad([{k: v.to(self.device) for k, v in row.items()} for row in rows])

    def answer_ids(self, text, where="answer_text"):
        """Answer text -> t_1..t_N: its token ids followed by <|im_end|>."""
        ids = self.processor.tokenizer(text, add_special_tokens=False)["input_ids"]
        if not ids or self.config.im_end_token_id in ids:
            raise ValueError(f"{where}: the answer text must give at least one token and no <|im_end|>")
        return ids + [self.config.im_end_token_id]

    def build_rows(self, items):
        """Unpadded rows (dicts of tensors) for the given dataset items."""
        model, config, device = self.model, self.config, self.device
        try:
            inputs = self.processor(
                [item["messages"] for item in items],
                prompt_audio=[(item["reference_audio"], self.processor.codec_sampling_rate) for item in items],
                prompt_text=[item["reference_text"] for item in items],
                add_generation_prompt=True,
            )
        except ValueError as error:  # e.g. a user clip too long or too short for the thinker
            raise ValueError(f"{', '.join(item['where'] for item in items)}: {error}") from None
        inputs = {k: v.to(device) for k, v in inputs.items()}
        answers = [model.encode_audio(torch.as_tensor(item["answer_audio"], device=device)[None, None])[0]
                   for item in items]  # each [T, K], every clip at its own length
        texts = [self.answer_ids(item["answer_text"], item["where"]) for item in items]
        voices = ChromaGenerator(model).voices_from_inputs(  # the reference voice exactly as generation encodes it
            inputs["input_ids"], inputs["attention_mask"], inputs["input_values"], inputs["input_values_cutoffs"]
        )
        hidden = self.thinker_states(inputs, texts, answers)
        rows = []
        for b, item in enumerate(items):
            row = self.assemble(voices[b], answers[b], texts[b], hidden[b])
            length = row["inputs_embeds"].shape[0]
            if length > self.max_length:
                raise ValueError(
                    f"{item['where']}: the training sequence has {length} positions, more than max_length "
                    f"{self.max_length}; shorten the reference or the answer audio"
                )
            fed = int((row["slot_types"] == SLOT_ANSWER_TOKEN).sum())
            if fed < len(texts[b]) and item["where"] not in self._warned:
                self._warned.add(item["where"])
                seconds = answers[b].shape[0] / config.codec_config.frame_rate
                logger.warning(
                    "%s: the answer audio (%.2f s, %d frames) is too short for its text (%d tokens with <|im_end|>, "
                    "%.1f tokens/s; generation feeds at most %.2f tokens/s, one per %d frames): the last %d tokens "
                    "are never fed (with --model tiny this is expected: its test tokenizer cuts words into "
                    "~1.4-character pieces, so natural speech exceeds the limit; see docs/finetuning.md)",
                    item["where"], seconds, answers[b].shape[0], len(texts[b]), len(texts[b]) / seconds,
                    config.codec_config.frame_rate / config.audio_frames_per_text_token,
                    config.audio_frames_per_text_token, len(texts[b]) - fed,
                )
            rows.append(row)
        return rows

    def thinker_states(self, inputs, texts, answers):
        """One teacher-forced thinker pass over prompt + t_1..t_m (m = the last token whose state is fed).

        -> per row, the post-norm hidden states h_0..h_m [m + 1, D] (h_0 at the last prompt position)."""
        thinker, config = self.model.thinker, self.config
        per_text = config.audio_frames_per_text_token
        pad_id = config.thinker_config.pad_token_id or 0
        sequences = []
        for b, text in enumerate(texts):
            prompt = inputs["thinker_input_ids"][b][inputs["thinker_attention_mask"][b].bool()]
            fed = min(len(text) - 1, answers[b].shape[0] // per_text)  # pairs [h_j, E(t_j+1)], j = 1..fed
            sequences.append(torch.cat([prompt, prompt.new_tensor(text[:fed])]))
        length = max(len(s) for s in sequences)
        ids = torch.full((len(sequences), length), pad_id, dtype=torch.long, device=self.device)
        mask = torch.zeros_like(ids)
        for b, sequence in enumerate(sequences):  # left padding, as the processor does
            ids[b, length - len(sequence):] = sequence
            mask[b, length - len(sequence):] = 1
        positions = (mask.cumsum(-1) - 1).clamp(min=0)  # the rule `ChromaGenerator.thinker_prefill` uses
        kwargs = {}
        if "thinker_input_features" in inputs:
            kwargs["input_features"] = inputs["thinker_input_features"].to(thinker.dtype)
            kwargs["feature_attention_mask"] = inputs["thinker_feature_attention_mask"]
        out = thinker(
            input_ids=ids, attention_mask=mask, position_ids=positions[None].expand(3, -1, -1),
            use_cache=False, output_hidden_states=True, **kwargs,
        )
        hidden = out.hidden_states[-1]  # post-norm (the lm_head input), as in generation
        states = []
        for b, sequence in enumerate(sequences):
            fed = len(sequence) - int(inputs["thinker_attention_mask"][b].sum())
            states.append(hidden[b, length - fed - 1:])  # h_0 .. h_fed
        return states

    def assemble(self, voice, answer_codes, text, text_hidden):
        """One row, in generation's order (see the module docstring).

        voice: the `ChromaVoice` of the reference (its `prefix_embeddings` is generation's prompt prefix
        [E(text_start), E(transcript), E(text_end), frame_emb(reference), 0]); answer_codes [T, K]; text t_1..t_N
        (list of ids); text_hidden [m + 1, D] = h_0..h_m."""
        model, config = self.model, self.config
        device, dtype = model.backbone_device_dtype()
        k, per_text = config.audio_num_codebooks, config.audio_frames_per_text_token
        embeds, types, codes = [], [], []

        def add(vectors, slot, frame_codes=None):
            embeds.append(vectors.to(dtype).reshape(-1, vectors.shape[-1]))
            types.append(torch.full((embeds[-1].shape[0],), slot, dtype=torch.long, device=device))
            if frame_codes is None:
                frame_codes = torch.full((embeds[-1].shape[0], k), -100, dtype=torch.long, device=device)
            codes.append(frame_codes.reshape(-1, k).to(device))

        def token(ids):
            return model.embed_text(torch.as_tensor(ids, dtype=torch.long, device=device).reshape(-1))

        prefix = voice.prefix_embeddings(model)
        transcript_end = voice.text_ids.numel() + 2
        if prefix.shape[0] != transcript_end + voice.codes.shape[0] + 1:
            raise RuntimeError("ChromaVoice.prefix_embeddings no longer has the layout this collator labels")
        add(prefix[:transcript_end], SLOT_TEXT)
        add(prefix[transcript_end:-1], SLOT_REFERENCE_FRAME, voice.codes)
        add(prefix[-1:], SLOT_REFERENCE_END)
        add(text_hidden[0], SLOT_THINKER_HIDDEN)
        add(token(text[0]), SLOT_ANSWER_TOKEN)
        talking, j = text[0] != config.im_end_token_id, 0
        eos = torch.full((1, k), config.codebook_eos_token_id, dtype=torch.long, device=device)
        frames = torch.cat([answer_codes, eos])  # a_0 .. a_{T-1}, EOS
        steps = answer_codes.shape[0]
        for s in range(1, steps + 2):
            frame = frames[s - 1: s]
            add(model.embed_frames(frame), SLOT_ANSWER_FRAME if s <= steps else SLOT_EOS_FRAME, frame)
            if s <= steps and s % per_text == 0 and talking:
                j += 1  # the thinker reads t_j and says t_{j+1}
                add(text_hidden[j], SLOT_THINKER_HIDDEN)
                add(token(text[j]), SLOT_ANSWER_TOKEN)
                talking = text[j] != config.im_end_token_id
        types, codes = torch.cat(types), torch.cat(codes)
        labelled = (types == SLOT_ANSWER_FRAME) | (types == SLOT_EOS_FRAME)
        if self.label_reference_frames:
            labelled |= types == SLOT_REFERENCE_FRAME
        labels = torch.where(labelled[:, None], codes, torch.full_like(codes, -100))
        return {"inputs_embeds": torch.cat(embeds), "labels": labels, "audio_codes": codes, "slot_types": types}

    def pad(self, rows):
        """Right-pad rows to the longest: attention 0, labels/codes -100, slot type SLOT_PAD."""
        length = max(row["inputs_embeds"].shape[0] for row in rows)
        first = rows[0]
        batch = len(rows)
        out = {
            "inputs_embeds": first["inputs_embeds"].new_zeros(batch, length, first["inputs_embeds"].shape[-1]),
            "attention_mask": torch.zeros(batch, length, dtype=torch.long, device=self.device),
            "labels": torch.full((batch, length, first["labels"].shape[-1]), -100, dtype=torch.long,
                                 device=self.device),
            "slot_types": torch.full((batch, length), SLOT_PAD, dtype=torch.long, device=self.device),
        }
        out["audio_codes"] = out["labels"].clone()
        for b, row in enumerate(rows):
            n = row["inputs_embeds"].shape[0]
            for name in ("inputs_embeds", "labels", "audio_codes", "slot_types"):
                out[name][b, :n] = row[name]
            out["attention_mask"][b, :n] = 1
        return out


def training_loss(model, batch):
    """Forward pass on a collated batch. Frame slots are re-embedded from `audio_codes` inside the graph when the
    audio table trains, so it learns from the backbone inputs as well as from the depth decoder's; the values equal
    the collator's `inputs_embeds`. `model` may be wrapped (DDP)."""
    core = model.module if hasattr(model, "module") else model
    embeds = batch["inputs_embeds"]
    if torch.is_grad_enabled() and core.backbone.audio_embedding.embed_audio_tokens.weight.requires_grad:
        is_frame = batch["audio_codes"][..., 0] >= 0
        frames = core.embed_frames(batch["audio_codes"]).to(embeds.dtype)
        embeds = torch.where(is_frame[..., None], frames, embeds)
    return model(inputs_embeds=embeds, labels=batch["labels"], attention_mask=batch["attention_mask"])


# ----------------------------------------------------------------------------------------------------------------------
# Model setup: what trains, LoRA, gradient checkpointing, saving
# ----------------------------------------------------------------------------------------------------------------------


def expand_parts(names):
    parts = []
    for name in names:
        for part in PART_GROUPS.get(name, (name,)):
            if part not in TRAINABLE_PARTS:
                raise ValueError(f"Unknown part {name!r}; choose from {', '.join([*TRAINABLE_PARTS, *PART_GROUPS])}")
            parts.append(part)
    return parts


def set_trainable(model, freeze=()):
    """Freeze everything, then unfreeze the speech-generator parts not listed in `freeze`. -> trainable count."""
    frozen = set(expand_parts(freeze))
    prefixes = tuple(p for part, names in TRAINABLE_PARTS.items() if part not in frozen for p in names)
    for name, param in model.named_parameters():
        param.requires_grad_(name.startswith(prefixes))
    # the tied audio table is one Parameter: frozen as soon as either name is frozen
    if "audio-embedding" in frozen:
        model.backbone.audio_embedding.embed_audio_tokens.weight.requires_grad_(False)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def add_lora(model, rank, alpha=None, dropout=0.0, freeze=()):
    """LoRA adapters (peft) on the Llama linears of the backbone and/or depth decoder layers still training; their
    base weights freeze, every other trainable part keeps full training. -> trainable count.

    Adapters are injected into `model.backbone` / `model.decoder` rather than the whole model: peft's tied-weight
    check calls `get_input_embeddings()`, which `ChromaForConditionalGeneration` does not define."""
    try:
        from peft import LoraConfig, inject_adapter_in_model
    except ImportError:
        raise SystemExit("--lora-rank needs peft: pip install peft") from None
    frozen = set(expand_parts(freeze))
    stacks = [stack for stack, part in (("backbone", "backbone-layers"), ("decoder", "decoder-layers"))
              if part not in frozen]
    if not stacks:
        raise ValueError("--lora-rank with both backbone-layers and decoder-layers frozen adapts nothing")
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    for stack in stacks:
        config = LoraConfig(r=rank, lora_alpha=alpha or 2 * rank, lora_dropout=dropout, target_modules=LORA_TARGETS)
        inject_adapter_in_model(config, getattr(model, stack))
    for name, param in model.named_parameters():
        if "lora_" in name:
            param.requires_grad_(True)
        else:  # base weights of adapted linears move to `...base_layer.weight` and stay frozen
            param.requires_grad_(name in trainable)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def enable_gradient_checkpointing(model):
    """Recompute backbone/decoder layer activations in the backward pass.

    transformers' own switch (`activation_checkpointing_enable` in 5.2x, `gradient_checkpointing_enable` in 5.0)
    sets the `gradient_checkpointing` flag of every module that has one, which includes our two Llama stacks
    (`ChromaTransformer`); the frozen thinker runs in eval mode without gradients, so its flag has no effect. If the
    switch fails, the two flags are set directly. -> which way was used."""
    switch = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
    try:
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            switch()
        how = switch.__name__
    except Exception as error:  # pragma: no cover - depends on the transformers release
        logger.warning("%s failed (%s); setting the flags of the backbone and decoder stacks", switch.__name__, error)
        how = "attributes"
    for stack in (model.backbone.model, model.decoder.model):
        stack.gradient_checkpointing = True
    return how


def merged_state_dict(model, state_dict):
    """State dict with LoRA adapters merged into their base weights and peft's names undone, so the checkpoint
    loads into the plain model (and with trust_remote_code) without peft."""
    from peft.tuners.lora import LoraLayer

    state = {k: v for k, v in state_dict.items() if ".lora_" not in k}
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer):
            for suffix in ("weight", "bias"):
                key = f"{name}.base_layer.{suffix}"
                if key in state:
                    value = state.pop(key)
                    if suffix == "weight":
                        value = value + module.get_delta_weight("default").to(value.dtype).to(value.device)
                    state[f"{name}.{suffix}"] = value
    return state


def save_checkpoint(accelerator, model, processor, folder, lora):
    """`save_pretrained` (config with auto_map, the hub .py files, weights) plus the processor, by the main process."""
    accelerator.wait_for_everyone()
    unwrapped = accelerator.unwrap_model(model)
    state = accelerator.get_state_dict(model)
    if lora:
        state = merged_state_dict(unwrapped, state)
    if accelerator.is_main_process:
        unwrapped.save_pretrained(folder, state_dict=state)
        if processor is not None:
            processor.save_pretrained(folder)
    accelerator.wait_for_everyone()


# ----------------------------------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------------------------------


def build_parser():
    parser = argparse.ArgumentParser(
        prog="python -m openchroma.training",
        description="Fine-tune Chroma's backbone and depth decoder (thinker and codec frozen). See docs/finetuning.md.",
    )
    parser.add_argument("--model", required=True, help="checkpoint folder or hub id; 'tiny' builds a seeded "
                        "random ChromaConfig.tiny() model with the tiny processor (smoke tests)")
    parser.add_argument("--processor", help="processor folder or hub id (default: --model)")
    parser.add_argument("--data", required=True, help="training JSONL (format: docs/finetuning.md)")
    parser.add_argument("--output-dir", required=True, help="final model, checkpoint-STEP folders, train_log.jsonl")
    parser.add_argument("--max-steps", type=int, help="optimizer steps (default: --epochs over the data)")
    parser.add_argument("--epochs", type=float, default=1.0)
    parser.add_argument("--batch-size", type=int, default=1, help="examples per device per micro-batch")
    parser.add_argument("--gradient-accumulation-steps", type=int, default=1)
    parser.add_argument("--learning-rate", "--lr", type=float, default=1e-5)
    parser.add_argument("--lr-scheduler", default="cosine", choices=["constant", "linear", "cosine"])
    parser.add_argument("--warmup-steps", type=int, default=0)
    parser.add_argument("--weight-decay", type=float, default=0.0)
    parser.add_argument("--max-grad-norm", type=float, default=1.0, help="0 disables clipping")
    parser.add_argument("--freeze", nargs="*", default=[], metavar="PART",
                        help=f"speech-generator parts to keep frozen: {', '.join([*TRAINABLE_PARTS, *PART_GROUPS])}")
    parser.add_argument("--lora-rank", type=int, default=0, help="LoRA on the backbone/decoder layers (needs peft)")
    parser.add_argument("--lora-alpha", type=float, help="default: 2 x rank")
    parser.add_argument("--lora-dropout", type=float, default=0.0)
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--mixed-precision", choices=["no", "bf16", "fp16"],
                        help="autocast through accelerate (default: accelerate's config, else no)")
    parser.add_argument("--frozen-dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                        help="dtype of the frozen thinker (auto: bfloat16 with --mixed-precision bf16, else float32)")
    parser.add_argument("--loss-stride", type=int, help="depth-decoder loss on every Nth frame (config default 16)")
    parser.add_argument("--decoder-loss-weight", type=float, help="w in (1 - w) backbone + w depth (config: 0.5)")
    parser.add_argument("--label-reference-frames", action="store_true",
                        help="also predict the reference voice's frames (default: answer frames only)")
    parser.add_argument("--max-length", type=int, help="longest backbone sequence (default max_position_embeddings)")
    parser.add_argument("--cache-examples", action="store_true",
                        help="keep collated rows in CPU memory (saves the thinker/Mimi passes after epoch 1)")
    parser.add_argument("--save-steps", type=int, default=0, help="also save checkpoint-STEP every N steps")
    parser.add_argument("--log-steps", type=int, default=10)
    parser.add_argument("--num-workers", type=int, default=0, help="DataLoader workers (audio decoding)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cpu", action="store_true", help="train on CPU even if a GPU is present")
    return parser


def load_model_and_processor(args, frozen_dtype):
    """-> (model with the thinker in `frozen_dtype`, the rest float32; processor)."""
    if args.model == "tiny":
        from ..testing import build_tiny_model, build_tiny_processor

        model = build_tiny_model(args.seed)
        processor = build_tiny_processor() if args.processor is None else None
    else:
        model = ChromaForConditionalGeneration.from_pretrained(args.model, dtype=frozen_dtype)
        processor = None
    if processor is None:
        from ..processing_chroma import ChromaProcessor

        processor = ChromaProcessor.from_pretrained(args.processor or args.model)
    model.thinker.to(frozen_dtype)
    for part in (model.backbone, model.decoder, model.codec_model):
        part.float()  # trained parts keep float32 master weights; Mimi stays float32 for exact codes
    return model, processor


def train(args):
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from tqdm.auto import tqdm
    from transformers import get_scheduler

    accelerator = Accelerator(
        mixed_precision=args.mixed_precision, gradient_accumulation_steps=args.gradient_accumulation_steps,
        cpu=args.cpu,
    )
    set_seed(args.seed)
    precision = accelerator.mixed_precision
    if accelerator.is_main_process:
        logger.info("%d process(es) (%s) on %s, mixed precision %s", accelerator.num_processes,
                    accelerator.distributed_type, accelerator.device, precision)
    frozen_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}.get(
        args.frozen_dtype, torch.bfloat16 if precision == "bf16" else torch.float32
    )
    dataset = ChromaFinetuneDataset(args.data)  # validated before the (large) model is loaded
    model, processor = load_model_and_processor(args, frozen_dtype)
    dataset.thinker_sampling_rate = processor.feature_extractor.sampling_rate
    dataset.codec_sampling_rate = processor.codec_sampling_rate
    if args.loss_stride is not None:
        model.config.loss_stride = args.loss_stride
    if args.decoder_loss_weight is not None:
        model.config.decoder_loss_weight = args.decoder_loss_weight
    trainable = set_trainable(model, args.freeze)
    if args.lora_rank:
        trainable = add_lora(model, args.lora_rank, args.lora_alpha, args.lora_dropout, args.freeze)
    if trainable == 0:
        raise ValueError("Nothing to train: every part is frozen")
    if args.gradient_checkpointing:
        logger.info("gradient checkpointing enabled via %s", enable_gradient_checkpointing(model))
    logger.info("trainable parameters: %d (%.1f M)", trainable, trainable / 1e6)

    # with --cache-examples the loader yields indices: the collator decodes an example only the first time
    loader = torch.utils.data.DataLoader(
        range(len(dataset)) if args.cache_examples else dataset, batch_size=args.batch_size, shuffle=True,
        collate_fn=list, num_workers=0 if args.cache_examples else args.num_workers,
        generator=torch.Generator().manual_seed(args.seed),
    )
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.learning_rate, weight_decay=args.weight_decay)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    steps_per_epoch = max(1, math.ceil(len(loader) / args.gradient_accumulation_steps))
    total = args.max_steps or max(1, math.ceil(args.epochs * steps_per_epoch))
    scheduler = get_scheduler(args.lr_scheduler, optimizer, num_warmup_steps=args.warmup_steps,
                              num_training_steps=total)
    core = accelerator.unwrap_model(model)
    collator = ChromaDataCollator(core, processor, args.label_reference_frames, args.max_length,
                                  cache=args.cache_examples, dataset=dataset)

    output = Path(args.output_dir)
    if accelerator.is_main_process:
        output.mkdir(parents=True, exist_ok=True)
        (output / "finetune_args.json").write_text(json.dumps(vars(args), indent=2))
        log_file = open(output / "train_log.jsonl", "w")
    progress = tqdm(total=total, desc="finetune", disable=not accelerator.is_local_main_process)
    model.train()
    core.thinker.eval()
    core.codec_model.eval()
    step, start, sums, count = 0, time.time(), torch.zeros(3, device=accelerator.device), 0
    while step < total:
        for items in loader:
            with accelerator.accumulate(model):
                batch = collator(items)
                out = training_loss(model, batch)
                accelerator.backward(out.loss)
                if accelerator.sync_gradients and args.max_grad_norm > 0:
                    accelerator.clip_grad_norm_(params, args.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad()
            sums += torch.stack([out.loss, out.backbone_loss, out.depth_loss]).detach().float()
            count += 1
            if not accelerator.sync_gradients:
                continue
            scheduler.step()
            step += 1
            progress.update(1)
            if step % args.log_steps == 0 or step in (1, total):
                loss, backbone, depth = (accelerator.reduce(sums, "mean") / count).tolist()
                record = {"step": step, "loss": loss, "backbone_loss": backbone, "depth_loss": depth,
                          "lr": scheduler.get_last_lr()[0], "elapsed_s": round(time.time() - start, 3)}
                progress.set_postfix(loss=f"{loss:.4f}", backbone=f"{backbone:.4f}", depth=f"{depth:.4f}")
                if accelerator.is_main_process:
                    log_file.write(json.dumps(record) + "\n")
                    log_file.flush()
                    logger.info("step %d loss %.4f backbone_loss %.4f depth_loss %.4f", step, loss, backbone, depth)
                sums.zero_()
                count = 0
            if args.save_steps and step % args.save_steps == 0 and step < total:
                save_checkpoint(accelerator, model, processor, output / f"checkpoint-{step}", args.lora_rank)
            if step >= total:
                break
    progress.close()
    save_checkpoint(accelerator, model, processor, output, args.lora_rank)
    if accelerator.is_main_process:
        log_file.close()
        logger.info("saved the fine-tuned model to %s (%.1f s)", output, time.time() - start)
    accelerator.end_training()
    return output


def main(argv=None):
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from tqdm.contrib.logging import logging_redirect_tqdm

    with logging_redirect_tqdm():  # log lines are written above the progress bar instead of through it
        train(args)
