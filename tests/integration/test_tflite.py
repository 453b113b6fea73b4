"""The .tflite export run by the real LiteRT runtime on real Fashion-MNIST test images, and `bdn agent predict`.

The reference is the NumPy model itself (``blockdeepnet.learning.forward`` + softmax): LiteRT must give the
same probabilities to within 1e-5 and the same class, for a fresh model and for one trained a little (trained
weights are what catch a wrong layout conversion: at initialisation many permutations still look plausible).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest
from click.testing import CliRunner
from PIL import Image

from blockdeepnet.data import Dataset, load_fashion_mnist
from blockdeepnet.learning.model import flatten, forward, init_params, loss_and_grad, unflatten
from cli.agent import agent as agent_cli
from firmware_agent.inference import CLASS_NAMES, InferenceError, TfliteModel, load_image, load_images
from firmware_agent.tflite_export import (
    MODEL_FILE,
    TfliteExportError,
    export_global_model,
    export_tflite,
    write_tflite,
)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

TOLERANCE = 1e-5
N_IMAGES = 1000


@pytest.fixture(scope="module")
def fashion() -> Dataset:
    return load_fashion_mnist()


@pytest.fixture(scope="module")
def initial_params() -> npt.NDArray[np.float32]:
    return flatten(init_params(np.random.default_rng(2019)))


@pytest.fixture(scope="module")
def trained_params(fashion: Dataset, initial_params: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
    """300 SGD steps of 32 images: enough to move every weight and reach well above chance."""
    params = unflatten(initial_params)
    rng = np.random.default_rng(5)
    for _ in range(300):
        idx = rng.integers(0, fashion.train_x.shape[0], 32)
        _, grads = loss_and_grad(params, fashion.train_x[idx], fashion.train_y[idx])
        for name in params:
            params[name] -= np.float32(0.05) * grads[name]
    return flatten(params)


def numpy_probabilities(
    params_flat: npt.NDArray[np.float32], x: npt.NDArray[np.float32]
) -> npt.NDArray[np.float64]:
    logits = forward(unflatten(params_flat), x).astype(np.float64)
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    probabilities: npt.NDArray[np.float64] = e / e.sum(axis=1, keepdims=True)
    return probabilities


def uint8_images(x: npt.NDArray[np.float32]) -> npt.NDArray[np.uint8]:
    """Back to the IDX bytes (the dataset is uint8 / 255, so this is exact)."""
    return np.rint(x.reshape(-1, 28, 28) * 255).astype(np.uint8)


@pytest.mark.parametrize("which", ["initial", "trained"])
def test_litert_matches_numpy_on_1000_test_images(
    which: str,
    fashion: Dataset,
    initial_params: npt.NDArray[np.float32],
    trained_params: npt.NDArray[np.float32],
    tmp_path: Path,
) -> None:
    params = initial_params if which == "initial" else trained_params
    x, y = fashion.test_x[:N_IMAGES], fashion.test_y[:N_IMAGES]
    path = write_tflite(tmp_path / "model.tflite", params)
    model = TfliteModel(path, batch=300)  # 300 does not divide 1000: the last batch resizes the input
    p_lite = model.predict(uint8_images(x))
    p_np = numpy_probabilities(params, x)

    assert p_lite.shape == (N_IMAGES, 10) and p_lite.dtype == np.float32
    deviation = float(np.abs(p_lite - p_np).max())
    print(f"{which}: max |p_litert - p_numpy| over {N_IMAGES} images = {deviation:.3g} ({model.runtime})")
    assert deviation <= TOLERANCE
    np.testing.assert_allclose(p_lite.sum(axis=1), 1.0, atol=1e-5)
    # Same class wherever the decision is not a near-tie that a 1e-5 wobble could legitimately flip.
    top2 = np.sort(p_np, axis=1)[:, -2:]
    decisive = (top2[:, 1] - top2[:, 0]) > 2 * TOLERANCE
    assert decisive.mean() > 0.99
    assert (p_lite.argmax(axis=1) == p_np.argmax(axis=1))[decisive].all()
    if which == "trained":
        assert (p_lite.argmax(axis=1) == y).mean() > 0.6  # really trained, not near-uniform outputs
    # Float input in [0, 1] is the same as uint8 input.
    np.testing.assert_array_equal(model.predict(x.reshape(-1, 28, 28)), p_lite)


def test_export_is_deterministic_and_aligned(trained_params: npt.NDArray[np.float32]) -> None:
    data = export_tflite(trained_params)
    assert data == export_tflite(trained_params)
    assert data[4:8] == b"TFL3"
    fc1 = np.ascontiguousarray(
        unflatten(trained_params)["fc1.w"].reshape(10, 14, 14, 128).transpose(1, 2, 0, 3).reshape(1960, 128).T
    )
    offset = data.find(fc1.tobytes())
    assert offset > 0 and offset % 16 == 0  # the converted fc1 weights, stored 16-byte aligned


def test_bad_parameters_are_refused(initial_params: npt.NDArray[np.float32]) -> None:
    with pytest.raises(TfliteExportError, match="252398"):
        export_tflite(initial_params[:-1])
    broken = initial_params.copy()
    broken[5] = np.nan
    with pytest.raises(TfliteExportError, match="NaN"):
        export_tflite(broken)


@pytest.mark.parametrize("damage", ["truncated", "empty", "garbage", "header only"])
def test_a_damaged_model_file_gives_a_clear_error(
    damage: str, initial_params: npt.NDArray[np.float32], tmp_path: Path
) -> None:
    data = export_tflite(initial_params)
    damaged = {
        "truncated": data[: len(data) // 2],
        "empty": b"",
        "garbage": b"not a model at all " * 50,
        "header only": data[:64],
    }[damage]
    path = tmp_path / "bad.tflite"
    path.write_bytes(damaged)
    with pytest.raises(InferenceError, match=r"bad\.tflite is not a usable \.tflite model"):
        TfliteModel(path)
    with pytest.raises(InferenceError, match="does not exist"):
        TfliteModel(tmp_path / "missing.tflite")


def test_missing_runtime_and_schema_are_named(
    monkeypatch: pytest.MonkeyPatch, initial_params: npt.NDArray[np.float32], tmp_path: Path
) -> None:
    path = write_tflite(tmp_path / "m.tflite", initial_params)
    import ai_edge_litert

    monkeypatch.setitem(sys.modules, "ai_edge_litert.interpreter", None)
    monkeypatch.setitem(sys.modules, "tflite_runtime.interpreter", None)
    monkeypatch.setitem(sys.modules, "ai_edge_litert.schema_py_generated", None)
    monkeypatch.delattr(ai_edge_litert, "interpreter", raising=False)
    monkeypatch.delattr(ai_edge_litert, "schema_py_generated", raising=False)
    with pytest.raises(InferenceError, match="pip install ai-edge-litert"):
        TfliteModel(path)
    with pytest.raises(TfliteExportError, match="pip install ai-edge-litert"):
        export_tflite(initial_params)
    # What the agent calls after applying a global model: it logs and carries on.
    assert export_global_model(tmp_path, initial_params) is None
    assert not (tmp_path / MODEL_FILE).exists()


def test_export_global_model_writes_the_state_folder_file(
    initial_params: npt.NDArray[np.float32], tmp_path: Path
) -> None:
    assert export_global_model(tmp_path, initial_params) == tmp_path / MODEL_FILE
    assert (tmp_path / MODEL_FILE).read_bytes() == export_tflite(initial_params)
    assert sorted(p.name for p in tmp_path.iterdir()) == [MODEL_FILE]  # no temporary file left behind
    assert export_global_model(tmp_path / "no-such-folder", initial_params) is None


def test_images_are_loaded_in_fashion_mnist_form(fashion: Dataset, tmp_path: Path) -> None:
    pixels = uint8_images(fashion.test_x[:3])
    Image.fromarray(pixels[0]).save(tmp_path / "a.png")
    np.testing.assert_array_equal(load_image(tmp_path / "a.png"), pixels[0] / np.float32(255))
    np.testing.assert_allclose(load_image(tmp_path / "a.png", invert=True), 1 - pixels[0] / 255, atol=1e-6)
    # A larger, non-square picture is scaled to fit 28 pixels and centred on black.
    Image.fromarray(np.full((60, 30), 200, dtype=np.uint8)).save(tmp_path / "tall.jpg")
    tall = load_image(tmp_path / "tall.jpg")
    assert tall.shape == (28, 28) and tall[:, :5].max() == 0 and tall[10:18, 10:18].min() > 0.7
    np.save(tmp_path / "many.npy", pixels)
    assert load_images(tmp_path / "many.npy").shape == (3, 28, 28)
    np.save(tmp_path / "bad.npy", np.full((28, 28), 3.0))
    with pytest.raises(InferenceError, match=r"\[0, 1\]"):
        load_images(tmp_path / "bad.npy")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG not really")
    with pytest.raises(InferenceError, match="cannot read image"):
        load_image(tmp_path / "broken.png")
    with pytest.raises(InferenceError, match="holds 3 images"):
        load_image(tmp_path / "many.npy")


def test_bdn_agent_predict(fashion: Dataset, trained_params: npt.NDArray[np.float32], tmp_path: Path) -> None:
    # A test image the trained NumPy model classifies correctly and decisively.
    x, y = fashion.test_x[:200], fashion.test_y[:200]
    p_np = numpy_probabilities(trained_params, x)
    pick = int(np.flatnonzero((p_np.argmax(axis=1) == y) & (p_np.max(axis=1) > 0.6))[0])
    expected = CLASS_NAMES[int(y[pick])]
    Image.fromarray(uint8_images(x[pick : pick + 1])[0]).save(tmp_path / "item.png")

    state = tmp_path / "state"
    state.mkdir()
    config = tmp_path / "agent.toml"
    config.write_text('fleet_file = "fleet.json"\nkey_file = "device.key"\nstate_dir = "state"\n')
    runner = CliRunner()

    no_model = runner.invoke(agent_cli, ["predict", str(tmp_path / "item.png"), "--config", str(config)])
    assert no_model.exit_code == 2 and "no model yet" in no_model.output

    write_tflite(state / MODEL_FILE, trained_params)
    result = runner.invoke(agent_cli, ["predict", str(tmp_path / "item.png"), "--config", str(config)])
    assert result.exit_code == 0, result.output
    assert result.output.startswith(f"{tmp_path / 'item.png'}: {expected}  (")

    as_json = runner.invoke(
        agent_cli,
        ["predict", str(tmp_path / "item.png"), "--model", str(state / MODEL_FILE), "--json", "--top", "2"],
    )
    assert as_json.exit_code == 0, as_json.output
    doc = json.loads(as_json.output)
    (only,) = doc["predictions"]
    assert only["label"] == expected and only["class"] == int(y[pick]) and len(only["top"]) == 2
    assert abs(only["top"][0]["probability"] - p_np[pick].max()) <= TOLERANCE

    (tmp_path / "junk.png").write_bytes(b"junk")
    unreadable = runner.invoke(agent_cli, ["predict", str(tmp_path / "junk.png"), "--config", str(config)])
    assert unreadable.exit_code == 2 and "cannot read image" in unreadable.output
    (tmp_path / "bad.tflite").write_bytes(b"junk" * 100)
    bad_model = runner.invoke(
        agent_cli, ["predict", str(tmp_path / "item.png"), "--model", str(tmp_path / "bad.tflite")]
    )
    assert bad_model.exit_code == 2 and "not a usable .tflite model" in bad_model.output
    neither = runner.invoke(agent_cli, ["predict", str(tmp_path / "item.png")])
    assert neither.exit_code == 2 and "exactly one of --config" in neither.output
    for out in (no_model, unreadable, bad_model, neither):
        assert "Traceback" not in out.output
