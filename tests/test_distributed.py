"""Several processes on CPU (gloo): `linearize` under DDP and FSDP2 against one process, FSDP resume, and
`run` starting its training steps through a multi-process launch command.

accelerate turns FSDP on for GPUs only, so the FSDP runs here take accelerate's own FSDP2 preparation and
force it onto CPU processes (the driver below sets the accelerator's distributed type); everything after
`accelerator.prepare` is the code a GPU run executes. torchrun starts the processes, as `accelerate
launch` does on GPUs (on CPU it would start one process).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from test_linearize_e2e import write_teacher_and_corpora

import merge_xlstm.mission.run as run_module
from merge_xlstm.cli import main as cli
from merge_xlstm.linearize.pipeline import linearize
from merge_xlstm.provenance import read_metadata
from merge_xlstm.recipe import load_linearize_recipe

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
DRIVER = """
import os, signal, sys
import merge_xlstm.linearize.pipeline as pipeline
import merge_xlstm.linearize.stage1 as stage1
import merge_xlstm.linearize.stage2 as stage2
import merge_xlstm.linearize.training as training
from merge_xlstm.linearize.sharding import is_sharded

if os.environ.get("FORCE_FSDP2") == "1":
    from accelerate import Accelerator, PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    def make_accelerator(device, precision):
        accelerator = Accelerator(cpu=True)
        # both shared states: accelerate copies the partial state into the accelerator state when re-created
        PartialState().distributed_type = accelerator.state.distributed_type = DistributedType.FSDP
        accelerator.state.fsdp_plugin = FullyShardedDataParallelPlugin(fsdp_version=2, auto_wrap_policy="no_wrap")
        return accelerator

    pipeline.make_accelerator = make_accelerator

real_loop = training.train_loop

def train_loop(**kwargs):  # say whether the parameters being trained are FSDP shards
    kwargs["accelerator"].print(f"{kwargs['stage']} sharded={is_sharded(kwargs['accelerator'].unwrap_model(kwargs['model']))}")
    return real_loop(**kwargs)

stage1.train_loop = stage2.train_loop = train_loop
if os.environ.get("KILL_AFTER_SAVE"):
    real_save = training.Checkpoint.save

    def save(self, params, optimizer, step):
        real_save(self, params, optimizer, step)
        if self.directory.name == "stage2" and step == int(os.environ["KILL_AFTER_SAVE"]):
            os.kill(os.getpid(), signal.SIGKILL)

    training.Checkpoint.save = save
from merge_xlstm.cli import main
sys.exit(main(["linearize", sys.argv[1]]))
"""


def write_recipe(root: Path, name: str) -> Path:
    if not (root / "teacher").is_dir():  # tied embeddings, as SmolLM2, Llama-3.2-1B and Qwen2-0.5B have
        write_teacher_and_corpora(root, tie_word_embeddings=True)
    recipe = {
        "name": name, "teacher": str(root / "teacher"),
        "student": {"kind": "hybrid", "mixer": "hybrid", "window_size": 16, "num_sink_tokens": 2},
        "data": {"sources": [{"path": str(root / "code.jsonl")}], "seq_len": 64},
        "stage1": {"tokens": 64 * 4 * 4, "batch_size": 4, "micro_batch_size": 2, "warmup_steps": 1, "log_every": 1},
        "stage2": {"tokens": 64 * 4 * 6, "batch_size": 4, "micro_batch_size": 2, "lr": 1e-3, "warmup_steps": 1,
                   "top_k": 8, "log_every": 1, "save_every": 2},
        "seed": str(root / name / "seed"), "output": str(root / name / "expert"),
    }
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def torchrun(recipe: Path, **env: str) -> subprocess.CompletedProcess[str]:
    """Two processes run the driver (written beside the recipes) on `recipe`."""
    return subprocess.run([*TORCHRUN, str(recipe.parent / "driver.py"), str(recipe)], env={**os.environ, **env},
                          capture_output=True, text=True, timeout=600, check=False)


def losses(expert: Path) -> dict[str, list[float]]:
    rows = [json.loads(line) for line in (expert / "metrics.jsonl").read_text().splitlines()]
    return {stage: [r["loss"] for r in rows if r["stage"] == stage] for stage in ("stage1", "stage2")}


@pytest.fixture(scope="module")
def single(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("distributed")
    (root / "driver.py").write_text(DRIVER)
    return linearize(load_linearize_recipe(write_recipe(root, "single")), device="cpu")


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_ddp_and_fsdp_follow_the_single_process_loss_curve(single, mode):
    recipe = write_recipe(single.parents[1], mode)
    result = torchrun(recipe, **({"FORCE_FSDP2": "1"} if mode == "fsdp" else {}))
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"stage1 sharded={mode == 'fsdp'}" in result.stdout and f"stage2 sharded={mode == 'fsdp'}" in result.stdout
    expert = Path(load_linearize_recipe(recipe).output)
    reference, curves = losses(single), losses(expert)
    assert len(curves["stage1"]) == 4 and len(curves["stage2"]) == 6
    for stage in ("stage1", "stage2"):
        assert curves[stage] == pytest.approx(reference[stage], rel=1e-4), stage
    # Each process's micro-batches weigh their tokens a little differently from one process's (means of
    # means, stage II), and Adam turns that into lr-sized moves: the runs agree to a small share of their
    # training, in the validation metrics (0.5 %) as in the weights (5 % of the distance trained).
    ours, theirs = read_metadata(expert)["validation"], read_metadata(single)["validation"]
    for metric in ("student_ce", "top8_kl"):
        assert ours[metric] == pytest.approx(theirs[metric], rel=5e-3), metric
    a, b = load_file(single / "model.safetensors"), load_file(expert / "model.safetensors")
    seed = load_file(single.parent / "seed" / "model.safetensors")
    assert a.keys() == b.keys()
    apart = sum(float((a[k] - b[k]).pow(2).sum()) for k in a) ** 0.5
    moved = sum(float((a[k] - seed[k]).pow(2).sum()) for k in a) ** 0.5
    print(f"{mode}: |ours - single| / |single - seed| = {apart / moved:.4f}")
    assert apart < 0.05 * moved
    assert read_metadata(expert)["seed_id"] == read_metadata(expert.parent / "seed")["seed_id"]


def test_fsdp_run_killed_after_a_checkpoint_resumes_to_the_same_expert(single):
    unbroken = write_recipe(single.parents[1], "fsdp-unbroken")
    assert torchrun(unbroken, FORCE_FSDP2="1").returncode == 0
    broken = write_recipe(single.parents[1], "fsdp-broken")
    killed = torchrun(broken, FORCE_FSDP2="1", KILL_AFTER_SAVE="4")
    assert killed.returncode != 0
    partial = Path(load_linearize_recipe(broken).output + ".partial")
    assert json.loads((partial / "stage2" / "checkpoint" / "state.json").read_text())["step"] == 4
    resumed = torchrun(broken, FORCE_FSDP2="1")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "stage2: resuming at step 4/6" in resumed.stdout + resumed.stderr
    a = load_file(Path(load_linearize_recipe(unbroken).output) / "model.safetensors")
    b = load_file(Path(load_linearize_recipe(broken).output) / "model.safetensors")
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_run_starts_training_steps_through_the_launch_command(single, tmp_path, monkeypatch, capsys):
    """launcher accelerate: the seed is one worker over both (pretend) GPUs; --stop-after then ends the call."""
    recipe = yaml.safe_load(write_recipe(single.parents[1], "launched").read_text())
    recipe.update(seed=str(tmp_path / "experts" / "seed"), output=str(tmp_path / "experts" / "code"))
    (tmp_path / "code.yaml").write_text(yaml.safe_dump(recipe))
    pipeline = {"name": "launched", "domains": ["code.yaml"], "launcher": "accelerate",
                "launch_command": TORCHRUN, "eval": {"suites": ["ci"], "limit": 1}}
    (tmp_path / "pipeline.yaml").write_text(yaml.safe_dump(pipeline))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(run_module, "visible_gpus", lambda: ["0", "1"])
    assert cli(["run", "pipeline.yaml", "--stop-after", "0.05"]) == run_module.STOPPED
    out = capsys.readouterr().out
    assert "seed: started on GPU 0,1" in out and "torch.distributed.run --standalone --nproc_per_node 2 -m merge_xlstm" in out
    assert "seed: finished in" in out and "step(s) left; run the same command again" in out
    assert read_metadata(tmp_path / "experts" / "seed")["kind"] == "seed"
    log = (tmp_path / "experts" / ".run" / "logs" / "seed.log").read_text()
    assert "stage1" in log


@pytest.mark.parametrize("name", ["ddp", "fsdp"])
def test_shipped_accelerate_configs_launch_what_they_say(name, monkeypatch):
    """configs/accelerate/*.yaml as `accelerate launch` reads them: 2 processes, bf16, FSDP2 root-only sharding."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils import FullyShardedDataParallelPlugin
    from accelerate.utils.launch import prepare_multi_gpu_env

    config = Path(__file__).resolve().parents[1] / "configs" / "accelerate" / f"{name}.yaml"
    args = launch_command_parser().parse_args(["--config_file", str(config), "-m", "merge_xlstm", "linearize", "r.yaml"])
    args = _validate_launch_command(args)[0]
    env = prepare_multi_gpu_env(args)
    assert args.num_processes == 2 and env["ACCELERATE_MIXED_PRECISION"] == "bf16"
    assert (env.get("ACCELERATE_USE_FSDP") == "true") == (name == "fsdp") and args.multi_gpu == (name == "ddp")
    if name == "fsdp":
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        plugin = FullyShardedDataParallelPlugin()
        assert plugin.fsdp_version == 2 and plugin.auto_wrap_policy is None and plugin.reshard_after_forward is True
