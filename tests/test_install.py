"""torch and torchvision that do not belong together are one sentence naming what to reinstall."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torchvision
from click.testing import CliRunner

from kdsweep.cli import main
from kdsweep.core import install


@pytest.mark.parametrize("torch_v, torch_cuda, vision_v, vision_cuda, expected", [
    ("2.14.1+cu130", "13.0", "0.29.1+cu130", 13000, None),
    ("2.13.0+cpu", None, "0.28.0+cpu", -1, None),
    ("2.13.0", "12.6", "0.28.0", 12060, None),
    ("2.13.0+cpu", None, "0.28.0+cu126", 12060, "torch 2.13.0+cpu is a CPU build but torchvision 0.28.0+cu126 a CUDA 12.6 build"),
    ("2.13.0+cu126", "12.6", "0.28.0", 12080, "a CUDA 12.6 build but torchvision 0.28.0 a CUDA 12.8 build"),
    ("2.13.0", None, "0.29.1", -1, "are not a pair (torch 2.13 goes with torchvision 0.28)"),
])
def test_a_pair_that_does_not_belong_together_is_named(torch_v: str, torch_cuda: object, vision_v: str,
                                                       vision_cuda: object, expected: str | None) -> None:
    sentence = install.mismatch(torch_v, torch_cuda, vision_v, vision_cuda)
    if expected is None:
        assert sentence is None
        return
    assert expected in sentence, sentence
    assert "pip install --force-reinstall" in sentence and sentence.endswith(".")


def test_a_torchvision_that_does_not_load_is_one_sentence() -> None:
    def broken(name: str):
        if name == "torchvision":
            raise RuntimeError("operator torchvision::nms does not exist\n(a long traceback)")
        return torch

    with pytest.raises(install.InstallError, match=r"^torchvision does not load beside torch .*"
                                                   r"operator torchvision::nms does not exist\); reinstall"):
        install.check(broken)


def test_train_refuses_a_mixed_install_before_anything_else(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A CPU torchvision beside this torch (faked): exit 1, one sentence, no traceback."""
    monkeypatch.setattr(torchvision.version, "cuda", -1 if torch.version.cuda else 12060)
    config = tmp_path / "c.yaml"
    config.write_text("config:\n  data: {dataset: 'npz:/nonexistent.npz'}\n  model: {arch: mlp}\n  epochs: 1\n")
    result = CliRunner().invoke(main, ["train", "--config", str(config)], prog_name="kdsweep")
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    errors = [line for line in result.output.splitlines() if line.startswith("Error: ")]
    assert len(errors) == 1 and "build; reinstall both from one place" in errors[0], result.output
