"""
Settings: one frozen value built from command-line options and the
environment, validated before anything starts.

The option wins over the environment variable; a bad value is a
L{ConfigError} whose message names the setting, so that C{twistd} stops
with one clear line instead of a traceback.
"""

from __future__ import annotations

import os
import sqlite3
from typing import Callable, Mapping, TypeVar

from attrs import frozen

from easybackend.auth import KeyRing

T = TypeVar("T")

DEFAULT_BASE_URL = "https://api.openai.com/v1"
DEFAULT_DB = os.path.join("conversations", "easybackend.sqlite3")
MIB = 1024 * 1024


class ConfigError(ValueError):
    """A setting has a value the server cannot start with."""


@frozen
class Setting:
    """One configurable value: its option, its variable, default and help."""

    option: str
    default: object
    help: str
    env: str | None = None
    parse: Callable[[str], object] = str


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise ValueError("must be at least 1")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise ValueError("must be greater than 0")
    return value


def _ping_seconds(text: str) -> float:
    value = float(text)
    if value != 0 and not value >= 1:
        raise ValueError("must be 0 (off) or at least 1 (whole seconds)")
    return value


def _non_negative_float(text: str) -> float:
    value = float(text)
    if not value >= 0:
        raise ValueError("must be 0 or more")
    return value


def _log_format(text: str) -> str:
    if text not in ("text", "json"):
        raise ValueError("must be text or json")
    return text


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise ValueError("must be 0 or more")
    return value


def _temperature(text: str) -> float | None:
    if text == "":
        return None
    value = float(text)
    if not 0 <= value <= 2:
        raise ValueError("must be between 0 and 2")
    return value


def _optional(text: str) -> str | None:
    return text or None


def _url(text: str) -> str | None:
    if not text:
        return None
    if not text.startswith(("http://", "https://")):
        raise ValueError("must be an http:// or https:// URL")
    return text


#: Every setting, in the order of C{twistd easybackend --help}.
SETTINGS: tuple[Setting, ...] = (
    Setting("base-url", None, "OpenAI-compatible API base URL "
            f"[default: {DEFAULT_BASE_URL} when OPENAI_API_KEY is set]",
            env="OPENAI_BASE_URL", parse=_url),
    Setting("model", "gpt-4o-mini", "model name", env="GPT_ENGINE"),
    Setting("encoding", None, "tiktoken encoding for token budgets "
            "[default: derived from the model]", env="ENCODING_NAME",
            parse=_optional),
    Setting("first-prompt", None, "system message every new conversation "
            "starts with", env="FIRST_PROMPT", parse=_optional),
    Setting("db", DEFAULT_DB, "SQLite database file, or a PostgreSQL URL "
            "postgresql://user@host:port/dbname", env="EASYBACKEND_DB"),
    Setting("db-pool-size", 5, "PostgreSQL connections for queries (SQLite "
            "always uses one)", parse=_positive_int),
    Setting("db-turns", 10, "PostgreSQL: answers one replica writes at once, "
            "each holding a connection for its conversation lock",
            parse=_positive_int),
    Setting("http", "tcp:8000", "HTTP server endpoint string"),
    Setting("websocket", "tcp:9001", "WebSocket server endpoint string"),
    Setting("grpc", "[::]:9000", "gRPC listen address, in grpcio's form"),
    Setting("grpc-workers", 10, "gRPC handler threads: the most streams "
            "open at once", parse=_positive_int),
    Setting("context-tokens", 128000, "the model's context window, in tokens",
            parse=_positive_int),
    Setting("answer-tokens", 1024, "tokens kept free for the answer",
            parse=_positive_int),
    Setting("temperature", None, "default sampling temperature, 0 to 2 "
            "[default: the upstream's]", parse=_temperature),
    Setting("connect-timeout", 10.0, "seconds to wait for the upstream's "
            "response headers", parse=_positive_float),
    Setting("idle-timeout", 60.0, "seconds allowed between two pieces of "
            "an answer", parse=_positive_float),
    Setting("total-timeout", 600.0, "seconds allowed for a whole answer",
            parse=_positive_float),
    Setting("retries", 2, "retries on connection errors, 429 and 5xx "
            "before the answer starts", parse=_non_negative_int),
    Setting("max-body", MIB, "largest HTTP request body, in bytes",
            parse=_positive_int),
    Setting("ws-max-message", MIB, "largest WebSocket message, in bytes",
            parse=_positive_int),
    Setting("ws-ping-interval", 20.0, "seconds between WebSocket pings, "
            "0 for none", parse=_ping_seconds),
    Setting("ws-ping-timeout", 10.0, "seconds a WebSocket peer has to "
            "answer a ping, 0 to never drop", parse=_ping_seconds),
    Setting("shutdown-grace", 10.0, "seconds asks in flight may take to "
            "finish after SIGTERM before they are cancelled",
            parse=_non_negative_float),
    Setting("api-keys-file", None, "file of client API keys, one name:key "
            "a line (EASYBACKEND_API_KEYS: comma-separated name:key pairs)",
            parse=_optional),
    Setting("asks-per-minute", 0, "asks one key may start in a minute, "
            "0 for no limit", parse=_non_negative_int),
    Setting("max-streams", 0, "answers one key may have streaming at "
            "once, 0 for no limit", parse=_non_negative_int),
    Setting("grpc-max-message", MIB, "largest gRPC request message, in bytes",
            parse=_positive_int),
    Setting("tls-cert", None, "PEM certificate (chain): turns on TLS for "
            "HTTP, WebSocket and gRPC", parse=_optional),
    Setting("tls-key", None, "PEM private key for --tls-cert", parse=_optional),
    Setting("log-format", "text", "text, or json for one JSON object a line",
            parse=_log_format),
    Setting("cors-origins", "*", "comma-separated allowed CORS origins, "
            "or *"),
    Setting("offline-interval", 0.02, "seconds between the offline "
            "model's pieces", parse=_positive_float),
)


@frozen
class Settings:
    """Everything the server needs to start, validated."""

    api_key: str | None = None
    base_url: str | None = None
    offline: bool = False
    model: str = "gpt-4o-mini"
    encoding: str | None = None
    first_prompt: str | None = None
    db: str = DEFAULT_DB
    db_pool_size: int = 5
    db_turns: int = 10
    http: str = "tcp:8000"
    websocket: str = "tcp:9001"
    grpc: str = "[::]:9000"
    grpc_workers: int = 10
    context_tokens: int = 128000
    answer_tokens: int = 1024
    temperature: float | None = None
    connect_timeout: float = 10.0
    idle_timeout: float = 60.0
    total_timeout: float = 600.0
    retries: int = 2
    max_body: int = MIB
    ws_max_message: int = MIB
    ws_ping_interval: float = 20.0
    ws_ping_timeout: float = 10.0
    cors_origins: tuple[str, ...] = ("*",)
    offline_interval: float = 0.02
    shutdown_grace: float = 10.0
    api_keys_file: str | None = None
    asks_per_minute: int = 0
    max_streams: int = 0
    grpc_max_message: int = MIB
    tls_cert: str | None = None
    tls_key: str | None = None
    log_format: str = "text"
    log_content: bool = False
    keys: KeyRing = KeyRing()

    @property
    def tls(self) -> bool:
        return self.tls_cert is not None
    @property
    def upstream_url(self) -> str | None:
        """The upstream to call, or None when there is none configured."""
        if self.offline:
            return None
        if self.base_url:
            return self.base_url.rstrip("/")
        if self.api_key:
            return DEFAULT_BASE_URL
        return None


def settings_from(
    options: Mapping[str, object], environ: Mapping[str, str] = os.environ
) -> Settings:
    """
    Build L{Settings} from parsed option values (C{None} where the option
    was not given) and the environment; raise L{ConfigError} naming the
    first bad setting.
    """
    values: dict[str, object] = {}
    for setting in SETTINGS:
        name = setting.option.replace("-", "_")
        raw = options.get(setting.option)
        source = f"--{setting.option}"
        if raw is None and setting.env and setting.env in environ:
            raw, source = environ[setting.env], setting.env
        if raw is None:
            values[name] = setting.default
            continue
        try:
            values[name] = setting.parse(str(raw))
        except ValueError as e:
            raise ConfigError(f"{source}: invalid value {raw!r}: {e}") from None
    if values["answer_tokens"] >= values["context_tokens"]:  # type: ignore[operator]
        raise ConfigError(
            "--answer-tokens must be smaller than --context-tokens"
        )
    origins = tuple(o.strip() for o in str(values.pop("cors_origins")).split(",")
                    if o.strip())
    if bool(values["tls_cert"]) != bool(values["tls_key"]):
        raise ConfigError("--tls-cert and --tls-key must be given together")
    for name in ("tls_cert", "tls_key"):
        path = values[name]
        if path and not os.access(str(path), os.R_OK):
            raise ConfigError(f"--{name.replace('_', '-')}: cannot read {path}")
    settings = Settings(
        api_key=environ.get("OPENAI_API_KEY") or None,
        offline=bool(options.get("offline")),
        log_content=bool(options.get("log-content")),
        cors_origins=origins or ("*",),
        keys=load_keys(values["api_keys_file"], environ),  # type: ignore[arg-type]
        **values,  # type: ignore[arg-type]
    )
    if not is_postgres(settings.db):
        check_database(settings.db)
    return settings


def is_postgres(db: str) -> bool:
    """Whether the database setting names a PostgreSQL server."""
    return db.startswith(("postgresql://", "postgres://"))


def load_keys(path: str | None, environ: Mapping[str, str]) -> KeyRing:
    """
    Client API keys from C{--api-keys-file}, else C{EASYBACKEND_API_KEYS};
    L{ConfigError} naming the source of a bad one.
    """
    try:
        if path is not None:
            try:
                with open(path, encoding="utf-8") as f:
                    return KeyRing.parse(f.read().splitlines(), f"--api-keys-file {path}")
            except OSError as e:
                raise ConfigError(f"--api-keys-file: cannot read {path}: {e.strerror}") from None
        value = environ.get("EASYBACKEND_API_KEYS", "")
        return KeyRing.parse(value.split(","), "EASYBACKEND_API_KEYS")
    except ValueError as e:
        raise ConfigError(str(e)) from None


def check_database(path: str) -> None:
    """
    Make sure the SQLite file can be opened for writing, creating its
    folder when missing; raise L{ConfigError} naming C{path} if not.
    """
    folder = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"--db: cannot create folder {folder}: {e.strerror}") from None
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ConfigError(f"--db: folder {folder} is not writable")
    if os.path.exists(path):
        if not os.access(path, os.R_OK | os.W_OK):
            raise ConfigError(f"--db: {path} is not readable and writable")
        try:
            connection = sqlite3.connect(path)
            try:
                connection.execute("SELECT count(*) FROM sqlite_master").fetchone()
            finally:
                connection.close()
        except sqlite3.DatabaseError as e:
            raise ConfigError(f"--db: {path} is not a usable SQLite database: {e}") from None
