"""TOFU- and MUSE-style evaluation: what a model has forgotten and what it has kept.

    moxkit.eval.evaluate.evaluate(model_dir, data_dir, retain_model=...)  -> report dict
    moxkit.eval.evaluate.evaluate_model(model, tokenizer, data_dir, ...)  -> the same, loaded

The statistics (moxkit.eval.metrics) and ROUGE-L (moxkit.eval.rouge) need no model and import
no torch.
"""
