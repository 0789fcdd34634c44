"""`merge-xlstm merge` on tiny students: closed forms, identity, TIES/DARE, refusals, interruption."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from merge_xlstm.cli import main as cli
from merge_xlstm.provenance import read_metadata, weights_digest, write_metadata
from merge_xlstm.student import from_teacher
from merge_xlstm.testing import tiny_teacher, tiny_tokenizer

REPO = Path(__file__).resolve().parents[1]
WEIGHTS = "model.safetensors"
HYBRID = dict(kind="hybrid", mixer="hybrid", window_size=8, num_sink_tokens=2)


def _save_student(path: Path, **options) -> None:
    from_teacher(tiny_teacher("llama"), **(HYBRID | options)).save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)


def make_seed(path: Path, **options) -> Path:
    """A tiny student seed with its provenance: kind seed, seed_id = digest of its own weights."""
    _save_student(path, **options)
    write_metadata(path, {"kind": "seed", "seed_id": weights_digest(path)})
    return path


@pytest.fixture(scope="module")
def seed(tmp_path_factory) -> Path:
    return make_seed(tmp_path_factory.mktemp("seed") / "seed")


def make_expert(seed: Path, path: Path, index: int, *, seed_id: str | None = "inherit") -> Path:
    """A copy of `seed` with every tensor perturbed differently, recording the seed it came from."""
    shutil.copytree(seed, path)
    generator = torch.Generator().manual_seed(100 + index)
    tensors = {k: v + 0.1 * torch.randn(v.shape, generator=generator) for k, v in load_file(seed / WEIGHTS).items()}
    save_file(tensors, path / WEIGHTS, metadata={"format": "pt"})
    if seed_id == "inherit":
        seed_id = read_metadata(seed)["seed_id"]
    (path / "merge_xlstm.json").unlink()
    if seed_id is not None:
        write_metadata(path, {"kind": "expert", "seed_id": seed_id, "name": path.name})
    return path


@pytest.fixture(scope="module")
def experts(seed, tmp_path_factory) -> list[Path]:
    root = tmp_path_factory.mktemp("experts")
    return [make_expert(seed, root / name, i) for i, name in enumerate(["math", "code", "stem"])]


def run_merge(tmp_path: Path, recipe: dict, *overrides: str) -> int:
    path = tmp_path / "recipe.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(recipe))
    return cli(["merge", str(path), *(a for o in overrides for a in ("--set", o))])


def recipe_for(tmp_path: Path, method: str, experts: list[Path], weights: list[float], base: Path | None = None,
               **extra) -> dict:
    return {
        "method": method,
        **({"base": str(base)} if base else {}),
        "experts": [{"path": str(p), "weight": w} for p, w in zip(experts, weights)],
        "output": str(tmp_path / "merged"),
        **extra,
    }


def weights_of(path: Path) -> dict[str, torch.Tensor]:
    return load_file(path / WEIGHTS)


def assert_refused(capsys, code: int, *fragments: str) -> None:
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err, err
    line = err.strip().splitlines()[-1]  # earlier lines: progress bars of the fixtures' save_pretrained
    assert line.startswith("merge-xlstm: error: ") and err.count("merge-xlstm: error") == 1, err
    for fragment in fragments:
        assert fragment in line, err


def test_linear_is_the_normalised_convex_combination(tmp_path, seed, experts):
    weights = [2.0, 1.0, 1.0]  # normalised to .5 / .25 / .25
    assert run_merge(tmp_path, recipe_for(tmp_path, "linear", experts, weights, base=seed)) == 0
    merged, inputs = weights_of(tmp_path / "merged"), [weights_of(p) for p in experts]
    assert merged.keys() == inputs[0].keys()
    for name, tensor in merged.items():
        expected = sum(w / sum(weights) * sd[name] for w, sd in zip(weights, inputs))
        torch.testing.assert_close(tensor, expected, rtol=1e-6, atol=1e-6)
    record = read_metadata(tmp_path / "merged")
    assert record["kind"] == "merged" and record["seed_id"] == read_metadata(seed)["seed_id"]
    assert [e["provenance"]["name"] for e in record["experts"]] == ["math", "code", "stem"]
    card = (tmp_path / "merged" / "README.md").read_text()
    assert "normalised" in card and "method: linear" in card and "math" in card
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "config.json"):
        assert (tmp_path / "merged" / name).is_file(), name


def test_task_arithmetic_is_base_plus_scaled_task_vectors(tmp_path, seed, experts):
    weights = [0.5, 0.3, 0.2]
    recipe = recipe_for(tmp_path, "task_arithmetic", experts, weights, base=seed, parameters={"lambda": 0.7})
    assert run_merge(tmp_path, recipe) == 0
    merged, base, inputs = weights_of(tmp_path / "merged"), weights_of(seed), [weights_of(p) for p in experts]
    for name, tensor in merged.items():
        expected = base[name] + 0.7 * sum(w * (sd[name] - base[name]) for w, sd in zip(weights, inputs))
        torch.testing.assert_close(tensor, expected, rtol=1e-6, atol=1e-6)


def test_students_with_heterogeneous_blocks_merge_tensor_by_tensor(tmp_path):
    """Distil-xLSTM alternates sLSTM and mLSTM blocks: layer i's tensors differ from layer i+1's."""
    from transformers import AutoModelForCausalLM

    base = make_seed(tmp_path / "seed", kind="distil_xlstm", num_blocks=3, slstm_at=[0, 2])
    experts = [make_expert(base, tmp_path / name, i) for i, name in enumerate(["math", "code"])]
    assert run_merge(tmp_path, recipe_for(tmp_path, "task_arithmetic", experts, [0.6, 0.4], base=base)) == 0
    merged, theta0, inputs = weights_of(tmp_path / "merged"), weights_of(base), [weights_of(p) for p in experts]
    assert merged.keys() == theta0.keys()
    for name, tensor in merged.items():
        expected = theta0[name] + 0.6 * (inputs[0][name] - theta0[name]) + 0.4 * (inputs[1][name] - theta0[name])
        torch.testing.assert_close(tensor, expected, rtol=1e-6, atol=1e-6)
    assert type(AutoModelForCausalLM.from_pretrained(tmp_path / "merged")).__name__ == "DistilXLSTMForCausalLM"


@pytest.mark.parametrize("method", ["linear", "task_arithmetic"])
def test_one_expert_with_weight_one_is_the_identity(tmp_path, seed, experts, method):
    assert run_merge(tmp_path, recipe_for(tmp_path, method, experts[:1], [1.0], base=seed)) == 0
    merged, expert = weights_of(tmp_path / "merged"), weights_of(experts[0])
    for name in expert:
        torch.testing.assert_close(merged[name], expert[name], rtol=0, atol=1e-7)


@pytest.mark.parametrize("method", ["ties", "dare_ties", "dare_linear"])
def test_sparse_methods_make_a_model_that_loads_and_generates(tmp_path, seed, experts, method):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    recipe = recipe_for(tmp_path, method, experts, [0.5, 0.3, 0.2], base=seed,
                        parameters={"density": 0.5}, dtype="bfloat16")
    assert run_merge(tmp_path, recipe) == 0
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "merged")
    assert type(model).__name__ == "XLSTMHybridForCausalLM" and model.dtype == torch.bfloat16
    prompt = tokenizer("1 + 1 =", return_tensors="pt")
    out = model.generate(**prompt, max_new_tokens=4, do_sample=False, min_new_tokens=4)
    assert out.shape == (1, prompt["input_ids"].shape[1] + 4)
    assert isinstance(tokenizer.decode(out[0]), str)
    merged, base = weights_of(tmp_path / "merged"), weights_of(seed)
    assert any(not torch.equal(merged[n], base[n].bfloat16()) for n in base)


def test_every_method_maps_onto_mergekit_and_runs(tmp_path, seed, experts):
    from mergekit.merge_methods.base import BasePolicy

    from merge_xlstm.merge.methods import METHODS

    for name in METHODS:
        method = METHODS.get(name)
        assert {*method.parameters, *method.fixed} <= {p.name for p in method.spec.parameters}, name
        assert "weight" in {p.name for p in method.spec.parameters}, name
        assert method.needs_base == (name != "linear") == (method.spec.contract.base is BasePolicy.REQUIRED)
        out = tmp_path / name
        recipe = recipe_for(out, name, experts, [0.5, 0.3, 0.2], base=seed)
        assert run_merge(out, recipe) == 0, name
        assert weights_of(out / "merged").keys() == weights_of(seed).keys()


def test_dare_is_reproducible_from_the_recipe_seed(tmp_path, seed, experts):
    recipe = recipe_for(tmp_path, "dare_linear", experts, [0.5, 0.3, 0.2], base=seed, parameters={"density": 0.3})
    assert run_merge(tmp_path, recipe) == 0
    first = weights_of(tmp_path / "merged")
    assert run_merge(tmp_path, recipe, "overwrite=true") == 0
    assert all(torch.equal(t, weights_of(tmp_path / "merged")[n]) for n, t in first.items())


def _other_config(seed: Path, path: Path) -> None:
    _save_student(path, window_size=16)
    write_metadata(path, read_metadata(seed) | {"kind": "expert"})


def _other_shape(seed: Path, path: Path) -> None:
    make_expert(seed, path, 7)
    tensors = load_file(path / WEIGHTS)
    tensors["model.layers.1.mlp.up_proj.weight"] = tensors["model.layers.1.mlp.up_proj.weight"][:-1]
    save_file(tensors, path / WEIGHTS, metadata={"format": "pt"})


def _other_tokenizer(seed: Path, path: Path) -> None:
    make_expert(seed, path, 7)
    tokenizer = json.loads((path / "tokenizer.json").read_text())
    tokenizer["model"]["vocab"]["<extra>"] = 127
    (path / "tokenizer.json").write_text(json.dumps(tokenizer))


def _other_seed(seed: Path, path: Path) -> None:
    make_expert(seed, path, 7, seed_id="f" * 64)


@pytest.mark.parametrize(
    ("make_odd", "method", "fragment"),
    [
        (_other_config, "linear", "config field window_size is 16, expected 8"),
        (_other_shape, "linear", "tensor model.layers.1.mlp.up_proj.weight has shape [127, 64]"),
        (_other_tokenizer, "linear", "tokenizer file tokenizer.json differs"),
        (_other_seed, "linear", "trained from seed ffffffffffff"),
        (_other_seed, "task_arithmetic", "trained from seed ffffffffffff"),
        (lambda seed, path: make_expert(seed, path, 7, seed_id=None), "ties", "has no seed provenance"),
    ],
)
def test_mismatched_expert_is_refused_before_any_work(tmp_path, capsys, seed, experts, make_odd, method, fragment):
    odd = tmp_path / "odd"
    make_odd(seed, odd)
    code = run_merge(tmp_path, recipe_for(tmp_path, method, [experts[0], odd], [0.5, 0.5], base=seed))
    assert_refused(capsys, code, str(odd), fragment)
    assert not (tmp_path / "merged").exists()


def test_base_must_be_given_exist_and_be_the_seed(tmp_path, capsys, seed, experts):
    code = run_merge(tmp_path, recipe_for(tmp_path, "task_arithmetic", experts, [0.5, 0.3, 0.2]))
    assert_refused(capsys, code, "base:", "needs the shared stage-I seed")
    code = run_merge(tmp_path, recipe_for(tmp_path, "ties", experts, [1, 1, 1], base=tmp_path / "nowhere"))
    assert_refused(capsys, code, "base:", "no such model directory")
    code = run_merge(tmp_path, recipe_for(tmp_path, "ties", experts[1:], [1, 1], base=experts[0]))
    assert_refused(capsys, code, "is not a stage-I seed")
    assert not (tmp_path / "merged").exists()


@pytest.mark.parametrize(
    ("extra", "fragment"),
    [
        ({"method": "slurp"}, "unknown merge method 'slurp' (known: breadcrumbs,"),
        ({"parameters": {"lambda": 1.0}}, "method linear takes no parameter 'lambda' (known: none)"),
        ({"method": "ties", "parameters": {"dens1ty": 0.5}}, "(known: lambda, normalize, rescale, int8_mask, density)"),
        ({"method": "ties", "parameters": {"density": 1.5}}, "parameters.density: expected a value in (0, 1]"),
        ({"method": "ties", "parameters": {"normalize": 0.5}}, "expected true or false"),
        ({"method": "ties", "experts": [{"path": "?", "parameters": {"lambda": 2.0}}]}, "set it under parameters"),
    ],
)
def test_unknown_methods_and_parameters_are_refused(tmp_path, capsys, seed, experts, extra, fragment):
    recipe = recipe_for(tmp_path, "linear", experts[:1], [1.0], base=seed) | extra
    for expert in recipe["experts"]:  # parametrize cannot see fixtures: fill in the expert's path
        expert["path"] = str(experts[0])
    assert_refused(capsys, run_merge(tmp_path, recipe), fragment)


def test_duplicate_experts_and_an_output_over_an_input_are_refused(tmp_path, capsys, seed, experts):
    twice = recipe_for(tmp_path, "linear", [experts[0], experts[0]], [1, 1])
    assert_refused(capsys, run_merge(tmp_path, twice), "experts.1.path:", "listed twice")
    over_input = recipe_for(tmp_path, "linear", experts, [1, 1, 1], output=str(experts[1]), overwrite=True)
    assert_refused(capsys, run_merge(tmp_path, over_input), "output:", "would replace one of the merge's inputs")
    base_as_expert = recipe_for(tmp_path, "ties", [seed, experts[0]], [1, 1], base=seed)
    assert_refused(capsys, run_merge(tmp_path, base_as_expert), "experts.0.path:", "is the base")


def test_existing_output_is_refused_unless_overwrite(tmp_path, capsys, seed, experts):
    (tmp_path / "merged").mkdir()
    assert_refused(capsys, run_merge(tmp_path, recipe_for(tmp_path, "linear", experts, [1, 1, 1])), "already exists")
    assert run_merge(tmp_path, recipe_for(tmp_path, "linear", experts, [1, 1, 1], overwrite=True)) == 0
    assert (tmp_path / "merged" / WEIGHTS).is_file()


def test_interrupted_merge_leaves_no_output(tmp_path, monkeypatch, seed, experts):
    from mergekit.merge_methods.task_adapter import ExecuteMergeMethodTask

    calls = []
    real_execute = ExecuteMergeMethodTask.execute

    def execute_then_die(self, **kwargs):
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return real_execute(self, **kwargs)

    monkeypatch.setattr(ExecuteMergeMethodTask, "execute", execute_then_die)
    recipe = recipe_for(tmp_path / "out", "task_arithmetic", experts, [0.5, 0.3, 0.2], base=seed)  # output out/merged
    assert run_merge(tmp_path, recipe) == 130
    assert len(calls) == 5
    assert list((tmp_path / "out").iterdir()) == []  # neither out/merged nor a temporary sibling


def test_no_argument_merges_the_four_domain_experts(tmp_path, monkeypatch, seed):
    shutil.copytree(seed, tmp_path / "experts" / "seed")
    for i, name in enumerate(["math", "code", "stem", "chat"]):
        make_expert(seed, tmp_path / "experts" / name, i)
    (tmp_path / "recipes").mkdir()
    shutil.copy(REPO / "recipes" / "merge.yaml", tmp_path / "recipes" / "merge.yaml")
    monkeypatch.chdir(tmp_path)
    assert cli(["merge"]) == 0
    record = read_metadata(tmp_path / "experts" / "merged")
    assert [e["provenance"]["name"] for e in record["experts"]] == ["math", "code", "stem", "chat"]
    assert [e["effective_weight"] for e in record["experts"]] == pytest.approx([0.35, 0.35, 0.20, 0.10])
