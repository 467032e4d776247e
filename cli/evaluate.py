"""`moxkit eval`: parse, call moxkit.eval.evaluate, print the table, write the JSON report."""

from __future__ import annotations

import click


@click.command("eval")
@click.argument("model", type=click.Path(path_type=str))
@click.option("--data", "data_dir", required=True, type=click.Path(path_type=str),
              help="Evaluation directory: forget.jsonl, retain.jsonl, general.jsonl, "
                   "forget_text.jsonl, holdout_text.jsonl (e.g. a tofu-mini split).")
@click.option("--retain-model", default=None, type=click.Path(path_type=str),
              help="The retain-only model (directory) or its `moxkit eval` report (.json): "
                   "needed for forget quality and PrivLeak.")
@click.option("-o", "--out", default=None, type=click.Path(path_type=str),
              help="Write the JSON report (per item and summary) here.")
@click.option("--batch-size", default=32, show_default=True, type=click.IntRange(min=1))
@click.option("--max-new-tokens", default=32, show_default=True, type=click.IntRange(min=1),
              help="Longest greedy answer.")
@click.option("--max-items", default=None, type=click.IntRange(min=1),
              help="Evaluate at most this many rows of each set but the forget set.")
@click.option("--mia", type=click.Choice(["min_k", "min_k_pp"]), default="min_k",
              show_default=True, help="Membership score for PrivLeak: Min-K% or Min-K%++.")
@click.option("--min-k", default=0.2, show_default=True, type=click.FloatRange(0, 1, min_open=True),
              help="Fraction of lowest-probability tokens Min-K% averages.")
@click.option("--chat-template", is_flag=True, help="Format questions with the chat template.")
@click.option("--device", default="auto", show_default=True, help="cpu, cuda or auto.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
def command(model, data_dir, retain_model, out, batch_size, max_new_tokens, max_items, mia, min_k,
            chat_template, device, quiet) -> None:
    """TOFU and MUSE metrics of MODEL on the sets in --data."""
    from moxkit.eval.evaluate import EvalConfig, evaluate
    from moxkit.eval.report import summary_table, write_json

    cfg = EvalConfig(batch_size=batch_size, max_new_tokens=max_new_tokens, max_items=max_items,
                     min_k=min_k, mia=mia, chat_template=chat_template)
    report = evaluate(model, data_dir, retain_model=retain_model, cfg=cfg, device=device,
                      progress=not quiet)
    click.echo(summary_table(report))
    if out:
        click.echo(f"report: {write_json(out, report)}")
