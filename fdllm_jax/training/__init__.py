"""Fine-tuning an AR model into a Fast-dLLM v2 block-diffusion LM (and AR pretraining).

Modules (import them directly; the trainer pulls in orbax and is not imported here):
  objective  complementary block masks, the 2L block-diffusion loss, next-token CE
  data       grain pipeline: chat/text jsonl -> ChatML ids + labels -> MASK padding -> packing
  trainer    TrainConfig (gin), TrainProgram (sharded jitted step), Trainer (checkpoints, loop)
  make_sample_data  regenerates sample_data/ (chat.jsonl and a 512-id tokenizer)
"""
