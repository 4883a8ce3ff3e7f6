"""Honest evaluation: benchmarks (substance), answers, an LLM judge that reports its own biases (style),
reward-model scores. Each is a stage (`stages.STAGE_KINDS`); the report that puts them side by side is
`protege.report`.

    bench.run(BenchConfig(model=..., tasks=[...], out_dir=...))        per-item JSONL + results.json
    answer.run(AnswerConfig(answerer={"model": ...}, prompts=..., out_dir=...))
                                                                       a model's answers to a prompt set
                                                                       (who answers: a TeacherConfig)
    judge.run(JudgeConfig(answers=[a, b], out_dir=...))                pairwise / single / reference grading
    rm_score.run(RMScoreConfig(answers=[...], rm=..., out_dir=...))    reward-model scores of answer sets
"""
