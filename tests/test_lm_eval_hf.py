"""The ``kvplug-hf`` lm-eval model (:mod:`kvplug.lm_eval_hf`)."""

from types import SimpleNamespace

import pytest
import torch

from kvplug.lm_eval_hf import ContextFirstHFLM, context_end


def test_only_query_agnostic_documents_compress_their_context_first():
    assert context_end({"protocol": "query_agnostic", "context_tokens": 90}) == 90
    assert context_end({"protocol": "query_aware", "context_tokens": 90}) is None
    assert context_end(None) is None


def test_a_prompt_lm_eval_sized_otherwise_than_the_suite_is_refused():
    """Compressing at ``context_tokens`` of a prompt the suite did not size would cut the
    context at the wrong token: refused, naming both lengths."""
    doc = {"protocol": "query_agnostic", "context_tokens": 90, "num_tokens": 100,
           "task": "passkey", "index": 3}
    lm = SimpleNamespace(_doc=doc)
    with pytest.raises(ValueError, match=r"passkey#3: lm-eval's prompt is \(1, 99\) tokens, "
                                         r"the suite sized it as \(1, 100\)"):
        ContextFirstHFLM._model_generate(lm, torch.zeros(1, 99, dtype=torch.long), 120, [])
