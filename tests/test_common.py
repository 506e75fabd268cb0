"""common.py: settings (renamed flags and bare booleans refused, no prefixes; every script's get_parser + main(argv)
convention, --config not leaking, --help showing defaults), jsonl logs with a torn last line, and atomic writes on
disk before their names. (run_main's exit of a torchrun worker: test_parallel.py, beside the gloo threads that make it
needed.)"""
import json
import os

import pytest

import ckpt
import common


def test_output_a_terminal_cannot_show_is_escaped_not_an_error():
    """sample_effect prints "∇J" after computing it and before saving it; report prints "±" tables: an ASCII stdout
    (PYTHONIOENCODING, or PYTHONUTF8=0 under a Latin-1 locale) must not end the run there."""
    import os
    import subprocess
    import sys
    code = "import common; common.run_main(lambda: print('\\u2207J \\xb1 \\u2013') or print('done'))"  # (argv: ASCII)
    env = {**os.environ, "PYTHONIOENCODING": "ascii"}
    here = os.path.dirname(ckpt.__file__)
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, cwd=here)
    assert done.returncode == 0, done.stderr
    assert done.stdout == b"\\u2207J \\xb1 \\u2013\ndone\n"


def test_settings_refuse_old_spellings_bare_booleans_and_prefixes():
    import argparse
    import common
    import train_rl
    with pytest.raises(common.UserError, match=r"^--group_size is now --samples_per_prompt$"):
        common.parse_settings(train_rl.get_parser(), ["--group_size", "4"])
    with pytest.raises(common.UserError, match=r"--eight_bit_adam is now --adam_8bit"):
        common.parse_settings(train_rl.get_parser(), ["--eight_bit_adam=true"])
    import redistill_sft
    with pytest.raises(common.UserError, match=r"^--bf16 is now --dtype \(auto: bfloat16 on CUDA, float32 on CPU\)$"):
        common.parse_settings(redistill_sft.get_parser(), ["--bf16", "true"])
    for argv in (["--resume"], ["--resume", "--seed", "3"]):
        with pytest.raises(common.UserError, match=r"--resume takes a value: --resume true or --resume false"):
            common.parse_settings(train_rl.get_parser(), argv)
    args = common.parse_settings(train_rl.get_parser(), ["--resume", "true", "--samples_per_prompt", "4"])
    assert args.resume is True and args.samples_per_prompt == 4
    assert common.parse_settings(train_rl.get_parser(), ["--resume=false"]).resume is False
    p = argparse.ArgumentParser(prog="t")
    p.add_argument("--kv_cache_gib", type=float, default=16.0)
    p.add_argument("--samples_per_prompt", type=int, default=8)
    with pytest.raises(common.UserError, match=r"--k is now --samples_per_prompt"):  # not a prefix of --kv_cache_gib
        common.parse_settings(p, ["--k", "2"])
    with pytest.raises(SystemExit):  # prefixes are not accepted
        common.parse_settings(p, ["--kv_cache", "2"])


def test_generating_scripts_share_the_names_of_the_response_budget_and_the_decode_batch(tmp_path):
    """One name per thing: train_rl.py's --max_response_tokens and --gen_batch_size are the other scripts' too (they
    were --max_new_tokens and --batch_size in some); the old spellings, on the command line or in a --config, are
    errors naming the new one."""
    import json
    import common
    import eval as eval_script
    import sample_effect
    import sample_policy
    import token_shift
    import train_rl
    for script in (train_rl, sample_policy, eval_script, sample_effect, token_shift):
        options = script.get_parser()._option_string_actions
        assert "--max_response_tokens" in options and "--max_new_tokens" not in options, script.__name__
        if script is not token_shift:  # (its --batch_size also counts the responses of one scoring forward)
            assert "--gen_batch_size" in options and "--batch_size" not in options, script.__name__
    with pytest.raises(common.UserError, match=r"^--max_new_tokens is now --max_response_tokens$"):
        common.parse_settings(eval_script.get_parser(), ["--max_new_tokens", "8"])
    with pytest.raises(common.UserError, match=r"^--batch_size is now --gen_batch_size"):
        common.parse_settings(sample_policy.get_parser(), ["--batch_size=8"])
    config = tmp_path / "old.json"
    config.write_text(json.dumps({"max_new_tokens": 8, "batch_size": 4}))
    with pytest.raises(common.UserError, match=r"old\.json: unknown setting\(s\) \['batch_size', 'max_new_tokens'\] "
                                               r"for .*; batch_size is now gen_batch_size .*; max_new_tokens is now "
                                               r"max_response_tokens$"):
        common.parse_settings(eval_script.get_parser(), ["--config", str(config)])


def test_a_setting_given_in_a_config_whose_switch_is_off_is_noted_too(tmp_path, capsys):
    """note_unused compared with the parser's default, which parse_settings makes the --config's value: a sweep arm
    whose config set --dwa_s without --adv_weight dwa ran plain GRPO without the note the command line gets."""
    import json
    import common
    import train_rl
    (tmp_path / "arm.json").write_text(json.dumps({"dwa_s": 1.5}))
    for argv in (["--dwa_s", "1.5"], ["--config", str(tmp_path / "arm.json")]):
        parser = train_rl.get_parser()
        args = common.parse_settings(parser, argv)
        assert common.script_default(parser, "dwa_s") == train_rl.get_parser().get_default("dwa_s") != 1.5
        common.note_unused(args, parser, ("dwa_s",), True, "--adv_weight dwa")
        assert "note: --dwa_s not used: only --adv_weight dwa uses it" in capsys.readouterr().out, argv


def test_a_setting_argparse_refuses_is_one_line_and_help_shows_what_a_boolean_takes(capsys):
    """argparse printed its whole usage before the error (54 lines for train_rl.py): one line now, as a UserError's;
    and --help said "--resume RESUME", not that it takes true or false."""
    import train_rl
    for argv, error in ((["--nope"], "unrecognized arguments: --nope"),
                        (["--gradient_checkpointing", "maybe"], "argument --gradient_checkpointing: expected a "
                                                                "boolean, got 'maybe'"),
                        (["--max_steps", "x"], "argument --max_steps: invalid int value: 'x'")):
        with pytest.raises(SystemExit) as e:
            common.parse_settings(train_rl.get_parser(), argv)
        assert e.value.code == 2
        assert capsys.readouterr().err == f"train_rl.py: error: {error} (--help lists every setting)\n"
    with pytest.raises(SystemExit):
        common.parse_settings(train_rl.get_parser(), ["--help"])
    assert "--resume {true,false}" in capsys.readouterr().out


def test_a_home_the_shell_did_not_expand_is_expanded(tmp_path, monkeypatch):
    """bash leaves `--out_dir=~/x` as it is, and a --config is no shell: the run wrote ./~/x, named "~/x"."""
    import eval as eval_script
    monkeypatch.setenv("HOME", str(tmp_path))
    config = tmp_path / "c.json"
    config.write_text(json.dumps({"checkpoints": ["~/ck", "ck2"], "splits": ["~"]}))
    args = common.parse_settings(eval_script.get_parser(), ["--config", str(config), "--out_dir=~/x", "--task",
                                                            "~user/kept"])
    assert args.out_dir == str(tmp_path / "x") and args.checkpoints == [str(tmp_path / "ck"), "ck2"]
    assert args.splits == [str(tmp_path)] and args.task == "~user/kept"  # (only the home of the one running it)
    args = common.parse_settings(eval_script.get_parser(), ["--config=~/c.json"])  # (bash leaves this one too)
    assert args.checkpoints == [str(tmp_path / "ck"), "ck2"]
    # an earlier version made ./~/x for this spelling: a resume would start afresh in the home's x, so it is refused
    monkeypatch.chdir(tmp_path)
    (tmp_path / "~" / "x").mkdir(parents=True)
    with pytest.raises(common.UserError, match=rf"--out_dir ~/x: ambiguous, {tmp_path}/~/x exists .* and ~ is "
                                               rf"{tmp_path}; give the one you mean as an absolute path"):
        common.parse_settings(eval_script.get_parser(), ["--out_dir=~/x"])


SCRIPTS = ("bench", "eval", "kk_data", "lim_select", "math_data", "redistill_sft", "report", "sample_effect",
           "sample_policy", "tiny_base", "token_shift", "train_rl")


@pytest.mark.parametrize("name", SCRIPTS)
def test_every_script_has_get_parser_and_main_argv_and_help_shows_defaults(name, tmp_path):
    """One settings convention: get_parser() builds a fresh parser on each call (a --config must not leak into the
    next main() of the same process: tests, notebooks), main takes argv, and --help shows every default."""
    import importlib
    import inspect
    module = importlib.import_module(name)
    assert list(inspect.signature(module.main).parameters) == ["argv"]
    parser = module.get_parser()
    assert parser is not module.get_parser()
    action = next(a for a in parser._actions if a.option_strings and a.dest != "help" and a.type in (int, str, None)
                  and a.default is not None and not a.choices and a.nargs is None and "default" not in a.help)
    value = 7 if action.type is int else "from-config"
    (tmp_path / "cfg.json").write_text(json.dumps({action.dest: value}))
    settings = common.parse_settings(module.get_parser(), ["--config", str(tmp_path / "cfg.json")])
    assert getattr(settings, action.dest) == value
    assert getattr(common.parse_settings(module.get_parser(), []), action.dest) == action.default
    assert f"(default: {action.default})" in " ".join(module.get_parser().format_help().split())


@pytest.mark.parametrize("name", SCRIPTS)
def test_a_config_may_give_one_value_where_a_setting_takes_a_list(name, tmp_path):
    """{"split": "a.jsonl"} in a --config file means the list ["a.jsonl"], as `--split a.jsonl` does, not the
    characters of the path; a typed list takes its type."""
    import importlib
    module = importlib.import_module(name)
    lists = [a for a in module.get_parser()._actions if a.option_strings and a.nargs in ("+", "*")]
    if not lists:
        pytest.skip(f"{name} has no list setting")
    for action in lists:
        value = (list(action.choices)[0] if action.choices else "7" if action.type in (int, float)
                 else "one/path.jsonl")
        (tmp_path / "cfg.json").write_text(json.dumps({action.dest: value}))
        settings = common.parse_settings(module.get_parser(), ["--config", str(tmp_path / "cfg.json")])
        assert getattr(settings, action.dest) == [action.type(value) if action.type else value], action.dest
        assert getattr(settings, action.dest) == getattr(
            common.parse_settings(module.get_parser(), [action.option_strings[0], value]), action.dest)


@pytest.mark.parametrize("name", SCRIPTS)
def test_a_config_file_is_checked_as_the_command_line_is(name, tmp_path):
    """argparse checks neither the type nor the choices of a default, which is what a --config value becomes: every
    setting's default written as JSON reads back as itself, a value outside a setting's choices ("K3" for k3) is one
    line naming the file and setting, and a JSON string where a number is taken is converted as on the command line
    (["125"] for --keep_steps: ints, which the prune compares with steps)."""
    import importlib
    module = importlib.import_module(name)
    parser, cfg = module.get_parser(), tmp_path / "cfg.json"
    defaults = {a.dest: a.default for a in parser._actions if a.option_strings and a.dest != "help"}
    cfg.write_text(json.dumps(defaults))
    assert vars(common.parse_settings(module.get_parser(), ["--config", str(cfg)])) == dict(defaults, config=str(cfg))
    for action in parser._actions:
        if action.choices:
            cfg.write_text(json.dumps({action.dest: "not-a-choice"}))
            with pytest.raises(common.UserError, match=rf"cfg\.json: setting '{action.dest}': 'not-a-choice' is not "
                                                       rf"one of"):
                common.parse_settings(module.get_parser(), ["--config", str(cfg)])
        if action.type in (int, float) and action.nargs is None:
            cfg.write_text(json.dumps({action.dest: "7"}))
            assert getattr(common.parse_settings(module.get_parser(), ["--config", str(cfg)]), action.dest) == 7
            cfg.write_text(json.dumps({action.dest: [7]}))
            with pytest.raises(common.UserError, match=f"setting '{action.dest}' takes one value"):
                common.parse_settings(module.get_parser(), ["--config", str(cfg)])
        if action.type is common.str2bool:
            cfg.write_text(json.dumps({action.dest: "maybe"}))
            with pytest.raises(common.UserError, match=f"setting '{action.dest}': expected a boolean"):
                common.parse_settings(module.get_parser(), ["--config", str(cfg)])
        # an object, or a list in a list, is no value: its JSON text passed as a path or name ({"a": 1} as '{"a": 1}')
        if action.option_strings and action.nargs != 0 and action.dest not in ("help", "config"):
            for value, kind in (({"a": 1}, "an object"), ([[1, 2]], "a list inside a list")):
                cfg.write_text(json.dumps({action.dest: value if action.nargs in ("+", "*") or kind == "an object"
                                           else value[0]}))
                with pytest.raises(common.UserError, match=rf"setting '{action.dest}': .* is {kind}|takes one value"):
                    common.parse_settings(module.get_parser(), ["--config", str(cfg)])
        # null is "not set" only where that is the default: elsewhere it would pass the checks that let None through
        # (std_normalize null read as false, seed null as no seed)
        cfg.write_text(json.dumps({action.dest: None}))
        if action.default is None:
            assert getattr(common.parse_settings(module.get_parser(), ["--config", str(cfg)]), action.dest) is None
        elif action.option_strings and action.nargs != 0 and action.dest != "help":
            with pytest.raises(common.UserError, match=rf"cfg\.json: setting '{action.dest}' is null; it takes a "
                                                       rf"value \(default "):
                common.parse_settings(module.get_parser(), ["--config", str(cfg)])


def test_a_config_keep_steps_as_text_keeps_the_checkpoints_it_names(tmp_path):
    import train_rl
    (tmp_path / "cfg.json").write_text(json.dumps({"keep_steps": ["125", 100], "kl_estimator": "k3"}))
    args = common.parse_settings(train_rl.get_parser(), ["--config", str(tmp_path / "cfg.json")])
    assert args.keep_steps == [125, 100] and args.kl_estimator == "k3"
    (tmp_path / "cfg.json").write_text(json.dumps({"kl_estimator": "low_var_kl"}))  # verl's name: no KL at all
    with pytest.raises(common.UserError, match=r"'kl_estimator': 'low_var_kl' is not one of k1, k3"):
        common.parse_settings(train_rl.get_parser(), ["--config", str(tmp_path / "cfg.json")])


def test_a_config_key_may_be_spelled_with_dashes_as_on_the_command_line(tmp_path, capsys):
    """{"max-steps": 7} is --max-steps spelled as on the command line (and as YAML-minded users write keys): it
    sets max_steps, not refused as an unknown setting; a key that is unknown either way still is."""
    import train_rl
    (tmp_path / "cfg.json").write_text(json.dumps({"max-steps": 7, "kl_estimator": "k1"}))
    args = common.parse_settings(train_rl.get_parser(), ["--config", str(tmp_path / "cfg.json")])
    assert args.max_steps == 7 and args.kl_estimator == "k1"
    (tmp_path / "cfg.json").write_text(json.dumps({"max-stepz": 7}))
    with pytest.raises(common.UserError, match=r"unknown setting\(s\) \['max-stepz'\]"):
        common.parse_settings(train_rl.get_parser(), ["--config", str(tmp_path / "cfg.json")])
    # one setting in both spellings: the later key won without a word, so the file's order chose the run's value
    (tmp_path / "cfg.json").write_text(json.dumps({"max_steps": 3, "max-steps": 7}))
    with pytest.raises(common.UserError, match=r"cfg\.json: setting 'max_steps' given twice \('max_steps' and "
                                               r"'max-steps'\); keep one$"):
        common.parse_settings(train_rl.get_parser(), ["--config", str(tmp_path / "cfg.json")])
    # "help" is no setting: it was taken and did nothing
    (tmp_path / "cfg.json").write_text(json.dumps({"help": True}))
    with pytest.raises(common.UserError, match=r"unknown setting\(s\) \['help'\]"):
        common.parse_settings(train_rl.get_parser(), ["--config", str(tmp_path / "cfg.json")])
    # a run's own settings.json is a config (docs/grpo.md's variant recipe), with the "config" it began from, which
    # no file includes: said, not read (its settings are all there)
    (tmp_path / "base.json").write_text(json.dumps({"max_steps": 9}))
    settings = vars(common.parse_settings(train_rl.get_parser(), ["--config", str(tmp_path / "base.json")]))
    (tmp_path / "settings.json").write_text(json.dumps(settings))
    (tmp_path / "base.json").write_text(json.dumps({"max_steps": 4}))  # (edited since: not read)
    assert common.parse_settings(train_rl.get_parser(), ["--config", str(tmp_path / "settings.json")]).max_steps == 9
    assert f"its 'config' ({tmp_path / 'base.json'}) is not read: a config file includes no other" in \
        capsys.readouterr().err


def test_an_output_may_not_be_an_input_or_another_output(tmp_path):
    """check_distinct_outputs: an output that is one of the inputs (by its real path: a link to it too) would be
    overwritten as it is read; two outputs on one file would replace each other's result. Empty paths are unset
    settings and skipped."""
    data = tmp_path / "data.jsonl"
    data.write_text("{}\n")
    (tmp_path / "link.jsonl").symlink_to(data)
    common.check_distinct_outputs([("--out", str(tmp_path / "out.jsonl")), ("--samples_out", "")],
                                  [("--data", str(data)), ("--split", "")])  # distinct: fine
    for out in (str(data), str(tmp_path / "link.jsonl")):
        with pytest.raises(common.UserError, match=r"^--out .*: that is an input \(--data\); it would be overwritten$"):
            common.check_distinct_outputs([("--out", out)], [("--data", str(data))])
    with pytest.raises(common.UserError, match=r"^--samples_out .*out\.jsonl: the same file as --out; each output"):
        common.check_distinct_outputs([("--out", str(tmp_path / "out.jsonl")),
                                       ("--samples_out", str(tmp_path / "out.jsonl"))])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data.jsonl", "link.jsonl"]  # nothing written


@pytest.mark.parametrize("name", SCRIPTS)
def test_every_seed_setting_is_checked_before_any_work(name, tmp_path):
    """numpy takes no negative seed (train_rl's data order) and np.random.seed none from 2**32 (redistill_sft): such
    a seed is one line naming the setting, not a traceback after the model has loaded."""
    import importlib
    module = importlib.import_module(name)
    seeds = [a.dest for a in module.get_parser()._actions if a.dest == "seed" or a.dest.endswith("_seed")]
    if not seeds:
        pytest.skip(f"{name} has no seed")
    for dest in seeds:
        assert getattr(common.parse_settings(module.get_parser(), [f"--{dest}", str(2**32 - 1)]), dest) == 2**32 - 1
        for bad in (-1, 2**32):
            with pytest.raises(common.UserError, match=rf"--{dest} must be between 0 and 2\*\*32 - 1, got {bad}"):
                common.parse_settings(module.get_parser(), [f"--{dest}", str(bad)])
        (tmp_path / "cfg.json").write_text(json.dumps({dest: -5}))
        with pytest.raises(common.UserError, match=f"--{dest} must be between"):
            common.parse_settings(module.get_parser(), ["--config", str(tmp_path / "cfg.json")])


@pytest.mark.parametrize("name", SCRIPTS)
def test_every_output_path_of_the_wrong_kind_is_refused_before_any_work(name, tmp_path):
    """An --out that is a directory, an --out_dir that is a file, or a file (or a link to nothing) in the way above
    either is one line at the start; it was a traceback at the last write, after all the generation (sample_policy,
    eval)."""
    import importlib
    module = importlib.import_module(name)
    outputs = [a.dest for a in module.get_parser()._actions
               if a.dest in ("out", "out_dir") or a.dest.endswith("_out")]
    if not outputs:
        pytest.skip(f"{name} writes no output setting")
    (tmp_path / "a_dir").mkdir()
    (tmp_path / "a_file").write_text("")
    os.symlink(tmp_path / "gone", tmp_path / "dangling")  # (a link to a folder since removed)
    for dest in outputs:
        wrong, want = (tmp_path / "a_file", "directory") if dest == "out_dir" else (tmp_path / "a_dir", "file")
        with pytest.raises(common.UserError, match=rf"--{dest} .*: is a \w+; give a {want} path"):
            common.parse_settings(module.get_parser(), [f"--{dest}", str(wrong)])
        with pytest.raises(common.UserError, match=f"--{dest} .*a_file is a file, so no {want} can be made under it"):
            common.parse_settings(module.get_parser(), [f"--{dest}", str(tmp_path / "a_file" / "x" / "y.jsonl")])
        with pytest.raises(common.UserError, match=f"--{dest} .*dangling is a symbolic link to .*gone.* which does not "
                                                   f"exist, so no {want} can be made under it"):
            common.parse_settings(module.get_parser(), [f"--{dest}", str(tmp_path / "dangling" / "x" / "y.jsonl")])
        fine = str(tmp_path / "new" / ("run" if dest == "out_dir" else "x.jsonl"))
        assert getattr(common.parse_settings(module.get_parser(), [f"--{dest}", fine]), dest) == fine


def test_a_config_that_is_not_an_object_of_utf8_settings_is_one_line(tmp_path):
    import train_rl
    path = tmp_path / "cfg.json"
    for text, message in [('["seed"]', "a JSON object of settings expected, got a JSON list"),
                          ('"seed"', "a JSON object of settings expected, got a JSON str"),
                          (b'{"seed": 1} \xff', "cannot read a JSON object of settings \\(UnicodeDecodeError"),
                          ("{seed: 1}", "cannot read a JSON object of settings \\(JSONDecodeError")]:
        path.write_bytes(text if isinstance(text, bytes) else text.encode())
        with pytest.raises(common.UserError, match=message):
            common.parse_settings(train_rl.get_parser(), ["--config", str(path)])


def test_a_nan_setting_is_refused():
    """NaN passes every `x < 0` check: --temperature nan got past check_sampling to a traceback after the model had
    loaded. Infinity stays (lim_select --threshold=-inf is a real use)."""
    import train_rl
    import lim_select
    for argv in (["--temperature", "nan"], ["--lr", "NaN"]):
        with pytest.raises(common.UserError, match=f"{argv[0]} is NaN"):
            common.parse_settings(train_rl.get_parser(), argv)
    assert common.parse_settings(lim_select.get_parser(), ["--threshold=-inf"]).threshold == float("-inf")


def test_inf_is_refused_for_loss_weights_and_weight_decay_but_kept_where_it_means_off():
    """--kl_coef inf made every loss NaN (inf x a KL of 0 at the first step) and --weight_decay inf every weight NaN:
    the run set up, then stopped after --max_bad_steps skipped steps. These, and the entropy and DWA weights, are now
    refused before any file is read. Where inf means "off" (--grad_clip, --clip_high, --rollout_is_cap) it is taken:
    the run gets as far as its missing model."""
    import redistill_sft
    import train_rl
    for flag, negative in (("--kl_coef", "0 or more"), ("--entropy_coef", "finite"), ("--dwa_alpha", "finite"),
                           ("--weight_decay", "0 or more")):
        for value, why in (("inf", "finite"), ("-inf", negative)):
            with pytest.raises(common.UserError, match=rf"^{flag} must be {why}, got {value}$"):
                train_rl.main(["--model", "no/such/model", "--train_data", "x.jsonl", f"{flag}={value}"])
    with pytest.raises(common.UserError, match=r"^--weight_decay must be finite, got inf$"):
        redistill_sft.main(["--init", "x", "--data", "x.jsonl", "--weight_decay", "inf"])
    with pytest.raises(common.UserError, match=r"^no/such/model: no such directory"):
        train_rl.main(["--model", "no/such/model", "--train_data", "x.jsonl", "--grad_clip=inf", "--clip_high=inf",
                       "--rollout_is_cap=inf"])


def test_an_infinite_learning_rate_or_temperature_is_refused():
    """--lr inf (or Infinity in a --config) wrote NaN into every weight at the first step, and the run still ended
    "done"; an infinite temperature samples uniformly random tokens. Both are refused before any work."""
    import redistill_sft
    import train_rl
    import eval as eval_script
    with pytest.raises(common.UserError, match=r"--lr must be finite, got inf"):
        redistill_sft.main(["--init", "x", "--data", "x.jsonl", "--lr", "inf"])
    for parser, argv in ((train_rl.get_parser(), ["--lr", "inf"]), (train_rl.get_parser(), ["--temperature", "inf"]),
                         (eval_script.get_parser(), ["--temperature", "inf", "--samples_per_prompt", "2"])):
        args = common.parse_settings(parser, argv)
        with pytest.raises(common.UserError, match=r"--lr must be finite|--temperature inf samples"):
            common.check_optimizer(args) if "--lr" in argv else common.check_sampling(args)
    for script in ("sample_effect", "token_shift"):  # (they check the temperature alone)
        args = common.parse_settings(__import__(script).get_parser(), ["--temperature", "inf"])
        with pytest.raises(common.UserError, match=r"--temperature inf samples every token uniformly at random"):
            common.check_temperature(args)


def test_a_temperature_whose_logits_overflow_is_refused():
    """logits / 1e-39 overflow float32: the engine drew the vocabulary's last id with NaN log-probs, silently."""
    import eval as eval_script
    import sample_effect
    import token_shift
    with pytest.raises(common.UserError, match=r"--temperature 1e-39: below 1e-06 .* use 0 for greedy"):
        common.check_sampling(common.parse_settings(eval_script.get_parser(), ["--temperature", "1e-39"]))
    required = {sample_effect: ["--checkpoint", "c", "--eval_data", "e", "--sft_data", "s"],
                token_shift: ["--base", "b", "--policy", "p", "--responses", "r"]}
    for script, argv in required.items():  # their own checks of > 0 come first
        with pytest.raises(common.UserError, match=r"--temperature 1e-39: below 1e-06"):
            script.main(["--temperature", "1e-39", *argv])
    for t in ("1e-6", "0"):  # the least temperature, and greedy
        common.check_sampling(common.parse_settings(eval_script.get_parser(), ["--temperature", t]))


def test_a_lone_surrogate_is_refused_as_its_file_is_read(tmp_path):
    """JSON can escape a lone surrogate, which is no text (a tokenizer, a digest or a UTF-8 write fails on it later,
    with a traceback): reading refuses it, naming the file, line and field, however deep; an escaped pair that makes
    one character reads."""
    path = tmp_path / "s.jsonl"
    path.write_text('{"id": 1, "q": "ok \\ud83d\\ude00"}\n{"id": 2, "meta": {"names": ["A", "B\\udc00"]}}\n')
    with pytest.raises(common.UserError, match=r"s\.jsonl:2: field 'meta\.names\[1\]' is not valid Unicode"):
        common.read_jsonl(str(path))
    path.write_text('{"id": 1, "q": "ok \\ud83d\\ude00"}\n')
    assert common.read_jsonl(str(path)) == [{"id": 1, "q": "ok \U0001f600"}]
    cfg = tmp_path / "c.json"
    cfg.write_text('{"lr": 1, "\\ud835x": 1}')  # in a key: the message stays printable
    with pytest.raises(common.UserError, match=r"c\.json: field '\\ud835x' is not valid Unicode"):
        common.read_json(str(cfg))


def test_a_torn_last_line_of_a_run_log_is_dropped_with_a_warning(tmp_path, capsys):
    """A kill or a full disk can cut a log's last append short: a run's own logs (torn_tail) drop that line with a
    warning; data files, a bad line elsewhere, or a bad last line that has its newline stay errors."""
    import common
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\n{"step": 2}\n{"step": 3, "lo')
    assert common.read_jsonl(str(path), torn_tail=True) == [{"step": 1}, {"step": 2}]
    assert f"{path}:3: dropped a torn last line" in capsys.readouterr().out
    with pytest.raises(common.UserError, match=r"metrics.jsonl:3: not valid JSON"):
        common.read_jsonl(str(path))
    for text in ('{"step": 1}\n{"st\n{"step": 3}\n', '{"step": 1}\n{"step": 2, "lo\n'):  # mid-file; newline kept
        path.write_text(text)
        with pytest.raises(common.UserError, match=r"metrics.jsonl:2: not valid JSON"):
            common.read_jsonl(str(path), torn_tail=True)
    # cut inside a character (the first byte of a 2-byte "é"): dropped too; a data file keeps its UTF-8 error
    path.write_bytes(b'{"step": 1}\n{"step": 2, "word": "caf\xc3')
    assert common.read_jsonl(str(path), torn_tail=True) == [{"step": 1}]
    with pytest.raises(common.UserError, match=r"metrics.jsonl:2: not valid UTF-8"):
        common.read_jsonl(str(path))
    # a resumed run's metrics log: the torn line goes, the records up to the checkpoint stay
    path.write_text('{"step": 1}\n{"step": 2}\n{"step": 3, "lo')
    log = ckpt.metrics_log(str(tmp_path), start_step=2)
    log({"step": 3})
    assert common.read_jsonl(str(path)) == [{"step": 1}, {"step": 2}, {"step": 3}]
    # a hand-edited step (a TypeError on resume) or steps out of order: one line naming the file, line and field
    for text, message in (('{"step": 1}\n{"step": "2"}\n', r'metrics.jsonl:2: field \'step\' .* got "2"'),
                          ('{"step": 1}\n{"loss": 2}\n', r"metrics.jsonl:2: field 'step' .* got none"),
                          ('{"step": true}\n', r"metrics.jsonl:1: field 'step' .* got true"),
                          ('{"step": 3}\n{"step": 2}\n', r"metrics.jsonl:2: step 2 after step 3")):
        path.write_text(text)
        with pytest.raises(common.UserError, match=message):
            ckpt.metrics_log(str(tmp_path), start_step=2)
        assert path.read_text() == text  # (nothing dropped)


def test_a_run_logs_a_non_finite_value_as_null(tmp_path):
    """A step whose forward blew up: json.dumps wrote its NaN entropy as a bare NaN, which strict JSON readers
    refuse; the run log holds null, as for a skipped step's loss."""
    log = ckpt.metrics_log(str(tmp_path), start_step=0)
    log({"step": 1, "entropy": float("nan"), "kl": float("inf"), "acc": 0.5, "loss": None})
    text = (tmp_path / "metrics.jsonl").read_text()
    assert text == '{"step": 1, "entropy": null, "kl": null, "acc": 0.5, "loss": null}\n'


def test_help_adds_a_default_only_where_the_help_does_not_say_it():
    import eval
    text = " ".join(eval.get_parser().format_help().split())
    assert "(default: each directory's basename)" in text and "basename) (default" not in text
    assert "(default: None)" not in text and "(default: 4096)" in text


def test_text_files_that_are_not_utf8_are_one_line_naming_file_and_line(tmp_path):
    """A stray Latin-1 byte in line 3 of a data file is an error naming line 3 (a text-mode read raised a
    traceback); Windows line ends read as plain ones, in jsonl and in plain text."""
    path = tmp_path / "data.jsonl"
    path.write_bytes(b'{"a": 1}\r\n\r\n{"a": "caf\xe9"}\n')
    with pytest.raises(common.UserError, match=r"data.jsonl:3: not valid UTF-8"):
        common.read_jsonl(str(path))
    path.write_bytes('{"a": 1}\r\n\r\n{"a": "café"}\n'.encode())
    assert common.read_jsonl(str(path)) == [{"a": 1}, {"a": "café"}]
    assert [line for _, line in common.text_lines(str(path))] == ['{"a": 1}\n', "\n", '{"a": "café"}\n']
    # a UTF-8 BOM (Notepad's "UTF-8 with BOM"), in data and in a --config file: no part of the text (plain text trained
    # on it as three junk tokens opening the first document; JSON refused it)
    path.write_bytes(b"\xef\xbb\xbf" + 'Once upon a time.\r\n{"a": 1}\n'.encode())
    assert [line for _, line in common.text_lines(str(path))] == ["Once upon a time.\n", '{"a": 1}\n']
    path.write_bytes(b"\xef\xbb\xbf" + b'{"a": 1}\n')
    assert common.read_jsonl(str(path)) == [{"a": 1}] and common.read_json(str(path)) == {"a": 1}


def test_an_unreadable_file_or_a_directory_is_one_line(tmp_path, monkeypatch):
    """A file the user may not read is one line naming it, not a traceback (as root reads any file, the refusal is
    staged); so is a directory given where a file goes."""
    path = tmp_path / "data.jsonl"
    path.write_text('{"a": 1}\n')

    def refused(*args, **kwargs):
        raise PermissionError(13, "Permission denied")
    monkeypatch.setattr(common, "open", refused, raising=False)
    with pytest.raises(common.UserError, match=r"data.jsonl: cannot read it \(Permission denied\)$"):
        common.read_jsonl(str(path))
    monkeypatch.undo()
    with pytest.raises(common.UserError, match=r": is a directory; give a file$"):
        common.read_jsonl(str(tmp_path))
    os.mkfifo(tmp_path / "pipe")  # (as <(zcat data.jsonl.gz) gives): it is there, and "file not found" said it was not
    with pytest.raises(common.UserError, match=r"pipe: not a regular file \(a pipe or a device"):
        common.read_jsonl(str(tmp_path / "pipe"))
    with pytest.raises(common.UserError, match=r"nowhere\.jsonl: file not found$"):
        common.read_jsonl(str(tmp_path / "nowhere.jsonl"))


def test_a_log_line_the_storage_refuses_to_open_for_says_nothing_was_added(tmp_path, monkeypatch):
    """append_jsonl whose open is refused (a read-only file system, no permission) said "its last line was not added
    whole", though nothing was written."""
    def refused(*args, **kwargs):
        raise PermissionError(13, "Permission denied")
    monkeypatch.setattr(common, "open", refused, raising=False)
    with pytest.raises(common.UserError, match=r"metrics\.jsonl: cannot write it \(Permission denied\); nothing was "
                                               r"added to it\. Check the permissions there"):
        common.append_jsonl(str(tmp_path / "metrics.jsonl"), {"step": 1})


def test_counts_that_mean_all_or_none_at_zero_refuse_negatives():
    import argparse
    args = argparse.Namespace(limit=0, num_examples=-3, unset=None)
    common.check_non_negative(args, "limit", "unset")
    with pytest.raises(common.UserError, match=r"^--num_examples must be 0 or more, got -3$"):
        common.check_non_negative(args, "limit", "num_examples")


def record_syncs(monkeypatch):
    """Stand-ins for os.fsync/os.replace/os.rename that log ("sync", path) and ("rename", src, dst) in order."""
    import os
    events = []
    real_fsync, real_replace, real_rename = os.fsync, os.replace, os.rename

    def fsync(fd):
        events.append(("sync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def moved(real):
        def move(src, dst):
            events.append(("rename", os.path.abspath(src), os.path.abspath(dst)))
            real(src, dst)
        return move
    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", moved(real_replace))
    monkeypatch.setattr(os, "rename", moved(real_rename))
    return events


def test_write_json_writes_strict_json(tmp_path):
    """An inf setting (--clip_high inf, --kv_cache_gib inf) goes into settings.json and summaries: json.dump writes
    it bare (Infinity), which strict readers refuse; it is written as the string "inf" (NaN as "nan"), at any depth."""
    import json
    path = str(tmp_path / "s.json")
    common.write_json(path, {"clip_high": float("inf"), "nested": [{"t": -float("inf")}, (float("nan"), 1.5)],
                             "n": 3, "s": "inf"})

    def refuse(name):
        raise ValueError(f"non-standard JSON constant {name}")
    with open(path, encoding="utf-8") as f:
        got = json.loads(f.read(), parse_constant=refuse)
    assert got == {"clip_high": "inf", "nested": [{"t": "-inf"}, ["nan", 1.5]], "n": 3, "s": "inf"}


def test_atomic_writes_reach_the_disk_before_their_name_does(tmp_path, monkeypatch):
    """A power loss after the rename must not leave a checkpoint (or any output) whose name points at data still in
    the page cache: every file is synced before the rename that publishes it, and the directory after."""
    import os
    from model import build_model, save_model, tiny_config
    events = record_syncs(monkeypatch)
    common.write_json(str(tmp_path / "a.json"), {"x": 1})
    (rename,) = [e for e in events if e[0] == "rename"]
    assert events.index(("sync", rename[1])) < events.index(rename) < events.index(("sync", str(tmp_path)))

    events.clear()
    save_model(build_model(tiny_config(32)), str(tmp_path / "ck"), max_shard_bytes=20_000)
    (rename,) = [e for e in events if e[0] == "rename"]
    tmp = rename[1]
    written = sorted(os.listdir(tmp_path / "ck"))
    assert len(written) > 3  # several shards, their index and the config
    at = events.index(rename)
    assert {os.path.join(tmp, n) for n in written} | {tmp} <= {e[1] for e in events[:at] if e[0] == "sync"}
    assert ("sync", str(tmp_path)) in events[at:]


def test_a_write_or_lock_without_permission_is_one_line_naming_the_file(tmp_path, monkeypatch):
    """A directory the run may not write (a read-only mount, another user's) gave a PermissionError traceback from
    the lock or the temporary file: one line now, as a full disk gives. (Root ignores modes, so the refusal is made.)"""
    import errno
    import os
    import tempfile

    def refused(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied")
    monkeypatch.setattr(tempfile, "mkstemp", refused)
    with pytest.raises(common.UserError, match=r"a\.json: cannot write it \(Permission denied\); nothing was "
                                               r"replaced\. Check the permissions there"):
        common.write_json(str(tmp_path / "a.json"), {"x": 1})
    monkeypatch.undo()
    real_open = open
    monkeypatch.setattr("builtins.open", lambda path, *a, **k: refused() if str(path).endswith(".lock")
                        else real_open(path, *a, **k))
    with pytest.raises(common.UserError, match=r"\.lock: cannot write it \(Permission denied\); nothing was started"):
        common.lock_run_dir(str(tmp_path / "run"))
    assert not os.listdir(tmp_path / "run")


def test_an_output_is_locked_whether_or_not_its_directory_exists_yet(tmp_path):
    """lock_output took no lock where the output's directory did not exist yet (the usual case for a fresh
    --out_dir): a second run started later found the directory its write made and locked it unopposed, the two then
    writing one file. The directory is made, and locked, at once."""
    import os
    out = tmp_path / "fresh" / "pretrain.jsonl"
    common.lock_output([str(out)])
    lock = os.path.realpath(tmp_path / "fresh" / ".pretrain.jsonl.lock")
    assert os.path.isfile(lock) and lock in common._LOCKS
    common._LOCKS.pop(lock).close()


def test_a_run_stopped_by_bad_input_after_its_lock_leaves_no_directory_it_made_for_nothing(tmp_path):
    """An input found bad once the run's directory is locked (a checkpoint's weights, read when the run reaches them)
    left a directory holding only its .lock, which a later look (ls, a resume) took for a run. What the run made
    for its lock goes, parents made with it too; a directory that existed, or that holds anything else, stays."""
    import os

    def stopped(run_dir, name=".lock", write=None):
        def main():
            common.lock_run_dir(run_dir, name)
            if write:
                (tmp_path / write).write_text("x")
            raise common.UserError("bad weights")
        with pytest.raises(SystemExit):
            common.run_main(main)

    stopped(str(tmp_path / "new" / "deeper" / "run"))
    assert os.listdir(tmp_path) == []  # (new/ and new/deeper/ were made for it too)
    (tmp_path / "old").mkdir()
    stopped(str(tmp_path / "old"), ".out.jsonl.lock")
    assert os.listdir(tmp_path / "old") == [".out.jsonl.lock"]  # (lock_output's lock in a directory already there)
    stopped(str(tmp_path / "wrote"), write="wrote/log.txt")
    assert sorted(os.listdir(tmp_path / "wrote")) == [".lock", "log.txt"]
    assert not common._MADE_FOR_LOCK


def test_a_run_directory_given_as_a_checkpoint_is_named_with_its_checkpoints(tmp_path):
    """An RL or SFT run's directory where a checkpoint goes (--model RUN, not RUN/final) was told to copy in tokenizer
    files, or that config.json is missing; a run's rollouts/ folder where the run goes named rollouts/rollouts/.
    The errors now say what the directory is and name what to give."""
    import model
    import tasks
    run = tmp_path / "run"
    for name in ("step_000002", "step_000004", "final"):
        (run / name).mkdir(parents=True)
        (run / name / "config.json").write_text("{}")
        (run / name / "model.safetensors").write_text("")
    (run / "step_000006").mkdir()  # (no checkpoint in it)
    hint = r"\(a training run's directory: give one of its checkpoints, final, step_000002, step_000004\)"
    with pytest.raises(common.UserError, match=r"run: no tokenizer files \(.*\) " + hint):
        tasks.check_tokenizer_files(str(run))
    with pytest.raises(common.UserError, match=r"config\.json: not found \(not a Hugging Face checkpoint directory\) "
                                               + hint):
        model.read_config(str(run))
    with pytest.raises(common.UserError, match=r"no tokenizer files .*; a checkpoint saved without its tokenizer"):
        tasks.check_tokenizer_files(str(run / "step_000006"))  # (no run there: the advice of before)
    common.write_jsonl(str(run / "rollouts" / "step_000001.jsonl"), [{"step": 1}])
    with pytest.raises(common.UserError, match=r"rollouts: holds rollout logs itself; give the RL run's directory, "
                                               r".*run$"):
        tasks.rollout_logs(str(run / "rollouts"))


def test_settings_no_run_can_use_are_refused_at_the_start(tmp_path):
    """Found by a fuzzer of every setting: --out_dir '' trained into the current directory and then failed at its
    first checkpoint; an integer past 64 bits overflowed in torch (a traceback, files left); an output name past the
    file system's 255 bytes failed at the first write (lim_select's first output written, the next not); a path with
    a line break broke every message about it across lines."""
    import train_rl
    cases = [(["--out_dir", ""], r"--out_dir is empty"),
             (["--out_dir", " "], r"--out_dir is empty"),
             (["--samples_per_prompt", str(10 ** 30)], r"--samples_per_prompt 10+: past any count or size a run can "
                                                       r"hold"),
             (["--ppo_mini_batches", str(-2 ** 64)], r"--ppo_mini_batches -\d+: past any count"),
             (["--out_dir", str(tmp_path / ("a" * 256) / "run")], r"--out_dir: a name of 256 bytes in the path"),
             (["--out_dir", str(tmp_path / "a\nb")], r"--out_dir '.*a\\nb': a path with a line break in it")]
    for argv, message in cases:
        with pytest.raises(common.UserError, match=message):
            common.parse_settings(train_rl.get_parser(), ["--model", "m"] + argv)
    assert common.parse_settings(train_rl.get_parser(), ["--model", "m", "--max_steps", str(2 ** 63 - 1),
                                                          "--out_dir", str(tmp_path / ("a" * 255))]).max_steps > 0
    assert not os.listdir(tmp_path)


FULL_DISK_SCRIPT = """
import os, resource, signal, sys, torch
import common
from model import build_model, save_model, tiny_config
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit then fails with EFBIG, as on a full disk
out, what = sys.argv[1], sys.argv[2]
with open(os.path.join(out, "old.pt"), "w") as f:
    f.write("the earlier file")
resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, 64 * 1024))
def write():
    if what == "torch.save":  # a checkpoint's optimizer shard: torch's own error hides the OSError
        with common.atomic_open(os.path.join(out, "old.pt"), "wb") as f:
            torch.save({"exp_avg": torch.zeros(100_000)}, f)
    elif what == "save_model":  # safetensors says its OS error only in its text
        save_model(build_model(tiny_config(4096, hidden_size=64)), os.path.join(out, "ck"))
    else:
        common.append_jsonl(os.path.join(out, "metrics.jsonl"), {"x": "y" * 100_000})
common.run_main(write)
"""


@pytest.mark.parametrize("what, name, outcome", [("torch.save", "old.pt", "nothing was replaced"),
                                                 ("save_model", "ck", "nothing was replaced"),
                                                 ("append", "metrics.jsonl", "its last line was not added whole")])
def test_a_write_the_storage_refuses_ends_in_one_line_naming_the_file(tmp_path, what, name, outcome):
    """A full disk (here a file size limit, EFBIG) while writing a checkpoint's shard, a model directory or a log
    line: one line naming the file, not torch's 'unexpected pos' error or safetensors' text without a path; nothing
    half-written is left in place (the earlier file stands, no temporary file remains)."""
    import os
    import subprocess
    import sys
    from conftest import ROOT, subprocess_env
    proc = subprocess.run([sys.executable, "-c", FULL_DISK_SCRIPT, str(tmp_path), what], capture_output=True,
                          text=True, cwd=ROOT, env=subprocess_env(), timeout=120)
    assert proc.returncode != 0
    assert proc.stderr.strip().splitlines()[-1] == (
        f"error: {tmp_path / name}: cannot write it (File too large); {outcome}. Free space there and run again "
        f"(--resume true where the stage has it)"), proc.stderr[-2000:]
    assert (tmp_path / "old.pt").read_text(encoding="utf-8") == "the earlier file"
    assert sorted(os.listdir(tmp_path)) == (["metrics.jsonl", "old.pt"] if what == "append" else ["old.pt"])


def test_stale_temps_of_the_named_outputs_alone_are_removed(tmp_path, capsys):
    """What a SIGKILL left of atomic_open's writes of these outputs goes (a whole output's size each, never reused);
    another output's temporary file, even one whose name begins the same, and the outputs themselves stay."""
    out = tmp_path / "effects.jsonl"
    out.write_text("done\n")
    stale = [tmp_path / ".tmp_effects.jsonl.ab_12x9z", tmp_path / "sub" / ".tmp_summary.json.qwertyui",
             tmp_path / ".tmp_effects.jsonlk1ll3d_x"]  # (the last: an earlier version's name, with no dot)
    kept = [tmp_path / ".tmp_effects.jsonl2.ab_12x9z", tmp_path / ".tmp_effects.jsonl.x.abcdefgh",
            tmp_path / ".tmp_other.jsonl.abcdefgh", tmp_path / "sub" / ".tmp_samples.jsonl.abcdefgh"]
    for path in stale + kept:
        path.parent.mkdir(exist_ok=True)
        path.write_text("x" * 10)
    freed = common.remove_stale_temps([out, tmp_path / "sub" / "summary.json", tmp_path / "absent" / "a.json"],
                                      "here")
    assert freed == 30 and not any(p.exists() for p in stale) and all(p.exists() for p in kept + [out])
    assert capsys.readouterr().out == "note: removed what a killed run's writes left in here (0.0 MiB)\n"
    with common.atomic_open(tmp_path / "sub" / "summary.json") as f:  # the names atomic_open gives are matched
        (name,) = [p.name for p in (tmp_path / "sub").iterdir() if p.name.startswith(".tmp_summary.json")]
        f.write("{}")
    (tmp_path / "sub" / name).write_text("left by a kill")
    assert common.remove_stale_temps([tmp_path / "sub" / "summary.json"], "here") == 14
    assert not (tmp_path / "sub" / name).exists() and (tmp_path / "sub" / "summary.json").read_text() == "{}"


def test_a_file_system_without_locks_runs_without_the_lock_with_a_note(tmp_path, monkeypatch, capsys):
    """flock refused by the file system (Lustre mounted -o noflock: ENOSYS; NFS without lockd: ENOLCK): a note, and
    the run goes on unlocked, as reproduce.sh does (every stage stopped on a traceback); another error is raised."""
    import errno
    import fcntl
    import os
    from conftest import end_of_process_locks

    def no_flock(code):
        def flock(f, how):
            raise OSError(code, os.strerror(code))
        return flock
    monkeypatch.setattr(fcntl, "flock", no_flock(errno.ENOSYS))
    try:
        common.lock_run_dir(str(tmp_path / "run"))
        assert "note: cannot lock" in capsys.readouterr().err and (tmp_path / "run" / ".lock").exists()
        monkeypatch.setattr(fcntl, "flock", no_flock(errno.EIO))
        with pytest.raises(OSError, match="Input/output error"):
            common.lock_run_dir(str(tmp_path / "other"))
    finally:
        end_of_process_locks()


def test_data_digest_follows_the_rows_and_their_order():
    rows = [{"id": "a", "q": "x"}, {"id": "b", "q": "y"}]
    assert common.data_digest(rows) == common.data_digest([dict(reversed(r.items())) for r in rows])  # key order: same
    assert common.data_digest(rows) != common.data_digest(rows[::-1])  # the order decides what each step draws
    assert common.data_digest(rows) != common.data_digest([rows[0], {"id": "b", "q": "z"}])
    assert common.data_digest([[1, 2], 3]) != common.data_digest([[1], 2, 3])  # row bounds count


def test_the_bounds_of_the_shared_setting_checks():
    """check_positive: at least 1, so 0 is refused; check_optimizer: betas in [0, 1), so 1 is refused."""
    import argparse
    import train_rl
    with pytest.raises(common.UserError, match="--samples_per_prompt must be at least 1, got 0"):
        common.check_positive(argparse.Namespace(samples_per_prompt=0), "samples_per_prompt")
    common.check_positive(argparse.Namespace(samples_per_prompt=1), "samples_per_prompt")
    for beta in ("beta1", "beta2"):
        args = common.parse_settings(train_rl.get_parser(), [f"--{beta}", "1.0"])
        with pytest.raises(common.UserError, match=rf"--{beta} must be in \[0, 1\)"):
            common.check_optimizer(args)
        common.check_optimizer(common.parse_settings(train_rl.get_parser(), [f"--{beta}", "0.0"]))


@pytest.mark.parametrize("terminal", [True, False])
def test_a_progress_bar_in_a_log_file_is_redrawn_once_a_minute(monkeypatch, terminal):
    import io
    import sys
    import tqdm.std

    class Stderr(io.StringIO):
        def isatty(self):
            return terminal

    monkeypatch.setattr(sys, "stderr", Stderr())
    clock = [0.0]
    monkeypatch.setattr(tqdm.std, "time", lambda: clock[0])
    monkeypatch.setattr(tqdm.std.tqdm, "monitor_interval", 0)  # the monitor thread reads the real clock
    bar = common.progress_bar(600, "steps")
    for _ in range(600):  # ten minutes at one update a second
        clock[0] += 1.0
        bar.update(1)
    bar.close()
    draws = sys.stderr.getvalue().count("\r")
    if terminal:
        assert draws >= 590  # every update
    else:
        assert 10 <= draws <= 13  # the first, one a minute, the last
    assert "600/600" in sys.stderr.getvalue()


def test_a_progress_bar_draws_only_on_rank_0_and_when_enabled(monkeypatch):
    import io
    import sys
    for enabled, rank, drawn in ((True, 0, True), (False, 0, False), (True, 1, False)):
        monkeypatch.setattr(sys, "stderr", io.StringIO())
        monkeypatch.setattr(common, "rank", lambda: rank)
        bar = common.progress_bar(3, "steps", enabled)
        bar.update(3)
        bar.close()
        assert ("3/3" in sys.stderr.getvalue()) == drawn


def test_json_that_python_cannot_hold_is_a_line_naming_the_file(tmp_path):
    """An integer of more than 4,300 digits (Python's limit on int parsing: ValueError) or arrays nested thousands
    deep (RecursionError) are no JSONDecodeError: every reader gave a traceback. Now one line, file and line named."""
    cases = {"big": '{"a": ' + "9" * 5000 + "}", "deep": '{"a": ' + "[" * 5000 + "]" * 5000 + "}"}
    for name, text in cases.items():
        (tmp_path / f"{name}.jsonl").write_text('{"ok": 1}\n' + text + "\n")
        with pytest.raises(common.UserError, match=rf"{name}\.jsonl:2: not valid JSON \("):
            common.read_jsonl(str(tmp_path / f"{name}.jsonl"))
        (tmp_path / f"{name}.json").write_text(text)
        with pytest.raises(common.UserError, match=rf"{name}\.json: cannot read a JSON object \("):
            common.read_json(str(tmp_path / f"{name}.json"))
    (tmp_path / "fine.jsonl").write_text('{"a": ' + "[" * 50 + "]" * 50 + ', "b": ' + "9" * 4000 + "}\n")
    assert common.read_jsonl(str(tmp_path / "fine.jsonl"))[0]["b"] == int("9" * 4000)


def test_a_key_twice_in_one_object_is_an_error_naming_file_line_and_key(tmp_path):
    """json keeps the last of two values of one key and drops the first without a word: a record {"answer": "1",
    "answer": "2"} trained on "2". Every reader refuses it now, naming the key, at any depth."""
    (tmp_path / "d.jsonl").write_text('{"id": 1, "answer": "1"}\n{"id": 2, "meta": {"a": 1, "a": 2}}\n')
    with pytest.raises(common.UserError, match=r"d\.jsonl:2: not valid JSON \(field 'a' appears twice"):
        common.read_jsonl(str(tmp_path / "d.jsonl"))
    (tmp_path / "s.json").write_text('{"lr": 1e-6, "seed": 1, "lr": 1e-5}')
    with pytest.raises(common.UserError, match=r"s\.json: cannot read .*field 'lr' appears twice"):
        common.read_json(str(tmp_path / "s.json"))
    # ... but a checkpoint's config.json, which other tools write and read, gives its last value, as transformers does
    assert common.read_json(str(tmp_path / "s.json"), repeated_keys=True) == {"lr": 1e-5, "seed": 1}
    # the same key in two objects, or two keys that differ only in case, are fine
    (tmp_path / "ok.jsonl").write_text('{"a": {"x": 1}, "b": {"x": 2}, "A": 3}\n')
    assert common.read_jsonl(str(tmp_path / "ok.jsonl")) == [{"a": {"x": 1}, "b": {"x": 2}, "A": 3}]


@pytest.mark.parametrize("name", SCRIPTS)
def test_a_config_gives_at_least_one_value_where_the_command_line_must(name, tmp_path):
    """{"eps": []} in a --config file ran token_shift's --cross over no value at all and wrote its empty tables over
    the earlier ones; `--eps` with no value is an error on the command line, and so it is in a config."""
    import importlib
    module = importlib.import_module(name)
    actions = [a for a in module.get_parser()._actions if a.option_strings and a.nargs in ("+", "*")]
    if not actions:
        pytest.skip(f"{name} has no list setting")
    for action in actions:
        (tmp_path / "cfg.json").write_text(json.dumps({action.dest: []}))
        if action.nargs == "+":
            with pytest.raises(common.UserError, match=rf"setting '{action.dest}' takes at least one value"):
                common.parse_settings(module.get_parser(), ["--config", str(tmp_path / "cfg.json")])
        else:  # (an empty list is what the command line gives with no value)
            assert getattr(common.parse_settings(module.get_parser(), ["--config", str(tmp_path / "cfg.json")]),
                           action.dest) == []


def test_a_missing_files_stamp_differs_from_its_earlier_one(tmp_path):
    """A file removed while a stage read it (an SFT file, a checkpoint's shard) gave a FileNotFoundError traceback from
    the stamps; its stamp is None now, which differs from the earlier one, and the stage says what changed."""
    path = tmp_path / "a.jsonl"
    path.write_text("{}\n")
    before = common.file_stamps([str(path)])
    assert before[os.path.realpath(path)][0] == 3
    path.unlink()
    assert common.file_stamps([str(path)]) == {os.path.realpath(path): None} != before


def test_a_hard_link_is_the_same_file_to_the_distinct_checks(tmp_path):
    """The checks compared resolved paths, which a hard link passes: redistill_sft took `--data a --val_data b` (b a
    hard link of a) as two files, its held-out loss then on training data, where same_files (samefile) said one."""
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    a.write_text("{}\n")
    os.link(a, b)
    assert common.same_files(str(a), str(b))
    with pytest.raises(common.UserError, match=r"--val_data .*b\.jsonl: the same file as --data .*a\.jsonl"):
        common.check_distinct_inputs([("--data", str(a)), ("--val_data", str(b))])
    with pytest.raises(common.UserError, match=r"--out .*b\.jsonl: that is an input \(--split\)"):
        common.check_distinct_outputs([("--out", str(b))], [("--split", str(a))])
    common.check_distinct_outputs([("--out", str(tmp_path / "new.jsonl"))], [("--split", str(a))])  # (not written yet)
    with pytest.raises(common.UserError, match=r"the same file as --out"):
        common.check_distinct_outputs([("--out", str(tmp_path / "new.jsonl")), ("--more", str(tmp_path / "new.jsonl"))])
