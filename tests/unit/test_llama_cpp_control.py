"""`icon2_lens.llama_cpp` helpers that need no llama.cpp: the control-vector buffer and the missing-extra error.

The real llama.cpp checks are tests/integration/test_llama_cpp_steering.py (the `llama-cpp` extra).
"""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch

from icon2_lens.errors import BadInputError
from icon2_lens.llama_cpp import EXTRA, ControlVector, _cvec_data, control_vector, last_token_logits


def test_buffer_puts_block_il_at_row_il_minus_1_times_strength():
    data = _cvec_data({2: torch.full((4,), 1.0), 4: torch.arange(4.0)}, -0.5, 4)
    assert data.dtype == np.float32 and data.flags["C_CONTIGUOUS"]
    rows = data.reshape(4, 4)  # blocks 1..4: llama.cpp's buffer starts at block 1 and ends at the last given block
    np.testing.assert_array_equal(rows[0], 0)
    np.testing.assert_array_equal(rows[1], -0.5)
    np.testing.assert_array_equal(rows[2], 0)
    np.testing.assert_array_equal(rows[3], [0, -0.5, -1.0, -1.5])


def test_buffer_from_a_control_vector_and_its_checks():
    cv = ControlVector(layers=[1, 3], vectors=torch.ones(2, 3), model_hint="llama", index_base="repeng")
    np.testing.assert_array_equal(_cvec_data(cv.as_dict(), 2.0, 3).reshape(3, 3), [[2, 2, 2], [0, 0, 0], [2, 2, 2]])
    with pytest.raises(BadInputError, match="width 3, the model 5"):
        _cvec_data(cv.as_dict(), 1.0, 5)
    with pytest.raises(BadInputError, match="Block 0"):
        _cvec_data({0: torch.ones(3)}, 1.0, 3)
    with pytest.raises(BadInputError, match="no layers"):
        _cvec_data({}, 1.0, 3)


def test_without_the_extra_the_error_names_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # import llama_cpp -> ImportError
    with pytest.raises(ImportError, match=f"icon2-lens\\[{EXTRA}\\]"), control_vector(object(), {1: torch.ones(2)}):
        pass
    with pytest.raises(ImportError, match=EXTRA):
        last_token_logits(object(), [1, 2])
