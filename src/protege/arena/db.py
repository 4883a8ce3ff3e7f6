"""The arena's SQLite store: raters, battles (a prompt and two anonymous answers, sides recorded), votes.

WAL mode, so readers (stats, export) never block the page's writes; `PRAGMA user_version` holds the
schema version and `MIGRATIONS[v]` upgrades v -> v+1, so an old database opens with new code. A vote
carries an id the browser made: a retried POST inserts nothing the second time, and a battle takes
one vote (its rater's) only.
"""

from __future__ import annotations

import sqlite3
import threading
import time
import uuid
from pathlib import Path
from typing import Any

__all__ = ["ArenaDB", "MIGRATIONS", "WINNERS", "VoteError"]

WINNERS = ("left", "right", "tie", "bad")

MIGRATIONS = [
    # 0 -> 1
    """
    CREATE TABLE raters (id TEXT PRIMARY KEY, created REAL NOT NULL);
    CREATE TABLE battles (
        id TEXT PRIMARY KEY, rater_id TEXT NOT NULL REFERENCES raters(id), prompt_id TEXT NOT NULL,
        category TEXT NOT NULL DEFAULT '', model_left TEXT NOT NULL, model_right TEXT NOT NULL,
        created REAL NOT NULL);
    CREATE INDEX battles_rater ON battles(rater_id);
    CREATE TABLE votes (
        id TEXT PRIMARY KEY, battle_id TEXT NOT NULL UNIQUE REFERENCES battles(id),
        rater_id TEXT NOT NULL REFERENCES raters(id), winner TEXT NOT NULL CHECK (winner IN ('left','right','tie','bad')),
        comment TEXT NOT NULL DEFAULT '', created REAL NOT NULL);
    """,
    # 1 -> 2: the secret that signs rater cookies (a rater row is written on the first vote, not per page view)
    """
    CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
    """,
]


class VoteError(ValueError):
    """A vote that cannot be stored; `status` is the HTTP status to answer with."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


class ArenaDB:
    """One connection per thread (sqlite3 objects are not shared across threads)."""

    def __init__(self, path: str | Path, readonly: bool = False):
        self.path = Path(path)
        self.readonly = readonly
        self._local = threading.local()
        if readonly:
            self._check_existing()
        else:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._migrate()

    @classmethod
    def existing(cls, path: str | Path) -> "ArenaDB":
        """A votes database that must already exist, opened read-only (`stats`, `export`, the report)."""
        return cls(path, readonly=True)

    @staticmethod
    def schema_of(path: str | Path) -> tuple[int, str | None]:
        """(schema version, why it is not an arena database or None), read without writing anything."""
        try:
            con = sqlite3.connect(f"{Path(path).resolve().as_uri()}?mode=ro", uri=True)
            try:
                version = con.execute("PRAGMA user_version").fetchone()[0]
                tables = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
            finally:
                con.close()
        except sqlite3.DatabaseError as err:
            return 0, str(err)
        if version == 0 or not {"votes", "battles"} <= tables:
            return version, "no votes schema"
        return version, None

    def _check_existing(self) -> None:
        from ..errors import StageError

        if not self.path.is_file():
            raise StageError(f"{self.path}: no such arena database")
        version, problem = self.schema_of(self.path)
        if problem is not None:
            raise StageError(f"{self.path}: not an arena database ({problem}); "
                             "`protege arena ANSWERS... --db FILE` creates one")
        if version > len(MIGRATIONS):
            raise StageError(f"{self.path}: schema version {version} is newer than this protege knows "
                             f"({len(MIGRATIONS)}); upgrade protege")

    def conn(self) -> sqlite3.Connection:
        con = getattr(self._local, "con", None)
        if con is None and self.readonly:  # reading never creates, migrates or converts the file
            con = sqlite3.connect(f"{self.path.resolve().as_uri()}?mode=ro", uri=True, timeout=30,
                                  isolation_level=None)
            con.row_factory = sqlite3.Row
            self._local.con = con
        if con is None:
            con = sqlite3.connect(self.path, timeout=30, isolation_level=None)
            con.execute("PRAGMA journal_mode=WAL")
            con.execute("PRAGMA synchronous=NORMAL")  # WAL + NORMAL: a committed vote survives a process kill
            con.execute("PRAGMA foreign_keys=ON")
            con.row_factory = sqlite3.Row
            self._local.con = con
        return con

    def _migrate(self) -> None:
        con = self.conn()
        version = con.execute("PRAGMA user_version").fetchone()[0]
        if version > len(MIGRATIONS):
            raise RuntimeError(f"{self.path}: schema version {version} is newer than this protege knows "
                               f"({len(MIGRATIONS)}); upgrade protege")
        for v in range(version, len(MIGRATIONS)):
            con.execute("BEGIN IMMEDIATE")
            for statement in _statements(MIGRATIONS[v]):  # executescript would commit mid-transaction
                con.execute(statement)
            con.execute(f"PRAGMA user_version = {v + 1}")
            con.execute("COMMIT")

    # ---- raters and battles ----------------------------------------------------------------------

    def new_rater(self) -> str:
        rid = uuid.uuid4().hex
        self.conn().execute("INSERT INTO raters VALUES (?, ?)", (rid, time.time()))
        return rid

    def ensure_rater(self, rater_id: str) -> None:
        """The rater's row, written when it first acts (`new_rater` writes one at once)."""
        self.conn().execute("INSERT OR IGNORE INTO raters VALUES (?, ?)", (rater_id, time.time()))

    def secret(self) -> bytes:
        """This database's key for signing rater cookies: made once, kept with the votes (a restart keeps raters)."""
        import secrets

        con = self.conn()
        con.execute("INSERT OR IGNORE INTO meta VALUES ('rater_secret', ?)", (secrets.token_hex(32),))
        return bytes.fromhex(con.execute("SELECT value FROM meta WHERE key = 'rater_secret'").fetchone()[0])

    def has_rater(self, rater_id: str) -> bool:
        return self.conn().execute("SELECT 1 FROM raters WHERE id = ?", (rater_id,)).fetchone() is not None

    def open_battle(self, rater_id: str) -> dict[str, Any] | None:
        """The rater's newest battle that has no vote yet (shown again instead of drawing a new one)."""
        row = self.conn().execute(
            "SELECT b.id, b.prompt_id, b.model_left, b.model_right FROM battles b LEFT JOIN votes v "
            "ON v.battle_id = b.id WHERE b.rater_id = ? AND v.id IS NULL ORDER BY b.created DESC LIMIT 1",
            (rater_id,)).fetchone()
        return dict(row) if row is not None else None

    def add_battle(self, rater_id: str, prompt_id: str, category: str, left: str, right: str) -> str:
        bid = uuid.uuid4().hex
        self.conn().execute("INSERT INTO battles VALUES (?, ?, ?, ?, ?, ?, ?)",
                            (bid, rater_id, prompt_id, category, left, right, time.time()))
        return bid

    def seen(self, rater_id: str) -> set[tuple[str, str, str]]:
        """(prompt, model, model) triples this rater was already shown (models sorted)."""
        rows = self.conn().execute("SELECT prompt_id, model_left, model_right FROM battles WHERE rater_id = ?",
                                   (rater_id,))
        return {(r[0], *sorted((r[1], r[2]))) for r in rows}

    def battle_counts(self) -> dict[tuple[str, str, str], int]:
        rows = self.conn().execute("SELECT prompt_id, model_left, model_right, count(*) FROM battles "
                                   "GROUP BY prompt_id, model_left, model_right")
        out: dict[tuple[str, str, str], int] = {}
        for p, a, b, c in rows:
            key = (p, *sorted((a, b)))
            out[key] = out.get(key, 0) + c
        return out

    # ---- votes -----------------------------------------------------------------------------------

    def vote(self, vote_id: str, battle_id: str, rater_id: str, winner: str, comment: str = "") -> dict[str, Any]:
        """Store a vote; the same vote id again returns the stored vote (a retry), anything else is a VoteError."""
        if winner not in WINNERS:
            raise VoteError(400, f"winner is {winner!r}; expected one of {', '.join(WINNERS)}")
        con = self.conn()
        con.execute("BEGIN IMMEDIATE")
        try:
            battle = con.execute("SELECT * FROM battles WHERE id = ?", (battle_id,)).fetchone()
            if battle is None:
                raise VoteError(404, f"no battle {battle_id!r}")
            if battle["rater_id"] != rater_id:
                raise VoteError(403, "this battle was shown to another rater")
            same = con.execute("SELECT * FROM votes WHERE id = ?", (vote_id,)).fetchone()
            if same is not None:
                if same["battle_id"] != battle_id or same["winner"] != winner:
                    raise VoteError(409, f"vote id {vote_id!r} was already used for a different vote")
                con.execute("COMMIT")
                return {"battle": dict(battle), "duplicate": True}
            if con.execute("SELECT 1 FROM votes WHERE battle_id = ?", (battle_id,)).fetchone():
                raise VoteError(409, "this battle already has a vote")
            con.execute("INSERT INTO votes VALUES (?, ?, ?, ?, ?, ?)",
                        (vote_id, battle_id, rater_id, winner, comment[:2000], time.time()))
            con.execute("COMMIT")
            return {"battle": dict(battle), "duplicate": False}
        except BaseException:
            con.execute("ROLLBACK")
            raise

    def votes(self) -> list[dict[str, Any]]:
        rows = self.conn().execute(
            "SELECT v.id, v.battle_id, v.rater_id, v.winner, v.comment, v.created, b.prompt_id, b.category, "
            "b.model_left, b.model_right FROM votes v JOIN battles b ON b.id = v.battle_id ORDER BY v.created, v.id")
        return [dict(r) for r in rows]


def _statements(script: str) -> list[str]:
    return [s.strip() for s in script.split(";") if s.strip()]
