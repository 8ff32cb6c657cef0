"""Media as the HTTP reward protocol carries them: PNG images, MP4 (H.264, yuv420p) videos.

PNG is lossless: a server sees the exact generated pixels.

PyAV's wheels bundle ffmpeg, so no system codec is needed. The encoder is ``libx264`` when the
bundled ffmpeg has it, else ``mpeg4`` (MPEG-4 part 2, always built in). Both are lossy: a server
sees the decoded frames, close to but not exactly the generated pixels. 4:2:0 chroma needs even
dimensions, so odd heights or widths are padded by repeating the last row or column; the decoded
video then has the padded (even) size.
"""

from __future__ import annotations

import base64
import io
from fractions import Fraction

import numpy as np
from PIL import Image

# zlib level 1: PNG stays lossless at any level, and level 6 (PIL's default) costs several times
# the CPU for a ~10-30% smaller body, on a reward actor that typically holds a fraction of a core.
PNG_COMPRESS_LEVEL = 1

DEFAULT_FPS = 8
# Constant rate factor for libx264 (0 lossless .. 51 worst; 18 is visually near-lossless). A reward
# should judge what the policy made, not codec artefacts, and the videos are short.
DEFAULT_CRF = 18
# Refuse to decode more than this (decompression bombs: a small MP4 can expand to gigabytes).
MAX_DECODED_FRAMES = 4096
MAX_DECODED_BYTES = 2 << 30

_ENCODER: str | None = None


class _BadVideo(ValueError):
    """A decodable file that this module refuses (no video stream, over the limits, ...)."""


def encode_png(image: np.ndarray) -> str:
    """Base64 of ``image`` ``[H, W, 3]`` uint8 as a PNG file (lossless: the server sees these exact pixels)."""
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(image)).save(buffer, format="PNG", compress_level=PNG_COMPRESS_LEVEL)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def video_encoder() -> str:
    """Name of the encoder used: ``libx264`` if this ffmpeg build has it, else ``mpeg4``."""
    global _ENCODER
    if _ENCODER is None:
        import av

        _ENCODER = "libx264" if "libx264" in av.codecs_available else "mpeg4"
    return _ENCODER


def encode_mp4(frames: np.ndarray, fps: int = DEFAULT_FPS, *, crf: int = DEFAULT_CRF) -> bytes:
    """MP4 file bytes of ``frames`` ``[F, H, W, 3]`` uint8 (F >= 1) at ``fps`` frames per second."""
    import av

    if not isinstance(frames, np.ndarray) or frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        desc = f"{frames.dtype} array of shape {frames.shape}" if isinstance(frames, np.ndarray) else type(frames).__name__
        raise ValueError(f"frames must be a uint8 array [F, H, W, 3], got {desc}")
    if frames.shape[0] == 0 or frames.shape[1] == 0 or frames.shape[2] == 0:
        raise ValueError(f"cannot encode an empty video of shape {frames.shape}")
    if fps < 1:
        raise ValueError(f"fps must be >= 1, got {fps}")
    pad_h, pad_w = frames.shape[1] % 2, frames.shape[2] % 2
    if pad_h or pad_w:
        frames = np.pad(frames, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)), mode="edge")
    height, width = frames.shape[1:3]
    codec = video_encoder()
    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format="mp4") as container:
        options = {"crf": str(crf), "preset": "veryfast"} if codec == "libx264" else {}
        stream = container.add_stream(codec, rate=Fraction(int(fps), 1), options=options)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        if codec == "mpeg4":
            stream.bit_rate = max(500_000, width * height * fps * 4)  # mpeg4 has no crf: bitrate by size
        for frame in frames:
            packet_frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")
            container.mux(stream.encode(packet_frame))
        container.mux(stream.encode())  # flush the encoder
    return buffer.getvalue()


def decode_mp4(data: bytes) -> np.ndarray:
    """``[F, H, W, 3]`` uint8 frames of an MP4 file's first video stream; ValueError otherwise."""
    import av

    try:
        with av.open(io.BytesIO(data), mode="r") as container:
            if not container.streams.video:
                raise _BadVideo("MP4 has no video stream")
            stream = container.streams.video[0]
            frames: list[np.ndarray] = []
            size = 0
            for frame in container.decode(stream):
                array = frame.to_ndarray(format="rgb24")
                size += array.nbytes
                if len(frames) >= MAX_DECODED_FRAMES or size > MAX_DECODED_BYTES:
                    raise _BadVideo(f"video exceeds the decode limit ({MAX_DECODED_FRAMES} frames, {MAX_DECODED_BYTES} bytes)")
                if frames and array.shape != frames[0].shape:
                    raise _BadVideo(f"frame size changes mid-video ({frames[0].shape} -> {array.shape})")
                frames.append(array)
    except _BadVideo:
        raise
    except Exception as exc:  # noqa: BLE001 - av raises many types (InvalidDataError, ...) for bad files
        raise ValueError(f"cannot decode MP4: {type(exc).__name__}: {exc}") from None
    if not frames:
        raise ValueError("MP4 has no decodable frames")
    return np.stack(frames).astype(np.uint8, copy=False)
