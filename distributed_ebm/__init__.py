"""Energy-based generative image models of the FRAME family, trained at scale."""

__version__ = "0.1.0"
