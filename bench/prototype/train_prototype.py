"""Train the prototype's model the prototype's way (the student project's notebook, rebuilt).

pandas one-hot encoding of ``gender``, an 80/20 ``train_test_split(random_state=42)``,
``RandomForestClassifier(criterion="entropy")`` with default settings (100 trees), saved with joblib
together with the column order the server needs. Used only by ``bench/bench_api.py``.

    python bench/prototype/train_prototype.py data/customers.csv OUT_DIR
"""

from __future__ import annotations

import sys
from pathlib import Path

import joblib
import pandas as pd
from sklearn.ensemble import RandomForestClassifier
from sklearn.metrics import accuracy_score
from sklearn.model_selection import train_test_split

MODEL_FILE = "model.pkl"
COLUMNS_FILE = "model_columns.pkl"


def train_prototype(data: Path, out_dir: Path) -> float:
    """Fit and save the prototype's forest; returns its test accuracy (the figure the prototype reported)."""
    df = pd.read_csv(data)
    df = df.drop(columns=["customer_id"])
    df = pd.get_dummies(df, columns=["gender"])
    x = df.drop(columns=["customer_segment"])
    y = df["customer_segment"]
    x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=0.2, random_state=42)
    model = RandomForestClassifier(criterion="entropy", random_state=42)
    model.fit(x_train.values, y_train)
    out_dir.mkdir(parents=True, exist_ok=True)
    joblib.dump(model, out_dir / MODEL_FILE)
    joblib.dump(list(x.columns), out_dir / COLUMNS_FILE)
    return float(accuracy_score(y_test, model.predict(x_test.values)))


if __name__ == "__main__":
    accuracy = train_prototype(Path(sys.argv[1]), Path(sys.argv[2]))
    print(f"prototype model saved to {sys.argv[2]} (test accuracy {accuracy:.3f})")
