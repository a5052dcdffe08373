"""EasyBackend: a self-hosted ChatGPT backend on Twisted."""

__version__ = "0.1.0"
