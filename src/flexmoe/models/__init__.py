"""Models built from flexmoe layers."""

from .gpt import GPTMoE, ModelConfig

__all__ = ["GPTMoE", "ModelConfig"]
