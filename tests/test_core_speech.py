"""`/v1/audio/speech` against the library: the server's audio equals `generate(forced_text_ids=..., output_audio=True)`
for the same text-to-speech prompt and voice (the other speech tests compare the server with itself)."""

import numpy as np
import torch

from openchroma.serving.requests import speech_conversation
from test_server import MODEL, server  # noqa: F401  (the running tiny server, a module fixture)


def library_speech(server, text, voice_id):
    """What the library says for this text in this voice: greedy, the server's default frame budget."""
    processor = server.app.state.engine.processor
    inputs = processor(speech_conversation(text))
    ids = processor.tokenizer(text, add_special_tokens=False)["input_ids"]
    out = server.model.generate(**inputs, voice=server.app.state.voices.get(voice_id),
                                forced_text_ids=[torch.tensor(ids)], max_new_tokens=server.settings.default_max_frames,
                                output_audio=True)
    return (np.clip(out.audio[0].numpy(), -1, 1) * 32767).astype("<i2")


def test_speech_equals_the_library_forced_text_output(server):  # noqa: F811
    client = server.client()
    for text, voice in (("Hello from the library.", server.voice), ("Good morning to you all.", server.voice2)):
        pcm = client.audio.speech.create(model=MODEL, voice=voice, input=text, response_format="pcm").content
        spoken = np.frombuffer(pcm, dtype="<i2")
        expected = library_speech(server, text, voice)
        assert spoken.shape == expected.shape and spoken.size > 0, text
        # streamed (chunk by chunk) vs one-shot Mimi decode: equal up to float rounding, i.e. one PCM step
        assert np.abs(spoken.astype(int) - expected.astype(int)).max() <= 1, text
