"""Export the global model as a ``.tflite`` flatbuffer for on-device inference with LiteRT.

No TensorFlow: the file is assembled with ``flatbuffers.Builder`` and the builder functions of the TFLite
schema module that LiteRT ships (``ai_edge_litert.schema_py_generated``). The graph is the NumPy forward pass
of :mod:`blockdeepnet.learning.model`, operator for operator, in float32, followed by a softmax, so the file
maps an image to class probabilities:

    image [N,28,28,1] -> CONV_2D 3x3 SAME stride 1, fused ReLU -> [N,28,28,10]
                      -> MAX_POOL_2D 2x2 stride 2              -> [N,14,14,10]
                      -> RESHAPE [-1, 1960]                    -> [N,1960]
                      -> FULLY_CONNECTED 1960->128, fused ReLU -> [N,128]
                      -> FULLY_CONNECTED 128->10               -> [N,10] logits
                      -> SOFTMAX (beta 1)                      -> [N,10] probabilities

The batch dimension is dynamic (``shape_signature`` -1); the interpreter is resized to the batch at hand.
The NumPy model applies ReLU *after* the max-pool; fusing it into the convolution instead is the same function
(ReLU is monotone, so relu(max(z)) == max(relu(z))), exactly, not approximately.

Layout conversions (the maths that must be right for the numbers to agree):

- Images: NumPy uses NCHW ``(N, 1, 28, 28)``, TFLite NHWC ``(N, 28, 28, 1)``. With one channel this is only a
  reshape; the caller scales pixels to [0, 1] exactly as the training data are (``uint8 / 255``).
- Convolution kernel: NumPy ``conv.w`` is OIHW ``(10, 1, 3, 3)``; TFLite's CONV_2D wants OHWI ``(10, 3, 3, 1)``,
  i.e. ``w.transpose(0, 2, 3, 1)``. Both compute a cross-correlation (no kernel flip), and SAME padding for a
  3x3 kernel at stride 1 is one zero row/column on each side, the NumPy model's ``padding=1``.
- First dense layer: NumPy flattens the pooled map ``(N, 10, 14, 14)`` in (c, h, w) order, so row
  ``c*196 + h*14 + w`` of ``fc1.w`` (shape (1960, 128), (in, out)) multiplies channel c at (h, w). The TFLite
  map is ``(N, 14, 14, 10)`` and RESHAPE flattens it in (h, w, c) order, element ``h*140 + w*10 + c``. So the
  rows are permuted: ``fc1.w.reshape(10, 14, 14, 128).transpose(1, 2, 0, 3).reshape(1960, 128)``, and then
  transposed, because FULLY_CONNECTED stores weights as (out, in): final shape (128, 1960).
- Second dense layer: ``fc2.w`` (128, 10) (in, out) becomes ``fc2.w.T`` (10, 128). Biases are unchanged.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
from pathlib import Path
from types import ModuleType
from typing import Any, Final

import numpy as np
import numpy.typing as npt

from blockdeepnet.learning.model import (
    CONV_OUT,
    FC1_IN,
    HIDDEN,
    IMAGE_SHAPE,
    KERNEL,
    NUM_CLASSES,
    POOLED_SIDE,
    unflatten,
)

__all__ = [
    "MODEL_FILE",
    "TfliteExportError",
    "export_global_model",
    "export_tflite",
    "tflite_weights",
    "write_tflite",
]

MODEL_FILE: Final = "model.tflite"
"""The file name the agent writes in its state folder after every applied global model."""

INPUT_NAME: Final = "image"
OUTPUT_NAME: Final = "probabilities"
SIGNATURE_KEY: Final = "serving_default"
_SIDE: Final = IMAGE_SHAPE[1]
_BUFFER_ALIGNMENT: Final = (
    16  # what the TFLite converter uses, so constant data can be mmapped and read in place
)
_SCHEMA_VERSION: Final = 3
_FILE_IDENTIFIER: Final = b"TFL3"

logger = logging.getLogger(__name__)


class TfliteExportError(RuntimeError):
    """The model cannot be exported (the schema module is missing, or the parameters are unusable)."""


def _schema() -> ModuleType:
    """The TFLite flatbuffer schema bindings, imported lazily so the agent runs without them."""
    try:
        import flatbuffers  # noqa: F401  (the schema module needs it; a clearer message if it is missing)
        from ai_edge_litert import schema_py_generated
    except ImportError as exc:
        raise TfliteExportError(
            f"exporting a .tflite model needs the TFLite schema module shipped by LiteRT ({exc}); "
            "install it with: pip install ai-edge-litert flatbuffers"
        ) from None
    schema: ModuleType = schema_py_generated
    return schema


def tflite_weights(params_flat: npt.ArrayLike) -> dict[str, npt.NDArray[np.float32]]:
    """The model's parameters in the TFLite layouts described in the module docstring (C-contiguous)."""
    try:
        p = unflatten(params_flat)
    except ValueError as exc:
        raise TfliteExportError(f"cannot export these parameters: {exc}") from None
    if not all(np.isfinite(v).all() for v in p.values()):
        raise TfliteExportError("cannot export these parameters: they contain NaN or infinity")
    fc1 = p["fc1.w"].reshape(CONV_OUT, POOLED_SIDE, POOLED_SIDE, HIDDEN).transpose(1, 2, 0, 3)
    converted = {
        "conv.w": p["conv.w"].transpose(0, 2, 3, 1),  # OIHW -> OHWI
        "conv.b": p["conv.b"],
        "fc1.w": fc1.reshape(FC1_IN, HIDDEN).T,  # rows (c,h,w) -> (h,w,c), then (in, out) -> (out, in)
        "fc1.b": p["fc1.b"],
        "fc2.w": p["fc2.w"].T,  # (in, out) -> (out, in)
        "fc2.b": p["fc2.b"],
    }
    return {name: np.ascontiguousarray(value, dtype="<f4") for name, value in converted.items()}


class _GraphBuilder:
    """Accumulates buffers, tensors and operators, then writes them as one flatbuffer.

    Flatbuffers are built back to front: every child object (vector, string, table) must be finished before
    the table that refers to it is started, which is why tensors and operators are recorded first and only
    serialised in :meth:`finish`.
    """

    def __init__(self, schema: ModuleType) -> None:
        import flatbuffers

        self.s = schema
        self.b = flatbuffers.Builder(1 << 21)
        self.buffers: list[bytes] = [b""]  # buffer 0: the empty sentinel every non-constant tensor points at
        self.tensors: list[tuple[str, tuple[int, ...], int, int]] = []  # name, shape, type, buffer
        self.opcodes: list[int] = []
        self.operators: list[tuple[int, list[int], list[int], int, int]] = []  # opcode, in, out, options

    def tensor(
        self,
        name: str,
        shape: tuple[int, ...],
        data: npt.NDArray[Any] | None = None,
        *,
        dtype: int | None = None,
    ) -> int:
        """Add a tensor (a constant one when ``data`` is given); returns its index."""
        ttype = self.s.TensorType.FLOAT32 if dtype is None else dtype
        buffer = 0
        if data is not None:
            if tuple(data.shape) != shape:
                raise TfliteExportError(f"tensor {name}: data of shape {data.shape}, declared {shape}")
            self.buffers.append(np.ascontiguousarray(data).tobytes())
            buffer = len(self.buffers) - 1
        self.tensors.append((name, shape, ttype, buffer))
        return len(self.tensors) - 1

    def operator(self, code: int, inputs: list[int], outputs: list[int], options: tuple[int, int]) -> None:
        """Add an operator; ``options`` is (BuiltinOptions type, offset of the finished options table)."""
        if code not in self.opcodes:
            self.opcodes.append(code)
        self.operators.append((self.opcodes.index(code), inputs, outputs, *options))

    # --- serialisation helpers ---

    def _ints(self, start: Any, values: list[int]) -> int:
        start(self.b, len(values))
        for v in reversed(values):
            self.b.PrependInt32(v)
        return int(self.b.EndVector())

    def _offsets(self, start: Any, offsets: list[int]) -> int:
        start(self.b, len(offsets))
        for off in reversed(offsets):
            self.b.PrependUOffsetTRelative(off)
        return int(self.b.EndVector())

    def _data(self, payload: bytes) -> int:
        """A ubyte vector whose first byte is ``_BUFFER_ALIGNMENT``-aligned in the finished file.

        The schema's ``BufferStartDataVector`` aligns to 1 byte; the converter aligns constant data to 16 so
        the runtime can use float weights in place. The bytes are copied in one slice (what
        ``Builder.CreateByteVector`` does) rather than prepended one at a time: the model holds ~1 MB.
        """
        n = len(payload)
        self.b.StartVector(1, n, _BUFFER_ALIGNMENT)
        self.b.head -= n
        self.b.Bytes[self.b.head : self.b.head + n] = payload
        return int(self.b.EndVector())

    def finish(self, description: str, sig_inputs: dict[str, int], sig_outputs: dict[str, int]) -> bytes:
        s, b = self.s, self.b

        buffer_offsets = []
        for payload in self.buffers:
            data = self._data(payload) if payload else None
            s.BufferStart(b)
            if data is not None:
                s.BufferAddData(b, data)
            buffer_offsets.append(s.BufferEnd(b))

        tensor_offsets = []
        for name, shape, ttype, buffer in self.tensors:
            name_off = b.CreateString(name)
            shape_off = self._ints(
                s.TensorStartShapeVector, [1, *shape[1:]] if shape[0] == -1 else list(shape)
            )
            signature_off = (
                self._ints(s.TensorStartShapeSignatureVector, list(shape)) if shape[0] == -1 else None
            )
            s.TensorStart(b)
            s.TensorAddShape(b, shape_off)
            if signature_off is not None:
                s.TensorAddShapeSignature(b, signature_off)
            s.TensorAddType(b, ttype)
            s.TensorAddBuffer(b, buffer)
            s.TensorAddName(b, name_off)
            tensor_offsets.append(s.TensorEnd(b))

        operator_offsets = []
        for opcode_index, inputs, outputs, options_type, options in self.operators:
            in_off = self._ints(s.OperatorStartInputsVector, inputs)
            out_off = self._ints(s.OperatorStartOutputsVector, outputs)
            s.OperatorStart(b)
            s.OperatorAddOpcodeIndex(b, opcode_index)
            s.OperatorAddInputs(b, in_off)
            s.OperatorAddOutputs(b, out_off)
            s.OperatorAddBuiltinOptionsType(b, options_type)
            s.OperatorAddBuiltinOptions(b, options)
            operator_offsets.append(s.OperatorEnd(b))

        graph_inputs = list(sig_inputs.values())
        graph_outputs = list(sig_outputs.values())
        tensors_vec = self._offsets(s.SubGraphStartTensorsVector, tensor_offsets)
        inputs_vec = self._ints(s.SubGraphStartInputsVector, graph_inputs)
        outputs_vec = self._ints(s.SubGraphStartOutputsVector, graph_outputs)
        operators_vec = self._offsets(s.SubGraphStartOperatorsVector, operator_offsets)
        graph_name = b.CreateString("main")
        s.SubGraphStart(b)
        s.SubGraphAddTensors(b, tensors_vec)
        s.SubGraphAddInputs(b, inputs_vec)
        s.SubGraphAddOutputs(b, outputs_vec)
        s.SubGraphAddOperators(b, operators_vec)
        s.SubGraphAddName(b, graph_name)
        subgraph = s.SubGraphEnd(b)

        code_offsets = []
        for code in self.opcodes:
            s.OperatorCodeStart(b)
            # Readers take max(builtin_code, deprecated_builtin_code); codes below 127 go in both fields.
            s.OperatorCodeAddDeprecatedBuiltinCode(b, min(code, 127))
            s.OperatorCodeAddBuiltinCode(b, code)
            s.OperatorCodeAddVersion(b, 1)
            code_offsets.append(s.OperatorCodeEnd(b))

        signature = self._signature(sig_inputs, sig_outputs)

        opcodes_vec = self._offsets(s.ModelStartOperatorCodesVector, code_offsets)
        subgraphs_vec = self._offsets(s.ModelStartSubgraphsVector, [subgraph])
        buffers_vec = self._offsets(s.ModelStartBuffersVector, buffer_offsets)
        signatures_vec = self._offsets(s.ModelStartSignatureDefsVector, [signature])
        description_off = b.CreateString(description)
        s.ModelStart(b)
        s.ModelAddVersion(b, _SCHEMA_VERSION)
        s.ModelAddOperatorCodes(b, opcodes_vec)
        s.ModelAddSubgraphs(b, subgraphs_vec)
        s.ModelAddDescription(b, description_off)
        s.ModelAddBuffers(b, buffers_vec)
        s.ModelAddSignatureDefs(b, signatures_vec)
        b.Finish(s.ModelEnd(b), file_identifier=_FILE_IDENTIFIER)
        return bytes(b.Output())

    def _signature(self, inputs: dict[str, int], outputs: dict[str, int]) -> int:
        """A ``serving_default`` signature, so ``get_signature_runner()`` works with named tensors."""
        s, b = self.s, self.b

        def maps(start: Any, named: dict[str, int]) -> int:
            offsets = []
            for name, index in named.items():
                name_off = b.CreateString(name)
                s.TensorMapStart(b)
                s.TensorMapAddName(b, name_off)
                s.TensorMapAddTensorIndex(b, index)
                offsets.append(s.TensorMapEnd(b))
            return self._offsets(start, offsets)

        in_vec = maps(s.SignatureDefStartInputsVector, inputs)
        out_vec = maps(s.SignatureDefStartOutputsVector, outputs)
        key = b.CreateString(SIGNATURE_KEY)
        s.SignatureDefStart(b)
        s.SignatureDefAddInputs(b, in_vec)
        s.SignatureDefAddOutputs(b, out_vec)
        s.SignatureDefAddSignatureKey(b, key)
        s.SignatureDefAddSubgraphIndex(b, 0)
        return int(s.SignatureDefEnd(b))


def export_tflite(params_flat: npt.ArrayLike) -> bytes:
    """The complete ``.tflite`` file for the flat parameter vector (``PAPER_CNN_PARAMS`` float32 values).

    Input tensor ``image`` float32 ``[N, 28, 28, 1]`` with pixels in [0, 1]; output ``probabilities`` float32
    ``[N, 10]``. Raises :class:`TfliteExportError` when the schema module is missing or the vector is unusable.
    """
    w = tflite_weights(params_flat)
    s = _schema()
    g = _GraphBuilder(s)
    op, opts = s.BuiltinOperator, s.BuiltinOptions
    relu, none = s.ActivationFunctionType.RELU, s.ActivationFunctionType.NONE
    batch = -1

    image = g.tensor(INPUT_NAME, (batch, _SIDE, _SIDE, 1))
    conv_w = g.tensor("conv/weights", (CONV_OUT, KERNEL, KERNEL, 1), w["conv.w"])
    conv_b = g.tensor("conv/bias", (CONV_OUT,), w["conv.b"])
    conv = g.tensor("conv/relu", (batch, _SIDE, _SIDE, CONV_OUT))
    pooled = g.tensor("pool", (batch, POOLED_SIDE, POOLED_SIDE, CONV_OUT))
    new_shape = g.tensor("flatten/shape", (2,), np.array([-1, FC1_IN], dtype="<i4"), dtype=s.TensorType.INT32)
    flat = g.tensor("flatten", (batch, FC1_IN))
    fc1_w = g.tensor("fc1/weights", (HIDDEN, FC1_IN), w["fc1.w"])
    fc1_b = g.tensor("fc1/bias", (HIDDEN,), w["fc1.b"])
    hidden = g.tensor("fc1/relu", (batch, HIDDEN))
    fc2_w = g.tensor("fc2/weights", (NUM_CLASSES, HIDDEN), w["fc2.w"])
    fc2_b = g.tensor("fc2/bias", (NUM_CLASSES,), w["fc2.b"])
    logits = g.tensor("logits", (batch, NUM_CLASSES))
    probs = g.tensor(OUTPUT_NAME, (batch, NUM_CLASSES))

    b = g.b
    s.Conv2DOptionsStart(b)
    s.Conv2DOptionsAddPadding(b, s.Padding.SAME)
    s.Conv2DOptionsAddStrideW(b, 1)
    s.Conv2DOptionsAddStrideH(b, 1)
    s.Conv2DOptionsAddDilationWFactor(b, 1)
    s.Conv2DOptionsAddDilationHFactor(b, 1)
    s.Conv2DOptionsAddFusedActivationFunction(b, relu)
    g.operator(op.CONV_2D, [image, conv_w, conv_b], [conv], (opts.Conv2DOptions, s.Conv2DOptionsEnd(b)))

    s.Pool2DOptionsStart(b)
    s.Pool2DOptionsAddPadding(b, s.Padding.VALID)
    s.Pool2DOptionsAddStrideW(b, 2)
    s.Pool2DOptionsAddStrideH(b, 2)
    s.Pool2DOptionsAddFilterWidth(b, 2)
    s.Pool2DOptionsAddFilterHeight(b, 2)
    s.Pool2DOptionsAddFusedActivationFunction(b, none)
    g.operator(op.MAX_POOL_2D, [conv], [pooled], (opts.Pool2DOptions, s.Pool2DOptionsEnd(b)))

    s.ReshapeOptionsStart(b)
    g.operator(op.RESHAPE, [pooled, new_shape], [flat], (opts.ReshapeOptions, s.ReshapeOptionsEnd(b)))

    for inputs, output, activation in (
        ([flat, fc1_w, fc1_b], hidden, relu),
        ([hidden, fc2_w, fc2_b], logits, none),
    ):
        s.FullyConnectedOptionsStart(b)
        s.FullyConnectedOptionsAddFusedActivationFunction(b, activation)
        s.FullyConnectedOptionsAddWeightsFormat(b, s.FullyConnectedOptionsWeightsFormat.DEFAULT)
        s.FullyConnectedOptionsAddKeepNumDims(b, False)
        fc_options = s.FullyConnectedOptionsEnd(b)
        g.operator(op.FULLY_CONNECTED, inputs, [output], (opts.FullyConnectedOptions, fc_options))

    s.SoftmaxOptionsStart(b)
    s.SoftmaxOptionsAddBeta(b, 1.0)
    g.operator(op.SOFTMAX, [logits], [probs], (opts.SoftmaxOptions, s.SoftmaxOptionsEnd(b)))

    return g.finish(
        "BlockDeepNet paper CNN (Fashion-MNIST): image [N,28,28,1] in [0,1] -> probabilities [N,10]",
        {INPUT_NAME: image},
        {OUTPUT_NAME: probs},
    )


def write_tflite(path: str | os.PathLike[str], params_flat: npt.ArrayLike) -> Path:
    """Export and write atomically: a temporary file in the same folder, fsynced, renamed over ``path``.

    A reader (``bdn agent predict``) therefore sees the previous model or the new one, never half a file.
    """
    target = Path(path)
    data = export_tflite(params_flat)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(
            tmp, 0o644
        )  # mkstemp makes it 0600; the model is not a secret and predict may run as another user
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    with contextlib.suppress(OSError):  # make the rename durable; not possible on every file system
        dir_fd = os.open(target.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    return target


def export_global_model(
    state_dir: str | os.PathLike[str],
    params_flat: npt.ArrayLike,
    log: logging.Logger | logging.LoggerAdapter[Any] | None = None,
) -> Path | None:
    """Write ``<state_dir>/model.tflite`` for the model just applied; the agent calls this after each round.

    Never raises: the .tflite file is a by-product for inference, and failing to write it (schema module not
    installed, disk full) must not stop a device from taking part in rounds. Returns the path, or None after
    logging why it could not be written.
    """
    out = log if log is not None else logger
    target = Path(state_dir) / MODEL_FILE
    try:
        write_tflite(target, params_flat)
    except Exception as exc:
        out.warning("could not write %s for inference: %s", target, exc)
        return None
    out.debug("wrote %s", target)
    return target
