"""ronneberger2015: the U-Net of Ronneberger, Fischer & Brox (2015), as published.

Public API (each docstring names the paper's section it implements)::

    UNet, output_size, input_size    the network (Sec. 2, Fig. 1)
    weight_map                       the boundary weight map (Sec. 3, Eq. 2)
    weighted_cross_entropy           the energy function (Sec. 3, Eq. 1)
    Augmenter                        elastic deformation, shift, rotation, gray values (Sec. 3.1)
    train, TrainConfig               SGD with momentum 0.99, batch 1 (Sec. 3)
    predict, load_model              overlap-tile prediction with mirroring (Fig. 2)
    predict_volume                   the same, Zarr to Zarr with Dask, for volumes larger than memory
    label_cells                      probabilities to one id per cell
    metrics                          the ISBI 2012 challenge metrics (Sec. 4)
"""
from . import metrics
from ._version import __version__ as __version__
from .augment import Augmenter
from .loss import weighted_cross_entropy
from .network import UNet, input_size, output_size
from .segmentation import label_cells
from .tiling import load_model, predict
from .training import TrainConfig, train
from .volume import predict_volume  # zarr and dask are imported when it runs
from .weightmap import weight_map

__all__ = ["UNet", "output_size", "input_size", "weight_map", "weighted_cross_entropy", "Augmenter", "train",
           "TrainConfig", "predict", "load_model", "predict_volume", "label_cells", "metrics"]
