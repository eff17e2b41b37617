import os
import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from clipfast.data import CaptionCSVDataset, ImageFolderDataset, UnreadableImageError, load_image

torch.set_num_threads(1)

RNG = np.random.default_rng(0)
RGB = RNG.integers(1, 255, (13, 11, 3), dtype=np.uint8)  # odd sizes, never all-zero
GREY = RNG.integers(1, 255, (9, 7), dtype=np.uint8)
GREY16 = RNG.integers(1, 65535, (5, 6), dtype=np.uint16)
RGB16 = RNG.integers(1, 65535, (4, 3, 3), dtype=np.uint16)
PALETTE = np.array([[200, 10, 10], [10, 200, 10], [10, 10, 200], [0, 0, 0]], dtype=np.uint8)
PALETTE_INDICES = RNG.integers(0, 4, (6, 5), dtype=np.uint8)


def _write_rgb16_png(path, values: np.ndarray) -> None:
    """A 48-bit RGB PNG written by hand (PIL cannot write one)."""
    height, width, _ = values.shape
    raw = b"".join(b"\x00" + values[row].astype(">u2").tobytes() for row in range(height))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 16, 2, 0, 0, 0)
    with open(path, "wb") as handle:
        handle.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw))
                     + chunk(b"IEND", b""))


def _write_truncated(path, source_path) -> None:
    data = open(source_path, "rb").read()
    open(path, "wb").write(data[: len(data) // 2])


def _write_all_kinds(folder) -> dict[str, str]:
    """Good images of every kind plus broken ones in `folder`; returns name -> path."""
    os.makedirs(folder, exist_ok=True)
    paths = {name: os.path.join(folder, file) for name, file in [
        ("rgb", "a_rgb.png"), ("grey", "b_grey.png"), ("rgba", "c_rgba.png"), ("grey16", "d_grey16.png"),
        ("rgb16", "e_rgb16.png"), ("palette", "f_palette.png"), ("corrupt", "g_corrupt.png"),
        ("truncated", "h_truncated.png"),
    ]}
    Image.fromarray(RGB).save(paths["rgb"])
    Image.fromarray(GREY).save(paths["grey"])
    rgba = np.dstack([RGB, np.full(RGB.shape[:2], 255, np.uint8)])
    rgba[0, 0, 3] = 0  # one fully transparent pixel
    Image.fromarray(rgba, "RGBA").save(paths["rgba"])
    Image.fromarray(GREY16).save(paths["grey16"])
    _write_rgb16_png(paths["rgb16"], RGB16)
    palette_image = Image.fromarray(PALETTE_INDICES, "P")
    palette_image.putpalette(PALETTE.flatten().tolist())
    palette_image.save(paths["palette"], transparency=3)  # entry 3 is transparent
    open(paths["corrupt"], "wb").write(b"this is not an image" * 10)
    _write_truncated(paths["truncated"], paths["rgb"])
    return paths


@pytest.fixture
def tree(tmp_path):
    """root/cat (all kinds, two broken), root/dog (one JPEG + ignored files), root/empty."""
    root = tmp_path / "root"
    paths = _write_all_kinds(root / "cat")
    os.makedirs(root / "dog" / "nested")
    Image.fromarray(RGB).save(root / "dog" / "nested" / "x.JPG")
    (root / "dog" / "notes.txt").write_text("not an image, ignored")
    Image.fromarray(RGB).save(root / "dog" / ".hidden.png")
    os.makedirs(root / "empty")
    return root, paths


def test_load_image_converts_every_mode_to_8bit_rgb(tree):
    _, paths = tree
    rgb = load_image(paths["rgb"])
    assert rgb.dtype == torch.uint8 and rgb.shape == (3, 13, 11)
    assert torch.equal(rgb, torch.from_numpy(RGB).permute(2, 0, 1))
    grey = load_image(paths["grey"])
    assert grey.shape == (3, 9, 7) and all(torch.equal(grey[c], torch.from_numpy(GREY)) for c in range(3))
    # 16-bit values are scaled to 8 bits, not clipped at 255.
    grey16 = load_image(paths["grey16"])
    assert torch.equal(grey16[1], torch.from_numpy(np.round(GREY16 / 257).astype(np.uint8)))
    rgb16 = load_image(paths["rgb16"])
    expected = torch.from_numpy(RGB16 / 257).permute(2, 0, 1)
    assert rgb16.shape == (3, 4, 3) and (rgb16.double() - expected).abs().max() <= 1
    # Transparency is composited over white; opaque pixels keep their colour.
    rgba = load_image(paths["rgba"])
    assert rgba[:, 0, 0].tolist() == [255, 255, 255]
    assert torch.equal(rgba[:, 1:], rgb[:, 1:])
    palette = load_image(paths["palette"])
    expected = np.where((PALETTE_INDICES == 3)[..., None], 255, PALETTE[PALETTE_INDICES])
    assert torch.equal(palette, torch.from_numpy(expected.astype(np.uint8)).permute(2, 0, 1))


def test_load_image_resizes_to_a_square(tree):
    _, paths = tree
    resized = load_image(paths["rgb"], image_size=17)
    assert resized.shape == (3, 17, 17) and resized.dtype == torch.uint8
    assert abs(resized.float().mean() - float(RGB.mean())) < 10


def test_load_image_names_an_undecodable_file(tree):
    _, paths = tree
    with pytest.raises(UnreadableImageError, match="g_corrupt.png"):
        load_image(paths["corrupt"])
    with pytest.raises(UnreadableImageError, match="h_truncated.png.*truncated"):
        load_image(paths["truncated"])


def test_image_folder_skips_broken_images(tree):
    root, paths = tree
    dataset = ImageFolderDataset(root)
    assert dataset.classes == ["cat", "dog", "empty"]
    assert sorted(path for path, _ in dataset.skipped) == [paths["corrupt"], paths["truncated"]]
    assert all(reason for _, reason in dataset.skipped)
    assert len(dataset) == 7  # 6 good cat images + the nested dog JPEG; .txt and hidden files ignored
    assert [r.label for r in dataset.records] == [0] * 6 + [1]
    for index in range(len(dataset)):
        image, label = dataset[index]
        assert image.dtype == torch.uint8 and image.dim() == 3 and image.shape[0] == 3
        assert label == dataset.records[index].label
    image, _ = dataset[0]
    assert torch.equal(image, torch.from_numpy(RGB).permute(2, 0, 1))


def test_image_folder_resizes(tree):
    root, _ = tree
    dataset = ImageFolderDataset(root, image_size=19)
    assert {tuple(dataset[i][0].shape) for i in range(len(dataset))} == {(3, 19, 19)}


def test_image_folder_raise_names_the_file_and_reason(tree):
    root, _ = tree
    with pytest.raises(ValueError, match="g_corrupt.png.*cannot identify"):
        ImageFolderDataset(root, on_error="raise")


def test_image_folder_lazy_failure_names_the_file(tmp_path):
    # A truncated JPEG passes PIL's verify (the up-front check) and fails only when decoded.
    folder = tmp_path / "root" / "cls"
    os.makedirs(folder)
    Image.fromarray(RGB).save(folder / "good.jpg")
    Image.fromarray(RNG.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(tmp_path / "full.jpg", quality=95)
    _write_truncated(folder / "late.jpg", tmp_path / "full.jpg")
    dataset = ImageFolderDataset(tmp_path / "root")
    assert len(dataset) == 2 and dataset.skipped == []
    with pytest.raises(UnreadableImageError, match="late.jpg"):
        dataset[1]


def test_image_folder_bad_inputs(tmp_path, tree):
    root, _ = tree
    with pytest.raises(ValueError, match="no usable images"):
        ImageFolderDataset(root / "empty")  # a folder without class subfolders
    os.makedirs(tmp_path / "hollow" / "a")
    with pytest.raises(ValueError, match="no usable images"):
        ImageFolderDataset(tmp_path / "hollow")  # class folders without images
    broken = tmp_path / "broken" / "a"
    os.makedirs(broken)
    open(broken / "x.png", "wb").write(b"garbage")
    with pytest.raises(ValueError, match="no usable images.*1 skipped"):
        ImageFolderDataset(tmp_path / "broken")
    with pytest.raises(FileNotFoundError, match="missing"):
        ImageFolderDataset(tmp_path / "missing")
    with pytest.raises(ValueError, match="on_error"):
        ImageFolderDataset(root, on_error="ignore")
    with pytest.raises(ValueError, match="image_size"):
        ImageFolderDataset(root, image_size=0)


def _write_csv(path, rows, header=("image", "caption")) -> None:
    import csv
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)


@pytest.fixture
def caption_csv(tmp_path):
    paths = _write_all_kinds(tmp_path / "images")
    rows = [
        ("images/a_rgb.png", "a photo, with a comma"),
        (paths["grey"], "an absolute path"),  # absolute
        ("images/c_rgba.png", "rgba"),
        ("images/d_grey16.png", "sixteen bit"),
        ("images/missing.png", "this file does not exist"),
        ("images/g_corrupt.png", "corrupt"),
        ("images/h_truncated.png", "truncated"),
        ("images/e_rgb16.png", ""),  # no caption
        ("", "no image path"),
    ]
    csv_path = tmp_path / "pairs.csv"
    _write_csv(csv_path, rows)
    return csv_path, tmp_path


def test_caption_csv_skips_bad_rows(caption_csv):
    csv_path, base = caption_csv
    dataset = CaptionCSVDataset(csv_path, image_size=15)
    assert [r.caption for r in dataset.records] == ["a photo, with a comma", "an absolute path", "rgba", "sixteen bit"]
    reasons = {os.path.basename(path): reason for path, reason in dataset.skipped}
    assert reasons["missing.png"] == "file not found"
    assert "cannot identify" in reasons["g_corrupt.png"]
    assert "runcated" in reasons["h_truncated.png"]
    assert "empty caption" in reasons["e_rgb16.png"]
    assert any("empty image path" == reason for reason in reasons.values())
    assert len(dataset.skipped) == 5
    image, caption = dataset[0]
    assert image.shape == (3, 15, 15) and image.dtype == torch.uint8 and caption == "a photo, with a comma"
    assert dataset.records[0].path == os.path.join(str(base), "images/a_rgb.png")


def test_caption_csv_raise_names_the_missing_file(caption_csv):
    csv_path, _ = caption_csv
    with pytest.raises(ValueError, match="missing.png.*file not found"):
        CaptionCSVDataset(csv_path, on_error="raise")


def test_caption_csv_configurable_columns(tmp_path):
    Image.fromarray(RGB).save(tmp_path / "x.png")
    csv_path = tmp_path / "pairs.csv"
    _write_csv(csv_path, [("x.png", "a caption", "7")], header=("file", "text", "extra"))
    dataset = CaptionCSVDataset(csv_path, image_column="file", caption_column="text")
    assert len(dataset) == 1 and dataset[0][1] == "a caption"
    with pytest.raises(ValueError, match=r"lacks column\(s\) \['image', 'caption'\].*'file', 'text', 'extra'"):
        CaptionCSVDataset(csv_path)


def test_caption_csv_without_usable_rows(tmp_path):
    csv_path = tmp_path / "empty.csv"
    _write_csv(csv_path, [])
    with pytest.raises(ValueError, match="no usable images"):
        CaptionCSVDataset(csv_path)
    _write_csv(csv_path, [("nowhere.png", "gone")])
    with pytest.raises(ValueError, match="no usable images.*nowhere.png.*file not found"):
        CaptionCSVDataset(csv_path)
    with pytest.raises(FileNotFoundError):
        CaptionCSVDataset(tmp_path / "absent.csv")
