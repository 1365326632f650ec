"""ronneberger2015: the U-Net of Ronneberger, Fischer & Brox (2015), as published.

Public API (each docstring names the paper's section it implements)::

    UNet, output_size, input_size    the network (Sec. 2, Fig. 1)
    weight_map                       the boundary weight map (Sec. 3, Eq. 2)
    predict                          overlap-tile prediction with mirroring (Fig. 2)
    predict_volume                   the same, Zarr to Zarr with Dask, for volumes larger than memory
    metrics                          the ISBI 2012 challenge metrics (Sec. 4)

Training (Sec. 3) is ``ronneberger2015.train``, augmentation (Sec. 3.1)
``ronneberger2015.augment``, the loss (Eq. 1) ``ronneberger2015.loss``.
"""
from . import metrics
from .network import UNet, input_size, output_size
from .tiling import predict
from .volume import predict_volume  # zarr and dask are imported when it runs
from .weightmap import weight_map

__all__ = ["UNet", "output_size", "input_size", "weight_map", "predict", "predict_volume", "metrics"]
__version__ = "0.1.0"
