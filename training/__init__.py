"""Fine-tuning Chroma's speech generator (backbone and depth decoder). Not a hub file; needs the `train` extra for
LoRA and progress bars. Entry point: ``python -m openchroma.training`` (docs/finetuning.md)."""
