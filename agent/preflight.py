"""What ``check-config`` checks beyond the file itself: the paths the agent will need.

Each problem is one line naming the path and saying the fix. The checks are the ones the agent
applies when an event comes (hooks.discover), made before one does.
"""

from __future__ import annotations

import os
from pathlib import Path

from agent.config import Config
from agent.hooks import directory_problem, discover


def check_paths(config: Config, *, as_root: bool) -> list[str]:
    """Every problem with the hook directories, their hooks and the state directory."""
    problems: list[str] = []
    for key, value in (
        ("hooks.prepare_dir", config.hooks.prepare_dir),
        ("hooks.recover_dir", config.hooks.recover_dir),
    ):
        directory = Path(value)
        hooks = discover(directory, check_ownership=as_root)
        refusals = [hook.refusal for hook in hooks if hook.refusal is not None]
        if as_root and not refusals and directory.is_dir():
            # An empty directory has no hook to carry the directory's own problem.
            problem = directory_problem(directory)
            refusals = [problem] if problem else []
        problems.extend(f"{key}: {refusal}" for refusal in dict.fromkeys(refusals))
    problems.extend(_hook_type_problems(config))
    problem = _state_problem(config.state.path)
    if problem is not None:
        problems.append(f"state.path: {problem}")
    return problems


def _hook_type_problems(config: Config) -> list[str]:
    """Names in hooks.event_types that are no hook in either directory: a typo there leaves the
    hook it meant running for every type. Only said when the directories can be listed."""
    names: set[str] = set()
    for value in (config.hooks.prepare_dir, config.hooks.recover_dir):
        try:
            names.update(os.listdir(value))
        except OSError:
            return []
    return [
        f"hooks.event_types: {name} is no hook in {config.hooks.prepare_dir} or"
        f" {config.hooks.recover_dir} (a misspelt name leaves the hook meant running for every"
        " event type)"
        for name in config.hooks.event_types
        if name not in names
    ]


def _state_problem(path_text: str) -> str | None:
    path = Path(path_text)
    if path.exists():
        if not os.access(path, os.R_OK | os.W_OK):
            return f"{path} cannot be written by this user (check its owner and mode)"
        target = path.parent
    else:
        target = path.parent
        while not target.exists() and target != target.parent:
            target = target.parent  # the agent creates the missing directories
    if not target.is_dir():
        return f"{target} is not a directory (point state.path into a directory)"
    if not os.access(target, os.W_OK | os.X_OK):
        return (
            f"the state directory {target} is not writable by this user "
            f"(the agent writes {path.name} and its journal there: fix its owner or mode)"
        )
    return None
