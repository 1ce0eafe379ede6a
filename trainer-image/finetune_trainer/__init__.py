"""The finetune-operator trainer: a FineTuneJob spec in, a LoRA adapter (and GGUF) out."""
