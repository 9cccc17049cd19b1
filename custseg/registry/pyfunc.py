"""MLflow pyfunc for a custseg model, logged as "model from code" (nothing is pickled).

``mlflow.pyfunc.load_model("models:/customer-segments@champion").predict(df)`` takes the ten raw
columns (gender as text, any case) and returns segment labels. Pass ``params={"output": "probabilities"}``
for a frame with the label and one probability column per segment. Loading needs custseg installed.
Invalid input raises MLflow's INVALID_PARAMETER_VALUE error naming each row and column, so
``mlflow models serve`` answers 400 with that message (and no stack trace).

Before anything in the bundle is parsed, its files are checked against the SHA-256 digests recorded at
registration in this model's own ``MLmodel`` (``model_config``); see `custseg.scoring.verification`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.models import set_model
from mlflow.pyfunc import PythonModel

from custseg import schema
from custseg.core.validation import validate_frame
from custseg.errors import BundleVerificationError, DataValidationError
from custseg.scoring.scorer import Scorer
from custseg.scoring.verification import MODEL_CONFIG_KEY, decode_digests, verify_bundle
from custseg.settings import Settings


class CustomerSegmentModel(PythonModel):
    """Scores through the same `Scorer` as the API and batch (ONNX Runtime; the compiled tree kernel for
    models without an ONNX graph, such as HistGradientBoosting; sklearn fallback)."""

    scorer: Scorer

    def load_context(self, context):
        settings = Settings()
        bundle = Path(context.artifacts["bundle"])
        recorded = (context.model_config or {}).get(MODEL_CONFIG_KEY)
        if recorded is not None:
            verify_bundle(bundle, decode_digests(recorded, "the model's MLmodel"), "the model's MLmodel")
        elif not settings.allow_unverified_bundles:
            raise BundleVerificationError(
                "this MLflow model records no bundle checksums (it was registered before custseg verified "
                "bundles) and is refused; register a new version with `custseg train --data PATH`, or set "
                "CUSTSEG_ALLOW_UNVERIFIED_BUNDLES=true to load it anyway"
            )
        self.scorer = Scorer.from_bundle(bundle, allow_pipeline=settings.allow_pipeline_fallback)

    def predict(self, context, model_input, params=None):
        # No type hints here: MLflow would try to derive a second signature from them.
        frame = model_input if isinstance(model_input, pd.DataFrame) else pd.DataFrame(model_input)
        features = [c for c in frame.columns if c in schema.FEATURES_BY_NAME]
        try:
            clean = validate_frame(frame[features], require_label=False, require_id=False, source="input")
        except DataValidationError as exc:
            raise MlflowException.invalid_parameter_value(str(exc)) from exc
        scores = self.scorer.score_frame(clean)
        if (params or {}).get("output") == "probabilities":
            # Rounded like the API's answer: ONNX computes in float32 (1.0000003 is not a probability).
            rounded = np.round(scores.probabilities, 6)
            out = pd.DataFrame(rounded, columns=[f"proba_{c}" for c in scores.classes])
            out.insert(0, "prediction", scores.labels)
            return out
        return pd.Series(scores.labels, name="prediction")


set_model(CustomerSegmentModel())
