"""Interchange with the Hugging Face ecosystem: model directories (transformers) and LoRA adapters (PEFT)."""
