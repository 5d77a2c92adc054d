# Copyright 2026 The OpenChroma authors. Licensed under the Apache License, Version 2.0.
"""transformers pipelines for Chroma: `pipeline("text-to-speech", ...)` and `pipeline("any-to-any", ...)`.

    from transformers import pipeline
    tts = pipeline("text-to-speech", model="FlashLabs/Chroma-4B", trust_remote_code=True)
    out = tts("Hello there.", voice="examples/voice.wav", voice_text="Transcript of that clip.")
    out["audio"], out["sampling_rate"]                  # float32 [n] at 24 kHz

    chat = pipeline("any-to-any", model="FlashLabs/Chroma-4B", trust_remote_code=True)
    out = chat([{"role": "user", "content": [{"type": "audio", "audio": "examples/question.wav"}]}],
               voice="examples/voice.wav", voice_text="...")
    out["generated_text"], out["generated_audio"], out["sampling_rate"]

Chroma always speaks in a reference voice: `voice` is an audio source (path, `(array, rate)`, ... as the processor
takes) with its transcript `voice_text`, or a `ChromaVoice` from `model.encode_voice` (then no transcript). Other
keyword arguments go to `model.generate` (`max_new_tokens` = audio frames of 80 ms, `do_sample`, `seed`, ...).

transformers finds these classes through the config's `custom_pipelines` (see `configuration_chroma.py`); this file
is copied next to the processor's by `save_pretrained` (processing_chroma.py imports it). A hub file: only torch,
numpy and transformers at the top level.
"""

import numpy as np
import torch
from transformers import Pipeline


# The text-to-speech prompt: the thinker reads the text to speak (its ids are forced) after this request.
SPEAK_SYSTEM_PROMPT = (
    "You are Chroma, an advanced virtual human created by the FlashLabs. You possess the ability to understand "
    "auditory inputs and generate both text and speech."
)
SPEAK_REQUEST = "Please say exactly this: {text}"
GENERATE_KEYS = {
    "max_new_tokens", "max_text_tokens", "do_sample", "temperature", "top_k", "top_p", "seed", "generator",
    "depth_sampling", "text_sampling", "stopping_criteria",
}


class _ChromaPipeline(Pipeline):
    """What both tasks share: the processor (no separate tokenizer/feature extractor), voice handling, generation."""

    _load_processor = True
    _load_tokenizer = False
    _load_feature_extractor = False
    _load_image_processor = False
    _load_video_processor = False

    def _sanitize_parameters(self, voice=None, voice_text=None, **generate_kwargs):
        unknown = set(generate_kwargs) - GENERATE_KEYS
        if unknown:
            raise ValueError(f"Unknown argument(s) {sorted(unknown)}; generation takes {sorted(GENERATE_KEYS)}.")
        preprocess = {}
        if voice is not None:
            preprocess["voice"] = voice
        if voice_text is not None:
            preprocess["voice_text"] = voice_text
        return preprocess, generate_kwargs, {}

    def _voice_inputs(self, voice, voice_text) -> dict:
        """-> the processor arguments (audio + transcript) or the generate argument (an encoded voice)."""
        if voice is None:
            raise ValueError("Chroma speaks in a reference voice: pass voice=AUDIO with voice_text=TRANSCRIPT, or "
                             "voice=ChromaVoice (from model.encode_voice).")
        if hasattr(voice, "codes") and hasattr(voice, "text_ids"):  # a ChromaVoice (installed or remote-code class)
            if voice_text is not None:
                raise ValueError("voice_text is for an audio voice; a ChromaVoice carries its own transcript.")
            return {"voice": voice}
        if not isinstance(voice_text, str) or not voice_text.strip():
            raise ValueError("voice_text (the transcript of the voice recording) is required with an audio voice.")
        return {"prompt_audio": voice, "prompt_text": voice_text.strip()}

    def _model_inputs(self, conversation, voice, voice_text, forced_text_ids=None) -> dict:
        reference = self._voice_inputs(voice, voice_text)
        encoded_voice = reference.pop("voice", None)
        inputs = dict(self.processor(conversation, **reference))
        if encoded_voice is not None:
            inputs["voice"] = encoded_voice
        if forced_text_ids is not None:
            inputs["forced_text_ids"] = [forced_text_ids]
        return inputs

    def _forward(self, model_inputs, **generate_kwargs):
        output = self.model.generate(**model_inputs, **generate_kwargs, return_dict_in_generate=True)
        return {"sequences": output.sequences, "audio_lengths": output.audio_lengths,
                "text_sequences": output.text_sequences, "text_lengths": output.text_lengths}

    def _waveform(self, model_outputs) -> np.ndarray:
        waveform = self.processor.decode(model_outputs["sequences"][:1], codec_model=self.model.codec_model,
                                         audio_lengths=model_outputs["audio_lengths"][:1])
        return waveform.numpy()

    def _text(self, model_outputs) -> str:
        ids = model_outputs["text_sequences"][0, : int(model_outputs["text_lengths"][0])]
        return self.processor.decode(ids, skip_special_tokens=True).strip()


class ChromaTextToSpeechPipeline(_ChromaPipeline):
    """Text -> speech in a reference voice: `{"audio": float32 [n], "sampling_rate": 24000}`."""

    def preprocess(self, text, voice=None, voice_text=None):
        if not isinstance(text, str) or not text.strip():
            raise ValueError(f"text-to-speech takes a non-empty string, got {text!r}.")
        ids = self.processor.tokenizer(text, add_special_tokens=False).input_ids
        conversation = [
            {"role": "system", "content": SPEAK_SYSTEM_PROMPT},
            {"role": "user", "content": SPEAK_REQUEST.format(text=text)},
        ]
        return self._model_inputs(conversation, voice, voice_text, forced_text_ids=torch.tensor(ids))

    def postprocess(self, model_outputs):
        return {"audio": self._waveform(model_outputs), "sampling_rate": self.processor.codec_sampling_rate}


class ChromaAnyToAnyPipeline(_ChromaPipeline):
    """A conversation (text and/or audio messages, or one audio source) -> the spoken answer and its text:
    `{"generated_text": str, "generated_audio": float32 [n], "sampling_rate": 24000}`."""

    def __call__(self, inputs, **kwargs):
        # A conversation is a list of messages: keep it one input (the base class would treat a list as a batch).
        if isinstance(inputs, list) and inputs and isinstance(inputs[0], dict):
            inputs = {"conversation": inputs}
        return super().__call__(inputs, **kwargs)

    def preprocess(self, inputs, voice=None, voice_text=None):
        if isinstance(inputs, dict) and "conversation" in inputs:
            conversation = inputs["conversation"]
        else:  # a lone audio source: a spoken question
            conversation = [{"role": "user", "content": [{"type": "audio", "audio": inputs}]}]
        return self._model_inputs(conversation, voice, voice_text)

    def postprocess(self, model_outputs):
        return {"generated_text": self._text(model_outputs), "generated_audio": self._waveform(model_outputs),
                "sampling_rate": self.processor.codec_sampling_rate}


def custom_pipelines() -> dict:
    """The config's `custom_pipelines` entry: how `transformers.pipeline` finds these classes (a fresh dict each
    call: transformers rewrites the entry it uses in place)."""
    tts = {"impl": "pipeline_chroma.ChromaTextToSpeechPipeline", "pt": ["AutoModelForCausalLM"], "type": "multimodal"}
    chat = {"impl": "pipeline_chroma.ChromaAnyToAnyPipeline", "pt": ["AutoModelForCausalLM"], "type": "multimodal"}
    return {"text-to-speech": tts, "text-to-audio": dict(tts), "any-to-any": chat}


__all__ = ["ChromaAnyToAnyPipeline", "ChromaTextToSpeechPipeline", "custom_pipelines"]
