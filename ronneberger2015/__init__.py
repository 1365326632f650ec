"""ronneberger2015: the U-Net of Ronneberger, Fischer & Brox (2015), as published.

Public API (see docs/ and the paper's section named in each docstring)::

    UNet, output_size, input_size       network (Sec. 2, Fig. 1)
"""
from .network import UNet, input_size, output_size

__all__ = ["UNet", "output_size", "input_size"]
__version__ = "0.1.0"
