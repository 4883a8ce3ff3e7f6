"""Honest evaluation: benchmarks (substance), an LLM judge that reports its own biases (style), a report.

    bench.run(BenchConfig(model=..., tasks=[...], out_dir=...))     per-item JSONL + results.json
    answer.run(AnswerConfig(model=..., prompts=..., out_dir=...))   a model's answers to a prompt set
    judge.run(JudgeConfig(answers_a=..., answers_b=..., ...))       pairwise / single / reference grading
    report.run(ReportConfig(inputs=[...], output="report.html"))     style vs substance, one HTML page
"""
