# Copyright 2026 The OpenChroma authors. Licensed under the Apache License, Version 2.0.
"""Server voice activity detection with silero-vad (its model ships inside the package: nothing is downloaded).

The realtime input is 24 kHz; silero-vad listens at 16 kHz in windows of 512 samples (32 ms). `ServerVAD` resamples
each 768-sample window of the input (scipy's polyphase filter) and runs silero's `VADIterator` on it, which keeps the
speech / silence state between windows. Positions it reports are samples of the 24 kHz input since the session began.
"""

import copy
import threading
from typing import List, Optional, Tuple

import numpy as np
import torch
from scipy.signal import firwin, resample_poly


VAD_RATE = 16000
WINDOW = 512  # silero's window at 16 kHz
INPUT_WINDOW = WINDOW * 3 // 2  # the same 32 ms at 24 kHz
# 24 kHz -> 16 kHz: scipy's default anti-aliasing filter for up=2, down=3, designed once (not on every window)
RESAMPLE_TAPS = firwin(2 * 10 * 3 + 1, 1 / 3, window=("kaiser", 5.0))

_template = None
_template_lock = threading.Lock()


def silero_model():
    """A fresh silero-vad model (a copy of one loaded per process: each session needs its own recurrent state)."""
    global _template
    with _template_lock:
        if _template is None:
            from silero_vad import load_silero_vad

            _template = load_silero_vad()
        return copy.deepcopy(_template)


class ServerVAD:
    """Speech start / stop events for one session's input stream.

    feed(samples float32 [n] at 24 kHz) -> [("start", position), ("stop", position)]: "start" at the beginning of
    the window where speech was detected, "stop" at the end of the window where `silence_duration_ms` of silence
    was complete (so the stop position includes the silence, as OpenAI's `audio_end_ms` does).
    """

    def __init__(self, threshold: float, silence_duration_ms: int):
        from silero_vad import VADIterator

        self.iterator = VADIterator(silero_model(), threshold=threshold, sampling_rate=VAD_RATE,
                                    min_silence_duration_ms=silence_duration_ms, speech_pad_ms=0)
        self.pending = np.zeros(0, dtype=np.float32)  # input not yet a full window
        self.position = 0  # 24 kHz samples consumed by the detector

    @property
    def speaking(self) -> bool:
        return bool(self.iterator.triggered)

    @torch.no_grad()
    def feed(self, samples: np.ndarray) -> List[Tuple[str, int]]:
        events = []
        self.pending = np.concatenate([self.pending, samples])
        usable = len(self.pending) // INPUT_WINDOW * INPUT_WINDOW
        for start in range(0, usable, INPUT_WINDOW):
            window = resample_poly(self.pending[start:start + INPUT_WINDOW], 2, 3, window=RESAMPLE_TAPS)  # [512]
            found: Optional[dict] = self.iterator(torch.from_numpy(window[:WINDOW].astype(np.float32)))
            window_start, self.position = self.position, self.position + INPUT_WINDOW
            if found and "start" in found:
                events.append(("start", window_start))
            elif found and "end" in found:
                events.append(("stop", self.position))
        self.pending = self.pending[usable:]
        return events
