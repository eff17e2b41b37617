"""clipfast.data: the built-in synthetic world, loaders for real image folders, caption CSVs and
webdataset tar shards, probe sets that stream them, and label vocabularies."""

from clipfast.data.captions import CaptionCSVDataset
from clipfast.data.folders import ImageFolderDataset
from clipfast.data.images import IMAGE_EXTENSIONS, MAX_PIXELS, ImageRecord, UnreadableImageError, decode_image, load_image
from clipfast.data.probe import DatasetProbeSet, ProbeSet, ProbeSetError, TensorProbeSet, as_probe_set, open_probe_set
from clipfast.data.tars import TarShardDataset
from clipfast.data.vocabulary import VocabularyError, check_vocabulary, read_vocabulary
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
    "MAX_PIXELS",
    "ProbeSetError",
    "VocabularyError",
    "as_probe_set",
    "check_vocabulary",
    "decode_image",
    "open_probe_set",
    "read_vocabulary",
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
