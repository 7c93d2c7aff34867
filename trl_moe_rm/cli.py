"""`trl-moe-rm`: the command line of trl_moe_rm (train, demo, personalize, score)."""

import argparse
import json
import sys
from collections.abc import Sequence


def _add_demo(subparsers) -> None:
    parser = subparsers.add_parser(
        "demo",
        help="Run the main job: single head vs dense vs sparse MoE on the controlled data, on the real MiniLM.",
        description="Train four reward models on the controlled preference data and write demo_output/.",
    )
    parser.add_argument("--output_dir", default="demo_output", help="Where the report, figures and model go.")
    parser.add_argument("--quick", action="store_true", help="A tiny run (about half a minute), used by the tests.")
    parser.add_argument("--num_pairs_per_category", type=int, default=400, help="Controlled pairs per category.")
    parser.add_argument("--num_train_epochs", type=float, default=6, help="Training budget of every model.")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the data and the models.")
    parser.add_argument("--backbone", default=None, help="Backbone path (default: the packaged all-MiniLM-L6-v2).")
    parser.set_defaults(func=_run_demo)


def _run_demo(args: argparse.Namespace) -> int:
    from .demo import DemoConfig, run_demo

    report = run_demo(
        DemoConfig(
            output_dir=args.output_dir,
            quick=args.quick,
            num_pairs_per_category=args.num_pairs_per_category,
            num_train_epochs=args.num_train_epochs,
            seed=args.seed,
            backbone=args.backbone,
        )
    )
    return 0 if report else 1


def _add_personalize(subparsers) -> None:
    parser = subparsers.add_parser(
        "personalize",
        help="Fit a user's expert weights from a few labelled pairs and save the profile.",
        description="Fit one user's weights over the frozen experts (JSONL pairs: prompt, chosen, rejected).",
    )
    parser.add_argument("--model", required=True, help="Directory (or Hub id) of a trained MoE reward model.")
    parser.add_argument("--pairs", required=True, help="JSON/JSONL file of the user's labelled pairs.")
    parser.add_argument("--user_id", required=True, help="The user's id (an integer string is kept as a string).")
    parser.add_argument("--method", default="hedge", choices=["hedge", "hyre", "gradient"], help="Fitting method.")
    parser.add_argument("--mode", default="static", choices=["static", "routed"], help="How the weights are used.")
    parser.add_argument("--store", default=None, help="ProfileStore directory to save the profile into.")
    parser.add_argument("--test", default=None, help="Held-out pairs of the user: prints the accuracy before/after.")
    parser.set_defaults(func=_run_personalize)


def _load_model_and_tokenizer(path: str):
    from transformers import AutoTokenizer

    from .checkpoints import load_moe_reward_model

    model = load_moe_reward_model(path).eval()
    return model, AutoTokenizer.from_pretrained(path)


def _read_pairs(path: str):
    from .data.loading import load_preference_dataset

    return load_preference_dataset(path, split="train")


def _run_personalize(args: argparse.Namespace) -> int:
    from .analysis import score_pairs
    from .personalization import expert_pair_scores, fit_user_weights, weight_shift
    from .profiles import ProfileStore

    store = ProfileStore(args.store) if args.store else None  # fails early on an unwritable path
    model, tokenizer = _load_model_and_tokenizer(args.model)
    pairs = _read_pairs(args.pairs)
    scores = expert_pair_scores(model, pairs, tokenizer)
    profile = fit_user_weights(model, pairs, method=args.method, user_id=args.user_id, mode=args.mode, scores=scores)
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
    parser = subparsers.add_parser(
        "score",
        help="Score JSONL rows (prompt, response) with a trained model, optionally for a user.",
        description="JSONL in (prompt, response[, user_id]), JSONL out (the same rows plus `reward`).",
    )
    parser.add_argument("--model", required=True, help="Directory (or Hub id) of a trained MoE reward model.")
    parser.add_argument("--input", required=True, help="Input JSONL with `prompt` and `response`.")
    parser.add_argument("--output", required=True, help="Output JSONL.")
    parser.add_argument("--user_id", default=None, help="Score every row for this user (else the row's `user_id`).")
    parser.add_argument("--profiles", default=None, help="ProfileStore directory with the users' profiles.")
    parser.add_argument("--strict", action="store_true", help="Fail on unknown users instead of the default routing.")
    parser.add_argument("--batch_size", type=int, default=32)
    parser.set_defaults(func=_run_score)


def _run_score(args: argparse.Namespace) -> int:
    import torch

    from .io_utils import atomic_write_text
    from .personalization import UserRewards
    from .profiles import ProfileStore

    rows = []
    with open(args.input, encoding="utf-8") as file:
        for number, line in enumerate(file, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise SystemExit(f"{args.input}:{number}: not valid JSON ({error.msg}).") from None
            missing = [key for key in ("prompt", "response") if not isinstance(row.get(key), str)]
            if missing:
                raise SystemExit(f"{args.input}:{number}: missing string field(s) {missing}; each row needs them.")
            rows.append(row)
    if (args.user_id or any("user_id" in row for row in rows)) and not args.profiles:
        raise SystemExit("Scoring for users needs --profiles <ProfileStore directory>.")
    model, tokenizer = _load_model_and_tokenizer(args.model)
    users = UserRewards(model, ProfileStore(args.profiles), strict=args.strict) if args.profiles else None
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    end = (
        [tokenizer.eos_token_id or tokenizer.sep_token_id]
        if (tokenizer.eos_token_id or tokenizer.sep_token_id)
        else []
    )
    for start in range(0, len(rows), args.batch_size):
        batch = rows[start : start + args.batch_size]
        prompts = [tokenizer(row["prompt"])["input_ids"] for row in batch]
        ids = [
            p + tokenizer(row["response"], add_special_tokens=False)["input_ids"] + end
            for p, row in zip(prompts, batch)
        ]
        width = max(len(x) for x in ids)
        input_ids = torch.tensor([x + [pad] * (width - len(x)) for x in ids])
        attention_mask = torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in ids])
        with torch.inference_mode():
            output = model(
                input_ids=input_ids,
                attention_mask=attention_mask,
                prompt_lengths=torch.tensor([len(p) for p in prompts]),
            )
        if users is None:
            rewards = output.logits[:, 0]
        else:
            user_ids = [args.user_id if args.user_id is not None else row.get("user_id") for row in batch]
            rewards = users.combine(output.expert_rewards, output.routing_weights, user_ids)
        for row, reward in zip(batch, rewards.tolist()):
            row["reward"] = reward
    atomic_write_text(args.output, "".join(json.dumps(row) + "\n" for row in rows))
    if users is not None and users.num_fallbacks:
        print(f"{users.num_fallbacks} row(s) had no profile and used the default routing.", file=sys.stderr)
    print(f"Scored {len(rows)} rows into {args.output}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["train"]:
        from .scripts.train import cli as train_cli

        train_cli(argv[1:])
        return 0
    parser = argparse.ArgumentParser(prog="trl-moe-rm", description="Sparse Mixture-of-Experts reward models for TRL.")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    subparsers.add_parser(
        "train",
        help="Train a MoE reward model (TRL-style flags or --config file.yaml; see `trl-moe-rm train --help`).",
    )
    _add_demo(subparsers)
    _add_personalize(subparsers)
    _add_score(subparsers)
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (FileNotFoundError, NotADirectoryError, PermissionError, ValueError, KeyError) as error:
        parser.exit(2, f"trl-moe-rm {args.command}: error: {error}\n")


if __name__ == "__main__":
    sys.exit(main())
