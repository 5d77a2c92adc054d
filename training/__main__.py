"""`python -m openchroma.training ...` (or `accelerate launch -m openchroma.training ...`): fine-tuning."""

from .finetune import main

raise SystemExit(main())
