"""
The ground floor every script stands on: one-line errors, settings, rank-0 printing, seeds, jsonl files with
errors naming file and line, atomic writes, the ids a response stops at, and the optional plotting import. It
imports no other module of this project, so any module may import it.
"""
import argparse
import errno
import hashlib
import json
import math
import os
import random
import re
import sys
import tempfile
import textwrap
from contextlib import closing, contextmanager


class UserError(Exception):
    """A problem with the user's input (file, setting, data): printed as one line, no traceback."""


# -----------------------------------------------------------------------------
# settings: every script has get_parser() and main(argv=None)


# old spellings of settings: each is an error that names the new one (one name per thing across the scripts)
RENAMED = {"--group_size": "--samples_per_prompt", "--samples": "--samples_per_prompt", "--k": "--samples_per_prompt",
           "--eight_bit_adam": "--adam_8bit",
           "--grad_checkpointing": "--gradient_checkpointing",
           "--bf16": "--dtype (auto: bfloat16 on CUDA, float32 on CPU)",
           "--num_samples": "--samples_per_prompt (samples per prompt) or, in sample_policy.py, --num_examples",
           "--max_new_tokens": "--max_response_tokens",
           "--batch_size": "--gen_batch_size (prompts decoded at once) or, in redistill_sft.py, --global_batch, or, in "
                           "tiny_base.py --probe, --probe_batch"}


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """--help shows each setting's default after its help (unless the help already says it, or there is none), and
    the script's description as written."""

    def _get_help_string(self, action):
        if action.default is None or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)

    def _split_lines(self, text, width):  # a word (a default path) is never cut across lines: it stays copyable
        return textwrap.wrap(self._whitespace_matcher.sub(" ", text).strip(), width, break_long_words=False,
                             break_on_hyphens=False)


class Parser(argparse.ArgumentParser):
    """argparse's parser, whose errors (an unknown flag, a value of the wrong type) are one line, as a UserError's
    are, not the whole usage before it (54 lines for train_rl.py)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (--help lists every setting)\n")


def new_parser(description, prog=None) -> argparse.ArgumentParser:
    """The parser a script's get_parser() fills: its --help shows each setting's default."""
    return Parser(description=description, prog=prog, formatter_class=HelpFormatter)


def parse_settings(parser: argparse.ArgumentParser, argv=None) -> argparse.Namespace:
    """Parse settings; `--config FILE.json` supplies defaults that the command line overrides. Every boolean is
    written `--name true` or `--name false`; an old spelling of a renamed setting is an error naming the new one;
    option names must be written in full (no prefixes); a seed (`--seed`, `--*_seed`) is in [0, 2**32). `parser`
    is a fresh one (the script's get_parser()): --config changes its defaults, and a second main() in one process
    (tests, notebooks) must not inherit them."""
    if "--config" not in parser._option_string_actions:
        parser.add_argument("--config", default=None,
                            help="JSON file of settings (keys = option names without --); "
                                 "command-line flags override it")
    parser.allow_abbrev = False  # a prefix such as --k must not silently mean --kv_cache_gib
    for action in parser._actions:  # (--help: a boolean takes a value, true or false)
        if action.type is str2bool and action.metavar is None:
            action.metavar = "{true,false}"
    argv = sys.argv[1:] if argv is None else list(argv)
    options = parser._option_string_actions
    for i, token in enumerate(argv):
        name = token.split("=", 1)[0]
        if name in RENAMED and name not in options:
            raise UserError(f"{name} is now {RENAMED[name]}")
        action = options.get(name)
        if action is not None and action.type is str2bool and "=" not in token and \
                (i + 1 == len(argv) or argv[i + 1].startswith("--")):
            raise UserError(f"{name} takes a value: {name} true or {name} false")
    pre, _ = parser.parse_known_args(argv)
    if pre.config:
        pre.config = expand_home(pre.config, "--config")
        cfg = read_json(pre.config, "a JSON object of settings")
        if cfg.get("config") is not None:  # (a run's settings.json names the config it began from: all is here)
            print(f"note: {pre.config}: its 'config' ({cfg['config']}) is not read: a config file includes no other",
                  file=sys.stderr)
        cfg.pop("config", None)
        known = {a.dest for a in parser._actions} - {"help"}  # ("help": no setting, though argparse gives it a dest)
        unknown = sorted(k for k in cfg if k.replace("-", "_") not in known)
        if unknown:
            renamed = "".join(f"; {k} is now {RENAMED['--' + k][2:]}" for k in unknown if "--" + k in RENAMED)
            raise UserError(f"{pre.config}: unknown setting(s) {unknown} for {parser.prog}{renamed}")
        spelled = {}  # setting -> the key that gave it: max_steps and max-steps are one setting, given once
        for key in cfg:
            first = spelled.setdefault(key.replace("-", "_"), key)
            if first != key:
                raise UserError(f"{pre.config}: setting {first.replace('-', '_')!r} given twice ({first!r} and "
                                f"{key!r}); keep one")
        cfg = {k.replace("-", "_"): v for k, v in cfg.items()}
        for action in parser._actions:
            if action.dest in cfg and action.dest != "config":
                cfg[action.dest] = config_value(pre.config, action, cfg[action.dest])
        parser.own_defaults = {a.dest: a.default for a in parser._actions}  # (script_default: before the config's)
        parser.set_defaults(**cfg)
    args = parser.parse_args(argv)
    for name, value in vars(args).items():
        values = [expand_home(v, f"--{name}") for v in (value if isinstance(value, list) else [value])]
        value = values if isinstance(value, list) else values[0]
        setattr(args, name, value)
        # numpy's generators take no negative seed, np.random.seed none >= 2**32
        if (name == "seed" or name.endswith("_seed")) and isinstance(value, int) and not 0 <= value < 2**32:
            raise UserError(f"--{name} must be between 0 and 2**32 - 1, got {value}")
        if any(isinstance(v, float) and math.isnan(v) for v in values):
            raise UserError(f"--{name} is NaN: no setting takes it")  # NaN passes every `x < 0` check
        if any(type(v) is int and not -2**63 <= v < 2**63 for v in values):  # (torch's overflow, or a run never ending)
            raise UserError(f"--{name} {value}: past any count or size a run can hold (a 64-bit integer's range)")
        if name == "out_dir" and isinstance(value, str) and not value.strip():  # ('': the current directory, unsaid)
            raise UserError("--out_dir is empty: give a directory")
        if isinstance(value, str) and value and (name == "out_dir" or name == "out" or name.endswith("_out")):
            check_output_path(f"--{name}", value, directory=name == "out_dir")
    return args


def expand_home(value, flag):
    """A leading ~ (alone or ~/...) that no shell expanded (--out_dir=~/x: bash leaves it; a --config is no shell):
    the home directory, where ./~/x was made. If ./~/... exists (an earlier version's run there, which a resume
    would then leave for a fresh one), an error naming both."""
    if not (isinstance(value, str) and (value == "~" or value.startswith("~/"))):
        return value
    if os.path.lexists(value):
        raise UserError(f"{flag} {value}: ambiguous, {os.path.abspath(value)} exists (made by an earlier version for "
                        f"this spelling) and ~ is {os.path.expanduser('~')}; give the one you mean as an absolute path")
    return os.path.expanduser(value)


def path_and_parents(path):
    """The absolute path, then each directory above it, up to the root."""
    path = os.path.abspath(path)
    while True:
        yield path
        if path == os.path.dirname(path):
            return
        path = os.path.dirname(path)


def is_checkpoint(path):
    """Whether directory `path` holds a checkpoint: its config.json beside weights (model.py reads them)."""
    return os.path.isfile(os.path.join(path, "config.json")) and any(
        os.path.isfile(os.path.join(path, name)) for name in ("model.safetensors", "model.safetensors.index.json"))


def run_dir_hint(path):
    """For an error on a directory that should be a checkpoint: where it is a training run's (it holds final/ or
    step_N/ checkpoints), a hint naming them; else ""."""
    try:
        names = sorted(n for n in os.listdir(path) if re.fullmatch(r"final|step_\d+", n)
                       and is_checkpoint(os.path.join(path, n)))
    except OSError:
        return ""
    if not names:
        return ""
    shown = names if len(names) <= 3 else [names[0], "...", names[-1]]
    return f" (a training run's directory: give one of its checkpoints, {', '.join(shown)})"


def check_not_in_a_run(flag, path, who):
    """An output directory that is, or is in, a training run's directory (run_dir_hint) is refused: a resumed run's
    pruning deletes its step_N/ with what `who` wrote there, and the run's files and `who`'s mix. (One in a
    checkpoint: check_output_path refuses it for every script.)"""
    run = next((d for d in path_and_parents(path) if run_dir_hint(d)), None)
    if run:
        where = "is" if run == os.path.abspath(path) else "is in"
        raise UserError(f"{flag} {path}: {where} {run}, a training run's directory (whose pruning deletes step_N/ with "
                        f"what {who} wrote in it); give {who} a directory of its own")


def check_output_path(flag, path, directory):
    """That an output can be made at path: no directory where a file goes, no file where a directory goes, and no
    file (or symbolic link to nothing) in the way above it. Checked at the start, so that a long run does not fail at
    its last write."""
    want = "directory" if directory else "file"
    if re.search(r"[\n\r]", path):  # (its messages and logs would break mid-line)
        raise UserError(f"{flag} {path!r}: a path with a line break in it; give another")
    long = next((part for part in path.split(os.sep) if len(part.encode()) > 255), None)
    if long is not None:  # (the file system's limit on one name: an OSError at the first write, after the run)
        raise UserError(f"{flag}: a name of {len(long.encode())} bytes in the path ({long[:40]}...); at most 255")
    if os.path.exists(path) and os.path.isdir(path) != directory:
        raise UserError(f"{flag} {path}: is a {'file' if directory else 'directory'}; give a {want} path")
    checkpoint = next((d for d in path_and_parents(path if directory else os.path.dirname(os.path.abspath(path)))
                       if is_checkpoint(d)), None)
    if checkpoint:  # (a model's files and a stage's outputs mixed: token_shift wrote its summary into --base)
        raise UserError(f"{flag} {path}: {'is' if checkpoint == os.path.abspath(path) else 'is in'} the checkpoint "
                        f"{checkpoint}; give a path outside it")
    parent = os.path.dirname(os.path.abspath(path))
    while not os.path.lexists(parent):
        parent = os.path.dirname(parent)
    if not os.path.exists(parent):  # (a link to nothing: making the folders failed, after the run, as a traceback)
        raise UserError(f"{flag} {path}: {parent} is a symbolic link to {os.readlink(parent)!r}, which does not "
                        f"exist, so no {want} can be made under it")
    if not os.path.isdir(parent):
        raise UserError(f"{flag} {path}: {parent} is a file, so no {want} can be made under it")


def config_value(path, action, value):
    """A --config file's value for one setting, checked and converted as the same value on the command line would be
    (argparse checks neither types nor choices of defaults): JSON's true, 8 or 0.5 read as the text "true", "8",
    "0.5" would; one value where a list is taken is a list of one; null only where the default is None (null where
    a value is expected would pass the checks that let "not set" through, and read as false or as no seed)."""
    if action.nargs == 0:
        return value
    if value is None:
        if action.default is not None:
            raise UserError(f"{path}: setting {action.dest!r} is null; it takes a value (default "
                            f"{action.default!r}): give one, or leave the key out for the default")
        return None
    many = action.nargs in ("+", "*")
    if isinstance(value, list) and not many:
        raise UserError(f"{path}: setting {action.dest!r} takes one value, got the list {value!r}")
    values = value if isinstance(value, list) else [value]
    if not values and action.nargs == "+":  # (the command line cannot give none either)
        raise UserError(f"{path}: setting {action.dest!r} takes at least one value, got an empty list")
    nested = next((v for v in values if isinstance(v, (dict, list))), None)
    if nested is not None:  # (its JSON text would pass as a path or a name: {"a": 1} as the text '{"a": 1}')
        raise UserError(f"{path}: setting {action.dest!r}: {json.dumps(nested)} is "
                        f"{'an object' if isinstance(nested, dict) else 'a list inside a list'}; a setting's value is "
                        f"a string, a number or true/false{', or a list of them' if many else ''}")
    try:
        values = [action.type(text) if action.type else text
                  for text in (v if isinstance(v, str) else json.dumps(v) for v in values)]
    except (ValueError, TypeError, argparse.ArgumentTypeError, UserError) as e:
        raise UserError(f"{path}: setting {action.dest!r}: {e}")
    bad = [v for v in values if action.choices is not None and v not in action.choices]
    if bad:
        raise UserError(f"{path}: setting {action.dest!r}: {bad[0]!r} is not one of "
                        f"{', '.join(map(str, action.choices))}")
    return values if many else values[0]


def check_positive(args, *names):
    """Each named setting must be at least 1 (None: not set, allowed): one line naming the first that is not."""
    for name in names:
        value = getattr(args, name)
        if value is not None and value < 1:
            raise UserError(f"--{name} must be at least 1, got {value}")


def check_non_negative(args, *names):
    """Each named setting must be 0 or more (0 means "all", "none" or "off" in each help text): one line naming the
    first that is not."""
    for name in names:
        value = getattr(args, name)
        if value is not None and value < 0:
            raise UserError(f"--{name} must be 0 or more, got {value}")


def check_fraction(args, *names):
    """Each named setting must be a share in [0, 1] (outside, a draw `random() < share` is silently all or none)."""
    for name in names:
        value = getattr(args, name)
        if value is not None and not 0.0 <= value <= 1.0:
            raise UserError(f"--{name} must be in [0, 1], got {value}")


def check_finite(args, *names):
    """Each named setting must be finite, where ±inf would make the loss or the weights inf and then NaN (where inf
    means "off" or "no bound", as for --grad_clip or --clip_high, a setting is not named here)."""
    for name in names:
        value = getattr(args, name)
        if value is not None and math.isinf(value):
            raise UserError(f"--{name} must be finite, got {value}")


def check_optimizer(args):
    """AdamW's settings (train_rl.py, redistill_sft.py): --lr > 0 and finite, betas in [0, 1), weight decay finite
    and >= 0, grad clip >= 0 (0 or inf: off). Out of range, torch's AdamW stops mid-setup with a traceback, a
    negative clip clips nothing, and an infinite lr or weight decay makes every weight NaN."""
    if not args.lr > 0:
        raise UserError(f"--lr must be > 0, got {args.lr}")
    for name in ("beta1", "beta2"):
        if not 0 <= getattr(args, name) < 1:
            raise UserError(f"--{name} must be in [0, 1), got {getattr(args, name)}")
    check_non_negative(args, "weight_decay", "grad_clip")
    check_finite(args, "lr", "weight_decay")  # (inf: the first update makes every weight NaN)


# below it, logits / temperature overflow float32 (1e-39: inf, then NaN log-probs and the vocabulary's last id)
MIN_TEMPERATURE = 1e-6


def check_temperature(args):
    """--temperature 0 (greedy) or at least MIN_TEMPERATURE, and finite (inf: uniformly random tokens)."""
    if args.temperature == math.inf:
        raise UserError("--temperature inf samples every token uniformly at random; give a finite temperature")
    if 0 < args.temperature < MIN_TEMPERATURE:
        raise UserError(f"--temperature {args.temperature:g}: below {MIN_TEMPERATURE:g} logits / temperature overflow "
                        "float32; use 0 for greedy decoding")


def check_sampling(args):
    """--temperature >= 0 (0 = greedy), --top_p in (0, 1], and greedy with one sample per prompt: its n samples would
    be one response n times (eval.py, sample_policy.py)."""
    if args.temperature < 0 or not 0 < args.top_p <= 1:
        raise UserError(f"need --temperature >= 0 and 0 < --top_p <= 1 (got {args.temperature}, {args.top_p})")
    check_temperature(args)
    if args.temperature == 0 and args.samples_per_prompt > 1:
        raise UserError(f"greedy decoding (--temperature 0) gives {args.samples_per_prompt} identical samples per "
                        "prompt; use --samples_per_prompt 1 or a temperature > 0")


def check_distinct_outputs(outputs, inputs=()):
    """outputs: (flag, path) pairs, empty paths skipped; each must be a file of its own, and none an input file
    (inputs: (flag, path) pairs), so one write cannot replace another's result or the data it was made from."""
    seen = {}
    for flag, path in outputs:
        if not path:
            continue
        check_output_path(flag, path, directory=False)
        key = file_key(path)
        if key in seen:
            raise UserError(f"{flag} {path}: the same file as {seen[key][0]}; each output needs its own")
        seen[key] = (flag, path)
    for flag, path in inputs:
        if path and file_key(path) in seen:
            out_flag, out_path = seen[file_key(path)]
            raise UserError(f"{out_flag} {out_path}: that is an input ({flag}); it would be overwritten")


def check_distinct_inputs(inputs):
    """inputs: (flag, path) pairs; no file listed twice (also under another name, or under two flags): its
    examples would count twice, or a validation file would be one of the training files."""
    seen = {}
    for flag, path in inputs:
        key = file_key(path)
        if key in seen:
            raise UserError(f"{flag} {path}: the same file as {seen[key]}; give each file once")
        seen[key] = f"{flag} {path}"


def file_key(path):
    """What tells files apart: an existing file's file_identity (another spelling, a symbolic or a hard link of it is
    the same file), else the path with its links resolved (an output not written yet)."""
    try:
        identity = file_identity(path)
    except OSError:  # (a path through a file, an unreadable folder: the stage that opens it says so)
        identity = None
    return os.path.realpath(path) if identity is None else tuple(identity)


# the chat terminators a response may end with
STOP_TOKENS = ("<|endoftext|>", "<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<|end_of_text|>")  # Qwen, Llama 3


def stop_token_ids(tokenizer):
    """The ids that end a response (generation stops at them, SFT trains none inside one, a saved checkpoint's
    generation config names them): the tokenizer's EOS plus the usual chat terminators it knows."""
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    vocab = tokenizer.get_vocab()
    ids |= {vocab[t] for t in STOP_TOKENS if t in vocab}
    return sorted(ids)


def generation_stop_ids(tokenizer, where=""):
    """stop_token_ids, of which generation needs one: without, every response would run to its budget and score 0
    (a finished response is the only right one). where: the tokenizer's place, for the error."""
    stop = stop_token_ids(tokenizer)
    if not stop:
        raise UserError(f"{where + ': ' if where else ''}the tokenizer has no eos_token and none of the usual end "
                        f"tokens (common.STOP_TOKENS): no response could end; set eos_token in the tokenizer's "
                        f"tokenizer_config.json")
    return stop


def str2bool(s) -> bool:
    if isinstance(s, bool):
        return s
    if s.lower() in ("1", "true", "yes", "on"):
        return True
    if s.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean, got {s!r}")


def run_main(main):
    """Run a script's main() and exit with the code it returns (None: 0); a UserError becomes one clear line on
    stderr and exit code 2.

    A torchrun worker ends with os._exit, after flushing its output, instead of a normal interpreter shutdown.
    Once a model has been FSDP-sharded, torch keeps references to its device mesh, and through it to the process
    group, beyond destroy_process_group (dist_cleanup), so gloo's worker threads are still alive while the
    interpreter finalizes; one that then drops a Python-owned tensor dies in a destructor ("terminate called
    without an active exception", SIGABRT): a finished run reported as failed, about once in a hundred 2-rank
    runs. Every file is closed by then (writes are atomic or in `with` blocks; wandb is finished by the script).

    Output a terminal cannot show (an ASCII or Latin-1 stdout: PYTHONIOENCODING, PYTHONUTF8=0 with such a locale)
    is written as a backslash escape, never an error: printing "∇J" or "±" must not cost a result computed first."""
    for stream in (sys.stdout, sys.stderr):
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="backslashreplace")
    try:
        code = main()
        code = code if isinstance(code, int) else 0
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        remove_lock_only_dirs()
        code = 2
    if "RANK" in os.environ:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


# -----------------------------------------------------------------------------
# ranks and seeds (torch.distributed's own numbers: 0 and 1 before dist_setup)


def rank() -> int:
    import torch.distributed as dist
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    import torch.distributed as dist
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def print0(*args, **kwargs):
    if rank() == 0:
        print(*args, **kwargs, flush=True)


def script_default(parser, name):
    """A setting's default as the script sets it (parse_settings makes a --config's values the parser's defaults)."""
    return getattr(parser, "own_defaults", {}).get(name, parser.get_default(name))


def note_unused(args, parser, names, unused, switch):
    """A setting whose switch is off is not used: said once (`note: --x not used: only SWITCH uses it`) where it
    differs from the script's default (on the command line or in a --config), not refused (a sweep may pass it to
    every arm)."""
    given = settings_given(args, parser, names)
    if unused and given:
        print0(f"note: {' and '.join(given)} not used: only {switch} uses {'them' if len(given) > 1 else 'it'}")


def refuse_unused(args, parser, names, switch, instead):
    """note_unused's stricter kin, for a mode that would write over the other's outputs: a setting of `switch`'s mode
    given without it (`--x without --switch`: a forgotten switch) is an error, before anything is written."""
    if given := settings_given(args, parser, names):
        them = "them" if len(given) > 1 else "it"
        raise UserError(f"{' and '.join(given)} without {switch}: give {switch} to use {them}, or leave {them} out "
                        f"to {instead}")


def settings_given(args, parser, names):
    """The flags of `names` that differ from the script's default (given on the command line or in a --config)."""
    return [f"--{name}" for name in names if getattr(args, name) != script_default(parser, name)]


# a bar redrawn ten times a second suits a terminal; written to a log file (stderr not a terminal), a paper-scale
# run's bars would add millions of redraws, so there a bar is redrawn at most once a minute
LOG_FILE_BAR_SECONDS = 60
PROGRESS_HELP = "tqdm progress bars on rank 0 (redrawn at most once a minute where stderr is a file, not a terminal)"


def progress_bar(total, desc, enabled=True, **kwargs):
    """A tqdm bar on rank 0 when enabled (elsewhere its update and close do nothing)."""
    from tqdm import tqdm
    interval = 0.1 if sys.stderr.isatty() else LOG_FILE_BAR_SECONDS
    # maxinterval too: tqdm's monitor thread otherwise forces a redraw every 10 s
    return tqdm(total=total, desc=desc, disable=not enabled or rank() != 0, dynamic_ncols=True,
                mininterval=interval, maxinterval=max(interval, 10), **kwargs)


def seed_everything(seed: int):
    import numpy as np
    import torch
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def derive_seed(seed: int, *parts: int) -> int:
    """The seed of one stream out of many (a batch, a rank, a chunk): seed, then each part, folded as
    s * 1_000_003 + part. Distinct for parts below 1,000,003 (a prime), so no two streams of a run share a seed."""
    for part in parts:
        seed = seed * 1_000_003 + part
    return seed % 2**63  # torch's manual_seed takes 64-bit seeds


# -----------------------------------------------------------------------------
# files


def text_lines(path, torn_tail=False):
    """Yield (line number, line) of a UTF-8 text file, "\r\n" read as "\n"; a line that is not UTF-8 raises UserError
    naming the file and line (a text-mode read would raise a traceback, from a chunk ahead of the line). torn_tail:
    a last line without its newline may end inside a character (a write cut short): it is yielded with that
    character replaced, for the caller to judge (iter_jsonl drops it)."""
    if os.path.isdir(path):
        raise UserError(f"{path}: is a directory; give a file")
    if not os.path.isfile(path):
        raise UserError(f"{path}: not a regular file (a pipe or a device, as <(zcat ...) gives: the stages read a file "
                        f"more than once; write it out first)" if os.path.exists(path) else f"{path}: file not found")
    try:
        f = open(path, "rb")
    except OSError as e:  # unreadable (permissions), or gone since the check
        raise UserError(f"{path}: cannot read it ({e.strerror})") from e
    with f:
        for lineno, raw in enumerate(f, 1):
            if lineno == 1 and raw.startswith(b"\xef\xbb\xbf"):  # a UTF-8 BOM (Notepad, Excel): not text
                raw = raw[3:]
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                if torn_tail and not raw.endswith(b"\n"):
                    yield lineno, raw.decode("utf-8", errors="replace")
                    return
                raise UserError(f"{path}:{lineno}: not valid UTF-8 (byte {e.start + 1} of the line: {e.reason})")
            yield lineno, (line[:-2] + "\n" if line.endswith("\r\n") else line)


def not_text(value, place=""):
    """Where a parsed JSON value (a string, or a key) holds a lone surrogate, as the problem an error names; None:
    nowhere. JSON can escape one ("\\ud83d"); it is no text: a tokenizer refuses it, a UTF-8 file cannot hold it."""
    def bad(text):
        try:
            text.encode("utf-8")
            return False
        except UnicodeEncodeError:
            return True

    def problem(where):
        where = where.encode("utf-8", "backslashreplace").decode()  # printable
        return f"field '{where}' is not valid Unicode (a lone surrogate escape, \\ud800-\\udfff)"
    if isinstance(value, str):
        return problem(place) if bad(value) else None
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, item in items:
        where = f"{place}.{key}".lstrip(".") if isinstance(key, str) else f"{place}[{key}]"
        found = problem(where) if isinstance(key, str) and bad(key) else not_text(item, where)
        if found:
            return found
    return None


# What json.loads raises on text that is not JSON it can hold: JSONDecodeError (a ValueError), ValueError for an
# integer of over 4,300 digits (Python's limit on int parsing), RecursionError for arrays nested ~1,000 deep, and
# DuplicateKey (a ValueError) from json_loads.
JSON_ERRORS = (ValueError, RecursionError)


class DuplicateKey(ValueError):
    pass


def unique_keys(pairs):
    """json's object_pairs_hook: the object, or DuplicateKey where a key appears twice (json would keep the last
    value and drop the first without a word: {"answer": 1, "answer": 2} is an input to fix, not to guess)."""
    obj = dict(pairs)
    if len(obj) < len(pairs):
        seen = set()
        twice = next(k for k, _ in pairs if k in seen or seen.add(k))
        raise DuplicateKey(f"field {twice!r} appears twice in one object")
    return obj


def json_loads(text):
    """json.loads for inputs and logs: an object with a key twice raises DuplicateKey (one of JSON_ERRORS)."""
    return json.loads(text, object_pairs_hook=unique_keys)


def json_error_text(e):
    """One line for a JSON_ERRORS error: the decoder's message, or what else stopped it."""
    if isinstance(e, json.JSONDecodeError):
        return e.msg
    return "nested too deeply" if isinstance(e, RecursionError) else str(e)


def iter_jsonl(path, torn_tail=False):
    """Yield (line number, record) of a jsonl file, skipping blank lines; a line that is not a JSON object
    raises UserError naming the file and line.

    torn_tail: the file is a run's own log (metrics.jsonl, rollout logs), which a kill or a full disk can leave with
    its last line cut short: a last line without its newline that is not a JSON object is dropped with a warning
    naming it. Inputs (datasets, SFT files) keep the error: a record is never dropped silently from data."""
    for lineno, line in text_lines(path, torn_tail):
        if not line.strip():
            continue
        try:
            rec = json_loads(line)
            problem = None if isinstance(rec, dict) else f"expected a JSON object, got {type(rec).__name__}"
            if problem is None and "\\u" in line:  # (only an escape can make a lone surrogate)
                problem = not_text(rec)
        except JSON_ERRORS as e:
            problem = f"not valid JSON ({json_error_text(e)})"
        if problem:
            if torn_tail and not line.endswith("\n"):  # only the last line can lack its newline
                print0(f"warning: {path}:{lineno}: dropped a torn last line (a write cut short by a kill or a "
                       f"full disk)")
                return
            raise UserError(f"{path}:{lineno}: {problem}")
        yield lineno, rec


def read_jsonl(path, required=(), torn_tail=False, types=None):
    """Read a jsonl file; a bad line, a missing field or one of another type than types[field] (a type or a tuple
    of them) raises UserError naming file, line and field (torn_tail: see iter_jsonl)."""
    records = []
    for lineno, rec in iter_jsonl(path, torn_tail):
        check_fields(f"{path}:{lineno}", rec, required, types)
        records.append(rec)
    return records


def read_metrics(path, types=None):
    """A run's metrics.jsonl (ckpt.metrics_log writes it; a killed run's torn last line is dropped): each line an
    object whose 'step' is a non-negative integer no smaller than the line before's, and whose fields in `types` are
    of theirs (check_fields), else a UserError naming the file, line and field (a hand-edited step was a TypeError
    on resume, or a row counted twice)."""
    rows, last = [], 0
    for lineno, rec in iter_jsonl(path, torn_tail=True):
        check_fields(f"{path}:{lineno}", rec, (), types)
        step = rec.get("step")
        if type(step) is not int or step < 0:
            got = json.dumps(step) if "step" in rec else "none"
            raise UserError(f"{path}:{lineno}: field 'step' must be a non-negative integer, got {got}")
        if step < last:
            raise UserError(f"{path}:{lineno}: step {step} after step {last} (a run's log only goes forward)")
        rows.append(rec)
        last = step
    return rows


def finite_number(value):
    """Whether a value read from JSON is a number a table or a sum can use: an int or a float (not a bool, which
    Python counts an int), finite (NaN, Infinity and an int past a float's range are not)."""
    try:
        return type(value) in (int, float) and math.isfinite(value)
    except OverflowError:
        return False


def is_fraction(value):
    """finite_number, in [0, 1] (an accuracy, a share)."""
    return finite_number(value) and 0 <= value <= 1


def check_fields(where, rec, required=(), types=None):
    """Each field of `required` is in the record rec, and each of `types` there is of its type (a type or a tuple
    of them); otherwise a UserError naming `where` (file:line) and the field."""
    for field in required:
        if field not in rec:
            raise UserError(f"{where}: missing field '{field}'")
    for field, kind in (types or {}).items():
        if field in rec and not isinstance(rec[field], kind):
            names = " or ".join(k.__name__ for k in (kind if isinstance(kind, tuple) else (kind,)))
            raise UserError(f"{where}: field '{field}' must be of type {names}, got {type(rec[field]).__name__} "
                            f"({rec[field]!r})")


def read_json(path, what="a JSON object", repeated_keys=False):
    """The JSON object in path. Unreadable, not UTF-8, not JSON or not an object: one line naming the file and what
    it should hold, not a traceback. A key twice in one object is an error too, unless repeated_keys (a file other
    tools write and read, a checkpoint's config.json: its last value, as transformers takes it)."""
    try:
        with open(path, encoding="utf-8-sig") as f:  # (-sig: a BOM at the start is no part of the JSON)
            obj = json.loads(f.read(), object_pairs_hook=None if repeated_keys else unique_keys)
    except (OSError, *JSON_ERRORS) as e:  # (UnicodeDecodeError is a ValueError)
        raise UserError(f"{path}: cannot read {what} ({type(e).__name__}: {json_error_text(e)})") from e
    if not isinstance(obj, dict):
        raise UserError(f"{path}: {what} expected, got a JSON {type(obj).__name__}")
    if problem := not_text(obj):
        raise UserError(f"{path}: {problem}")
    return obj


_LOCKS = {}  # lock file's real path -> the file, open and locked for the life of the process
_MADE_FOR_LOCK = {}  # lock file's real path -> (its path, the directories lock_run_dir made for it, deepest first)


def lock_run_dir(path, name=".lock"):
    """Hold the lock of run directory `path` (its .lock file) for the rest of this process: a second run started
    on it (another terminal, or a re-run while a killed torchrun's workers, which live in sessions of their own, still
    write there) is refused, where the two would interleave their checkpoints and logs. The OS lets go of it when the
    process ends, however it ends. A second call in the same process (a resumed main() in tests) holds it already.
    `name`: another lock file in `path`, for a run whose outputs share the directory with other runs' (sample_effect's
    --out): it locks only its own."""
    import fcntl
    import socket
    lock_file = os.path.join(path, name)
    key = os.path.realpath(lock_file)
    if key in _LOCKS:
        held = _LOCKS[key]
        if file_identity(lock_file) == file_identity(held.fileno()):
            return
        held.close()  # a run of this process that has ended: its directory was removed since; lock the new one
        del _LOCKS[key]
    try:
        made = make_dirs(path or ".")
        f = open(lock_file, "a+")
    except OSError as e:
        raise_refused_write(lock_file, e, "nothing was started")
        raise
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip() or "another process"
        f.close()
        what, kind = (path, "directory") if name == ".lock" else (lock_file, "output")
        raise UserError(f"{what}: another run is using this {kind} ({holder}); wait for it to end, or stop it")
    except OSError as e:  # a file system without flock (Lustre -o noflock: ENOSYS; NFS without lockd: ENOLCK)
        if e.errno not in (errno.ENOSYS, errno.ENOLCK, errno.EOPNOTSUPP, errno.EINVAL):
            raise
        print(f"note: cannot lock {lock_file} ({os.strerror(e.errno)}): running without the lock; make sure no "
              f"other run uses this {'directory' if name == '.lock' else 'output'}", file=sys.stderr)
    f.seek(0)
    f.truncate()
    f.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
    f.flush()
    _LOCKS[key] = f
    _MADE_FOR_LOCK[key] = (lock_file, made)


def make_dirs(path):
    """os.makedirs(path), returning the directories it made, deepest first."""
    made, p = [], os.path.abspath(path)
    while not os.path.lexists(p):
        made.append(p)
        p = os.path.dirname(p)
    os.makedirs(path, exist_ok=True)
    return made


def remove_lock_only_dirs():
    """After a run stopped by a UserError: each directory that this process made for its lock (lock_run_dir) and that
    holds nothing but the lock file goes, with the lock and the parents made with it. An input found bad after the
    lock (a checkpoint's weights, read once the run has begun) then leaves no empty run directory behind, which a
    later look would take for a run. A directory that existed before, or that holds anything else, stays."""
    for key, (lock_file, made) in list(_MADE_FOR_LOCK.items()):
        del _MADE_FOR_LOCK[key]
        held = _LOCKS.get(key)
        try:
            if not made or held is None or os.listdir(made[0]) != [os.path.basename(lock_file)]:
                continue
            if file_identity(lock_file) != file_identity(held.fileno()):
                continue  # (not this run's lock any more)
            del _LOCKS[key]
            os.remove(lock_file)
            held.close()
            for folder in made:
                os.rmdir(folder)
        except OSError:
            pass  # (a directory someone else wrote into meanwhile: it stays)


def check_lock_held(path, name=".lock", identity=None):
    """Stop a run whose directory `path` was removed or moved away while it ran (`rm -rf` or `mv` and a re-run, the
    usual restart): its lock went with the directory, a re-run there holds a new one, and this run's next write
    (atomic_open makes the folders again) would land among that run's files. Call it before writing into `path`.
    Nothing when this process holds no lock named so (lock_run_dir was not called, or a test let go of it).
    identity: the lock file's file_identity as its holder saw it, for a process that does not hold it (a rank > 0)."""
    lock_file = os.path.join(path, name)
    if identity is None:
        held = _LOCKS.get(os.path.realpath(lock_file))  # (as lock_run_dir keyed it: `run` and `./run` are one)
        if held is None or held.closed:
            return
        identity = file_identity(held.fileno())
    now = file_identity(lock_file)
    if now != identity:
        raise UserError(f"{path}: removed or moved away while this run used it ({lock_file} is "
                        f"{'gone' if now is None else 'another run' + chr(39) + 's'}); stopping before writing there")


def run_in_progress(path, name=".lock"):
    """Who holds run directory `path`'s lock now ("pid N on HOST"), or None: a stage about to read a run's logs asks,
    as they are incomplete while the run lives. None too where nothing can tell (no lock file, no flock), and for a
    lock this process holds (a run's main() that has returned, in tests)."""
    import fcntl
    lock_file = os.path.join(path, name)
    if os.path.realpath(lock_file) in _LOCKS:
        return None
    try:
        f = open(lock_file, encoding="utf-8", errors="replace")
    except OSError:
        return None
    with f:
        try:
            fcntl.flock(f, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return f.read().strip() or "another process"
        except OSError:
            return None
    return None  # (closing the file lets go of the shared lock)


def file_identity(path):
    """[device, inode] of the file at path now, or None: the same list on every rank while no one replaces it. path
    may be an open file's descriptor (that file's, even if it has since been moved or removed)."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return [st.st_dev, st.st_ino]


def fsync_dir(path):
    """Make the entries of directory `path` (a rename into it, a new file) durable: POSIX asks for the directory's own
    fsync. A filesystem that cannot sync a directory (some network ones) is let be."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def fsync_tree(path):
    """fsync every file under directory `path`, then each directory: before a rename publishes it, so that after a
    power loss the name never points at files whose data did not reach the disk."""
    for root, _, files in os.walk(path, topdown=False):
        for name in files:
            with open(os.path.join(root, name), "rb") as f:
                os.fsync(f.fileno())
        fsync_dir(root)


def file_stamps(paths):
    """{real path: [size, modification time in ns]} of files a result is computed from: a checkpoint rebuilt under
    the same path (a re-run stage) or an edited file then tells an earlier result or a stopped run apart. (Real: links
    resolved, so that another spelling of the same files gives the same stamps.) A missing file's stamp is None: it
    differs from any earlier one, and the stage that reads the file says what is missing."""
    stamps = {}
    for p in paths:
        try:
            st = os.stat(p)
        except FileNotFoundError:
            stamps[os.path.realpath(p)] = None
        except OSError as e:
            raise UserError(f"{p}: cannot read it ({e.strerror})") from e
        else:
            stamps[os.path.realpath(p)] = [st.st_size, st.st_mtime_ns]
    return stamps


def same_files(a, b):
    """Whether two values of a path setting (a path or a list of them) name the same existing files (relative or
    absolute, through a link)."""
    a, b = ([a], [b]) if isinstance(a, str) and isinstance(b, str) else (a, b)
    if not (isinstance(a, list) and isinstance(b, list) and len(a) == len(b)):
        return False
    try:
        return all(isinstance(x, str) and isinstance(y, str) and os.path.samefile(x, y) for x, y in zip(a, b))
    except OSError:  # (one that does not exist, or a hub name)
        return False


def data_digest(rows):
    """A short sha256 of a run's data, rows in order (each JSON-serialisable): the same path can hold other data
    by the time a run resumes or a result is reused (a stage re-run into the same folder), and the digest then tells
    them apart."""
    h = hashlib.sha256()
    for row in rows:
        h.update(json.dumps(row, sort_keys=True, ensure_ascii=False, default=str).encode("utf-8") + b"\n")
    return h.hexdigest()[:16]


@contextmanager
def atomic_open(path, mode="w"):
    """Write to a temporary file beside `path` (.tmp_NAME.XXXXXXXX), then rename: readers never see a half-written
    file, and the data is on disk before the name is (a power loss leaves the old file or the new one, never an empty
    or torn one)."""
    d = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(d, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=d, prefix=f".tmp_{os.path.basename(path)}.")
    except OSError as e:
        raise_refused_write(path, e, "nothing was replaced")
        raise
    try:
        with os.fdopen(fd, mode, encoding=None if "b" in mode else "utf-8") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give the file the usual permissions
        os.replace(tmp, path)
        fsync_dir(d)
    except BaseException as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise_refused_write(path, e, "nothing was replaced")
        raise


def remove_stale_temps(paths, where):
    """Delete the temporary files a SIGKILL (which runs no cleanup) left of atomic_open's writes of `paths`: each
    .tmp_NAME.XXXXXXXX beside its path, a whole output's size, never reused (each write takes a fresh name); a note
    says how much went from `where` (the outputs' directory). Call it holding the lock of the run that writes `paths`
    (no live write's file is then removed), on one rank. Returns the bytes freed."""
    freed = 0
    for path in paths:
        folder, name = os.path.split(os.path.abspath(path))
        # (mkstemp's 8 characters; before 2026-12-06 they followed the name with no dot: a kill under that version)
        stale = re.compile(re.escape(f".tmp_{name}") + r"\.?[a-z0-9_]{8}")
        for entry in os.scandir(folder) if os.path.isdir(folder) else []:
            if stale.fullmatch(entry.name) and entry.is_file(follow_symlinks=False):
                freed += entry.stat().st_size
                os.remove(entry.path)
    if freed:
        print(f"note: removed what a killed run's writes left in {where} ({freed / 2**20:.1f} MiB)", flush=True)
    return freed


def lock_output(paths):
    """For a stage that writes files, not a run directory (lim_select, report, tiny_base): the lock of its first
    output (.NAME.lock beside it, its directory made: a second run writing it is refused, as lock_run_dir refuses),
    then what a SIGKILL left of atomic_open's writes of every path goes (remove_stale_temps). Call it once the inputs
    are checked (bad input leaves no directory behind), before the first write."""
    paths = [p for p in paths if p]
    folder = os.path.dirname(os.path.abspath(paths[0]))
    lock_run_dir(folder, f".{os.path.basename(paths[0])}.lock")
    remove_stale_temps(paths, folder)


# a write the storage refused: full disk or quota, a file size limit, an I/O error, a read-only filesystem, no
# permission
REFUSED_WRITE = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EIO, errno.EROFS, errno.EACCES, errno.EPERM)


def error_chain(e):
    """e, then what it was raised from (its __cause__, else its __context__), and so on, each once."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        yield e
        e = e.__cause__ or e.__context__


def out_of_memory(e):
    """Whether e is an allocator's refusal: Python's MemoryError, torch's OutOfMemoryError (a GPU's), or the
    RuntimeError of torch's CPU allocator ("can't allocate memory")."""
    import torch
    return isinstance(e, (MemoryError, torch.OutOfMemoryError)) or (
        isinstance(e, RuntimeError) and bool(re.search(r"can't allocate memory|not enough memory", str(e))))


def raise_refused_write(path, e, outcome):
    """If the storage refused a write behind e (e itself, or an error it was raised from: torch.save's own error
    hides the OSError; safetensors' names its code only in its text), a UserError naming path and saying what became
    of it (`outcome`); else nothing."""
    for cause in error_chain(e):
        code = cause.errno if isinstance(cause, OSError) else None
        if code is None and type(cause).__name__ == "SafetensorError":
            found = re.search(r"\(os error (\d+)\)", str(cause))
            code = found and int(found.group(1))
        if code in REFUSED_WRITE:
            fix = ("Free space there" if code in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG) else
                   "Check the permissions there" if code in (errno.EACCES, errno.EPERM) else "Check the storage")
            raise UserError(f"{path}: cannot write it ({os.strerror(code)}); {outcome}. {fix} and run again "
                            f"(--resume true where the stage has it)") from e


def open_lines(path):
    """`with open_lines(path) as lines: for lineno, record in lines`: a jsonl file streamed with clear errors."""
    return closing(iter_jsonl(path))


def write_jsonl(path, records):
    """Atomically write records as jsonl."""
    with atomic_open(path) as f:
        for rec in records:
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")


def write_split(path, records):
    """A data script's split file; a split of no records (its sizes set to 0) is none, as every stage refuses an empty
    split, and an earlier run's file of that name goes (it is not of these settings). Returns whether it was
    written."""
    if records:
        write_jsonl(path, records)
        return True
    removed = os.path.exists(path)
    if removed:
        os.remove(path)
    print(f"note: no records for {path}: not written" + (" (an earlier one removed)" if removed else ""))
    return False


def json_safe(obj):
    """obj with each non-finite float as the string "inf", "-inf" or "nan": json.dumps writes them bare (Infinity,
    NaN), which Python reads back but strict readers (jq, JavaScript, most other languages) refuse."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def write_json(path, obj):
    """Atomically write obj as strict JSON (settings, summaries): an inf setting (--clip_high inf) as "inf"."""
    with atomic_open(path) as f:
        json.dump(json_safe(obj), f, indent=2, ensure_ascii=False, allow_nan=False)
        f.write("\n")


def append_jsonl(path, record):
    """Append one record (metrics logs); the line is written whole with one write call."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    try:
        f = open(path, "a", encoding="utf-8")
    except OSError as e:
        raise_refused_write(path, e, "nothing was added to it")
        raise
    try:
        with f:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    except OSError as e:  # (a line cut short is dropped by its readers)
        raise_refused_write(path, e, "its last line was not added whole")
        raise


# -----------------------------------------------------------------------------
# plots


def pyplot():
    """matplotlib.pyplot on the file-only Agg backend, or None with a one-line note when matplotlib is not
    installed (plots are optional: every number is in the script's json output too)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print0("note: matplotlib not installed; no plots (pip install matplotlib)")
        return None
    return plt


def save_figure(fig, path, dpi):
    """A PNG written whole or not at all (atomic_open: a kill mid-write leaves the old plot, not a torn file), and
    the figure freed."""
    with atomic_open(path, "wb") as f:
        fig.savefig(f, format="png", dpi=dpi)
    import matplotlib.pyplot as plt
    plt.close(fig)
