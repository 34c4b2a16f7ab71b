"""`pg-watchdog audit`: filters, time windows, output modes, torn lines, rotation, hostile values.

Every expectation is computed with a plain Python filter over the generated records.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import random
import unicodedata
from collections import Counter
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from watchdog.audit.reader import iter_records, parse_when
from watchdog.audit.render import human_age
from watchdog.commands import audit as audit_command
from watchdog.commands.audit import OUTCOMES, configure_parser, run
from watchdog.text.statements import shape

NOW = datetime(2026, 11, 25, 12, 0, 0, tzinfo=UTC)
HOSTILE_APP = "evil\n\x1b[31mred\x1b]0;pwned\x07\r\u202eabc\x9b2J\t'\"end"
HOSTILE_SHOWN = r"evil\n\x1b[31mred\x1b]0;pwned\x07\r\u202eabc\x9b2J\t" + "'\"end"
TARGETS = ["main", "replica", "eu-west"]
POLICIES = ["idle", "idle-in-transaction", "long-query"]
USERS = ["app", "etl", "report", "u" * 64, "ユーザー", "o'brien\"x"]
APPS = ["web-1", "web-2", "etl-nightly", "", "psql", HOSTILE_APP, "a" * 64, "名前アプリ", "\ud800x"]
DBS = ["shop", "analytics", "db with space", "ünïcödé"]
CLIENTS = ["10.0.0.1", "2001:db8::1", None]
QUERIES = [None, "SELECT 'it''s'\n  FROM t\tWHERE x = \"y\"", "COMMIT", "SELECT 1 -- \x1b[2J"]
HUGE_QUERY = "SELECT HUGEQUERY " + "x" * 1_000_000
COUNT = 3000
ESCAPES = ("\x1b", "\r", "\x07", "\x9b", "\u202e", "\t")

Record = dict[str, Any]


def iso(when: datetime) -> str:
    return f"{when:%Y-%m-%dT%H:%M:%S}.{when.microsecond // 1000:03d}Z"


def ts_of(rec: Record) -> datetime:
    return datetime.fromisoformat(rec["ts"])


def make_records(count: int, seed: int = 7) -> list[Record]:
    rng = random.Random(seed)
    offsets = sorted((rng.uniform(0, 3 * 86400) for _ in range(count)), reverse=True)
    offsets[count // 2] = 3600.0  # exactly on the `--since 1h` boundary
    offsets.sort(reverse=True)
    records = []
    for i, offset in enumerate(offsets):
        when = NOW - timedelta(seconds=offset)
        when = when.replace(microsecond=when.microsecond // 1000 * 1000)
        policy = rng.choice(POLICIES)
        outcome = rng.choice(OUTCOMES)
        records.append(
            {
                "ts": iso(when),
                "target": rng.choice(TARGETS),
                "policy": policy,
                "action": "cancel" if policy == "long-query" else "terminate",
                "dry_run": outcome.startswith("would_"),
                "outcome": outcome,
                "error": "permission denied" if outcome == "failed" else None,
                "pid": rng.randint(100, 4_000_000),
                "backend_start": iso(when - timedelta(hours=2)),
                "usename": rng.choice(USERS),
                "datname": rng.choice(DBS),
                "application_name": rng.choice(APPS),
                "client_addr": rng.choice(CLIENTS),
                "state": "idle",
                "state_change": iso(when - timedelta(minutes=11)),
                "xact_start": None,
                "query_start": iso(when - timedelta(minutes=11)),
                "age_s": round(rng.uniform(0, 200_000), 3),
                "query": HUGE_QUERY if i == 17 else rng.choice(QUERIES),
                "server": "127.0.0.1:5432",
                "watchdog_host": "wd-1",
                "sweep": f"sweep-{i // 10}",
            }
        )
    return records


def write_log(path: Path, records: list[Record]) -> None:
    with path.open("w", encoding="utf-8") as f:
        for i, rec in enumerate(records):
            # Both encodings a writer may use: \u escapes, and raw UTF-8 (a lone
            # surrogate only survives as an escape).
            lone = "\ud800" in str(rec.get("application_name"))
            f.write(json.dumps(rec, ensure_ascii=lone or i % 2 == 0) + "\n")


@pytest.fixture(scope="module")
def records() -> list[Record]:
    return make_records(COUNT)


@pytest.fixture(scope="module")
def log(tmp_path_factory: pytest.TempPathFactory, records: list[Record]) -> Path:
    path = tmp_path_factory.mktemp("audit") / "audit.jsonl"
    write_log(path, records)
    return path


@pytest.fixture(autouse=True)
def fixed_clock(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(audit_command, "_now", lambda: NOW)


def audit(
    capsys: pytest.CaptureFixture[str],
    *argv: str,
    from_config: Callable[[str | None], Path] | None = None,
) -> tuple[int, str, str]:
    parser = argparse.ArgumentParser(prog="pg-watchdog audit")
    parser.add_argument("-c", "--config")
    configure_parser(parser)
    args = parser.parse_args(list(argv))

    def no_config(config: str | None) -> Path:
        raise AssertionError("config consulted although --file was given")

    code = run(args, from_config or no_config)
    out, err = capsys.readouterr()
    return code, out, err


def json_lines(out: str) -> list[Record]:
    return [json.loads(line) for line in out.splitlines()]


FILTERS: list[tuple[list[str], Callable[[Record], bool]]] = [
    (["--target", "main"], lambda r: r["target"] == "main"),
    (["--target", "main", "--target", "eu-west"], lambda r: r["target"] in ("main", "eu-west")),
    (["--policy", "idle"], lambda r: r["policy"] == "idle"),
    (["--user", "u" * 64], lambda r: r["usename"] == "u" * 64),
    (["--user", "ユーザー", "--user", "o'brien\"x"], lambda r: r["usename"] in USERS[4:]),
    (["--app", "web-*"], lambda r: r["application_name"] in ("web-1", "web-2")),
    (["--app", "*nightly", "--app", "psql"], lambda r: r["application_name"] in APPS[2:5:2]),
    (["--app", HOSTILE_APP], lambda r: r["application_name"] == HOSTILE_APP),
    (["--app", ""], lambda r: r["application_name"] == ""),
    (["--db", "db with space"], lambda r: r["datname"] == "db with space"),
    (["--outcome", "failed", "--outcome", "gone"], lambda r: r["outcome"] in ("failed", "gone")),
    (
        ["--target", "main", "--policy", "idle", "--outcome", "terminated", "--user", "app"],
        lambda r: (
            (r["target"], r["policy"], r["outcome"], r["usename"])
            == ("main", "idle", "terminated", "app")
        ),
    ),
    (["--target", "nowhere"], lambda r: False),
]


@pytest.mark.parametrize(("argv", "keep"), FILTERS, ids=[" ".join(a)[:40] for a, _ in FILTERS])
def test_filters_select_exactly_the_matching_records(
    capsys: pytest.CaptureFixture[str],
    log: Path,
    records: list[Record],
    argv: list[str],
    keep: Callable[[Record], bool],
) -> None:
    code, out, err = audit(capsys, "--file", str(log), "--json", *argv)
    expected = [r for r in records if keep(r)]
    assert code == 0
    assert err == ""
    assert json_lines(out) == expected
    if "nowhere" not in argv:
        assert 0 < len(expected) < COUNT


def test_json_output_is_every_record_unchanged_one_per_line(
    capsys: pytest.CaptureFixture[str], log: Path, records: list[Record]
) -> None:
    code, out, err = audit(capsys, "--file", str(log), "--json")
    assert (code, err) == (0, "")
    assert out.count("\n") == COUNT
    assert json_lines(out) == records
    for escape in ("\x1b", "\r", "\x9b", "\u202e"):
        assert escape not in out
    assert "ユーザー" in out  # ensure_ascii=False: readable, not \u escapes


WINDOWS: list[tuple[list[str], datetime | None, datetime | None]] = [
    (["--since", "1h"], NOW - timedelta(hours=1), None),
    (["--since", "1h30m"], NOW - timedelta(minutes=90), None),
    (["--since", "2d"], NOW - timedelta(days=2), None),
    (["--since", "2d", "--until", "1d"], NOW - timedelta(days=2), NOW - timedelta(days=1)),
    (["--until", "36h"], None, NOW - timedelta(hours=36)),
    (["--since", "2026-11-24T06:00:00"], datetime(2026, 11, 24, 6, tzinfo=UTC), None),
    (
        ["--since", "2026-11-23T00:00:00Z", "--until", "2026-11-24T14:30:00+02:00"],
        datetime(2026, 11, 23, tzinfo=UTC),
        datetime(2026, 11, 24, 12, 30, tzinfo=UTC),
    ),
    (["--since", "2026-11-24"], datetime(2026, 11, 24, tzinfo=UTC), None),
]


@pytest.mark.parametrize(
    ("argv", "since", "until"), WINDOWS, ids=[" ".join(a) for a, *_ in WINDOWS]
)
def test_time_windows_include_since_and_exclude_until(
    capsys: pytest.CaptureFixture[str],
    log: Path,
    records: list[Record],
    argv: list[str],
    since: datetime | None,
    until: datetime | None,
) -> None:
    code, out, _ = audit(capsys, "--file", str(log), "--json", *argv)
    expected = [
        r
        for r in records
        if (since is None or ts_of(r) >= since) and (until is None or ts_of(r) < until)
    ]
    assert code == 0
    assert json_lines(out) == expected
    assert 0 < len(expected) < COUNT


def test_record_exactly_at_since_is_included(
    capsys: pytest.CaptureFixture[str], log: Path, records: list[Record]
) -> None:
    boundary = iso(NOW - timedelta(hours=1))
    assert sum(r["ts"] == boundary for r in records) == 1
    _, out, _ = audit(capsys, "--file", str(log), "--json", "--since", "1h")
    assert json_lines(out)[0]["ts"] == boundary
    _, out, _ = audit(capsys, "--file", str(log), "--json", "--until", "1h")
    assert json_lines(out)[-1]["ts"] < boundary


def expected_summary(selected: list[Record]) -> dict[str, Any]:
    return {
        "total": len(selected),  # every generated record is a session of its own
        "records": len(selected),
        "by_policy": Counter(r["policy"] for r in selected),
        "by_user": Counter(r["usename"] for r in selected),
        "by_application": Counter(r["application_name"] for r in selected),
        "by_outcome": Counter(r["outcome"] for r in selected),
        "by_client": Counter(r["client_addr"] or "" for r in selected),
        "by_statement": Counter(shape(r.get("query")) or "" for r in selected),
    }


@pytest.mark.parametrize("argv", [[], ["--target", "main", "--since", "2d"], ["--app", "web-*"]])
def test_summary_json_counts_match(
    capsys: pytest.CaptureFixture[str], log: Path, records: list[Record], argv: list[str]
) -> None:
    code, out, _ = audit(capsys, "--file", str(log), "--summary", "--json", *argv)
    assert code == 0
    assert out.count("\n") == 1
    got = json.loads(out)
    keep = {tuple(a): k for a, k in FILTERS}.get(tuple(argv))
    if argv and argv[0] == "--target":
        since = NOW - timedelta(days=2)
        selected = [r for r in records if r["target"] == "main" and ts_of(r) >= since]
    else:
        selected = [r for r in records if keep is None or keep(r)]
    assert got == expected_summary(selected)
    counts = list(got["by_outcome"].values())
    assert counts == sorted(counts, reverse=True)


def test_summary_text_shows_total_and_counts(
    capsys: pytest.CaptureFixture[str], log: Path, records: list[Record]
) -> None:
    code, out, _ = audit(capsys, "--file", str(log), "--summary", "--policy", "idle")
    selected = [r for r in records if r["policy"] == "idle"]
    sections: dict[str, dict[str, int]] = {}
    lines = out.splitlines()
    assert lines[0].split()[:2] == ["total", str(len(selected))]
    assert f"from {len(selected)} records" in lines[0]
    for line in lines[1:]:
        if line.startswith("by "):
            current = sections.setdefault(line[3:], {})
        elif line:
            count, name = line.split(maxsplit=1)
            current[name] = int(count)
    assert code == 0
    assert sections["policy"] == {"idle": len(selected)}
    assert sections["outcome"] == Counter(r["outcome"] for r in selected)
    assert sections["user"]["u" * 64] == sum(r["usename"] == "u" * 64 for r in selected)
    assert sections["application"]["(empty)"] == sum(r["application_name"] == "" for r in selected)
    hostile = sum(r["application_name"] == HOSTILE_APP for r in selected)
    assert sections["application"][HOSTILE_SHOWN] == hostile > 0
    assert not any(escape in out for escape in ESCAPES)


def display_width(text: str) -> int:
    return sum(
        0 if unicodedata.combining(c) else 2 if unicodedata.east_asian_width(c) in "WF" else 1
        for c in text
    )


def at(line: str, column: int) -> str:
    """The rest of `line` from terminal column `column` on."""
    width = 0
    for i, char in enumerate(line):
        if width == column:
            return line[i:]
        width += display_width(char)
    raise AssertionError(f"no character starts at column {column}: {line!r}")


def test_table_rows_stay_aligned_and_escape_hostile_values(
    capsys: pytest.CaptureFixture[str], log: Path, records: list[Record]
) -> None:
    code, out, err = audit(capsys, "--file", str(log))
    assert (code, err) == (0, "")
    lines = out.splitlines()
    assert out.count("\n") == len(lines) == COUNT + 1  # no value smuggled in a line break
    header = lines[0]
    assert header.split() == [
        "TIME", "TARGET", "POLICY", "OUTCOME", "PID", "USER", "APP", "DB", "CLIENT", "AGE"
    ]  # fmt: skip
    for line in lines:
        assert display_width(line) == len(header), line
        assert not any(escape in line for escape in ESCAPES), line
    assert "HUGEQUERY" not in out and "SELECT" not in out

    start = {title: header.index(title) for title in ("TARGET", "OUTCOME", "USER", "APP", "DB")}
    app_width = start["DB"] - start["APP"] - 2
    user_width = start["APP"] - start["USER"] - 2
    assert app_width == 32  # the cap: the hostile value is longer
    shown = 0
    for rec, line in zip(records, lines[1:], strict=True):
        assert line.startswith(rec["ts"][:19] + "Z  ")
        assert at(line, start["TARGET"]).startswith(rec["target"] + " ")
        assert at(line, start["OUTCOME"]).startswith(rec["outcome"] + " ")
        assert f" {rec['pid']}  " in line
        assert line.endswith(" " + human_age(rec["age_s"]))
        user = rec["usename"]
        if user == "u" * 64:
            assert at(line, start["USER"]).startswith("u" * (user_width - 1) + "…  ")
        if user in ("app", "ユーザー"):
            assert at(line, start["USER"]).startswith(user + " ")
        if rec["application_name"] == HOSTILE_APP:
            # Cut whole escapes only: "\x07" never becomes a dangling "\x".
            cell = r"evil\n\x1b[31mred\x1b]0;pwned…".ljust(app_width)
            assert at(line, start["APP"]).startswith(cell + "  ")
            shown += 1
        if rec["application_name"] == "\ud800x":
            assert at(line, start["APP"]).startswith(r"\ud800x ")
        if rec["client_addr"] is None:
            assert " [local] " in line
    assert shown == sum(r["application_name"] == HOSTILE_APP for r in records) > 0


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(0.4, "0s"), (59.9, "59s"), (303, "5m03s"), (3725, "1h02m"), (97200, "1d03h"), (None, "")],
)
def test_human_age(seconds: float | None, text: str) -> None:
    assert human_age(seconds) == text


def test_torn_and_garbage_lines_are_skipped_and_reported_once(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, records: list[Record]
) -> None:
    path = tmp_path / "audit.jsonl"
    write_log(path, records[:10])
    with path.open("ab") as f:
        f.write(b"not json\n[1, 2]\n\xff\xfe garbage\n\x00\x00\x00\n\n")
        f.write(json.dumps(records[10]).encode() + b"\n")
        whole = json.dumps(records[11]).encode()
        f.write(whole[: len(whole) // 2])  # crash mid-write: half an object, no newline
    code, out, err = audit(capsys, "--file", str(path), "--json")
    assert code == 0
    assert json_lines(out) == records[:11]
    assert err == f"pg-watchdog: skipped 5 unreadable lines in {path}\n"


def test_record_appended_to_a_torn_line_is_salvaged(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, records: list[Record]
) -> None:
    path = tmp_path / "audit.jsonl"
    torn = json.dumps(records[1])[:50]
    path.write_text(json.dumps(records[0]) + "\n" + torn + json.dumps(records[2]) + "\n")
    code, out, err = audit(capsys, "--file", str(path), "--json")
    assert code == 0
    assert json_lines(out) == [records[0], records[2]]
    assert err == f"pg-watchdog: skipped 1 unreadable lines in {path}\n"


def rotated_logs(tmp_path: Path, records: list[Record]) -> Path:
    path = tmp_path / "audit.jsonl"
    with gzip.open(tmp_path / "audit.jsonl.2.gz", "wt", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in records[:100])
    write_log(tmp_path / "audit.jsonl.1", records[100:250])
    write_log(path, records[250:300])
    (tmp_path / "audit.jsonl.old").write_text("ignored\n")
    (tmp_path / "other.jsonl.3").write_text("ignored\n")
    return path


def test_rotated_files_are_read_oldest_first(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, records: list[Record]
) -> None:
    path = rotated_logs(tmp_path, records)
    code, out, err = audit(capsys, "--file", str(path), "--json")
    assert (code, err) == (0, "")
    assert json_lines(out) == records[:300]
    assert list(iter_records(path)) == records[:300]
    code, out, _ = audit(capsys, "--file", str(path), "--summary", "--json", "--policy", "idle")
    assert json.loads(out)["total"] == sum(r["policy"] == "idle" for r in records[:300])


def test_rotated_file_older_than_since_is_not_opened(tmp_path: Path, records: list[Record]) -> None:
    path = rotated_logs(tmp_path, records)
    since = NOW - timedelta(days=1)
    old = (since - timedelta(seconds=1)).timestamp()
    os.utime(tmp_path / "audit.jsonl.2.gz", (old, old))
    # Only the file's mtime decides: its (older) records are not even parsed.
    assert list(iter_records(path, since)) == records[100:300]
    assert list(iter_records(path, since - timedelta(seconds=2))) == records[:300]


def test_dateext_rotation_and_a_corrupt_rotated_file(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, records: list[Record]
) -> None:
    path = tmp_path / "audit.jsonl"
    with gzip.open(tmp_path / "audit.jsonl-20261101.gz", "wt") as f:
        f.writelines(json.dumps(r) + "\n" for r in records[:5])
    write_log(tmp_path / "audit.jsonl-20261102", records[5:8])
    (tmp_path / "audit.jsonl.1.gz").write_bytes(b"this is not gzip")
    write_log(path, records[8:10])
    code, out, err = audit(capsys, "--file", str(path), "--json")
    assert code == 0
    assert json_lines(out) == records[:10]
    assert err.count("\n") == 1
    assert err.startswith(f"pg-watchdog: cannot read rotated audit log {tmp_path}/audit.jsonl.1.gz")


def test_missing_current_file_still_reads_rotated_ones(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, records: list[Record]
) -> None:
    write_log(tmp_path / "audit.jsonl.1", records[:3])
    code, out, _ = audit(capsys, "--file", str(tmp_path / "audit.jsonl"), "--json")
    assert code == 0
    assert json_lines(out) == records[:3]


@pytest.mark.parametrize("name", ["missing.jsonl", "no/such/dir/audit.jsonl", "."])
def test_unreadable_log_exits_1_with_one_line(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, name: str
) -> None:
    path = tmp_path / name
    code, out, err = audit(capsys, "--file", str(path))
    assert code == 1
    assert out == ""
    assert err.count("\n") == 1
    assert err.startswith(f"pg-watchdog: cannot read audit log {path}: ")
    assert "Traceback" not in err


def test_path_comes_from_the_config_without_file(
    capsys: pytest.CaptureFixture[str], log: Path, records: list[Record]
) -> None:
    seen: list[str | None] = []

    def from_config(config: str | None) -> Path:
        seen.append(config)
        return log

    code, out, _ = audit(capsys, "-c", "/etc/x.yaml", "--json", from_config=from_config)
    assert (code, seen) == (0, ["/etc/x.yaml"])
    assert len(json_lines(out)) == COUNT


@pytest.mark.parametrize(
    "argv",
    [
        ["--since", "10 minutes"],
        ["--since", "yesterday"],
        ["--until", "1x"],
        ["--since", "99999999999d"],
        ["--since", "1h", "--until", "2h"],
    ],
)
def test_bad_time_arguments_exit_2_with_one_line(
    capsys: pytest.CaptureFixture[str], log: Path, argv: list[str]
) -> None:
    code, out, err = audit(capsys, "--file", str(log), *argv)
    assert code == 2
    assert out == ""
    assert err.count("\n") == 1
    assert err.startswith(f"pg-watchdog: {argv[-2] if len(argv) == 2 else '--since'}")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("30s", NOW - timedelta(seconds=30)),
        ("10m", NOW - timedelta(minutes=10)),
        ("1h30m", NOW - timedelta(minutes=90)),
        ("2d", NOW - timedelta(days=2)),
        ("1d2h3m4s", NOW - timedelta(days=1, hours=2, minutes=3, seconds=4)),
        ("500ms", NOW - timedelta(milliseconds=500)),
        (" now ", NOW),
        ("2026-11-25T12:34:56.789Z", datetime(2026, 11, 25, 12, 34, 56, 789000, tzinfo=UTC)),
        ("2026-11-25 08:00", datetime(2026, 11, 25, 8, tzinfo=UTC)),
        ("2026-11-25T08:00:00-05:00", datetime(2026, 11, 25, 13, tzinfo=UTC)),
    ],
)
def test_parse_when(text: str, expected: datetime) -> None:
    got = parse_when(text, NOW)
    assert got == expected
    assert got.utcoffset() == timedelta(0)


@pytest.mark.parametrize("text", ["", "h", "10 minutes", "1h1h", "30m1h", "-5m", "2026-13-01"])
def test_parse_when_rejects_nonsense(text: str) -> None:
    with pytest.raises(ValueError, match="neither a duration"):
        parse_when(text, NOW)
