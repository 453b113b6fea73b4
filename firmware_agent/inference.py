"""On-device inference from the exported ``.tflite`` model with LiteRT (``bdn agent predict``).

The runtime is ``ai-edge-litert`` where it is installed (desktop, CI, recent Pi OS) and ``tflite-runtime``
otherwise (the older, smaller wheel common on Raspberry Pi images); both expose the same ``Interpreter``. The
model file is the one :mod:`firmware_agent.tflite_export` writes: input ``[N, 28, 28, 1]`` float32 pixels in
[0, 1], output ``[N, 10]`` probabilities.

Images follow the Fashion-MNIST conventions, because that is what the model was trained on: 28x28 grayscale,
**light garment on a dark background** (the dataset's images are negatives of product photos), pixel value
0..255 scaled to [0, 1] by dividing by 255.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, Final

import numpy as np
import numpy.typing as npt

__all__ = [
    "CLASS_NAMES",
    "InferenceError",
    "TfliteModel",
    "load_image",
    "load_images",
]

CLASS_NAMES: Final = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
"""Fashion-MNIST label names, indexed by class number."""

SIDE: Final = 28
_DEFAULT_BATCH: Final = 256


class InferenceError(RuntimeError):
    """Inference cannot run: no runtime installed, the model file is unusable, or an image cannot be read."""


def _interpreter_class() -> tuple[Callable[..., Any], str]:
    """LiteRT's Interpreter if it imports, else tflite-runtime's; the name says which, for logs and errors."""
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError:
        pass
    else:
        return Interpreter, "ai-edge-litert"
    try:
        from tflite_runtime.interpreter import Interpreter as TfliteRuntimeInterpreter
    except ImportError:
        raise InferenceError(
            "no TFLite runtime is installed: pip install ai-edge-litert (or tflite-runtime on a Raspberry Pi)"
        ) from None
    return TfliteRuntimeInterpreter, "tflite-runtime"


class TfliteModel:
    """A loaded ``.tflite`` classifier: ``predict(images)`` gives class probabilities.

    One interpreter per instance and it is not thread-safe (LiteRT's own rule): use one instance per thread.
    Batches are run ``batch`` images at a time, resizing the input tensor when the batch size changes, so
    memory stays bounded however many images are passed.
    """

    def __init__(
        self, path: str | os.PathLike[str], *, batch: int = _DEFAULT_BATCH, num_threads: int = 1
    ) -> None:
        if batch <= 0:
            raise ValueError(f"batch must be positive, got {batch}")
        self.path = Path(path)
        self.batch = batch
        interpreter_cls, self.runtime = _interpreter_class()
        if not self.path.is_file():
            raise InferenceError(f"model file {self.path} does not exist")
        try:
            self._interp = interpreter_cls(model_path=str(self.path), num_threads=num_threads)
            self._interp.allocate_tensors()
        except (ValueError, RuntimeError) as exc:
            # LiteRT verifies the flatbuffer before using it: a truncated or foreign file ends here.
            raise InferenceError(f"{self.path} is not a usable .tflite model: {exc}") from None
        inputs = self._interp.get_input_details()
        outputs = self._interp.get_output_details()
        if len(inputs) != 1 or len(outputs) != 1:
            raise InferenceError(f"{self.path}: expected one input and one output tensor")
        self._input, self._output = inputs[0], outputs[0]
        in_shape = tuple(int(d) for d in self._input["shape"][1:])
        out_shape = tuple(int(d) for d in self._output["shape"][1:])
        if (
            in_shape != (SIDE, SIDE, 1)
            or self._input["dtype"] != np.float32
            or out_shape != (len(CLASS_NAMES),)
        ):
            raise InferenceError(
                f"{self.path} is not a Fashion-MNIST classifier: input {in_shape} {self._input['dtype']}, "
                f"output {out_shape} (expected (28, 28, 1) float32 -> (10,))"
            )
        self._rows = int(self._input["shape"][0])

    def predict(self, images: npt.ArrayLike) -> npt.NDArray[np.float32]:
        """Class probabilities ``(N, 10)`` for images ``(N, 28, 28)`` (a single ``(28, 28)`` image is N=1;
        ``(N, 1, 28, 28)`` as in :class:`blockdeepnet.data.Dataset` is accepted too).

        ``uint8`` (or other integer) pixels are 0..255 and divided by 255; float pixels must already be in
        [0, 1], like the training data. Anything else raises ``ValueError`` rather than classifying garbage.
        """
        x = _as_model_input(images)
        out = np.empty((x.shape[0], len(CLASS_NAMES)), dtype=np.float32)
        for start in range(0, x.shape[0], self.batch):
            chunk = x[start : start + self.batch]
            self._resize(chunk.shape[0])
            self._interp.set_tensor(self._input["index"], chunk.reshape(-1, SIDE, SIDE, 1))
            self._interp.invoke()
            out[start : start + chunk.shape[0]] = self._interp.get_tensor(self._output["index"])
        return out

    def _resize(self, rows: int) -> None:
        if rows != self._rows:
            self._interp.resize_tensor_input(self._input["index"], [rows, SIDE, SIDE, 1])
            self._interp.allocate_tensors()
            self._rows = rows


def _as_model_input(images: npt.ArrayLike) -> npt.NDArray[np.float32]:
    """``(N, 28, 28)`` float32 in [0, 1], the scaling the model was trained with; ValueError otherwise."""
    arr = np.asarray(images)
    if arr.ndim == 2:
        arr = arr[None]
    elif arr.ndim == 4 and arr.shape[1:] in ((1, SIDE, SIDE), (SIDE, SIDE, 1)):
        arr = arr.reshape(-1, SIDE, SIDE)  # one channel, NCHW (the dataset's layout) or NHWC
    if arr.ndim != 3 or arr.shape[1:] != (SIDE, SIDE):
        raise ValueError(f"expected images of shape (N, 28, 28) or (28, 28), got {arr.shape}")
    if np.issubdtype(arr.dtype, np.integer):
        if arr.size and (arr.min() < 0 or arr.max() > 255):
            raise ValueError("integer pixels must lie in 0..255")
        return np.ascontiguousarray(arr, dtype=np.float32) / np.float32(255.0)
    if np.issubdtype(arr.dtype, np.floating):
        if arr.size and not (np.isfinite(arr).all() and arr.min() >= 0.0 and arr.max() <= 1.0):
            raise ValueError("float pixels must lie in [0, 1] (divide 0..255 values by 255)")
        return np.ascontiguousarray(arr, dtype=np.float32)
    raise ValueError(f"unsupported pixel type {arr.dtype}")


def load_images(path: str | os.PathLike[str], *, invert: bool = False) -> npt.NDArray[np.float32]:
    """Images ``(N, 28, 28)``, float32 pixels in [0, 1], from a PNG/JPEG (N = 1) or a ``.npy`` array.

    Pictures (any format Pillow reads) are converted to 8-bit grayscale and, unless already 28x28, scaled so
    the longer side is 28 pixels and centred on a black square, the way Fashion-MNIST was made. They are
    assumed to be in Fashion-MNIST polarity (light object, dark background); pass ``invert=True`` for an
    ordinary photo of a dark object on a light background. ``.npy`` files hold ``(28, 28)`` or
    ``(N, 28, 28)`` pixels, integers 0..255 or floats in [0, 1] (``invert`` applies to them too). Pixel
    values 0..255 are divided by 255, as for the training data. Raises InferenceError.
    """
    p = Path(path)
    images = _load_npy(p) if p.suffix.lower() == ".npy" else _as_model_input(_load_picture(p))
    return (np.float32(1.0) - images) if invert else images


def load_image(path: str | os.PathLike[str], *, invert: bool = False) -> npt.NDArray[np.float32]:
    """One image ``(28, 28)``; see :func:`load_images` for the formats and the polarity assumed."""
    images = load_images(path, invert=invert)
    if images.shape[0] != 1:
        raise InferenceError(f"{path} holds {images.shape[0]} images, expected one")
    return images.reshape(SIDE, SIDE)


def _load_npy(p: Path) -> npt.NDArray[np.float32]:
    try:
        arr: npt.NDArray[Any] = np.load(p, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise InferenceError(f"cannot read {p}: {exc}") from None
    try:
        return _as_model_input(arr)
    except ValueError as exc:
        raise InferenceError(f"{p}: {exc}") from None


def _load_picture(p: Path) -> npt.NDArray[np.uint8]:
    try:
        from PIL import Image, ImageOps, UnidentifiedImageError
    except ImportError:
        raise InferenceError("reading PNG/JPEG images needs Pillow: pip install pillow") from None
    try:
        with Image.open(p) as img:
            gray = ImageOps.exif_transpose(img).convert("L")  # camera pictures: honour the stored orientation
    except (OSError, UnidentifiedImageError, ValueError) as exc:  # UnidentifiedImageError is an OSError
        raise InferenceError(f"cannot read image {p}: {exc}") from None
    if gray.size != (SIDE, SIDE):
        scale = SIDE / max(gray.size)
        size = (max(1, round(gray.width * scale)), max(1, round(gray.height * scale)))
        resized = gray.resize(size, Image.Resampling.LANCZOS)
        gray = Image.new("L", (SIDE, SIDE), 0)
        gray.paste(resized, ((SIDE - size[0]) // 2, (SIDE - size[1]) // 2))
    return np.asarray(gray, dtype=np.uint8)
