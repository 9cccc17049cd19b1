"""The prototype's serving path, rebuilt faithfully for the benchmark (do not use it for anything else).

Flask's development server started with ``app.run()`` (threaded, the default), the joblib-loaded forest,
and the prototype's ``predict()`` body: JSON in, pandas one-hot encoding aligned to the training
columns (an unknown gender silently becomes all zeros), ``model.predict([features])`` on one row, and
``str(e)`` with status 500 on any error.

    MODEL_DIR=DIR python bench/prototype/app.py PORT
"""

import os
import sys
from typing import Any

import joblib
import pandas as pd
from flask import Flask, jsonify, request

app = Flask(__name__)
model = joblib.load(os.path.join(os.environ["MODEL_DIR"], "model.pkl"))
model_columns = joblib.load(os.path.join(os.environ["MODEL_DIR"], "model_columns.pkl"))


@app.route("/", methods=["GET"])
def home() -> str:
    return "Customer segmentation model is running"


@app.route("/predict", methods=["POST"])
def predict() -> Any:
    try:
        data = request.get_json()
        df = pd.DataFrame([data])
        df = pd.get_dummies(df)
        df = df.reindex(columns=model_columns, fill_value=0)
        features = df.iloc[0].tolist()
        prediction = model.predict([features])
        return jsonify({"prediction": prediction.tolist()})
    except Exception as e:
        return jsonify({"error": str(e)}), 500


if __name__ == "__main__":
    app.run(port=int(sys.argv[1]))
