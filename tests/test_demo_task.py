"""The demo task generator: determinism, disjoint splits, correct solutions, chat jsonl, tokenizer."""

import json
import random
import re

import pytest

from fdllm_jax.demo import task


def test_deterministic_for_a_seed():
  assert task.generate("train", 50, seed=3) == task.generate("train", 50, seed=3)
  assert task.generate("test", 20, seed=3) == task.generate("test", 20, seed=3)
  assert task.generate("train", 50, seed=3) != task.generate("train", 50, seed=4)


def test_prefix_stable_when_asking_for_more():
  assert task.generate("train", 100, seed=0)[:40] == task.generate("train", 40, seed=0)


def test_splits_are_disjoint_and_distinct():
  train = task.generate("train", 3000, seed=0)
  test = task.generate("test", 300, seed=0)
  train_q = {p.question for p in train}
  test_q = {p.question for p in test}
  assert len(train_q) == len(train) and len(test_q) == len(test)
  assert not train_q & test_q
  assert all(task.split_of(q) == "test" for q in test_q)
  assert all(task.split_of(q) == "train" for q in train_q)
  # other seeds draw other problems but never cross the split line
  assert not {p.question for p in task.generate("train", 500, seed=7)} & test_q


def test_split_fraction_is_about_the_test_percent():
  rng = random.Random(0)
  questions = [task.random_problem(rng).question for _ in range(4000)]
  share = sum(task.split_of(q) == "test" for q in questions) / len(questions)
  assert abs(share - task.TEST_PERCENT / 100) < 0.03


def _evaluate_story(question: str) -> int:
  """An independent reading of the question text (not the generator's code) -> the answer."""
  total = 0
  for sentence in re.split(r"(?<=[.?])\s+", question):
    numbers = [int(n) for n in re.findall(r"\d+", sentence)]
    if "equally among" in sentence:
      assert total % numbers[0] == 0
      total //= numbers[0]
    elif "doubles" in sentence:
      total *= 2
    elif "in each" in sentence:
      total += numbers[0] * numbers[1]
    elif sentence.startswith("Each "):
      total *= numbers[0]
    elif " buys " in sentence or " finds " in sentence:
      total += numbers[0]
    elif " gives " in sentence or " loses " in sentence:
      total -= numbers[0]
    elif " has " in sentence:
      total = numbers[0]  # the start: "X has a items." or "X has a boxes of items."
  return total


def test_answers_are_correct():
  rng = random.Random(1)
  for _ in range(2000):
    problem = task.random_problem(rng)
    assert task.check_solution(problem), problem
    assert _evaluate_story(problem.question) == problem.answer, problem
    assert problem.solution.endswith(f"\\boxed{{{problem.answer}}}.")


def test_numbers_stay_small():
  rng = random.Random(2)
  for _ in range(2000):
    problem = task.random_problem(rng)
    for number in re.findall(r"\d+", problem.question + problem.solution):
      assert 1 <= int(number) <= task.MAX_TOTAL, problem
    # every operation of the story has one solution line, plus the final line
    ops = len(re.findall(r" = ", problem.solution))
    assert 1 <= ops <= 8


def test_chat_jsonl_round_trip(tmp_path):
  problems = task.generate("test", 5, seed=0)
  path = str(tmp_path / "d" / "test.jsonl")
  task.write_jsonl(path, problems)
  rows = task.read_jsonl(path)
  assert len(rows) == 5
  for row, problem in zip(rows, problems):
    assert [m["role"] for m in row["messages"]] == ["user", "assistant"]
    assert row["messages"][0]["content"] == problem.prompt
    assert row["messages"][1]["content"] == problem.solution
    assert row["answer"] == problem.answer
  with open(path) as f:
    assert all(json.loads(line) for line in f)


@pytest.mark.parametrize("text, expected", [
    ("so 3 + 4 = 7.\nThe answer is \\boxed{7}.", 7),
    ("\\boxed{1} then \\boxed{ 12 }", 12),
    ("The answer is 7.", None),
    ("\\boxed{seven}", None),
])
def test_extract_answer(text, expected):
  assert task.extract_answer(text) == expected


def test_bad_arguments():
  with pytest.raises(ValueError, match="split"):
    task.generate("validation", 3)
  with pytest.raises(ValueError, match="num"):
    task.generate("train", -1)


def test_tokenizer_trains_and_loads(tmp_path):
  from fdllm_jax import load_tokenizer
  from fdllm_jax.demo import tokenizer_train
  rows = [p.to_chat() for p in task.generate("train", 400, seed=0)]
  hf_tok = tokenizer_train.train_tokenizer(tokenizer_train.chat_texts(rows), vocab_size=600)
  tokenizer_train.save_tokenizer(hf_tok, str(tmp_path))
  tok = load_tokenizer(str(tmp_path))
  vocab = tok.hf.get_vocab()
  assert tok.mask_id == vocab["|<MASK>|"]
  assert tok.stop_ids[0] == vocab["<|im_end|>"]
  assert tok.pad_id == vocab["<|endoftext|>"]
  assert tok.vocab_size <= 600
  problem = task.generate("test", 1, seed=0)[0]
  ids = tok.encode(problem.solution)
  assert tok.decode(ids) == problem.solution
  # digits are single-character tokens (a leading space may ride on the first one)
  for i in ids:
    piece = tok.decode([i])
    if any(c.isdigit() for c in piece):
      assert len(piece.strip()) == 1, piece
  chat = tok.apply_chat_template(problem.to_chat()["messages"][:1])
  assert chat[0] == vocab["<|im_start|>"]
  assert tok.decode(chat).endswith("<|im_start|>assistant\n")


def test_tokenizer_whole_numbers(tmp_path):
  from fdllm_jax import load_tokenizer
  from fdllm_jax.demo import tokenizer_train
  rows = [p.to_chat() for p in task.generate("train", 400, seed=0)]
  hf_tok = tokenizer_train.train_tokenizer(tokenizer_train.chat_texts(rows), vocab_size=1024,
                                           numbers="whole")
  tokenizer_train.save_tokenizer(hf_tok, str(tmp_path))
  tok = load_tokenizer(str(tmp_path))
  problem = task.generate("test", 1, seed=0)[0]
  ids = tok.encode(problem.solution)
  assert tok.decode(ids) == problem.solution
  pieces = [tok.decode([i]).strip() for i in ids]
  numbers = [p for p in pieces if any(c.isdigit() for c in p)]
  # the frequent numbers of the task are one token each, never glued to other text
  assert all(p.isdigit() for p in numbers), numbers
  assert any(len(p) == 2 for p in numbers), numbers
  with pytest.raises(ValueError, match="numbers must be one of"):
    tokenizer_train.train_tokenizer(["1 2"], numbers="roman")


def test_held_out_prompts_are_the_test_split_as_user_turns():
  from fdllm_jax import demo, load_tokenizer
  tokenizer = load_tokenizer(demo.FAST_DLLM_DIR)
  problems, prompts = task.held_out_prompts(tokenizer, 3, seed=1)
  assert problems == task.generate("test", 3, 1)
  for problem, prompt in zip(problems, prompts, strict=True):
    text = tokenizer.decode(prompt)
    assert text == f"<|im_start|>user\n{problem.question}<|im_end|>\n<|im_start|>assistant\n"
