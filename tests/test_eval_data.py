"""Bundled and local evaluation data, with readable errors (fdllm_jax.eval.data)."""

import gzip
import json

import pytest

from fdllm_jax.eval import data


def test_bundled_gsm8k_test_split():
  rows = data.load_gsm8k()
  assert len(rows) == 1319
  assert rows[0]["question"].startswith("Janet")
  assert rows[0]["answer"].rstrip().endswith("#### 18")


def test_bundled_humaneval():
  rows = data.load_humaneval()
  assert len(rows) == 164
  assert rows[0]["task_id"] == "HumanEval/0" and rows[0]["entry_point"] == "has_close_elements"
  assert {"prompt", "test", "canonical_solution"} <= set(rows[0])


def test_limit_and_local_file(tmp_path):
  path = tmp_path / "mine.jsonl"
  path.write_text('{"question": "1+1?", "answer": "#### 2"}\n\n'
                  '{"question": "2+2?", "answer": "#### 4"}\n')
  assert [r["answer"] for r in data.load_task_data("gsm8k", str(path))] == ["#### 2", "#### 4"]
  assert len(data.load_task_data("gsm8k", str(path), limit=1)) == 1
  assert len(data.load_task_data("gsm8k", limit=3)) == 3


def test_gsm8k_chat_rows(tmp_path):
  """The demo task's shape: {"messages": [user, assistant], "answer": N}."""
  path = tmp_path / "chat.jsonl"
  row = {"messages": [{"role": "user", "content": "Mia has 3 apples. ..."},
                      {"role": "assistant", "content": "The answer is \\boxed{3}."}],
         "answer": 3}
  data.write_jsonl(str(path), [row])
  assert data.load_gsm8k(str(path)) == [row]
  path.write_text('{"messages": [{"role": "user", "content": "q"}]}\n')
  with pytest.raises(data.DataError, match=r"chat\.jsonl:1: a chat row needs an 'answer'"):
    data.load_gsm8k(str(path))
  path.write_text('{"messages": [{"role": "assistant", "content": "a"}], "answer": 1}\n')
  with pytest.raises(data.DataError, match="no user turn"):
    data.load_gsm8k(str(path))


def test_gzip_file(tmp_path):
  path = tmp_path / "he.jsonl.gz"
  row = {"task_id": "T/0", "prompt": "def f():\n", "entry_point": "f", "test": "def check(c): pass"}
  with gzip.open(path, "wt") as f:
    f.write(json.dumps(row) + "\n")
  assert data.load_humaneval(str(path)) == [row]


@pytest.mark.parametrize("content,message", [
    ('{"question": "q", "answer": "a"}\n{"question": "q"\n', r"bad\.jsonl:2: not valid JSON"),
    ('{"question": "q", "answer": "a"}\n\n{"question": "q"}\n',
     r"bad\.jsonl:3: missing key 'answer'"),
    ('{"question": 3, "answer": "a"}\n', r"bad\.jsonl:1: 'question' must be str, got int"),
    ('[1, 2]\n', r"bad\.jsonl:1: expected a JSON object, got list"),
    ('\n\n', r"bad\.jsonl: holds no rows"),
])
def test_malformed_file_names_the_line(tmp_path, content, message):
  path = tmp_path / "bad.jsonl"
  path.write_text(content)
  with pytest.raises(data.DataError, match=message):
    data.load_gsm8k(str(path))


def test_missing_and_unreadable_files(tmp_path):
  with pytest.raises(data.DataError, match="no such file"):
    data.load_gsm8k(str(tmp_path / "nope.jsonl"))
  with pytest.raises(data.DataError, match="is a directory"):
    data.load_gsm8k(str(tmp_path))
  broken = tmp_path / "broken.jsonl.gz"
  broken.write_bytes(b"not gzip at all")
  with pytest.raises(data.DataError, match="cannot be read"):
    data.load_humaneval(str(broken))
  with pytest.raises(data.DataError, match="unknown task"):
    data.load_task_data("mmlu")


def test_duplicate_task_ids(tmp_path):
  row = {"task_id": "T/0", "prompt": "p", "entry_point": "f", "test": "t"}
  path = tmp_path / "dup.jsonl"
  data.write_jsonl(str(path), [row, row])
  with pytest.raises(data.DataError, match="appears twice"):
    data.load_humaneval(str(path))
