"""Hostile and broken input: every case ends in a clear error or a counted skip, never a hang, a
silent wrong result or lost output."""

import io
import os
import pickle
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from clipfast.data import MAX_PIXELS, ImageFolderDataset, TarShardDataset, UnreadableImageError, load_image
from clipfast.data.probe import DatasetProbeSet
from clipfast.data.world import CLASSES, generate_world, zero_shot_prompts
from clipfast.defense.scan import NonFiniteScoresError, ScanConfig, scan
from clipfast.errors import RunMismatchError
from clipfast.models import ModelLoadError, load_model, save_checkpoint
from clipfast.oracle import ClassicalSegmenter
from clipfast.oracle.base import Segmentation, Segmenter
from clipfast.train import NonFiniteLossError, TrainConfig, train

CONFIG = ScanConfig(progress=False, batch_size=8, shard_size=16)


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return load_model("clipfast-tiny")


@pytest.fixture(scope="module")
def world():
    return generate_world(21, seed=3).images


def png_bytes(array: np.ndarray, mode: str | None = None) -> bytes:
    data = io.BytesIO()
    Image.fromarray(array, mode).save(data, format="PNG")
    return data.getvalue()


@pytest.fixture
def hostile_folder(tmp_path, world):
    """An ImageFolder whose class folder holds good images and every kind of broken file."""
    folder = tmp_path / "probe" / "heart"
    folder.mkdir(parents=True)
    for i, image in enumerate(world[:9]):
        (folder / f"good{i}.png").write_bytes(png_bytes(image.permute(1, 2, 0).numpy()))
    good = (folder / "good0.png").read_bytes()
    (folder / "corrupt.png").write_bytes(os.urandom(300))
    (folder / "truncated.png").write_bytes(good[: len(good) // 2])
    (folder / "empty.jpg").write_bytes(b"")
    side = int(MAX_PIXELS**0.5) + 10  # a decompression bomb: tiny file, too many pixels
    Image.new("1", (side, side)).save(folder / "bomb.png")
    (folder / "grey16.png").write_bytes(png_bytes(np.full((32, 32), 40000, dtype=np.uint16)))
    (folder / "rgba.png").write_bytes(png_bytes(np.zeros((32, 32, 4), dtype=np.uint8)))  # transparent: white
    return tmp_path / "probe"


def test_every_broken_file_is_named_when_decoded(hostile_folder):
    folder = hostile_folder / "heart"
    for name, reason in [("corrupt.png", "cannot identify"), ("truncated.png", ""), ("empty.jpg", "cannot identify"),
                         ("bomb.png", "exceeds the limit")]:
        with pytest.raises(UnreadableImageError, match=name) as raised:
            load_image(str(folder / name))
        assert reason in str(raised.value)
    assert torch.equal(load_image(str(folder / "grey16.png")), torch.full((3, 32, 32), round(40000 / 257), dtype=torch.uint8))
    assert torch.equal(load_image(str(folder / "rgba.png")), torch.full((3, 32, 32), 255, dtype=torch.uint8))


def test_the_up_front_check_skips_and_counts_broken_files(hostile_folder):
    dataset = ImageFolderDataset(hostile_folder, image_size=32)
    assert len(dataset) == 11  # 9 good + grey16 + rgba
    assert sorted(os.path.basename(path) for path, _ in dataset.skipped) == ["bomb.png", "corrupt.png", "empty.jpg",
                                                                              "truncated.png"]
    with pytest.raises(ValueError, match="unusable image"):
        ImageFolderDataset(hostile_folder, image_size=32, on_error="raise")


@pytest.mark.parametrize("workers", [0, 2])
def test_a_streamed_scan_counts_unreadable_images_and_leaves_them_out(tiny, hostile_folder, workers):
    dataset = ImageFolderDataset(hostile_folder, image_size=32, verify=False)
    probe = DatasetProbeSet(dataset, 32, workers=workers)
    names = [os.path.basename(record.path) for record in dataset.records]
    broken = {"bomb.png", "corrupt.png", "empty.jpg", "truncated.png"}
    result = scan(tiny, list(CLASSES), probe, ClassicalSegmenter(), prompts=zero_shot_prompts, config=CONFIG)
    assert [name in broken for name in names] == (~result.readable).tolist()
    unreadable = ~result.readable
    assert (result.image_label[unreadable] == -1).all() and not result.candidate[unreadable].any()
    assert not result.grounded[unreadable].any() and sum(result.label_test.predicted) == len(names) - len(broken)
    assert result.summary()["unreadable"] == len(broken)
    with pytest.raises(UnreadableImageError, match="bomb.png|corrupt.png|empty.jpg|truncated.png"):
        scan(tiny, list(CLASSES), DatasetProbeSet(dataset, 32, workers=workers, on_error="raise"), ClassicalSegmenter(),
             prompts=zero_shot_prompts, config=CONFIG)


def test_a_probe_set_of_nothing_but_broken_files_is_an_error(tiny, tmp_path):
    (tmp_path / "p" / "a").mkdir(parents=True)
    for i in range(3):
        (tmp_path / "p" / "a" / f"{i}.png").write_bytes(b"junk")
    probe = DatasetProbeSet(ImageFolderDataset(tmp_path / "p", image_size=32, verify=False), 32, workers=0)
    with pytest.raises(ValueError, match="none of the 3 probe images could be read"):
        scan(tiny, list(CLASSES), probe, ClassicalSegmenter(), config=CONFIG)


def test_tar_shards_index_samples_and_name_what_is_wrong(tmp_path, world):
    path = tmp_path / "shard.tar"
    with tarfile.open(path, "w") as tar:
        def add(name: str, data: bytes) -> None:
            member = tarfile.TarInfo(name)
            member.size = len(data)
            tar.addfile(member, io.BytesIO(data))

        add("a/s0.png", png_bytes(world[0].permute(1, 2, 0).numpy()))
        add("a/s0.cls", b"3")
        add("a/s1.png", b"broken")
        add("a/s1.txt", "a photo of a heart".encode())
        add("a/s2.cls", b"1")  # no image
        add("a/s3.png", png_bytes(world[1].permute(1, 2, 0).numpy()))
        add("a/s3.cls", b"not-a-number")
    dataset = TarShardDataset(path, image_size=32)
    assert [record.path.split("::")[1] for record in dataset.records] == ["a/s0"]
    assert torch.equal(dataset[0][0], world[0]) and dataset[0][1] == 3
    reasons = dict(dataset.skipped)
    assert "no image member" in reasons[f"{path}::a/s2"] and "bad .cls" in reasons[f"{path}::a/s3"]
    assert "cannot identify" in reasons[f"{path}::a/s1"]
    lazy = TarShardDataset(path, image_size=32, verify=False)
    assert len(lazy) == 2 and lazy.records[1].caption == "a photo of a heart"
    with pytest.raises(UnreadableImageError, match="a/s1"):
        lazy[1]
    (tmp_path / "bad.tar").write_bytes(os.urandom(2000))
    with pytest.raises(ValueError, match="not a readable uncompressed tar"):
        TarShardDataset(tmp_path / "bad.tar")
    with pytest.raises(FileNotFoundError):
        TarShardDataset(tmp_path / "missing.tar")


class _Masks(Segmenter):
    """An oracle that returns the same masks for every image: none, or one covering everything."""

    def __init__(self, kind: str):
        self.kind = kind

    def segment(self, images: torch.Tensor) -> Segmentation:
        n, _, height, width = images.shape
        masks = torch.full((n, 1, height, width), self.kind == "all", dtype=torch.bool)
        count = 0 if self.kind == "none" else 1
        return Segmentation(masks, torch.full((n,), count), torch.full((n, 1), float(count)))


@pytest.mark.parametrize("kind", ["none", "all"])
@pytest.mark.parametrize("engine", ["fast", "reference"])
def test_empty_and_all_covering_masks_give_a_defined_scan(tiny, world, kind, engine):
    result = scan(tiny, list(CLASSES), world, _Masks(kind), prompts=zero_shot_prompts,
                  config=ScanConfig(progress=False, batch_size=8, engine=engine))
    assert not result.found and torch.isfinite(result.image_prob).all()
    if kind == "none":  # nothing grounds a label, and nothing is there to remove
        assert not result.grounded.any() and (result.oracle_label == -1).all() and (result.flip_rate == -1).all()
    else:  # the one region is the whole image: its label is the image's own
        assert (result.oracle_label >= 0).all()


def test_nan_weights_stop_the_scan_with_a_clear_error(tiny, world):
    broken = load_model("clipfast-tiny")
    broken.model.load_state_dict(tiny.model.state_dict())
    with torch.no_grad():
        broken.model.visual.proj.fill_(float("nan"))
    with pytest.raises(NonFiniteScoresError, match="NaN or inf"):
        scan(broken, list(CLASSES), world, ClassicalSegmenter(), prompts=zero_shot_prompts, config=CONFIG)


def test_a_checkpoint_with_nan_or_inf_is_refused(tiny, tmp_path):
    path = tmp_path / "nan.pt"
    state = {k: v.clone() for k, v in tiny.model.state_dict().items()}
    state["visual.proj"][0, 0] = float("inf")
    torch.save({"state_dict": state}, path)
    with pytest.raises(ModelLoadError, match="NaN or inf values in 1 tensors: visual.proj"):
        load_model("clipfast-tiny", checkpoint=str(path))


class _Payload:
    """A pickle that would run code when unpickled without weights_only."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_files_that_are_not_checkpoints_are_refused_without_running_them(tmp_path):
    marker = tmp_path / "pwned"
    cases = {"text.pt": b"hello", "random.pt": os.urandom(4096), "malicious.pt": pickle.dumps(_Payload(str(marker))),
             "list.pt": None, "empty.pt": b""}
    for name, data in cases.items():
        path = tmp_path / name
        if data is None:
            torch.save([1, 2, 3], path)
        else:
            path.write_bytes(data)
        with pytest.raises(ModelLoadError, match=name):
            load_model("clipfast-tiny", checkpoint=str(path))
    assert not marker.exists()
    zipped = tmp_path / "malicious_zip.pt"  # the same payload in torch's own zip format
    torch.save({"state_dict": {"x": _Payload(str(marker))}}, zipped)
    with pytest.raises(ModelLoadError, match="malicious_zip.pt"):
        load_model("clipfast-tiny", checkpoint=str(zipped))
    assert not marker.exists()


@pytest.mark.parametrize("vocabulary,message", [(["heart", "star", "heart"], "duplicate"), (["heart", ""], "empty"),
                                                (["heart", "  "], "empty"), (["heart"], "at least two"),
                                                ("heart", "not one string"), (["heart", None], "non-string")])
def test_bad_vocabularies_are_refused(tiny, world, vocabulary, message):
    with pytest.raises(ValueError, match=message):
        scan(tiny, vocabulary, world, ClassicalSegmenter(), config=CONFIG)


@pytest.mark.parametrize("images,message", [(torch.zeros(0, 3, 32, 32, dtype=torch.uint8), "empty"),
                                            (torch.zeros(2, 3, 32, 32), "uint8"),
                                            (torch.zeros(2, 1, 32, 32, dtype=torch.uint8), r"\[N, 3, H, W\]")])
def test_bad_probe_tensors_are_refused(tiny, images, message):
    with pytest.raises(ValueError, match=message):
        scan(tiny, list(CLASSES), images, ClassicalSegmenter(), config=CONFIG)


def test_a_shard_directory_refuses_another_scans_results(tiny, world, tmp_path):
    first = scan(tiny, list(CLASSES), world, ClassicalSegmenter(), prompts=zero_shot_prompts, config=CONFIG,
                 shard_dir=tmp_path)
    assert len(list(tmp_path.glob("shard-*.pt"))) == 2
    again = scan(tiny, list(CLASSES), world, ClassicalSegmenter(), prompts=zero_shot_prompts, config=CONFIG,
                 shard_dir=tmp_path)  # read back, nothing rescanned
    assert torch.equal(first.image_label, again.image_label) and again.seconds["regions"] == 0
    with pytest.raises(RunMismatchError, match="other settings"):
        scan(tiny, list(CLASSES), world, ClassicalSegmenter(), prompts=zero_shot_prompts, shard_dir=tmp_path,
             config=ScanConfig(progress=False, batch_size=8, shard_size=16, min_causal_drop=0.4))
    (tmp_path / "shard-00000-of-00002.pt").write_bytes(b"garbage")
    with pytest.raises(RunMismatchError, match="not a scan shard"):
        scan(tiny, list(CLASSES), world, ClassicalSegmenter(), prompts=zero_shot_prompts, config=CONFIG,
             shard_dir=tmp_path)


def test_a_nan_loss_stops_training_before_a_checkpoint_keeps_it(tiny, world, tmp_path):
    bundle = load_model("clipfast-tiny")
    bundle.model.load_state_dict(tiny.model.state_dict())
    captions = ["a photo of a heart."] * len(world)
    save_checkpoint(bundle, tmp_path / "before.pt")

    def exploding(forward, batch):  # a loss that trains nothing and is NaN from the first step
        return {"loss": forward.image(batch.images).sum() * 0 + float("nan")}

    config = TrainConfig(steps=6, batch_size=7, checkpoint_every=3, log_every=3, progress=False, measure_mfu=False)
    with pytest.raises(NonFiniteLossError, match="not finite|nan"):
        train(bundle, world, captions, config, tmp_path / "run", objective=exploding)
    assert not (tmp_path / "run" / "checkpoint.pt").exists()
