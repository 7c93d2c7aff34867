"""`trl-moe-rm`: the command line of trl_moe_rm (train, demo, diagnose, personalize, score, analyze, push, serve)."""

import argparse
import json
import os
import sys
from collections.abc import Sequence


def _add_demo(subparsers) -> None:
    parser = _subcommand(
        subparsers,
        "demo",
        _run_demo,
        help="Run the main job: single head vs dense vs sparse MoE on the controlled data, on the real MiniLM.",
        description="Train four reward models on the controlled preference data and write demo_output/.",
    )
    parser.add_argument("--output_dir", default="demo_output", help="Where the report, figures and model go.")
    parser.add_argument("--quick", action="store_true", help="A tiny run (about half a minute), used by the tests.")
    parser.add_argument("--num_pairs_per_category", type=int, default=400, help="Controlled pairs per category.")
    parser.add_argument("--num_train_epochs", type=float, default=6, help="Training budget of every model.")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the data and the models.")
    parser.add_argument(
        "--model_name_or_path", "--backbone", dest="backbone", default=None,
        help="Backbone folder (default: the packaged all-MiniLM-L6-v2).",
    )  # fmt: skip


def _run_demo(args: argparse.Namespace) -> int:
    from .demo import DemoConfig, run_demo

    fields = ("output_dir", "quick", "num_pairs_per_category", "num_train_epochs", "seed", "backbone")
    report = run_demo(DemoConfig(**{name: getattr(args, name) for name in fields}))
    return 0 if report else 1


def _add_personalize(subparsers) -> None:
    from .fitting import FIT_METHODS
    from .personalization import PRIORS

    parser = _subcommand(
        subparsers,
        "personalize",
        _run_personalize,
        help="Fit a user's expert weights from a few labelled pairs and save the profile.",
        description="Fit one user's weights over the frozen experts (JSONL pairs: prompt, chosen, rejected).",
    )
    _add_model_argument(parser)
    parser.add_argument(
        "--dataset_name", "--pairs", dest="pairs", required=True,
        help="The user's labelled pairs: a .jsonl/.json/.parquet/.csv file, folder or Hub dataset.",
    )  # fmt: skip
    parser.add_argument("--user_id", required=True, help="The user's id (an integer string is kept as a string).")
    parser.add_argument("--method", default="hedge", choices=list(FIT_METHODS), help="Fitting method.")
    parser.add_argument("--mode", default="static", choices=["static", "routed"], help="How the weights are used.")
    parser.add_argument(
        "--prior", default=None, choices=list(PRIORS),
        help="Starting point of the fit (default: 'routing' in static mode, 'uniform' in routed mode).",
    )  # fmt: skip
    parser.add_argument(
        "--l2", type=float, default=None,
        help="L2 pull toward the prior of the 'gradient' and 'hyre_gradient' fits (default: the method's, 0.1). "
        "The hidden_context preset's fit: --method hyre_gradient --l2 1.0 --prior uniform.",
    )  # fmt: skip
    parser.add_argument(
        "--output_dir", "--store", dest="store", default=None, help="ProfileStore directory to save the profile into."
    )
    parser.add_argument(
        "--eval_dataset_name", "--test", dest="test", default=None,
        help="Held-out pairs of the user: prints the accuracy before/after.",
    )  # fmt: skip


def _subcommand(subparsers, name: str, func, help: str, description: str) -> argparse.ArgumentParser:
    """A subcommand's parser, dispatching to `func(args) -> int`."""
    parser = subparsers.add_parser(name, help=help, description=description)
    parser.set_defaults(func=func)
    return parser


def _add_model_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model_name_or_path", "--model", dest="model", required=True,
        help="Directory (or Hub id) of a trained MoE reward model.",
    )  # fmt: skip


def _load_model_and_tokenizer(path: str):
    from .loading import load_moe_reward_model
    from .processing import load_tokenizer

    tokenizer = load_tokenizer(path)  # fails before the weights are read
    return load_moe_reward_model(path).eval(), tokenizer


def _read_pairs(path: str):
    from .data.loading import load_preference_dataset

    return load_preference_dataset(path, split="train")


def _run_personalize(args: argparse.Namespace) -> int:
    import inspect

    from .fitting import FIT_METHODS
    from .personalization import expert_pair_scores, fit_user_weights, weight_shift
    from .profiles import ProfileStore
    from .scoring import score_pairs

    method_kwargs = {}
    if args.l2 is not None:
        with_l2 = [name for name, fit in FIT_METHODS.items() if "l2" in inspect.signature(fit).parameters]
        if args.method not in with_l2:
            raise ValueError(f"--l2 applies to --method {' or '.join(with_l2)}, not {args.method!r}.")
        method_kwargs["l2"] = args.l2
    store = ProfileStore(args.store) if args.store else None  # fails early on an unwritable path
    model, tokenizer = _load_model_and_tokenizer(args.model)
    pairs = _read_pairs(args.pairs)
    scores = expert_pair_scores(model, pairs, tokenizer)
    profile = fit_user_weights(
        model, pairs, method=args.method, user_id=args.user_id, mode=args.mode, prior=args.prior, scores=scores,
        **method_kwargs,
    )  # fmt: skip
    shift = weight_shift(profile, default_weights=scores.routing_weights.mean(axis=0))
    result = {"user_id": profile.user_id, "method": profile.method, "num_shots": profile.num_shots, **shift}
    if args.test:
        test = _read_pairs(args.test)
        before = score_pairs(model, tokenizer, test)
        after = score_pairs(model.for_user(profile), tokenizer, test)
        result["test_accuracy_default"] = before.accuracy
        result["test_accuracy_personalized"] = after.accuracy
    if store is not None:
        store.save(profile)
        result["saved_to"] = str(store.directory)
    print(json.dumps(result, indent=2))
    return 0


def _add_score(subparsers) -> None:
    parser = _subcommand(
        subparsers,
        "score",
        _run_score,
        help="Score rows (prompt, completion) with a trained model, optionally for each row's user.",
        description=(
            "Read rows with a `prompt` and a `completion` (TRL's prompt/completion format; the legacy `response` "
            "works too), plain text or chat messages, from a .jsonl/.json/.parquet/.csv file, a `save_to_disk` folder "
            "or a Hub dataset, and write them back with a `reward` column, in the input's format (.parquet -> "
            ".parquet, .csv -> .csv, else JSONL)."
        ),
    )
    _add_model_argument(parser)
    parser.add_argument(
        "--dataset_name", "--input", dest="input", required=True, help="Rows to score: a file, folder or Hub id."
    )
    parser.add_argument("--dataset_split", default=None, help="Split to score (default: the only one, or `train`).")
    parser.add_argument(
        "--output_file", "--output", dest="output", required=True, help="Output file (.jsonl, .parquet or .csv)."
    )
    parser.add_argument("--user_id", default=None, help="Score every row for this user (else the row's `user_id`).")
    parser.add_argument("--profiles", default=None, help="ProfileStore directory with the users' profiles.")
    parser.add_argument("--strict", action="store_true", help="Fail on unknown users instead of the default routing.")
    parser.add_argument("--batch_size", type=_positive_int, default=32, help="Rows per forward pass.")
    parser.add_argument("--max_length", type=_positive_int, default=None, help="Truncate longer rows (tokens).")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _check_output_file(path: str, flag: str) -> None:
    """Fail before any work when `path` cannot be written: a directory, or a folder that does not exist."""
    from pathlib import Path

    target = Path(path)
    if target.is_dir():
        raise IsADirectoryError(
            f"{flag} {path!r} is a directory; pass a file path, e.g. {path.rstrip('/')}/out.jsonl."
        )
    parent = target.parent if str(target.parent) else Path(".")
    if parent.exists() and not parent.is_dir():
        raise NotADirectoryError(f"{flag} {path!r}: {str(parent)!r} is a file, not a folder; pass a path in a folder.")
    if not parent.is_dir():
        raise FileNotFoundError(f"{flag} {path!r}: the folder {str(parent)!r} does not exist; create it first.")
    if not os.access(parent, os.W_OK):
        raise PermissionError(f"{flag} {path!r}: the folder {str(parent)!r} is not writable.")


def _run_score(args: argparse.Namespace) -> int:
    from .data.loading import read_rows, write_rows
    from .processing import response_column
    from .profiles import ProfileStore
    from .rewards import PersonalizedReward

    _check_output_file(args.output, "--output")
    profiles = None
    if args.profiles is not None:
        if not os.path.isdir(args.profiles):
            raise FileNotFoundError(
                f"--profiles {args.profiles!r} is not a directory: pass the ProfileStore folder the users' profiles "
                "were saved to (e.g. by `trl-moe-rm personalize --store DIR`)."
            )
        profiles = ProfileStore(args.profiles)
    rows, kind = read_rows(args.input, args.dataset_split)
    completion = response_column(list(rows[0]))
    for number, row in enumerate(rows, start=1):
        if completion not in row:
            raise ValueError(f"{args.input}: row {number} has no `{completion}` (each row needs `prompt` and it).")
    has_users = args.user_id is not None or any(row.get("user_id") is not None for row in rows)
    if has_users and profiles is None:
        raise ValueError("Scoring for users needs --profiles <ProfileStore directory> (rows carry a `user_id`).")
    model, tokenizer = _load_model_and_tokenizer(args.model)
    reward = PersonalizedReward(
        model,
        profiles or {},
        tokenizer=tokenizer,
        batch_size=args.batch_size,
        strict=args.strict,
        max_length=args.max_length,
    )
    user_ids = [args.user_id if args.user_id is not None else row.get("user_id") for row in rows]
    prompts, completions = [row.get("prompt") for row in rows], [row[completion] for row in rows]
    rewards = reward.score(prompts, completions, user_ids, progress=f"Scoring {len(rows)} rows")
    for row, value in zip(rows, rewards.tolist()):
        row["reward"] = value
    write_rows(rows, args.output, kind)
    if has_users and reward.num_fallbacks:
        print(f"{reward.num_fallbacks} row(s) had no profile and used the default routing.", file=sys.stderr)
    print(f"Scored {len(rows)} rows into {args.output}")
    return 0


def _add_analyze(subparsers) -> None:
    parser = _subcommand(
        subparsers,
        "analyze",
        _run_analyze,
        help="Explain a trained model on preference data: routing heatmap, expert descriptions, steering.",
        description=(
            "Score a preference dataset (prompt, chosen, rejected) with a trained MoE reward model and write "
            "report.json, report.md, experts.json and PNG figures: the routing heatmap when the data has a category "
            "column, the expert descriptions, and expert x attribute correlations and steering when it has "
            "`chosen_attributes` / `rejected_attributes` columns."
        ),
    )
    _add_model_argument(parser)
    parser.add_argument(
        "--dataset_name",
        "--dataset",
        dest="dataset",
        required=True,
        help="Local .json/.jsonl/.parquet file or folder, or a Hub dataset id (`prompt`, `chosen`, `rejected`).",
    )
    parser.add_argument("--dataset_config", default=None, help="Configuration (subset) of a Hub dataset.")
    parser.add_argument(
        "--dataset_split", default=None, help="Split to analyse (default: `test` when there is one, else `train`)."
    )
    parser.add_argument("--output_dir", default="analysis", help="Where the report and the figures go.")
    parser.add_argument(
        "--category_column",
        default=None,
        help="Column of the hidden category of each pair, for the routing heatmap (default: `category` if present).",
    )
    parser.add_argument("--max_samples", type=int, default=None, help="Analyse at most this many pairs.")
    parser.add_argument("--batch_size", type=int, default=32, help="Pairs per forward pass.")
    parser.add_argument("--max_length", type=int, default=None, help="Truncate longer sequences (tokens).")
    parser.add_argument("--top_n_words", type=int, default=10, help="Words and bigrams kept per expert description.")


def _select_split(dataset, requested: str | None):
    from datasets import DatasetDict

    if not isinstance(dataset, DatasetDict):
        return dataset, requested or "train"
    if requested is not None:
        if requested not in dataset:
            raise ValueError(f"--dataset_split {requested!r} is not a split of the dataset; it has {list(dataset)}.")
        return dataset[requested], requested
    split = "test" if "test" in dataset else "train" if "train" in dataset else next(iter(dataset))
    return dataset[split], split


def _run_analyze(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .data.controlled import ATTRIBUTE_MARKERS, ATTRIBUTES
    from .data.loading import load_preference_dataset
    from .descriptions import describe_experts
    from .io_utils import atomic_write_text
    from .model_card import EXPERTS_FILENAME, ROUTING_HEATMAP_FILENAME, expert_records, experts_file_content
    from .plots import plot_expert_attribute_heatmap, plot_routing_heatmap
    from .report import analysis_report
    from .scoring import score_pairs

    output_dir = Path(args.output_dir)
    if output_dir.exists() and not output_dir.is_dir():
        raise NotADirectoryError(f"--output_dir {args.output_dir!r} is an existing file; pass a directory.")
    if args.max_samples is not None and args.max_samples < 1:
        raise ValueError(f"--max_samples must be >= 1, got {args.max_samples}.")
    dataset = load_preference_dataset(args.dataset, config=args.dataset_config, check_columns=False)
    dataset, split = _select_split(dataset, args.dataset_split)
    columns = dataset.column_names
    for column in ("chosen", "rejected"):
        if column not in columns:
            raise ValueError(
                f"The dataset {args.dataset!r} (split {split!r}) has no `{column}` column, which `analyze` needs (it "
                f"reads the text of the pairs: `prompt`, `chosen`, `rejected`). Its columns are {columns}."
            )
    category_column = args.category_column
    if category_column is not None and category_column not in columns:
        raise ValueError(
            f"--category_column {category_column!r} is not a column of the dataset {args.dataset!r}; its columns are "
            f"{columns}."
        )
    if category_column is None and "category" in columns:
        category_column = "category"
    has_attributes = "chosen_attributes" in columns and "rejected_attributes" in columns
    if args.max_samples is not None and args.max_samples < len(dataset):
        dataset = dataset.select(range(args.max_samples))
    notes = []
    model, tokenizer = _load_model_and_tokenizer(args.model)
    if category_column is None and "prompt" in columns:
        from .routing import prompt_clusters

        dataset = dataset.add_column("prompt_cluster", prompt_clusters(dataset["prompt"], model.config.num_experts))
        category_column = "prompt_cluster"
        notes.append(
            "No category column: the routing heatmap is drawn against k-means clusters of the prompts' words "
            "(`prompt_cluster`); pass --category_column to use a column of the data."
        )
    elif category_column is None:
        notes.append("No category column and no prompt column: no routing heatmap.")
    if not has_attributes:
        notes.append(
            "No `chosen_attributes` / `rejected_attributes` columns: the expert x attribute plot, specialization and "
            "steering are skipped."
        )
    for note in notes:
        print(note, file=sys.stderr)

    scores = score_pairs(model, tokenizer, dataset, batch_size=args.batch_size, max_length=args.max_length)
    metrics = ["accuracy"] + (["conflict_accuracy"] if "conflict" in columns else [])
    metrics += ["nmi", "purity"] if category_column else []
    attribute_names = markers = None
    if has_attributes:  # the controlled data's attributes and planted markers when the vectors have their width
        width = len(dataset[0]["chosen_attributes"])
        controlled = width == len(ATTRIBUTES)
        attribute_names = list(ATTRIBUTES) if controlled else [f"attribute_{a}" for a in range(width)]
        markers = ATTRIBUTE_MARKERS if controlled else None
        metrics += ["specialization", "steering"] + (["description_accuracy"] if controlled else [])
    report = analysis_report(
        scores,
        dataset,
        metrics=metrics,
        attribute_names=attribute_names,
        markers=markers,
        top_n_words=args.top_n_words,
        category_column=category_column or "category",
    )
    descriptions = describe_experts(scores, dataset, top_n_words=args.top_n_words, attribute_names=attribute_names)
    records = expert_records(scores.num_experts, descriptions, report["expert_load"])
    report["descriptions"] = {str(record["expert"]): record["description"] for record in records}

    output_dir.mkdir(parents=True, exist_ok=True)
    figures = {}
    if category_column:
        matrix = report["routing_matrix"]
        plot_routing_heatmap(matrix["matrix"], matrix["categories"], output_dir / ROUTING_HEATMAP_FILENAME)
        figures["routing_heatmap"] = ROUTING_HEATMAP_FILENAME
    if has_attributes:
        plot_expert_attribute_heatmap(
            report["expert_attribute_correlation"], attribute_names, output_dir / "expert_attribute.png"
        )
        figures["expert_attribute"] = "expert_attribute.png"
    report.update({"model": args.model, "dataset": args.dataset, "split": split, "figures": figures})
    report["category_column"] = category_column
    report["notes"] = notes
    atomic_write_text(output_dir / EXPERTS_FILENAME, experts_file_content(records, model.config.top_k))
    atomic_write_text(output_dir / "report.json", json.dumps(report, indent=2, default=str) + "\n")
    title = f"Analysis of {args.model} on {args.dataset} ({split}, {len(dataset)} pairs)"
    markdown = _analysis_markdown(report, records, title, figures)
    atomic_write_text(output_dir / "report.md", markdown)
    print(markdown)
    print(f"Wrote report.json, report.md, {EXPERTS_FILENAME} and {len(figures)} figure(s) to {output_dir}/")
    return 0


def _analysis_markdown(report: dict, records: list[dict], title: str, figures: dict[str, str]) -> str:
    def cell(value) -> str:
        if value is None:
            return "—"
        return f"{value:.3f}" if isinstance(value, float) else str(value).replace("|", "\\|")

    lines = [f"# {title}", "", "| metric | value |", "|---|---:|"]
    for name in ("accuracy", "conflict_accuracy", "nmi", "purity", "specialization", "description_accuracy"):
        if name in report:
            lines.append(f"| {name} | {cell(report[name])} |")
    lines += ["", "## Experts", "", "| expert | load | description |", "|---:|---:|---|"]
    lines += [f"| {r['expert']} | {cell(r.get('load'))} | {cell(r.get('description'))} |" for r in records]
    if "routing_heatmap" in figures:
        lines += ["", "## Routing", "", f"![Mean routing weight per category]({figures['routing_heatmap']})"]
    if "expert_attribute" in figures:
        figure = figures["expert_attribute"]
        lines += ["", "## Experts and attributes", "", f"![Expert x attribute correlation]({figure})"]
    if report.get("steering"):
        lines += [
            "",
            "## Steering",
            "",
            "Putting all the weight on one expert: change of the fraction of pairs whose preferred response has the "
            "expert's attribute value.",
            "",
            "| expert | attribute | rho | shift |",
            "|---:|---|---:|---:|",
        ]
        lines += [
            f"| {e['expert']} | {e['attribute']} | {cell(e['rho'])} | {cell(e['shift'])} |" for e in report["steering"]
        ]
    return "\n".join(lines) + "\n"


def _add_push(subparsers) -> None:
    parser = _subcommand(
        subparsers,
        "push",
        _run_push,
        help="Upload a trained model, its tokenizer, profiles, expert descriptions and a model card to the Hub.",
        description=(
            "Upload a saved MoE reward model to the Hugging Face Hub in one commit: the weights (safetensors), config "
            "and code files (for trust_remote_code), the tokenizer, the users' profiles, experts.json and a generated "
            "model card. Log in first with `hf auth login` (or set HF_TOKEN, or pass --token)."
        ),
    )
    _add_model_argument(parser)
    parser.add_argument(
        "--hub_model_id", "--repo_id", dest="repo_id", required=True,
        help="Target repository, `name` or `namespace/name`.",
    )  # fmt: skip
    parser.add_argument(
        "--profiles",
        default=None,
        help="ProfileStore directory to upload as profiles/ (default: <model>/profiles when it exists).",
    )
    parser.add_argument(
        "--analysis_dir",
        default=None,
        help="Output of `trl-moe-rm analyze`: its experts.json, routing_heatmap.png and metrics go into the card.",
    )
    parser.add_argument(
        "--hub_private_repo", "--private", dest="private", action="store_true", help="Create the repository as private."
    )
    parser.add_argument(
        "--hub_token", "--token", dest="token", default=None,
        help="Hub token with write access (default: `hf auth login`'s).",
    )  # fmt: skip
    parser.add_argument(
        "--hub_revision", "--revision", dest="revision", default=None, help="Branch to push to (created if needed)."
    )
    parser.add_argument("--create_pr", action="store_true", help="Open a pull request instead of committing.")
    parser.add_argument("--commit_message", default=None, help="Commit message.")
    parser.add_argument("--dataset_name", default=None, help="Training dataset, for the model card's metadata.")
    parser.add_argument("--base_model", default=None, help="Hub id of the backbone, for the model card's metadata.")
    parser.add_argument(
        "--dry_run", default=None, metavar="FOLDER",
        help="Write the files that would be uploaded (model card included) into FOLDER and list them; no upload.",
    )  # fmt: skip


def _run_push(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .hub import prepare_hub_folder, push_moe_reward_model, resolve_token, validate_hub_repo_id
    from .model_card import EXPERTS_FILENAME, ROUTING_HEATMAP_FILENAME

    validate_hub_repo_id(args.repo_id)
    if args.dry_run is None:
        token = resolve_token(args.token)  # fails before any work when the user is not logged in
    model_dir = Path(args.model)
    if not model_dir.is_dir():
        raise FileNotFoundError(f"--model {args.model!r} is not a directory: pass the folder written by `save_model`.")
    profiles = args.profiles
    if profiles is None and (model_dir / "profiles").is_dir():
        profiles = model_dir / "profiles"
    descriptions = heatmap = report = None
    if args.analysis_dir is not None:
        analysis = Path(args.analysis_dir)
        if not analysis.is_dir():
            raise FileNotFoundError(f"--analysis_dir {args.analysis_dir!r} is not a directory.")
        if (analysis / EXPERTS_FILENAME).is_file():
            descriptions = analysis / EXPERTS_FILENAME
        if (analysis / ROUTING_HEATMAP_FILENAME).is_file():
            heatmap = analysis / ROUTING_HEATMAP_FILENAME
        if (analysis / "report.json").is_file():
            report = json.loads((analysis / "report.json").read_text(encoding="utf-8"))
    content = {"profiles": profiles, "descriptions": descriptions, "routing_heatmap": heatmap, "report": report}
    content.update(dataset_name=args.dataset_name, base_model=args.base_model)
    if args.dry_run is not None:
        files = prepare_hub_folder(model_dir, args.dry_run, repo_id=args.repo_id, **content)
        print("\n".join(sorted(files)))
        print(f"Dry run: wrote the {len(files)} files that would be uploaded to {args.repo_id} into {args.dry_run}/")
        return 0
    commit = push_moe_reward_model(
        model_dir,
        args.repo_id,
        **content,
        token=token,
        private=True if args.private else None,
        commit_message=args.commit_message,
        revision=args.revision,
        create_pr=args.create_pr,
    )
    print(f"Pushed {args.model} to {getattr(commit, 'commit_url', None) or args.repo_id}")
    return 0


def _train(argv: list[str]) -> int:
    """`trl-moe-rm train`: in this process, or through `accelerate launch` with `--accelerate_config` / `--num_processes`."""
    from .launch import LAUNCH_FLAGS, launch_training
    from .scripts.train import cli as train_cli

    debug = "--debug" in argv
    argv = [arg for arg in argv if arg != "--debug"]
    try:
        if any(arg.split("=", 1)[0] in LAUNCH_FLAGS for arg in argv):
            return launch_training(argv)
        train_cli(argv, prog="trl-moe-rm train")
    except Exception as error:  # one line for the user; `--debug` shows where it came from
        if debug:
            raise
        message = error.args[0] if isinstance(error, KeyError) and error.args else error
        print(f"trl-moe-rm train: error: {message}", file=sys.stderr)
        return 2
    return 0


def build_parser() -> tuple[argparse.ArgumentParser, argparse._SubParsersAction]:
    """The `trl-moe-rm` parser and its subcommands (`train` has its own parser: `trl_moe_rm.scripts.train`)."""
    parser = argparse.ArgumentParser(prog="trl-moe-rm", description="Sparse Mixture-of-Experts reward models for TRL.")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    subparsers.add_parser(
        "train",
        help="Train a MoE reward model (TRL-style flags or --config file.yaml; see `trl-moe-rm train --help`).",
    )
    for add in (_add_demo, _add_diagnose, _add_personalize, _add_score, _add_analyze, _add_push, _add_serve):
        add(subparsers)
    for name, subparser in subparsers.choices.items():
        if name != "train":
            subparser.add_argument(
                "--config", default=None, help="YAML file of this command's options (flags given too win)."
            )
    return parser, subparsers


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["train"]:
        return _train(argv[1:])
    parser, subparsers = build_parser()
    # `--debug` (anywhere on the line) shows the full traceback of an error instead of its one-line message.
    debug = "--debug" in argv
    argv = [arg for arg in argv if arg != "--debug"]
    command = argv[0] if argv else None
    try:
        if command in subparsers.choices and command != "train":
            _apply_config_file(subparsers.choices[command], argv[1:])
        args = parser.parse_args(argv)
        return args.func(args)
    except Exception as error:  # one line for the user; `--debug` shows where it came from
        if debug:
            raise
        message = error.args[0] if isinstance(error, KeyError) and error.args else error
        parser.exit(2, f"trl-moe-rm {command}: error: {message}\n")


def _apply_config_file(parser: argparse.ArgumentParser, argv: list[str]) -> None:
    """
    `--config FILE`: a YAML mapping of the command's options (by their destination or any of their flag names, without
    the dashes) becomes the parser's defaults, so flags on the command line still win. Unknown keys are an error.
    """
    path = next((argv[i + 1] for i, arg in enumerate(argv[:-1]) if arg == "--config"), None)
    path = path or next((arg.split("=", 1)[1] for arg in argv if arg.startswith("--config=")), None)
    if path is None:
        return
    import yaml

    try:
        with open(path, encoding="utf-8") as file:
            values = yaml.safe_load(file) or {}
    except OSError as error:
        raise FileNotFoundError(f"--config {path!r} cannot be read: {error.strerror}.") from None
    except yaml.YAMLError as error:
        raise ValueError(f"--config {path!r} is not valid YAML: {error}") from None
    if not isinstance(values, dict):
        raise ValueError(f"--config {path!r} must hold a mapping of option names to values.")
    names = {}
    for action in parser._actions:
        for flag in action.option_strings:
            names[flag.lstrip("-")] = action
    unknown = sorted(key for key in values if key not in names)
    if unknown:
        raise ValueError(f"--config {path!r}: unknown option(s) {unknown}; the options are {sorted(names)}.")
    for key, value in values.items():
        action = names[key]
        parser.set_defaults(**{action.dest: value})
        action.required = False


def _add_diagnose(subparsers) -> None:
    from .diagnose import add_diagnose_arguments, run_diagnose

    parser = _subcommand(
        subparsers,
        "diagnose",
        run_diagnose,
        help="Does the prompt say how pairs are judged? Recommends the defaults or the hidden-context preset.",
        description="Probe a preference dataset on frozen backbone features and recommend the defaults of "
        "MoERewardConfig (visible context) or preset='hidden_context' (docs/presets.md).",
    )
    add_diagnose_arguments(parser)


def _add_serve(subparsers) -> None:
    from .server import SERVE_DESCRIPTION, add_serve_arguments, run_serve

    parser = _subcommand(
        subparsers,
        "serve",
        run_serve,
        help="Serve personalized rewards over HTTP (OpenRLHF protocol; TRL and verl clients).",
        description=SERVE_DESCRIPTION,
    )
    add_serve_arguments(parser)


if __name__ == "__main__":
    sys.exit(main())
