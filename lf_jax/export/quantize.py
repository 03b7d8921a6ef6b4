"""Per-row int8 quantization of vectors, and the byte layout of a KVStore row.

Symmetric quantization per row: ``scale = max|v| / 127`` and ``codes = round(v / scale)``
clipped to [-127, 127], so ``v ~ codes * scale`` and a row of D dimensions takes D bytes
plus its float32 scale. ``RowCodec`` packs a row as a float32 scale, the uint16 index of
the model version that wrote it and the D codes (int8, or float32 with scale 1 for
exact storage): D + 6 bytes a row for int8, 4 D + 6 for float32.

Shapes: vectors [n, D] float; codes [n, D] int8; scales [n] float32; records [n] of
``RowCodec.row_dtype``.

Example:
    >>> codes, scales = quantize_int8(vectors)                 # [n, D] int8, [n] float32
    >>> restored = dequantize_int8(codes, scales)              # [n, D] float32
    >>> quantization_error(vectors)["cosine_mean"]
    0.9999
    >>> codec = RowCodec(dims=64)
    >>> codec.values(codec.encode(vectors, version_index=0))[0]   # 70 bytes
"""

import dataclasses
import functools

import numpy as np


def quantize_int8(vectors) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric per-row int8: (codes [n, D] int8, scales [n] float32), v ~ codes * scale.

    scale = max|v| / 127 (0 for an all-zero row, whose codes are 0).
    """
    vectors = np.asarray(vectors, np.float32)
    scales = (np.abs(vectors).max(axis=1) / 127.0).astype(np.float32)
    safe = np.where(scales > 0, scales, 1.0).astype(np.float32)
    codes = np.clip(np.rint(vectors / safe[:, None]), -127, 127).astype(np.int8)
    return codes, scales


def dequantize_int8(codes: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """codes [n, D] * scales [n] -> float32 [n, D]."""
    return codes.astype(np.float32) * np.asarray(scales, np.float32)[:, None]


def quantization_error(vectors) -> dict:
    """Cosine between vectors and their int8 round trip: {"cosine_mean", "cosine_min", ...}.

    Also the mean relative L2 error. All-zero rows count as cosine 1.
    """
    vectors = np.asarray(vectors, np.float32)
    restored = dequantize_int8(*quantize_int8(vectors))
    norms = np.linalg.norm(vectors, axis=1)
    restored_norms = np.linalg.norm(restored, axis=1)
    denominator = norms * restored_norms
    cosine = np.where(
        denominator > 0,
        np.einsum("ij,ij->i", vectors, restored) / np.where(denominator > 0, denominator, 1.0),
        1.0,
    )
    relative = np.linalg.norm(vectors - restored, axis=1) / np.where(norms > 0, norms, 1.0)
    return {
        "cosine_mean": float(cosine.mean()),
        "cosine_min": float(cosine.min()),
        "relative_l2_mean": float(relative.mean()),
        "relative_l2_max": float(relative.max()),
    }


@dataclasses.dataclass(frozen=True)
class RowCodec:
    """Stored rows of ``dims``-wide vectors: float32 scale, uint16 version index, codes.

    dtype: "int8" (quantized with ``quantize_int8``) or "float32" (exact, scale 1).
    """

    dims: int
    dtype: str = "int8"

    @functools.cached_property
    def row_dtype(self) -> np.dtype:
        """The numpy structured dtype of one row; ``itemsize`` is its size in bytes."""
        code = "i1" if self.dtype == "int8" else "<f4"
        return np.dtype([("scale", "<f4"), ("version", "<u2"), ("codes", code, (self.dims,))])

    def encode(self, vectors: np.ndarray, version_index: int) -> np.ndarray:
        """float32 vectors [n, D] -> records [n], each stamped with ``version_index``."""
        records = np.empty(vectors.shape[0], self.row_dtype)
        if self.dtype == "int8":
            records["codes"], records["scale"] = quantize_int8(vectors)
        else:
            records["codes"], records["scale"] = vectors, 1.0
        records["version"] = version_index
        return records

    def vectors(self, records: np.ndarray) -> np.ndarray:
        """records [n] -> float32 vectors [n, D] (dequantized for int8)."""
        if self.dtype == "int8":
            return dequantize_int8(records["codes"], records["scale"])
        return records["codes"].astype(np.float32)

    def values(self, records: np.ndarray) -> list[bytes]:
        """records [n] -> n byte strings of ``row_dtype.itemsize`` bytes (the stored values)."""
        payload = records.tobytes()
        size = self.row_dtype.itemsize
        return [payload[i * size : (i + 1) * size] for i in range(records.size)]

    def decode(self, values: list[bytes]) -> np.ndarray:
        """Stored values (each ``row_dtype.itemsize`` bytes; the caller checks) -> records [n]."""
        return np.frombuffer(b"".join(values), self.row_dtype)
