"""Train tiny language models built from recdsl rules on MQAR or S3 and compare them.

    python examples/train.py --task mqar --rules gated_delta,kla,gla,mamba2,raven --jobs 3
    python examples/train.py --task s3 --rules deltaproduct,gated_delta --jobs 2 \\
        --option deltaproduct:allow_neg_eigval=true,dims.NH=2,conv=false \\
        --option gated_delta:conv=false

Each rule becomes a ``recdsl.models.CausalLM`` (its ``rule.mixer`` in every block), trained
with AdamW on fresh batches from ``recdsl.tasks`` (the same batches and the same held-out set
for every rule). Writes ``OUT/TASK.csv`` (one row per evaluation), ``OUT/TASK.png`` (accuracy
against steps per rule, when matplotlib is installed) and ``OUT/TASK.md`` (the table that is
also printed at the end).

``--option RULE:KEY=VALUE[,KEY=VALUE...]`` (repeatable) passes options to that rule's mixers:
``allow_neg_eigval=true``, ``conv=false``, ``backend=torch-chunk``, ``dims.NH=2``,
``gates.beta=sigmoid`` (a role name, see ``recdsl.runtime.mixer``), ``intermediate_size=...``.
"""
from __future__ import annotations

import argparse
import csv
import math
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: import the recdsl this file belongs to
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch
import torch.nn.functional as F

import recdsl
import recdsl.examples
from recdsl import tasks
from recdsl.errors import RecdslError
from recdsl.models import CausalLM

# per task: what the unset options default to (MQAR: the acceptance config)
TASK_DEFAULTS = {
    "mqar": dict(vocab=64, length=64, pairs=8, hidden=64, layers=2, heads=2, lr=3e-3, batch=32,
                 steps=1500, target=0.99),
    # S3: one layer as in DeltaProduct; sized to show the result on a CPU in minutes
    "s3": dict(length=16, hidden=32, layers=1, heads=2, lr=1e-2, batch=32, steps=2000,
               target=0.99),
}
MIXER_KEYS = ("allow_neg_eigval", "conv", "backend", "output", "norm_eps", "intermediate_size",
              "initializer_range")
CSV_FIELDS = ("task", "rule", "step", "loss", "accuracy", "seconds")


# ----------------------------------------------------------------------------- arguments

def _value(text):
    low = text.lower()
    if low in ("true", "false"):
        return low == "true"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def parse_options(specs, rules) -> dict:
    """``["rule:key=value,key=value", ...]`` -> {rule: mixer options}; raises ``RecdslError``."""
    options = {r: {} for r in rules}
    for spec in specs:
        rule, sep, pairs = spec.partition(":")
        if not sep or not pairs:
            raise RecdslError(f"--option {spec!r}: expected RULE:KEY=VALUE[,KEY=VALUE...]")
        if rule not in options:
            raise RecdslError(f"--option {spec!r}: rule '{rule}' is not in --rules "
                              f"({', '.join(rules)})")
        for pair in pairs.split(","):
            key, eq, text = pair.partition("=")
            if not eq or not key or not text:
                raise RecdslError(f"--option {spec!r}: '{pair}' is not KEY=VALUE")
            group, dot, name = key.partition(".")
            if dot and group in ("dims", "gates") and name:
                options[rule].setdefault(group, {})[name] = _value(text)
            elif not dot and key in MIXER_KEYS:
                options[rule][key] = _value(text)
            else:
                raise RecdslError(f"--option {spec!r}: unknown key '{key}'; keys are "
                                  f"{', '.join(MIXER_KEYS)}, dims.NAME and gates.NAME")
    return options


def load_rule(name):
    """A shipped example by name, or a ``.rec`` file by path."""
    if name.endswith(".rec") and Path(name).exists():
        return recdsl.load(name)
    return recdsl.examples.load(name)


def build_parser():
    p = argparse.ArgumentParser(prog="train.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--task", choices=sorted(TASK_DEFAULTS), required=True)
    p.add_argument("--rules", required=True,
                   help="comma-separated shipped example names or .rec paths")
    p.add_argument("--option", action="append", default=[], metavar="RULE:KEY=VALUE,...",
                   help="mixer options for one rule (repeatable), e.g. "
                        "deltaproduct:allow_neg_eigval=true,dims.NH=2")
    p.add_argument("--steps", type=int, help="most training steps per rule")
    p.add_argument("--batch", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--hidden", type=int)
    p.add_argument("--layers", type=int)
    p.add_argument("--heads", type=int)
    p.add_argument("--vocab", type=int, help="mqar vocabulary size (s3: always 6)")
    p.add_argument("--length", type=int, help="sequence length")
    p.add_argument("--pairs", type=int, help="mqar key-value pairs per sequence")
    p.add_argument("--filler", choices=("zero", "random"), default="zero",
                   help="mqar: the tokens between the pairs and the queries: zero (default) or "
                        "random (zoology's random_non_queries, much slower to learn)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--target", type=float, help="stop a rule once eval accuracy reaches this")
    p.add_argument("--eval-every", type=int, default=50)
    p.add_argument("--eval-size", type=int, default=256)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    p.add_argument("--jobs", type=int, default=1,
                   help="rules trained at once, each in its own process with --threads threads "
                        "(results are the same as one at a time)")
    p.add_argument("--out", default="train_out", help="directory for TASK.csv/.png/.md")
    p.add_argument("--no-progress", action="store_true")
    return p


def parse_args(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    for key, value in TASK_DEFAULTS[args.task].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    for key in ("steps", "batch", "hidden", "layers", "heads", "length", "eval_every",
                "eval_size", "threads", "jobs") + (("vocab", "pairs") if args.task == "mqar" else ()):
        if getattr(args, key) < 1:
            parser.error(f"--{key.replace('_', '-')} must be at least 1, not {getattr(args, key)}")
    if args.lr <= 0 or not math.isfinite(args.lr):
        parser.error(f"--lr must be a positive number, not {args.lr}")
    if not 0 < args.target <= 1:
        parser.error(f"--target is an accuracy in (0, 1], not {args.target}")
    args.rule_names = [r.strip() for r in args.rules.split(",") if r.strip()]
    if not args.rule_names or len(set(args.rule_names)) != len(args.rule_names):
        parser.error(f"--rules must name distinct rules, not {args.rules!r}")
    try:
        args.rule_options = parse_options(args.option, args.rule_names)
        args.loaded = {r: load_rule(r) for r in args.rule_names}
        # the task's sizes and every rule's options checked before any training
        batch(args, 1, torch.Generator().manual_seed(0))
        for r in args.rule_names:
            CausalLM(args.loaded[r], vocab_size(args), args.hidden, 1, args.heads,
                     **args.rule_options[r])
    except RecdslError as err:
        parser.error(str(err))
    except (TypeError, ValueError) as err:  # an option value of the wrong kind, e.g. conv=3
        parser.error(f"--option: {err}")
    return args


# ----------------------------------------------------------------------------- training

def batch(args, n, generator):
    if args.task == "mqar":
        return tasks.mqar(n, args.vocab, args.length, args.pairs, noise=args.filler == "random",
                          generator=generator)
    return tasks.s3(n, args.length, generator=generator)


def vocab_size(args):
    return args.vocab if args.task == "mqar" else len(tasks.S3_ELEMENTS)


@torch.no_grad()
def accuracy(model, inputs, targets, chunk=64):
    """The fraction of scored positions where the argmax of the logits is the target."""
    right = total = 0
    for i in range(0, len(inputs), chunk):
        pred = model(inputs[i:i + chunk]).argmax(-1)
        scored = targets[i:i + chunk] != tasks.IGNORE
        right += (pred[scored] == targets[i:i + chunk][scored]).sum().item()
        total += scored.sum().item()
    return right / total


class Progress:
    """tqdm when installed, else one line rewritten in place."""

    def __init__(self, label, total, enabled=True):
        self.label, self.total, self.enabled, self.bar = label, total, enabled, None
        self.postfix, self.start = "", time.perf_counter()
        if enabled:
            try:
                from tqdm import tqdm
                self.bar = tqdm(total=total, desc=label, file=sys.stderr, dynamic_ncols=True)
            except ImportError:
                pass

    def update(self, step, **info):
        if not self.enabled:
            return
        self.postfix = " ".join(f"{k}={v:.3f}" for k, v in info.items()) or self.postfix
        if self.bar is not None:
            self.bar.n = step
            if info:
                self.bar.set_postfix_str(self.postfix, refresh=False)
            self.bar.refresh()
        elif info or step % 10 == 0 or step == self.total:
            rate = (time.perf_counter() - self.start) / max(step, 1)
            sys.stderr.write(f"\r{self.label}: {step}/{self.total} steps {rate:.2f} s/step "
                             f"{self.postfix}   ")
            sys.stderr.flush()

    def close(self):
        if self.bar is not None:
            self.bar.close()
        elif self.enabled:
            sys.stderr.write("\n")


def train_rule(args, name, eval_set, log):
    """Train one rule's model; calls ``log(row)`` at every evaluation; returns the summary."""
    torch.manual_seed(args.seed)  # the same initialisation stream for every rule
    model = CausalLM(args.loaded[name], vocab_size(args), args.hidden, args.layers, args.heads,
                     **args.rule_options[name])
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    data = torch.Generator().manual_seed(args.seed)  # the same batches for every rule
    progress = Progress(name, args.steps, enabled=not args.no_progress)
    start, loss_value, history, reached = time.perf_counter(), None, [], None

    def evaluate(step):
        acc = accuracy(model, *eval_set)
        row = dict(task=args.task, rule=name, step=step, loss=loss_value, accuracy=acc,
                   seconds=time.perf_counter() - start)
        history.append(row)
        log(row)
        progress.update(step, acc=acc, **({"loss": loss_value} if step else {}))
        return acc

    evaluate(0)
    step = 0
    for step in range(1, args.steps + 1):
        x, y = batch(args, args.batch, data)
        loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten(), ignore_index=tasks.IGNORE)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        loss_value = loss.item()
        if not math.isfinite(loss_value):
            raise RecdslError(f"{name}: the loss is {loss_value} at step {step}; lower --lr")
        if step % args.eval_every == 0 or step == args.steps:
            if evaluate(step) >= args.target:
                reached = step
                break
        else:
            progress.update(step)
    progress.close()
    seconds = time.perf_counter() - start
    return dict(rule=name, options=args.rule_options[name], steps=step,
                final=history[-1]["accuracy"], best=max(r["accuracy"] for r in history),
                reached=reached, seconds=seconds, history=history)


# ----------------------------------------------------------------------------- reporting

def _options_text(options):
    parts = []
    for key, value in options.items():
        if isinstance(value, dict):
            parts += [f"{key}.{k}={v}" for k, v in value.items()]
        else:
            parts.append(f"{key}={value}")
    return ", ".join(parts) or "defaults"


def table(args, results) -> str:
    what = (f"vocab {args.vocab}, T {args.length}, {args.pairs} pairs, {args.filler} filler"
            if args.task == "mqar"
            else f"T {args.length}")
    lines = [f"{args.task}: {what}; hidden {args.hidden}, {args.layers} layer(s), {args.heads} "
             f"head(s); AdamW lr {args.lr}, batch {args.batch}, seed {args.seed}; accuracy on "
             f"{args.eval_size} held-out sequences", "",
             f"| rule | options | final acc | best acc | steps | reached {args.target} at | "
             f"time (s) | s/step |",
             "|---|---|---|---|---|---|---|---|"]
    for r in results:
        reached = r["reached"] if r["reached"] is not None else "no"
        lines.append(f"| {r['rule']} | {_options_text(r['options'])} | {r['final']:.3f} | "
                     f"{r['best']:.3f} | {r['steps']} | {reached} | {r['seconds']:.0f} | "
                     f"{r['seconds'] / max(r['steps'], 1):.2f} |")
    return "\n".join(lines) + "\n"


def plot(args, results, path) -> bool:
    """Accuracy against steps per rule; False when matplotlib is not installed."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(5, 3.2), dpi=100)
    for r in results:
        ax.plot([h["step"] for h in r["history"]], [h["accuracy"] for h in r["history"]],
                label=f"{r['rule']} ({_options_text(r['options'])})" if r["options"] else r["rule"])
    ax.set_xlabel("training step")
    ax.set_ylabel("held-out accuracy")
    ax.set_ylim(0, 1.02)
    ax.set_title(table(args, results).split(";")[0], fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True


def main(argv=None):
    args = parse_args(argv)
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        return run(args)
    finally:
        torch.set_num_threads(threads)  # a caller (a test session) keeps its own setting


def _train_in_child(fields, name, eval_set):
    """One rule in a worker process (``--jobs``): evaluations go to stderr as lines."""
    args = argparse.Namespace(**fields, loaded={name: load_rule(name)})
    torch.set_num_threads(args.threads)
    args.no_progress = True

    def log(row):
        print(f"{name}: step {row['step']} accuracy {row['accuracy']:.3f}", file=sys.stderr, flush=True)

    return train_rule(args, name, eval_set, log)


def run(args):
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    # the same held-out set, batches (seed) and initialisation (seed) for every rule, so a rule's
    # result does not depend on the other rules of the run or on --jobs
    eval_set = batch(args, args.eval_size, torch.Generator().manual_seed(args.seed + 10_000))
    csv_path = out / f"{args.task}.csv"
    with open(csv_path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        writer.writeheader()

        def log(row):
            writer.writerow({k: (f"{v:.5g}" if isinstance(v, float) else v) for k, v in row.items()})
            f.flush()

        if args.jobs == 1:
            results = [train_rule(args, name, eval_set, log) for name in args.rule_names]
        else:
            import multiprocessing
            from concurrent.futures import ProcessPoolExecutor
            fields = {k: v for k, v in vars(args).items() if k != "loaded"}
            with ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
                futures = [pool.submit(_train_in_child, fields, name, eval_set)
                           for name in args.rule_names]
                results = [future.result() for future in futures]
            for r in results:
                for row in r["history"]:
                    log(row)
    text = table(args, results)
    (out / f"{args.task}.md").write_text(text)
    print(text)
    print(f"log: {csv_path}")
    if plot(args, results, out / f"{args.task}.png"):
        print(f"plot: {out / f'{args.task}.png'}")
    else:
        print("plot: not written, matplotlib is not installed (pip install matplotlib)")
    return results


if __name__ == "__main__":
    try:
        main()
    except RecdslError as err:
        sys.exit(f"train.py: error: {err}")
