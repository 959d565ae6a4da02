"""Integrations with training frameworks (each imported on its own, so that the framework is needed
only by its module): :mod:`.hf` (Hugging Face Trainer, with or without DeepSpeed); see
docs/integrations.md for every route, and the DeepSpeed seam in :mod:`sharded_msam_sf.deepspeed`
(``attach``/``register``)."""
