"""One precomputed example as bytes in an ArrayRecord shard (msgpack map; arrays as raw little-endian buffers).

Fields: row_id (manifest data row), label, caption (text as in the manifest), image (encoded PNG or JPEG bytes,
already resized), audio (AST features, float16, frames x mel bins, normalised, padded to the fixed length),
audio_frames (how many leading frames are real audio, the rest is padding: feature-domain augmentation needs it).
"""

from __future__ import annotations

import msgpack
import numpy as np

FORMAT_VERSION = 1
AUDIO_DTYPE = np.dtype("<f2")


def encode_example(row_id: int, label: str, caption: str, image: bytes, audio: np.ndarray, audio_frames: int) -> bytes:
    audio = np.ascontiguousarray(audio, AUDIO_DTYPE)
    return msgpack.packb(
        {
            "v": FORMAT_VERSION,
            "row_id": int(row_id),
            "label": label,
            "caption": caption,
            "image": bytes(image),
            "audio": audio.tobytes(),
            "audio_shape": list(audio.shape),
            "audio_frames": int(audio_frames),
        },
        use_bin_type=True,
    )


def decode_example(data: bytes) -> dict:
    """The inverse of `encode_example`; `audio` comes back as a read-only float16 array."""
    fields = msgpack.unpackb(data, raw=False)
    if fields.get("v") != FORMAT_VERSION:
        raise ValueError(
            f"record format version {fields.get('v')}, this code reads {FORMAT_VERSION}: re-run precompute"
        )
    fields["audio"] = np.frombuffer(fields["audio"], AUDIO_DTYPE).reshape(fields.pop("audio_shape"))
    del fields["v"]
    return fields
