"""lm-eval's ``hf`` model that runs the suite's query-agnostic protocol (``kvplug-hf``).

A ``kvplug_ruler_query_agnostic`` document carries ``context_tokens``: where its
prompt's context ends.  For such a document the model prefills the context and
lets the policy compress it (:func:`~kvplug.integrations.transformers.compress_context`)
before the question, the reply start and the generation read the kept KV, as
kvpress evaluates.  Every other document, and every policy that keeps all its
tokens, runs exactly as lm-eval's ``hf`` model::

    KVPLUG_CONFIG='{"policy": "snapkv", "budget_ratio": 0.125}' kvplug lm-eval \\
        --model kvplug-hf --model_args pretrained=$M,attn_implementation=kvplug,dtype=float32 \\
        --tasks kvplug_ruler_query_agnostic --apply_chat_template ...
"""

from __future__ import annotations

from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM
from tqdm import tqdm

from kvplug.integrations import transformers as kvhf

MODEL_NAME = "kvplug-hf"


def context_end(doc: dict | None) -> int | None:
    """Tokens of a query-agnostic document's prompt to compress first; None for others."""
    if not doc or doc.get("protocol") != "query_agnostic":
        return None
    return int(doc["context_tokens"])


@register_model(MODEL_NAME)
class ContextFirstHFLM(HFLM):
    """``HFLM`` whose generation compresses a query-agnostic document's context first."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._doc: dict | None = None  # the document being generated for

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        # one request at a time: the document reaches _model_generate beside its tokens
        out = []
        for request in tqdm(requests, disable=disable_tqdm, desc="kvplug-hf generate_until"):
            self._doc = request.doc
            try:
                out += super().generate_until([request], disable_tqdm=True)
            finally:
                self._doc = None
        return out

    def _model_generate(self, context, max_length, stop, **generation_kwargs):
        end = context_end(self._doc)
        if end is not None:
            expected = int(self._doc["num_tokens"])
            if context.shape != (1, expected):
                raise ValueError(f"query-agnostic document {self._doc.get('task')}#"
                                 f"{self._doc.get('index')}: lm-eval's prompt is "
                                 f"{tuple(context.shape)} tokens, the suite sized it as "
                                 f"(1, {expected}): context_tokens={end} would not end its "
                                 "context (is --apply_chat_template set?)")
            cache = kvhf.compress_context(self.model, context, end, self.tokenizer)
            if cache is not None:
                generation_kwargs["past_key_values"] = cache
        return super()._model_generate(context, max_length, stop, **generation_kwargs)
