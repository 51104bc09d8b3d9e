"""altlm: align language models with textual feedback (ALT, arXiv 2407.16970)."""

__version__ = "0.1.0"

from .config import ALTConfig  # noqa: E402

__all__ = ["ALTConfig", "__version__"]
