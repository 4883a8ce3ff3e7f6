"""Imitation-data generators. Each is one module with a config class and `run(config) -> counts`,
writing `out_dir/records.jsonl` + `manifest.json` (+ the teacher cache that makes reruns resume):

- `selfinstruct`: Self-Instruct / Alpaca — bootstrap new tasks from seed tasks, then answer them.
- `distill`: Vicuna / GPT4All — answer a prompt set, multi-turn prompts turn by turn.
- `orca`: explanation tuning — task-typed system messages; progressive teachers, one dataset each.
- `selfchat`: Baize — the teacher plays both user and assistant from seed topics.
"""

GENERATORS = {
    "self-instruct": ("protege.generate.selfinstruct", "SelfInstructConfig"),
    "distill": ("protege.generate.distill", "DistillConfig"),
    "orca": ("protege.generate.orca", "OrcaConfig"),
    "self-chat": ("protege.generate.selfchat", "SelfChatConfig"),
}
