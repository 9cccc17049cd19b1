"""MLflow pyfunc for a custseg model, logged as "model from code" (nothing is pickled).

``mlflow.pyfunc.load_model("models:/customer-segments@champion").predict(df)`` takes the ten raw
columns (gender as text, any case) and returns segment labels. Pass ``params={"output": "probabilities"}``
for a frame with the label and one probability column per segment. Loading needs custseg installed.
Invalid input raises MLflow's INVALID_PARAMETER_VALUE error naming each row and column, so
``mlflow models serve`` answers 400 with that message (and no stack trace).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.models import set_model
from mlflow.pyfunc import PythonModel

from custseg import schema
from custseg.data import validate_frame
from custseg.errors import DataValidationError
from custseg.predict import Scorer


class CustomerSegmentModel(PythonModel):
    """Scores through the same `Scorer` as the API and batch (ONNX Runtime, sklearn fallback)."""

    scorer: Scorer

    def load_context(self, context):
        self.scorer = Scorer.from_bundle(context.artifacts["bundle"])

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
