# Copyright 2026 The OpenChroma authors. Licensed under the Apache License, Version 2.0.
"""openchroma: FlashLabs Chroma 1.0 for transformers.

Importing the package registers Chroma with transformers' Auto classes, so `AutoConfig`,
`AutoModelForCausalLM` (and `AutoProcessor`) load a Chroma checkpoint without `trust_remote_code`.
The hub files (configuration_/modeling_/generation_/processing_chroma.py) never import this module.
"""

from transformers import AutoConfig, AutoModelForCausalLM

from .configuration_chroma import ChromaBackboneConfig, ChromaConfig, ChromaDecoderConfig
from .generation_chroma import ChromaGenerationOptions, ChromaGenerator
from .sampling_chroma import SamplingParams
from .state_chroma import ChromaChunk, ChromaGenerateOutput
from .voice_chroma import ChromaVoice
from .modeling_chroma import ChromaForConditionalGeneration


AutoConfig.register(ChromaConfig.model_type, ChromaConfig, exist_ok=True)
AutoModelForCausalLM.register(ChromaConfig, ChromaForConditionalGeneration, exist_ok=True)

try:  # the processor joins when its file is present
    from transformers import AutoProcessor

    from .processing_chroma import ChromaProcessor

    AutoProcessor.register(ChromaConfig, ChromaProcessor, exist_ok=True)
except ImportError:  # pragma: no cover
    ChromaProcessor = None

__version__ = "0.1.0"
__all__ = [
    "ChromaBackboneConfig",
    "ChromaChunk",
    "ChromaConfig",
    "ChromaDecoderConfig",
    "ChromaForConditionalGeneration",
    "ChromaGenerateOutput",
    "ChromaGenerationOptions",
    "ChromaGenerator",
    "ChromaProcessor",
    "ChromaVoice",
    "SamplingParams",
]
