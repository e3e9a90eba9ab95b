"""The q2 `paper` preset end to end on the CPU, offline: a tiny fake CIFAR-10 in torchvision's
on-disk format and fake ImageNet weights in the torch hub cache. Proves that with ImageNet
weights both networks (the ResNet-50 teacher, trained and asked for logits, and the ResNet-18
student) are fed ImageNet's mean/std, never the training split's.

torchvision checks the MD5 of CIFAR-10's files (a fake cannot match), so the launch and its
workers get a `sitecustomize` that skips that check and logs, for every ResNet forward pass,
the architecture and the normalisation of the batch it was given. torch.hub checks a weights
file's hash only when it downloads it (`load_state_dict_from_url`: `check_hash` is applied in
`download_url_to_file`); a file already in TORCH_HOME/hub/checkpoints is loaded as it is.
"""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import optuna
import pytest
import torch
from torchvision.models import ResNet18_Weights, ResNet50_Weights, resnet18, resnet50

REPO = Path(__file__).resolve().parent.parent
IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]

SITECUSTOMIZE = '''
import json, os
if os.environ.get("KDSWEEP_TEST_NORM_LOG"):
    import torchvision.datasets.cifar as cifar
    cifar.check_integrity = lambda *args, **kwargs: True  # fake files cannot match CIFAR's MD5s
    from torchvision.models.resnet import Bottleneck, ResNet
    import kdsweep.core.data as data
    last = {}
    to_input = data.to_input
    def logged_to_input(x, mean, std, *args, **kwargs):
        last["norm"] = [[float(v) for v in mean], [float(v) for v in std]]  # floats or device tensors
        return to_input(x, mean, std, *args, **kwargs)
    data.to_input = logged_to_input
    forward = ResNet.forward
    def logged_forward(self, x):
        if not x.is_meta:  # parameter and FLOP counts run on the meta device
            arch = "resnet50" if isinstance(self.layer1[0], Bottleneck) else "resnet18"
            with open(os.environ["KDSWEEP_TEST_NORM_LOG"], "a") as f:
                f.write(json.dumps([arch, last.get("norm")]) + "\\n")
        return forward(self, x)
    ResNet.forward = logged_forward
'''


def fake_cifar10(root: Path, per_batch: int = 20, n_test: int = 20) -> None:
    """cifar-10-batches-py as torchvision reads it: pickled dicts of uint8 rows and labels."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)

    def batch(n: int) -> dict:
        labels = rng.integers(0, 10, n)
        images = rng.integers(0, 64, (n, 3, 32, 32)) + (labels * 19)[:, None, None, None]
        return {"data": images.reshape(n, -1).astype(np.uint8), "labels": labels.tolist()}

    for i in range(1, 6):
        (folder / f"data_batch_{i}").write_bytes(pickle.dumps(batch(per_batch)))
    (folder / "test_batch").write_bytes(pickle.dumps(batch(n_test)))
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": names}))


def fake_hub_weights(torch_home: Path) -> None:
    """Randomly initialised torchvision ResNets saved under the ImageNet weights' file names."""
    checkpoints = torch_home / "hub" / "checkpoints"
    checkpoints.mkdir(parents=True)
    for build, weights in ((resnet18, ResNet18_Weights.IMAGENET1K_V1), (resnet50, ResNet50_Weights.IMAGENET1K_V2)):
        torch.save(build().state_dict(), checkpoints / weights.url.rsplit("/", 1)[-1])


@pytest.mark.slow
def test_paper_preset_feeds_imagenet_statistics_to_teacher_and_student(tmp_path: Path) -> None:
    fake_cifar10(tmp_path / "data")
    fake_hub_weights(tmp_path / "torch")
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "sitecustomize.py").write_text(SITECUSTOMIZE)
    log = tmp_path / "norm.jsonl"
    env = {**os.environ, "PYTHONPATH": f"{tmp_path / 'site'}{os.pathsep}{REPO}", "TORCH_HOME": str(tmp_path / "torch"),
           "KDSWEEP_CACHE": str(tmp_path / "cache"), "KDSWEEP_TEST_NORM_LOG": str(log), "OMP_NUM_THREADS": "1"}
    url = f"sqlite:///{tmp_path / 'paper.db'}"
    shrink = ["data.val_size=40", "data.train_subset=60", "data.test_subset=20", "data.image_size=32",
              "data.pad=0", "epochs=1", "batch_size=30", "kd.teacher_epochs=1"]
    cmd = [sys.executable, "-m", "kdsweep", "launch", "q2", "--preset", "paper", "--force", "--device", "cpu",
           "-n", "1", "-w", "1", "--storage", url, "--data", str(tmp_path / "data"), "--no-tensorboard"]
    for item in shrink:
        cmd += ["--set", item]
    done = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    calls = [json.loads(line) for line in log.read_text().splitlines()]
    archs = {arch for arch, _ in calls}
    assert archs == {"resnet18", "resnet50"}, archs  # the teacher (probe and logits) and the student
    for arch, norm in calls:
        assert norm is not None and norm[0] == pytest.approx(IMAGENET_MEAN) and norm[1] == pytest.approx(IMAGENET_STD), (arch, norm)

    header = "\n".join(line for line in done.stdout.splitlines() if line.startswith(("data:", "teacher:")))
    assert "normalisation imagenet mean 0.485/0.456/0.406 std 0.229/0.224/0.225" in header, header
    assert "teacher: resnet50" in header and "weights imagenet, linear probe" in header, header

    study = optuna.load_study(study_name="q2", storage=url)
    trials = study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))
    assert trials and trials[0].params["kd.alpha"] > 0 and "teacher_key" in trials[0].user_attrs
    data = trials[0].user_attrs["config"]["data"]
    assert data["normalize"] == "imagenet" and data["mean"] == pytest.approx(IMAGENET_MEAN)
    assert study.user_attrs["kdsweep.definition"]["config"]["data"]["normalize"] == "imagenet"
