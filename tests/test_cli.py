"""The command line: generated flags, commands end to end, one-line errors."""

import os
import subprocess
import sys

import pytest
import torch

from selfablate.cli import main, make_parser

from .helpers import ONE_BACKEND

pytestmark = pytest.mark.usefixtures("backend")  # each test on both backends (conftest)


def run(capsys, *argv):
    try:
        code = main([str(a) for a in argv])
    except SystemExit as e:  # argparse's own errors
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture(scope="module")
def trained(tmp_path_factory, stories_dir):
    out = tmp_path_factory.mktemp("cli") / "run"
    code = main(["train", "--preset", "tiny", "--data", str(stories_dir), "--out", str(out), "--max-steps", "4",
                 "--no-progress", "--ablation", "global", "--k-attn", "6"])
    assert code == 0
    return out


def test_flags_come_from_the_dataclasses():
    p = make_parser()
    ns = p.parse_args(["train", "--k-attn", "3", "--ablation", "both", "--no-progress", "--lr", "0.01"])
    assert (ns.k_attn, ns.ablation, ns.progress, ns.lr) == (3, "both", False, 0.01)
    assert not hasattr(ns, "d_model")  # unset flags leave the preset's value alone
    help_text = p._subparsers._group_actions[0].choices["train"].format_help()
    assert "Attention units kept per layer and token (1..d_model)" in help_text


def test_train_applies_flags_over_the_preset(trained, capsys):
    code, out, _ = run(capsys, "info", trained)
    assert code == 0
    assert "ablation=global" in out and "k_attn=6" in out and "d_model=32" in out and "step: 4" in out


@ONE_BACKEND
def test_eval_loss_over_a_whole_split(trained, stories_dir, capsys):
    code, out, _ = run(capsys, "eval-loss", trained, "--data", stories_dir, "--json")
    assert code == 0
    import json

    result = json.loads(out)
    assert result["clean"] > 0 and result["ablated"] > 0
    from selfablate.data.dataset import TokenWindows, tokenize_split
    from selfablate.data.sources import resolve_source

    windows = TokenWindows(tokenize_split(resolve_source(str(stories_dir)), "valid", progress=False), 32)
    assert result["tokens"] == windows.num_sequential() * 32 > 1000  # every window of the split


def test_generate_shows_units_of_each_token(trained, capsys):
    code, out, _ = run(capsys, "generate", trained, "--max-new-tokens", "3", "--stream", "ablated",
                       "--show-units", "--temperature", "0")
    assert code == 0
    lines = out.strip().splitlines()
    assert lines[0].startswith("Once upon a time")
    unit_lines = [l for l in lines if " L0 a[" in l]
    assert len(unit_lines) == 3 and "L1 a[" in unit_lines[0] and ",+" in unit_lines[0]


@pytest.mark.parametrize("argv,msg", [
    (["train", "--preset", "huge"], "unknown preset 'huge'; choose one of paper, cpu-small, tiny"),
    (["train", "--k-mlp", "0"], "k_mlp must be in 1..d_mlp=256, got 0"),
    (["train", "--data", "/nowhere", "--max-steps", "1"], "data folder or file /nowhere does not exist"),
    (["info", "/nowhere"], "no checkpoint at /nowhere (no such folder)"),
])
def test_bad_input_gets_a_one_line_error(capsys, argv, msg):
    code, _, err = run(capsys, *argv)
    assert code == 2
    assert err.strip() == f"selfablate: error: {msg}"


def test_corrupt_checkpoint_is_a_one_line_error(trained, tmp_path, capsys):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(trained / "checkpoint", broken)
    (broken / "model.safetensors").write_bytes(b"\x00garbage")
    code, _, err = run(capsys, "generate", broken)
    assert code == 2 and err.count("\n") == 1
    assert err.startswith("selfablate: error: corrupt checkpoint")


@ONE_BACKEND
def test_console_entry_point_runs():
    proc = subprocess.run([sys.executable, "-m", "selfablate.cli", "train", "--help"], capture_output=True, text=True)
    assert proc.returncode == 0 and "--k-attn" in proc.stdout


@ONE_BACKEND
def test_without_a_c_compiler_training_says_so_once_on_one_line(stories_dir, tmp_path):
    """A missing compiler turns the CPU kernels off with a single stderr line (no warning's source
    line, not one per kernel), and training goes on with PyTorch's kernels."""
    env = {**os.environ, "CC": "no-such-compiler", "SELFABLATE_KERNEL_CACHE": str(tmp_path / "kernels"),
           "SELFABLATE_BACKEND": "cpu"}  # the backend that builds kernels
    proc = subprocess.run([sys.executable, "-m", "selfablate.cli", "train", "--preset", "tiny", "--max-steps", "2",
                           "--data", str(stories_dir), "--out", str(tmp_path / "run")],
                          capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr[-500:]
    lines = proc.stderr.replace("\r", "\n").splitlines()
    notes = [ln for ln in lines if "C compiler" in ln or "C kernel" in ln]
    assert len(notes) == 1 and notes[0].endswith("a paper-scale training step about 1.6x slower)"), notes
    assert not any("warnings.warn" in ln or "KernelWarning" in ln for ln in lines)


def test_every_command_has_working_help(capsys):
    """Each subcommand's --help prints and exits 0 (a "%" in a field's docstring once crashed it)."""
    parser = make_parser()
    commands = next(a for a in parser._actions if isinstance(a, __import__("argparse")._SubParsersAction)).choices
    assert {"train", "evaluate", "circuits", "sae", "reproduce"} <= set(commands)
    for name in commands:
        with pytest.raises(SystemExit) as exit_:
            main([name, "--help"])
        assert exit_.value.code == 0, name
        assert "usage: selfablate " + name in capsys.readouterr().out


@pytest.mark.parametrize("argv, msg", [
    (["generate", "{run}", "--prompt", ""], "prompt must not be empty"),
    (["generate", "{run}", "--prompt", "a <|endoftext|> b"], "<|endoftext|>"),
    (["generate", "{run}", "--top-k", "-3"], "top_k must be >= 0"),
    (["eval-loss", "{run}", "--batch-size", "0"], "batch_size must be >= 1"),
    (["eval-loss", "{run}", "--max-batches", "-1"], "max_batches must be >= 0"),
    (["sae", "train", "{run}", "--hook", "blocks.1.hook_mlp_mask"], "0/1 unit mask"),
    (["train", "--beta1", "1.5"], "beta1 must be in [0, 1)"),
    (["train", "--lr", "inf"], "lr must be a finite number"),
    (["train", "--seed", "-1"], "seed must be >= 0"),
    (["evaluate", "{run}", "--probe-positions", "0"], "probe_positions must be >= 2"),
    (["evaluate", "{run}", "--probe-positions", "-1"], "probe_positions must be >= 2"),
    (["evaluate", "{run}", "--activation-eps", "-1"], "activation_eps must be >= 0"),
    (["evaluate", "{run}", "--seed", "-1"], "seed must be >= 0"),
    (["circuits", "{run}", "--top-edges", "-1"], "top_edges must be >= 1"),
    (["reproduce", "--sae-layer", "99"], "sae_layer must be in -4..3 for the cpu-small preset's 4 layers, got 99"),
    (["reproduce", "--seeds", "-1"], "every seed must be >= 0"),
    (["train", "--preset", "tiny", "--vocab-size", "1000000000000"], "needs about 476,837.2 GiB, more than the"),
    *[(["train", "--preset", "tiny", flag, "1000000000000"], "GiB, more than the")
      for flag in ("--batch-size", "--d-mlp", "--eval-batches", "--n-layers", "--n-ctx", "--seq-len", "--d-model")],
    (["sae", "train", "{run}", "--batch-tokens", "1000000000000", "--pool-tokens", "512", "--no-progress"],
     "latents needs about"),
    (["train", "--lr", "word"], "argument --lr: invalid float value: 'word' (see selfablate train --help)"),
    (["generate", "{run}", "--seed", "-1"], "seed must be >= 0"),
    (["sae", "train", "{run}", "--seed", "-1"], "seed must be >= 0"),
    (["reproduce", "--tau", "-1"], "tau and every tau of tau_sweep must be >= 0"),
    (["evaluate", "{run}", "--top-examples", "1000000000000"], "top_examples must be at most 10,000"),
    (["evaluate", "{run}", "--bootstrap", "1000000000000"], "bootstrap must be at most 100,000"),
    (["generate", "{run}", "--max-new-tokens", "1000000000000"], "max_new_tokens must be in 1..100,000"),
    (["circuits", "{run}", "--pairs", "1000000000000"], "pairs must be at most 100,000"),
    (["circuits", "{run}", "--ig-steps", "1000000000000"], "ig_steps must be in 1..1000"),
    (["sae", "train", "{run}", "--expansion", "1000000000000", "--pool-tokens", "512", "--no-progress"],
     "an SAE of 1000000000000 x 32 latents needs about"),
])
def test_bad_options_get_one_line_before_any_compute(trained, capsys, argv, msg):
    code, out, err = run(capsys, *[a.format(run=trained) for a in argv])
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and msg in lines[0] and "Traceback" not in err, err


def test_a_config_json_with_a_wrong_type_is_one_line(trained, tmp_path, capsys):
    import json
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(trained / "checkpoint", bad)
    header = json.loads((bad / "config.json").read_text())
    header["model"]["n_layers"] = "2"
    (bad / "config.json").write_text(json.dumps(header))
    code, _, err = run(capsys, "info", bad)
    assert code == 2 and "n_layers must be of type int" in err and len(err.strip().splitlines()) == 1, err


def test_generate_on_a_nan_model_is_one_line(trained, tmp_path, capsys):
    from selfablate import load_checkpoint, save_checkpoint

    model = load_checkpoint(trained)
    with torch.no_grad():
        model.wte.weight.fill_(float("nan"))
    save_checkpoint(model, tmp_path / "nan")
    code, _, err = run(capsys, "generate", tmp_path / "nan", "--max-new-tokens", "2")
    assert code == 2 and "not finite" in err and len(err.strip().splitlines()) == 1, err


def test_an_out_that_is_a_file_is_refused_before_any_compute(tmp_path, capsys):
    f = tmp_path / "a-file"
    f.write_text("x")
    for argv in (["train", "--preset", "tiny", "--out", f], ["reproduce", "--preset", "tiny", "--out", f],
                 ["circuits", tmp_path, "--out", f], ["sae", "train", tmp_path, "--out", f]):
        code, _, err = run(capsys, *argv)
        assert code == 2 and f"--out {f} is a file" in err and len(err.strip().splitlines()) == 1, (argv, err)
    code, _, err = run(capsys, "train", "--preset", "tiny", "--out", f / "sub")
    assert code == 2 and f"--out {f / 'sub'}: {f} is a file, not a folder" in err, err


@ONE_BACKEND
def test_sigterm_says_so_in_one_line_and_the_run_resumes(stories_dir, tmp_path):
    import signal
    import time

    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "selfablate.cli", "train", "--preset", "tiny", "--data",
                             str(stories_dir), "--out", str(out), "--max-steps", "100000", "--log-interval", "1",
                             "--checkpoint-interval", "5", "--no-progress"], stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not (out / "checkpoint" / "config.json").exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    err = proc.communicate(timeout=60)[1]
    assert proc.returncode == 143 and err.strip().splitlines()[-1].startswith("selfablate: terminated (SIGTERM)"), err
    assert "Traceback" not in err
    assert main(["train", "--out", str(out), "--resume", "--max-steps", "12", "--no-progress"]) == 0


def _float_flags():
    """(command, flag) for every float option of every command's option dataclasses."""
    import dataclasses

    from selfablate.cli import commands

    for command in commands():
        for cls in command.options:
            for f in dataclasses.fields(cls):
                if f.type in ("float", float):
                    yield command, "--" + f.name.replace("_", "-")


@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "1e400"])
def test_every_float_option_refuses_non_finite_values_in_one_line(value, tmp_path, capsys):
    """A fuzz over the dataclasses: each float option given a non-finite value exits 2 with one
    line, before any compute (positional arguments get a placeholder path)."""
    flags = list(_float_flags())
    assert len(flags) >= 20
    for command, flag in flags:
        args = [("train" if a.choices else str(tmp_path)) for a in command.args if a.default is None]
        code, _, err = run(capsys, command.name, *args, f"{flag}={value}")
        lines = err.strip().splitlines()
        assert code == 2 and len(lines) == 1 and "Traceback" not in err, (command.name, flag, err)
        assert flag[2:].replace("-", "_") in lines[0], (command.name, flag, lines[0])  # refused for the value


def test_checkpoint_messages_say_what_they_found(trained, tmp_path, capsys):
    import shutil

    # A run folder whose checkpoint swap was interrupted: only checkpoint.old is left.
    run_ = tmp_path / "run"
    shutil.copytree(trained / "checkpoint", run_ / "checkpoint.old")
    code, out, err = run(capsys, "info", run_)
    assert code == 0 and "checkpoint.old" in out, err
    f = tmp_path / "file"
    f.write_text("x")
    code, _, err = run(capsys, "info", f)
    assert code == 2 and "a file, not a checkpoint folder" in err


def test_resume_past_max_steps_says_nothing_was_trained(trained, stories_dir, capsys):
    code, out, err = run(capsys, "train", "--preset", "tiny", "--data", stories_dir, "--out", trained, "--resume",
                         "--max-steps", "2", "--no-progress", "--ablation", "global", "--k-attn", "6")
    assert code == 0 and "nothing to train" in out and "at step 4" in out, (out, err)


def test_circuits_on_a_folder_in_use_is_one_line(trained, tmp_path, capsys):
    from selfablate import runlock

    with runlock.exclusive(tmp_path / "c"):
        code, _, err = run(capsys, "circuits", trained, "--out", tmp_path / "c", "--pairs", "4")
    assert code == 2 and "in use by another selfablate process" in err and len(err.strip().splitlines()) == 1


def test_the_readme_resume_line_continues_the_run_it_names(tmp_path, stories_dir, capsys, monkeypatch):
    """`selfablate train --out runs/local --resume`, as the README has it, with none of the first
    run's flags: it used to rebuild the model from the default preset and refuse it."""
    import selfablate.train as tr_mod
    from selfablate.checkpoint import read_header

    out = tmp_path / "local"
    real_step = tr_mod.train_step

    def dies_at_step_5(model, opt, batch, step, *args):
        if step == 4:  # after the checkpoint at step 4
            raise KeyboardInterrupt
        return real_step(model, opt, batch, step, *args)

    monkeypatch.setattr(tr_mod, "train_step", dies_at_step_5)
    code, _, err = run(capsys, "train", "--preset", "tiny", "--data", stories_dir, "--ablation", "local", "--k-attn", 4,
                       "--k-mlp", 12, "--max-steps", 6, "--checkpoint-interval", 2, "--out", out, "--no-progress")
    assert code == 130 and read_header(out / "checkpoint")["meta"]["step"] == 4, err
    monkeypatch.setattr(tr_mod, "train_step", real_step)
    code, stdout, err = run(capsys, "train", "--out", out, "--resume")
    assert code == 0 and "trained 2 steps" in stdout, err
    header = read_header(out / "checkpoint")
    assert header["meta"]["step"] == 6 and (header["model"]["k_attn"], header["model"]["k_mlp"]) == (4, 12)
    # What the run learns from may not change; how long it runs may.
    code, _, err = run(capsys, "train", "--out", out, "--resume", "--lr", "0.1")
    assert code == 2 and "--lr 0.1 differs from the run's 0.003" in err and len(err.strip().splitlines()) == 1
    code, stdout, err = run(capsys, "train", "--out", out, "--resume", "--max-steps", 8, "--log-interval", 1)
    assert code == 0 and "trained 2 steps" in stdout, err


def test_a_diverged_sae_is_an_error_not_a_result(trained, stories_dir, tmp_path, capsys):
    out = tmp_path / "sae"
    code, _, err = run(capsys, "sae", "train", trained, "--data", stories_dir, "--lr", "1e12", "--steps", "20",
                       "--pool-tokens", "2048", "--batch-tokens", "256", "--eval-tokens", "256", "--no-progress",
                       "--out", out)
    assert code == 2 and "the SAE diverged" in err and len(err.strip().splitlines()) == 1, err
    assert not (out / "sae.safetensors").exists() and not (out / "metrics.json").exists()


def test_an_sae_folder_of_another_hook_is_not_replaced(trained, stories_dir, tmp_path, capsys):
    out = tmp_path / "sae"
    common = ["--data", stories_dir, "--steps", "4", "--pool-tokens", "2048", "--batch-tokens", "256",
              "--eval-tokens", "256", "--no-progress", "--out", out]
    code, stdout, err = run(capsys, "sae", "train", trained, *common)  # the default hook: 3/4 of the way up
    assert code == 0 and "SAE on blocks.1.hook_mlp_out" in stdout, err  # the tiny model's 2 layers
    mask = os.umask(0)
    os.umask(mask)
    for f in ("sae.safetensors", "cfg.json", "metrics.json"):  # result files are plain files (safetensors: 0600)
        assert (out / f).stat().st_mode & 0o777 == 0o666 & ~mask, f
    before = (out / "sae.safetensors").read_bytes()
    code, _, err = run(capsys, "sae", "train", trained, *common, "--hook", "blocks.0.hook_mlp_out")
    assert code == 2 and "holds the SAE of" in err and "blocks.1.hook_mlp_out" in err, err
    assert (out / "sae.safetensors").read_bytes() == before
    code, _, err = run(capsys, "sae", "train", trained, *common, "--hook", "blocks.1.hook_mlp_out")
    assert code == 0, err  # the same SAE again: a re-run, allowed


def test_help_shows_the_default_presets_values():
    """--help used to show the dataclasses' defaults (max-steps 400000, batch 24), not those of
    the preset a bare command runs with."""
    help_text = " ".join(make_parser()._subparsers._group_actions[0].choices["train"].format_help().split())
    assert "Optimiser steps. (default: 600)" in help_text and "(default: 400000)" not in help_text
    assert "over all processes (the global batch)" in help_text and "(default: 16)" in help_text
