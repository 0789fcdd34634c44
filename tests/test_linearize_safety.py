"""`linearize` against careless input: divergence (issue 14, item 1), caches keyed by the teacher's content
(item 2) and a model card that shows what actually ran (item 8). Tiny llama teachers on CPU, seconds per run.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import yaml

import merge_xlstm.linearize.stage2 as stage2
from merge_xlstm.cli import main as cli
from merge_xlstm.digests import MEMO_FILE, file_digest
from merge_xlstm.provenance import read_metadata
from merge_xlstm.testing import tiny_teacher, tiny_tokenizer

SEQ_LEN, BATCH = 64, 4


def save_teacher(path: Path, seed: int) -> Path:
    tiny_teacher("llama", seed=seed).save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


def make_workspace(root: Path) -> Path:
    save_teacher(root / "teacher", seed=0)
    words = ["def", "return", "class", "import", "yield"]
    with (root / "code.jsonl").open("w") as handle:
        for i in range(300):
            handle.write(json.dumps({"text": " ".join(words[(i + j) % 5] for j in range(20 + i % 9))}) + "\n")
    return root


def write_recipe(root: Path, name: str, *, seed: str = "seed", stage1: dict | None = None,
                 stage2_steps: int = 4) -> Path:  # fmt: skip
    recipe = {
        "name": name,
        "teacher": str(root / "teacher"),
        "student": {"kind": "hybrid", "mixer": "hybrid", "window_size": 16, "num_sink_tokens": 2},
        "data": {"sources": [{"path": str(root / "code.jsonl")}], "seq_len": SEQ_LEN, "validation_fraction": 0.1},
        "stage1": {"tokens": SEQ_LEN * BATCH * 2, "batch_size": BATCH, "micro_batch_size": 2, "warmup_steps": 1,
                   "log_every": 1, **(stage1 or {})},
        "stage2": {"tokens": SEQ_LEN * BATCH * stage2_steps, "batch_size": BATCH, "micro_batch_size": 2, "lr": 1e-3,
                   "warmup_steps": 1, "top_k": 8, "log_every": 1, "save_every": 2},
        "seed": str(root / "experts" / seed),
        "output": str(root / "experts" / name),
    }  # fmt: skip
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def linearize(recipe: Path, *overrides: str) -> int:
    return cli(["linearize", str(recipe), *(arg for value in overrides for arg in ("--set", value))])


def refusal(capsys: pytest.CaptureFixture[str], code: int) -> str:
    """The one error line of a refused run (earlier stderr lines are progress bars)."""
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err, err
    errors = [line for line in err.splitlines() if "merge-xlstm: error:" in line]
    assert len(errors) == 1 and errors[0].startswith("merge-xlstm: error: "), err
    return errors[0].removeprefix("merge-xlstm: error: ")


def strict_json_lines(path: Path) -> list[dict]:
    """Rows of a JSON-lines file, refusing the bare NaN / Infinity that Python's json would accept."""

    def refuse(token: str) -> None:
        raise AssertionError(f"{path}: {token} is not JSON")

    return [json.loads(line, parse_constant=refuse) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A teacher, a corpus and the shared seed, built once by the recipe `base`."""
    root = make_workspace(tmp_path_factory.mktemp("safety"))
    assert linearize(write_recipe(root, "base")) == 0
    return root


# ------------------------------------------------------------------------------------ item 1
@pytest.mark.parametrize(
    ("steps", "lr", "detected"),
    [
        (4, "1e30", "at step 2 (loss"),  # the second step's gradient is not finite
        (1, "3e37", "at step 1 (loss nan after its update)"),  # the only update makes the activations overflow
    ],
)
def test_a_diverging_stage2_stops_in_one_line_and_writes_no_expert(workspace, capsys, steps, lr, detected):
    name = f"diverged-{steps}"
    code = linearize(write_recipe(workspace, name, stage2_steps=steps), f"stage2.lr={lr}")
    line = refusal(capsys, code)
    assert line.startswith(f"stage2 diverged {detected}"), line
    assert "no model was written; no checkpoint had been written yet" in line and "lower stage2.lr" in line
    assert not (workspace / "experts" / name).exists()
    metrics = strict_json_lines(workspace / "experts" / f"{name}.partial" / "metrics.jsonl")
    assert all(math.isfinite(row["loss"]) for row in metrics)  # the diverged step is not logged


def test_a_diverging_stage1_writes_no_seed(workspace, capsys):
    code = linearize(write_recipe(workspace, "stage1-diverged", seed="bad-seed"), "stage1.lr=3e37")
    line = refusal(capsys, code)
    assert line.startswith("stage1 diverged at step 2 (loss"), line
    assert "lower stage1.lr" in line
    assert not (workspace / "experts" / "bad-seed").exists()
    assert not (workspace / "experts" / "stage1-diverged").exists()
    assert (workspace / "experts" / "bad-seed.partial").is_dir()  # where a rerun resumes


def test_a_rerun_after_divergence_resumes_from_the_last_good_checkpoint(workspace, capsys, monkeypatch):
    real_loss = stage2.stage2_loss

    def loss_that_fails_at_step_3(recipe, steps_per_epoch):
        loss_fn = real_loss(recipe, steps_per_epoch)

        def loss(model, batch, *, step, teacher):
            value, parts = loss_fn(model, batch, step=step, teacher=teacher)
            return (value * math.nan, parts) if step == 2 else (value, parts)

        return loss

    recipe = write_recipe(workspace, "resumed")
    checkpoint = workspace / "experts" / "resumed.partial" / "stage2" / "checkpoint"
    monkeypatch.setattr(stage2, "stage2_loss", loss_that_fails_at_step_3)
    line = refusal(capsys, linearize(recipe))
    assert line.startswith("stage2 diverged at step 3 (loss nan, gradient norm nan); no model was written"), line
    assert f"the last good checkpoint (step 2) is kept in {checkpoint}" in line
    assert json.loads((checkpoint / "state.json").read_text())["step"] == 2
    assert not (workspace / "experts" / "resumed").exists()

    monkeypatch.setattr(stage2, "stage2_loss", real_loss)
    assert linearize(recipe) == 0
    assert "stage2: resuming at step 2/4" in capsys.readouterr().out
    expert = workspace / "experts" / "resumed"
    rows = [r for r in strict_json_lines(expert / "metrics.jsonl") if r["stage"] == "stage2"]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    json.loads((expert / "merge_xlstm.json").read_text(), parse_constant=lambda token: pytest.fail(token))
    assert not (workspace / "experts" / "resumed.partial").exists()


# ------------------------------------------------------------------------------------ item 2
def test_a_teacher_replaced_in_place_gets_new_targets_and_its_old_seed_is_refused(tmp_path, capsys, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setenv("MERGE_XLSTM_CACHE", str(cache))
    root = make_workspace(tmp_path)
    assert linearize(write_recipe(root, "before")) == 0
    save_teacher(root / "teacher", seed=1)  # same path, same shapes, other weights

    line = refusal(capsys, linearize(write_recipe(root, "after")))
    seed = root / "experts" / "seed"
    assert line.startswith(f"{seed}: was built from other teacher weights (content "), line
    assert line.endswith("; delete it or choose another seed"), line
    assert not (root / "experts" / "after").exists() and not (root / "experts" / "after.partial").exists()

    line = refusal(capsys, linearize(write_recipe(root, "before")))  # same output: made from the old weights
    assert line.startswith(f"{root / 'experts' / 'before'}: exists and was not made by this recipe"), line

    assert linearize(write_recipe(root, "after", seed="seed-after")) == 0
    before, after = (read_metadata(root / "experts" / name) for name in ("before", "after"))
    assert before["teacher_digest"] != after["teacher_digest"]
    assert before["validation"]["teacher_ce"] != after["validation"]["teacher_ce"]  # targets of the new teacher
    assert len(list((cache / "targets").iterdir())) == 2


def test_file_digests_are_remembered_until_the_file_is_rewritten(tmp_path):
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(b"a" * 1000)
    first = file_digest(weights, tmp_path)
    memo = json.loads((tmp_path / MEMO_FILE).read_text())
    memo[str(weights.resolve())]["sha256"] = "remembered"
    (tmp_path / MEMO_FILE).write_text(json.dumps(memo))
    assert file_digest(weights, tmp_path) == "remembered"  # unchanged file: not hashed again
    weights.write_bytes(b"b" * 1000)  # same size, rewritten in place
    assert file_digest(weights, tmp_path) not in ("remembered", first)


# ------------------------------------------------------------------------------------ item 8
def yaml_recipe_of(card: str) -> dict:
    return yaml.safe_load(card.split("## Recipe", 1)[1].split("```yaml", 1)[1].split("```", 1)[0])


def test_the_card_of_an_expert_from_a_reused_seed_shows_the_seeds_stage1(workspace, capsys):
    seed_stage1 = read_metadata(workspace / "experts" / "seed")["stage1"]
    other = {"lr": seed_stage1["lr"] / 2, "tokens": seed_stage1["tokens"] * 2}
    assert linearize(write_recipe(workspace, "reuser", stage1=other)) == 0
    assert "this recipe's stage1 block differs and is not used" in capsys.readouterr().out

    card = (workspace / "experts" / "reuser" / "README.md").read_text()
    assert "stage I did not run for this expert: the seed already existed and was reused" in card
    assert yaml_recipe_of(card)["stage1"] == seed_stage1  # not the recipe's ignored block
    assert read_metadata(workspace / "experts" / "reuser")["seed_reused"] is True

    builder = (workspace / "experts" / "base" / "README.md").read_text()  # the expert whose run made the seed
    assert "stage I did not run" not in builder and yaml_recipe_of(builder)["stage1"] == seed_stage1
    assert read_metadata(workspace / "experts" / "base")["seed_reused"] is False
