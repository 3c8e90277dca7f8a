"""PNG encoding of images stored in shards (lossless, so scoring a stored image equals scoring the decoded one)."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image


def to_png(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    # compress_level 1: PNG is lossless at every level, and shards are written in hot loops
    Image.fromarray(np.ascontiguousarray(image, dtype=np.uint8)).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def from_png(data: bytes | np.ndarray, where: str = "stored image") -> np.ndarray:
    """The RGB image; a PNG that does not decode is a ShardError naming ``where`` (file, prompt, sample)."""
    from silmm.store import ShardError

    try:
        return np.asarray(Image.open(io.BytesIO(bytes(data))).convert("RGB"))
    except (OSError, ValueError, SyntaxError) as exc:  # PIL's errors for truncated or damaged data
        raise ShardError(f"{where}: not a decodable PNG ({type(exc).__name__}: {exc})") from None
