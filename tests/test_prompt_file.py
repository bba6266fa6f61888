"""IOI prompts from a file in auto-circuit's format, loaded as the authors' auto-circuit call does."""

import json
import random

import pytest
import torch

from selfablate.circuits.prompt_file import authors_file, load_prompt_file, read_prompts
from selfablate.data.tokenizer import EOT, gpt2_tokenizer
from selfablate.errors import SelfAblateError

PROMPTS = [  # lengths differ on purpose: padding goes on the left
    ("When Mary and John went to the store, John gave a drink to", " Mary", " John"),
    ("Then, Tom and Sue played. Sue gave a ball to", " Tom", " Sue"),
    ("Anna and Ben went to the park. Ben gave a kite to", " Anna", " Ben"),
    ("One day, Lily and Max found a big red box at the farm. Max gave it to", " Lily", " Max"),
    ("Sam and Mia ate. Mia gave a cake to", " Sam", " Mia"),
]


def corrupt(text: str) -> str:
    for a, b in (("Mary", "Kate"), ("John", "Jake"), ("Tom", "Tim"), ("Sue", "Amy"), ("Anna", "Bob"),
                 ("Ben", "Dan"), ("Lily", "Lucy"), ("Max", "Leo"), ("Sam", "Joe"), ("Mia", "Zoe")):
        text = text.replace(a, b)
    return text


def write(path, rows):
    path.write_text(json.dumps({"prompts": rows}))
    return path


@pytest.fixture
def prompt_file(tmp_path):
    return write(tmp_path / "p.json", [{"clean": c, "corrupt": corrupt(c), "answers": [a], "wrong_answers": [w]}
                                       for c, a, w in PROMPTS])


def test_shuffle_split_and_bos_as_auto_circuit(prompt_file):
    split = load_prompt_file(prompt_file, (3, 2), bos=True)
    order = list(range(5))
    random.seed(42)  # auto-circuit's load_datasets_from_json: random.seed(42); random.shuffle(prompts)
    random.shuffle(order)
    enc = gpt2_tokenizer()
    rows = [[EOT] + enc.encode(PROMPTS[i][0]) for i in order]
    width = max(map(len, rows))
    for part, idx in ((split.train, order[:3]), (split.test, order[3:])):
        assert part.texts == [PROMPTS[i][0] for i in idx]
        for j, i in enumerate(idx):
            row = [EOT] + enc.encode(PROMPTS[i][0])
            assert part.clean[j].tolist() == row + [EOT] * (width - len(row))
            assert part.corrupt[j].tolist() == [EOT] + enc.encode(corrupt(PROMPTS[i][0])) + [EOT] * (width - len(row))
            assert part.io[j].item() == enc.encode(PROMPTS[i][1])[0] and part.s[j].item() == enc.encode(PROMPTS[i][2])[0]
            assert part.last[j].item() == len(row) - 1  # read at the prompt's own last token
    no_bos = load_prompt_file(prompt_file, (3, 2))  # the default: what the authors' model saw
    assert no_bos.train.clean.shape[1] == width - 1 and (no_bos.train.last == split.train.last - 1).all()
    assert not (no_bos.train.clean[:, 0] == EOT).any()


@pytest.mark.parametrize("rows, msg", [
    ([{"clean": "a b", "corrupt": "c d", "answers": [" Mary Jane"], "wrong_answers": [" John"]}],
     "the answer ' Mary Jane' is 2 GPT-2 tokens"),
    ([{"clean": "a b", "corrupt": "c d", "answers": [" Mary", " Ann"], "wrong_answers": [" John"]}], "prompt 0 must"),
    ([{"clean": "a b", "corrupt": "c d e", "answers": [" Mary"], "wrong_answers": [" John"]}], "another length"),
    ([], "non-empty list"),
])
def test_a_bad_prompt_file_is_one_clear_error(tmp_path, rows, msg):
    with pytest.raises(SelfAblateError, match=msg.replace("(", r"\(")):
        load_prompt_file(write(tmp_path / "bad.json", rows), (1, 0))


def test_unreadable_files_and_splits_too_large(tmp_path, prompt_file):
    with pytest.raises(SelfAblateError, match="cannot read the prompt file"):
        read_prompts(tmp_path / "missing.json")
    (tmp_path / "x.json").write_text("[1, 2")
    with pytest.raises(SelfAblateError, match="not an auto-circuit prompt file"):
        read_prompts(tmp_path / "x.json")
    with pytest.raises(SelfAblateError, match="split of 4 \\+ 2 prompts needs that many; the file has 5"):
        load_prompt_file(prompt_file, (4, 2))


def test_the_authors_file_is_shipped_with_its_licence():
    path = authors_file()
    prompts = read_prompts("authors")
    assert len(prompts) == 1000 and prompts[0]["answers"] == [" Rob"]
    licence = (path.parent / "LICENSE").read_text()
    assert "MIT License" in licence and "Keenan Pepper, Jeremias Ferrao, Luhan Mikaelson" in licence
    split = load_prompt_file("authors")
    assert split.train.clean.shape == (128, 20) and split.test.clean.shape == (128, 20)
    assert (split.train.clean[:, 0] != EOT).all() and sorted(set(split.train.last.tolist())) == [13, 14, 16, 17, 18, 19]


def test_answers_outside_a_compact_vocabulary_are_refused(prompt_file):
    from selfablate import ModelConfig, SelfAblatingTransformer
    from selfablate.circuits.discovery import make_task

    enc = gpt2_tokenizer()
    kept = sorted({EOT, *enc.encode(" Mary John Tom Sue Anna Ben Lily Sam Mia")})  # " Max" is missing
    model = SelfAblatingTransformer(ModelConfig(vocab_size=len(kept) + 1, compact_vocab=True, n_ctx=32, d_model=16,
                                                n_layers=1, n_heads=2, d_mlp=32, k_attn=4, k_mlp=8))
    model.vocab_ids.copy_(torch.tensor(kept))
    with pytest.raises(SelfAblateError, match="1 IOI answer\\(s\\) are not in this model's compact vocabulary.*' Max'"):
        make_task(model, load_prompt_file(prompt_file, (5, 0)).train)
