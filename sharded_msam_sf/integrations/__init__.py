"""Integrations with the training frameworks people use (Lightning, Hugging Face, ...): see docs/integrations.md."""
