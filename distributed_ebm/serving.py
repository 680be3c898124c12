"""The MLflow pyfunc model: a trained checkpoint answering sample, inpaint and interpolate requests.

Input: a DataFrame (MLflow serving: `{"dataframe_records": [...]}`), one row per request, or one
dict. The `task` column picks what a row asks for (default `sample`):

- `sample`: `n` images (≤ MAX_IMAGES), optional `steps`, `seed`, `label`;
- `inpaint`: `images` (a list of base64 PNGs or nested lists in [-1, 1], shaped like the model's
  samples), `masks` (one per image, 1 or white on the missing pixels, or a kind: `square`,
  `spots`, `combined`), optional `method` (`langevin`, `generator`), `steps`, `seed`, `average` (restorations
  averaged per image, ≤ MAX_AVERAGE, images × average ≤ MAX_IMAGES: the posterior mean), `label`;
- `interpolate` (GGCN models): `rows` × (`midpoints` + 2) images g(ζ_t), optional `seed`,
  `steps`, `label`.

Every task takes `return`: `png` (default for image models), `array` (float values in [-1, 1];
the default for vector models) or `both`.

Output: a DataFrame with one row per image: `request` (the input row), `task`, `index`, `image`
(base64 PNG or None), `array` (nested lists or None), `shape`, `label`, `position` ([row,
column] of an interpolation grid, else None).

A request that cannot be answered raises `InvalidRequest`, an MlflowException with error code
INVALID_PARAMETER_VALUE, which MLflow's scoring server answers with HTTP 400 and the message.
Every row is checked before any image is drawn.
"""

from __future__ import annotations

import base64
import binascii
import io
import math
import numbers
from collections.abc import Callable
from dataclasses import dataclass

import mlflow.pyfunc
import numpy as np
import pandas as pd
import torch
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
from mlflow.types.schema import AnyType, ColSpec, Schema

from .config import ConfigError, did_you_mean
from .inpainting import MASK_KINDS, METHODS, make_masks

MAX_IMAGES = 256  # images one request may ask for, all rows together
MAX_STEPS = 2000  # Langevin steps one request may ask for
MAX_AVERAGE = 16  # inpainting restorations one request may average per image
RETURNS = ("png", "array", "both")
COLUMNS = ("request", "task", "index", "image", "array", "shape", "label", "position")
# The request the registered model is logged with (MLflow shows it, `mlflow models predict` can
# send it), and its signature: the output columns are fixed; the input has no schema, on purpose:
# MLflow would drop every column it does not list and coerce the ones it does, where `predict`
# checks every key and names the fix for a wrong one (a misspelled `nn` gets "Did you mean 'n'?").
INPUT_EXAMPLE = pd.DataFrame([{"task": "sample", "n": 1, "steps": 1, "seed": 0}])
SIGNATURE = ModelSignature(inputs=None, outputs=Schema([ColSpec(AnyType(), name) for name in COLUMNS]))


class InvalidRequest(MlflowException):
    """A request the model cannot answer; the message names the problem and the fix (HTTP 400)."""

    def __init__(self, message: str):
        super().__init__(message, error_code=INVALID_PARAMETER_VALUE)


def png_base64(image: np.ndarray) -> str:
    """An image (C, H, W) in [-1, 1] as a base64-encoded PNG."""
    from PIL import Image

    pixels = ((np.clip(image, -1, 1) + 1) * 127.5).round().astype(np.uint8)
    pixels = pixels[0] if pixels.shape[0] == 1 else pixels.transpose(1, 2, 0)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def decode_png(text: str, what: str) -> np.ndarray:
    """A base64 PNG (optionally a `data:image/png;base64,` URI) as uint8 pixels (C, H, W)."""
    from PIL import Image, UnidentifiedImageError

    try:
        raw = base64.b64decode(
            text.split(",", 1)[1] if text.startswith("data:") else text, validate=True
        )
        image = Image.open(io.BytesIO(raw))
        image.load()
    except (binascii.Error, ValueError, UnidentifiedImageError, OSError):
        raise InvalidRequest(
            f"{what} is a string but not a base64-encoded PNG: send a base64 PNG "
            "or a nested list of numbers."
        ) from None
    if image.mode not in ("L", "RGB"):
        raise InvalidRequest(
            f"{what} is a PNG in mode {image.mode}: send grayscale (mode L) or RGB "
            "PNGs (e.g. PIL's Image.convert('L'))."
        )
    pixels = np.asarray(image)
    return pixels[None] if pixels.ndim == 2 else pixels.transpose(2, 0, 1)


def _show(value, limit: int = 60) -> str:
    """repr(value), shortened for an error message (a request may carry whole images)."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 5] + " …" + text[-2:]


def _missing(value) -> bool:
    """A cell left empty: absent, None, or the NaN pandas puts in rows that lack a column."""
    if value is None:
        return True
    return isinstance(value, (float, np.floating)) and math.isnan(value)


def _integer(
    request: dict, key: str, *, default: int | None, low: int, high: int, fix: str = ""
) -> int | None:
    """The integer field `key` of a request, between low and high inclusive."""
    value = request.get(key)
    if _missing(value):
        return default
    numeric = isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_))
    if not numeric or not float(value).is_integer():
        example = f'"{key}": {max(low, 1)}'
        raise InvalidRequest(
            f"'{key}' must be an integer, got {_show(value)}: send a JSON number, e.g. {example}."
        )
    value = int(value)
    if not low <= value <= high:
        raise InvalidRequest(
            f"'{key}' must be between {low} and {high}, got {value}.{' ' + fix if fix else ''}"
        )
    return value


def _choice(request: dict, key: str, choices: tuple[str, ...], default: str) -> str:
    """The string field `key` of a request, one of `choices`."""
    value = request.get(key)
    if _missing(value):
        return default
    if value not in choices:
        raise InvalidRequest(f"'{key}' must be one of {', '.join(choices)}; got {_show(value)}.")
    return value


def is_image_model(model) -> bool:
    """Whether the model's samples are images (C, H, W) with 1 or 3 channels, so PNGs make sense."""
    shape = model.sample_shape
    return len(shape) == 3 and shape[0] in (1, 3)


def _return(request: dict, model) -> str:
    """What to send back: PNGs, float arrays or both (vector models cannot make PNGs)."""
    image_model = is_image_model(model)
    choice = _choice(request, "return", RETURNS, "png" if image_model else "array")
    if choice != "array" and not image_model:
        raise InvalidRequest(
            f"This model draws vectors of shape {model.sample_shape}, not images: "
            'ask for "return": "array".'
        )
    return choice


def _label(request: dict, model) -> int | None:
    """The request's one `label` (conditional models only), checked against the model's classes."""
    value = request.get("label")
    if _missing(value):
        return None
    if not model.num_classes:
        raise InvalidRequest("This model is not class-conditional: drop 'label'.")
    fix = f"This model knows classes 0 … {model.num_classes - 1}."
    return _integer(request, "label", default=None, low=0, high=model.num_classes - 1, fix=fix)


def _image_labels(request: dict, model, num: int) -> torch.Tensor | None:
    """Labels of `num` images to inpaint: `label` is one int for all or a list with one per image;
    required by conditional models (their Φ needs the class), refused by the others."""
    value = request.get("label")
    if not isinstance(value, (list, tuple, np.ndarray)):
        label = _label(request, model)
        if label is None and model.num_classes:
            raise InvalidRequest(
                f"This model is class-conditional: give 'label' (0 … {model.num_classes - 1}), "
                "one for all images or a list with one per image."
            )
        return None if label is None else model.labels_for(num, label)
    if len(value) != num:
        raise InvalidRequest(
            f"'label' has {len(value)} entries for {num} images: send one label, or one per image."
        )
    labels = [_label({"label": v}, model) for v in value]
    if None in labels:
        raise InvalidRequest("'label' has an empty entry: give every image its class.")
    return torch.tensor(labels, device=model.device)


def _pixels(value, what: str, model) -> np.ndarray:
    """One image of an inpainting request as float32 (C, H, W) in the model's data range."""
    shape = model.sample_shape
    if isinstance(value, str):
        pixels = decode_png(value, what).astype(np.float32) / 127.5 - 1
    else:
        try:
            pixels = np.asarray(value, dtype=np.float32)
        except (TypeError, ValueError):
            raise InvalidRequest(
                f"{what} is not numeric: send a base64 PNG or a nested list of numbers in [-1, 1]."
            ) from None
        if pixels.ndim == 2 and shape[0] == 1:
            pixels = pixels[None]
    if pixels.shape != shape:
        size = "×".join(str(s) for s in shape[1:])
        raise InvalidRequest(
            f"{what} has shape {tuple(pixels.shape)}; this model takes images of shape {shape}: "
            f"resize to {size} with {shape[0]} channel(s)."
        )
    low, high = model.state.data_range
    if not np.isfinite(pixels).all() or pixels.min() < low or pixels.max() > high:
        raise InvalidRequest(
            f"{what} has values outside [{low:g}, {high:g}]: scale pixels to [{low:g}, {high:g}] "
            "(or send PNGs, which are scaled for you)."
        )
    return pixels


def _mask(value, what: str, size: tuple[int, int]) -> np.ndarray:
    """One mask (1, H, W), 1 on the missing pixels: a PNG (non-zero = missing) or 0/1 numbers."""
    if isinstance(value, str):
        mask = (decode_png(value, what).max(axis=0, keepdims=True) > 0).astype(np.float32)
    else:
        try:
            mask = np.asarray(value, dtype=np.float32)
        except (TypeError, ValueError):
            raise InvalidRequest(
                f"{what} is not numeric: send 0/1 numbers (1 = missing) or a PNG."
            ) from None
        mask = mask[None] if mask.ndim == 2 else mask
        if not np.isin(mask, (0, 1)).all():
            raise InvalidRequest(
                f"{what} holds values other than 0 and 1: "
                "mark missing pixels with 1, observed ones with 0."
            )
    if mask.ndim != 3 or mask.shape[0] != 1 or mask.shape[1:] != size:
        raise InvalidRequest(
            f"{what} has shape {tuple(mask.shape)}; the images are {size[0]}×{size[1]}: "
            f"send masks of shape {size} (1 = missing)."
        )
    return mask


def _list(request: dict, key: str, fix: str) -> list:
    """A required list field (JSON array) of a request."""
    value = request.get(key)
    if isinstance(value, np.ndarray):
        value = list(value)
    if not isinstance(value, (list, tuple)) or not value:
        raise InvalidRequest(f"'{key}' must be a non-empty list; got {_show(value)}. {fix}")
    return list(value)


@dataclass
class Job:
    """One validated request row: how many images it makes and how to make them."""

    task: str
    count: int  # images this row returns
    run: Callable[[], torch.Tensor]  # the images, (count, *sample_shape)
    labels: torch.Tensor | None  # the class of each image (conditional models)
    returns: str  # png, array or both
    positions: list | None = None  # [row, column] of each image in an interpolation grid


def sample_job(request: dict, model) -> Job:
    """`n` fresh samples, drawn the algorithm's own way."""
    fix = f"Ask for at most {MAX_IMAGES} images per request; send several requests for more."
    n = _integer(request, "n", default=1, low=1, high=MAX_IMAGES, fix=fix)
    steps = _integer(request, "steps", default=None, low=0, high=MAX_STEPS)
    seed = _integer(request, "seed", default=0, low=0, high=2**63 - 1)
    label = _label(request, model)
    returns = _return(request, model)
    return Job(
        "sample",
        n,
        lambda: model.sample(n, steps=steps, seed=seed, label=label),
        model.labels_for(n, label),
        returns,
    )


def inpaint_job(request: dict, model) -> Job:
    """Restore the missing pixels of the request's images (observed pixels never change)."""
    if not is_image_model(model):
        raise InvalidRequest(
            "Inpainting needs an image model; this one draws vectors of shape "
            f"{model.sample_shape}."
        )
    images = _list(
        request, "images", "Send base64 PNGs or nested lists shaped like the model's samples."
    )
    if len(images) > MAX_IMAGES:
        raise InvalidRequest(
            f"'images' holds {len(images)} images: send at most {MAX_IMAGES} per request."
        )
    pixels = torch.from_numpy(
        np.stack([_pixels(image, f"image {i}", model) for i, image in enumerate(images)])
    )
    size = tuple(pixels.shape[-2:])
    method = _choice(request, "method", METHODS, "langevin")
    if method == "generator" and model.state.generator is None:
        raise InvalidRequest(
            f"method 'generator' needs a GGCN model, not '{model.config.model.algorithm}': "
            "use method 'langevin'."
        )
    steps = _integer(request, "steps", default=None, low=0, high=MAX_STEPS)
    seed = _integer(request, "seed", default=0, low=0, high=2**63 - 1)
    average = _integer(request, "average", default=1, low=1, high=MAX_AVERAGE)
    if len(pixels) * average > MAX_IMAGES:
        raise InvalidRequest(
            f"{len(pixels)} images × average {average} is {len(pixels) * average} restorations: "
            f"at most {MAX_IMAGES} per request. Send fewer images or a smaller 'average'."
        )
    masks = request.get("masks")
    if isinstance(masks, str) and masks in MASK_KINDS:
        if size[0] != size[1]:
            raise InvalidRequest(
                f"Mask kind '{masks}' needs square images; send one mask per image instead."
            )
        missing = make_masks(
            masks, len(pixels), size[0], generator=torch.Generator().manual_seed(seed)
        )
    else:
        fix = f"Send one mask per image (1 = missing), or a kind: {', '.join(MASK_KINDS)}."
        masks = _list(request, "masks", fix)
        if len(masks) != len(pixels):
            raise InvalidRequest(
                f"'masks' holds {len(masks)} masks for {len(pixels)} images. {fix}"
            )
        missing = torch.from_numpy(
            np.stack([_mask(m, f"mask {i}", size) for i, m in enumerate(masks)])
        )
    labels = _image_labels(request, model, len(pixels))
    returns = _return(request, model)

    def run():
        return model.inpaint(pixels, missing, method=method, steps=steps, seed=seed, labels=labels, average=average)

    return Job("inpaint", len(pixels), run, labels, returns)


def interpolate_job(request: dict, model) -> Job:
    """Rows of g(ζ_t) between two latents (GGCN models)."""
    if model.state.generator is None:
        raise InvalidRequest(
            f"Interpolation needs a GGCN model (model.algorithm ggcn…); this one is "
            f"'{model.config.model.algorithm}': use task 'sample', or serve a GGCN model."
        )
    rows = _integer(request, "rows", default=4, low=1, high=MAX_IMAGES)
    midpoints = _integer(request, "midpoints", default=8, low=0, high=MAX_IMAGES - 2)
    count = rows * (midpoints + 2)
    if count > MAX_IMAGES:
        raise InvalidRequest(
            f"rows × (midpoints + 2) = {count} images: ask for at most {MAX_IMAGES} per request."
        )
    steps = _integer(request, "steps", default=0, low=0, high=MAX_STEPS)
    seed = _integer(request, "seed", default=0, low=0, high=2**63 - 1)
    label = _label(request, model)
    returns = _return(request, model)

    def run():
        return model.interpolate(rows, midpoints, seed=seed, steps=steps, label=label).flatten(0, 1)

    positions = [[r, c] for r in range(rows) for c in range(midpoints + 2)]
    return Job("interpolate", count, run, model.labels_for(count, label), returns, positions)


# task name → (parser of one request row, the fields it reads)
TASKS: dict[str, tuple[Callable[[dict, object], Job], tuple[str, ...]]] = {
    "sample": (sample_job, ("n", "steps", "seed", "label", "return")),
    "inpaint": (inpaint_job, ("images", "masks", "method", "steps", "seed", "average", "label", "return")),
    "interpolate": (interpolate_job, ("rows", "midpoints", "steps", "seed", "label", "return")),
}


def parse_request(request: dict, model) -> Job:
    """Validate one request row against its task and the model (InvalidRequest names the fix)."""
    task = request.get("task")
    task = "sample" if _missing(task) else task
    if not isinstance(task, str) or task not in TASKS:
        raise InvalidRequest(f"Unknown task {_show(task)}: choose one of {', '.join(TASKS)}.")
    parse, fields = TASKS[task]
    for key, value in request.items():
        if key != "task" and key not in fields and not _missing(value):
            hint = did_you_mean(key, fields, list_choices=False)
            raise InvalidRequest(
                f"Unknown field '{key}' for task '{task}'.{hint} Fields: {', '.join(fields)}."
            )
    return parse(request, model)


def _plain(value):
    """A request value as plain Python: MLflow's `inputs` format hands over numpy arrays."""
    if isinstance(value, np.ndarray):
        return value.item() if value.ndim == 0 else value.tolist()
    return value.item() if isinstance(value, np.generic) else value


def request_rows(model_input) -> list[dict]:
    """The request rows of a DataFrame (`dataframe_records`, `dataframe_split`), one dict or a list
    of dicts (`inputs`), with plain Python values."""
    if hasattr(model_input, "to_dict"):
        rows = model_input.to_dict("records")
    elif isinstance(model_input, dict):
        rows = [model_input]
    elif isinstance(model_input, (list, np.ndarray)) and all(
        isinstance(row, dict) for row in model_input
    ):
        rows = list(model_input)
    else:
        raise InvalidRequest(
            f"Cannot read a request from {type(model_input).__name__}: send "
            '{"dataframe_records": [{"task": "sample", "n": 4}]}.'
        )
    if not rows:
        raise InvalidRequest(
            'The request has no rows: send at least one, e.g. {"task": "sample", "n": 4}.'
        )
    return [{str(key): _plain(value) for key, value in row.items()} for row in rows]


def answer(jobs: list[Job]) -> list[dict]:
    """Run validated jobs and lay out one output record per image."""
    records = []
    for number, job in enumerate(jobs):
        try:
            images = job.run()
        except ConfigError as err:  # checked above; kept so that a missed case still answers 400
            raise InvalidRequest(str(err)) from None
        for index, image in enumerate(images.numpy()):
            records.append(
                {
                    "request": number,
                    "task": job.task,
                    "index": index,
                    "image": png_base64(image) if job.returns in ("png", "both") else None,
                    "array": image.tolist() if job.returns in ("array", "both") else None,
                    "shape": list(image.shape),
                    "label": None if job.labels is None else int(job.labels[index]),
                    "position": None if job.positions is None else job.positions[index],
                }
            )
    return records


SERVE_DEVICE_VARIABLE = "DEBM_SERVE_DEVICE"  # the device a served model samples on ("cpu", "cuda", "auto")


class EBMModel(mlflow.pyfunc.PythonModel):
    """A FRAME-family model served from its checkpoint bundle (`self.model`: the TrainedModel).

    Logged from code (serving_model.py); models registered before that hold a pickled instance
    of this class, which still loads."""

    def load_context(self, context):
        import os

        from .inference import load_run

        # `debm serve --device` sets DEBM_SERVE_DEVICE for the scoring server; default: the GPU
        # where torch sees one, else the CPU.
        self.model = load_run(
            context.artifacts["checkpoint"], checkpoint=context.artifacts["checkpoint"],
            device=os.environ.get(SERVE_DEVICE_VARIABLE, "auto"),
        )

    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None) -> pd.DataFrame:
        """Answer every request row (see the module docstring); all rows are checked first."""
        rows = request_rows(model_input)
        jobs = [parse_request(row, self.model) for row in rows]
        total = sum(job.count for job in jobs)
        if total > MAX_IMAGES:
            raise InvalidRequest(
                f"The request asks for {total} images in all: at most {MAX_IMAGES} per request; "
                "split it into several requests."
            )
        return pd.DataFrame(answer(jobs), columns=list(COLUMNS), dtype=object)
