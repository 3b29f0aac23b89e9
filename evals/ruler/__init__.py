"""An offline RULER suite: synthetic long-context tasks sized in the model's own tokens.

``synth`` generates RULER's tasks (plus passkey) locally, ``scoring`` scores
them as RULER does, and ``lm_eval_hooks`` serves them to lm-evaluation-harness
through the task YAMLs in ``LM_EVAL_TASKS_DIR``::

    lm_eval --model hf --model_args pretrained=$MODEL --include_path $LM_EVAL_TASKS_DIR \\
        --tasks kvplug_ruler --metadata '{"max_seq_lengths": [4096, 8192]}'

Two protocols, named in every task, group and document:

* ``query_aware`` (group ``kvplug_ruler``): RULER's protocol.  The question
  follows the context in one prompt, so a compression policy that runs after
  prefill may use it.
* ``query_agnostic`` (group ``kvplug_ruler_query_agnostic``): the context is
  compressed before the question is seen, as kvpress evaluates.  The prompt
  text is the same; each document carries ``context`` and ``question`` apart
  and ``context_tokens``, the length of the prompt's context in tokens, and the
  engine must compress those tokens before it reads the rest.  Run these tasks
  only on an engine that does, or the numbers are query-aware ones under a
  query-agnostic name.
"""

from pathlib import Path

LM_EVAL_TASKS_DIR = Path(__file__).resolve().parent.parent / "lm_eval_tasks"
