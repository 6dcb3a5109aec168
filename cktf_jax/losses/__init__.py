"""Distillation objectives as pure functions (one family per module)."""
