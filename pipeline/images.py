"""Input images of image-conditioned models: an ImageRef (a manifest row's ``image``) opened as
the PIL image a diffusers user would pass, or an ImageError naming the image.

Opened at generate time, in the rank, so that a missing or unreadable image fails only the rows
that use it.
"""

from __future__ import annotations

import io

from pipeline.samples import ImageRef


class ImageError(ValueError):
    """An input image that cannot be read; the message names it as the manifest does."""


def open_image(ref: ImageRef):  # -> PIL.Image.Image
    """Read an input image as ``diffusers.utils.load_image`` gives it: EXIF orientation applied,
    converted to RGB (so a user's ``pipe(image=load_image(path), ...)`` gets the same pixels).

    Args:
        ref: a file (``path`` resolved against ``root``) or encoded bytes.
    Returns:
        An RGB PIL image, fully decoded.
    Raises:
        ImageError: no such file, not a file, or not a readable image (truncated, not an image
            format PIL knows); the message starts with ``image 'PATH'``.
    """
    import PIL.Image
    from diffusers.utils import load_image

    source = io.BytesIO(ref.data) if ref.data is not None else ref.file
    if source is None:
        raise ImageError("image: neither bytes nor a path")
    try:
        with PIL.Image.open(source) as image:
            return load_image(image)  # exif_transpose + convert("RGB") read every pixel
    except FileNotFoundError:
        raise ImageError(f"image {ref.label}: no such file ({ref.file})") from None
    except IsADirectoryError:
        raise ImageError(f"image {ref.label}: is a directory ({ref.file})") from None
    except Exception as exc:  # noqa: BLE001 - PIL raises OSError, ValueError, SyntaxError, DecompressionBombError ...
        raise ImageError(f"image {ref.label}: cannot read it: {exc}") from None
