"""The reference replica's sequence model: a masked mean that padding with the pad id
leaves alone, and padding with anything else (TFS's first element) changes."""

from __future__ import annotations

import numpy as np

from batchproxy.replica.models import SERVING_DEFAULT, SequenceModel


def run(tokens: list[list[int]]) -> dict[str, np.ndarray]:
    return SequenceModel().predict(SERVING_DEFAULT, {"tokens": np.array(tokens, np.int32)})


def test_padding_with_the_pad_id_changes_nothing():
    alone = run([[5, 17, 300]])
    padded = run([[5, 17, 300, 0, 0, 0]])
    np.testing.assert_array_equal(alone["embedding"], padded["embedding"])
    np.testing.assert_array_equal(alone["token_scores"], padded["token_scores"][:, :3])
    assert (padded["token_scores"][:, 3:] == 0).all()


def test_padding_with_the_first_element_changes_the_answer():
    alone = run([[5, 17, 300]])
    first_element = run([[5, 17, 300, 5, 5, 5]])
    assert not np.allclose(alone["embedding"], first_element["embedding"])


def test_cost_grows_with_batch_times_length():
    model = SequenceModel()
    assert model.cost_units({"tokens": np.zeros((4, 32), np.int32)}, 4) == 128
