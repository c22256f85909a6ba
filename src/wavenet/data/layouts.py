"""Corpus layouts: which files of a folder are the corpus, and who speaks in each.

A layout turns a root folder into a list of `Source`s. `folder` takes every audio file of any tree;
`vctk` and `ljspeech` know the published layouts of those corpora and take the speaker from where the
corpus keeps it. Speakers are recorded in the prepared manifest for speaker conditioning.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from wavenet.errors import UserError

# LJSpeech has one reader; the corpus names her only in its README.
LJSPEECH_SPEAKER = "LJ"


@dataclass(frozen=True)
class Source:
    """One audio file of a corpus, before preparation."""

    relative: str  # path under the corpus root, with "/" separators: the file's name in the manifest
    speaker: str | None
    # Why it is left out before preparation: listed by the corpus (LJSpeech's metadata.csv) but missing or listed
    # again, a second path to a file already listed, a folder that cannot be listed. None: a file to prepare.
    problem: str | None = None


def folder_sources(root: Path, extensions: Sequence[str]) -> list[Source]:
    """Every file under `root` with one of `extensions`, recursively; no speakers.

    A second path to the same file, a link to nothing and a folder that cannot be listed are sources with a
    problem, so that the warning of left-out files names them.
    """
    from wavenet.data.audio import scan_audio_files  # with torch: train.py checks a root before loading it

    found = scan_audio_files(root, extensions)
    if not found.paths and not found.broken:
        unlisted = found.unreadable_folders
        note = f"; {len(unlisted)} folder(s) in it cannot be listed ({unlisted[0][1]})" if unlisted else ""
        raise UserError(f"no audio files ({', '.join(extensions)}) found under data root {root}{note}")

    def relative(path: Path) -> str:
        return path.relative_to(root).as_posix()

    sources = [Source(relative(path), None) for path in found.paths]
    sources += [Source(relative(path), None, f"same file as {relative(first)}") for path, first in found.duplicates]
    sources += [Source(relative(path), None, reason) for path, reason in found.broken]
    sources += [
        Source(f"{relative(folder)}/", None, f"folder cannot be listed ({reason})")
        for folder, reason in found.unreadable_folders
    ]
    return sorted(sources, key=lambda source: source.relative)


def vctk_sources(root: Path, extensions: Sequence[str]) -> list[Source]:
    """VCTK: `wav48_silence_trimmed/<speaker>/*_mic1.flac` (release 0.92) or `wav48/<speaker>/*.wav` (0.80).

    The speaker is the folder a file sits in (`p225`, ...). Release 0.92 has two microphones per
    utterance; mic1 is the one the 0.80 recordings were made with, and taking both would count every
    utterance twice. `extensions` is not used: the release fixes the format. As in `folder_sources`, a
    second path to a recording, a link to nothing and a speaker folder that cannot be listed are sources with a
    problem.
    """
    if (root / "wav48_silence_trimmed").is_dir():
        folder, pattern = root / "wav48_silence_trimmed", "*_mic1.flac"
    elif (root / "wav48").is_dir():
        folder, pattern = root / "wav48", "*.wav"
    else:
        raise UserError(
            f"data root {root} is not a VCTK corpus: it has neither wav48_silence_trimmed/ (VCTK 0.92) "
            "nor wav48/ (VCTK 0.80); point data.root at the folder holding one of them"
        )
    from wavenet.data.audio import scan_audio_files

    # Scanned as the folder layout scans a tree, so hidden files, second paths to a file and speaker folders
    # that cannot be listed are treated alike (a glob passes over the last silently).
    found = scan_audio_files(folder, [pattern.rsplit(".", 1)[1]])
    unlisted = [(speaker, reason) for speaker, reason in found.unreadable_folders if speaker.parent == folder]

    def recording(path: Path) -> bool:
        return path.parent.parent == folder and fnmatch.fnmatchcase(path.name, pattern)

    def relative(path: Path) -> str:
        return path.relative_to(root).as_posix()

    # Every path, with the first path the scan found its file by. Of the paths to one file the first recording is
    # taken: the scan's first may be no recording (another microphone, a copy in a subfolder).
    scan_first = {path: path for path in found.paths} | dict(found.duplicates)
    taken: dict[Path, Path] = {}
    sources = []
    for path in sorted(filter(recording, scan_first)):
        first = taken.setdefault(scan_first[path], path)
        problem = None if first == path else f"same file as {relative(first)}"
        sources.append(Source(relative(path), path.parent.name, problem))
    sources += [Source(relative(path), path.parent.name, reason) for path, reason in found.broken if recording(path)]
    if not sources:
        note = f"; {len(unlisted)} speaker folder(s) cannot be listed ({unlisted[0][1]})" if unlisted else ""
        raise UserError(f"no VCTK recordings ({folder.name}/<speaker>/{pattern}) found under data root {root}{note}")
    sources += [Source(f"{relative(path)}/", None, f"folder cannot be listed ({reason})") for path, reason in unlisted]
    return sorted(sources, key=lambda source: source.relative)


def ljspeech_sources(root: Path, extensions: Sequence[str]) -> list[Source]:
    """LJSpeech: the clips `metadata.csv` lists (`<id>|text|normalized text`), read from `wavs/<id>.wav`.

    Clips listed but absent, and rows repeating a clip, are returned with a problem, so preparation reports
    them with the other files it skips. `extensions` is not used: the release fixes the format.
    """
    metadata = root / "metadata.csv"
    if not metadata.is_file():
        raise UserError(f"data root {root} is not an LJSpeech corpus: it has no metadata.csv")
    # The transcripts contain quotes, so the file is split by hand rather than parsed as CSV. Only the ids
    # are needed: a byte-order mark (as editors save it) is not part of the first, and a transcript in
    # another encoding does not matter.
    try:
        text = metadata.read_text(encoding="utf-8-sig", errors="replace")
    except OSError as error:
        raise UserError(f"cannot read {metadata}: {error.strerror or error}") from error
    rows = [(number, line.split("|", 1)[0].strip()) for number, line in enumerate(text.splitlines(), 1)]
    rows = [(number, clip) for number, clip in rows if clip]
    if not rows:
        raise UserError(f"{metadata} lists no clips")
    first_row: dict[str, int] = {}
    sources = []
    for number, clip in rows:
        # A clip listed twice would be trained on twice, weighing it double, as a second path to a file would.
        if clip in first_row:
            problem = f"listed again on line {number} of metadata.csv (taken once, from line {first_row[clip]})"
        elif (root / "wavs" / f"{clip}.wav").is_file():
            problem = None
        else:
            problem = "listed by the corpus but missing"
        first_row.setdefault(clip, number)
        sources.append(Source(f"wavs/{clip}.wav", LJSPEECH_SPEAKER, problem))
    return sources


LAYOUTS: dict[str, Callable[[Path, Sequence[str]], list[Source]]] = {
    "folder": folder_sources,
    "vctk": vctk_sources,
    "ljspeech": ljspeech_sources,
}


def list_sources(root: str | Path, layout: str, extensions: Sequence[str]) -> list[Source]:
    """The files of the corpus under `root` as `layout` describes it, in a fixed order.

    Raises:
        UserError: If the layout is unknown, `root` is not a folder, or it holds no corpus of that layout.
    """
    if layout not in LAYOUTS:
        raise UserError(f"data.layout must be one of {', '.join(LAYOUTS)}, got {layout!r}")
    root = Path(root)
    check_root(root)
    return LAYOUTS[layout](root, extensions)


def check_root(root: Path) -> None:
    """Raises `UserError` unless the corpus folder `root` exists and is a folder."""
    if not root.exists():
        raise UserError(f"data root {root} does not exist")
    if not root.is_dir():
        raise UserError(f"data root {root} is not a directory")
