"""Measuring models: perplexity (and, as they land, KL divergence, memory and speed)."""

from ratequant.evaluation.perplexity import PerplexityResult, perplexity

__all__ = ["PerplexityResult", "perplexity"]
