"""`bdn agent predict`: classify images with the device's current global model (``model.tflite``, LiteRT)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from cli.errors import fail


def _model_path(config_path: Path | None, model_path: Path | None) -> Path:
    """The .tflite file to use: ``--model`` as given, or ``model.tflite`` in the agent's state folder."""
    if (config_path is None) == (model_path is None):
        fail("give exactly one of --config agent.toml (the agent's current model) or --model FILE.tflite")
    if model_path is not None:
        if not model_path.is_file():
            fail(f"model file {model_path} does not exist")
        return model_path
    from blockdeepnet.config import ConfigError, load_agent_config
    from firmware_agent.tflite_export import MODEL_FILE

    assert config_path is not None
    try:
        cfg = load_agent_config(config_path)
    except ConfigError as exc:
        fail(str(exc))
    path = cfg.state_dir / MODEL_FILE
    if not path.is_file():
        fail(
            f"no model yet: {path} does not exist; the agent writes it each time it applies a global model "
            "(wait for the first round to complete, or pass --model FILE.tflite)"
        )
    return path


@click.command("predict")
@click.argument("images", nargs=-1, required=True, type=click.Path(dir_okay=False, path_type=Path))
@click.option(
    "--config",
    "config_path",
    type=click.Path(dir_okay=False, path_type=Path),
    help="The device's agent.toml: use the global model the agent last applied.",
)
@click.option(
    "--model",
    "model_path",
    type=click.Path(dir_okay=False, path_type=Path),
    help="A .tflite file to use instead.",
)
@click.option(
    "--top", default=3, show_default=True, type=click.IntRange(1, 10), help="Classes listed per image."
)
@click.option(
    "--invert",
    is_flag=True,
    help="The pictures show a dark object on a light background (Fashion-MNIST is light on dark).",
)
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON.")
def predict(
    images: tuple[Path, ...],
    config_path: Path | None,
    model_path: Path | None,
    top: int,
    invert: bool,
    as_json: bool,
) -> None:
    """Classify IMAGE... (PNG/JPEG, or .npy arrays of 28x28 pixels) as Fashion-MNIST classes.

    Pictures are turned into 28x28 grayscale; they are expected light-on-dark like Fashion-MNIST (see
    --invert). Prints the predicted class and the most probable classes of every image.
    """
    import numpy as np

    from firmware_agent.inference import CLASS_NAMES, InferenceError, TfliteModel, load_images

    path = _model_path(config_path, model_path)
    names: list[str] = []
    batches = []
    try:
        for image in images:
            loaded = load_images(image, invert=invert)
            batches.append(loaded)
            names.extend(
                [str(image)] if loaded.shape[0] == 1 else [f"{image}[{i}]" for i in range(loaded.shape[0])]
            )
        model = TfliteModel(path)
        probs = model.predict(np.concatenate(batches))
    except InferenceError as exc:
        fail(str(exc))

    results: list[dict[str, Any]] = []
    for name, p in zip(names, probs, strict=True):
        order = np.argsort(-p, kind="stable")[:top]
        results.append(
            {
                "image": name,
                "class": int(order[0]),
                "label": CLASS_NAMES[int(order[0])],
                "top": [
                    {"class": int(k), "label": CLASS_NAMES[int(k)], "probability": round(float(p[k]), 6)}
                    for k in order
                ],
            }
        )
    if as_json:
        click.echo(json.dumps({"model": str(path), "predictions": results}, indent=2))
        return
    for r in results:
        ranked = ", ".join(f"{t['label']} {t['probability']:.1%}" for t in r["top"])
        click.echo(f"{r['image']}: {r['label']}  ({ranked})")
