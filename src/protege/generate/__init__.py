"""Imitation-data generators. Each is one module with a config class and `run(config) -> counts`,
registered as `generate.*` kinds in `protege.stages`, writing `out_dir/records.jsonl` + `manifest.json` (+ the teacher cache that makes reruns resume):

- `selfinstruct`: Self-Instruct / Alpaca — bootstrap new tasks from seed tasks, then answer them.
- `distill`: Vicuna / GPT4All — answer a prompt set, multi-turn prompts turn by turn.
- `orca`: explanation tuning — task-typed system messages; progressive teachers, one dataset each.
- `selfchat`: Baize — the teacher plays both user and assistant from seed topics.
"""
