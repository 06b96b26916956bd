"""Backends that run flexmoe inside other libraries' models.

Each submodule imports its library itself, so ``import flexmoe`` never needs them:
``flexmoe.integrations.hf`` is the HuggingFace transformers experts backend (``pip install flexmoe[hf]``).
"""
