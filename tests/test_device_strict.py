"""Device-strict mode: every command with the model on the CPU and `torch.set_default_device("meta")`.

A tensor the library creates without `device=` then lands on the meta device and fails loudly
the moment it meets real data, which on a GPU would be a CPU tensor meeting CUDA ones (a crash
there), and, handed to a C kernel, used to be a segmentation fault here.
"""

import dataclasses

import pytest
import torch

from selfablate import SelfAblatingTransformer
from selfablate.cli import main
from selfablate.config import get_preset
from selfablate.train import autocast_for, make_optimizer, train_step


@pytest.fixture
def device_strict():
    torch.set_default_device("meta")
    try:
        yield
    finally:
        torch.set_default_device(None)


@pytest.mark.parametrize("backend", ["cpu", "torch"])
@pytest.mark.parametrize("ablation", ["none", "local", "global"])
def test_a_training_step(ablation, backend, set_backend):
    set_backend(backend)
    model_cfg, tr = get_preset("tiny")
    with torch.device("cpu"):
        model = SelfAblatingTransformer(dataclasses.replace(model_cfg, ablation=ablation))
    opt = make_optimizer(model, tr)
    x = torch.randint(0, model_cfg.vocab_size, (4, 32), device="cpu")
    cpu = torch.device("cpu")
    torch.set_default_device("meta")
    try:
        m = train_step(model, opt, (x, x), 0, tr, cpu, autocast_for(cpu, "float32")).read()
    finally:
        torch.set_default_device(None)
    assert 5 < m.loss < 20 and 0 < m.grad_norm < 100


@pytest.mark.slow
def test_every_command(tmp_path, stories_dir, device_strict, capsys):
    """reproduce (train, evaluate with localisation, circuits with ACDC, EAP and EAP-IG, an SAE,
    the report), then generate and eval-loss on its models."""
    out = tmp_path / "grid"
    code = main(["reproduce", "--preset", "tiny", "--data", str(stories_dir), "--out", str(out),
                 "--ablations", "local", "--ks", "2", "--max-steps", "6", "--eval-max-tokens", "2048",
                 "--circuit-prompts", "4", "--tau-sweep", "0.01", "--sae-steps", "10",
                 "--sae-eval-tokens", "1024", "--no-progress"])
    assert code == 0, capsys.readouterr().err
    run = out / "models" / "local-k2-s0"
    assert main(["generate", str(run), "--max-new-tokens", "5", "--stream", "ablated", "--show-units"]) == 0
    assert main(["eval-loss", str(run), "--data", str(stories_dir), "--max-batches", "2", "--json"]) == 0
    err = capsys.readouterr().err
    assert "Traceback" not in err and "error" not in err, err
