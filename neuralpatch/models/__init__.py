"""Networks: the VGG texture network and its weight sources."""

from neuralpatch.models.vgg import (
    CAFFE_BGR,
    IMAGENET,
    InputNormalization,
    ReceptiveField,
    VGGFeatures,
    layer_index,
    layer_names,
    make_vgg_features,
    receptive_field,
)
from neuralpatch.models.weights import (
    CheckpointError,
    CheckpointMismatchError,
    WeightsNotFoundError,
    WeightSource,
    cache_dir,
    download_vgg19,
    find_hed_weights,
    find_vgg19,
    load_vgg,
    resolve_source,
    weight_sources,
)

__all__ = [
    # vgg.py
    "CAFFE_BGR",
    "IMAGENET",
    "InputNormalization",
    "ReceptiveField",
    "VGGFeatures",
    "layer_index",
    "layer_names",
    "make_vgg_features",
    "receptive_field",
    # weights.py
    "CheckpointError",
    "CheckpointMismatchError",
    "WeightSource",
    "WeightsNotFoundError",
    "cache_dir",
    "download_vgg19",
    "find_hed_weights",
    "find_vgg19",
    "load_vgg",
    "resolve_source",
    "weight_sources",
]
