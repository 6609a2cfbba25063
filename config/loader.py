"""Load the environment settings and the TOML file; collect every error before failing."""

from __future__ import annotations

import os
import tomllib
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any, Literal

from pydantic import SecretStr, ValidationError
from pydantic_settings import BaseSettings, SettingsConfigDict

from config.models import FileConfig, Funder, cross_checks

CONNECTOR_GROUP = "fundgate.connectors"
DEFAULT_CONFIG = Path(__file__).with_name("default.toml")


class ConfigError(Exception):
    """The configuration is unusable; `errors` lists every problem found, one line each.
    `funders` holds the funder entries that are valid by themselves (with their index), so
    their connector options can still be checked and reported with the rest."""

    def __init__(
        self, source: str, errors: list[str], funders: list[tuple[int, Funder]] | None = None
    ) -> None:
        self.source = source
        self.errors = errors
        self.funders = funders or []
        super().__init__(f"{source}: " + "; ".join(errors))


class Settings(BaseSettings):
    """Process settings from the environment (`FUNDGATE_` prefix)."""

    model_config = SettingsConfigDict(env_prefix="FUNDGATE_", extra="ignore")

    database_url: SecretStr | None = None
    data_dir: Path = Path(".fundgate")
    config: Path | None = None
    log_format: Literal["json", "console"] = "json"
    log_level: str = "info"
    event_loop: Literal["auto", "uvloop", "asyncio"] = "auto"

    @property
    def config_path(self) -> Path:
        return self.config if self.config is not None else DEFAULT_CONFIG


def known_connectors() -> set[str]:
    return {ep.name for ep in entry_points(group=CONNECTOR_GROUP)}


def _resolve_secrets(node: Any, path: str, errors: list[str]) -> Any:
    """Replace every `env:NAME` string with that variable's value; unset ones are errors."""
    if isinstance(node, dict):
        return {
            k: _resolve_secrets(v, f"{path}.{k}" if path else k, errors) for k, v in node.items()
        }
    if isinstance(node, list):
        return [_resolve_secrets(v, f"{path}[{i}]", errors) for i, v in enumerate(node)]
    if isinstance(node, str) and node.startswith("env:"):
        name = node[4:]
        value = os.environ.get(name)
        if not name or value is None or value == "":
            errors.append(f"{path}: secret from environment variable {name!r} is not set")
            return "<unset>"
        return value
    return node


def _format_validation(e: ValidationError) -> list[str]:
    out: list[str] = []
    for err in e.errors():
        loc = ".".join(str(p) if not isinstance(p, int) else f"[{p}]" for p in err["loc"])
        loc = loc.replace(".[", "[")
        msg = str(err["msg"]).removeprefix("Value error, ")
        for part in msg.split("; "):
            out.append(f"{loc}: {part}" if loc else part)
    return out


def parse_config(raw: dict[str, Any], source: str = "<config>") -> FileConfig:
    errors: list[str] = []
    resolved = _resolve_secrets(raw, "", errors)
    cfg: FileConfig | None = None
    try:
        cfg = FileConfig.model_validate(resolved)
    except ValidationError as e:
        errors.extend(_format_validation(e))
    if isinstance(resolved, dict):
        errors.extend(cross_checks(resolved))
    names = known_connectors()
    for i, f in enumerate(resolved.get("funders") or []):
        if isinstance(f, dict):
            name = f.get("connector", "sandbox")
            if isinstance(name, str) and name not in names:
                errors.append(
                    f"funders[{i}].connector: unknown connector {name!r} "
                    f"(installed: {', '.join(sorted(names)) or 'none'})"
                )
    if errors or cfg is None:
        raise ConfigError(source, errors, _valid_funders(resolved, errors))
    return cfg


def _valid_funders(resolved: Any, errors: list[str]) -> list[tuple[int, Funder]]:
    """The funder entries without an error of their own (an unset secret included: its
    connector would only complain again about the placeholder)."""
    funders = resolved.get("funders") if isinstance(resolved, dict) else None
    valid: list[tuple[int, Funder]] = []
    for i, f in enumerate(funders if isinstance(funders, list) else []):
        if any(e.startswith((f"funders[{i}].", f"funders[{i}]:")) for e in errors):
            continue
        try:
            valid.append((i, Funder.model_validate(f)))
        except ValidationError:
            continue
    return valid


def load_config(path: Path | str | None = None) -> FileConfig:
    p = Path(path) if path is not None else Settings().config_path
    try:
        raw = tomllib.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError as e:
        raise ConfigError(str(p), ["file not found"]) from e
    except OSError as e:  # a directory, no permission: `config check` still exits 2, no traceback
        raise ConfigError(str(p), [f"cannot read: {e.strerror or e}"]) from e
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(str(p), [f"not valid TOML: {e}"]) from e
    return parse_config(raw, str(p))
