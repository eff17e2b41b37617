"""clipfast.data: the built-in synthetic world and loaders for real image folders and caption CSVs."""

from clipfast.data.folders import (
    IMAGE_EXTENSIONS,
    CaptionCSVDataset,
    ImageFolderDataset,
    ImageRecord,
    UnreadableImageError,
    load_image,
)
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
    "CaptionCSVDataset",
    "ImageFolderDataset",
    "ImageRecord",
    "UnreadableImageError",
    "WorldConfig",
    "WorldSamples",
    "generate_world",
    "load_image",
    "world_vocabulary",
    "zero_shot_prompts",
]
