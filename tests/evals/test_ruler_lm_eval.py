"""The lm-eval task YAMLs: loaded offline, documents built, prompts as sized, scored end to end.

No model runs: an oracle LM answers from each request's document.  (cwe needs
about 900 tokens, so the smallest length the whole group takes is 1024.)
"""

import pytest

from kvplug.evals.ruler import LM_EVAL_TASKS_DIR, synth
from kvplug.evals.ruler.scoring import scores_from_lm_eval, summarize

GROUPS = {"kvplug_ruler": "query_aware", "kvplug_ruler_query_agnostic": "query_agnostic"}


@pytest.fixture(scope="module")
def tokenizer(model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)


@pytest.fixture(scope="module")
def task_manager(model_dir):
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=str(LM_EVAL_TASKS_DIR), include_defaults=False,
                       metadata={"tokenizer": str(model_dir), "max_seq_lengths": [1024],
                                 "num_samples": 2})


@pytest.fixture(scope="module")
def loaded(task_manager):
    return task_manager.load(list(GROUPS))


def test_both_groups_hold_every_task_with_rulers_generation_budget(loaded):
    groups = {g.name: g for g in loaded["groups"].values()}
    for group, protocol in GROUPS.items():
        prefix = group + "_"
        names = {t.task_name for t in groups[group].get_all_tasks()}
        assert names == {prefix + t for t in synth.TASKS}
        for name in names:
            task = loaded["tasks"][name]
            docs = list(task.test_docs())
            assert len(docs) == 2
            assert {(d["protocol"], d["max_length"], d["task"]) for d in docs} == {
                (protocol, 1024, name.removeprefix(prefix))}
            gen_tokens = synth.TASKS[name.removeprefix(prefix)].gen_tokens
            assert task.config.generation_kwargs["max_gen_toks"] == gen_tokens == docs[0]["gen_tokens"]


def test_lm_eval_renders_the_prompts_that_were_sized(loaded, tokenizer):
    def chat_template(history, add_generation_prompt):  # as lm-eval's HFLM.apply_chat_template
        return tokenizer.apply_chat_template(history, tokenize=False,
                                             add_generation_prompt=add_generation_prompt,
                                             continue_final_message=not add_generation_prompt)

    for name in (n for n in loaded["tasks"] if not n.startswith("kvplug_ruler_query_agnostic")):
        task = loaded["tasks"][name]
        doc = task.test_docs()[0]
        prefix = task.doc_to_prefix(doc)
        raw = task.fewshot_context(doc, 0, gen_prefix=prefix)
        chat = task.fewshot_context(doc, 0, apply_chat_template=True, chat_template=chat_template,
                                    gen_prefix=prefix)
        assert raw == doc["context"] + doc["question"] + doc["answer_prefix"], name
        assert len(tokenizer(chat, add_special_tokens=False)["input_ids"]) == doc["num_tokens"], name


def test_an_oracle_scores_100_per_task_length_and_group(task_manager):
    import lm_eval
    from lm_eval.api.model import LM

    class Oracle(LM):
        def generate_until(self, requests, disable_tqdm=False):
            return [" " + ", ".join(r.doc["outputs"]) + "." for r in requests]

        def loglikelihood(self, requests, disable_tqdm=False):
            raise NotImplementedError

        def loglikelihood_rolling(self, requests, disable_tqdm=False):
            raise NotImplementedError

    results = lm_eval.simple_evaluate(model=Oracle(), tasks=["kvplug_ruler"],
                                      task_manager=task_manager, bootstrap_iters=0)
    assert results["results"]["kvplug_ruler"]["1024,none"] == 100
    scores = scores_from_lm_eval(results)
    assert scores == {f"kvplug_ruler_{t}": {1024: 100.0} for t in synth.TASKS}
    assert summarize(scores).avg == 100
