"""xmodal: parameter-efficient transfer of CLIP-like dual encoders to vision-language retrieval."""

__version__ = "0.1.0"

__all__ = ["__version__"]
