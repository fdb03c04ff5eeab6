"""Read the deployment files the tests hold the code to: the Dockerfile's final stage and k8s/base."""

from __future__ import annotations

import json
import os
import shlex
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any

import yaml

from devkit import ROOT

DOCKERFILE = ROOT / "Dockerfile"
BASE_DEPLOYMENT = ROOT / "k8s" / "base" / "deployment.yaml"


@dataclass
class ImageStage:
    """What the final stage of a Dockerfile sets: the run-time view of the image."""

    workdir: str = "/"
    env: dict[str, str] = field(default_factory=dict)
    cmd: list[str] = field(default_factory=list)
    user: str = ""
    expose: list[str] = field(default_factory=list)
    copies: list[list[str]] = field(default_factory=list)


def instructions(text: str) -> list[tuple[str, str]]:
    """Split a Dockerfile into (INSTRUCTION, arguments), joining continued lines and dropping comments."""
    joined: list[str] = []
    pending = ""
    for line in text.splitlines():
        if line.strip().startswith("#") or not line.strip():
            continue
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        joined.append(pending + line.strip())
        pending = ""
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in joined]


def parse_env(args: str, env: dict[str, str]) -> dict[str, str]:
    """Apply one ENV instruction (key=value pairs, $VAR expanded from earlier ENV) to env."""
    for pair in shlex.split(args):
        key, _, value = pair.partition("=")
        for name, known in env.items():
            value = value.replace(f"${{{name}}}", known).replace(f"${name}", known)
        env[key] = value
    return env


def final_stage(text: str) -> ImageStage:
    """Return what the last FROM stage of a Dockerfile sets up; CMD must be in exec (JSON) form."""
    steps = instructions(text)
    last_from = max(i for i, (name, _) in enumerate(steps) if name == "FROM")
    stage = ImageStage()
    for name, args in steps[last_from + 1 :]:
        if name == "WORKDIR":
            stage.workdir = str(Path(stage.workdir, args))
        elif name == "ENV":
            parse_env(args, stage.env)
        elif name == "CMD":
            stage.cmd = json.loads(args)
        elif name == "USER":
            stage.user = args
        elif name == "EXPOSE":
            stage.expose += args.split()
        elif name == "COPY":
            stage.copies.append(shlex.split(args))
    return stage


def ignore_patterns(root: Path = ROOT) -> list[str]:
    """Return the patterns of .dockerignore, in order."""
    lines = [line.strip() for line in (root / ".dockerignore").read_text().splitlines()]
    return [line for line in lines if line and not line.startswith("#")]


def ignored(relative: Path, patterns: list[str]) -> bool:
    """Tell whether .dockerignore keeps a path out: a pattern matches it or a parent; the last match wins."""
    prefixes = ["/".join(relative.parts[: n + 1]) for n in range(len(relative.parts))]
    verdict = False
    for pattern in patterns:
        glob = pattern.lstrip("!").rstrip("/")
        depth = glob.count("/") + 1
        if any(prefix.count("/") + 1 == depth and fnmatchcase(prefix, glob) for prefix in prefixes):
            verdict = not pattern.startswith("!")
    return verdict


def context_files(root: Path = ROOT) -> list[Path]:
    """List the files of the build context that .dockerignore lets in, as paths relative to root."""
    patterns = ignore_patterns(root)
    deepest_exception = max((p.count("/") + 1 for p in patterns if p.startswith("!")), default=0)
    kept = []
    for folder, dirs, files in os.walk(root):
        here = Path(folder).relative_to(root)
        # Skip a folder that is ignored and that no exception pattern reaches into (.git, .venv, ...).
        dirs[:] = [d for d in dirs if not (ignored(here / d, patterns) and len((here / d).parts) >= deepest_exception)]
        kept += [here / name for name in files if not ignored(here / name, patterns)]
    return sorted(kept)


def assemble_workdir(stage: ImageStage, target: Path, root: Path = ROOT) -> Path:
    """Lay out the files the stage's COPY instructions put in the image (from the context) under target."""
    context = context_files(root)
    for copy in stage.copies:
        if any(arg.startswith("--from") for arg in copy):
            continue
        *sources, dest = [arg for arg in copy if not arg.startswith("--")]
        into = target / Path(stage.workdir, dest).relative_to("/")
        for source in sources:
            base = source.rstrip("/")
            for relative in context:
                if fnmatchcase(str(relative), base) and "/" not in str(relative):
                    (into / relative.name).parent.mkdir(parents=True, exist_ok=True)
                    (into / relative.name).write_bytes((root / relative).read_bytes())
                elif str(relative).startswith(base + "/"):
                    (into / relative.relative_to(base)).parent.mkdir(parents=True, exist_ok=True)
                    (into / relative.relative_to(base)).write_bytes((root / relative).read_bytes())
    return target / Path(stage.workdir).relative_to("/")


def base_deployment() -> dict[str, Any]:
    """Return the Deployment of k8s/base."""
    return yaml.safe_load(BASE_DEPLOYMENT.read_text())


def termination_grace_period() -> int:
    """Return the base Deployment's terminationGracePeriodSeconds."""
    return base_deployment()["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
