"""A fuzz over every numeric option of every command: each of -1, 0, nan, inf, 1e12 and a word is
either refused in one line (exit 2, no traceback, naming the option) or accepted as a value the
command documents; nothing reaches the command's work that should have been refused."""

import dataclasses

import pytest

from selfablate import cli
from selfablate.config import field_type

VALUES = ("-1", "0", "nan", "inf", "1e12", "1000000000000", "word")

SIZED_BY_THE_COMMAND = ("vocab_size", "n_ctx", "d_model", "n_layers", "d_mlp", "batch_size", "seq_len",
                        "eval_batches", "expansion", "batch_tokens")
"""Sizes checked against the device's free memory by the command itself, before any work
(`test_cli.test_bad_options_get_one_line_before_any_compute` runs each at 1e12)."""

UNTIL_THE_DATA_ENDS = ("max_steps", "warmup_steps", "max_batches", "max_tokens", "eval_max_tokens", "localisation_tokens",
                       "pool_tokens", "eval_tokens", "sae_eval_tokens", "steps", "sae_steps", "frequent_tokens",
                       "probe_classes", "probe_positions", "top_edges", "batch", "train_tokens", "test_tokens", "explain_tokens",
                       "stories", "show")
"""Counts that stop at the data's end (or the graph's, or the vocabulary's), or are the run's own
length: a large value is a long run the user asked for, not a mistake."""

UNBOUNDED = ("lr", "mask_head_lr_scale", "weight_decay", "grad_clip", "coef_clean", "coef_ablated", "coef_recon",
             "temperature_attn", "temperature_mlp", "temperature", "topk_eps", "topk_gap_floor", "init_std", "ln_eps",
             "l1_coef", "tau", "activation_eps")
"""Rates, weights and thresholds with no upper bound; a diverging run stops itself (training's and
the SAE's divergence checks), a large threshold keeps nothing."""

ACCEPTED = {
    # (option, value): why the command takes it; any pair not here must be refused in one line
    **{(name, big): "sized by the command" for name in SIZED_BY_THE_COMMAND for big in ("1e12", "1000000000000")},
    **{(name, big): "stops at the end" for name in UNTIL_THE_DATA_ENDS for big in ("1e12", "1000000000000")},
    **{(name, big): "unbounded" for name in UNBOUNDED for big in ("1e12", "1000000000000")},
    **{(name, "0"): "0 turns it off, or is the documented default" for name in (
        "topk_eps", "topk_gap_floor", "coef_clean", "coef_ablated", "coef_recon", "min_lr_ratio", "grad_clip", "beta1",
        "weight_decay", "warmup_steps", "tau", "activation_eps", "l1_coef", "temperature", "top_k", "max_batches",
        "mask_head_lr_scale")},
    **{("seed", v): "any seed >= 0" for v in ("0", "1000000000000")},
    **{(name, "1000000000000"): "an interval longer than the run: never, but at the end" for name in (
        "eval_interval", "log_interval", "checkpoint_interval")},
    ("top_k", "1000000000000"): "more than the vocabulary: all of it",
    ("sae_layer", "0"): "the first layer",
    ("sae_layer", "-1"): "the last layer, as Python counts",
    ("k", "1000000000000"): "read by --kind topk only, whose SAE checks it against its latents",
    ("seq_len", "0"): "0: the model's n_ctx",
    ("acdc_batch", "0"): "0: by device (one edge a pass on the CPU)",
    ("max_tokens", "0"): "0: the whole split",
    ("eval_max_tokens", "0"): "0: the whole split",
    ("max_steps", "0"): "reproduce: 0 keeps the preset's",
    ("sae_steps", "0"): "0: the protocol's",
    ("l1_warmup", "0"): "no warm-up",
    ("show", "0"): "explain: no examples written out (the graphs still use them all)",
    ("beta2", "0"): "Adam without a second-moment average (RMSprop-like), valid",
}


def numeric_flags():
    """(command, field name) for every int and float option of every command."""
    for command in cli.commands():
        for cls in command.options:
            for f in dataclasses.fields(cls):
                if field_type(cls, f.name) in (int, float):
                    yield command, f.name


class Reached(Exception):
    """The command's work was called: the value was accepted."""


def test_every_numeric_option_refuses_or_documents_each_value(tmp_path, capsys, monkeypatch):
    found = list(numeric_flags())
    assert len(found) >= 60
    stubbed = [c._replace(run=lambda *a, **k: (_ for _ in ()).throw(Reached())) for c in cli.commands()]
    monkeypatch.setattr(cli, "commands", lambda: stubbed)
    wrong = []
    for command, name in found:
        positional = [(a.choices[0] if a.choices else str(tmp_path)) for a in command.args if a.default is None]
        for value in VALUES:
            argv = [command.name, *positional, f"--{name.replace('_', '-')}={value}"]
            try:
                with pytest.raises(SystemExit) as exit_:
                    raise SystemExit(cli.main(argv))
                code = exit_.value.code
            except Reached:
                code = "ran"
            err = capsys.readouterr().err
            lines = err.strip().splitlines()
            if code == "ran":
                if (name, value) not in ACCEPTED:
                    wrong.append(f"{command.name} --{name}={value}: accepted")
            elif code != 2 or len(lines) != 1 or "Traceback" in err or name.replace("_", "-") not in lines[0].replace("_", "-"):
                wrong.append(f"{command.name} --{name}={value}: exit {code}, {len(lines)} lines: {lines[-1:]}")
    assert not wrong, "\n".join(wrong)
