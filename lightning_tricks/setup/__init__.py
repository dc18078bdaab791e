"""One-time setup: activation functions (swap, Maxout) and input preprocessing and augmentation."""

from lightning_tricks.setup.activations import ActivationSwap, find_functional_activations, swap_activations

__all__ = ["ActivationSwap", "find_functional_activations", "swap_activations"]
