"""Shared test helpers: the golden fixtures from the official code, and tiny random models."""

import os
from pathlib import Path

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

FIXTURES = Path(__file__).parent / "fixtures"
REFERENCES = ("reference_tiny", "reference_tiny_stop")


class Reference:
    """One golden fixture: the official checkpoint, the exact generate() inputs and the official outputs."""

    def __init__(self, name):
        self.name = name
        self.root = FIXTURES / name
        self.checkpoint = self.root / "checkpoint"
        self.inputs = {k: torch.from_numpy(v) for k, v in np.load(self.root / "inputs.npz").items()}
        self.expected = {p.stem: np.load(p) for p in (self.root / "expected").glob("*.npy")}
        self._model = None

    @property
    def num_frames(self):
        return len(self.expected["gen_codes"])

    def model(self):
        """The checkpoint loaded with our class (float32, eval); cached for the session: do not modify it."""
        if self._model is None:
            from openchroma import ChromaForConditionalGeneration

            self._model = ChromaForConditionalGeneration.from_pretrained(self.checkpoint, dtype=torch.float32).eval()
        return self._model


_REFERENCES = {}


def reference(name) -> Reference:
    if name not in _REFERENCES:
        _REFERENCES[name] = Reference(name)
    return _REFERENCES[name]


@pytest.fixture(params=REFERENCES)
def ref(request):
    return reference(request.param)


def tiny_model(seed=0, **config_overrides):
    """A fresh tiny random model (`openchroma.testing.build_tiny_model`), float32, eval."""
    from openchroma.testing import build_tiny_model

    return build_tiny_model(seed, **config_overrides)
