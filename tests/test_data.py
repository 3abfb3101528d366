"""rlr.data: layouts (MVTec AD, MPDD/BTAD style, VisA, plain folder), image formats, bad inputs."""
import numpy as np
import pytest
from PIL import Image

from rlr.data import ClassSplit, DatasetError, Sample, detect_layout, load_dataset, load_image, load_mask


def _rgb(seed=0, size=(12, 16)):
    return np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8)


def _write(path, array=None, mode=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(_rgb() if array is None else array, mode=mode).save(path)
    return path


def _mask(size=(12, 16)):
    mask = np.zeros(size, dtype=np.uint8)
    mask[2:5, 3:9] = 255
    return mask


def _mvtec(root, classes=("bottle", "cable"), masks=True):
    for c in classes:
        for i in range(3):
            _write(root / c / "train" / "good" / f"{i:03d}.png")
        _write(root / c / "test" / "good" / "000.png")
        for defect in ("crack", "hole"):
            for i in range(2):
                _write(root / c / "test" / defect / f"{i:03d}.png")
                if masks:
                    _write(root / c / "ground_truth" / defect / f"{i:03d}_mask.png", _mask())
    return root


# ----------------------------------------------------------------------------- MVTec layout

def test_mvtec_layout(tmp_path):
    root = _mvtec(tmp_path / "mvtec")
    data = load_dataset(root)
    assert list(data) == ["bottle", "cable"] and detect_layout(root) == "mvtec"
    split = data["bottle"]
    assert isinstance(split, ClassSplit) and split.has_masks
    assert [s.label for s in split.train] == [0, 0, 0]
    assert all(s.defect == "good" and s.mask_path is None for s in split.train)
    by_name = {(s.defect, s.path.rsplit("/", 1)[-1]): s for s in split.test}
    assert len(split.test) == 5
    good = by_name[("good", "000.png")]
    assert good == Sample(str(root / "bottle" / "test" / "good" / "000.png"), "bottle", 0, "good", None)
    crack = by_name[("crack", "001.png")]
    assert crack.label == 1 and crack.mask_path == str(root / "bottle" / "ground_truth" / "crack" / "001_mask.png")


def test_mvtec_class_selection_and_order(tmp_path):
    root = _mvtec(tmp_path / "mvtec")
    assert list(load_dataset(root, classes=["cable", "bottle"])) == ["cable", "bottle"]
    assert list(load_dataset(root, classes="cable")) == ["cable"]
    assert list(load_dataset(root, classes="cable, bottle")) == ["cable", "bottle"]


def test_class_without_ground_truth_has_no_masks(tmp_path):
    root = _mvtec(tmp_path / "mvtec", classes=("solar",), masks=False)
    split = load_dataset(root)["solar"]
    assert not split.has_masks
    assert all(s.mask_path is None for s in split.test) and sum(s.label for s in split.test) == 4


def test_single_class_folder_and_train_only_class(tmp_path):
    root = _mvtec(tmp_path / "mvtec", classes=("bottle",))
    data = load_dataset(root / "bottle")
    assert list(data) == ["bottle"] and len(data["bottle"].test) == 5
    _write(tmp_path / "only" / "widget" / "train" / "good" / "a.png")
    split = load_dataset(tmp_path / "only")["widget"]
    assert len(split.train) == 1 and split.test == []


def test_btad_style_ok_folders_bmp_images_and_plain_mask_names(tmp_path):
    root = tmp_path / "btad"
    _write(root / "01" / "train" / "ok" / "0000.bmp")
    _write(root / "01" / "test" / "ok" / "0000.bmp")
    _write(root / "01" / "test" / "ko" / "0001.bmp")
    _write(root / "01" / "ground_truth" / "ko" / "0001.png", _mask())
    split = load_dataset(root)["01"]
    assert [(s.label, s.defect) for s in split.test] == [(1, "ko"), (0, "good")]
    assert split.test[0].mask_path.endswith("ground_truth/ko/0001.png")
    assert load_image(split.train[0].path).shape == (12, 16, 3)


def test_missing_mask_names_expected_file(tmp_path):
    root = _mvtec(tmp_path / "mvtec", classes=("bottle",))
    (root / "bottle" / "ground_truth" / "hole" / "001_mask.png").unlink()
    with pytest.raises(DatasetError, match=r"ground_truth/hole/001_mask\.png"):
        load_dataset(root)


def test_unknown_class_lists_the_found_ones(tmp_path):
    root = _mvtec(tmp_path / "mvtec")
    with pytest.raises(DatasetError, match=r"unknown class.*'screw'.*\['bottle', 'cable'\]"):
        load_dataset(root, classes=["screw"])


def test_empty_train_folder(tmp_path):
    root = _mvtec(tmp_path / "mvtec", classes=("bottle",))
    for p in (root / "bottle" / "train" / "good").iterdir():
        p.unlink()
    (root / "bottle" / "train" / "good" / "notes.txt").write_text("not an image")
    with pytest.raises(DatasetError, match=r"no training images in .*train/good"):
        load_dataset(root)


def test_missing_or_mislaid_root(tmp_path):
    with pytest.raises(DatasetError, match="does not exist"):
        load_dataset(tmp_path / "nowhere")
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(DatasetError, match="not a folder"):
        load_dataset(tmp_path / "file.txt")
    mislaid = tmp_path / "mislaid"
    _write(mislaid / "bottle" / "good" / "000.png")  # train/ level missing
    with pytest.raises(DatasetError, match=r"(?s)cannot recognise.*bottle/.*CLASS/train/good.*split_csv/1cls\.csv"):
        load_dataset(mislaid)
    with pytest.raises(DatasetError, match=r"not in the MVTec AD layout"):
        load_dataset(mislaid, layout="mvtec")
    with pytest.raises(DatasetError, match=r"expected the split file .*1cls\.csv"):
        load_dataset(mislaid, layout="visa")
    with pytest.raises(DatasetError, match="unknown layout"):
        load_dataset(mislaid, layout="coco")
    with pytest.raises(DatasetError, match="empty"):
        load_dataset(_mvtec(tmp_path / "m"), classes=[])


# ----------------------------------------------------------------------------- VisA and folder layouts

def _visa(root, rows=None):
    (root / "split_csv").mkdir(parents=True)
    for name in ("candle/Data/Images/Normal/0000.JPG", "candle/Data/Images/Normal/0001.JPG",
                 "candle/Data/Images/Anomaly/000.JPG", "pcb1/Data/Images/Normal/0000.JPG"):
        _write(root / name)
    _write(root / "candle/Data/Masks/Anomaly/000.png", _mask())
    rows = rows or [
        "candle,train,normal,candle/Data/Images/Normal/0000.JPG,",
        "candle,test,normal,candle/Data/Images/Normal/0001.JPG,",
        "candle,test,anomaly,candle/Data/Images/Anomaly/000.JPG,candle/Data/Masks/Anomaly/000.png",
        "pcb1,train,normal,pcb1/Data/Images/Normal/0000.JPG,",
    ]
    (root / "split_csv" / "1cls.csv").write_text("object,split,label,image,mask\n" + "\n".join(rows) + "\n")
    return root


def test_visa_layout(tmp_path):
    root = _visa(tmp_path / "visa")
    assert detect_layout(root) == "visa"
    data = load_dataset(root)
    assert list(data) == ["candle", "pcb1"]
    candle = data["candle"]
    assert candle.has_masks and not data["pcb1"].has_masks
    assert [(s.label, s.defect) for s in candle.test] == [(0, "good"), (1, "anomaly")]
    assert candle.test[1].mask_path == str(root / "candle/Data/Masks/Anomaly/000.png")
    assert load_image(candle.train[0].path).shape == (12, 16, 3)  # a JPEG


@pytest.mark.parametrize("row, message", [
    ("candle,train,broken,candle/Data/Images/Normal/0000.JPG,", r"label 'broken' is not one of"),
    ("candle,val,normal,candle/Data/Images/Normal/0000.JPG,", r"split 'val'"),
    ("candle,train,normal,candle/Data/Images/Normal/9999.JPG,", r"line 3: image file not found: .*9999\.JPG"),
    ("candle,train,anomaly,candle/Data/Images/Anomaly/000.JPG,", r"anomalous image in the train split"),
    ("candle,test,anomaly,candle/Data/Images/Anomaly/000.JPG,candle/Data/Masks/Anomaly/404.png",
     r"mask file not found: .*404\.png"),
])
def test_visa_bad_rows(tmp_path, row, message):
    root = _visa(tmp_path / "visa", rows=["candle,train,normal,candle/Data/Images/Normal/0001.JPG,", row])
    with pytest.raises(DatasetError, match=message):
        load_dataset(root)


def test_visa_bad_header_and_unknown_class(tmp_path):
    root = _visa(tmp_path / "visa")
    with pytest.raises(DatasetError, match=r"unknown class.*'candel'.*\['candle', 'pcb1'\]"):
        load_dataset(root, classes=["candel"])
    (root / "split_csv" / "1cls.csv").write_text("object,split,image\ncandle,train,x.JPG\n")
    with pytest.raises(DatasetError, match=r"missing column\(s\) \['label', 'mask'\]"):
        load_dataset(root)


def test_folder_layout(tmp_path):
    root = tmp_path / "my_parts"
    for i, ext in enumerate(("png", "jpg", "bmp", "tif")):
        _write(root / f"{i}.{ext}")
    (root / "readme.txt").write_text("x")
    data = load_dataset(root)
    assert detect_layout(root) == "folder" and list(data) == ["my_parts"]
    split = data["my_parts"]
    assert len(split.train) == 4 and split.test == [] and not split.has_masks
    with pytest.raises(DatasetError, match="unknown class"):
        load_dataset(root, classes=["other"])
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DatasetError, match="no images directly inside"):
        load_dataset(empty, layout="folder")


# ----------------------------------------------------------------------------- image formats

def test_rgb_formats_roundtrip(tmp_path):
    image = _rgb(1)
    for ext in ("png", "bmp", "tif", "tiff"):
        assert np.array_equal(load_image(_write(tmp_path / f"a.{ext}", image)), image), ext
    jpeg = load_image(_write(tmp_path / "a.jpeg", image))
    assert jpeg.shape == image.shape and jpeg.dtype == np.uint8


def test_grayscale_rgba_palette(tmp_path):
    gray = _rgb(2)[..., 0]
    for ext in ("png", "bmp", "tif"):
        out = load_image(_write(tmp_path / f"g.{ext}", gray))
        assert out.shape == (12, 16, 3) and all(np.array_equal(out[..., c], gray) for c in range(3))
    rgba = np.concatenate([_rgb(3), np.full((12, 16, 1), 7, np.uint8)], axis=-1)
    assert np.array_equal(load_image(_write(tmp_path / "a.png", rgba)), rgba[..., :3])
    palette = Image.fromarray(_rgb(4)).convert("P")
    palette.save(tmp_path / "p.png")
    assert np.array_equal(load_image(tmp_path / "p.png"), np.asarray(palette.convert("RGB")))


def test_16bit_images_are_scaled(tmp_path):
    import tifffile

    values = np.array([[0, 257, 65535, 32768]], dtype=np.uint16).repeat(3, axis=0)
    Image.fromarray(values).save(tmp_path / "g16.png")  # 16-bit grayscale PNG
    out = load_image(tmp_path / "g16.png")
    assert out.dtype == np.uint8 and np.array_equal(out[0, :, 0], [0, 1, 255, 128])
    rgb16 = np.stack([values, values // 2, np.full_like(values, 65535)], axis=-1)
    tifffile.imwrite(tmp_path / "rgb16.tif", rgb16)  # 16-bit RGB TIFF (PIL cannot decode it)
    out = load_image(tmp_path / "rgb16.tif")
    assert np.array_equal(out[0, :, 0], [0, 1, 255, 128]) and np.array_equal(out[0, :, 2], [255] * 4)
    assert np.array_equal(out[0, :, 1], [0, 0, 127, 64])  # 32767 * 255 / 65535 = 127.498
    floats = np.random.default_rng(0).random((6, 8, 3)).astype(np.float32)
    tifffile.imwrite(tmp_path / "f32.tif", floats)  # float RGB TIFF in [0, 1]: PIL cannot open it
    assert np.array_equal(load_image(tmp_path / "f32.tif"), np.rint(floats * 255).astype(np.uint8))


def test_corrupt_and_missing_images(tmp_path):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\nthis is not really a png")
    with pytest.raises(DatasetError, match=r"cannot read image .*broken\.png"):
        load_image(bad)
    good = _write(tmp_path / "cut.jpg", _rgb(5, (64, 64)))
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(good.read_bytes()[:200])
    with pytest.raises(DatasetError, match=r"truncated\.jpg"):
        load_image(truncated)
    text = tmp_path / "fake.tif"
    text.write_text("hello")
    with pytest.raises(DatasetError, match=r"fake\.tif"):
        load_image(text)
    with pytest.raises(DatasetError, match=r"not found: .*missing\.png"):
        load_image(tmp_path / "missing.png")


# ----------------------------------------------------------------------------- masks

def test_load_mask_binarises_and_resizes_nearest(tmp_path):
    mask = _mask((40, 40))
    path = _write(tmp_path / "m.png", mask)
    out = load_mask(path, 20)
    assert out.dtype == bool and out.shape == (20, 20)
    expected = np.asarray(Image.fromarray(mask).resize((20, 20), Image.NEAREST)) > 127
    assert np.array_equal(out, expected)
    assert np.array_equal(load_mask(path, 40), mask > 0)
    ones = _write(tmp_path / "ones.png", (mask > 0).astype(np.uint8))  # 0/1 masks (VisA style)
    assert np.array_equal(load_mask(ones, 40), mask > 0)
    soft = mask.copy()
    soft[0, 0] = 100  # below half of the maximum: background
    assert not load_mask(_write(tmp_path / "soft.png", soft), 40)[0, 0]
    assert not load_mask(_write(tmp_path / "zero.png", np.zeros((8, 8), np.uint8)), 8).any()
    colour = np.zeros((8, 8, 3), np.uint8)
    colour[1, 2, 0] = 255
    assert load_mask(_write(tmp_path / "c.png", colour), 8).sum() == 1
    upscaled = load_mask(_write(tmp_path / "small.png", mask[::10, ::10]), 40)
    assert upscaled.shape == (40, 40) and upscaled.sum() == 100 * mask[::10, ::10].astype(bool).sum()


def test_mask_size_differs_from_image(tmp_path):
    path = _write(tmp_path / "000_mask.png", _mask((12, 16)))
    assert load_mask(path, 8, image_shape=(12, 16)).shape == (8, 8)
    with pytest.raises(DatasetError, match=r"000_mask\.png is 12x16 .*image \(.*000\.png\) is 24x32"):
        load_mask(path, 8, image_shape=(24, 32), image_path=tmp_path / "000.png")
    with pytest.raises(DatasetError, match=r"cannot read image .*bad_mask\.png"):
        (tmp_path / "bad_mask.png").write_bytes(b"nope")
        load_mask(tmp_path / "bad_mask.png", 8)


# ----------------------------------------------------------------------------- odd but legal inputs

def test_cmyk_jpeg_is_read_as_rgb(tmp_path):
    image = Image.fromarray(_rgb(6, (32, 32))).convert("CMYK")
    image.save(tmp_path / "cmyk.jpg", quality=100)
    out = load_image(tmp_path / "cmyk.jpg")
    assert out.shape == (32, 32, 3) and out.dtype == np.uint8
    expected = np.asarray(Image.open(tmp_path / "cmyk.jpg").convert("RGB")).astype(int)
    assert np.array_equal(out, expected)


@pytest.mark.parametrize("orientation, turn", [(6, Image.Transpose.ROTATE_270), (8, Image.Transpose.ROTATE_90),
                                               (3, Image.Transpose.ROTATE_180)])
def test_exif_orientation_is_applied(tmp_path, orientation, turn):
    pixels = _rgb(7, (12, 20))
    stored = Image.fromarray(pixels)
    exif = stored.getexif()
    exif[0x0112] = orientation
    stored.save(tmp_path / "photo.png", exif=exif)
    out = load_image(tmp_path / "photo.png")
    assert np.array_equal(out, np.asarray(stored.transpose(turn)))
    assert out.shape[:2] == ((20, 12) if orientation in (6, 8) else (12, 20))


def test_huge_image_loads_and_the_decompression_bomb_limit_is_named(tmp_path, monkeypatch):
    huge = tmp_path / "huge.png"
    Image.new("RGB", (8000, 8000), (10, 200, 30)).save(huge, compress_level=1)
    out = load_image(huge)
    assert out.shape == (8000, 8000, 3) and tuple(out[4000, 4000]) == (10, 200, 30)
    del out
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 8000 * 8000 // 3)   # 8000 x 8000 is then over twice the limit
    with pytest.raises(DatasetError, match=r"huge\.png.*MAX_IMAGE_PIXELS"):
        load_image(huge)


def test_anti_aliased_mask_is_binarised_above_127(tmp_path):
    values = np.array([[0, 1, 100, 127, 128, 200, 254, 255]], dtype=np.uint8).repeat(2, axis=0)
    _write(tmp_path / "m.png", values)
    mask = load_mask(tmp_path / "m.png", 8)
    assert mask.tolist()[0] == [False, False, False, False, True, True, True, True]


def test_class_names_with_spaces_unicode_symlinks_and_hidden_files(tmp_path):
    real = tmp_path / "elsewhere" / "cable"
    for name in ("metal nut", "ščetka", "cable"):
        folder = real if name == "cable" else tmp_path / "root" / name
        _write(folder / "train" / "good" / "000.png")
        _write(folder / "test" / "good" / "000.png")
        (folder / "train" / "good" / ".DS_Store").write_bytes(b"\0\1binary")
        _write(folder / "train" / "good" / "._000.png")   # an AppleDouble file: hidden, not an image
    (tmp_path / "root" / "cable").symlink_to(real, target_is_directory=True)
    splits = load_dataset(tmp_path / "root")
    assert list(splits) == ["cable", "metal nut", "ščetka"]
    for split in splits.values():
        assert [s.path.rsplit("/", 1)[-1] for s in split.train] == ["000.png"] and len(split.test) == 1
        assert load_image(split.train[0].path).shape == (12, 16, 3)
    assert list(load_dataset(tmp_path / "root", classes="ščetka,metal nut")) == ["ščetka", "metal nut"]


# ----------------------------------------------------------------------------- --input-size auto

def _sized_class(root, name, sides, shape=lambda s: (s, s + 40)):
    for i, side in enumerate(sides):
        _write(root / name / "train" / "good" / f"{i:03d}.png", _rgb(i, shape(side)))
        _write(root / name / "test" / "good" / f"{i:03d}.png", _rgb(i, (8, 8)))   # test images do not count


@pytest.mark.parametrize("sides, size", [((128, 128, 130), 256),    # small tiles: not below the paper's 256
                                         ((300, 310, 320), 320),    # nearest multiple of 64
                                         ((380, 390, 900), 384),    # the median, not the mean
                                         ((640, 640, 600), 512),    # large images: capped at 512
                                         ((1500,), 512)])
def test_auto_input_size_from_the_median_shorter_side(tmp_path, sides, size):
    from rlr.data.sizes import auto_input_size
    _sized_class(tmp_path, "part", sides)
    choice = auto_input_size(load_dataset(tmp_path))
    assert choice.size == size
    assert choice.per_class == {"part": sorted(sides)[len(sides) // 2]}
    assert f"{size} px" in choice.reason


def test_auto_input_size_of_a_mixed_set_is_its_largest_class_and_says_the_cost(tmp_path):
    from rlr.data.sizes import auto_input_size
    _sized_class(tmp_path, "tiles", [128] * 3)
    _sized_class(tmp_path, "boards", [640] * 3, shape=lambda s: (s + 200, s))   # portrait: the width is shorter
    choice = auto_input_size(load_dataset(tmp_path))
    assert choice.size == 512 and choice.per_class == {"boards": 640, "tiles": 128}
    assert "upsampled" in choice.reason and "4.0x the tokens" in choice.reason


def test_auto_input_size_names_an_unreadable_image(tmp_path):
    from rlr.data.sizes import auto_input_size
    _sized_class(tmp_path, "part", [300])
    (tmp_path / "part" / "train" / "good" / "001.png").write_bytes(b"not an image")
    with pytest.raises(DatasetError, match="001.png"):
        auto_input_size(load_dataset(tmp_path))
