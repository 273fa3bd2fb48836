"""Train the reference replica's `demo` model and write its committed files.

    .venv/bin/python scripts/train_demo_model.py

Uses scikit-learn's bundled digits (no download): 8x8 images upscaled to MNIST's 28x28, a
multinomial logistic regression (softmax) over the 784 pixels. Writes
src/batchproxy/replica/demo_weights.npz (kernel [784,10], bias [10]) and demo_samples.npz
(64 held-out 8x8 images and labels, so tests can check predictions without sklearn).
Deterministic: the split and the solver are seeded.
"""

from __future__ import annotations

import numpy as np
from sklearn.datasets import load_digits
from sklearn.linear_model import LogisticRegression

from batchproxy.replica.models import (
    DEMO_SAMPLES,
    DEMO_WEIGHTS,
    SERVING_DEFAULT,
    DemoModel,
    digits_split,
    upscale_digits,
)

N_SAMPLES = 64


def main() -> None:
    digits = load_digits()
    train, test = digits_split(len(digits.target))
    x = upscale_digits(digits.images).reshape(-1, 28 * 28)
    y = digits.target
    clf = LogisticRegression(C=1.0, max_iter=3000, random_state=0)
    clf.fit(x[train], y[train])
    np.savez_compressed(
        DEMO_WEIGHTS,
        kernel=clf.coef_.T.astype(np.float32),
        bias=clf.intercept_.astype(np.float32),
    )
    np.savez_compressed(
        DEMO_SAMPLES,
        images8=digits.images[test[:N_SAMPLES]].astype(np.uint8),
        labels=y[test[:N_SAMPLES]].astype(np.int64),
    )
    # Check the saved float32 weights through the replica's own model code.
    model = DemoModel(DEMO_WEIGHTS)
    images = x.reshape(-1, 28, 28)
    for name, rows in (("train", train), ("held-out", test)):
        probs = model.predict(SERVING_DEFAULT, {"flatten_input": images[rows]})["dense_1"]
        accuracy = float((probs.argmax(axis=1) == y[rows]).mean())
        print(f"{name} accuracy: {accuracy:.4f} ({len(rows)} images)")
    print(f"wrote {DEMO_WEIGHTS} ({DEMO_WEIGHTS.stat().st_size} bytes)")
    print(f"wrote {DEMO_SAMPLES} ({DEMO_SAMPLES.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
