"""Fuzzing the policy-file loader: every input must load or fail as one clean line.

Each case is a file fed to ``watchdog.config.policy.load_config`` in-process. The only
acceptable results are a Config, or a ConfigError whose text is one printable line
starting with ``FILE:LINE:COL: `` (LINE within the file). Anything else, another
exception or a malformed message, is a crash: a user would see a traceback or a
garbled error instead of the spot to fix.

Cases, all from one seeded ``random.Random`` so a run is reproducible:

  mutation  1-4 edits of policies/default.yaml: delete / duplicate / swap / move lines,
            change indentation (spaces or a tab), insert random characters (colons,
            brackets, quotes, tabs, controls, non-ASCII), replace a value with a random
            token, uncomment a line, insert ${VAR}, anchors, aliases, tags or deep
            nesting, truncate (also mid-UTF-8 sequence)
  document  a random YAML document (config-shaped or free-form), yaml.safe_dump'ed
  raw       random text made of YAML punctuation, words, whitespace and odd characters

    .venv/bin/python bench/fuzz_config.py [-n 50000] [--seed 20261125] [--save DIR]

Prints cases tried / accepted / rejected / crashes (by kind) and the time; exits 1 if
any case crashed. tests/test_config_fuzz.py runs a slice of the same generators.
"""

from __future__ import annotations

import argparse
import random
import re
import sys
import tempfile
import time
import traceback
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from watchdog.config.policy import load_config  # noqa: E402
from watchdog.config.yamlpos import ConfigError  # noqa: E402

BASE = (REPO / "policies" / "default.yaml").read_text(encoding="utf-8")
# No variable the default file refers to is set: ${VAR:-default} takes its default.
ENVIRON: dict[str, str] = {"SET_BUT_EMPTY": "", "PORT": "5432", "FLAG": "true"}

# Every key of the schema, so random documents reach deep into validation.
TOP_KEYS = ("dry_run", "targets", "exclude", "policies", "limits", "audit", "alerts", "metrics")
TARGET_KEYS = ("name", "dsn", "password_file", "interval")
EXCLUDE_KEYS = ("superusers", "users", "applications", "databases", "client_addrs", "listeners")
POLICY_KEYS = ("name", "state", "longer_than", "action", "measured_from", "users",
               "applications", "databases", "client_addrs", "exclude", "dry_run", "targets",
               "when")
OTHER_KEYS = ("max_per_sweep", "path", "query", "sentry", "dsn", "environment",
              "connections_above", "listen")
ALL_KEYS = TOP_KEYS + TARGET_KEYS + EXCLUDE_KEYS + POLICY_KEYS + OTHER_KEYS

TOKENS: tuple[Any, ...] = (
    # durations, good and bad
    "10m", "30s", "1h30m", "500ms", "2d", "0s", "0ms", "-5m", "10 minutes", "1m1h", "1.5h",
    "99999999999999d", "9" * 400 + "d", "1e3s", "s", "10", 10, 0, -1, 1.5, 2**70,
    # percentages
    "80%", "0%", "100%", "150%", "90 %", "0.0001%", "-1%", "80", "%",
    # states, actions, columns, audit modes
    "idle", "idle in transaction", "idle in transaction (aborted)", "active",
    "fastpath function call", "Idle", "terminate", "cancel", "kill", "state_change",
    "xact_start", "query_start", "backend_start", "full", "truncate", "omit",
    # names, DSNs, addresses, paths
    "main", "idle", "bad name!", "", " ", "-lead", "ünïcode", "postgresql://w@h:5432/db",
    "postgresql://w:Hunter2@h/db", "postgres://h", "http://h/db", "postgresql://[::1",
    "10.0.0.0/8", "10.0.0.1/8", "::1/128", "fe80::1%eth0/128", "300.0.0.0/8", "db1.local",
    "127.0.0.1:9187", "[::1]:9187", "127.0.0.1:²", "127.0.0.1:99999", ":", "/tmp/x.jsonl",
    "~/x", "~nobody/x", "/tmp/a\0b", "https://k@sentry.example/1", "https://sentry/",
    # environment references
    "${PG_WATCHDOG_DSN}", "${UNSET:-30s}", "${SET_BUT_EMPTY}", "${FLAG}", "${PORT}",
    "${", "${1BAD}", "$PATH",
    # YAML's odd scalars
    None, True, False, "yes", "no", "on", "~", "null", ".nan", ".inf", float("nan"),
    float("inf"), "2024-13-45", "2024-01-01", "0x1F", "0o17", "1_000", "12:30:00",
    "line\nbreak", "tab\there", "\x1b[31mred", "\u202eevil", "nul\x00", "\ufeffbom",
    "quote'\"", "#comment", "- item", "key: value", "&anchor", "*alias", "!!int",
)

# Characters that matter to YAML, plus whitespace and characters a reader must survive.
PUNCT = ":{}[],&*!|>'\"%@`#-?\t\n\\$ ."
ODD = ("\x00", "\x07", "\x1b", "\x7f", "\x85", "\xa0", "\u2028", "\u2029", "\ufeff", "\ufffe",
       "é", "€", "𝄞", "猫", "\r", "\r\n", "\x0b", "\x0c")
FRAGMENTS = ("${X}", "${X:-1}", "&a ", "*a", "!!int ", "!!binary ", "!!python/object:os.system ",
             "!foo ", "<<: *a", "? ", "--- ", "...", "%YAML 1.1\n", "|\n", ">-\n", "{", "}",
             "[", "]", ": ", " #", "'", '"', "\t", "- ", "~", "!!set ", "!!omap ", "!<tag:x> ")


# -- generators ----------------------------------------------------------------


def token(rng: random.Random) -> Any:
    return rng.choice(TOKENS)


def random_text(rng: random.Random, n: int) -> str:
    alphabet = [*PUNCT, *ODD, *"abcdefghijklmnopqrstuvwxyz0123456789"]
    out = []
    for _ in range(n):
        r = rng.random()
        if r < 0.1:
            out.append(rng.choice(ALL_KEYS))
        elif r < 0.15:
            out.append(rng.choice(FRAGMENTS))
        else:
            out.append(rng.choice(alphabet))
    return "".join(out)


def random_value(rng: random.Random, depth: int = 0) -> Any:
    """A free-form YAML value: scalars, lists and mappings keyed mostly by schema keys."""
    r = rng.random()
    if depth > 4 or r < 0.45:
        return token(rng) if rng.random() < 0.8 else random_text(rng, rng.randrange(6))
    if r < 0.7:
        return [random_value(rng, depth + 1) for _ in range(rng.randrange(4))]
    keys = [rng.choice(ALL_KEYS) if rng.random() < 0.85 else random_text(rng, rng.randrange(5))
            for _ in range(rng.randrange(5))]
    return {k: random_value(rng, depth + 1) for k in keys}


def _maybe(rng: random.Random, good: Any, p_good: float = 0.93) -> Any:
    return good if rng.random() < p_good else random_value(rng, 3)


def config_like(rng: random.Random) -> dict[str, Any]:
    """A document shaped like a policy file, every part right or wrong at random."""
    doc: dict[str, Any] = {}
    names = [f"t{i}" for i in range(rng.randrange(1, 3))]
    p_good = rng.choice([1.0, 0.99, 0.97, 0.9])

    def maybe(good: Any) -> Any:
        return _maybe(rng, good, p_good)

    def section(key: str, good: Any, p_present: float = 0.6) -> None:
        if rng.random() < p_present:
            doc[key] = maybe(good)

    def sample(keys: tuple[str, ...], values: dict[str, Any]) -> dict[str, Any]:
        chosen = {k: maybe(values[k]) for k in keys if k in values and rng.random() < 0.6}
        if rng.random() < 1.0 - p_good:
            chosen[rng.choice(ALL_KEYS)] = token(rng)
        return chosen

    exclude = {"superusers": rng.random() < 0.5, "users": ["app"], "applications": ["psql*"],
               "databases": [], "client_addrs": ["10.0.0.0/8", "::1/128"], "listeners": True}
    section("dry_run", rng.random() < 0.5)
    section("targets", p_present=0.97, good=[
        {"name": n, **sample(TARGET_KEYS, {"dsn": f"postgresql://watchdog@h{n}/postgres",
                                           "password_file": "/run/secret", "interval": "30s"})}
        for n in names
    ])
    section("exclude", sample(EXCLUDE_KEYS, exclude))
    policies = []
    for i in range(rng.choice([0, 1, 1, 1, 2, 2, 3, 3])):
        state = rng.choice(["idle", ["idle in transaction"], "active"])
        good = {"name": f"p{i}", "state": state,
                "longer_than": rng.choice(["10m", "1s", "500ms"]),
                "action": "cancel" if state == "active" and rng.random() < 0.5 else "terminate",
                "measured_from": rng.choice(["state_change", "query_start"]
                                            + ([] if state == "idle" else ["xact_start"])),
                "users": ["a*"], "applications": "web", "databases": ["db"],
                "client_addrs": ["192.0.2.0/24"], "exclude": sample(EXCLUDE_KEYS, exclude),
                "dry_run": True, "targets": [rng.choice(names)],
                "when": {"connections_above": "90%"}}
        policy = {k: v for k, v in good.items() if k in ("name", "state", "longer_than")}
        policy.update(sample(POLICY_KEYS, good))
        policies.append(policy)
    section("policies", policies, p_present=0.97)
    section("limits", {"max_per_sweep": rng.choice([50, 50, 50, 0, -1, "50", 1.5, True])})
    section("audit", sample(("path", "query"), {"path": "/tmp/pgwd.jsonl", "query": "full"}))
    section("alerts", sample(("sentry", "connections_above"), {
        "sentry": {"dsn": "https://k@sentry.example/1", "environment": "prod"},
        "connections_above": "80%"}))
    if rng.random() < 0.2:
        doc["metrics"] = maybe({"listen": "127.0.0.1:9187"})
    return doc


def dump(rng: random.Random, doc: Any) -> str:
    return yaml.safe_dump(doc, default_flow_style=rng.choice([False, None, True]),
                          allow_unicode=rng.random() < 0.5, sort_keys=False,
                          width=rng.choice([80, 20, 10**6]))


def _mutate_once(rng: random.Random, lines: list[str]) -> list[str]:
    if not lines:
        return [random_text(rng, rng.randrange(20))]
    i = rng.randrange(len(lines))
    op = rng.randrange(12)
    line = lines[i]
    if op == 0:  # delete
        return lines[:i] + lines[i + 1:]
    if op == 1:  # duplicate
        return [*lines[:i + 1], line, *lines[i + 1:]]
    if op == 2:  # swap two lines
        j = rng.randrange(len(lines))
        lines = list(lines)
        lines[i], lines[j] = lines[j], lines[i]
        return lines
    if op == 3:  # re-indent (spaces or a tab)
        body = line.lstrip(" ")
        indent = rng.choice([0, 1, 2, 3, 4, 6, 8])
        return [*lines[:i], rng.choice([" " * indent, "\t", " \t"]) + body, *lines[i + 1:]]
    if op in (4, 5):  # insert characters
        pos = rng.randrange(len(line) + 1)
        bits = "".join(rng.choice([*PUNCT, *ODD, *FRAGMENTS]) for _ in range(rng.randrange(1, 4)))
        return [*lines[:i], line[:pos] + bits + line[pos:], *lines[i + 1:]]
    if op in (6, 7):  # replace a value with a random token
        key, sep, _ = line.partition(": ")
        if not sep:
            key, sep = line.rstrip(), " "
        value = token(rng)
        shown = yaml.safe_dump(value, default_flow_style=True).splitlines()[0]
        shown = shown if rng.random() < 0.7 else str(value)
        return [*lines[:i], f"{key}{sep}{shown}", *lines[i + 1:]]
    if op == 8:  # uncomment
        return [*lines[:i], re.sub(r"^(\s*)# ?", r"\1", line), *lines[i + 1:]]
    if op == 9:  # insert a random YAML fragment or document piece
        piece = dump(rng, random_value(rng, 2)).splitlines()
        indent = " " * rng.choice([0, 2, 4])
        return lines[:i] + [indent + p for p in piece] + lines[i:]
    if op == 10:  # deep nesting (recursion limits)
        depth = rng.choice([50, 120, 400, 1500])
        opener, closer = rng.choice([("[", "]"), ("{a: ", "}"), ("- ", "")])
        nest = opener * depth + "x" + (closer * depth if rng.random() < 0.5 else "")
        if opener == "- ":
            nest = "\n".join("  " * d + "- " for d in range(min(depth, 400))) + "x"
        return [*lines[:i], nest, *lines[i:]]
    # op == 11: move a line elsewhere
    j = rng.randrange(len(lines))
    rest = lines[:i] + lines[i + 1:]
    return [*rest[:j], line, *rest[j:]]


def mutate(rng: random.Random, text: str = BASE) -> bytes:
    """1-4 random edits of ``text``, sometimes truncated (possibly mid UTF-8 sequence)."""
    lines = text.split("\n")
    for _ in range(rng.randint(1, 4)):
        lines = _mutate_once(rng, lines)
    data = "\n".join(lines).encode("utf-8", "surrogatepass")
    if rng.random() < 0.1:
        data = data[: rng.randrange(len(data) + 1)]
    return data


def generate(rng: random.Random) -> tuple[str, bytes]:
    """One case: its kind and the file's bytes."""
    r = rng.random()
    if r < 0.6:
        return "mutation", mutate(rng)
    if r < 0.85:
        doc = config_like(rng) if rng.random() < 0.7 else random_value(rng)
        return "document", dump(rng, doc).encode("utf-8")
    return "raw", random_text(rng, rng.randrange(200)).encode("utf-8", "surrogatepass")


# -- judging -------------------------------------------------------------------

# PyYAML's line breaks: a LINE beyond the last of these points outside the file.
_BREAKS = re.compile("\r\n|[\r\n\x85\u2028\u2029]")


@dataclass(frozen=True)
class Result:
    verdict: str  # accepted | rejected | crash
    detail: str = ""


def judge(path: Path, data: bytes, environ: dict[str, str] | None = None) -> Result:
    """Write ``data`` to ``path``, load it, and judge the outcome."""
    path.write_bytes(data)
    name = str(path)
    try:
        load_config(name, environ=ENVIRON if environ is None else environ)
    except ConfigError as exc:
        msg = str(exc)
        head = re.match(re.escape(name) + r":(\d+):(\d+): \S", msg)
        if head is None:
            return Result("crash", f"ConfigError not 'FILE:LINE:COL: ...': {msg!r}")
        if len(msg.splitlines()) != 1 or not msg.isprintable():
            return Result("crash", f"ConfigError not one printable line: {msg!r}")
        text = data.decode("utf-8", "replace")
        lines = len(_BREAKS.findall(text)) + 1
        line, col = int(head.group(1)), int(head.group(2))
        if not (1 <= line <= lines and col >= 1):
            return Result("crash", f"line {line} col {col} outside a {lines}-line file: {msg!r}")
        return Result("rejected", msg)
    except BaseException as exc:  # a crash is whatever else escapes
        if isinstance(exc, KeyboardInterrupt):
            raise
        tb = traceback.extract_tb(exc.__traceback__)[-1]
        where = f"{Path(tb.filename).name}:{tb.lineno}"
        return Result("crash", f"{type(exc).__name__} at {where}: {str(exc)[:200]}")
    return Result("accepted")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-n", type=int, default=50_000, help="cases to run (default 50000)")
    parser.add_argument("--seed", type=int, default=20261125, help="random seed")
    parser.add_argument("--save", type=Path, help="write each crashing case to this directory")
    parser.add_argument("--show", type=int, default=5, help="crashes to print (default 5)")
    args = parser.parse_args(argv)

    rng = random.Random(args.seed)
    tally: Counter[str] = Counter()
    kinds: Counter[tuple[str, str]] = Counter()
    crashes: Counter[str] = Counter()
    shown = 0
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="pgwd-fuzz-") as tmp:
        path = Path(tmp) / "policies.yaml"
        for i in range(args.n):
            kind, data = generate(rng)
            result = judge(path, data)
            tally[result.verdict] += 1
            kinds[kind, result.verdict] += 1
            if result.verdict != "crash":
                continue
            signature = result.detail.split(": ")[0]
            crashes[signature] += 1
            if args.save:
                args.save.mkdir(parents=True, exist_ok=True)
                (args.save / f"crash-{i:06d}.yaml").write_bytes(data)
            if shown < args.show:
                shown += 1
                print(f"crash in case {i} ({kind}): {result.detail}")
    elapsed = time.perf_counter() - started
    print(f"seed {args.seed}: {args.n} cases in {elapsed:.1f}s ({args.n / elapsed:.0f}/s)")
    print(f"  tried {args.n}  accepted {tally['accepted']}  rejected {tally['rejected']}"
          f"  crashes {tally['crash']}")
    for kind in ("mutation", "document", "raw"):
        print(f"  {kind:9} accepted {kinds[kind, 'accepted']:6}  rejected "
              f"{kinds[kind, 'rejected']:6}  crashes {kinds[kind, 'crash']}")
    for signature, count in crashes.most_common():
        print(f"  crash x{count}: {signature}")
    return 1 if tally["crash"] else 0


if __name__ == "__main__":
    sys.exit(main())
