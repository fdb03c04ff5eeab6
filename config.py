"""Settings: the only place the environment is read and validated."""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal, InvalidOperation
from typing import TypeVar

from domain import TIER_KEYS

T = TypeVar("T")

# Development defaults from the seed README; production sets both variables from a Secret.
DEV_QUEUE_DB_URI = "postgresql://queue-admin:queue-pwd@localhost:5432/queue-db"
DEV_PORTFOLIO_DB_URI = "postgresql://portfolio-admin:portfolio-pwd@localhost:5432/user-portfolio-db"

# Pool and market values, in TIER_KEYS order: every delta 0 until the operator stores real ones.
_DEFAULT_VALUES = ("1000000.0", "1000000.0", "2000000.0", "2000000.0", "500000.0", "500000.0")
TIER_DEFAULTS = dict(zip(TIER_KEYS, _DEFAULT_VALUES, strict=True))
# consistency.tier_values holds NUMERIC(20, 8).
TIER_LIMIT = Decimal(10) ** 12
TIER_PLACES = 8
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
LOG_FORMATS = ("json", "text")
BOOLEANS = {"true": True, "1": True, "yes": True, "on": True, "false": False, "0": False, "no": False, "off": False}
# prometheus_client reads this variable itself when it is imported: it switches it to multiprocess mode.
METRICS_DIR_VARIABLE = "PROMETHEUS_MULTIPROC_DIR"
# What a bearer token may do: `read` the GET endpoints, or `operate`, which also acts.
READ, OPERATE = "read", "operate"
ROLES = (READ, OPERATE)
# The name API_TOKEN acts under in the audit trail.
API_TOKEN_NAME = "api-token"  # noqa: S105 - a name, not a secret
TOKEN_MIN_LENGTH = 16


class ConfigError(Exception):
    """The environment holds one or more invalid settings."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("invalid configuration: " + "; ".join(problems))
        self.problems = problems


@dataclass(frozen=True)
class Credential:
    """A bearer token the API accepts: the name its holder acts under, and its role."""

    name: str
    role: str
    token: str = field(repr=False)

    def may(self, role: str) -> bool:
        """Tell whether this credential may do what `role` allows: operate includes read."""
        return self.role == OPERATE or role == READ


@dataclass(frozen=True)
class Settings:
    """Every setting of the service, validated."""

    queue_db_uri: str = DEV_QUEUE_DB_URI
    portfolio_db_uri: str = DEV_PORTFOLIO_DB_URI
    polling_interval: float = 30.0
    port: int = 8080
    tier_seed: tuple[tuple[Decimal, Decimal], ...] = tuple(
        (Decimal(TIER_DEFAULTS[f"TIER{n}"]), Decimal(TIER_DEFAULTS[f"TIER{n}_MV"])) for n in (1, 2, 3)
    )
    api_token: str | None = field(default=None, repr=False)
    api_tokens: tuple[Credential, ...] = ()  # from API_TOKENS_FILE, as read at start
    # Read again while the service runs (auth.Tokens), so that a token is added or revoked without a restart.
    api_tokens_file: str | None = None
    batch_size: int = 5000
    lookback_window: float = 300.0
    reconcile_interval: float = 300.0
    trigger_wait: float = 10.0
    # Seconds a process holds the right to apply without renewing it; every transaction of a cycle renews it.
    cycle_lease: float = 15.0
    liveness_timeout: float = 120.0
    log_level: str = "INFO"
    log_format: str = "json"
    metrics_dir: str | None = None
    db_pool_size: int = 4
    db_connect_timeout: int = 5
    db_statement_timeout: float = 30.0
    db_lock_timeout: float = 10.0
    listen_notify: bool = True
    drift_check_interval: float = 3600.0  # 0: no scheduled drift checks
    console_idle_timeout: float = 1800.0  # seconds a console session lasts without a request
    # Where a queue's first watermark starts when none is stored: "now", a time, or None for the start of time.
    initial_watermark: datetime | str | None = None

    @property
    def credentials(self) -> tuple[Credential, ...]:
        """Every token the API accepts at start: the named ones, and API_TOKEN, which may operate."""
        return (*self.api_tokens, *self.fixed_credentials)

    @property
    def fixed_credentials(self) -> tuple[Credential, ...]:
        """The credential of API_TOKEN, if set: the one token that changes only with a restart."""
        return () if self.api_token is None else (Credential(API_TOKEN_NAME, OPERATE, self.api_token),)


def check_tier_value(name: str, value: Decimal) -> str | None:
    """Return why a pool (TIERn) or market (TIERn_MV) value is invalid, or None."""
    if name.endswith("_MV") and value < 0:
        return f"{name} must be 0 or more"
    if not name.endswith("_MV") and value <= 0:
        return f"{name} must be greater than 0"
    if value.copy_abs() >= TIER_LIMIT:  # copy_abs is exact: abs() could overflow on a huge exponent
        return f"{name} must be less than {TIER_LIMIT:f}"
    exponent = value.as_tuple().exponent  # an int for a finite value, which the checks above ensure
    if isinstance(exponent, int) and exponent < -TIER_PLACES:
        return f"{name} must have at most {TIER_PLACES} decimal places"
    return None


class _Reader:
    """Reads variables from an environment, collecting every problem."""

    def __init__(self, environ: Mapping[str, str]) -> None:
        self.environ = environ
        self.problems: list[str] = []

    def get(self, name: str, default: T, parse: Callable[[str], T], rule: str) -> T:
        """Return the parsed variable, or the default when unset; record a problem when invalid."""
        raw = self.environ.get(name)
        if raw is None or raw.strip() == "":
            return default
        try:
            return parse(raw.strip())
        except (ValueError, ArithmeticError):
            self.problems.append(f"{name} must be {rule} (got {_shown(name, raw)})")
            return default

    def number(self, name: str, default: float, low: float, high: float) -> float:
        """Return a number of seconds within [low, high]."""

        def parse(raw: str) -> float:
            value = float(raw)
            if not math.isfinite(value) or not low <= value <= high:
                raise ValueError(raw)
            return value

        return self.get(name, default, parse, f"a number from {low:g} to {high:g}")

    def integer(self, name: str, default: int, low: int, high: int) -> int:
        """Return a whole number within [low, high]."""

        def parse(raw: str) -> int:
            value = int(raw)
            if not low <= value <= high:
                raise ValueError(raw)
            return value

        return self.get(name, default, parse, f"a whole number from {low} to {high}")

    def uri(self, name: str, default: str) -> str:
        """Return a PostgreSQL connection URI."""

        def parse(raw: str) -> str:
            if not raw.startswith(("postgresql://", "postgres://")):
                raise ValueError(name)
            return raw

        return self.get(name, default, parse, "a postgresql:// URI")

    def tokens_file(self, name: str) -> tuple[Credential, ...]:
        """Return the named tokens of the file a variable names, as it is at start (see parse_tokens)."""
        path = self.environ.get(name, "").strip()
        if not path:
            return ()
        try:
            with open(path, "rb") as file:
                data = file.read()
        except OSError as err:
            self.problems.append(f"{name} must name a readable file (got {path!r}: {err.strerror})")
            return ()
        credentials, problems = parse_tokens(data, name)
        self.problems += problems
        return credentials

    def tier(self, name: str) -> Decimal:
        """Return one tier seed value."""
        value = self.get(name, Decimal(TIER_DEFAULTS[name]), parse_decimal, "a decimal number")
        problem = check_tier_value(name, value)
        if problem:
            self.problems.append(problem)
        return value


def parse_tokens(data: bytes, where: str) -> tuple[tuple[Credential, ...], list[str]]:
    """Parse a tokens file, one `name token [role]` line each: its credentials, and its problems named after `where`.

    A problem gives the line's number and never quotes a field: a token written where the name or the role
    belongs would be shown otherwise. Used at start (config) and again whenever the file changes (auth).
    """
    try:
        lines = data.decode("utf-8").splitlines()
    except UnicodeDecodeError:
        return (), [f"{where} must be UTF-8 text"]
    found = [_credential(line) for line in lines]
    problems = [f"{where} line {number}: {problem}" for number, (_, problem) in enumerate(found, start=1) if problem]
    credentials = tuple(c for c, _ in found if c is not None)
    if len({c.name for c in credentials}) < len(credentials):
        problems.append(f"{where}: every token needs a name of its own")
    if len({c.token for c in credentials}) < len(credentials):
        problems.append(f"{where}: two names share one token")
    return credentials, problems


def _credential(line: str) -> tuple[Credential | None, str | None]:
    """Parse one line of a tokens file; blank lines and # comments hold nothing. Never quotes a field."""
    fields = line.split()
    if not fields or fields[0].startswith("#"):
        return None, None
    if len(fields) not in (2, 3):
        return None, "expected `name token` or `name token role`"
    name, token, role = fields[0], fields[1], fields[2] if len(fields) == 3 else READ
    if role not in ROLES:
        return None, f"the role must be one of {', '.join(ROLES)}"
    if len(token) < TOKEN_MIN_LENGTH:
        return None, f"the token must be at least {TOKEN_MIN_LENGTH} characters"
    return Credential(name, role, token), None


def _shown(name: str, raw: str) -> str:
    """Quote a bad value for an error message, unless it may hold a credential."""
    if name.endswith("_URI") or name == "API_TOKEN":
        return "a value that is not shown"
    return repr(raw[:40])


def load_settings(environ: Mapping[str, str] | None = None) -> Settings:
    """Read and validate every setting; raise ConfigError listing all problems."""
    env = _Reader(os.environ if environ is None else environ)
    tiers = tuple((env.tier(f"TIER{n}"), env.tier(f"TIER{n}_MV")) for n in (1, 2, 3))
    settings = Settings(
        queue_db_uri=env.uri("QUEUE_DB_URI", DEV_QUEUE_DB_URI),
        portfolio_db_uri=env.uri("USER_PORTFOLIO_DB_URI", DEV_PORTFOLIO_DB_URI),
        polling_interval=env.number("POLLING_INTERVAL", 30.0, 0.05, 86400),
        port=env.integer("PORT", 8080, 1, 65535),
        tier_seed=tiers,
        api_token=env.get("API_TOKEN", None, str, "a token"),
        batch_size=env.integer("BATCH_SIZE", 5000, 1, 100_000),
        lookback_window=env.number("LOOKBACK_WINDOW", 300.0, 1, 7 * 86400),
        reconcile_interval=env.number("RECONCILE_INTERVAL", 300.0, 1, 7 * 86400),
        trigger_wait=env.number("TRIGGER_WAIT", 10.0, 0.1, 600),
        cycle_lease=env.number("CYCLE_LEASE", 15.0, 1, 3600),
        liveness_timeout=env.number("LIVENESS_TIMEOUT", 120.0, 1, 86400),
        log_level=env.get("LOG_LEVEL", "INFO", _log_level, "one of " + ", ".join(LOG_LEVELS)),
        log_format=env.get("LOG_FORMAT", "json", _log_format, "one of " + ", ".join(LOG_FORMATS)),
        metrics_dir=env.get(METRICS_DIR_VARIABLE, None, _directory, "an existing directory"),
        db_pool_size=env.integer("DB_POOL_SIZE", 4, 2, 100),
        db_connect_timeout=env.integer("DB_CONNECT_TIMEOUT", 5, 1, 300),
        db_statement_timeout=env.number("DB_STATEMENT_TIMEOUT", 30.0, 0.1, 3600),
        db_lock_timeout=env.number("DB_LOCK_TIMEOUT", 10.0, 0.1, 3600),
        listen_notify=env.get("LISTEN_NOTIFY", True, _boolean, "true or false"),
        api_tokens=env.tokens_file("API_TOKENS_FILE"),
        api_tokens_file=env.get("API_TOKENS_FILE", None, str, "a path"),
        drift_check_interval=env.number("DRIFT_CHECK_INTERVAL", 3600.0, 0, 30 * 86400),
        console_idle_timeout=env.number("CONSOLE_IDLE_TIMEOUT", 1800.0, 60, 86400),
        initial_watermark=env.get(
            "INITIAL_WATERMARK", None, _initial_watermark, "`now` or an ISO 8601 time with an offset"
        ),
    )
    if settings.api_token is not None and len(settings.api_token) < TOKEN_MIN_LENGTH:
        env.problems.append(f"API_TOKEN must be at least {TOKEN_MIN_LENGTH} characters")
    if env.problems:
        raise ConfigError(env.problems)
    return settings


def demo_server_uri() -> str | None:
    """Return DEMO_PG_URI: the PostgreSQL server the demo should use ('embedded' forces its own)."""
    return os.environ.get("DEMO_PG_URI") or None


def load_settings_or_exit() -> Settings:
    """Load settings, or print every problem and exit with status 2."""
    try:
        return load_settings()
    except ConfigError as err:
        for problem in err.problems:
            print(f"configuration error: {problem}", file=sys.stderr)
        raise SystemExit(2) from None


def _initial_watermark(raw: str) -> datetime | str:
    """Parse INITIAL_WATERMARK: `now`, or an ISO 8601 time that names its offset (Z or +hh:mm)."""
    if raw.lower() == "now":
        return "now"
    value = datetime.fromisoformat(raw)
    if value.tzinfo is None:
        raise ValueError(raw)
    return value


def _log_level(raw: str) -> str:
    """Parse a log level name."""
    level = raw.upper()
    if level not in LOG_LEVELS:
        raise ValueError(raw)
    return level


def _log_format(raw: str) -> str:
    """Parse a log format name."""
    fmt = raw.lower()
    if fmt not in LOG_FORMATS:
        raise ValueError(raw)
    return fmt


def _boolean(raw: str) -> bool:
    """Parse true/false (also 1/0, yes/no, on/off), in any case."""
    value = BOOLEANS.get(raw.lower())
    if value is None:
        raise ValueError(raw)
    return value


def _directory(raw: str) -> str:
    """Accept the path of an existing directory."""
    if not os.path.isdir(raw):
        raise ValueError(raw)
    return raw


def share_metrics_dir(path: str) -> None:
    """Name the directory where processes forked from now on keep their metrics (prometheus_client multiprocess)."""
    os.environ[METRICS_DIR_VARIABLE] = path


def parse_decimal(raw: str) -> Decimal:
    """Parse a decimal number, rejecting NaN and infinities."""
    try:
        value = Decimal(raw)
    except InvalidOperation as err:
        raise ValueError(raw) from err
    if not value.is_finite():
        raise ValueError(raw)
    return value
