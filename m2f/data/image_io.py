"""Reading images, label PNGs and annotation JSON files, with errors that name the file.

Images of any common mode become RGB uint8: grayscale is replicated to three channels, palette
and CMYK images are converted, the alpha channel of RGBA/LA is dropped (as detectron2 does), and
16-bit grayscale is scaled to 8 bits (value / 257; 16-bit RGB is reduced to 8 bits by Pillow). The EXIF orientation is applied. Label PNGs
are returned with their raw values (no colour conversion).
"""

import contextlib
import errno
import io
import json
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from m2f.data.errors import DatasetError, DatasetFileNotFoundError
from m2f.data.mask_codec import rgb_to_id

_SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, UnidentifiedImageError, Image.DecompressionBombError)


def missing_file(path: Path, what: str) -> DatasetFileNotFoundError:
    """The error for a file that cannot be opened: absent, a broken symbolic link or a link loop."""
    if path.is_symlink():
        try:
            path.resolve(strict=True)
        except RuntimeError:  # Python 3.11 reports a loop as RuntimeError, 3.13 as OSError(ELOOP)
            return DatasetFileNotFoundError(path, f"{what} file not found: a symbolic link loop")
        except OSError as err:
            reason = "a symbolic link loop" if err.errno == errno.ELOOP else "a broken symbolic link"
            return DatasetFileNotFoundError(path, f"{what} file not found: {reason}")
    return DatasetFileNotFoundError(path, f"{what} file not found")


def _open(path: Path, what: str) -> Image.Image:
    if not path.is_file():
        raise missing_file(path, what)
    if path.stat().st_size == 0:
        raise DatasetError(path, f"cannot decode {what}: the file is empty (0 bytes)")
    try:
        image = Image.open(path)
        image.load()  # decode now: truncated or corrupt data only fails here
    except _DECODE_ERRORS as err:
        raise DatasetError(path, f"cannot decode {what}: {err}") from err
    return image


def read_image(path: str | Path) -> np.ndarray:
    """Read an image file as RGB uint8.

    Args:
        path: image file (any format Pillow reads).

    Returns:
        (H, W, 3) uint8 array, RGB.

    Raises:
        DatasetFileNotFoundError: the file does not exist.
        DatasetError: the file cannot be decoded or has an unsupported mode (e.g. float "F").
    """
    path = Path(path)
    return _rgb(_open(path, "image"), path)


def decode_image(data: bytes, *, name: str = "upload") -> tuple[np.ndarray, str]:
    """Decode image file bytes (an upload) as `read_image` reads a file.

    Returns:
        (H, W, 3) uint8 RGB, and the file's own mode (e.g. "L", "RGBA"), to say what was converted.

    Raises:
        DatasetError: the bytes are not an image Pillow can decode (the message names `name`).
    """
    try:
        image = Image.open(io.BytesIO(data))
        image.load()
    except _DECODE_ERRORS as err:
        raise DatasetError(name, f"not an image file Pillow can read ({err})") from err
    return _rgb(image, Path(name)), image.mode


def _rgb(image: Image.Image, path: Path) -> np.ndarray:
    """A decoded image as RGB uint8 by the rules in the module docstring (`path` names it in errors)."""
    with contextlib.suppress(*_DECODE_ERRORS):  # an unreadable EXIF block is not worth losing the image for
        image = ImageOps.exif_transpose(image)
    if image.mode in _SIXTEEN_BIT_MODES:
        values = np.asarray(image, dtype=np.int64)
        if values.size and (values.min() < 0 or values.max() > 65535):
            raise DatasetError(path, f"unsupported image values: mode {image.mode} has values outside 0..65535")
        # 16-bit files are scaled so that 65535 -> 255; a 32-bit "I" image whose values fit 8 bits
        # is most likely 8-bit data stored wide and is kept as it is.
        eight_bit = image.mode == "I" and (values.size == 0 or values.max() <= 255)
        gray = values if eight_bit else np.rint(values / 257.0)
        return np.repeat(gray.astype(np.uint8)[..., None], 3, axis=2)
    if image.mode == "F":
        raise DatasetError(path, "unsupported image mode: floating-point image (mode F)")
    if image.mode != "RGB":
        image = image.convert("RGB")
    return np.asarray(image, dtype=np.uint8).copy()


def read_label_png(path: str | Path, *, what: str = "label PNG") -> np.ndarray:
    """Read a single-channel label image with its raw values (no palette or colour conversion).

    Args:
        path: PNG file (mode L, P, I or I;16; e.g. ADE20K labels, Cityscapes labelIds/instanceIds).
        what: how the file is named in error messages.

    Returns:
        (H, W) array: uint8 for 8-bit files, int32 for 16/32-bit files.

    Raises:
        DatasetFileNotFoundError: the file does not exist.
        DatasetError: the file cannot be decoded or is not single-channel.
    """
    path = Path(path)
    image = _open(path, what)
    if image.mode in ("L", "P"):
        return np.asarray(image, dtype=np.uint8).copy()
    if image.mode in _SIXTEEN_BIT_MODES:
        return np.asarray(image, dtype=np.int32).copy()
    raise DatasetError(path, f"bad {what} mode: expected a single-channel image, got mode {image.mode}")


def read_panoptic_png(path: str | Path) -> np.ndarray:
    """Read a COCO panoptic PNG as segment ids, id = R + 256*G + 256^2*B (0 = void).

    Args:
        path: RGB (or RGBA, alpha ignored) PNG.

    Returns:
        (H, W) int64 segment ids.

    Raises:
        DatasetFileNotFoundError: the file does not exist.
        DatasetError: the file cannot be decoded or is not an RGB image.
    """
    path = Path(path)
    image = _open(path, "panoptic PNG")
    if image.mode not in ("RGB", "RGBA"):
        raise DatasetError(path, f"bad panoptic PNG mode: ids are encoded in RGB, got mode {image.mode}")
    return rgb_to_id(np.asarray(image)[..., :3])


def read_json(path: str | Path, *, what: str = "annotation JSON") -> Any:
    """Load a JSON file.

    Raises:
        DatasetFileNotFoundError: the file does not exist.
        DatasetError: the file is not valid JSON (with line and column).
    """
    path = Path(path)
    if not path.is_file():
        raise DatasetFileNotFoundError(path, f"{what} file not found")
    try:
        with path.open("rb") as f:
            return json.load(f)
    except json.JSONDecodeError as err:
        raise DatasetError(path, f"invalid JSON: {err.msg} at line {err.lineno} column {err.colno}") from err
    except UnicodeDecodeError as err:
        raise DatasetError(path, f"invalid JSON: not UTF-8 text ({err.reason})") from err


def require_keys(entry: Any, keys: tuple[str, ...], *, file: str | Path, where: str) -> None:
    """Check that a JSON entry is an object with the given keys.

    Args:
        entry: the decoded JSON value.
        keys: keys that must be present.
        file: the JSON file, for the message.
        where: where the entry sits, e.g. "annotations[3]".

    Raises:
        DatasetError: "not a COCO file: annotations[3] has no key 'segments_info'".
    """
    if not isinstance(entry, dict):
        raise DatasetError(file, f"not a COCO file: {where} is a {type(entry).__name__}, expected an object")
    for key in keys:
        if key not in entry:
            raise DatasetError(file, f"not a COCO file: {where} has no key {key!r}")
