"""server.settle_garbage_collector: start-up's objects frozen, young collections rarer."""

from __future__ import annotations

import gc

from batchproxy import server


def test_settling_freezes_what_exists_and_raises_the_young_threshold():
    threshold = gc.get_threshold()
    try:
        gc.unfreeze()
        # A fresh interpreter's young threshold: a server started in this process earlier
        # (other tests) has settled the collector already.
        gc.set_threshold(700, *threshold[1:])
        kept = [[] for _ in range(1000)]  # containers alive now: start-up's, in a server
        server.settle_garbage_collector()
        assert gc.get_freeze_count() >= len(kept)
        assert gc.get_threshold() == (server.GC_YOUNG_THRESHOLD, *threshold[1:])
        assert server.GC_YOUNG_THRESHOLD > 700
    finally:
        gc.unfreeze()
        gc.set_threshold(*threshold)
