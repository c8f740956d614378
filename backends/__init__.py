"""Attention backends: one module each, registered through the llmserve_attention_backends hook."""
