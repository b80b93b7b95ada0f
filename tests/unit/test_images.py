"""pipeline.images: an input image as diffusers' load_image gives it, or an error naming it."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.images import ImageError, open_image
from pipeline.samples import ImageRef


def _png(mode: str = "RGBA", height: int = 6) -> bytes:
    buf = io.BytesIO()
    pixels = np.random.default_rng(0).integers(0, 256, (height, 4, len(mode)), dtype=np.uint8)
    Image.fromarray(pixels, mode).save(buf, format="PNG")
    return buf.getvalue()


def test_file_and_bytes_give_load_images_pixels(tmp_path: Path) -> None:
    from diffusers.utils import load_image

    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "a.png").write_bytes(_png())
    from_file = open_image(ImageRef(path="imgs/a.png", root=str(tmp_path)))
    from_bytes = open_image(ImageRef(path="ignored.png", data=_png()))
    expected = load_image(str(tmp_path / "imgs" / "a.png"))
    assert from_file.mode == from_bytes.mode == "RGB" and from_file.size == (4, 6)
    assert np.array_equal(np.asarray(from_file), np.asarray(expected))
    assert np.array_equal(np.asarray(from_bytes), np.asarray(expected))


@pytest.mark.parametrize(
    ("ref", "message"),
    [
        (ImageRef(path="imgs/missing.png", root="/nonexistent"),
         "image 'imgs/missing.png': no such file (/nonexistent/imgs/missing.png)"),
        (ImageRef(path="c.png", data=b"not an image"), "image 'c.png' (12 bytes): cannot read it: cannot identify"),
        (ImageRef(data=_png(height=64)[:600]), "image (600 bytes): cannot read it"),  # truncated
    ],
)  # fmt: skip
def test_unreadable_images_are_named(ref: ImageRef, message: str) -> None:
    with pytest.raises(ImageError) as info:
        open_image(ref)
    assert str(info.value).startswith(message), str(info.value)


def test_a_directory_or_corrupt_file_is_named(tmp_path: Path) -> None:
    (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    with pytest.raises(ImageError, match=r"^image 'bad.png': cannot read it"):
        open_image(ImageRef(path="bad.png", root=str(tmp_path)))
    with pytest.raises(ImageError, match=r"^image '.': is a directory"):
        open_image(ImageRef(path=".", root=str(tmp_path)))
