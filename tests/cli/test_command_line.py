"""The ``moert`` command line: every subcommand has a --help, and bad input is one clear line."""

from __future__ import annotations

import subprocess
import sys

import pytest

from moert.cli import COMMANDS, main


def test_help_lists_every_command(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    for name in COMMANDS:
        assert name in out


@pytest.mark.parametrize(
    "argv", [["eval", "--trace", "NOPE", "--predictor", "prev-token"], ["simulate", "NOPE"]]
)
def test_missing_trace_is_one_line_not_a_traceback(tmp_path, argv):
    argv = [a.replace("NOPE", str(tmp_path / "missing")) for a in argv]
    out = subprocess.run([sys.executable, "-m", "moert", *argv], capture_output=True, text=True)
    assert out.returncode == 2, out.stderr
    assert "Traceback" not in out.stderr
    assert f"moert {argv[0]}: error:" in out.stderr and "missing" in out.stderr


def test_trace_random_prompts_then_eval_next_gate(tmp_path, capsys):
    """A model without a tokenizer: capture from seeded random prompts, then judge next-gate on it."""
    from moert.models.tiny import save_tiny, tiny_config, tiny_model
    from moert.trace import open_trace

    model_dir = save_tiny(tiny_model(tiny_config("qwen3_moe")), tmp_path / "model")
    out = tmp_path / "trace"
    argv = ["trace", "--model", str(model_dir), "--random-prompts", "3", "--prompt-len", "5"]
    assert main([*argv, "--max-new-tokens", "4", "--out", str(out), "--with-hidden"]) == 0
    meta = open_trace(out).meta
    # every token that passed through the model: the prompt, then all generated tokens but the last
    assert (meta.num_sequences, meta.num_tokens, meta.has_hidden) == (3, 3 * (5 + 4 - 1), True)
    js = tmp_path / "eval.json"
    argv = ["eval", "--trace", str(out), "--predictor", "next-gate", "--model", str(model_dir)]
    assert main([*argv, "--split", "all", "--json", str(js)]) == 0
    capsys.readouterr()
    assert js.is_file()
    assert (
        main(["trace", "--model", str(model_dir), "--random-prompts", "0", "--out", str(tmp_path / "x")]) == 2
    )


def test_console_entry_point_in_a_fresh_interpreter():
    """What the `moert` console script runs, in an interpreter where nothing imported importlib.util
    for us (`python -m` and editable-install hooks do; a plain installed console script does not)."""
    code = (
        "import importlib, sys; sys.modules.pop('importlib.util', None); "
        "hasattr(importlib, 'util') and delattr(importlib, 'util'); "
        "from moert.cli import main; sys.exit(main(['--help']))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "simulate" in out.stdout


def test_a_missing_optional_dependency_names_the_extra(monkeypatch, capsys):
    import moert.cli.tour

    def missing(name):
        def run(args):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)

        return run

    monkeypatch.setattr(moert.cli.tour, "run", missing("transformers"))
    assert main(["tour"]) == 2
    assert "pip install 'moert[models]'" in capsys.readouterr().err
    monkeypatch.setattr(moert.cli.tour, "run", missing("not_a_moert_extra"))
    with pytest.raises(ModuleNotFoundError):  # not an optional dependency of moert: a real bug
        main(["tour"])
