"""Training in several processes: ``--gpus N`` -> torchrun -> fastai's distrib_ctx; rank 0 alone writes.

The fast tests check the launch mapping (``--gpus 2`` builds torchrun's command, ``--gpus 1`` trains in this
process) and the rank-0 guard with two real gloo processes started by torchrun.  The slow test trains for
real in 2 CPU processes through the CLI and converts and gates what they exported.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("fastai", reason="training needs fastai (pip install 'kimchi-edge[train]')")

from kimchi_edge.runtime.errors import DataError
from kimchi_edge.train.cli import train_argv
from kimchi_edge.train.distributed import (
    World,
    alone,
    launch_command,
    share_from_rank0,
    world,
)

from kimchi_edge.cli import build_parser, main

REPO = Path(__file__).resolve().parents[2]


def parse(argv: list[str]):
    return build_parser().parse_args(["train", *argv])


# --------------------------------------------------------------------------- the launch path


def test_gpus_2_builds_the_torchrun_command(tmp_path):
    args = parse([str(tmp_path / "데이터 data"), "--out", str(tmp_path / "run"), "--arch", "efficientnet_lite0", "--bs", "16",
                  "--no-flip", "--no-lr-find", "--lr", "0.01", "--gpus", "2", "--device", "cpu", "-q"])
    argv = train_argv(args)
    assert "--gpus" not in argv  # the workers run in-process: torchrun's WORLD_SIZE tells them
    assert argv[0] == str(tmp_path / "데이터 data") and "--quiet" in argv and "--no-flip" in argv
    assert vars(parse(argv)) == {**vars(args), "gpus": 1}  # the same run, option for option
    cmd = launch_command(argv, 2, python="/venv/python")
    assert cmd == ["/venv/python", "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                   "-m", "kimchi_edge", "train", *argv]


def test_gpus_2_runs_torchrun_with_threads_per_process(tmp_path, monkeypatch):
    from kimchi_edge.train import api, distributed

    calls = []

    def fake_run(cmd, env, check):
        calls.append((cmd, env))
        return subprocess.CompletedProcess(cmd, 3)

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setattr(distributed.subprocess, "run", fake_run)
    monkeypatch.setattr(api, "train", lambda *a, **k: pytest.fail("--gpus 2 must not train in the launching process"))
    rc = main(["train", str(tmp_path), "--out", str(tmp_path / "run"), "--gpus", "2", "--device", "cpu", "--threads", "1", "-q"])
    assert rc == 3  # torchrun's exit status is the command's
    ((cmd, env),) = calls
    assert cmd[1:5] == ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]
    assert cmd[cmd.index("kimchi_edge") + 1:] == ["train", str(tmp_path), "--out", str(tmp_path / "run"), "--device", "cpu",
                                                  "--threads", "1", "--quiet"]
    assert env["OMP_NUM_THREADS"] == "1"


def test_gpus_1_trains_in_this_process(tmp_path, monkeypatch):
    from kimchi_edge.train import api, distributed

    configs = []
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setattr(distributed.subprocess, "run", lambda *a, **k: pytest.fail("--gpus 1 must not launch torchrun"))
    monkeypatch.setattr(api, "train", lambda config, log=None: configs.append(config))  # returns None: nothing to print
    assert main(["train", str(tmp_path), "--out", str(tmp_path / "run"), "--gpus", "1", "-q"]) == 0
    assert len(configs) == 1 and configs[0].out == tmp_path / "run"


def test_under_a_launcher_gpus_does_not_launch_again(tmp_path, monkeypatch, capsys):
    """Started by torchrun (WORLD_SIZE set) the process trains; a rank other than 0 prints nothing, even an error."""
    from kimchi_edge.train import api, distributed

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setattr(distributed.subprocess, "run", lambda *a, **k: pytest.fail("a worker must not launch torchrun"))

    def failing(config, log=None):
        raise DataError("class folder x has no images")

    monkeypatch.setattr(api, "train", failing)
    assert main(["train", str(tmp_path), "--gpus", "2"]) == 2
    assert capsys.readouterr() == ("", "")  # rank 0 says it, once
    monkeypatch.setenv("RANK", "0")
    assert main(["train", str(tmp_path), "--gpus", "2"]) == 2
    assert "class folder x has no images" in capsys.readouterr().err


def test_gpus_without_gpus_names_the_cpu_way(tmp_path, monkeypatch, capsys):
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA GPU: the refusal is for machines without enough of them")
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert main(["train", str(tmp_path), "--out", str(tmp_path / "run"), "--gpus", "2"]) == 2
    err = capsys.readouterr().err
    assert "--gpus 2 but torch sees 0 CUDA GPU(s)" in err and "--device cpu" in err
    assert not (tmp_path / "run").exists()


# --------------------------------------------------------------------------- the rank-0 guard


def test_world_reads_the_launchers_environment():
    assert world({}) == World(0, 1, 0, 1) and not world({}).distributed
    w = world({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"})
    assert (w.rank, w.size, w.local_rank, w.local_size, w.distributed, w.is_rank0) == (3, 4, 1, 2, True, False)


def test_alone_makes_fastai_see_one_process_and_restores(monkeypatch):
    from fastai.torch_core import num_distrib, rank_distrib

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    with alone():
        assert (num_distrib(), rank_distrib()) == (1, 0)
    assert (num_distrib(), os.environ["RANK"]) == (2, "0")
    assert share_from_rank0(World(), lambda: 42) == 42  # one process: just the call


WORKER = r'''
import json, os, sys
from kimchi_edge.runtime.errors import DataError
from kimchi_edge.train.distributed import RankZeroFailed, init_process_group, leave, share_from_rank0, world

w = world()
out = {"rank": w.rank, "size": w.size, "backend": init_process_group(w, cuda=False), "calls": 0}

def screen():
    out["calls"] += 1
    out["world_size_inside"] = os.environ["WORLD_SIZE"]
    return {"classes": ["배추김치", "Pa Kimchi"]}

out["shared"] = share_from_rank0(w, screen)

def fail():
    raise DataError("a single class")

try:
    share_from_rank0(w, fail)
except RankZeroFailed as exc:
    out["error"] = ["RankZeroFailed", exc.exit_code]
except DataError as exc:
    out["error"] = ["DataError", exc.exit_code]
with open(os.path.join(sys.argv[1], f"rank{w.rank}.json"), "w", encoding="utf-8") as f:
    json.dump(out, f, ensure_ascii=False)
# as train.api does: leave the group before exiting (a live gloo group torn down at interpreter exit aborts now and
# then: 'terminate called without an active exception', exit -6)
leave(w)
'''


def test_rank0_alone_runs_the_shared_step_with_two_gloo_processes(tmp_path):
    """Two real processes under torchrun (gloo): the step runs once, on rank 0; its result or error reaches rank 1."""
    pytest.importorskip("torch")
    script = tmp_path / "worker.py"
    script.write_text(WORKER, encoding="utf-8")
    proc = subprocess.run([sys.executable, *launch_command([], 2)[1:4], "--nproc-per-node=2", str(script), str(tmp_path)],
                          capture_output=True, text=True, timeout=300, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text(encoding="utf-8")) for r in (0, 1))
    assert (r0["size"], r0["backend"], r1["backend"]) == (2, "gloo", "gloo")
    assert (r0["calls"], r1["calls"]) == (1, 0)  # rank 1 never screened
    assert r0["world_size_inside"] == "1"  # fastai saw one process while rank 0 worked alone
    assert r0["shared"] == r1["shared"] == {"classes": ["배추김치", "Pa Kimchi"]}
    assert r0["error"] == ["DataError", 2] and r1["error"] == ["RankZeroFailed", 2]


# --------------------------------------------------------------------------- a real 2-process run


@pytest.fixture(scope="module")
def two_process_run(kimchi_tree, tmp_path_factory):
    """``kimchi-edge train --gpus 2 --device cpu``: torchrun, 2 CPU processes (gloo), 1 thread each; lr_find included."""
    out = tmp_path_factory.mktemp("ddp") / "run"
    args = ["train", str(kimchi_tree), "--out", str(out), "--arch", "efficientnet_lite0", "--item-size", "40", "--size", "32",
            "--no-flip", "--epochs", "1", "--freeze-epochs", "1", "--bs", "16", "--lr-find-iters", "10", "--test-pct", "0.2",
            "--gpus", "2", "--device", "cpu", "--threads", "1"]
    env = {**os.environ, "PYTHONIOENCODING": "utf-8"}
    env.pop("WORLD_SIZE", None)
    proc = subprocess.run([sys.executable, "-m", "kimchi_edge", *args], capture_output=True, text=True, encoding="utf-8",
                          timeout=900, cwd=REPO, env=env, check=False)
    return out, proc


@pytest.mark.slow
def test_two_cpu_processes_train_and_rank0_alone_writes_the_run_folder(two_process_run):
    out, proc = two_process_run
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and "Warning" not in proc.stderr, proc.stderr[-3000:]
    log = proc.stdout
    assert "torch.distributed.run --standalone --nproc-per-node=2" in log
    assert log.count("distributed: world size 2 (2 on this machine, gloo)") == 1
    for line in ("data: 90 images in 3 classes", "lr_find: 10 iterations in", "epoch 0 (1/2) frozen", "epoch 1 (2/2) unfrozen",
                 "Next: `kimchi-edge convert"):
        assert log.count(line) == 1, (line, log)  # rank 1 printed nothing
    assert "batch 16 per process (32 in all)" in log
    # one folder, complete, renamed into place: no partial or old folders of either rank beside it
    assert [p.name for p in out.parent.iterdir()] == ["run"]
    for name in ("learner.pkl", "model_meta.json", "split.json", "summary.md", "reports/metrics.json", "reports/lr_find.png",
                 "reports/history.json", "reports/confusion_matrix.png"):
        assert (out / name).is_file(), name
    assert not (out / "models").exists()  # the best-epoch checkpoint the ranks shared is gone
    metrics = json.loads((out / "reports" / "metrics.json").read_text(encoding="utf-8"))
    assert metrics["device"].endswith("2 processes (gloo)")
    assert metrics["lr_find"]["iterations"] == 10 and metrics["epochs_run"] == 2
    split = json.loads((out / "split.json").read_text(encoding="utf-8"))
    assert len(split["train"]) + len(split["valid"]) + len(split["test"]) == 90  # every image once, screened once
    assert {e["file"] for e in split["excluded"]} == {"배추김치/broken.jpg", "오이 소박이/notes.jpg"}


@pytest.mark.slow
def test_learner_from_two_processes_converts_and_passes_the_gate(two_process_run, tmp_path):
    out, proc = two_process_run
    assert proc.returncode == 0, proc.stderr[-3000:]
    pytest.importorskip("onnx", reason="converting needs onnx (pip install 'kimchi-edge[convert]')")
    from kimchi_edge.convert.bundle import bundle_from_run

    built = bundle_from_run(out, tmp_path / "bundle", int8=False, torchscript=False, ort=False, quiet=True, log=lambda m: None)
    assert built.gate is not None and built.gate.passed
    fp32 = built.gate.result("onnx-fp32")
    assert fp32.status == "pass" and fp32.metrics["n"] == 18
    assert list(built.manifest.model.labels) == sorted(["배추김치", "오이 소박이", "Pa Kimchi"])


@pytest.mark.gpu
def test_two_gpus_train_with_nccl(kimchi_tree, tmp_path):
    torch = pytest.importorskip("torch")
    if torch.cuda.device_count() < 2:
        pytest.skip(f"needs 2 CUDA GPUs (NCCL, one process per GPU); torch sees {torch.cuda.device_count()}")
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "kimchi_edge", "train", str(kimchi_tree), "--out", str(out),
                           "--arch", "efficientnet_lite0", "--item-size", "40", "--size", "32", "--no-flip", "--epochs", "1",
                           "--bs", "16", "--no-lr-find", "--lr", "1e-2", "--gpus", "2", "--device", "cuda", "-q"],
                          capture_output=True, text=True, timeout=900, cwd=REPO, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((out / "reports" / "metrics.json").read_text(encoding="utf-8"))
    assert metrics["device"].startswith("cuda") and metrics["device"].endswith("2 processes (nccl)")
    assert [p.name for p in out.parent.iterdir()] == ["run"]
