"""What --out-dir holds: one run per phase (the teacher's, the students'), each known by its
manifest run_<phase>.json, and an earlier run's files set aside, never mixed with a new one's.

A fresh run of a phase (not --resume) first moves every file of the phase's earlier run into
previous/<phase>-<time>/ (same relative paths, nothing deleted), so the folder never holds the
checkpoints of one run beside the logs of another. results.json / results.md / curves.png
describe both phases: the archive gets a copy, and the folder's keep only the other phase.
Folders written before manifests existed are read by file name (see phase_of_file).
"""
import json
import os
import re
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Optional

from kd.files.checkpoint import atomic_write_text
from kd.report.results import drop_phase, read_results, write_results_files
from kd.run.config import UsageError

PREVIOUS = 'previous'
RESULTS_FILES = ('results.json', 'results.md', 'curves.png')
SEED_FOLDER = re.compile(r'seed\d+$')


def manifest_path(out_dir, phase):
    """OUT_DIR/run_<phase>.json: the phase's last run (models, folders, files, finished)."""
    return os.path.join(out_dir, f'run_{phase}.json')


def read_manifest(out_dir, phase):
    """The manifest of the phase's last run in out_dir, or None (none, or unreadable)."""
    try:
        with open(manifest_path(out_dir, phase)) as f:
            manifest = json.load(f)
    except (OSError, ValueError):
        return None
    return manifest if isinstance(manifest, dict) and isinstance(manifest.get('models'), dict) \
        else None


def phase_of_file(name, top_level):
    """'teacher', 'students', 'shared' (the results files) or None: whose a file in a run folder
    (OUT_DIR itself when top_level, else a seed<N>/ folder) is, by its name alone."""
    if name in RESULTS_FILES:
        return 'shared'
    for phase in ('teacher', 'students'):
        if name in (f'last_{phase}.pt', f'run_{phase}.json'):
            return phase
    if name.startswith('best_teacher') or name == 'log_teacher.csv':
        return 'teacher'  # the checkpoint, its record, its stored test logits
    if re.fullmatch(r'best_.+\.(pth|json)|log_.+\.csv', name) or (top_level and
                                                                   name == 'grid.png'):
        return 'students'
    return None


def planned_files(phase, model_names, folders, top_copies):
    """The files (relative to OUT_DIR) a run of the phase writes, results files aside.

    model_names: the checkpoints it writes in each of `folders` (relative run folders, '.' for
    OUT_DIR itself); top_copies: whether the first folder's best_* are copied to OUT_DIR."""
    files = []
    for folder in folders:
        files += [os.path.normpath(os.path.join(folder, f)) for n in model_names
                  for f in (f'best_{n}.pth', f'best_{n}.json', f'log_{n}.csv')]
        files.append(os.path.normpath(os.path.join(folder, f'last_{phase}.pt')))
        if phase == 'teacher':
            files.append(os.path.normpath(os.path.join(folder, 'best_teacher_test_logits.pt')))
    if top_copies:
        files += [f'best_{n}{ext}' for n in model_names for ext in ('.pth', '.json')]
        if phase == 'teacher':
            files.append('best_teacher_test_logits.pt')
    if phase == 'students':
        files.append('grid.png')
    files.append(os.path.join('tensorboard', phase))
    return sorted(set(files))


@dataclass(frozen=True)
class Manifest:
    """What OUT_DIR/run_<phase>.json says of a run besides its command and times."""
    phase: str
    models: dict                  # {name: {'arch', 'loss', 'params'}}
    folders: list                 # the run folders relative to OUT_DIR ('.' for OUT_DIR)
    files: list                   # planned_files
    subset: Optional[int]
    dataset: str
    seeds: list


def write_manifest(out_dir, manifest, finished):
    """Write OUT_DIR/run_<phase>.json atomically (manifest: a Manifest); the planned files that
    exist are kept when finished. The start time of a resumed run is kept."""
    previous = read_manifest(out_dir, manifest.phase) or {}
    now = time.strftime('%Y-%m-%dT%H:%M:%S')
    files = manifest.files
    if finished:
        files = [f for f in files if os.path.exists(os.path.join(out_dir, f))]
    written = {
        'phase': manifest.phase, 'models': manifest.models, 'folders': manifest.folders,
        'files': files, 'seeds': manifest.seeds, 'subset': manifest.subset,
        'dataset': manifest.dataset, 'command': ' '.join(sys.argv),
        'started': previous.get('started', now) if previous.get('finished') is False else now,
        'finished': finished, **({'finished_at': now} if finished else {})}
    atomic_write_text(manifest_path(out_dir, manifest.phase),
                      json.dumps(written, indent=2) + '\n')


def owned_files(out_dir, phase, keep=()):
    """The existing files and folders (relative to out_dir) of the phase's earlier runs: its
    manifest's, and those its name patterns match in OUT_DIR and its seed<N>/ folders (runs
    written before manifests, or files a manifest does not list). Paths in `keep` (absolute,
    e.g. the students' teacher checkpoint) are never included."""
    keep = {os.path.abspath(p) for p in keep}
    found = set()
    manifest = read_manifest(out_dir, phase)
    if manifest is not None:
        found.update(f for f in manifest.get('files', []) if isinstance(f, str))
        found.add(os.path.basename(manifest_path(out_dir, phase)))
    for folder in ['.'] + seed_folders(out_dir):
        for name in os.listdir(os.path.join(out_dir, folder)):
            if phase_of_file(name, folder == '.') == phase:
                found.add(os.path.normpath(os.path.join(folder, name)))
    if os.path.isdir(os.path.join(out_dir, 'tensorboard', phase)):
        found.add(os.path.join('tensorboard', phase))
    return sorted(f for f in found
                  if not os.path.isabs(f) and not f.startswith(('..', PREVIOUS + os.sep))
                  and os.path.lexists(os.path.join(out_dir, f))
                  and os.path.abspath(os.path.join(out_dir, f)) not in keep)


def set_aside(out_dir, phase, keep=(), log=print):
    """Before a fresh run of `phase`: move its earlier run's files to previous/<phase>-<time>/
    (relative paths kept) and take that run out of the results files, a copy of which goes with
    it; say so in one line. keep: absolute paths never moved. Returns the archive's path, or
    None when there was nothing to set aside."""
    moves = owned_files(out_dir, phase, keep)
    splits = []  # (folder, its results without this phase, or None when no phase is left)
    for folder in ['.'] + seed_folders(out_dir):
        results = read_results(os.path.join(out_dir, folder))
        if results is None:  # unreadable: it goes with the run it cannot be told apart from
            splits.append((folder, None))
        elif phase in results.get('phases', {}) or any(
                (n == 'teacher') == (phase == 'teacher') for n in results.get('models', {})):
            rest = drop_phase(results, phase)
            splits.append((folder, rest if rest['phases'] else None))
    if not moves and not splits:
        return None
    archive = unique_folder(os.path.join(out_dir, PREVIOUS,
                                         f"{phase}-{time.strftime('%Y%m%d-%H%M%S')}"))
    for rel in moves:
        target = os.path.join(archive, rel)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        os.replace(os.path.join(out_dir, rel), target)
    moved, copied = summarize(moves, phase), []
    for folder, rest in splits:
        source, target = os.path.join(out_dir, folder), os.path.join(archive, folder)
        os.makedirs(target, exist_ok=True)
        present = [n for n in RESULTS_FILES if os.path.exists(os.path.join(source, n))]
        for name in present:  # kept here too while they still describe the other phase
            (shutil.copy2 if rest is not None else os.replace)(os.path.join(source, name),
                                                               os.path.join(target, name))
        if rest is not None:
            if 'curves.png' in present:  # redrawn below without this phase, if anything is left
                os.unlink(os.path.join(source, 'curves.png'))
            write_results_files(source, rest, log=lambda *_: None)
        said = copied if rest is not None else moved
        if folder == '.':
            said.extend(present)
        elif present and not any(folder + os.sep in item for item in said):
            said.append(f'{folder}{os.sep}results.*')
    for folder in seed_folders(out_dir):  # the seed folders this left empty
        if not os.listdir(os.path.join(out_dir, folder)):
            os.rmdir(os.path.join(out_dir, folder))
    other = 'students' if phase == 'teacher' else 'teacher'
    said = ([f'moved {", ".join(moved)}'] if moved else []) + (
        [f'copied {", ".join(copied)}, which here now describe the {other} phase alone']
        if copied else [])
    log(f'The previous {phase} run is set aside in {archive}{os.sep}: {"; ".join(said)}')
    return archive


def seed_folders(out_dir):
    return sorted(d for d in os.listdir(out_dir)
                  if SEED_FOLDER.match(d) and os.path.isdir(os.path.join(out_dir, d)))


def unique_folder(path):
    candidate, n = path, 1
    while os.path.exists(candidate):
        n += 1
        candidate = f'{path}-{n}'
    os.makedirs(candidate)
    return candidate


def summarize(paths, phase):
    """A short list for one line: OUT_DIR's checkpoints and logs counted by model, its other
    files by name, the seed folders together."""
    items, models, logs, seeds = [], set(), set(), []
    for rel in paths:
        head = rel.split(os.sep)[0]
        if SEED_FOLDER.match(head) and head != rel:
            if head + os.sep not in seeds:
                seeds.append(head + os.sep)
        elif re.fullmatch(r'best_.+\.(pth|json)', rel) and not rel.startswith('best_teacher'):
            models.add(os.path.splitext(rel)[0])
        elif re.fullmatch(r'log_.+\.csv', rel) and rel != 'log_teacher.csv':
            logs.add(rel)
        else:
            items.append(rel)
    counted = [f'best_<model>.pth/.json of {len(models)} models'] if models else []
    counted += [f'log_<model>.csv of {len(logs)} models'] if logs else []
    return counted + items + ([f'the {phase} files of {" ".join(seeds)}'] if seeds else [])


def check_out_dir(path):
    """Create --out-dir if needed and prove it is writable, before any training."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise UsageError(f'--out-dir {path} is a file, not a directory')
    try:
        os.makedirs(path, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix='.write-test-', dir=path)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise UsageError(f'--out-dir {path} cannot be written: {e.strerror or e}') from None

