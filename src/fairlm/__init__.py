"""fairlm: a fair, honest, reproducible comparison of ResNet-BK and Mamba."""
__version__ = "0.1.0"
