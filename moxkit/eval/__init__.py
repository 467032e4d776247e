"""TOFU- and MUSE-style evaluation: what a model has forgotten and what it has kept, computed
as those benchmarks define their numbers, on their released files as they lie on disk.

    moxkit.eval.evaluate.evaluate(model, data_dir, retain_model=...)     -> report dict
    moxkit.eval.evaluate.evaluate_model(model, tokenizer, data, ...)    -> the same, loaded
    moxkit.eval.data.load_eval_data(data_dir, split=..., max_items=...) -> the sets (any layout)

config (EvalConfig), data (layouts), metrics (the statistics) and rouge (ROUGE-L) import no
torch; scoring and generation hold the model-facing parts.
"""
