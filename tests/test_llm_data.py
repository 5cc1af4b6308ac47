"""The LLM task's user data (``onnxpress.llm.data``): windows, spreading, and the one-line errors."""

from __future__ import annotations

import json

import numpy as np
import pytest

from onnxpress.errors import UsageError
from onnxpress.llm import data


class CharTokenizer:
    """One token per character (ids = code points): enough to test windows without a real vocabulary."""

    def __call__(self, text, verbose=True):
        return {"input_ids": [ord(c) for c in text]}


def test_windows_keep_a_tail_of_at_least_half_a_window():
    assert data.windows(list(range(10)), 4) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert data.windows(list(range(9)), 4) == [[0, 1, 2, 3], [4, 5, 6, 7]]  # a 1-token tail is dropped
    assert data.windows(list(range(3)), 8) == []


def test_spread_keeps_first_and_last_in_order():
    seqs = [[i, i] for i in range(10)]
    picked = data.spread(seqs, 4)
    assert picked[0] == [0, 0] and picked[-1] == [9, 9] and len(picked) == 4
    assert [s[0] for s in picked] == sorted(s[0] for s in picked)
    assert data.spread(seqs, 20) is seqs


def test_text_is_cut_into_windows_and_capped(tmp_path):
    path = tmp_path / "t.txt"
    path.write_text("abcdefghij" * 10, encoding="utf-8")  # 100 tokens
    got = data.read(path, CharTokenizer(), 16, "calibration", limit=4)
    assert len(got.sequences) == 4 and all(len(s) == 16 for s in got.sequences)
    assert "100 tokens in 6 windows" in got.source and "4 of its 6" in got.source


def test_text_shorter_than_one_sequence_is_a_one_line_error(tmp_path):
    path = tmp_path / "t.txt"
    path.write_text("hi", encoding="utf-8")
    with pytest.raises(UsageError, match="gives 2 tokens, shorter than one sequence of 16"):
        data.read(path, CharTokenizer(), 16, "calibration", limit=4)
    path.write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(UsageError, match="not UTF-8"):
        data.read(path, CharTokenizer(), 16, "calibration", limit=4)


def test_token_ids_from_json_and_npz(tmp_path):
    (tmp_path / "ids.json").write_text(json.dumps([[1, 2, 3], [4, 5, 6, 7, 8]]))
    got = data.read(tmp_path / "ids.json", None, 4, "evaluation", limit=10, vocab=10)
    assert got.sequences == [[1, 2, 3], [4, 5, 6, 7]]
    np.savez(tmp_path / "ids.npz", input_ids=np.arange(12).reshape(3, 4))
    assert data.read(tmp_path / "ids.npz", None, 8, "evaluation", limit=10).sequences == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11]]


@pytest.mark.parametrize("content, match", [
    ({"input_ids": np.zeros((2, 4), np.int64), "attention_mask": np.ones((2, 4), np.int64)}, "one integer array 'input_ids'"),
    ({"input_ids": np.zeros((2, 4), np.float32)}, "one integer array 'input_ids'"),
    ({"input_ids": np.full((2, 4), 50)}, "token id 50 is outside the vocabulary"),
    ({"input_ids": np.zeros((2, 1), np.int64)}, "at least 2"),
])
def test_bad_token_ids_are_one_line_errors(tmp_path, content, match):
    np.savez(tmp_path / "ids.npz", **content)
    with pytest.raises(UsageError, match=match):
        data.read(tmp_path / "ids.npz", None, 8, "calibration", limit=10, vocab=10)
    (tmp_path / "bad.json").write_text('[[1, "a"]]')
    with pytest.raises(UsageError, match="lists of integers"):
        data.read(tmp_path / "bad.json", None, 8, "calibration", limit=10)


def test_the_four_prose_sets_never_share_a_sentence():
    from onnxpress.models import llm_text

    sets = {"calibration": llm_text.calibration_texts(), "evaluation": llm_text.eval_texts(), "confirmation": llm_text.confirm_texts(),
            "selection": llm_text.select_texts()}
    assert [len(v) for v in sets.values()] == [llm_text.N_CALIBRATION, llm_text.N_EVAL, llm_text.N_CONFIRM, llm_text.N_SELECT]
    keys = {name: set().union(*(llm_text.shingles(p) for p in paras)) for name, paras in sets.items()}
    names = list(keys)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            assert not keys[a] & keys[b], (a, b)
