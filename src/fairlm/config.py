"""Configuration: defaults and types come from workflow/schemas/config.schema.yaml alone.

`resolve(config)` fills every default, checks types against the schema and the rules a schema
cannot say (a step count for every sequence length, batch divisible by the micro-batch), and
raises `ConfigError` naming the offending key before any job runs.
"""

from __future__ import annotations

import copy
import functools
from pathlib import Path

import jsonschema
import yaml

SCHEMA_PATH = Path(__file__).resolve().parents[2] / "workflow" / "schemas" / "config.schema.yaml"


class ConfigError(ValueError):
    """A malformed configuration; the message names the key."""


def load_schema(path: str | Path | None = None) -> dict:
    with open(path or SCHEMA_PATH) as handle:
        return yaml.safe_load(handle)


@functools.lru_cache(maxsize=1)
def _defaults() -> dict:
    defaults: dict = {}
    _fill_defaults(defaults, load_schema())
    return defaults


def section(config: dict, name: str) -> dict:
    """config[name], with the schema's default for every key it leaves out.

    For callers handed a partial config (benchmarks, tests); resolved configs are complete.
    """
    return {**copy.deepcopy(_defaults()[name]), **(config.get(name) or {})}


def _fill_defaults(instance: dict, schema: dict) -> None:
    for key, sub in schema.get("properties", {}).items():
        if key not in instance and "default" in sub:
            instance[key] = copy.deepcopy(sub["default"])
        if isinstance(instance.get(key), dict) and sub.get("type") == "object":
            _fill_defaults(instance[key], sub)


def _dotted(path) -> str:
    parts = [str(p) if not isinstance(p, int) else f"[{p}]" for p in path]
    return ".".join(parts).replace(".[", "[") or "<top level>"


def _stringify_length_keys(config: dict) -> None:
    """YAML reads `8192: 5000` with an integer key; the schema keys these maps by strings."""
    for section, key in (("grid", "steps"), ("resources", "mem_mb"), ("resources", "runtime_min")):
        mapping = config.get(section, {}).get(key)
        if isinstance(mapping, dict):
            config[section][key] = {str(k): v for k, v in mapping.items()}


def resolve(config: dict, schema_path: str | Path | None = None) -> dict:
    """Return a validated copy of `config` with every default filled in."""
    if not isinstance(config, dict):
        raise ConfigError(f"the config must be a mapping, got {type(config).__name__}")
    schema = load_schema(schema_path)
    resolved = copy.deepcopy(config)
    _stringify_length_keys(resolved)
    _fill_defaults(resolved, schema)
    validator = jsonschema.Draft202012Validator(schema)
    errors = sorted(validator.iter_errors(resolved), key=lambda e: list(e.absolute_path))
    if errors:
        lines = []
        for error in errors:
            where = _dotted(error.absolute_path)
            if error.validator == "additionalProperties":
                known = sorted(error.schema.get("properties", {}))
                lines.append(
                    f"config key {where}: {error.message} (known keys: {', '.join(known)})"
                )
            else:
                lines.append(f"config key {where}: {error.message}")
        raise ConfigError("invalid config:\n  " + "\n  ".join(lines))
    _check_semantics(resolved)
    return resolved


def _check_semantics(config: dict) -> None:
    grid, train = config["grid"], config["train"]
    missing = [n for n in grid["seq_lens"] if str(n) not in grid["steps"]]
    if missing:
        raise ConfigError(
            f"config key grid.steps: no step count for seq_len {missing} "
            f"(grid.steps has {sorted(grid['steps'], key=int)})"
        )
    micro = train["micro_batch_size"] or train["batch_size"]
    if train["batch_size"] % micro:
        raise ConfigError(
            f"config key train.micro_batch_size: batch_size {train['batch_size']} is not a "
            f"multiple of micro_batch_size {micro}"
        )
    if train["min_lr"] > train["lr"]:
        raise ConfigError(
            f"config key train.min_lr: {train['min_lr']} exceeds train.lr {train['lr']}"
        )
    mamba = config["mamba"]
    if mamba["dt_min"] > mamba["dt_max"]:
        raise ConfigError(f"config key mamba.dt_min: {mamba['dt_min']} exceeds mamba.dt_max")


def load(path: str | Path, overrides: dict | None = None) -> dict:
    """Read a YAML config, merge `overrides` (nested dicts) and resolve it."""
    with open(path) as handle:
        config = yaml.safe_load(handle) or {}
    return resolve(merge(config, overrides or {}))


def merge(base: dict, override: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def steps_for(config: dict, seq_len: int) -> int:
    return int(config["grid"]["steps"][str(seq_len)])


def run_config(config: dict, model: str, seq_len: int, seed: int) -> dict:
    """The resolved settings of one run: shared sections, its own model section, the run."""
    from fairlm.models import REGISTRY

    run = {k: copy.deepcopy(v) for k, v in config.items() if k not in REGISTRY}
    for key in ("grid", "resources", "bench", "analysis", "data_dir"):
        run.pop(key, None)
    run[model] = copy.deepcopy(config[model])
    run["run"] = {"model": model, "seq_len": int(seq_len), "seed": int(seed),
                  "steps": steps_for(config, seq_len)}
    return run


def shared_settings(run_cfg: dict) -> dict:
    """A run config without what may differ between models: its own section and its name."""
    shared = copy.deepcopy(run_cfg)
    model = shared["run"].pop("model")
    shared.pop(model, None)
    return shared
