"""Merge the local run store's units with a published leaderboard's evidence.

- A published row (label) the local store does not hold stays, with all its seeds.
- A local row whose units are all identical to published ones (the publisher's own runs) is
  the published row: nothing to decide.
- A local row that differs from the published row of the same label replaces it (every seed
  of it) only when the user names it (`--replace LABEL[,LABEL]`) or passes `--replace-all`;
  otherwise a PublishConflict, raised before anything is written.
- Local runs on another split or candidate set than the published evidence are refused, with
  both fingerprints in the message.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from benchmark.errors import ConfigError, PublishConflict
from benchmark.evidence import Evidence, Unit, unit_candidate_fingerprint


@dataclass
class Merged:
    units: list[Unit]
    replaced: list[str]  # published labels replaced by local rows
    kept: list[str]  # published labels the local store does not hold


def check_split_fingerprint(fingerprint: str, evidence: Evidence) -> None:
    published = evidence.index["split_fingerprint"]
    if fingerprint != published:
        raise PublishConflict(
            f"local runs are on split fingerprint {fingerprint} but {evidence.folder}/ was published on split "
            f"fingerprint {published}: another dataset version, k-core or preprocessing; rerun on the published split, "
            f"or start a new leaderboard (remove {evidence.folder}/ deliberately); nothing was written"
        )


def check_fingerprints(local: list[Unit], evidence: Evidence, cache_dir: Path) -> str:
    """The local units' candidate fingerprint, after checking split and candidates against the evidence."""
    where = evidence.folder
    for fp in sorted({u.config["split_fingerprint"] for u in local}):
        check_split_fingerprint(fp, evidence)
    published_cands = evidence.index["candidate_fingerprint"]
    fps = {unit_candidate_fingerprint(u, cache_dir) for u in local}
    for fp in sorted(fps):
        if fp != published_cands:
            raise PublishConflict(
                f"local runs use candidates {local[0].config.get('candidates')!r} with candidate fingerprint {fp} but "
                f"{where}/ was published with candidates {evidence.index.get('candidates')!r}, candidate fingerprint "
                f"{published_cands}; rerun on the published candidate set; nothing was written"
            )
    return published_cands


def parse_replace(text: str | None) -> list[str]:
    """`--replace a,b` -> ["a", "b"]."""
    return [s.strip() for s in (text or "").split(",") if s.strip()]


def merge_units(local: list[Unit], evidence: Evidence | None, replace=(), replace_all: bool = False) -> Merged:
    """Published rows plus local ones; a differing local row replaces a published one only on request."""
    published = evidence.units if evidence is not None else []
    local_labels = sorted({u.label for u in local})
    published_labels = sorted({u.label for u in published})
    unknown = sorted(set(replace) - set(local_labels) - set(published_labels))
    if unknown:
        raise ConfigError(
            f"--replace {','.join(unknown)}: no such row, locally or published (local: {', '.join(local_labels) or 'none'}; "
            f"published: {', '.join(published_labels) or 'none'})"
        )
    units = [u for u in published if u.label not in local_labels]
    replaced, conflicts = [], []
    for label in local_labels:
        mine = [u for u in local if u.label == label]
        theirs = [u for u in published if u.label == label]
        if not theirs:
            units += mine
        elif all(any(m.same_as(t) for t in theirs) for m in mine):
            units += theirs  # the published row, every seed of it
        elif replace_all or label in replace:
            units += mine
            replaced.append(label)
        else:
            conflicts.append((label, mine[0]))
    if conflicts:
        label, unit = conflicts[0]
        names = ",".join(lab for lab, _ in conflicts)
        raise PublishConflict(
            f"local row {label!r} ({unit.folder}) differs from the published row {label!r} in {evidence.folder}/"
            + (f" (and {len(conflicts) - 1} more: {names})" if len(conflicts) > 1 else "")
            + f"; pass --replace {names} to publish yours in its place (or --replace-all), or run yours under "
            "another label (--methods NEWLABEL=METHOD); nothing was written"
        )
    kept = sorted({u.label for u in published if u.label not in local_labels})
    return Merged(sorted(units, key=lambda u: (u.label, u.seed)), replaced, kept)
