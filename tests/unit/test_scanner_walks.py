"""The compiled walk (proxy/protocol/_scanner.c) against its pure-Python reference in framing.py."""

from __future__ import annotations

import os
import shutil

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import proxy
from proxy.compiled import PURE_PYTHON_ENV
from proxy.protocol import framing
from proxy.protocol.framing import MAX_MESSAGE_LENGTH, Frame
from test_framing import _capture_sets as _kind_sets
from test_framing import _noisy_streams

FUZZ = settings(max_examples=2500, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@pytest.mark.skipif(shutil.which("cc") is None, reason="no C compiler here, so no compiled walk was built")
@pytest.mark.skipif(not proxy.BUILD.compiled and PURE_PYTHON_ENV in os.environ,
                    reason=f"{PURE_PYTHON_ENV} is set: the pure-Python build is under test")
def test_the_compiled_walk_is_built_where_a_compiler_exists() -> None:
    # `pip install -e .` builds it (setup.py, optional): without this test a failed build would
    # silently leave only the pure-Python walk tested and used.
    assert "compiled" in framing.WALKS



@FUZZ
@given(data=st.one_of(st.binary(max_size=300), _noisy_streams()),
       kinds=st.tuples(_kind_sets, _kind_sets, _kind_sets),
       start=st.integers(0, 40), max_length=st.sampled_from([MAX_MESSAGE_LENGTH, 64, 5]))
def test_property_compiled_and_python_walks_agree(data, kinds, start, max_length) -> None:
    flags = framing.kind_flags(*kinds)  # captured, counted, neutral
    if len(framing.WALKS) < 2:
        pytest.skip("no compiled walk on this machine (see the test above)")
    pos = min(start, len(data))
    results = {}
    for name, walk_impl in framing.WALKS.items():
        out: list = []
        result = walk_impl(data, memoryview(data), pos, pos, flags, max_length, Frame, out)
        results[name] = (result, [(type(s).__name__, s.kind if type(s) is Frame else None, bytes(s.data if type(s) is Frame else s))
                                  for s in out])
    assert len(set(map(repr, results.values()))) == 1, results
