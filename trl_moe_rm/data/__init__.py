"""Synthetic preference datasets for training and evaluating Mixture-of-Experts reward models."""

from .controlled import *  # noqa: F403 (the public names of the controlled benchmark)
from .controlled import __all__ as __all__
