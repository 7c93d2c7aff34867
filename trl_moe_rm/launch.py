"""
Launching training on several processes: `trl-moe-rm train --accelerate_config NAME --num_processes N`.

As TRL's `trl reward --accelerate_config`, the named configs ship inside the package
(`trl_moe_rm/accelerate_configs/*.yaml`), so multi-GPU and DeepSpeed runs need no clone of the repository. The run is
`accelerate launch --config_file <config> --num_processes N -m trl_moe_rm.scripts.train <training flags>`.
"""

import os
import socket
import subprocess
import sys
from collections.abc import Sequence
from importlib import resources
from pathlib import Path


LAUNCH_FLAGS = ("--accelerate_config", "--num_processes", "--main_process_port")
"""The flags of `trl-moe-rm train` that go to `accelerate launch`; every other flag goes to the training script."""


def accelerate_configs() -> dict[str, Path]:
    """The accelerate configs shipped with the package, by name (`zero3`, `cpu_zero2`, `fsdp2`, ...)."""
    folder = resources.files("trl_moe_rm") / "accelerate_configs"
    return {Path(entry.name).stem: Path(str(entry)) for entry in folder.iterdir() if entry.name.endswith(".yaml")}


def resolve_accelerate_config(name_or_path: str) -> Path:
    """A shipped config's path from its name, or an existing YAML file; a clear error otherwise."""
    shipped = accelerate_configs()
    if name_or_path in shipped:
        return shipped[name_or_path]
    path = Path(name_or_path).expanduser()
    if path.is_file():
        return path
    raise ValueError(
        f"--accelerate_config {name_or_path!r} is neither a shipped config ({', '.join(sorted(shipped))}) nor an "
        "existing YAML file."
    )


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def split_launch_args(argv: Sequence[str]) -> tuple[dict[str, str], list[str]]:
    """`(launch flags, training flags)` of a `train` command line; accepts `--flag value` and `--flag=value`."""
    launch: dict[str, str] = {}
    rest: list[str] = []
    index = 0
    while index < len(argv):
        arg = argv[index]
        name, _, value = arg.partition("=")
        if name in LAUNCH_FLAGS:
            if not value:
                if index + 1 >= len(argv):
                    raise ValueError(f"{name} needs a value.")
                value = argv[index + 1]
                index += 1
            launch[name] = value
        else:
            rest.append(arg)
        index += 1
    return launch, rest


def launch_command(argv: Sequence[str]) -> list[str]:
    """
    The `accelerate launch` command for a `trl-moe-rm train` command line that has launch flags.

    On a machine without a GPU the processes get `--ddp_backend gloo` (unless the flags set a backend): the CPU
    backend of torch.distributed, which DeepSpeed and FSDP need there (without it, under DeepSpeed accelerate believes
    it runs one process and DeepSpeed stops with "Check batch related parameters").
    """
    launch, rest = split_launch_args(argv)
    config = resolve_accelerate_config(launch.get("--accelerate_config", "multi_gpu"))
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config)]
    if "--num_processes" in launch:
        count = launch["--num_processes"]
        if not count.isdigit() or int(count) < 1:
            raise ValueError(f"--num_processes must be a positive integer, got {count!r}.")
        command += ["--num_processes", count]
    command += ["--main_process_port", launch.get("--main_process_port") or str(_free_port())]
    command += ["-m", "trl_moe_rm.scripts.train", *rest]
    import torch

    if not torch.cuda.is_available() and not any(
        arg.split("=", 1)[0] == "--ddp_backend" for arg in rest
    ):
        command += ["--ddp_backend", "gloo"]
    return command


def launch_training(argv: Sequence[str]) -> int:
    """Run [`launch_command`] and return its exit code."""
    command = launch_command(argv)
    print("Launching:", " ".join(command), file=sys.stderr)
    return subprocess.run(command, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"}).returncode


__all__ = ["LAUNCH_FLAGS", "accelerate_configs", "launch_command", "launch_training", "resolve_accelerate_config"]
