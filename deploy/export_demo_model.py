"""Export batchproxy's demo classifier as a TensorFlow SavedModel for TensorFlow Serving.

    .venv/bin/python deploy/export_demo_model.py            # -> models/my_mnist_model/0001

The model is the one `batchproxy serve` runs in its local reference replicas (a softmax
regression on MNIST-shaped images, weights in src/batchproxy/replica/demo_weights.npz), with
the classic Keras MNIST signature: `serving_default` takes `flatten_input` float [-1,28,28] and
answers `dense_1` float [-1,10] probabilities. So TFS behind the proxy (docker-compose.yml, the
Kubernetes manifests) answers exactly like the reference replicas do.

Needs TensorFlow (`pip install -e '.[interop]'` brings it). Only this script imports it:
batchproxy itself never does.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_WEIGHTS = ROOT / "src" / "batchproxy" / "replica" / "demo_weights.npz"
DEFAULT_OUT = ROOT / "models" / "my_mnist_model" / "0001"


def export(out: Path, weights: Path = DEFAULT_WEIGHTS) -> Path:
    import tensorflow as tf

    with np.load(weights) as data:
        kernel = data["kernel"].astype(np.float32)  # [784, 10]
        bias = data["bias"].astype(np.float32)  # [10]

    class DemoClassifier(tf.Module):
        def __init__(self) -> None:
            super().__init__(name="demo_classifier")
            self.kernel = tf.Variable(kernel, trainable=False, name="kernel")
            self.bias = tf.Variable(bias, trainable=False, name="bias")

        # The input's name is the signature's input key; the returned dict's keys are its
        # outputs: the names TFS clients put in PredictRequest.inputs and read from outputs.
        @tf.function(input_signature=[
            tf.TensorSpec([None, 28, 28], tf.float32, name="flatten_input")])
        def serve(self, flatten_input: tf.Tensor) -> dict[str, tf.Tensor]:
            rows = tf.reshape(flatten_input, [-1, 28 * 28])
            return {"dense_1": tf.nn.softmax(tf.matmul(rows, self.kernel) + self.bias)}

    module = DemoClassifier()
    if out.exists():  # a version folder is immutable for TFS: replace it whole
        shutil.rmtree(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tf.saved_model.save(module, str(out), signatures={"serving_default": module.serve})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT,
                        help="version folder to write (default models/my_mnist_model/0001); "
                             "TFS wants MODEL_BASE_PATH/MODEL_NAME/<number>/saved_model.pb")
    parser.add_argument("--weights", type=Path, default=DEFAULT_WEIGHTS,
                        help="kernel and bias (.npz) of the demo classifier")
    args = parser.parse_args()
    out = export(args.out, args.weights)
    print(f"SavedModel written to {out}")


if __name__ == "__main__":
    main()
