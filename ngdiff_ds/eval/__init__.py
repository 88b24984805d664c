"""Evaluation of unlearned models (TOFU and MUSE metrics)."""
