"""Device-strict mode (the `device_strict` fixture): every command with the model on the CPU and
`torch.set_default_device("meta")`.

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


def test_generate_and_eval_loss(tiny_runs, stories_dir, device_strict, capsys):
    """The commands `reproduce` does not run (its stages and report run device-strict in
    test_reproduce)."""
    run = tiny_runs["local"]
    assert main(["generate", str(run), "--max-new-tokens", "5", "--stream", "ablated", "--show-units"]) == 0
    assert main(["eval-loss", str(run), "--data", str(stories_dir), "--max-batches", "2", "--json"]) == 0
    err = capsys.readouterr().err
    assert "Traceback" not in err and "error" not in err, err
