"""Training: config (LLaMA-Factory keys), trainer, callbacks, adapters (PEFT format), export."""
