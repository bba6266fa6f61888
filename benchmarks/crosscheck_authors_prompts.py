"""ACDC on the paper authors' IOI prompts: auto-circuit 1.0.1's own loading and ACDC against ours,
on the same exported model. Not part of `make test` (`make crosscheck` builds the venv it needs).

auto-circuit side, as the authors ran it: `load_datasets_from_json(model, their file,
prepend_bos=True, batch_size=64, train_test_size=(128, 128))`, then `acdc_prune_scores` (which
reads the first batch of the train loader) at tau. Our side: `selfablate circuits --prompts
authors` (`circuits.run.prompt_batches`, `circuits.discovery.acdc`), visiting the edges in
auto-circuit's order (its order within a layer is a Python set's; the greedy result depends on it).

    python benchmarks/crosscheck_authors_prompts.py [--checkpoint DIR] [--tau 0.03]
"""

import argparse
from pathlib import Path

import torch
from transformers import GPT2TokenizerFast

from auto_circuit.data import load_datasets_from_json
from auto_circuit.utils.graph_utils import patchable_model

from crosscheck_auto_circuit import build_model, compare_acdc, their_name
from selfablate.circuits.discovery import kl_with_mask, make_task
from selfablate.circuits.prompt_file import authors_file
from selfablate.circuits.run import CircuitConfig, prompt_batches
from selfablate.data.tokenizer import EOT, _bpe_files
from selfablate.data.vocab import to_gpt2_ids
from selfablate.interop.transformer_lens import to_hooked_transformer


def gpt2_hf_tokenizer() -> GPT2TokenizerFast:
    """Hugging Face's GPT-2 tokenizer from the same offline files as ours (no download)."""
    merges, vocab = _bpe_files()
    tok = GPT2TokenizerFast(vocab_file=str(vocab), merges_file=str(merges))
    tok.pad_token = tok.eos_token  # as TransformerLens sets it for GPT-2
    return tok


def same_prompts(ours, loader_batch, model) -> None:
    """Our tokens (GPT-2 ids, right-padded) equal auto-circuit's (BOS and left padding, all 50256,
    which TransformerLens masks), prompt for prompt."""
    gpt2 = lambda t: to_gpt2_ids(model, t.cpu())  # noqa: E731
    for mine, theirs in ((ours.clean, gpt2(loader_batch.clean)), (ours.corrupt, gpt2(loader_batch.corrupt))):
        for i, last in enumerate(ours.last.tolist()):
            n = last + 1
            assert torch.equal(mine[i, :n], theirs[i, -n:]) and (theirs[i, :-n] == EOT).all(), f"prompt {i} differs"
    assert ours.io.tolist() == [int(a) for a in gpt2(torch.stack(list(loader_batch.answers)).flatten().cpu())]
    assert ours.s.tolist() == [int(a) for a in gpt2(torch.stack(list(loader_batch.wrong_answers)).flatten().cpu())]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--checkpoint", default="")
    p.add_argument("--tau", type=float, default=0.03)
    args = p.parse_args()
    model = build_model(args.checkpoint)
    ht = to_hooked_transformer(model, use_attn_result=True, use_split_qkv_input=True, use_hook_mlp_in=True)
    ht.tokenizer = gpt2_hf_tokenizer()  # all auto-circuit's loader uses (set_tokenizer would download)
    train_loader, test_loader = load_datasets_from_json(ht, Path(authors_file()), torch.device("cpu"), prepend_bos=True,
                                                        batch_size=64, train_test_size=(128, 128))
    discovery, test = prompt_batches(CircuitConfig(prompts="authors"))
    same_prompts(discovery, next(iter(train_loader)), model)
    first = next(iter(train_loader))
    theirs = ht(first.clean)[:, -1]  # TransformerLens masks their left padding, BOS included
    ours = model(discovery.clean).logits_clean[torch.arange(len(discovery.last)), discovery.last]
    print(f"logits at the last token, ours without BOS vs auto-circuit's batch through TransformerLens: "
          f"max |difference| {(theirs - ours).abs().max():.1e}")
    test_batches = list(test_loader)
    print(f"prompts: ours and auto-circuit's load_datasets_from_json agree token for token: discovery "
          f"{tuple(discovery.clean.shape)} (first train batch of 64), test split "
          f"{sum(len(b.clean) for b in test_batches)} prompts")
    for b, lo in zip(test_batches, range(0, len(test.texts), 64)):
        same_prompts(test.rows(lo, lo + 64), b, model)

    task = make_task(model, discovery)
    g = task.graph
    pm = patchable_model(ht, factorized=True, slice_output="last_seq", separate_qkv=True)
    index = {(their_name(s), their_name(d)): i for i, (s, d) in enumerate(g.edge_names)}
    edges = {index[(e.src.name, e.dest.name)]: e for e in pm.edges}
    assert len(edges) == g.n_edges, f"auto-circuit has {len(pm.edges)} edges, we have {g.n_edges}"
    kl_all = kl_with_mask(task, torch.ones(g.n_edges, dtype=task.clean_logp.dtype)).item()
    print(f"model: {model.cfg.n_layers} layers x {model.cfg.n_heads} heads, {g.n_edges} edges; "
          f"KL with every edge patched {kl_all:.4f}")
    for tau in (args.tau, kl_all / 50):
        compare_acdc(task, pm, train_loader, edges, index, tau, " on the authors' prompts")


if __name__ == "__main__":
    main()
