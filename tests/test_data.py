"""The grain data pipeline: validation, ChatML labels, block padding, packing, exact resume."""

import json

import numpy as np
import pytest

from fdllm_jax.tokenizer import load_tokenizer
from fdllm_jax.training import data
from fdllm_jax.training import make_sample_data
from fdllm_jax.training.objective import IGNORE


@pytest.fixture(scope="module")
def tok():
  return load_tokenizer(make_sample_data.TOKENIZER_DIR)


@pytest.fixture(scope="module")
def source():
  return data.JsonlSource(make_sample_data.CHAT_FILE)


def _write(path, lines):
  path.write_text("".join(line + "\n" for line in lines))
  return str(path)


# ----------------------------------------------------------------------------- validation

def test_missing_file(tmp_path):
  with pytest.raises(FileNotFoundError, match="does not exist"):
    data.JsonlSource(str(tmp_path / "nope.jsonl"))


@pytest.mark.parametrize("bad_line,message", [
    ('{"messages": [{"role": "user", "content": "hi"}', "not valid JSON"),
    ('[1, 2]', "JSON object"),
    ('{"prompt": "x"}', "needs a 'messages' list"),
    ('{"messages": []}', "non-empty list"),
    ('{"messages": [{"role": "user"}]}', "message 0 must be an object"),
    ('{"messages": [{"role": "user", "content": "hi"}]}', "no 'assistant' message"),
    ('{"text": ""}', "non-empty string"),
])
def test_malformed_line_is_reported_with_its_number(tmp_path, bad_line, message):
  good = json.dumps({"messages": [{"role": "user", "content": "a"},
                                  {"role": "assistant", "content": "b"}]})
  path = _write(tmp_path / "d.jsonl", [good, "", good, bad_line, good])
  with pytest.raises(ValueError, match=f"d.jsonl:4: .*{message}"):
    data.JsonlSource(path)


def test_empty_file(tmp_path):
  with pytest.raises(ValueError, match="no examples"):
    data.JsonlSource(_write(tmp_path / "e.jsonl", ["", "  "]))


def test_source_random_access_and_line_numbers(tmp_path):
  lines = [json.dumps({"text": f"doc {i}"}) for i in range(3)]
  src = data.JsonlSource(_write(tmp_path / "t.jsonl", [lines[0], "", lines[1], lines[2]]))
  assert len(src) == 3
  assert src[1]["example"] == {"text": "doc 1"}
  assert src[1]["where"].endswith("t.jsonl:3")


# ----------------------------------------------------------------------------- encoding

def test_chat_ids_equal_chat_template_and_labels_cover_assistant_turns(tok):
  messages = [{"role": "system", "content": "You are a helpful assistant."},
              {"role": "user", "content": "What is 3 plus 4?"},
              {"role": "assistant", "content": "3 plus 4 is 7."},
              {"role": "user", "content": "Count from 1 to 3."},
              {"role": "assistant", "content": "1, 2, 3"}]
  ids, labels = data.encode_chat(tok, messages)
  assert list(ids) == tok.apply_chat_template(messages, add_generation_prompt=False)
  supervised = tok.decode(ids[labels != IGNORE])
  assert supervised == "3 plus 4 is 7.<|im_end|>1, 2, 3<|im_end|>"
  np.testing.assert_array_equal(labels[labels != IGNORE], ids[labels != IGNORE])
  im_end = tok.hf.convert_tokens_to_ids("<|im_end|>")
  # Every <|im_end|> closing an assistant turn is a label; the newline after it is not.
  ends = np.flatnonzero(ids == im_end)
  assert [bool(labels[e] != IGNORE) for e in ends] == [False, False, True, False, True]
  assert all(labels[e + 1] == IGNORE for e in ends)


def test_text_examples_are_fully_supervised_with_eos(tok):
  ids, labels = data.encode_text(tok, "Count from 1 to 3.")
  assert ids[-1] == tok.hf.convert_tokens_to_ids("<|endoftext|>")
  np.testing.assert_array_equal(ids, labels)


def test_pad_to_block(tok):
  ids, labels = np.arange(10, dtype=np.int32), np.arange(10, dtype=np.int32)
  pid, plab = data.pad_to_block(ids, labels, 8, tok.mask_id)
  assert len(pid) == 16 and (pid[10:] == tok.mask_id).all() and (plab[10:] == IGNORE).all()
  same = data.pad_to_block(ids[:8], labels[:8], 8, tok.mask_id)
  assert len(same[0]) == 8


def test_end_at_last_label_drops_the_newline_after_the_answer(tok):
  messages = [{"role": "user", "content": "What is 3 plus 4?"},
              {"role": "assistant", "content": "3 plus 4 is 7."}]
  ids, labels = data.encode_chat(tok, messages)
  assert tok.decode(ids[-2:]) == "<|im_end|>\n" and labels[-1] == IGNORE
  cut_ids, cut_labels = data.end_at_last_label(ids, labels)
  np.testing.assert_array_equal(cut_ids, ids[:-1])
  np.testing.assert_array_equal(cut_labels, labels[:-1])
  assert cut_ids[-1] == tok.hf.convert_tokens_to_ids("<|im_end|>")
  unlabelled = np.full(5, IGNORE, np.int32)
  assert len(data.end_at_last_label(np.arange(5), unlabelled)[0]) == 5  # nothing to end at
  record = {"example": {"messages": messages}, "where": "test"}
  plain = data.EncodeExample(tok, block_size=8, pad_mask_token=True)(record)
  ended = data.EncodeExample(tok, block_size=8, pad_mask_token=True,
                             end_at_last_label=True)(record)
  # the newline's slot becomes MASK padding, the rest is unchanged
  last = len(ids) - 1
  np.testing.assert_array_equal(ended["input_ids"][:last], plain["input_ids"][:last])
  assert plain["input_ids"][last] == ids[-1] and ended["input_ids"][last] == tok.mask_id
  assert len(ended["input_ids"]) % 8 == 0
  np.testing.assert_array_equal(ended["labels"], plain["labels"][:len(ended["labels"])])


def test_batches_end_samples_at_their_last_label(source, tok):
  it = data.BatchIterator(source, tok, global_batch_size=2, seq_len=64, block_size=16,
                          pad_mask_token=True, seed=3, end_at_last_label=True)
  stream = np.concatenate([next(it)["input_ids"][0] for _ in range(6)])
  im_end, im_start = (tok.hf.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|im_start|>"))
  (newline,) = tok.encode("\n")
  ends = np.flatnonzero(stream[:-2] == im_end)
  # a newline after <|im_end|> only inside a sample (another turn follows), never at its end
  for end in ends[stream[ends + 1] == newline]:
    assert stream[end + 2] == im_start
  assert (stream[ends + 1] == tok.mask_id).any()


# ----------------------------------------------------------------------------- packing / batches

def _row_samples(source, tok, row, num_rows, seed, block_size, pad, count):
  """Reference: the encoded samples of one row, in order (shuffle -> repeat -> stride)."""
  import grain
  order = grain.MapDataset.range(len(source)).shuffle(seed=seed).repeat()[row::num_rows]
  encode = data.EncodeExample(tok, block_size=block_size, pad_mask_token=pad)
  return [encode(source[order[i]]) for i in range(count)]


@pytest.mark.parametrize("pad", [True, False])
def test_packing_concatenates_samples_in_order(source, tok, pad):
  seq_len, block, rows, steps = 64, 16, 4, 6
  it = data.BatchIterator(source, tok, global_batch_size=rows, seq_len=seq_len, block_size=block,
                          pad_mask_token=pad, seed=3)
  batches = [next(it) for _ in range(steps)]
  for b in batches:
    assert b["input_ids"].shape == (rows, seq_len) and b["input_ids"].dtype == np.int32
  for row in (0, 3):
    stream_ids = np.concatenate([b["input_ids"][row] for b in batches])
    stream_labels = np.concatenate([b["labels"][row] for b in batches])
    samples = _row_samples(source, tok, row, rows, 3, block, pad, count=20)
    ref_ids = np.concatenate([s["input_ids"] for s in samples])[:len(stream_ids)]
    ref_labels = np.concatenate([s["labels"] for s in samples])[:len(stream_ids)]
    np.testing.assert_array_equal(stream_ids, ref_ids)
    np.testing.assert_array_equal(stream_labels, ref_labels)
    if pad:  # every sample starts on a block boundary
      lengths = np.cumsum([len(s["input_ids"]) for s in samples])
      assert (lengths % block == 0).all()
      starts = np.concatenate([[0], lengths[:-1]])
      im_start = tok.hf.convert_tokens_to_ids("<|im_start|>")
      starts = starts[starts < len(stream_ids)]
      assert (stream_ids[starts] == im_start).all()


def test_deterministic_for_a_seed(source, tok):
  make = lambda seed: data.BatchIterator(source, tok, global_batch_size=2, seq_len=32,
                                         block_size=8, seed=seed)
  a, b, c = make(0), make(0), make(1)
  for _ in range(3):
    x, y, z = next(a), next(b), next(c)
    np.testing.assert_array_equal(x["input_ids"], y["input_ids"])
  assert not np.array_equal(x["input_ids"], z["input_ids"])


def test_state_restore_replays_exactly(source, tok):
  kwargs = dict(global_batch_size=3, seq_len=48, block_size=16, seed=5)
  it = data.BatchIterator(source, tok, **kwargs)
  for _ in range(4):
    next(it)
  state = json.loads(json.dumps(it.get_state()))  # must survive JSON (checkpoint format)
  expected = [next(it) for _ in range(5)]
  resumed = data.BatchIterator(source, tok, **kwargs)
  resumed.set_state(state)
  for want in expected:
    got = next(resumed)
    np.testing.assert_array_equal(got["input_ids"], want["input_ids"])
    np.testing.assert_array_equal(got["labels"], want["labels"])


def test_rows_of_a_process_equal_rows_of_the_full_batch(source, tok):
  kwargs = dict(global_batch_size=4, seq_len=32, block_size=8, seed=2)
  full = data.BatchIterator(source, tok, **kwargs)
  part_a = data.BatchIterator(source, tok, rows=[0, 1], **kwargs)
  part_b = data.BatchIterator(source, tok, rows=[2, 3], **kwargs)
  for _ in range(3):
    want = next(full)["input_ids"]
    np.testing.assert_array_equal(np.concatenate([next(part_a)["input_ids"],
                                                  next(part_b)["input_ids"]]), want)
  merged = data.merge_row_states([part_a.get_state(), part_b.get_state()])
  again = data.BatchIterator(source, tok, **kwargs)
  again.set_state(merged)
  np.testing.assert_array_equal(next(again)["input_ids"], next(full)["input_ids"])


def test_state_mismatch_is_an_error(source, tok):
  it = data.BatchIterator(source, tok, global_batch_size=2, seq_len=32, block_size=8)
  other = data.BatchIterator(source, tok, global_batch_size=2, seq_len=64, block_size=8)
  with pytest.raises(ValueError, match="seq_len"):
    other.set_state(it.get_state())
  wider = data.BatchIterator(source, tok, global_batch_size=2, seq_len=32, block_size=8, rows=[1])
  state = it.get_state()
  del state["rows"]["1"]
  with pytest.raises(ValueError, match="lacks rows"):
    wider.set_state(state)


def test_seq_len_must_be_a_multiple_of_block_size(source, tok):
  with pytest.raises(ValueError, match="multiple of the block size"):
    data.BatchIterator(source, tok, global_batch_size=2, seq_len=40, block_size=16)


def test_epochs_reshuffle(tmp_path, tok):
  path = _write(tmp_path / "small.jsonl", [json.dumps({"text": f"doc {i}"}) for i in range(5)])
  src = data.JsonlSource(path)
  import grain
  order = grain.MapDataset.range(5).shuffle(seed=0).repeat()
  first, second = [order[i] for i in range(5)], [order[i] for i in range(5, 10)]
  assert sorted(first) == sorted(second) == list(range(5)) and first != second
  it = data.BatchIterator(src, tok, global_batch_size=1, seq_len=8, block_size=8, seed=0,
                          pad_mask_token=False)
  assert next(it)["input_ids"].shape == (1, 8)


def test_sample_data_is_reproducible(tmp_path):
  path = str(tmp_path / "chat.jsonl")
  make_sample_data.write_chat_jsonl(path, 2000, 0)
  with open(path) as f, open(make_sample_data.CHAT_FILE) as g:
    assert f.read() == g.read()
