"""lit-longctx: train, extend and evaluate long-context LLaMA-family models with PyTorch Lightning."""

__version__ = "0.1.0"
