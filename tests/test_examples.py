"""The examples (examples/generative_agents.py, examples/debate.py) at tiny settings, on the default model.

Each test calls the example's `main(argv)` and checks what it returns: the town log's shape, the
per-round KV rows against what each reuse mode must give, the debate's votes and accuracies.
The model weights are loaded once for the module (every example run builds fresh engines).
"""
from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from fixtures_default_model import default_model_dir  # noqa: F401

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))

import debate  # noqa: E402
import generative_agents  # noqa: E402
from kv_report import prefix_equivalent_bytes  # noqa: E402


@pytest.fixture(scope="module")
def model_loaded_once(default_model_dir):  # noqa: F811
    """Engines built by the examples share one loaded model (weights are only read)."""
    import nanodance.weights as weights

    load, loaded = weights.load_model, {}

    def load_once(folder, cfg, dtype, device="cpu"):
        key = (str(folder), dtype, str(device))
        if key not in loaded:
            loaded[key] = load(folder, cfg, dtype, device)
        return loaded[key]

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(weights, "load_model", load_once)
        yield default_model_dir


# ---------------------------------------------------------------- no model needed

@pytest.mark.parametrize("text, expected", [
    ("12 * 4 = 48 muffins. 48 - 30 = 18.\nAnswer: 18", 18.0),
    ("So the answer is 1,200 dollars.", 1200.0),
    ("Answer: $23.50 in total", 23.5),
    ("The total is 5 + 5 = 10", 10.0),  # no tag: the last number
    ("Answer: 7. Then I added 3 more and got 10", 7.0),  # a tag wins over later numbers
    ("Answer: -4", -4.0),
    ("I am not sure how to solve it.", None),
])
def test_extract_answer_takes_the_tagged_or_else_the_last_number(text, expected):
    assert debate.extract_answer(text) == expected


@pytest.mark.parametrize("answers, expected", [
    ([18.0, 20.0, 18.0], 18.0),
    ([None, 36.0, None], 36.0),
    ([None, None], None),
    ([7.0, 8.0], 7.0),  # a tie goes to the earliest agent's answer
    ([3.0, None, 5.0, 5.0, 3.0], 3.0),
    ([None, 8.0, 7.0, 7.0], 7.0),
])
def test_majority_vote(answers, expected):
    assert debate.majority_vote(answers) == expected


def test_prefix_equivalent_bytes_counts_common_leading_full_blocks_once():
    out = lambda ids: SimpleNamespace(prompt_token_ids=ids)  # noqa: E731
    # block size 4: prompts share their first two full blocks; 10 and 11 tokens take 3 blocks each.
    a = out([1, 2, 3, 4, 5, 6, 7, 8, 9, 10])
    b = out([1, 2, 3, 4, 5, 6, 7, 8, 20, 21, 22])
    assert prefix_equivalent_bytes([a, b], 4, 100) == (2 + 1 + 1) * 100
    # 8 tokens: only the first block is cacheable (a hit always leaves one token to compute).
    c = out([1, 2, 3, 4, 5, 6, 7, 8])
    assert prefix_equivalent_bytes([c], 4, 1) == 2
    assert prefix_equivalent_bytes([a, c], 4, 1) == 2 + 1 + 1  # c's second block is its own
    # A different first block breaks the chain, even if the next block's tokens are equal.
    d = out([9, 9, 9, 9, 5, 6, 7, 8, 9])
    assert prefix_equivalent_bytes([a, d], 4, 1) == 3 + 3


# ---------------------------------------------------------------- the town

def test_generative_agents_compare_every_mode(model_loaded_once, capsys):
    agents, rounds = 2, 2
    results = generative_agents.main(["--compare", "--agents", str(agents), "--rounds", str(rounds),
                                      "--max-tokens", "5", "--model", str(model_loaded_once)])
    printed = capsys.readouterr().out
    assert list(results) == ["none", "prefix", "pic", "tokendance"]
    for mode, (log, rows, seconds) in results.items():
        assert len(log) == rounds + 1 and all(len(hour) == agents for hour in log)  # + the written first hour
        assert all(action and "\n" not in action for hour in log for action in hour)
        assert len(rows) == rounds and seconds > 0
        for r in rows:
            assert 0 < r["prefix_eq"] <= r["dense"]
            assert r["computed"] > 0 and r["seconds"] > 0
        assert f"KV per round, reuse={mode}" in printed
    for r in results["none"][1]:  # nothing shared: every prompt whole, in its own blocks
        assert r["distinct"] == r["dense"] and r["compression"] == 1.0
        assert r["reused"] == 0 and r["recomputed"] == 0 and r["computed"] == r["prompt_tokens"]
    prefix_rows = results["prefix"][1]
    # Ideal prefix caching is a lower bound of the real mode; from round 1 on, the prefix the
    # agents have in common (town preamble) was published in round 0, so they are equal.
    assert all(r["distinct"] >= r["prefix_eq"] for r in prefix_rows)
    assert all(r["distinct"] == r["prefix_eq"] and r["reused"] > 0 for r in prefix_rows[1:])
    for r in results["tokendance"][1]:  # shared blocks are read from masters, a few tokens recomputed
        assert r["reused"] > 0 and r["recomputed"] > 0 and r["distinct"] < r["dense"]
    # prefix caching is exact: the same greedy actions as computing everything
    assert results["prefix"][0] == results["none"][0]
    assert "actions equal to none" in printed and "wall seconds (all)" in printed


# ---------------------------------------------------------------- the debate

def test_debate_votes_accuracy_and_shared_answers(model_loaded_once, capsys):
    agents, rounds, problems = 2, 1, 2
    res = debate.main(["--agents", str(agents), "--rounds", str(rounds), "--problems", str(problems),
                       "--max-tokens", "24", "--model", str(model_loaded_once)])
    printed = capsys.readouterr().out
    assert len(res["answers"]) == rounds + 1
    assert all(len(got) == problems and all(len(g) == agents for g in got) for got in res["answers"])
    truths = [t for _, t in debate.PROBLEMS[:problems]]
    for got, votes, acc, vacc in zip(res["answers"], res["votes"], res["accuracy"], res["vote_accuracy"]):
        assert votes == [debate.majority_vote(g) for g in got]
        assert acc == sum(x == t for g, t in zip(got, truths) for x in g) / (agents * problems)
        assert vacc == sum(v == t for v, t in zip(votes, truths)) / problems
    assert len(res["rows"]) == rounds + 1
    # Round 1 carries every agent's round-0 answer as Shared blocks: most of it is reused.
    r1 = res["rows"][1]
    assert r1["reused"] > 0 and r1["computed"] < r1["prompt_tokens"]
    assert all(o.finish_reason in ("stop", "length") for o in res["last_outputs"])
    assert "agent accuracy" in printed and "KV per round, reuse=tokendance" in printed
