"""One precomputed example as bytes in an ArrayRecord shard (msgpack map; arrays as raw little-endian buffers).

Fields: row_id (manifest data row), label, caption (text as in the manifest), image (encoded PNG or JPEG bytes,
or raw RGB pixels with an image_shape, already resized), audio (AST features, float16, frames x mel bins, normalised, padded to the fixed length),
audio_frames (how many leading frames are real audio, the rest is padding: feature-domain augmentation needs it).
"""

from __future__ import annotations

import io

import msgpack
import numpy as np
from PIL import Image

FORMAT_VERSION = 1
AUDIO_DTYPE = np.dtype("<f2")


def encode_example(
    row_id: int, label: str, caption: str, image: bytes | np.ndarray, audio: np.ndarray, audio_frames: int
) -> bytes:
    """`image` is an encoded file (bytes) or raw (height, width, 3) uint8 pixels (stored with their shape)."""
    audio = np.ascontiguousarray(audio, AUDIO_DTYPE)
    fields = {
        "v": FORMAT_VERSION,
        "row_id": int(row_id),
        "label": label,
        "caption": caption,
        "audio": audio.tobytes(),
        "audio_shape": list(audio.shape),
        "audio_frames": int(audio_frames),
    }
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"raw images are (height, width, 3) uint8, got {image.dtype} {image.shape}")
        fields.update(image=np.ascontiguousarray(image).tobytes(), image_shape=list(image.shape))
    else:
        fields["image"] = bytes(image)
    return msgpack.packb(fields, use_bin_type=True)


def decode_example(data: bytes) -> dict:
    """The inverse of `encode_example`; `audio` comes back as a read-only float16 array, a raw `image` as a
    read-only uint8 array (an encoded one as bytes)."""
    fields = msgpack.unpackb(data, raw=False)
    if fields.get("v") != FORMAT_VERSION:
        raise ValueError(
            f"record format version {fields.get('v')}, this code reads {FORMAT_VERSION}: re-run precompute"
        )
    fields["audio"] = np.frombuffer(fields["audio"], AUDIO_DTYPE).reshape(fields.pop("audio_shape"))
    if "image_shape" in fields:
        fields["image"] = np.frombuffer(fields["image"], np.uint8).reshape(fields.pop("image_shape"))
    del fields["v"]
    return fields


def image_of(fields: dict) -> Image.Image:
    """The RGB image of a decoded record: raw pixels wrapped without decoding, or the encoded file decoded."""
    if isinstance(fields["image"], np.ndarray):
        return Image.fromarray(fields["image"], "RGB")
    return Image.open(io.BytesIO(fields["image"])).convert("RGB")
