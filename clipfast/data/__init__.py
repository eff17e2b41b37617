"""clipfast.data: the built-in synthetic world, loaders for real image folders, caption CSVs and
webdataset tar shards, and probe sets that stream them."""

from clipfast.data.folders import (
    IMAGE_EXTENSIONS,
    CaptionCSVDataset,
    ImageFolderDataset,
    ImageRecord,
    TarShardDataset,
    UnreadableImageError,
    load_image,
)
from clipfast.data.probe import DatasetProbeSet, ProbeSet, TensorProbeSet
from clipfast.data.world import (
    CAPTION_TEMPLATES,
    CLASSES,
    COLOURS,
    POSITION_WORDS,
    SIZE_WORDS,
    WorldConfig,
    WorldSamples,
    generate_world,
    world_vocabulary,
    zero_shot_prompts,
)

__all__ = [
    "CAPTION_TEMPLATES",
    "CLASSES",
    "COLOURS",
    "IMAGE_EXTENSIONS",
    "POSITION_WORDS",
    "SIZE_WORDS",
    "TarShardDataset",
    "TensorProbeSet",
    "CaptionCSVDataset",
    "DatasetProbeSet",
    "ImageFolderDataset",
    "ImageRecord",
    "ProbeSet",
    "UnreadableImageError",
    "WorldConfig",
    "WorldSamples",
    "generate_world",
    "load_image",
    "world_vocabulary",
    "zero_shot_prompts",
]
