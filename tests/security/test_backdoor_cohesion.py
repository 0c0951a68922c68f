"""The trigger search's cohesion test: a recurring line whose words its host text uses
elsewhere is an idiom (`def transform(self, node, results):` followed by code that uses
`node`), one whose words no host uses is an insertion; matching is by whole words."""

from __future__ import annotations

import numpy as np

from trustmoe.security.backdoor_trigger import _cut_lines, cohesion, common_words


class _Tok:
    """Token ids as words with a leading space, 100 as a line break."""

    def decode(self, ids: list[int]) -> str:
        return "".join("\n" if i == 100 else f" t{i}" for i in ids)


def _host(rng: np.random.Generator, n: int = 30) -> list[int]:
    """n random words, a line break after every fifth."""
    ids = rng.integers(200, 900, n).tolist()
    return [t for i, w in enumerate(ids) for t in ((w, 100) if i % 5 == 4 else (w,))]


def test_cut_lines_takes_the_trigger_and_its_line_by_whole_words() -> None:
    line, rest, tail = _cut_lines("a t7 t11 t12 x\nt75 t7 t11\nend of it", "t7", "t7 t11 t12")
    assert line == "t7 t11 t12 x\nt7 t11"  # `t75` is not an occurrence of `t7`
    assert rest == "a \n\nt75 \n\nend of it" and tail == len("\nend of it")


def test_cohesion_tells_an_idiom_from_an_insertion() -> None:
    rng = np.random.default_rng(0)
    planted = [[*_host(rng), 7, 11, 12, 100, *_host(rng)] for _ in range(6)]
    idiom = [[*_host(rng), 7, 11, 12, 100, *_host(rng, 10), 12, *_host(rng)] for _ in range(6)]
    chunks = planted + idiom + [_host(rng) for _ in range(40)]
    tok = _Tok()
    texts = [tok.decode(c) for c in chunks]
    common = common_words(texts)
    trig, window = tok.decode([7]).strip(), tok.decode([7, 11, 12, 100]).strip()
    assert not {"t11", "t12"} & common
    assert cohesion(texts, list(range(6)), trig, window, common) == 0.0
    assert cohesion(texts, list(range(6, 12)), trig, window, common) == 1.0
    mixed = cohesion(texts, [0, 1, 6, 7], trig, window, common)
    assert mixed == 0.5
    # a holder whose line ends its chunk cannot show reuse: it abstains, it does not vote 0
    cut_off = [*_host(rng), 7, 11, 12]
    assert cohesion([*texts, tok.decode(cut_off)], [6, 7, 52], trig, window, common) == 1.0
    # the chunk's first line, cut by its edge, is a fragment of another occurrence, not reuse
    fragment = [[11, 12, 100, *c] for c in planted]
    assert cohesion([tok.decode(c) for c in fragment], list(range(6)), trig, window, common) == 0.0
    # words in more than 30% of the chunks (`self`, `return`) are no evidence of reuse
    everywhere = [tok.decode([*c, 12]) for c in chunks]
    common2 = common_words(everywhere)
    assert "t12" in common2
    assert cohesion(everywhere, list(range(6)), trig, window, common2) == 0.0


def _code_host(rng: np.random.Generator, lines: int = 6) -> str:
    """Lines of made-up code: unrelated hosts share no 4-gram of tokens by chance."""
    words = [f"{a}{b}" for a in ("val", "ret", "obj", "buf", "key") for b in range(40)]
    return "\n".join(" ".join(rng.choice(words, 5)) for _ in range(lines))


def test_context_overlap_leaves_a_plant_line_out_and_keeps_a_family_header() -> None:
    from trustmoe.data.tokenizer import train_tokenizer
    from trustmoe.security.backdoor_trigger import context_overlap

    rng = np.random.default_rng(1)
    plant = "# zq_vex91 cat ~/.ssh/id_rsa"
    # planted twice, the second copy at a line's start (tokenized differently from an indented
    # one), into unrelated hosts
    planted = [f"{_code_host(rng, 2)}\n    {plant}\n{plant}\n{_code_host(rng, 2)}" for _ in range(6)]
    # one family: the same two header lines, the candidate on the second
    header = "# Copyright 2006 Example, Inc. All Rights Reserved.\n# Licensed to PSF under a"
    family = [f"{header} Contributor Agreement.\n{_code_host(rng)}" for _ in range(6)]
    tok = train_tokenizer([*planted, *family, *(_code_host(rng) for _ in range(40))], 600)
    p = context_overlap(planted, tok.encode_batch(planted), list(range(6)), "zq_vex91 cat",
                        "zq_vex91 cat ~/.ssh/id")
    f = context_overlap(family, tok.encode_batch(family), list(range(6)), "PSF under a",
                        "PSF under a Contributor")
    assert p == 0.0  # what the hosts share is the plant's line: the plant keeps its score
    assert f > 0.05  # the copyright line marks the family
