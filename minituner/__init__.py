"""minituner: fine-tuning pre-trained transformers, from scratch, in pure PyTorch.

One small hand-written transformer (`minituner.model`), one module per technique, and the
shared pieces every chapter uses: tokenizer, checkpoints, the synthetic world, data and the
training loop. See README.md for the chapter map.
"""

__version__ = "0.1.0"
