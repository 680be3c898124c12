"""The MLflow pyfunc model: a trained checkpoint that answers sampling requests.

Input: a DataFrame (or dict) with columns `n` (samples), optional `steps`, `seed`, `label`.
Output: a DataFrame with one row per image: `image` (base64 PNG), `shape`, `label`.
"""

from __future__ import annotations

import base64
import io

import mlflow.pyfunc
import numpy as np

MAX_SAMPLES = 256


def png_base64(image: np.ndarray) -> str:
    """An image (C, H, W) in [-1, 1] as a base64-encoded PNG."""
    from PIL import Image

    pixels = ((np.clip(image, -1, 1) + 1) * 127.5).round().astype(np.uint8)
    pixels = pixels[0] if pixels.shape[0] == 1 else pixels.transpose(1, 2, 0)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


class EBMModel(mlflow.pyfunc.PythonModel):
    """A FRAME-family model served from its checkpoint bundle."""

    def load_context(self, context):
        from .inference import load_run

        self.model = load_run(context.artifacts["checkpoint"], checkpoint=context.artifacts["checkpoint"])

    def predict(self, context, model_input, params=None):
        import pandas as pd

        rows = model_input.to_dict("records") if hasattr(model_input, "to_dict") else [dict(model_input)]
        out = []
        for request in rows:
            n = int(request.get("n", 1))
            if not 1 <= n <= MAX_SAMPLES:
                raise ValueError(f"n must be between 1 and {MAX_SAMPLES}, got {n}.")
            label = request.get("label")
            label = None if label is None or (isinstance(label, float) and np.isnan(label)) else int(label)
            steps = request.get("steps")
            steps = None if steps is None or (isinstance(steps, float) and np.isnan(steps)) else int(steps)
            images = self.model.sample(n, steps=steps, seed=int(request.get("seed", 0) or 0), label=label).numpy()
            out += [{"image": png_base64(img), "shape": list(img.shape), "label": label} for img in images]
        return pd.DataFrame(out)
