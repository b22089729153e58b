#!/usr/bin/env python3
"""Plot an ftune metrics.jsonl as a PNG: loss (and eval_loss), learning rate, throughput vs step.

    python3 tools/plot_metrics.py OUTPUT_DIR/metrics.jsonl [-o OUT.png]

Each line of the input is one JSON object with at least "step"; the keys plotted when present are
"loss", "eval_loss" (often on lines of its own), "grad_norm" (right axis of the loss panel), "lr"
and "tokens_per_s". Other keys are ignored, blank lines skipped. The PNG goes next to the input as
metrics.png unless -o says otherwise. Exit status: 0 written, 1 bad input, 2 bad usage.
Needs matplotlib (Debian: python3-matplotlib); renders with the Agg backend (no display).
"""

import argparse
import json
import math
import os
import sys


class InputError(Exception):
    pass


def _number(v):
    """A JSON value as a float, or None when absent/null/non-numeric (bools are not numbers)."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    return float(v)


def read_metrics(path):
    """Return {key: [(step, value), ...]} for the plotted keys, plus the number of records."""
    if not os.path.exists(path):
        raise InputError(f"{path}: no such file")
    if os.path.isdir(path):
        raise InputError(f"{path}: is a directory, expected a metrics.jsonl file")
    keys = ("loss", "eval_loss", "grad_norm", "lr", "tokens_per_s", "tokens")
    series = {k: [] for k in keys}
    records = 0
    try:
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line.rstrip("\r\n"))
                except json.JSONDecodeError as e:
                    raise InputError(f"{path}:{lineno}: malformed JSON ({e.msg} at column "
                                     f"{e.colno})") from None
                if not isinstance(obj, dict):
                    raise InputError(f"{path}:{lineno}: expected a JSON object, got "
                                     f"{type(obj).__name__}")
                step = _number(obj.get("step"))
                if step is None:
                    raise InputError(f"{path}:{lineno}: missing or non-numeric \"step\"")
                records += 1
                for k in keys:
                    v = _number(obj.get(k))
                    if v is not None:
                        series[k].append((step, v))
    except UnicodeDecodeError as e:
        raise InputError(f"{path}: not UTF-8 text ({e.reason})") from None
    except OSError as e:
        raise InputError(f"{path}: cannot read ({e.strerror})") from None
    if records == 0:
        raise InputError(f"{path}: empty (no metrics lines)")
    return series, records


def _xy(pairs):
    pairs = sorted(pairs, key=lambda p: p[0])
    return [p[0] for p in pairs], [p[1] for p in pairs]


def plot(series, records, title, out_path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise InputError(f"matplotlib is not available to {sys.executable} ({e}); "
                         "install python3-matplotlib or run with a Python that has it") from None

    fig, axes = plt.subplots(3, 1, figsize=(9, 10), sharex=True, constrained_layout=True)
    ax_loss, ax_lr, ax_tps = axes

    def no_data(ax, what):
        ax.text(0.5, 0.5, f"no {what} in the metrics", transform=ax.transAxes,
                ha="center", va="center", color="0.5")

    # --- loss / eval_loss (+ grad_norm on a right axis)
    handles = []
    if series["loss"]:
        x, y = _xy(series["loss"])
        handles += ax_loss.plot(x, y, color="tab:blue", lw=1.2, label="loss")
    if series["eval_loss"]:
        x, y = _xy(series["eval_loss"])
        handles += ax_loss.plot(x, y, color="tab:orange", lw=1.5, marker="o", ms=4,
                                label="eval_loss")
    if series["grad_norm"]:
        ax_gn = ax_loss.twinx()
        x, y = _xy(series["grad_norm"])
        handles += ax_gn.plot(x, y, color="0.6", lw=0.8, ls="--", label="grad_norm (right)")
        ax_gn.set_ylabel("grad norm", color="0.4")
    if handles:
        ax_loss.legend(handles=handles, loc="upper right", fontsize="small")
    elif not series["loss"]:
        no_data(ax_loss, "loss")
    ax_loss.set_ylabel("loss")
    ax_loss.set_title("Loss")
    ax_loss.grid(True, alpha=0.3)

    # --- learning rate
    if series["lr"]:
        x, y = _xy(series["lr"])
        ax_lr.plot(x, y, color="tab:green", lw=1.2)
        ax_lr.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    else:
        no_data(ax_lr, "lr")
    ax_lr.set_ylabel("learning rate")
    ax_lr.set_title("Learning rate")
    ax_lr.grid(True, alpha=0.3)

    # --- throughput
    if series["tokens_per_s"]:
        x, y = _xy(series["tokens_per_s"])
        ax_tps.plot(x, y, color="tab:purple", lw=1.2, label="tokens/s")
        finite = [v for v in y if math.isfinite(v)]
        if finite:
            mean = sum(finite) / len(finite)
            ax_tps.axhline(mean, color="tab:purple", lw=0.8, ls=":",
                           label=f"mean {mean:,.0f} tokens/s")
        ax_tps.legend(loc="lower right", fontsize="small")
    else:
        no_data(ax_tps, "tokens_per_s")
    ax_tps.set_ylabel("tokens / s")
    ax_tps.set_title("Throughput")
    ax_tps.set_xlabel("step")
    ax_tps.grid(True, alpha=0.3)

    sub = [f"{records} records"]
    if series["loss"]:
        sub.append(f"last loss {_xy(series['loss'])[1][-1]:.4g}")
    if series["eval_loss"]:
        sub.append(f"last eval_loss {_xy(series['eval_loss'])[1][-1]:.4g}")
    if series["tokens"]:
        sub.append(f"{int(max(v for _, v in series['tokens'])):,} tokens")
    fig.suptitle(f"{title}\n{', '.join(sub)}", fontsize="medium")

    out_dir = os.path.dirname(os.path.abspath(out_path))
    if not os.path.isdir(out_dir):
        raise InputError(f"{out_path}: output directory {out_dir} does not exist")
    try:
        fig.savefig(out_path, dpi=100, format="png")
    except OSError as e:
        raise InputError(f"{out_path}: cannot write ({e.strerror})") from None
    finally:
        plt.close(fig)


def main(argv=None):
    ap = argparse.ArgumentParser(
        description="Plot an ftune metrics.jsonl (loss/eval_loss, lr, tokens/s against step) "
                    "into a PNG.")
    ap.add_argument("metrics", help="metrics.jsonl written by ftune")
    ap.add_argument("-o", "--output", help="PNG to write (default: metrics.png next to the input)")
    args = ap.parse_args(argv)
    out = args.output or os.path.join(os.path.dirname(os.path.abspath(args.metrics)),
                                      "metrics.png")
    try:
        series, records = read_metrics(args.metrics)
        plot(series, records, os.path.basename(os.path.dirname(os.path.abspath(args.metrics)))
             + "/" + os.path.basename(args.metrics), out)
    except InputError as e:
        print(f"plot_metrics: error: {e}", file=sys.stderr)
        return 1
    print(f"plot_metrics: wrote {out} ({records} records)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
