"""Recipe validation in-process: defaults, --set overrides, and one-line errors naming file and field.

BAD_RECIPES is shared with test_cli.py, which checks the same mistakes end to end through the CLI.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from merge_xlstm.errors import UserError
from merge_xlstm.recipe import load_linearize_recipe

BASE_RECIPE: dict[str, Any] = {
    "name": "code",
    "teacher": "HuggingFaceTB/SmolLM2-135M-Instruct",
    "data": {"sources": [{"path": "DATA"}], "seq_len": 64},  # DATA: replaced by a real file
    "stage1": {"tokens": 1000},
    "stage2": {"tokens": 2000},
    "seed": "seeds/smollm2",
    "output": "experts/code",
}


def _without(*keys: str) -> Callable[[dict[str, Any]], None]:
    def edit(recipe: dict[str, Any]) -> None:
        for key in keys:
            recipe.pop(key)

    return edit


def _update(section: str | None, **values: Any) -> Callable[[dict[str, Any]], None]:
    def edit(recipe: dict[str, Any]) -> None:
        (recipe[section] if section else recipe).update(values)

    return edit


def _distil_student(recipe: dict[str, Any]) -> None:
    recipe["student"] = {"kind": "distil_xlstm"}


def _missing_data(recipe: dict[str, Any]) -> None:
    recipe["data"]["sources"][0]["path"] = "no-such-data.jsonl"


def _misspelt_output(recipe: dict[str, Any]) -> None:
    recipe["outptu"] = recipe.pop("output")


# id -> (recipe: an edit of BASE_RECIPE or raw YAML text, --set overrides, expected message after "<file>: ")
BAD_RECIPES: dict[str, tuple[Callable[[dict[str, Any]], None] | str, list[str], str]] = {
    "malformed-yaml": ("name: [code\nteacher: x\n", [], "malformed YAML at line 2, column 8:"),
    "not-a-mapping": ("- name: code\n", [], "expected a mapping at the top level, got list"),
    "unknown-top-level-key": (_update(None, epochs=3), [], "epochs: unknown key"),
    "unknown-nested-key": (_update("stage2", topk=8), [], "stage2.topk: unknown key"),
    "wrong-type": (_update("stage1", tokens="many"), [], "stage1.tokens: Input should be a valid integer"),
    "out-of-range": (_update("stage2", top_k=0), [], "stage2.top_k: Input should be greater than or equal to 1"),
    "missing-field": (_without("output"), [], "output: required field is missing"),
    # the typo is named, not the field it left missing
    "unknown-key-and-missing-field": (_misspelt_output, [], "outptu: unknown key (and 1 more error)"),
    "student-without-kind": (_update(None, student={"mixer": "swa"}), [],
                             "student.kind: required field is missing (one of: hybrid, distil_xlstm)"),
    "student-unknown-kind": (_update(None, student={"kind": "transformer"}), [],
                             "student.kind: expected one of: hybrid, distil_xlstm, got 'transformer'"),
    "missing-data-file": (_missing_data, [], "data.sources.0.path: no such file or directory: no-such-data.jsonl"),
    "set-without-value": (_update(None), ["stage2.tokens"], "--set expects KEY=VALUE, got 'stage2.tokens'"),
    "set-bad-yaml": (_update(None), ["stage2.tokens=[1"], "--set stage2.tokens: value '[1' is not valid YAML"),
    "set-out-of-range": (_update(None), ["stage2.tokens=0"], "stage2.tokens: Input should be greater than or equal"),
    "lr-beyond-float32": (_update(None), ["stage2.lr=1e38"], "stage2.lr: 1e+38 is beyond what the optimizer can step"),
    "set-unknown-key": (_update(None), ["stage2.topk=8"], "stage2.topk: unknown key"),
    "distil-with-stage1": (_distil_student, [], "stage1: hidden-state alignment does not apply to student kind"),
    "hybrid-without-stage1": (_without("stage1"), [], "stage1: required for student kind hybrid"),
    "split-term-without-a-gate": (_update(None, student={"kind": "hybrid", "mixer": "mlstm"}),
                                  ["stage1.loss.attention_transfer=1.0"],
                                  "stage1.loss.attention_transfer: needs student.mixer hybrid"),
    "evicted-keys-without-a-window": (_update(None, student={"kind": "hybrid", "mixer": "mlstm",
                                                             "memory_keys": "evicted"}), [],
                                      "student: memory_keys evicted: needs mixer hybrid and memory_outside_window true"),
    "memory-layers-twice": (_update(None, student={"kind": "hybrid"}), ["student.memory_layers=[3, 3]"],
                            "student: memory_layers: expected distinct layer indices >= 0 (at least one; for none, "
                            "mixer swa), got [3, 3]"),
    "memory-layers-empty": (_update(None, student={"kind": "hybrid"}), ["student.memory_layers=[]"],
                            "student: memory_layers: expected distinct"),
}


def write_recipe(directory: Path, recipe: Callable[[dict[str, Any]], None] | str, name: str = "recipe.yaml") -> Path:
    """Write BASE_RECIPE after `recipe` edits it (or raw YAML text) next to a small data file."""
    data = directory / "data.jsonl"
    data.write_text('{"text": "def f(): pass"}\n')
    if isinstance(recipe, str):
        text = recipe
    else:
        content = copy.deepcopy(BASE_RECIPE)
        content["data"]["sources"][0]["path"] = str(data)
        recipe(content)
        text = yaml.safe_dump(content, sort_keys=False)
    path = directory / name
    path.write_text(text)
    return path


def test_valid_recipe_carries_the_papers_defaults(tmp_path: Path) -> None:
    recipe = load_linearize_recipe(write_recipe(tmp_path, _update(None)))
    assert recipe.student.kind == "hybrid" and recipe.student.mixer == "hybrid"
    assert (recipe.student.window_size, recipe.student.num_sink_tokens) == (512, 4)
    assert (recipe.stage1.lr, recipe.stage1.min_lr) == (1e-2, 1e-5)
    s2 = recipe.stage2
    assert (s2.top_k, s2.ce_weight, s2.kl_weight, s2.temperature) == (256, 0.9, 0.1, 1.0)
    assert (s2.lr, s2.weight_decay, s2.grad_clip) == (1e-5, 0.1, 1.0)
    assert s2.lora is None and s2.distil is None


def test_a_single_branch_student_drops_the_split_terms_and_evicted_keys(tmp_path: Path) -> None:
    """Defaults a mixer without both branches cannot use are switched off, not refused."""
    recipe = load_linearize_recipe(write_recipe(tmp_path, _update(None, student={"kind": "hybrid", "mixer": "mlstm"})))
    loss = recipe.stage1.loss.model_dump()
    assert loss.pop("output") == 1.0 and set(loss.values()) == {0.0} and len(loss) == 4
    assert recipe.student.memory_keys == "all"
    assert load_linearize_recipe(write_recipe(tmp_path, _update(None))).student.memory_keys == "evicted"


def test_set_overrides_fields_with_yaml_values(tmp_path: Path) -> None:
    path = write_recipe(tmp_path, _update(None))
    recipe = load_linearize_recipe(path, ["stage2.tokens=5", "stage2.lora={r: 8}", "data.sources.0.weight=2.5"])
    assert recipe.stage2.tokens == 5 and recipe.stage2.lora.r == 8 and recipe.data.sources[0].weight == 2.5
    assert load_linearize_recipe(path).stage2.tokens == 2000  # the file itself is untouched


def test_distil_xlstm_recipe_gets_the_delta_schedule(tmp_path: Path) -> None:
    recipe = load_linearize_recipe(write_recipe(tmp_path, lambda r: (_distil_student(r), r.pop("stage1"))))
    assert recipe.student.slstm_at == [0, 2, 4] and recipe.stage1 is None
    schedule = recipe.stage2.distil
    assert (schedule.alpha_start, schedule.alpha_end) == (0.8, 0.5)
    assert (schedule.temperature_start, schedule.temperature_end, schedule.delta) == (2.0, 1.0, 0.05)


@pytest.mark.parametrize("case", sorted(BAD_RECIPES))
def test_bad_recipe_is_one_line_naming_file_and_field(case: str, tmp_path: Path) -> None:
    recipe, overrides, expected = BAD_RECIPES[case]
    path = write_recipe(tmp_path, recipe)
    with pytest.raises(UserError) as err:
        load_linearize_recipe(path, overrides)
    message = str(err.value)
    assert message.startswith(f"{path}: {expected}"), message
    assert "\n" not in message and len(message) < 200, message


def test_errors_show_the_offending_value_once(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"stage2\.top_k: Input should be greater than or equal to 1 \(got 0\)$"):
        load_linearize_recipe(write_recipe(tmp_path, _update("stage2", top_k=0)))
    with pytest.raises(UserError) as err:  # the validator's message names the value already
        load_linearize_recipe(write_recipe(tmp_path, _update(None, teacher="not a model")))
    assert str(err.value).count("'not a model'") == 1


def test_missing_recipe_file(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="no such recipe file"):
        load_linearize_recipe(tmp_path / "nope.yaml")
