"""Optional coverage-guided fuzzing of the wire codec with atheris. CI does not run it (CI
runs the hypothesis fuzzing in tests/test_fuzz.py); it is for a longer local hunt.

    pip install atheris      # anywhere batchproxy and its dependencies import
    mkdir -p /tmp/fuzz-work
    python tests/fuzz_corpus/atheris_harness.py -max_total_time=600 -rss_limit_mb=4096 \\
        /tmp/fuzz-work tests/fuzz_corpus/requests tests/fuzz_corpus/responses

Every input is read as a PredictRequest (both cores, which must agree), as a
PredictResponse split a few ways (both cores, same outcome) and as one TensorProto, so the
corpus seeds work as they are. Coverage comes from the pure-Python core and its wire
scanner (instrumented here); the compiled core runs on the same inputs and is checked for
crashes and agreement, but its C code is not instrumented. An input that raises anything
but CodecError, or on which the cores disagree, is a finding: atheris stops and writes it
to crash-<hash>.
"""

from __future__ import annotations

import sys
from pathlib import Path

import atheris

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "src"))

with atheris.instrument_imports():
    from batchproxy.codec import _core_py as py

from batchproxy import _core as cy  # compiled: nothing to instrument


def _outcome(core, fn, *args):
    try:
        return "ok", fn(core)(*args)
    except core.CodecError as err:
        return err.code, err.message


def _request(data: bytes) -> None:
    a = _outcome(cy, lambda c: c.decode_predict_request, data)
    b = _outcome(py, lambda c: c.decode_predict_request, data)
    if a[0] != b[0]:
        # The one known difference (see tests/test_fuzz.py): upb lets a field number 0
        # pass inside an unknown group; the compiled core refuses it, as TFS does.
        if not (b[0] == "ok" and "field number 0" in a[1]):
            raise AssertionError(f"cores disagree: {a!r} vs {b!r}")
        return
    if a[0] == "ok":
        ca, cb = a[1], b[1]
        assert (ca.rows, ca.key) == (cb.rows, cb.key)
        assert {k: (t.dtype, t.shape, t.data) for k, t in ca.inputs.items()} == {
            k: (t.dtype, t.shape, t.data) for k, t in cb.inputs.items()
        }
        if ca.rows > 0:
            again = cy.decode_predict_request(cy.encode_predict_request([(ca, 0, ca.rows)]))
            assert (again.rows, again.key) == (ca.rows, ca.key)
    elif a[1].startswith("tensor parsing error"):
        assert a[1] == b[1], (a, b)


def _split(data: bytes, rows: list[int]) -> None:
    a = _outcome(cy, lambda c: c.split_predict_response, data, rows)
    b = _outcome(py, lambda c: c.split_predict_response, data, rows)
    if a[0] != b[0] and "field number 0" in str(a[1]):
        return  # the known difference, as for requests
    assert a[0] == b[0], (a, b)
    if a[0] == "ok":
        for core, parts in ((cy, a[1]), (py, b[1])):
            _outcome(core, lambda c: c.concat_predict_responses, parts)


SPLITS = ([1], [1, 1], [2, 1], [0, 3, 0], [1, 1, 1, 1])


def TestOneInput(data: bytes) -> None:  # atheris's name
    _request(data)
    for rows in SPLITS:
        _split(data, rows)
    for core in (cy, py):
        _outcome(core, lambda c: c.decode_tensor, data)


def main() -> None:
    atheris.Setup(sys.argv, TestOneInput)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
