"""minilm: a miniature mixed-precision transformer training framework."""

__version__ = "0.1.0"
