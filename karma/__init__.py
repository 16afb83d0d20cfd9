"""karma: Knowledge-Action Regularized Multimodal Alignment for LLM-based personalized search."""

__version__ = "0.1.0"
