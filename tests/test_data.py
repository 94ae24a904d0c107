"""Pairs: readers, tokenisation, splitting, and the real Anthropic sets when ../shared/data is there."""
import json
import os
from collections import Counter

import pytest

import fastsplit
from fastsplit import Pair
from tests.tiny import tiny_tokenizer

SHARED = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "anthropic-evals")


def test_persona_and_axbench_jsonl(tmp_path):
    p = tmp_path / "p.jsonl"
    p.write_text(json.dumps({"question": "Q?", "answer_matching_behavior": " Yes",
                             "answer_not_matching_behavior": " No", "extra": 1}) + "\n\n"
                 + json.dumps({"input": "In", "winning_output": "W", "losing_output": "L"}) + "\n")
    assert fastsplit.load_pairs(str(p)) == [Pair("Q?", " Yes", " No"), Pair("In", "W", "L")]


def test_csv(tmp_path):
    p = tmp_path / "p.csv"
    p.write_text('question,matching,not_matching\n"Is it, really?",Yes,No\n')
    assert fastsplit.load_pairs(str(p)) == [Pair("Is it, really?", "Yes", "No")]


@pytest.mark.parametrize("content,msg", [
    ('{"question": "Q", "answer_matching_behavior": "Y"}\n', r"p.jsonl:1: field 'answer_not_matching_behavior'"),
    ('{"question": "Q", "answer_matching_behavior": "Y", "answer_not_matching_behavior": "N"}\n'
     '{"question": "", "answer_matching_behavior": "Y", "answer_not_matching_behavior": "N"}\n',
     r"p.jsonl:2: field 'question' is empty"),
    ('{"question": "Q", \n', r"p.jsonl:1: not valid JSON"),
    ('[1, 2]\n', r"p.jsonl:1: expected a JSON object"),
    ('{"prompt": "Q"}\n', r"p.jsonl:1: expected the fields"),
    ('', r"holds no pairs"),
])
def test_bad_rows_name_file_and_line(tmp_path, content, msg):
    p = tmp_path / "p.jsonl"
    p.write_text(content)
    with pytest.raises(ValueError, match=msg):
        fastsplit.load_pairs(str(p))


def test_bad_csv_and_format(tmp_path):
    p = tmp_path / "p.csv"
    p.write_text("question,matching\nQ,Y\n")
    with pytest.raises(ValueError, match=r"the CSV header has \['question', 'matching'\]; missing \['not_matching'\]"):
        fastsplit.load_pairs(str(p))
    p.write_text("question,matching,not_matching\nQ,Y,\n")
    with pytest.raises(ValueError, match=r"p.csv:2: field 'not_matching' is empty"):
        fastsplit.load_pairs(str(p))
    q = tmp_path / "p.txt"
    q.write_text("x")
    with pytest.raises(ValueError, match="unknown pairs format"):
        fastsplit.load_pairs(str(q))
    with pytest.raises(FileNotFoundError):
        fastsplit.load_pairs(str(tmp_path / "none.jsonl"))


def test_parquet(tmp_path):
    pd = pytest.importorskip("pandas")
    pytest.importorskip("pyarrow")
    p = tmp_path / "p.parquet"
    pd.DataFrame({"input": ["I"], "winning_output": ["W"], "losing_output": ["L"]}).to_parquet(p)
    assert fastsplit.load_pairs(str(p)) == [Pair("I", "W", "L")]


def test_encode_pair_scores_completions_as_written():
    """In context after the prompt; after a template ending in a newline the leading space is dropped."""
    tok = tiny_tokenizer()
    pair = Pair("Do you agree?", " Yes indeed", "No")
    prompt, pos, neg = fastsplit.encode_pair(tok, pair)
    expected_prompt = tok.apply_chat_template([{"role": "user", "content": "Do you agree?"}],
                                              add_generation_prompt=True, tokenize=True)
    expected_prompt = expected_prompt["input_ids"] if not isinstance(expected_prompt, list) else expected_prompt
    assert prompt == list(expected_prompt)
    assert tok.decode(prompt).endswith("<|im_start|>assistant\n")
    assert pos == tok("Yes indeed", add_special_tokens=False)["input_ids"] and tok.decode(pos) == "Yes indeed"
    assert neg == tok("No", add_special_tokens=False)["input_ids"]
    plain, plain_pos, _ = fastsplit.encode_pair(tok, pair, chat=False)
    assert tok.decode(plain) == "Do you agree?"
    assert tok.decode(plain_pos) == " Yes indeed"  # no newline before it: the space is part of the answer


def test_split_is_seeded_and_disjoint():
    pairs = fastsplit.demo_pairs()
    assert len(pairs) == 300
    a_tr, a_te = fastsplit.split_pairs(pairs, test_size=0.2, seed=3)
    b_tr, b_te = fastsplit.split_pairs(pairs, test_size=0.2, seed=3)
    c_tr, _ = fastsplit.split_pairs(pairs, test_size=0.2, seed=4)
    assert a_te == b_te and a_tr == b_tr and a_tr != c_tr
    assert len(a_te) == 60 and not set(a_te) & set(a_tr)
    with pytest.raises(ValueError, match="leaves no train"):
        fastsplit.split_pairs(pairs, test_size=300)


def test_balance_answers_keeps_the_rarest_count_of_each_answer():
    P = fastsplit.Pair
    pairs = [P(f"q{i}", " No" if i % 3 else " Yes", " Yes" if i % 3 else " No") for i in range(30)]  # 20 No, 10 Yes
    pairs.append(P("q-free", "Sure, gladly", "No way"))  # a free-text answer is its own group
    out = fastsplit.balance_answers(pairs[:30], seed=1)
    assert sorted(Counter(p.positive for p in out).values()) == [10, 10]
    assert out == [p for p in pairs if p in set(out)]  # input order kept
    assert fastsplit.balance_answers(pairs[:30], seed=1) == out != fastsplit.balance_answers(pairs[:30], seed=2)
    same = fastsplit.balance_answers([P("a", "Yes", "No"), P("b", " Yes", "No"), P("c", " No", "Yes")])
    assert len(same) == 2 and same[-1].prompt == "c"  # "Yes" and " Yes" are one answer: 2 Yes, 1 No -> 1 + 1
    assert len(fastsplit.balance_answers(pairs)) == 3  # one pair per answer: the free text has one
    with pytest.raises(ValueError, match="pairs is empty"):
        fastsplit.balance_answers([])


@pytest.mark.skipif(not os.path.isdir(SHARED), reason="../shared/data is absent")
@pytest.mark.parametrize("name", ["psychopathy", "narcissism"])
def test_real_anthropic_sets(name):
    pairs = fastsplit.load_pairs(os.path.join(SHARED, f"{name}.jsonl"))
    assert len(pairs) == 1000
    assert {p.positive for p in pairs} <= {" Yes", " No"}
    assert all(p.positive != p.negative for p in pairs)
